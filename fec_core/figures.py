"""What the book's pages show besides code: light, sharp figures and glued numbers.

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

:func:`gallery` draws many small images (digits, shapes, label maps) as ONE image in one
axes, so that a gallery is one wide panel on the page instead of dozens of narrow ones.

:func:`glue` records a number that a cell computed for the chapter's prose (myst-nb's
``{glue:text}`` role), so that the text shows what the code gave on the machine that ran it.
"""
from __future__ import annotations

import io
from typing import Optional, Tuple

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from PIL import Image

__all__ = ["book_figures", "encode_figure", "gallery", "glue", "PAGE_WIDTH", "min_panel_width"]

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
    plt.close(plt.figure())  # loads the backend now: the inline backend sets its formatters then

    matplotlib.rcParams["figure.dpi"] = dpi
    matplotlib.rcParams["savefig.dpi"] = dpi
    try:  # optional: outside IPython only the resolution is set
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


def gallery(ax, images, ncols: int, titles=None, row_labels=None, pad: float = 0.08,
            fontsize: float = 9):
    """Draw equally sized images as one montage in the axes ``ax``, row-major: one wide
    panel on the page instead of many narrow ones.

    The book's galleries use it (the similarity maps of chapter 4, the digits of
    chapter 10, the shapes of chapters 11 and 13).

    ``images``: a sequence of ``[H, W, 3]`` RGB (or ``[H, W]`` gray) arrays or tensors in
    [0, 1], all of one size; ``titles``: a text above each image (or ``None``);
    ``row_labels``: a text left of each row. ``pad``: the gap between images, as a
    fraction of an image's width. Returns the offsets ``[(x0, y0), ...]`` of the images
    in the axes' data coordinates, so that boxes or outlines can be drawn over them
    (a point ``(x, y)`` of image ``i`` lies at ``(x0 + x, y0 + y)``).
    """
    arrays = []
    for im in images:
        a = np.asarray(im.detach().cpu() if hasattr(im, "detach") else im, dtype=np.float32)
        arrays.append(np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a[..., :3])
    if not arrays:
        raise ValueError("gallery needs at least one image")
    h, w = arrays[0].shape[:2]
    if any(a.shape[:2] != (h, w) for a in arrays):
        raise ValueError("gallery images must all have the same size")
    gap = max(1, round(pad * w))
    rows = -(-len(arrays) // ncols)
    canvas = np.ones((rows * (h + gap) - gap, ncols * (w + gap) - gap, 3), np.float32)
    offsets = []
    for i, a in enumerate(arrays):
        y0, x0 = (i // ncols) * (h + gap), (i % ncols) * (w + gap)
        canvas[y0:y0 + h, x0:x0 + w] = np.clip(a, 0, 1)
        offsets.append((x0, y0))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_xticks([]), ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    for (x0, y0), title in zip(offsets, titles or []):
        ax.text(x0 + w / 2, y0 - gap / 2, title, ha="center", va="bottom", fontsize=fontsize)
    for r, label in enumerate(row_labels or []):
        ax.text(-gap, r * (h + gap) + h / 2, label, ha="right", va="center",
                rotation=90, fontsize=fontsize + 1)
    return offsets


#: The prefix myst-nb gives to the data of a glued value that is not displayed.
GLUE_PREFIX = "application/papermill.record/"


def glue(name: str, value, display: bool = False):
    """Record ``value`` under ``name`` for the chapter's prose and return it.

    A markdown cell then writes ``{glue:text}`name:.2f``` and the site shows the number
    as this run computed it. numpy and torch scalars are stored as plain Python numbers
    (their ``repr`` would not parse as one). With myst-nb installed this is
    ``myst_nb.glue``; without it (Colab has no Sphinx, and installing it to print a
    number would be heavy) the same output is written with IPython's own display, which
    is all myst-nb's does. Outside IPython it only returns ``value``.
    """
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()    # numpy / torch scalar -> int, float or bool
    try:  # optional, and IPython below too: the book's build has them, Colab and scripts may not
        from myst_nb import glue as myst_glue
    except ImportError:
        myst_glue = None
    if myst_glue is not None:
        myst_glue(name, value, display=display)
        return value
    try:
        from IPython import get_ipython
        from IPython.core.formatters import format_display_data
        from IPython.display import display as ipy_display
    except ImportError:
        return value
    if get_ipython() is None:
        return value
    bundle, metadata = format_display_data(value)
    prefix = "" if display else GLUE_PREFIX
    metadata["scrapbook"] = dict(name=name, mime_prefix=prefix)
    ipy_display({prefix + k: v for k, v in bundle.items()}, raw=True, metadata=metadata)
    return value
