"""Dense prediction with FEC (book chapter 13): a Semantic FPN head, the ``shapes``
segmentation task, mIoU, and the recipe for detection and segmentation frameworks.

The paper transfers FEC to ADE20K semantic segmentation with Semantic FPN
(Kirillov et al. 2019) and to COCO detection with Mask R-CNN.
Both only need what every FEC backbone already exposes: four feature maps at strides
4, 8, 16 and 32, and their channels in ``feature_info``::

    import timm, fec_core
    backbone = timm.create_model('fec_small_seg', features_only=True)   # centers 10,10,5,5
    backbone.feature_info.channels()    # [32, 64, 196, 320]
    backbone.feature_info.reduction()   # [4, 8, 16, 32]
    feats = backbone(images)            # 4 maps [B, C_i, H / s_i, W / s_i]

Valid input sizes: FEC's pooling layers halve even feature maps and its fold regions
must tile every map, so ``H`` and ``W`` should be multiples of 32 for the ``cls``, ``seg``
and ``det`` settings; a size whose maps do not divide raises a ``ValueError`` naming the
layer. (The stem, a stride-4 convolution as in the official code, drops up to 3 trailing
rows and columns, so 130x130 runs like 128x128; pad instead if every pixel matters.)
The center grids adapt to any size.

Recipes for mainstream frameworks (none of them is a dependency of fec_core):

* **torchvision** (detection): :class:`FECBackboneWithFPN` is the ``BackboneWithFPN``
  interface (a module with ``out_channels`` returning an ``OrderedDict`` of maps)::

      from torchvision.models.detection import FasterRCNN, MaskRCNN
      body = timm.create_model('fec_small_det', features_only=True)   # 7 centers, folds 2,2,1,1
      model = MaskRCNN(FECBackboneWithFPN(body, out_channels=256), num_classes=91)

  The default anchor generator (5 sizes) and RoI pooler (maps '0'..'3') fit the
  five outputs '0', '1', '2', '3', 'pool'. Keep ``GeneralizedRCNNTransform``'s
  ``size_divisible=32`` (the default): it pads images to a size FEC accepts.
* **MMSegmentation 1.x**: its ``TIMMBackbone`` builds any timm model, so FEC only needs
  to be imported (registered in timm) first::

      custom_imports = dict(imports=['fec_core'], allow_failed_imports=False)
      model = dict(
          backbone=dict(_delete_=True, type='TIMMBackbone', model_name='fec_small_seg',
                        features_only=True, pretrained=False, out_indices=(0, 1, 2, 3)),
          neck=dict(type='FPN', in_channels=[32, 64, 196, 320], out_channels=256, num_outs=4),
          decode_head=dict(type='FPNHead', in_channels=[256] * 4, in_index=[0, 1, 2, 3],
                           feature_strides=[4, 8, 16, 32], channels=128, num_classes=150))

  (the official FEC code instead registers its own backbone class with ``fork_feat=True``
  and loads ImageNet weights; :func:`fec_core.load_checkpoint` maps those keys).
* **MMDetection 3.x**: the same through MMPretrain's wrapper,
  ``custom_imports = dict(imports=['mmpretrain.models', 'fec_core'])``,
  ``backbone=dict(_delete_=True, type='mmpretrain.TIMMBackbone', model_name='fec_small_det',
  features_only=True, pretrained=False, out_indices=(0, 1, 2, 3))`` and
  ``neck=dict(type='FPN', in_channels=[32, 64, 196, 320], out_channels=256, num_outs=5)``.
* **detectron2**: subclass ``detectron2.modeling.Backbone`` around the ``features_only``
  model, return ``{'s2': f0, 's3': f1, 's4': f2, 's5': f3}`` from ``forward`` and
  ``{name: ShapeSpec(channels=c, stride=s)}`` from ``output_shape()`` using
  ``feature_info.channels()`` / ``.reduction()``; register a builder with
  ``BACKBONE_REGISTRY`` that wraps it in ``detectron2.modeling.backbone.FPN(bottom_up,
  in_features=['s2', 's3', 's4', 's5'], out_channels=256, top_block=LastLevelMaxPool())``.

In every case pass images whose sides are multiples of 32 (``size_divisibility=32`` in
detectron2, ``size_divisor=32`` / ``pad_size_divisor=32`` in the OpenMMLab data preprocessors).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import SHAPE_CLASSES
from .model import FEC

from .train import iou_per_class  # one IoU formula, shared with MeanIoU; re-exported here

__all__ = ["SEG_CLASSES", "IGNORE_INDEX", "SEG_RECIPE", "feature_channels", "backbone_fec", "SemanticFPN",
           "FECSegmenter", "FECBackboneWithFPN", "shapes_segmentation", "iou_per_class", "segmentation_loss",
           "train_segmentation"]

#: Classes of the ``shapes`` segmentation task: background, then the shapes.
SEG_CLASSES = ("background",) + tuple(SHAPE_CLASSES)
#: Target value of pixels that count for no class (loss and metric skip them).
IGNORE_INDEX = 255


# ---------------------------------------------------------------------------- backbones
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


# ---------------------------------------------------------------------------- Semantic FPN
def _conv_norm_act(cin: int, cout: int) -> nn.Sequential:
    groups = 8 if cout % 8 == 0 else 1
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(groups, cout),
                         nn.ReLU(inplace=True))


class SemanticFPN(nn.Module):
    """The Semantic FPN decoder (Kirillov et al. 2019), FEC's segmentation head in the paper.

    1. **FPN**: a lateral 1x1 conv brings every backbone map to ``fpn_channels``; the top-down
       path upsamples the coarser result (nearest) and adds it; a 3x3 conv smooths each level.
    2. **Semantic branch**: each level goes through ``max(1, log2(s_i / s_0))`` steps of
       3x3 conv + GroupNorm + ReLU (+ 2x bilinear upsampling) until it reaches the finest
       stride (4 for FEC); the levels are fused by a sum.
    3. **Classifier**: dropout and a 1x1 conv to ``num_classes`` logits at the finest stride.

    Args:
        in_channels: channels of the backbone maps, finest first (``feature_info.channels()``).
        num_classes: output classes. strides: the maps' strides (``feature_info.reduction()``).
        fpn_channels, head_channels: widths (the paper's setting: 256 and 128).
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
        self.lateral = nn.ModuleList(nn.Conv2d(c, fpn_channels, 1) for c in in_channels)
        self.smooth = nn.ModuleList(nn.Conv2d(fpn_channels, fpn_channels, 3, padding=1) for _ in in_channels)
        self.scale_heads = nn.ModuleList()
        for s in strides:
            steps = max(1, int(round(math.log2(s / strides[0]))))
            self.scale_heads.append(nn.ModuleList(
                _conv_norm_act(fpn_channels if k == 0 else head_channels, head_channels) for k in range(steps)))
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(head_channels, num_classes, 1)

    def fpn(self, features: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Lateral 1x1 convs, top-down upsample-and-add, 3x3 smoothing: the pyramid P_i."""
        if len(features) != len(self.lateral):
            raise ValueError(f"SemanticFPN was built for {len(self.lateral)} feature maps, got {len(features)}")
        for i, (f, c) in enumerate(zip(features, self.in_channels)):
            if f.ndim != 4 or f.shape[1] != c:
                raise ValueError(f"feature {i} should be [B, {c}, H, W], got {tuple(f.shape)}")
        lat = [conv(f) for conv, f in zip(self.lateral, features)]
        for i in range(len(lat) - 2, -1, -1):  # top-down: coarse to fine
            lat[i] = lat[i] + F.interpolate(lat[i + 1], size=lat[i].shape[-2:], mode="nearest")
        return [conv(p) for conv, p in zip(self.smooth, lat)]

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
    (the paper: 256 / 128). ``forward(images [B, 3, H, W])`` -> logits ``[B, num_classes, H, W]``.
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


class FECBackboneWithFPN(nn.Module):
    """FEC features + torchvision's ``FeaturePyramidNetwork``: the interface of torchvision's
    ``BackboneWithFPN``, which ``FasterRCNN`` / ``MaskRCNN`` / ``RetinaNet`` accept as ``backbone``.

    ``forward(images [B, 3, H, W])`` -> ``OrderedDict`` ``'0'..'3'`` (strides 4..32) and
    ``'pool'`` (stride 64, max-pooled), each ``[B, out_channels, ., .]``.
    """

    def __init__(self, backbone: nn.Module, out_channels: int = 256):
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        channels, strides = feature_channels(backbone)
        self.body = backbone
        self.fpn = FeaturePyramidNetwork(channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels
        self.strides = strides + [strides[-1] * 2]

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feats = backbone_features(self.body, x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


# ---------------------------------------------------------------------------- data, metric, training
def shapes_segmentation(n_train: int = 1000, n_val: int = 200, size: int = 64, seed: int = 0):
    """The ``shapes`` segmentation task: ``(train, val)`` datasets of ImageNet-normalized images
    ``[3, size, size]`` and per-pixel classes ``[size, size]`` (0 background, ``1 + label`` on the
    shape: :data:`SEG_CLASSES`), built from :func:`fec_core.data.make_shapes`'s masks by
    :func:`fec_core.data.shapes_datasets` (``target='mask'``). Deterministic from ``seed``."""
    from .data import shapes_datasets

    return shapes_datasets(n_train, n_val, size, seed, target="mask")


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-pixel cross-entropy, ``logits [B, K, H, W]``, ``target [B, H, W]`` long
    (pixels equal to :data:`IGNORE_INDEX` are skipped)."""
    if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"expected logits [B, K, H, W] and target [B, H, W], got {tuple(logits.shape)} "
                         f"and {tuple(target.shape)}")
    return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)


