"""Light and sharp figures for the book's pages (every chapter's setup cell, chapter 1).

:func:`book_figures` makes Jupyter store each matplotlib figure in the smallest
format that keeps it sharp, so that the chapters (stored with their outputs) stay
light on the website:

* a figure of at most 256 distinct colors (label maps, flat plots) becomes an
  8-bit palette PNG, which is lossless for it;
* a figure that shows a photograph (an ``imshow`` of many colors) becomes a JPEG;
* any other figure (anti-aliased plots) becomes a palette PNG of 256 adaptive colors.

A figure wider than the page's text column (:data:`PAGE_WIDTH`) is stored at that width,
as the page would show it.

It also sets a screen resolution (``dpi``) for inline figures. Outside IPython it
only sets the resolution.
"""
from __future__ import annotations

import io
from typing import Optional, Tuple

__all__ = ["book_figures", "encode_figure", "PAGE_WIDTH", "min_panel_width"]

#: Width in pixels of the website's text column; wider images are shown scaled down to it.
PAGE_WIDTH = 800


def min_panel_width(fig, dpi: float, width_px: int, page_width: int = PAGE_WIDTH) -> int:
    """Width in pixels, as shown on a page ``page_width`` wide, of the narrowest panel
    of ``fig`` (a matplotlib Figure saved at ``dpi`` into an image ``width_px`` wide).
    Panels are axes that draw something; colorbars and empty axes are left out. 0 if
    there is none."""
    scale = min(1.0, page_width / max(width_px, 1))
    widths = [ax.get_position().width * fig.get_figwidth() * dpi * scale
              for ax in fig.axes
              if ax.get_visible() and ax.has_data() and getattr(ax, "_colorbar", None) is None]
    return int(min(widths)) if widths else 0


def encode_figure(fig, dpi: int = 72, jpeg_quality: int = 65) -> Tuple[str, bytes, dict]:
    """Render ``fig`` (tight bounding box, white background) and encode it as described
    in the module docstring. Returns ``(mimetype, data, metadata)``; the metadata holds
    ``min_panel_px`` (:func:`min_panel_width`)."""
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    meta = {"min_panel_px": min_panel_width(fig, dpi, img.width)}
    if img.width > PAGE_WIDTH:   # the page would show it scaled down: store it that way
        img = img.resize((PAGE_WIDTH, round(img.height * PAGE_WIDTH / img.width)),
                         Image.Resampling.LANCZOS)
    out = io.BytesIO()
    few = img.getcolors(maxcolors=256) is not None
    photo = any(len(im.get_array().shape) >= 2 and min(im.get_array().shape[:2]) >= 32
                for ax in fig.axes for im in ax.get_images())
    if few or not photo:
        img.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE) \
           .save(out, format="png", optimize=True)
        return "image/png", out.getvalue(), meta
    img.save(out, format="jpeg", quality=jpeg_quality, optimize=True, progressive=True)
    return "image/jpeg", out.getvalue(), meta


def book_figures(dpi: int = 72, jpeg_quality: int = 65) -> None:
    """Set the inline figures' resolution and register :func:`encode_figure` as the way
    IPython stores matplotlib figures (PNG or JPEG, one of the two per figure)."""
    import matplotlib
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    plt.close(plt.figure())  # loads the backend now: the inline backend sets its formatters then

    matplotlib.rcParams["figure.dpi"] = dpi
    matplotlib.rcParams["savefig.dpi"] = dpi
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return
    formatters = shell.display_formatter.formatters
    cache: dict = {}

    def render(fig) -> Tuple[str, bytes, dict]:
        key = id(fig)
        if key not in cache:
            cache.clear()
            cache[key] = encode_figure(fig, dpi, jpeg_quality)
        return cache[key]

    def as_mime(mime: str):
        def formatter(fig) -> Optional[tuple]:
            kind, data, meta = render(fig)
            if mime == "image/jpeg":   # the last of the two formatters IPython calls
                cache.clear()
            return (data, meta) if kind == mime else None
        return formatter

    for mime in ("image/svg+xml", "application/pdf"):
        formatters[mime].pop(Figure, None)
    formatters["image/png"].for_type(Figure, as_mime("image/png"))
    formatters["image/jpeg"].for_type(Figure, as_mime("image/jpeg"))
