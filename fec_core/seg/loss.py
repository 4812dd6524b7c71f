"""The segmentation loss (chapter 13): per-pixel cross-entropy."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..train.metrics import IGNORE_INDEX

__all__ = ["segmentation_loss"]


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-pixel cross-entropy, ``logits [B, K, H, W]``, ``target [B, H, W]`` long
    (pixels equal to :data:`~fec_core.seg.IGNORE_INDEX` are skipped)."""
    if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"expected logits [B, K, H, W] and target [B, H, W], got {tuple(logits.shape)} "
                         f"and {tuple(target.shape)}")
    return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
