"""The book as a whole: table of contents, Colab install cells, stand-alone notebooks, the site.

* ``_toc.yml`` lists exactly the notebooks in ``book/`` (and nothing that does not exist);
* every notebook's first code cell is the Colab install cell, pointing at the repository set
  in ``_config.yml`` (the one place the address is written) and at the release tag
  ``v<version>`` of ``pyproject.toml`` (so an old page installs the library it was run with);
* every number with a unit in a chapter's prose is glued from the cell that computes it or
  names its source; every solution cell asserts something; live timings assert only
  sanity bounds with 2x headroom to the worst value measured;
* every ``{cite}`` key is in ``references.bib``;
* (slow) every notebook, copied ALONE into an empty folder, executes once with ``fec_core``
  installed, as in Colab, writes no file next to itself, and reproduces its stored outputs by
  nbval's rules (cells tagged ``nbval-ignore-output`` run but are not compared);
* (slow, browser) the site builds from the stored outputs with warnings as errors, and every
  chapter page, opened in headless Debian chromium, loads without console errors, has its
  math typeset by MathJax, its figures loaded and its Colab launch button. A screenshot of
  one chapter is saved to ``_build/screenshot.png``.
"""
from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT / "book"
NOTEBOOKS = sorted(BOOK.glob("*.ipynb"))
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOT = ROOT / "_build" / "screenshot.png"
SCREENSHOT_PAGE = "book/02_points"
INSTALL_COMMENT = "# Colab: install fec_core from the repository (does nothing elsewhere)"


# FEC_BOOK_TOC=/path/toc.yml builds and checks the site for another table of contents (a subset
# of the chapters while others are being written); the toc tests always check _toc.yml.
SITE_TOC = Path(os.environ["FEC_BOOK_TOC"]).resolve() if os.environ.get("FEC_BOOK_TOC") else ROOT / "_toc.yml"


def _config() -> dict:
    return yaml.safe_load((ROOT / "_config.yml").read_text())


def _toc_entries(toc_path: Path = ROOT / "_toc.yml") -> list:
    """Every page of a jb-book table of contents (root first), as paths without suffix, in order."""
    toc = yaml.safe_load(toc_path.read_text())
    entries = [toc["root"]]

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                entries.append(node["file"])
            for key in ("parts", "chapters", "sections"):
                walk(node.get(key))
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(toc)
    return [re.sub(r"\.(ipynb|md)$", "", e) for e in entries]


def _version() -> str:
    return re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)


def test_library_version_is_the_release():
    """fec_core.__version__ is pyproject.toml's version: the tag the chapters install."""
    import fec_core

    assert fec_core.__version__ == _version()


def _first_code_cell(nb):
    return next(c for c in nb.cells if c.cell_type == "code")


def _markdown(nb) -> str:
    return "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")


def _without_code_blocks(md: str) -> str:
    return re.sub(r"^(```|~~~).*?^\1", "", md, flags=re.M | re.S)


def _stored_images(nb) -> int:
    return sum("image/png" in out.get("data", {}) or "image/jpeg" in out.get("data", {}) or
               "image/svg+xml" in out.get("data", {})
               for c in nb.cells if c.cell_type == "code" for out in c.outputs)


# --------------------------------------------------------------------------- static checks
def test_book_has_chapters():
    assert NOTEBOOKS, f"no notebooks in {BOOK}"


def test_config_sets_the_site_up():
    cfg = _config()
    assert cfg["execute"]["execute_notebooks"] == "off"            # the site renders stored outputs
    assert cfg["only_build_toc_files"] is True
    url = cfg["repository"]["url"]
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", url), url
    assert cfg["repository"]["branch"] == "main"
    assert "colab.research.google.com" in cfg["launch_buttons"]["colab_url"]
    assert cfg["html"]["use_repository_button"] is True
    for bib in cfg["bibtex_bibfiles"]:
        assert (ROOT / bib).is_file(), bib


