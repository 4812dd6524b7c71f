"""Drawing FEC's clusters (book chapter 11): colors, panels, figures, and saving them.

Figures in the spirit of the paper's Figure 3: the image, then one small panel per
clustering layer with every pixel painted by its cluster (traced to the pixels by
:mod:`fec_core.interpret`), then the final representatives merged into ``k``
regions. No legends, no axes; colors are consistent across panels:

* ``color="mean"``: a cluster is painted with the mean image color of its pixels (the
  cluster's "representative as a color"), so the same pixels get the same color in
  every panel where they stay together; cluster boundaries are drawn as thin lines.
* ``color="palette"``: a fixed palette, each panel's labels renumbered to best match
  the previous panel's (:func:`match_labels`).

:func:`select_layers` picks the maps to draw (the ``--layers`` of the command line);
:func:`save_figure` writes a PNG without leaving a partial file.
"""
from __future__ import annotations

import contextlib
import errno
import math
import os
from typing import List, Optional, Sequence, Tuple

import matplotlib.pyplot as plt
import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ..interpret import LayerMap

__all__ = ["PALETTE", "mean_colors", "palette_colors", "boundaries", "paint", "match_labels", "select_layers",
           "plot_layers", "plot_regions", "save_figure", "check_output"]

#: A fixed palette for region panels (matplotlib's tab10 followed by tab20's light shades).
PALETTE = np.array([
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
    (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (199, 199, 199),
    (219, 219, 141), (158, 218, 229)], dtype=np.float32) / 255.0


def _np(a) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def _check(image: np.ndarray, labels: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be [H, W, 3], got {image.shape}")
    if labels.shape != image.shape[:2]:
        raise ValueError(f"labels {labels.shape} do not match the image {image.shape[:2]}")


def mean_colors(image, labels) -> np.ndarray:
    """Paint every cluster with the mean color of its pixels: ``image`` ``[H, W, 3]`` in [0, 1],
    ``labels`` ``[H, W]`` (any integers) -> ``[H, W, 3]``."""
    image, labels = _np(image).astype(np.float32), _np(labels)
    _check(image, labels)
    _, inv = np.unique(labels, return_inverse=True)
    inv = inv.reshape(-1)
    counts = np.bincount(inv).astype(np.float32)
    means = np.stack([np.bincount(inv, weights=image[..., c].reshape(-1)) for c in range(3)], 1) / counts[:, None]
    return means[inv].reshape(image.shape).astype(np.float32)


def palette_colors(labels, palette: np.ndarray = PALETTE) -> np.ndarray:
    """Paint label ``j`` with ``palette[j mod len(palette)]``: ``[H, W]`` -> ``[H, W, 3]``."""
    labels = _np(labels)
    return palette[np.mod(labels, len(palette))]


def boundaries(labels) -> np.ndarray:
    """Pixels whose right or lower neighbor is in another cluster: ``[H, W]`` -> bool ``[H, W]``."""
    labels = _np(labels)
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return edge


def paint(image, labels, color: str = "mean", alpha: float = 1.0, edges: bool = True,
          edge_color: Tuple[float, float, float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """One panel: ``labels`` ``[H, W]`` drawn over ``image`` ``[H, W, 3]`` in [0, 1].

    ``color``: ``"mean"`` (each cluster in its mean image color) or ``"palette"``; ``alpha``:
    opacity of the cluster colors over the image; ``edges``: draw cluster boundaries.
    Returns ``[H, W, 3]`` in [0, 1].
    """
    image, labels = _np(image).astype(np.float32), _np(labels)
    _check(image, labels)
    if color == "mean":
        fill = mean_colors(image, labels)
    elif color == "palette":
        fill = palette_colors(labels)
    else:
        raise ValueError(f"color must be 'mean' or 'palette', got {color!r}")
    out = alpha * fill + (1 - alpha) * image
    if edges:
        out[boundaries(labels)] = edge_color
    return np.clip(out, 0, 1)


def match_labels(labels: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Renumber ``labels`` ``[H, W]`` so that its regions best overlap ``reference``'s
    (Hungarian matching of the overlap counts, scipy). Used to keep colors consistent
    across panels; regions without a partner get new numbers after ``reference``'s."""
    a, ua = np.unique(labels, return_inverse=True)
    r, ur = np.unique(reference, return_inverse=True)
    overlap = np.zeros((len(a), len(r)), dtype=np.int64)
    np.add.at(overlap, (ua.reshape(-1), ur.reshape(-1)), 1)
    rows, cols = linear_sum_assignment(-overlap)
    new = np.empty(len(a), dtype=np.int64)
    new[rows] = r[cols]
    rest = np.setdiff1d(np.arange(len(a)), rows)
    new[rest] = int(reference.max()) + 1 + np.arange(len(rest))
    return new[ua].reshape(labels.shape)


def select_layers(maps: Sequence[LayerMap], which: str = "all", head: Optional[int] = 0) -> List[LayerMap]:
    """Pick the maps to draw: ``which`` is ``'all'`` (stem, pools and encode layers),
    ``'pool'`` (stem and pools: the hierarchy), ``'encode'``, or a comma-separated list of
    layer names or 0-based positions in the list of distinct layers. Encode layers keep
    only ``head`` (``None``: every head)."""
    names = []
    for m in maps:
        if m.name not in names:
            names.append(m.name)
    if which == "all":
        keep = names
    elif which == "pool":
        keep = [n for n, m in zip(names, _first_of(maps, names)) if m.kind in ("stem", "pool")]
    elif which == "encode":
        keep = [n for n, m in zip(names, _first_of(maps, names)) if m.kind == "encode"]
    else:
        keep = []
        for part in [p.strip() for p in which.split(",") if p.strip()]:
            if part.lstrip("-").isdigit():
                i = int(part)
                if not -len(names) <= i < len(names):
                    raise ValueError(f"layer {i} does not exist; the model has {len(names)} layers "
                                     f"(0..{len(names) - 1})")
                keep.append(names[i])
            elif part in names:
                keep.append(part)
            else:
                raise ValueError(f"unknown layer {part!r}; use 'all', 'pool', 'encode', positions or names such as "
                                 f"{', '.join(names[:4])}")
    return [m for m in maps if m.name in keep and (m.head is None or head is None or m.head == head)]


def _first_of(maps: Sequence[LayerMap], names: Sequence[str]) -> List[LayerMap]:
    return [next(m for m in maps if m.name == n) for n in names]


def _grid(n: int, ncols: Optional[int]) -> Tuple[int, int]:
    ncols = ncols or min(n, max(4, math.ceil(math.sqrt(n * 1.5))))
    return math.ceil(n / ncols), ncols


def _figure(panels: List[Tuple[np.ndarray, str]], ncols: Optional[int], panel_size: float, titles: bool):
    rows, cols = _grid(len(panels), ncols)
    h, w = panels[0][0].shape[:2]
    fig, axes = plt.subplots(rows, cols, figsize=(cols * panel_size, rows * panel_size * h / w + 0.25 * rows * titles),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (img, title) in zip(axes.ravel(), panels):
        ax.imshow(img, interpolation="nearest")
        if titles:
            ax.set_title(title, fontsize=8, pad=2)
    fig.subplots_adjust(left=0.005, right=0.995, bottom=0.005, top=0.995 - 0.04 * titles, wspace=0.03,
                        hspace=0.12 * titles + 0.03)
    return fig


def plot_layers(image, maps: Sequence[LayerMap], regions=None, index: int = 0, color: str = "mean",
                edges: bool = True, ncols: Optional[int] = None, panel_size: float = 1.8, titles: bool = True,
                min_edge_area: float = 150.0, image_title: str = "image"):
    """The compact figure: the image, one panel per layer map, then (optionally) the merged regions.

    ``image`` ``[H, W, 3]`` in [0, 1]; ``maps``: :class:`~fec_core.interpret.LayerMap` s (e.g.
    :func:`select_layers` of :func:`fec_core.interpret.trace_clusters`);
    ``index``: which image of the batch; ``regions``: ``[B, H, W]`` from
    :func:`fec_core.interpret.merge_regions` (drawn in the palette). Boundaries are left out of
    panels whose clusters average fewer than ``min_edge_area`` pixels (they would hide the
    image); ``image_title`` names the first panel. Returns a matplotlib Figure.
    """
    image = _np(image).astype(np.float32)
    panels = [(image, image_title)]
    prev = None
    for m in maps:
        lab = _np(m.labels[index])
        if color == "palette":
            lab = lab if prev is None else match_labels(lab, prev)
            prev = lab
        crowded = lab.size / max(len(np.unique(lab)), 1) < min_edge_area  # tiny clusters: edges would hide the image
        panels.append((paint(image, lab, color=color, edges=edges and not crowded), m.title))
    if regions is not None:
        reg = _np(regions[index])
        k = int(reg.max()) + 1
        panels.append((paint(image, reg, color="palette", alpha=0.65, edges=edges), f"k-means, k={k}"))
    return _figure(panels, ncols, panel_size, titles)


def plot_regions(image, regions: Sequence, titles: Optional[Sequence[str]] = None, alpha: float = 0.65,
                 panel_size: float = 2.2, ncols: Optional[int] = None):
    """Several region maps ``[H, W]`` (e.g. k-means merges for several ``k``) over one image,
    colors matched from panel to panel (a region keeps its color when ``k`` grows)."""
    image = _np(image).astype(np.float32)
    panels, prev = [(image, "image")], None
    for i, reg in enumerate(regions):
        reg = _np(reg)
        reg = reg if prev is None else match_labels(reg, prev)
        prev = reg
        title = titles[i] if titles is not None else f"k={len(np.unique(reg))}"
        panels.append((paint(image, reg, color="palette", alpha=alpha), title))
    return _figure(panels, ncols or len(panels), panel_size, True)


def save_figure(fig, path: str, dpi: int = 150) -> str:
    """Save ``fig`` as PNG (creating the folder) and close it; returns the path.

    Written through ``path.tmp`` and renamed: a failed save (disk full, no permission)
    raises an ``OSError`` that says so, leaves no partial file and keeps an older ``path``."""
    try:
        check_output(path)
        tmp = path + ".tmp"
        try:
            fig.savefig(tmp, dpi=dpi, format="png")
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
    except OSError as e:
        if isinstance(e, _OutputError):
            raise
        raise _OutputError(f"could not write {path}: {_reason(e)}") from e
    finally:
        plt.close(fig)
    return path


class _OutputError(OSError):
    """The output file cannot be written (the message says why)."""


def _reason(e: OSError) -> str:
    reasons = {errno.ENOSPC: "the disk is full", errno.EACCES: "permission denied", errno.EPERM: "permission denied",
               errno.EROFS: "the filesystem is read-only", errno.ENOTDIR: "a part of the path is a file",
               errno.EISDIR: "it is a folder"}
    return reasons.get(e.errno) or e.strerror or str(e)


def check_output(path: str) -> None:
    """Make sure ``path`` can be written (its folder is created), before any long work:
    an ``OSError`` names the problem (a folder in the path is a file, ``path`` is a folder,
    no permission, read-only filesystem). Writes and removes a small probe file."""
    if not path:
        raise _OutputError("the output path is empty")
    if os.path.isdir(path):
        raise _OutputError(f"cannot write {path}: it is a folder; give a file name such as {os.path.join(path, 'clusters.png')}")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        parent = folder
        while parent and not os.path.exists(parent):
            parent = os.path.dirname(parent)
        why = f"{parent} is a file, not a folder" if os.path.isfile(parent) else _reason(e)
        raise _OutputError(f"cannot write {path}: {why}") from None
    probe = path + ".tmp"
    try:
        with open(probe, "wb") as f:
            f.write(b"probe")
    except OSError as e:
        raise _OutputError(f"cannot write {path}: {_reason(e)}") from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(probe)