#: A CPU recipe for ``shapes`` segmentation (fields of :class:`fec_core.train.TrainConfig`).
#: About 9,000 images seen, 1-2 minutes on one CPU core; mIoU about 0.4 (all-background: 0.17).
SEG_RECIPE = dict(dataset="shapes", shapes_target="mask", model="fec_tiny", img_size=64, train_samples=1500,
                  val_samples=200, epochs=6, batch_size=8, lr=2e-3, warmup_epochs=1, weight_decay=0.01,
                  augment=False)


def train_segmentation(cfg=None, model: Optional[nn.Module] = None, train_set=None, val_set=None,
                       setting: Optional[str] = None, progress: bool = True, **overrides):
    """Train a segmenter with :func:`fec_core.train.fit` (the training loop of chapter 10).

    ``cfg``: a :class:`~fec_core.train.TrainConfig` (default: :data:`SEG_RECIPE` updated by
    ``overrides``). ``model``: default ``FECSegmenter(timm.create_model(cfg.model,
    features_only=True), len(SEG_CLASSES))`` (``setting``: the center grids, e.g. ``'seg'``; default:
    the model name's, ``'cls'`` for ``fec_tiny``). ``train_set`` / ``val_set``:
    default :func:`shapes_segmentation` with ``cfg``'s sizes and seed. The loss is
    :func:`segmentation_loss`, the metric :class:`fec_core.train.MeanIoU` (``'miou'`` picks the
    best epoch). Returns fit's :class:`~fec_core.train.FitResult` (``.model``, ``.history`` with
    ``val_miou`` and ``val_pixel_acc`` per epoch).
    """
    import timm

    from .train import MeanIoU, TrainConfig, fit

    if cfg is None:
        cfg = TrainConfig(**{**SEG_RECIPE, **overrides})
    elif overrides:
        raise ValueError("pass either a TrainConfig or keyword overrides, not both")
    if train_set is None or val_set is None:
        if cfg.dataset != "shapes":
            raise ValueError(f"train_segmentation builds only the 'shapes' task; for {cfg.dataset!r} pass "
                             "train_set and val_set yielding (image [3, H, W], classes [H, W])")
        tr, va = shapes_segmentation(cfg.train_samples, cfg.val_samples, cfg.img_size, cfg.seed)
        train_set = tr if train_set is None else train_set
        val_set = va if val_set is None else val_set
    target = train_set[0][1]
    if not (isinstance(target, torch.Tensor) and target.ndim == 2):
        raise ValueError(f"segmentation targets must be per-pixel class maps [H, W], got "
                         f"{tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__}")
    classes = getattr(train_set, "classes", None)
    num_classes = cfg.num_classes or (len(classes) if classes else None) or getattr(model, "num_classes", None)
    if not num_classes:
        raise ValueError("cannot tell the number of classes: set cfg.num_classes or give the dataset .classes")
    if model is None:
        torch.manual_seed(cfg.seed)
        kwargs = {} if setting is None else {"setting": setting}
        backbone = timm.create_model(cfg.model, features_only=True, drop_path_rate=cfg.drop_path, **kwargs)
        model = FECSegmenter(backbone, num_classes)
    return fit(cfg, model=model, train_set=train_set, val_set=val_set, loss_fn=segmentation_loss,
               metric=MeanIoU(num_classes), progress=progress)
