"""Counting a model's size: parameters and multiply-accumulates (book chapter 9).

Chapter 9 reproduces the paper's parameter and FLOP columns (Table 1 of
Chen et al., CVPR 2024) with these two helpers. FLOPs are counted by PyTorch's
own :class:`torch.utils.flop_counter.FlopCounterMode`, which counts 2 FLOPs per
multiply-accumulate of matrix products and convolutions (``mm``, ``bmm``,
``conv``, ...); like the paper (and fvcore, which it follows) we report
multiply-accumulates, ``MACs = FLOPs / 2``. Element-wise work (norms, GELU,
sigmoid, the scatter-add of the aggregation) is not counted.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple, Union

import torch
import torch.nn as nn

__all__ = ["count_params", "count_macs", "macs_by_operator"]


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``model`` (all of them, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _input(model: nn.Module, input_size: Union[int, Sequence[int]]) -> torch.Tensor:
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


def _count(model: nn.Module, input_size) -> Tuple[int, Dict[str, int]]:
    from torch.utils.flop_counter import FlopCounterMode

    x = _input(model, input_size)
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
    per_op = {str(op).removeprefix("aten."): n for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return counter.get_total_flops(), per_op


def count_macs(model: nn.Module, input_size: Union[int, Sequence[int]] = 224) -> int:
    """Multiply-accumulates of one forward pass of ``model`` (chapter 9).

    ``input_size``: ``H`` (square), ``(H, W)``, ``(C, H, W)`` or ``(B, C, H, W)``; the
    batch defaults to 1 and the channels to ``model.in_chans`` (3). The model runs once
    in eval mode under ``torch.no_grad`` on a random input, on its own device, inside
    :class:`torch.utils.flop_counter.FlopCounterMode`; returns ``total FLOPs // 2``.
    E.g. ``count_macs(timm.create_model('fec_small'), 224) / 1e9`` is about 1.36 (paper: 1.4 G).
    """
    flops, _ = _count(model, input_size)
    return flops // 2


def macs_by_operator(model: nn.Module, input_size: Union[int, Sequence[int]] = 224) -> Dict[str, int]:
    """The MACs of :func:`count_macs` split by ATen operator (``'convolution'``, ``'bmm'``, ...)."""
    _, per_op = _count(model, input_size)
    return {op: n // 2 for op, n in sorted(per_op.items(), key=lambda kv: -kv[1])}
