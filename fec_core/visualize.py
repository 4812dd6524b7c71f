"""Drawing FEC's clusters (book chapter 11), and the ``fec-visualize`` command.

Figures in the spirit of the paper's Figure 3: the image, then one small panel per
clustering layer with every pixel painted by its cluster (traced to the pixels by
:mod:`fec_core.interpret`), then the final representatives merged into ``k``
regions. No legends, no axes; colors are consistent across panels:

* ``color="mean"``: a cluster is painted with the mean image color of its pixels (the
  cluster's "representative as a color"), so the same pixels get the same color in
  every panel where they stay together; cluster boundaries are drawn as thin lines.
* ``color="palette"``: a fixed palette, each panel's labels renumbered to best match
  the previous panel's (:func:`fec_core.interpret.match_labels`).

Command line (any image Pillow reads)::

    python -m fec_core.visualize photo.jpg -o clusters.png
    python -m fec_core.visualize photo.jpg --checkpoint fec_small.pth --clusters 3 -o out.png
    python -m fec_core.visualize shape.png --model fec_tiny --size 64 --layers pool -o out.png
    python -m fec_core.visualize photo.jpg --regions features -o out.png

Without ``--checkpoint`` the weights are random (the command says so). The merge panel is
drawn as the official ``cluster_visualize.py`` draws the paper's figures
(:func:`fec_core.interpret.paper_regions`) unless ``--regions features`` asks for this
library's variant (:func:`fec_core.interpret.merge_regions` on the last stage's features).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import errno
import math
import os
import sys
import warnings
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .cliutil import DEBUG_HELP, one_line, print_error
from .interpret import LayerMap, match_labels

__all__ = ["PALETTE", "mean_colors", "palette_colors", "boundaries", "paint", "plot_layers", "plot_regions",
           "save_figure", "check_output", "load_image", "input_multiple", "fed_size", "prepare_image",
           "estimate_macs", "load_model", "main"]

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


def _grid(n: int, ncols: Optional[int]) -> Tuple[int, int]:
    ncols = ncols or min(n, max(4, math.ceil(math.sqrt(n * 1.5))))
    return math.ceil(n / ncols), ncols


def _figure(panels: List[Tuple[np.ndarray, str]], ncols: Optional[int], panel_size: float, titles: bool):
    import matplotlib.pyplot as plt

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
    :func:`fec_core.interpret.select_layers` of :func:`fec_core.interpret.trace_clusters`);
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
    import matplotlib.pyplot as plt

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


# ---------------------------------------------------------------------------- command line
def load_image(path: str) -> np.ndarray:
    """Any image Pillow reads, as RGB ``[H, W, 3]`` float in [0, 1]; clear errors otherwise."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.exists(path):
        raise FileNotFoundError(f"image file not found: {path}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a folder, not an image file")
    try:
        with Image.open(path) as img:
            img.load()
            return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except Image.DecompressionBombError as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: not an image Pillow can open ({e})") from e


def input_multiple(model) -> int:
    """The smallest ``m`` such that every ``H`` divisible by ``m`` passes all of ``model``'s
    layers (stem stride 4, pooling by 2 per stage, fold regions of even size)."""
    folds = [m.fold for m in model.clustering_layers()]
    need = 4 * 2 ** (len(model.stages) - 1)
    for mult in range(need, need * 64 + 1, need):
        ok = True
        for layer in model.clustering_layers():
            size = mult // (4 * 2 ** layer.stage)
            f = max(layer.fold)
            if layer.kind == "pool":
                ok &= (2 * size) % (2 * f) == 0
            else:
                ok &= size % f == 0
        if ok:
            return mult
    raise ValueError(f"no input size fits the folds {folds}")


def fed_size(height: int, width: int, size: int, multiple: int) -> Tuple[int, int]:
    """The ``(H', W')`` that :func:`prepare_image` resizes a ``height x width`` image to."""
    scale = size / min(height, width)
    nh = max(multiple, int(round(height * scale / multiple)) * multiple)
    nw = max(multiple, int(round(width * scale / multiple)) * multiple)
    return nh, nw


def prepare_image(image: np.ndarray, size: int, multiple: int) -> np.ndarray:
    """Resize so the shorter side is about ``size`` and both sides are multiples of ``multiple``
    (aspect ratio kept up to that rounding). ``[H, W, 3]`` -> ``[H', W', 3]``."""
    from PIL import Image

    nh, nw = fed_size(*image.shape[:2], size, multiple)
    img = Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))
    return np.asarray(img.resize((nw, nh), Image.BICUBIC), dtype=np.float32) / 255.0