def test_toc_lists_exactly_the_notebooks():
    entries = _toc_entries()
    assert len(entries) == len(set(entries)), f"duplicate pages in _toc.yml: {entries}"
    for e in entries:
        assert (ROOT / f"{e}.ipynb").is_file() or (ROOT / f"{e}.md").is_file(), f"_toc.yml lists {e}, which does not exist"
    listed = {e for e in entries if (ROOT / f"{e}.ipynb").is_file()}
    present = {str(p.relative_to(ROOT).with_suffix("")) for p in NOTEBOOKS}
    assert listed == present, (f"notebooks missing from _toc.yml: {sorted(present - listed)}; "
                               f"listed but absent: {sorted(listed - present)}")
    chapters = [e for e in entries if (ROOT / f"{e}.ipynb").is_file()]
    assert chapters == sorted(chapters), "chapters are listed out of their numbered order"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_first_code_cell_is_the_colab_install_cell(path):
    nb = nbformat.read(path, as_version=4)
    cell = _first_code_cell(nb)
    lines = cell.source.strip().splitlines()
    assert lines[0] == INSTALL_COMMENT, f"{path.name}: first code cell is not the Colab install cell:\n{cell.source}"
    assert 'find_spec("google.colab")' in cell.source, "the install must only run in Colab"
    assert re.search(r'^    %pip install -q "fec-core(?:\[[a-z,]+\])? @ \{release\}"$', cell.source, re.M), \
        f"{path.name}: no `%pip install -q \"fec-core @ {{release}}\"` in the first code cell"
    m = re.search(r'^    release = "git\+(\S+?)@v([^"]+)"$', cell.source, re.M)
    assert m, f"{path.name}: no `release = \"git+URL@vVERSION\"` in the first code cell"
    assert m.group(1) == _config()["repository"]["url"] + ".git", \
        f"{path.name} installs from {m.group(1)}, _config.yml says {_config()['repository']['url']}"
    assert m.group(2) == _version(), (f"{path.name} installs v{m.group(2)}, pyproject.toml is at "
                                      f"{_version()}: python scripts/bookbuild.py pin")
    assert not cell.outputs, f"{path.name}: the install cell printed something outside Colab: {cell.outputs}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_has_one_title_and_valid_citations(path):
    nb = nbformat.read(path, as_version=4)
    md = _markdown(nb)
    titles = re.findall(r"^# \S", _without_code_blocks(md), flags=re.M)
    assert len(titles) == 1, f"{path.name}: {len(titles)} H1 titles (need exactly one)"
    first_md = next(c for c in nb.cells if c.cell_type == "markdown")
    assert first_md.source.lstrip().startswith("# "), f"{path.name}: the first cell must start with the title"
    keys = set(re.findall(r"@\w+\{([^,\s]+),", (ROOT / "references.bib").read_text()))
    cited = {k.strip() for group in re.findall(r"\{cite(?::\w+)?\}`([^`]+)`", md) for k in group.split(",")}
    assert cited <= keys, f"{path.name} cites keys missing from references.bib: {sorted(cited - keys)}"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert "tests/data" not in cell.source and "../" not in cell.source, \
                f"{path.name} reads a repository file, which Colab does not have:\n{cell.source[:300]}"


# --------------------------------------------------------------------------- one execution, two checks
# nbval's rules (nbval 0.11, without --nbval-lax or sanitizers): these output fields are not
# compared, streams of one name are merged, and cells tagged nbval-ignore-output (or with an
# NBVAL_IGNORE_OUTPUT comment) are run but not compared; nbval-skip cells are not run.
NBVAL_NOT_COMPARED = {"metadata", "traceback", "prompt_number", "output_type", "name", "execution_count",
                      "application/vnd.jupyter.widget-view+json", "image/png", "image/jpeg"}
_CR = re.compile(r"^.*\r(?=[^\n])", re.M)


def _cell_mode(cell) -> str:
    """'skip', 'ignore' or 'check', from the cell's nbval tags or comment markers."""
    tags = set(cell.metadata.get("tags", []))
    comments = {line.strip().lstrip("#").strip() for line in cell.source.splitlines()
                if line.strip().startswith("#")}
    if "nbval-skip" in tags or "NBVAL_SKIP" in comments:
        return "skip"
    if "nbval-ignore-output" in tags or "NBVAL_IGNORE_OUTPUT" in comments:
        return "ignore"
    return "check"


def _comparable(outputs) -> dict:
    """A cell's outputs as nbval compares them: {field: [values in order]}."""
    fields, streams = {}, {}
    for out in outputs:
        if out.get("output_type") == "stream":
            streams[out["name"]] = streams.get(out["name"], "") + out.get("text", "")
            continue
        for key, value in out.items():
            if key in NBVAL_NOT_COMPARED:
                continue
            items = value.items() if key == "data" else [(key, value)]
            for k, v in items:
                if k not in NBVAL_NOT_COMPARED:
                    fields.setdefault(k, []).append(v)
    for name, text in streams.items():  # a carriage return overwrites its line, as nbval has it
        fields.setdefault(name, []).append(_CR.sub("", text))
    return fields


def _output_differences(stored, executed) -> list:
    """Human-readable differences between two notebooks' checked cells (nbval's rules)."""
    import difflib

    problems = []
    cells = [(s, e) for s, e in zip(stored.cells, executed.cells) if s.cell_type == "code"]
    for number, (s, e) in enumerate(cells, start=1):
        if _cell_mode(s) != "check":
            continue
        want, got = _comparable(s.outputs), _comparable(e.outputs)
        if want == got:
            continue
        lines = [f"code cell {number} ({s.source.splitlines()[0][:60] if s.source else ''}...):"]
        for key in sorted(set(want) | set(got)):
            a, b = want.get(key, []), got.get(key, [])
            if a != b:
                diff = difflib.unified_diff("\n".join(map(str, a)).splitlines(), "\n".join(map(str, b)).splitlines(),
                                            "stored", "executed", lineterm="", n=1)
                lines.append(f"  {key}:\n    " + "\n    ".join(list(diff)[:40]))
        problems.append("\n".join(lines))
    return problems


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook(path, tmp_path):
    """Each chapter executes ONCE, copied alone into an empty folder with ``fec_core`` installed
    (the Colab situation), writes no file next to itself, and reproduces its stored outputs by
    nbval's rules (``pytest --nbval`` would execute it a second time)."""
    from nbclient import NotebookClient

    executed = os.environ.get("FEC_BOOK_EXECUTED")
    if executed:  # .ci/run: the book command executed every chapter already; compare those
        _compare_with_executed(path, Path(executed))
        return
    alone = tmp_path / path.name
    shutil.copy(path, alone)
    stored = nbformat.read(alone, as_version=4)
    nb = nbformat.read(alone, as_version=4)
    nb.cells = [c for c in nb.cells if c.cell_type != "code" or _cell_mode(c) != "skip"]
    stored.cells = [c for c in stored.cells if c.cell_type != "code" or _cell_mode(c) != "skip"]
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    env_path = os.environ.get("PYTHONPATH", "")
    assert str(ROOT) not in env_path.split(os.pathsep), "PYTHONPATH must not point into the repository"
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    left = sorted(p.name for p in tmp_path.iterdir() if p.name not in (path.name, ".ipynb_checkpoints"))
    assert not left, f"{path.name} wrote files next to itself (use a temporary directory): {left}"
    problems = _output_differences(stored, nb)
    assert not problems, (f"{path.name}: outputs differ from the stored ones "
                          f"(re-execute with `python scripts/bookbuild.py execute {path.relative_to(ROOT)}` "
                          "if the change is intended):\n" + "\n".join(problems))


