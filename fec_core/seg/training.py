"""Training a segmenter (chapter 13) with the training loop of chapter 10:
:data:`SEG_RECIPE` and :func:`train_segmentation`."""
from __future__ import annotations

from typing import Optional

import timm
import torch
import torch.nn as nn

from ..train import MeanIoU, TrainConfig, fit
from ..train.metrics import is_per_pixel
from .data import shapes_segmentation
from .head import FECSegmenter
from .loss import segmentation_loss

__all__ = ["SEG_RECIPE", "train_segmentation"]

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
    if not is_per_pixel(target):
        raise ValueError(f"segmentation targets must be per-pixel class maps [H, W] (an integer tensor), got "
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
