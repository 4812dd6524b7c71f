"""``python -m fec_core.visualize`` / ``fec-visualize`` (book chapter 11): an image in, its
clusters at every layer drawn (:mod:`fec_core.visualize.drawing`) to a PNG.

Every argument, the output path, the layers and head asked for and the cost of the input are
checked before the long work starts; an error is one line on stderr (exit 2), its traceback
only with ``--debug`` or ``FEC_DEBUG=1``.
"""
from __future__ import annotations

import argparse
import math
import os
import warnings
from typing import Optional, Sequence, Tuple

import numpy as np
import timm
import torch
from PIL import Image, UnidentifiedImageError

from .. import create_model
from ..checkpoint import CheckpointError, load_checkpoint, read_state_dict, trusted
from ..cliutil import DEBUG_HELP, one_line, print_error
from ..costs import estimate_macs
from ..data import normalize
from ..interpret import merge_regions, paper_regions, trace_clusters
from ..model import input_multiple
from .drawing import check_output, plot_layers, save_figure, select_layers

__all__ = ["load_image", "fed_size", "prepare_image", "load_model", "MAX_GMACS", "main"]


def load_image(path: str) -> np.ndarray:
    """Any image Pillow reads, as RGB ``[H, W, 3]`` float in [0, 1]; clear errors otherwise."""
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


def fed_size(height: int, width: int, size: int, multiple: int) -> Tuple[int, int]:
    """The ``(H', W')`` that :func:`prepare_image` resizes a ``height x width`` image to."""
    scale = size / min(height, width)
    nh = max(multiple, int(round(height * scale / multiple)) * multiple)
    nw = max(multiple, int(round(width * scale / multiple)) * multiple)
    return nh, nw


def prepare_image(image: np.ndarray, size: int, multiple: int) -> np.ndarray:
    """Resize so the shorter side is about ``size`` and both sides are multiples of ``multiple``
    (aspect ratio kept up to that rounding). ``[H, W, 3]`` -> ``[H', W', 3]``."""
    nh, nw = fed_size(*image.shape[:2], size, multiple)
    img = Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))
    return np.asarray(img.resize((nw, nh), Image.BICUBIC), dtype=np.float32) / 255.0


def load_model(name: str, checkpoint: Optional[str] = None):
    """An FEC variant for the CLI, with ``checkpoint`` loaded if given (the classifier size is
    taken from the checkpoint). Returns ``(model, message)``, the message saying what was
    loaded; errors are clear exceptions. (Not :func:`fec_core.train.build_model`, which builds
    a training config's model.)"""
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
                        "layer's key centers, non-empty clusters only, not unit vectors, one start); "
                        "'features', this library's variant (fec_core.interpret.merge_regions: the last "
                        "stage's output features as unit vectors, all representatives, ten starts)")
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