def _compare_with_executed(path: Path, folder: Path) -> None:
    """FEC_BOOK_EXECUTED=<folder> (``.ci/run``, after ``python3 dev.py book``, which runs
    each chapter once in a fresh kernel, one thread, as this test does): compare that
    executed copy with the stored notebook by the same rules, and check that the book
    build left no file in its folder that the book does not have."""
    copy = folder / path.name
    assert copy.is_file(), f"FEC_BOOK_EXECUTED={folder} has no {path.name}"
    extra = sorted({p.name for p in folder.iterdir()} - {p.name for p in BOOK.iterdir()}
                   - {".ipynb_checkpoints", "__pycache__"})
    assert not extra, f"the executed chapters wrote files next to themselves: {extra}"
    stored, nb = nbformat.read(path, as_version=4), nbformat.read(copy, as_version=4)
    assert len(stored.cells) == len(nb.cells), \
        f"{path.name}: the executed copy has another number of cells (did it fail? {copy})"
    problems = _output_differences(stored, nb)
    assert not problems, (f"{path.name}: outputs differ from the stored ones "
                          f"(re-execute with `python scripts/bookbuild.py execute {path.relative_to(ROOT)}` "
                          "if the change is intended):\n" + "\n".join(problems))


def test_output_comparison_follows_nbval_rules():
    """The comparison above catches a changed number and ignores what nbval ignores."""
    def cell(outputs, tags=()):
        c = nbformat.v4.new_code_cell("print(1)", outputs=[nbformat.from_dict(o) for o in outputs])
        c.metadata["tags"] = list(tags)
        return c

    def nb(*cells):
        return nbformat.v4.new_notebook(cells=list(cells))

    text = {"output_type": "stream", "name": "stdout", "text": "loss 0.25\n"}
    split = [{"output_type": "stream", "name": "stdout", "text": "loss "},
             {"output_type": "stream", "name": "stdout", "text": "0.25\n"}]
    other = {"output_type": "stream", "name": "stdout", "text": "loss 0.26\n"}
    png = {"output_type": "display_data", "data": {"image/png": "AAA", "text/plain": "<Figure>"}, "metadata": {}}
    png2 = {"output_type": "display_data", "data": {"image/png": "BBB", "text/plain": "<Figure>"}, "metadata": {}}
    assert _output_differences(nb(cell([text])), nb(cell(split))) == []           # streams merged
    assert _output_differences(nb(cell([png])), nb(cell([png2]))) == []            # images not compared
    assert _output_differences(nb(cell([text], ["nbval-ignore-output"])), nb(cell([other]))) == []
    assert _output_differences(nb(cell([text])), nb(cell([other])))                # a changed number
    assert _output_differences(nb(cell([text])), nb(cell([])))                     # a missing output
    assert _cell_mode(nbformat.v4.new_code_cell("# NBVAL_SKIP\nx = 1")) == "skip"


# --------------------------------------------------------------------------- the site in a browser
def _browser_available() -> bool:
    return CHROMIUM.exists() and CHROMEDRIVER.exists()


