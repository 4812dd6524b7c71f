"""Counting a model's size: parameters and multiply-accumulates (book chapter 9).

Chapter 9 reproduces the paper's parameter and FLOP columns (Table 1 of
Chen et al., CVPR 2024) with these helpers. FLOPs are counted by PyTorch's own
:class:`torch.utils.flop_counter.FlopCounterMode`, which counts 2 FLOPs per
multiply-accumulate of matrix products and convolutions (``mm``, ``addmm``,
``bmm``, ``convolution``, ...); like the paper we report multiply-accumulates,
``MACs = FLOPs / 2``. Element-wise work (norms, GELU, the sigmoid gate, the
scatter-add of the aggregation, gathers) is not counted.

    >>> model = timm.create_model("fec_small")
    >>> count_params(model) / 2**20          # 5.46, the paper's "5.5 M"
    >>> count_macs(model, 224) / 1e9         # 1.355, the paper's "1.4 G"

:func:`estimate_macs` gives the count for a large input without running the model.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Dict, Sequence, Union

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from .model import FEC, input_multiple

__all__ = ["MacCount", "count_params", "count_macs", "macs_breakdown", "macs_by_operator", "macs_by_module",
           "estimate_macs"]

InputSize = Union[int, Sequence[int]]


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``model`` (chapter 9): all of them, or only those with ``requires_grad``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@dataclass
class MacCount:
    """The multiply-accumulates of one forward pass, counted once and split three ways.

    ``total``: all MACs. ``by_operator``: per ATen operator (``'convolution'``, ``'addmm'``,
    ``'bmm'``, ...), largest first. ``by_module``: per called submodule, by its dotted name
    (``'stem.proj'``, ``'stages.0'``, ``'stages.0.blocks.0.token_mixer'``, ``'head'``, ...),
    in the model's module order; a module's count includes its children's.
    """

    total: int
    by_operator: Dict[str, int] = field(default_factory=dict)
    by_module: Dict[str, int] = field(default_factory=dict)


def _input(model: nn.Module, input_size: InputSize) -> torch.Tensor:
    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    size = tuple(int(s) for s in input_size)
    if len(size) == 2:
        size = (getattr(model, "in_chans", 3),) + size
    if len(size) == 3:
        size = (1,) + size
    if len(size) != 4 or min(size) < 1:
        raise ValueError(f"input_size must be H, (H, W), (C, H, W) or (B, C, H, W), got {input_size!r}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    return torch.randn(size, device=device, dtype=dtype)


def macs_breakdown(model: nn.Module, input_size: InputSize = 224) -> MacCount:
    """Count the MACs of one forward pass of ``model`` (chapter 9), see :class:`MacCount`.

    ``input_size``: ``H`` (square), ``(H, W)``, ``(C, H, W)`` or ``(B, C, H, W)``; the
    batch defaults to 1 and the channels to ``model.in_chans`` (3). The model runs once
    in eval mode under ``torch.no_grad`` on a random input, on its own device, inside
    :class:`torch.utils.flop_counter.FlopCounterMode` (FLOPs / 2 = MACs).
    """
    x = _input(model, input_size)
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
    counts = counter.get_flop_counts()
    by_operator = {str(op).removeprefix("aten."): n // 2
                   for op, n in sorted(counts.get("Global", {}).items(), key=lambda kv: -kv[1])}
    by_module = {}
    for key, per_op in counts.items():
        if key == "Global" or "." not in key:  # the totals and the root module
            continue
        by_module[key.split(".", 1)[1]] = sum(per_op.values()) // 2
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    by_module = dict(sorted(by_module.items(), key=lambda kv: order.get(kv[0], len(order))))
    return MacCount(counter.get_total_flops() // 2, by_operator, by_module)


def count_macs(model: nn.Module, input_size: InputSize = 224) -> int:
    """Multiply-accumulates of one forward pass of ``model`` (chapter 9), as :func:`macs_breakdown`.

    E.g. ``count_macs(timm.create_model('fec_small'), 224) / 1e9`` is 1.355 (paper: 1.4 G).
    """
    return macs_breakdown(model, input_size).total


def macs_by_operator(model: nn.Module, input_size: InputSize = 224) -> Dict[str, int]:
    """The MACs of :func:`count_macs` split by ATen operator (``'convolution'``, ``'bmm'``, ...)."""
    return macs_breakdown(model, input_size).by_operator


def macs_by_module(model: nn.Module, input_size: InputSize = 224, depth: int = 2) -> Dict[str, int]:
    """The MACs of :func:`count_macs` per called submodule whose dotted name has ``depth``
    parts, in the model's module order (chapter 9). For :class:`~fec_core.FEC`, ``depth=2``
    gives ``'stem.proj'`` and ``'stages.0'`` ... ``'stages.3'``, ``depth=1`` gives ``'stem'``
    and ``'head'`` (the stages are called one by one, ``stages`` itself never)."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    return {k: v for k, v in macs_breakdown(model, input_size).by_module.items() if len(k.split(".")) == depth}


def estimate_macs(model: FEC, height: int, width: int) -> int:
    """Multiply-accumulates of one forward pass of the FEC ``model`` on a ``height x width``
    image, without running it (:func:`count_macs` on a shape-only copy of the model, device
    ``'meta'``; ``fec-visualize`` checks the cost of an input with it before the work).

    Up to 320 x 320 pixels the count is direct. Beyond, it is extrapolated from two counts at
    small square sizes as ``a P + b P^2`` in the pixel count ``P``: the pooling layers compare
    every point of a fold region with every center of it (a quarter as many), so their work
    grows with the square of the pixels per region; the rest grows linearly. Measured on
    ``fec_tiny`` / ``fec_small`` up to 672 x 672 the extrapolation is within 0.3%.
    """
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
