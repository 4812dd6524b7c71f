"""The backbone side of dense prediction (chapter 13): the multi-scale maps of an FEC
backbone, their channels and strides, and :class:`FECBackboneWithFPN` for torchvision's
detectors."""
from __future__ import annotations

from collections import OrderedDict
from typing import List, Tuple

import torch
import torch.nn as nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ..model import FEC

__all__ = ["feature_channels", "backbone_features", "backbone_fec", "FECBackboneWithFPN"]


def feature_channels(backbone: nn.Module) -> Tuple[List[int], List[int]]:
    """``(channels, strides)`` of the maps ``backbone(x)`` returns, from its ``feature_info``.

    Works for timm's ``features_only`` wrappers (a ``FeatureInfo`` object) and for an
    :class:`~fec_core.FEC` built with ``dense=True`` (a list of dicts).
    """
    info = getattr(backbone, "feature_info", None)
    if info is None:
        raise ValueError(f"{type(backbone).__name__} has no feature_info; build the backbone with "
                         "timm.create_model(name, features_only=True) or FEC(..., dense=True)")
    if isinstance(backbone, FEC) and not backbone.dense:
        raise ValueError("this FEC returns class logits; build it with dense=True (or through "
                         "timm.create_model(name, features_only=True)) to get multi-scale features")
    if hasattr(info, "channels"):
        return list(info.channels()), list(info.reduction())
    return [d["num_chs"] for d in info], [d["reduction"] for d in info]


def backbone_features(backbone: nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    """The multi-scale maps of ``backbone`` for images ``x``: ``backbone(x)`` for timm's
    ``features_only`` wrapper, :meth:`FEC.forward_intermediates` for a dense FEC (whose
    ``forward``, like every timm model's, returns one tensor)."""
    if isinstance(backbone, FEC):
        return backbone.forward_intermediates(x, intermediates_only=True)
    return backbone(x)


def backbone_fec(backbone: nn.Module) -> FEC:
    """The :class:`~fec_core.FEC` inside ``backbone`` (timm's ``features_only`` wrapper keeps it
    as ``.model``), e.g. to call ``forward_with_clusters`` on it."""
    m = getattr(backbone, "model", backbone)
    if not isinstance(m, FEC):
        raise ValueError(f"{type(backbone).__name__} does not wrap an FEC model")
    return m


class FECBackboneWithFPN(nn.Module):
    """FEC features + torchvision's ``FeaturePyramidNetwork``: the interface of torchvision's
    ``BackboneWithFPN``, which ``FasterRCNN`` / ``MaskRCNN`` / ``RetinaNet`` accept as ``backbone``.

    ``forward(images [B, 3, H, W])`` -> ``OrderedDict`` ``'0'..'3'`` (strides 4..32) and
    ``'pool'`` (stride 64, max-pooled), each ``[B, out_channels, ., .]``. The default anchor
    generator (5 sizes) and RoI pooler (maps ``'0'..'3'``) fit these outputs; keep
    ``GeneralizedRCNNTransform``'s ``size_divisible=32`` (the default): it pads images to a
    size FEC accepts.
    """

    def __init__(self, backbone: nn.Module, out_channels: int = 256):
        super().__init__()
        channels, strides = feature_channels(backbone)
        self.body = backbone
        self.fpn = FeaturePyramidNetwork(channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels
        self.strides = strides + [strides[-1] * 2]

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feats = backbone_features(self.body, x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))