def _ensure_browser() -> None:
    """Install chromium with scripts/ensure-browser.sh if missing (root + apt-get), else skip."""
    if _browser_available():
        return
    script = ROOT / "scripts" / "ensure-browser.sh"
    if script.exists() and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["bash", str(script)], check=False, timeout=900)
    if not _browser_available():
        pytest.skip(f"{CHROMIUM} / {CHROMEDRIVER} are absent and could not be installed "
                    "(needs root and apt-get: apt-get install chromium chromium-driver)")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Build the site from the stored outputs (warnings are errors) and serve it on 127.0.0.1.
    With FEC_BOOK_HTML set (``.ci/run``, after ``python3 dev.py book``), serve that freshly
    executed and built site instead of building another."""
    _ensure_browser()
    built = os.environ.get("FEC_BOOK_HTML")
    if built:
        html = Path(built).resolve()
        assert (html / "index.html").is_file(), f"FEC_BOOK_HTML={built} holds no index.html"
        yield from _serve(html)
        return
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, PYDEVD_DISABLE_FILE_VALIDATION="1")
    cmd = [sys.executable, str(ROOT / "scripts" / "bookbuild.py"), "build", "--out", str(out)]
    if SITE_TOC != ROOT / "_toc.yml":
        cmd += ["--toc", str(SITE_TOC)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        pytest.fail(f"the site build failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
    html = out / "_build" / "html"
    assert (html / "index.html").is_file()
    yield from _serve(html)


def _serve(html: Path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(html)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def browser(site, tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,1600",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, condition_js: str, timeout: float = 60.0) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if driver.execute_script(condition_js):
            return True
        time.sleep(0.25)
    return False


PAGES = [e for e in _toc_entries(SITE_TOC) if (ROOT / f"{e}.ipynb").is_file()] if SITE_TOC.exists() else []

UNTYPESET_MATH = ("return Array.from(document.querySelectorAll('span.math, div.math'))"
                  ".filter(e => !e.querySelector('mjx-container')).length;")
ALL_TYPESET = UNTYPESET_MATH.replace("return ", "return 0 === ", 1)
STRAY_DOLLARS = """
const root = document.querySelector('article') || document.body;
const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
const found = [];
while (walker.nextNode()) {
  const node = walker.currentNode;
  if (!node.textContent.includes('$')) continue;
  if (node.parentElement.closest('pre, code, script, style, mjx-container, .cell_output, .highlight')) continue;
  found.push(node.textContent.trim().slice(0, 80));
}
return found;
"""
IMAGES = ("return Array.from(document.querySelectorAll('.cell_output img'))"
          ".map(i => [i.getAttribute('src'), i.complete, i.naturalWidth]);")


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.xdist_group("site")  # one worker builds the site and runs the browser
@pytest.mark.timeout(2400)
@pytest.mark.parametrize("page", PAGES)
def test_chapter_page_in_browser(page, site, browser):
    nb = nbformat.read(ROOT / f"{page}.ipynb", as_version=4)
    browser.get_log("browser")  # forget what earlier pages logged
    browser.get(f"{site}/{page}.html")
    assert _wait(browser, "return document.readyState === 'complete';"), f"{page}: the page did not finish loading"
    problems = []

    # the math: every math element typeset by MathJax (and a page whose text has math has math elements)
    n_math = browser.execute_script("return document.querySelectorAll('span.math, div.math').length;")
    if "$" in _markdown(nb) and n_math == 0:
        problems.append("the notebook has $...$ math but the page has no math elements")
    if n_math:
        if not _wait(browser, ALL_TYPESET):
            problems.append(f"{browser.execute_script(UNTYPESET_MATH)} of {n_math} math elements not typeset by MathJax")
        errors = browser.execute_script("return Array.from(document.querySelectorAll('mjx-merror'))"
                                        ".map(e => e.getAttribute('data-mjx-error') || e.textContent);")
        if errors:
            problems.append(f"MathJax could not typeset: {errors}")
    stray = browser.execute_script(STRAY_DOLLARS)   # $...$ that MyST did not parse as math
    if stray:
        problems.append(f"text with unparsed $ math: {stray}")

    # the figures: as many loaded images as the notebook stores
    stored = _stored_images(nb)
    if stored:
        _wait(browser, "return Array.from(document.querySelectorAll('.cell_output img')).every(i => i.complete);")
        images = browser.execute_script(IMAGES)
        broken = [src for src, complete, width in images if not (complete and width > 0)]
        if len(images) < stored:
            problems.append(f"{len(images)} images on the page, the notebook stores {stored}")
        if broken:
            problems.append(f"images that did not load: {broken}")

    # the Colab launch button, pointing at this notebook in the repository
    links = browser.execute_script("return Array.from(document.querySelectorAll('a[href*=\"colab.research.google.com\"]'))"
                                   ".map(a => a.href);")
    url = _config()["repository"]["url"].removeprefix("https://github.com/")
    want = f"https://colab.research.google.com/github/{url}/blob/{_config()['repository']['branch']}/{page}.ipynb"
    if want not in links:
        problems.append(f"no Colab launch button to {want} (found {links})")

    # the console: no errors (a missing favicon is not one)
    severe = [e for e in browser.get_log("browser") if e.get("level") == "SEVERE" and "favicon" not in e.get("message", "")]
    if severe:
        problems.append(f"console errors: {[e['message'] for e in severe]}")

    if page == SCREENSHOT_PAGE:
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(SCREENSHOT)), "could not save the screenshot"
    assert not problems, f"{page}:\n  " + "\n  ".join(problems)


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.xdist_group("site")  # one worker builds the site and runs the browser
def test_bibliography_page_in_browser(site, browser):
    browser.get(f"{site}/book/bibliography.html")
    assert _wait(browser, "return document.readyState === 'complete';")
    entries = browser.execute_script("return document.querySelectorAll('[role=\"doc-biblioentry\"], .citation').length;")
    keys = re.findall(r"^@\w+\{", (ROOT / "references.bib").read_text(), flags=re.M)
    assert entries >= len(keys), f"the bibliography page shows {entries} entries, references.bib has {len(keys)}"
    severe = [e for e in browser.get_log("browser") if e.get("level") == "SEVERE" and "favicon" not in e.get("message", "")]
    assert not severe, f"console errors: {[e['message'] for e in severe]}"


# --------------------------------------------------------------------------- the book's house rules
# (added with the second edition: summaries, solved exercises, light pages, clean outputs)
MAX_BOOK_BYTES = 4 * 2**20          # all notebooks together, outputs included
MIN_PANEL_PX = 225                  # "about 250 px" (a tenth below allowed): narrowest panel on the page
MACHINE_TEXT = re.compile(r"/work/|/tmp/|/home/|/Users/|\.venv|site-packages|"
                          r"\b20\d\d-[01]\d-[0-3]\d\b")


def _text_outputs(nb):
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        for out in cell.outputs:
            if "text" in out:
                yield i, out["text"]
            for mime in ("text/plain", "text/html", "text/markdown"):
                if mime in out.get("data", {}):
                    yield i, out["data"][mime]


def _image_outputs(nb):
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        for out in cell.outputs:
            for mime in ("image/png", "image/jpeg"):
                if mime in out.get("data", {}):
                    yield i, mime, out.get("metadata", {}).get(mime, {})


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_chapter_has_a_summary(path):
    nb = nbformat.read(path, as_version=4)
    headings = re.findall(r"^## (.+)$", _without_code_blocks(_markdown(nb)), flags=re.M)
    assert "Summary" in [h.strip() for h in headings], f"{path.name} has no '## Summary' section"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_exercise_has_a_solution(path):
    """One code cell tagged ``solution`` (and ``hide-input``, folded on the site) per exercise,
    after the exercises, executed (it has an execution count: nbval re-runs and checks it)."""
    nb = nbformat.read(path, as_version=4)
    where = [i for i, c in enumerate(nb.cells) if c.cell_type == "markdown"
             and re.search(r"^## Exercises\s*$", c.source, flags=re.M)]
    if not where:
        pytest.skip(f"{path.name} has no exercises")
    exercises = re.findall(r"^\d+\. ", nb.cells[where[0]].source.split("## Exercises", 1)[1],
                           flags=re.M)
    solutions = [c for c in nb.cells[where[0]:] if "solution" in c.metadata.get("tags", [])]
    assert len(solutions) == len(exercises), \
        f"{path.name}: {len(exercises)} exercises, {len(solutions)} cells tagged 'solution'"
    for k, cell in enumerate(solutions, start=1):
        assert cell.cell_type == "code" and "hide-input" in cell.metadata["tags"], \
            f"{path.name}: solution {k} must be a code cell tagged 'hide-input' too"
        assert cell.source.lstrip().startswith(f"# Exercise {k}"), \
            f"{path.name}: solution {k} must start with '# Exercise {k}'"
        assert cell.execution_count, f"{path.name}: solution {k} was not executed"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_code_lines_fit_the_page(path):
    nb = nbformat.read(path, as_version=4)
    long = [(i, line) for i, c in enumerate(nb.cells) if c.cell_type == "code"
            for line in c.source.splitlines() if len(line) > 88]
    assert not long, (f"{path.name}: {len(long)} code lines longer than 88 characters, e.g. "
                      f"cell {long[0][0]}: {long[0][1]!r}")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_outputs_hold_no_machine_paths_or_dates(path):
    nb = nbformat.read(path, as_version=4)
    found = [(i, m.group(0)) for i, text in _text_outputs(nb) for m in [MACHINE_TEXT.search(text)] if m]
    assert not found, f"{path.name}: stored outputs name the machine or a date: {found[:5]}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_figures_are_light_and_wide_enough(path):
    """Every figure went through ``fec_core.figures.book_figures`` (palette PNG or JPEG, with
    its narrowest panel recorded) and no panel is narrower than about 250 px on the page
    (a gallery of thumbnails is one montage, ``fec_core.figures.gallery``)."""
    nb = nbformat.read(path, as_version=4)
    for i, mime, meta in _image_outputs(nb):
        assert "min_panel_px" in meta, \
            f"{path.name} cell {i}: a {mime} figure not stored by fec_core.figures.book_figures()"
        assert meta["min_panel_px"] == 0 or meta["min_panel_px"] >= MIN_PANEL_PX, \
            f"{path.name} cell {i}: a figure panel {meta['min_panel_px']} px wide on the page"


# --------------------------------------------------------------------------- live timings
# The rule for every live measurement (README, "Numbers that hold on every CPU"): a chapter
# prints the reader's own number; an assert on a timing is a sanity bound `x > BOUNDS[k]`
# (larger is better) or `x < BOUNDS[k]` (smaller is better) with at least 2x headroom to
# WORST_MEASURED[k], the worst value measured on any machine and CPU configuration tried.
TIMING_CALL = re.compile(r"perf_counter|process_time|time\.time\(|timeit|bench\.(run|main)\(|"
                         r"\bprofile\(|self_cpu_time")
HEADROOM = 2.0


def _literal_dicts(nb, name: str) -> dict:
    """The dict literal (``dict(k=v)`` or ``{...}``) assigned to ``name`` in any code cell."""
    import ast

    found = {}
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for node in ast.walk(ast.parse(_python(cell.source))):
            if not isinstance(node, ast.Assign):
                continue
            pairs = []
            for target, value in _assigned(node):
                if isinstance(target, ast.Name) and target.id == name:
                    pairs.append(value)
            for value in pairs:
                if isinstance(value, ast.Call) and getattr(value.func, "id", "") == "dict":
                    found.update({kw.arg: ast.literal_eval(kw.value) for kw in value.keywords})
                else:
                    found.update(ast.literal_eval(value))
    return found


def _assigned(node):
    """(target, value) pairs of an assignment, tuples unpacked (``a, b = x, y``)."""
    import ast

    for target in node.targets:
        if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
            yield from zip(target.elts, node.value.elts)
        else:
            yield target, node.value


def _python(source: str) -> str:
    """A cell's source without IPython magics (``%pip``, ``!cmd``), parseable by ast."""
    return "\n".join(line[:len(line) - len(line.lstrip())] + "pass"
                     if line.lstrip().startswith(("%", "!")) else line
                     for line in source.splitlines())


