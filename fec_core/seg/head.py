"""The segmentation head (chapter 13): :class:`SemanticFPN` (Kirillov et al. 2019), FEC's
head in the paper, and :class:`FECSegmenter`, a backbone with that head."""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import FeaturePyramidNetwork

from .backbone import backbone_features, feature_channels

__all__ = ["SemanticFPN", "FECSegmenter"]


def _conv_norm_act(cin: int, cout: int) -> nn.Sequential:
    groups = 8 if cout % 8 == 0 else 1
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(groups, cout),
                         nn.ReLU(inplace=True))


class SemanticFPN(nn.Module):
    """The Semantic FPN decoder (Kirillov et al. 2019), FEC's segmentation head in the paper.

    1. **FPN** (torchvision's ``FeaturePyramidNetwork``): a lateral 1x1 conv brings every
       backbone map to ``fpn_channels``; the top-down path upsamples the coarser result
       (nearest) and adds it; a 3x3 conv smooths each level.
    2. **Semantic branch**: each level goes through ``max(1, log2(s_i / s_0))`` steps of
       3x3 conv + GroupNorm + ReLU (+ 2x bilinear upsampling) until it reaches the finest
       stride (4 for FEC); the levels are fused by a sum. The norm is GroupNorm (8 groups;
       1 if the width is not a multiple of 8) where the official config
       (``segmentation/configs/_base_/models/fpn_r50.py``, ``norm_cfg``) uses SyncBN:
       GroupNorm's statistics do not depend on the batch, which is small on a CPU.
    3. **Classifier**: dropout and a 1x1 conv to ``num_classes`` logits at the finest stride.

    Args:
        in_channels: channels of the backbone maps, finest first (``feature_info.channels()``).
        num_classes: output classes. strides: the maps' strides (``feature_info.reduction()``).
        fpn_channels, head_channels: widths (the official config's: 256 and 128).
    ``forward(features)``: a list of ``[B, C_i, H_i, W_i]`` -> logits ``[B, num_classes, H_0, W_0]``.
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, strides: Sequence[int] = (4, 8, 16, 32),
                 fpn_channels: int = 256, head_channels: int = 128, dropout: float = 0.1):
        super().__init__()
        if len(in_channels) != len(strides) or not in_channels:
            raise ValueError(f"in_channels {list(in_channels)} and strides {list(strides)} must be "
                             "non-empty and of the same length")
        if list(strides) != sorted(strides):
            raise ValueError(f"features must be ordered finest first, got strides {list(strides)}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.in_channels, self.strides, self.num_classes = list(in_channels), list(strides), num_classes
        with torch.random.fork_rng(devices=[]):  # its own init draws leave the global generator alone
            self.pyramid = FeaturePyramidNetwork(self.in_channels, fpn_channels)
        # PyTorch's default convolution init, laterals drawn first: chapter 13's trained numbers
        # rest on these initial weights (torchvision's kaiming(a=1) would give others)
        for conv in self.lateral + self.smooth:
            conv.reset_parameters()
        self.scale_heads = nn.ModuleList()
        for s in strides:
            steps = max(1, int(round(math.log2(s / strides[0]))))
            self.scale_heads.append(nn.ModuleList(
                _conv_norm_act(fpn_channels if k == 0 else head_channels, head_channels) for k in range(steps)))
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(head_channels, num_classes, 1)

    @property
    def lateral(self) -> List[nn.Conv2d]:
        """The lateral 1x1 convolutions, finest level first (the FPN's inner blocks)."""
        return [block[0] for block in self.pyramid.inner_blocks]

    @property
    def smooth(self) -> List[nn.Conv2d]:
        """The 3x3 smoothing convolutions, finest level first (the FPN's layer blocks)."""
        return [block[0] for block in self.pyramid.layer_blocks]

    def fpn(self, features: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Lateral 1x1 convs, top-down upsample-and-add, 3x3 smoothing: the pyramid P_i."""
        if len(features) != len(self.in_channels):
            raise ValueError(f"SemanticFPN was built for {len(self.in_channels)} feature maps, got {len(features)}")
        for i, (f, c) in enumerate(zip(features, self.in_channels)):
            if f.ndim != 4 or f.shape[1] != c:
                raise ValueError(f"feature {i} should be [B, {c}, H, W], got {tuple(f.shape)}")
        return list(self.pyramid(OrderedDict((str(i), f) for i, f in enumerate(features))).values())

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        pyramid = self.fpn(features)
        sizes = [p.shape[-2:] for p in pyramid]
        fused = 0
        for i, (p, steps) in enumerate(zip(pyramid, self.scale_heads)):
            x = p
            for k, step in enumerate(steps):
                x = step(x)
                if i - k - 1 >= 0:  # upsample one level finer
                    x = F.interpolate(x, size=sizes[i - k - 1], mode="bilinear", align_corners=False)
            fused = fused + x
        return self.classifier(self.dropout(fused))


class FECSegmenter(nn.Module):
    """Backbone + :class:`SemanticFPN`, logits upsampled to the input size.

    ``backbone``: any module returning a list of maps and describing them in ``feature_info``,
    e.g. ``timm.create_model('fec_tiny', features_only=True)`` or ``FEC(..., dense=True)``.
    ``fpn_channels`` / ``head_channels``: the head's widths, small by default for CPU work
    (the official config: 256 / 128). ``forward(images [B, 3, H, W])`` -> logits ``[B, num_classes, H, W]``.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, fpn_channels: int = 64, head_channels: int = 32,
                 dropout: float = 0.1):
        super().__init__()
        channels, strides = feature_channels(backbone)
        self.backbone = backbone
        self.head = SemanticFPN(channels, num_classes, strides, fpn_channels, head_channels, dropout)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(backbone_features(self.backbone, x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel classes ``[B, H, W]`` (argmax of the logits)."""
        return self(x).argmax(1)
