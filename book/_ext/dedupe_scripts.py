"""A Sphinx extension of the book's site (``_config.yml``: ``sphinx: local_extensions``).

With Sphinx 7, an inline script that an extension adds after the builder started
(sphinx-thebe's ``const THEBE_JS_URL = ...``, sphinx-togglebutton's selector) can be
registered twice; the second ``const`` declaration is a JavaScript error in the browser
console on every page. This extension drops the repeats.
"""


def _dedupe_scripts(app, pagename, templatename, context, doctree) -> None:
    """Drop repeated ``<script>`` entries from a page, keeping the first of each.

    With Sphinx 7, an inline script that an extension adds after the builder started
    (sphinx-thebe's ``const THEBE_JS_URL = ...``, sphinx-togglebutton's selector) can
    be registered twice, once with ``filename=''`` and once with ``filename=None``; the
    second ``const`` declaration is a JavaScript error in the browser console on every page.
    """
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, unique = set(), []
    for js in scripts:
        key = (str(getattr(js, "filename", js) or ""),
               tuple(sorted((k, str(v)) for k, v in getattr(js, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            unique.append(js)
    context["script_files"] = unique


def setup(app):
    """Sphinx extension used by the book's build (``sphinx: local_extensions`` in ``_config.yml``):
    removes duplicated scripts from every page, see :func:`_dedupe_scripts`."""
    app.connect("html-page-context", _dedupe_scripts, priority=900)  # after the theme's handlers
    return {"parallel_read_safe": True, "parallel_write_safe": True}