def _bound_asserts(source: str):
    """(key, direction) of every ``assert x > BOUNDS[k]`` / ``assert x < BOUNDS[k]``,
    direction '>' when larger is better; and the ordering comparisons of an assert with a
    plain number (a tolerance written as ``1e-6`` is not one)."""
    import ast

    bounds, literals = [], []
    for node in ast.walk(ast.parse(_python(source))):
        if not isinstance(node, ast.Assert):
            continue
        for cmp in (n for n in ast.walk(node.test) if isinstance(n, ast.Compare)):
            sides = [cmp.left, *cmp.comparators]
            for (a, op, b) in zip(sides, cmp.ops, sides[1:]):
                if not isinstance(op, (ast.Lt, ast.LtE, ast.Gt, ast.GtE)):
                    continue
                greater = isinstance(op, (ast.Gt, ast.GtE))
                for side, larger_is_better in ((b, greater), (a, not greater)):
                    if (isinstance(side, ast.Subscript) and getattr(side.value, "id", "") == "BOUNDS"
                            and isinstance(side.slice, ast.Constant)):
                        bounds.append((side.slice.value, ">" if larger_is_better else "<"))
                    if (isinstance(side, ast.Constant) and isinstance(side.value, (int, float))
                            and "e" not in ast.get_source_segment(_python(source), side).lower()):
                        literals.append(ast.get_source_segment(_python(source), node)[:80])
    return bounds, literals


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_live_timings_are_sanity_bounds(path):
    """Cells that time something are tagged nbval-ignore-output and assert only sanity
    bounds from BOUNDS, each with 2x headroom to WORST_MEASURED."""
    nb = nbformat.read(path, as_version=4)
    bounds, worst = _literal_dicts(nb, "BOUNDS"), _literal_dicts(nb, "WORST_MEASURED")
    problems, used = [], set()
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or not TIMING_CALL.search(cell.source):
            continue
        if _cell_mode(cell) == "check":
            problems.append(f"cell {i} times something but is not tagged nbval-ignore-output")
        found, literals = _bound_asserts(cell.source)
        problems += [f"cell {i} asserts a timing against a plain number: {a}" for a in literals]
        used.update(found)
    for i, cell in enumerate(nb.cells):   # a bound may be asserted after its timing cell
        if cell.cell_type == "code" and "BOUNDS[" in cell.source:
            used.update(_bound_asserts(cell.source)[0])
    for key, direction in sorted(used):
        if key not in bounds or key not in worst:
            problems.append(f"BOUNDS[{key!r}] is asserted but BOUNDS / WORST_MEASURED lack it")
            continue
        room = worst[key] / bounds[key] if direction == ">" else bounds[key] / worst[key]
        if room < HEADROOM:
            problems.append(f"BOUNDS[{key!r}] = {bounds[key]} leaves {room:.2f}x headroom to the "
                            f"worst measured {worst[key]} (at least {HEADROOM}x)")
    unused = set(bounds) - {k for k, _ in used}
    problems += [f"BOUNDS[{k!r}] is never asserted" for k in sorted(unused)]
    assert not problems, f"{path.name}:\n  " + "\n  ".join(problems)