def estimate_macs(model, height: int, width: int) -> int:
    """Multiply-accumulates of one forward pass of ``model`` on a ``height x width`` image,
    without running it (chapter 9's :func:`fec_core.costs.count_macs` on a shape-only copy
    of the model, device ``'meta'``).

    Up to 320 x 320 pixels the count is direct. Beyond, it is extrapolated from two counts at
    small square sizes as ``a P + b P^2`` in the pixel count ``P``: the pooling layers compare
    every point of a fold region with every center of it (a quarter as many), so their work
    grows with the square of the pixels per region; the rest grows linearly. Measured on
    ``fec_tiny`` / ``fec_small`` up to 672 x 672 the extrapolation is within 0.3%.
    """
    from .costs import count_macs

    shape_only = copy.deepcopy(model).to("meta")
    if height * width <= 320 * 320:
        return count_macs(shape_only, (height, width))
    m = input_multiple(model)
    s1 = m * max(1, 128 // m)
    s2 = 2 * s1
    p1, p2 = s1 * s1, s2 * s2
    c1, c2 = count_macs(shape_only, s1), count_macs(shape_only, s2)
    b = (c2 / p2 - c1 / p1) / (p2 - p1)
    a = c1 / p1 - b * p1
    p = height * width
    return int(a * p + b * p * p)


def load_model(name: str, checkpoint: Optional[str] = None):
    """An FEC variant for the CLI, with ``checkpoint`` loaded if given (the classifier size is
    taken from the checkpoint). Returns ``(model, message)``, the message saying what was
    loaded; errors are clear exceptions. (Not :func:`fec_core.train.build_model`, which builds
    a training config's model.)"""
    import timm

    from . import create_model
    from .checkpoint import CheckpointError, load_checkpoint, read_state_dict

    names = timm.list_models("fec_*")
    if name not in names:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(names)}")
    if checkpoint is None:
        return create_model(name), (f"no --checkpoint given: {name} has RANDOM weights; the clusters show "
                                    f"how an untrained network groups pixels, not learned features")
    sd = read_state_dict(checkpoint)  # FileNotFoundError / CheckpointError with clear messages
    num_classes = int(sd["head.weight"].shape[0]) if "head.weight" in sd else 0
    model = create_model(name, num_classes=num_classes)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_checkpoint(model, sd)
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint {checkpoint} does not fit {name}: {e}") from e
    return model, f"loaded {checkpoint} into {name}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fec_core.visualize",
        description="Draw FEC's clusters at every layer over an image (book chapter 11).")
    p.add_argument("image", help="an image file (anything Pillow reads: JPEG, PNG, ...)")
    p.add_argument("--model", default="fec_small", help="FEC variant (default fec_small)")
    p.add_argument("--checkpoint", default=None, help="weights to load (official or fec_core); random if omitted")
    p.add_argument("--clusters", type=int, default=3, help="k: merge the final clusters into k regions with "
                                                            "k-means, as --regions says (0: no merge panel)")
    p.add_argument("--regions", choices=("paper", "features"), default="paper",
                   help="what k-means merges: 'paper' (default), the official cluster_visualize.py procedure "
                        "that draws the paper's figures (fec_core.interpret.paper_regions: the last pooling "
                        "layer's key centers, non-empty clusters only, unnormalized, one start); 'features', "
                        "this library's variant (fec_core.interpret.merge_regions: the last stage's "
                        "L2-normalized output features, all representatives, ten starts)")
    p.add_argument("--layers", default="all", help="'all', 'pool' (the pooling hierarchy), 'encode', or "
                                                  "comma-separated layer positions / names")
    p.add_argument("--head", type=int, default=0, help="encode head to draw (default 0; -1: all heads)")
    p.add_argument("--size", type=int, default=224, help="shorter image side fed to the model (default 224)")
    p.add_argument("--color", choices=("mean", "palette"), default="mean", help="cluster colors (default mean)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and of k-means (default 0, "
                                                        "the official script's random_state)")
    p.add_argument("-o", "--output", default="clusters.png", help="PNG to write (default clusters.png)")
    p.add_argument("--max-gmacs", dest="max_gmacs", type=float, default=MAX_GMACS,
                   help=f"refuse inputs whose forward pass needs more than this many billion multiply-accumulates "
                        f"(default {MAX_GMACS:g}: seconds to a minute on a CPU)")
    p.add_argument("--force", action="store_true", help="go ahead above --max-gmacs")
    p.add_argument("--trust-checkpoint", dest="trust_checkpoint", action="store_true",
                   help="unpickle --checkpoint in full even when it holds more than tensors and plain values; this "
                        "runs any code the file carries: only for a file from a source you trust")
    p.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    return p


#: Work above which ``fec-visualize`` asks for ``--force`` (billions of multiply-accumulates).
#: For scale: 224 x 224 takes 0.26 GMACs on fec_tiny and 1.35 on fec_small; the pooling
#: layers' work grows with the square of the pixels (``--size 2000`` on fec_tiny: ~850 GMACs).
MAX_GMACS = 50.0


def _check_args(args) -> None:
    if args.size < 32:
        raise ValueError(f"--size must be at least 32, got {args.size}")
    if args.clusters < 0:
        raise ValueError(f"--clusters must be 0 (no merge panel) or a positive k, got {args.clusters}")
    if args.head < -1:
        raise ValueError(f"--head must be a head index (0, 1, ...) or -1 for every head, got {args.head}")
    if not 0 <= args.seed < 2 ** 32:
        raise ValueError(f"--seed must be in [0, 2**32), got {args.seed}")
    if not (math.isfinite(args.max_gmacs) and args.max_gmacs > 0):
        raise ValueError(f"--max-gmacs must be a positive number, got {args.max_gmacs}")