def test_the_timing_rule_catches_tight_bounds():
    """The parser behind the rule sees both directions, and a plain number."""
    src = ("assert speed > BOUNDS['a']\nassert BOUNDS['b'] > t\nassert 1.5 < s\n"
           "assert err < 1e-6\n%time x = 1")
    bounds, literals = _bound_asserts(src)
    assert sorted(bounds) == [("a", ">"), ("b", "<")]
    assert literals == ["assert 1.5 < s"]


# --------------------------------------------------------------------------- numbers in prose
# Every number with a unit that the reader sees in a chapter's text is computed by the
# chapter and glued in ({glue:text}`name`, myst-nb; fec_core.figures.glue), or names its
# source in the same sentence. What counts as a source: a citation ({cite}`key`), a file
# in backticks (`fec_core/results/cpu_bench.json`, `fpn_r50.py`), or one of SOURCE_WORDS
# (the paper, its supplement and tables, the official code, a recorded run, the README).
# Not numbers with a unit, and so never flagged: equation, chapter, exercise and stage
# numbers, years, shapes (224 x 224, 32x32, $7 \times 7$), counts of things (30 epochs,
# 4 heads), powers of two written as such, and anything inside code or math.
UNIT = (r"(?:ms|s|sec|seconds?|min|minutes?|h|hours?|%|percent|[KMGT]i?B|kB|img/s|images/s|"
        r"images per second|parameters|params|[KMGT]?MACs|[KMGT]?FLOPs?|TFLOP/s|GF/s|px|"
        r"[xX×](?!\s*\d)|times (?:faster|slower|longer|shorter|larger|smaller|more|less|as|the))")
NUMBER_WITH_UNIT = re.compile(r"(?<![\w.^{])(\d[\d,]*(?:\.\d+)?)(?:-|\s)?(?:to \d[\d,.]* ?)?"
                              + UNIT + r"(?![\w/])")
SUFFIXED = re.compile(r"(?<![\w.^{])\d+(?:\.\d+)?\s?[MGK](?= ?(?:parameters|params|MACs|FLOPs)|\b)(?!\w)")
SOURCE_WORDS = re.compile(r"\bpaper\b|\bsupplement|\bTable\s+\d|\bofficial\b|\brecorded\b|"
                          r"\bREADME\b|\bAlgorithm S1\b", re.I)
SOURCE_FILE = re.compile(r"`[^`\s]*(?:/|\.(?:json|py|md|yml|yaml|txt|sh|pth))[^`\s]*`")


def _prose_sentences(md: str):
    """The sentences of a markdown cell, with code, math and glue roles taken out."""
    md = _without_code_blocks(md)
    md = re.sub(r"^\$\$.*?^\$\$", " ", md, flags=re.M | re.S)          # display math
    md = re.sub(r"\{glue(?::\w+)?\}`[^`]*`", " GLUED ", md)                # glued numbers
    md = re.sub(r"\{(?!cite)\w+(?::\w+)?\}`[^`]*`", " ", md)               # {doc}, {ref}, ...
    md = re.sub(r"\$[^$]+\$", " ", md)                                     # inline math
    for sentence in re.split(r"(?<=[.!?:;])\s+(?=[A-Z(*`])|\n\s*\n|\n(?=\s*(?:[-*|]|\d+\.)\s)", md):
        yield sentence


def _unsourced_numbers(md: str) -> list:
    found = []
    for sentence in _prose_sentences(md):
        sourced = "{cite" in sentence or SOURCE_WORDS.search(sentence) or SOURCE_FILE.search(sentence)
        text = re.sub(r"`[^`]*`", " ", sentence)                           # inline code
        hits = [m.group(0) for m in NUMBER_WITH_UNIT.finditer(text)]
        hits += [m.group(0) for m in SUFFIXED.finditer(text)]
        if hits and not sourced:
            found.append(f"{', '.join(hits)}: {' '.join(sentence.split())[:140]}")
    return found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_numbers_in_prose_are_computed_or_cited(path):
    nb = nbformat.read(path, as_version=4)
    found = [f"cell {i}: {hit}" for i, c in enumerate(nb.cells) if c.cell_type == "markdown"
             for hit in _unsourced_numbers(c.source)]
    assert not found, (f"{path.name}: {len(found)} numbers with a unit neither glued nor "
                       "next to a source:\n  " + "\n  ".join(found))


def test_number_lint_flags_and_passes_what_it_should():
    flagged = ["It takes 41 s here.", "up to 30 times longer on a strided axis.",
               "about 20 percent of the time.", "it needs 64 GiB.", "2.5x faster.",
               "a 5.5M-parameter model.", "at 1.3 GMACs per image.", "10% faster."]
    passing = ["Eq. 5 and chapter 12 (2024).", "a 224 x 224 image, 32x32 digits.",
               "30 epochs of 4 heads.", "it takes {glue:text}`t:.1f` s.",
               "the paper reports 5.5M parameters {cite}`chen2024fec`.",
               "The official code takes 813 ms.", "`cpu_bench.json` has 319 ms.",
               "a $7 \\times 7$ grid and `_CPU_TILE = 2**20`.", "stages 1 to 4, Algorithm S1."]
    for text in flagged:
        assert _unsourced_numbers(text), text
    for text in passing:
        assert not _unsourced_numbers(text), (text, _unsourced_numbers(text))


# --------------------------------------------------------------------------- solutions that test
def _asserts_something(source: str) -> bool:
    """An ``assert`` statement, or a call of an ``assert...`` function
    (``torch.testing.assert_close``, ``assert_assignments_close``, ...)."""
    import ast

    for node in ast.walk(ast.parse(_python(source))):
        if isinstance(node, ast.Assert):
            return True
        if isinstance(node, ast.Call):
            name = getattr(node.func, "attr", getattr(node.func, "id", ""))
            if name.startswith("assert"):
                return True
    return False


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_solution_asserts_something(path):
    nb = nbformat.read(path, as_version=4)
    silent = [c.source.splitlines()[0] for c in nb.cells
              if "solution" in c.metadata.get("tags", []) and not _asserts_something(c.source)]
    assert not silent, f"{path.name}: solution cells that assert nothing: {silent}"


def test_notebooks_together_are_light():
    total = sum(p.stat().st_size for p in NOTEBOOKS)
    sizes = ", ".join(f"{p.stem} {p.stat().st_size / 2**20:.2f}" for p in NOTEBOOKS)
    assert total <= MAX_BOOK_BYTES, \
        f"the notebooks weigh {total / 2**20:.2f} MiB together (at most 4): {sizes}"