def _check_layers_and_head(model, multiple: int, layers: str, head: int) -> None:
    """A dry run on the smallest input (``2 multiple`` square: milliseconds) checks ``--layers``
    and ``--head`` before the real work."""
    from .interpret import select_layers, trace_clusters

    _, maps, _ = trace_clusters(model, torch.zeros(1, 3, 2 * multiple, 2 * multiple))
    shown = select_layers(maps, layers, head=None)
    heads = {}
    for m in shown:
        if m.head is not None:
            heads[m.name] = max(heads.get(m.name, 0), m.head + 1)
    if head < 0 or not heads:
        return
    if head >= max(heads.values()):
        raise ValueError(f"--head {head} does not exist: the encode layers drawn have "
                         f"{'/'.join(map(str, sorted(set(heads.values()))))} heads (use 0..{max(heads.values()) - 1}, "
                         f"or -1 for every head)")
    fewer = [n for n, k in heads.items() if head >= k]
    if fewer:
        print(f"note: --head {head}: {len(fewer)} of {len(heads)} encode layers have fewer heads and are not drawn "
              f"({', '.join(fewer[:3])}{', ...' if len(fewer) > 3 else ''})")


def _check_cost(model, name: str, h: int, w: int, args) -> None:
    if h * w <= 320 * 320:
        return  # any FEC variant: a second or two
    macs = estimate_macs(model, h, w)
    if macs > args.max_gmacs * 1e9 and not args.force:
        raise ValueError(f"the image would be fed as {w}x{h} pixels (width x height), about {macs / 1e9:,.0f} "
                         f"GMACs for {name} (224x224: {estimate_macs(model, 224, 224) / 1e9:.2f}); that is above "
                         f"--max-gmacs {args.max_gmacs:g} and could run for a very long time or run out of memory "
                         f"(the pooling layers' work grows with the square of the pixels). Use a smaller --size "
                         f"or crop the image (a very long strip is scaled by its short side), or pass --force "
                         f"to go ahead")
    if macs > 10e9:
        print(f"note: {w}x{h} pixels, about {macs / 1e9:,.0f} GMACs: this can take a while")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m fec_core.visualize`` / ``fec-visualize``; returns the exit code
    (0 done, 2 a clear one-line error, its traceback only with ``--debug`` or ``FEC_DEBUG=1``;
    130 interrupted). Every argument, the output path and the cost of the input are checked
    before the long work starts. ``--checkpoint`` is read without running code
    (:func:`fec_core.checkpoint.read_file`) unless ``--trust-checkpoint``."""
    args = _parser().parse_args(argv)
    from .checkpoint import CheckpointError, trusted

    try:
        with trusted(args.trust_checkpoint):
            return _run(args)
    except KeyboardInterrupt as e:
        print_error(f"interrupted: {args.output} was not written", e, args.debug, lead="\n")
        return 130
    except (FileNotFoundError, IsADirectoryError, ValueError, CheckpointError, OSError) as e:
        print_error(f"error: {one_line(e)}", e, args.debug)
        return 2


def _run(args) -> int:
    from .data import normalize
    from .interpret import merge_regions, paper_regions, select_layers, trace_clusters

    _check_args(args)
    check_output(args.output)
    if os.path.splitext(args.output)[1].lower() not in (".png", ""):
        print(f"note: {args.output} will hold a PNG image whatever its extension")
    image = load_image(args.image)
    torch.manual_seed(args.seed)
    model, message = load_model(args.model, args.checkpoint)
    print(message)
    model.eval()
    multiple = input_multiple(model)
    h, w = fed_size(*image.shape[:2], args.size, multiple)
    _check_layers_and_head(model, multiple, args.layers, args.head)
    _check_cost(model, args.model, h, w, args)
    x_img = prepare_image(image, args.size, multiple)
    x = normalize(torch.from_numpy(x_img).permute(2, 0, 1).unsqueeze(0))
    _, maps, feats = trace_clusters(model, x)
    shown = select_layers(maps, args.layers, head=None if args.head < 0 else args.head)
    regions = None
    if args.clusters > 0:
        last = [m for m in maps if m.kind in ("stem", "pool")][-1]
        if args.clusters > last.num_clusters:
            print(f"note: --clusters {args.clusters} is more than the {last.num_clusters} final clusters; "
                  f"using {last.num_clusters}")
        k = min(args.clusters, last.num_clusters)
        if args.regions == "paper":
            regions = paper_regions(model, x, k, seed=args.seed, labels=last.labels)
        else:
            regions = merge_regions(feats[-1], last.labels, k, seed=args.seed)
    fig = plot_layers(x_img, shown, regions, color=args.color)
    save_figure(fig, args.output)
    print(f"{args.image}: fed as {w}x{h} pixels (width x height), {len(shown)} layer panels"
          f"{f', k-means k={args.clusters} ({args.regions} merge)' if regions is not None else ''} -> {args.output}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