def test_book_figures_encoding():
    """fec_core.figures: a plot becomes a palette PNG, a photograph a JPEG, both with the
    narrowest panel's width on the page; the bundled photographs load by name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image
    import io

    from fec_core.data import PHOTOGRAPHS, photograph
    from fec_core.figures import PAGE_WIDTH, encode_figure

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(np.sin(np.linspace(0, 6, 100)))
    mime, data, meta = encode_figure(fig, dpi=72)
    assert mime == "image/png" and Image.open(io.BytesIO(data)).mode == "P"
    assert 250 < meta["min_panel_px"] < 6 * 72
    plt.close(fig)
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    for ax, name in zip(axes, list(PHOTOGRAPHS) * 2):
        ax.imshow(photograph(name, 64))
    mime, data, meta = encode_figure(fig, dpi=72)
    assert mime == "image/jpeg"
    assert meta["min_panel_px"] < PAGE_WIDTH / 4          # 16 inches are shown scaled down
    plt.close(fig)
    with pytest.raises(ValueError, match="unknown photograph"):
        photograph("no such picture")
    # a gallery of 30 thumbnails is one panel as wide as the figure
    from fec_core.figures import gallery

    fig, ax = plt.subplots(figsize=(10, 3.5))
    offsets = gallery(ax, [np.full((8, 8), i / 30) for i in range(30)], ncols=10,
                      titles=[str(i) for i in range(30)], row_labels=["a", "b", "c"])
    assert len(offsets) == 30 and offsets[11][0] == offsets[1][0] > offsets[0][0] == 0
    mime, data, meta = encode_figure(fig, dpi=72)
    assert meta["min_panel_px"] > 500
    plt.close(fig)
    with pytest.raises(ValueError, match="same size"):
        gallery(plt.gca(), [np.zeros((8, 8)), np.zeros((4, 4))], ncols=2)
    plt.close("all")


# --------------------------------------------------------------------------- the book command
def test_book_build_survives_a_failing_chapter(tmp_path):
    """scripts/bookbuild.py executes every chapter even when one fails: the failure names the
    chapter, its code cell and the error; the failed chapter is kept with the error output
    and a note for its page; the others are executed and saved."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import bookbuild
    finally:
        sys.path.pop(0)

    def notebook(name, *sources):
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(f"# {name}")]
                                      + [nbformat.v4.new_code_cell(s) for s in sources])
        nbformat.write(nb, tmp_path / f"{name}.ipynb")
        return tmp_path / f"{name}.ipynb"

    good = notebook("a_good", "x = 2", "print(x + 1)")
    bad = notebook("b_bad", "y = 1", "raise ValueError(f'broken {y}')", "print('never')")
    failures = bookbuild.execute_all([good, bad], workers=2)
    assert len(failures) == 1 and failures[0].startswith("b_bad.ipynb, code cell 2")
    assert "ValueError: broken 1" in failures[0]
    ran = nbformat.read(good, as_version=4)
    assert ran.cells[2].outputs[0]["text"] == "3\n"
    kept = nbformat.read(bad, as_version=4)
    assert "stopped at code cell 2" in kept.cells[1].source            # the note on its page
    assert kept.cells[3].outputs[0]["output_type"] == "error"
    assert kept.cells[4].outputs == []                                 # nothing after it
    # in place (the developer's command), a failed chapter is left as it was
    before = bad.read_text()
    bookbuild.execute_notebook(bad)
    assert bad.read_text() == before


def test_book_build_names_failed_chapters_when_the_site_fails_too(tmp_path, monkeypatch):
    """A failed chapter leaves glue keys undefined, so jupyter-book's -W fails too: the error
    still names the chapter, its cell and error first, then jupyter-book's exit."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import bookbuild
    finally:
        sys.path.pop(0)
    failure = "b_bad.ipynb, code cell 2 (raise ValueError): ValueError: broken"
    monkeypatch.setattr(bookbuild, "execute_all", lambda notebooks: [failure])
    monkeypatch.setattr(bookbuild.subprocess, "run",
                        lambda cmd, env: subprocess.CompletedProcess(cmd, 1))
    monkeypatch.setattr(bookbuild, "ROOT", tmp_path)
    (tmp_path / "book").mkdir()
    with pytest.raises(RuntimeError) as err:
        bookbuild.build(execute=True, out=tmp_path)
    lines = str(err.value).splitlines()
    assert lines[0].startswith("1 chapter(s) failed") and lines[1].strip() == failure
    assert lines[2].startswith("jupyter-book build failed (exit 1)")


def test_glue_writes_what_myst_nb_writes(monkeypatch):
    """fec_core.figures.glue: numpy scalars become plain numbers (the page can format
    them), and without myst-nb (Colab) the output is the one myst-nb would write."""
    import numpy as np
    from IPython.testing.globalipapp import start_ipython
    from IPython.utils.capture import capture_output

    from fec_core.figures import glue

    start_ipython()

    def glued(value):
        with capture_output() as captured:
            assert glue("ratio", value) == 2.5
        (out,) = captured.outputs
        return out.data, out.metadata

    with_myst = glued(np.float64(2.5))
    assert with_myst[0] == {"application/papermill.record/text/plain": "2.5"}
    monkeypatch.setitem(sys.modules, "myst_nb", None)   # import myst_nb now fails
    assert glued(np.float64(2.5)) == with_myst
