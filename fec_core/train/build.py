"""What a run is made of (chapter 10): datasets from a config, the model (optionally from
released weights), and the frozen similarity convolutions."""
from __future__ import annotations

import os
import warnings
from typing import Optional

import timm
import torch.nn as nn
from timm.data import create_transform

from .. import data as D
from ..checkpoint import load_checkpoint
from ..layers import ClusterPool
from .config import TrainConfig
from .distributed import print0

__all__ = ["build_datasets", "build_model", "load_pretrained", "freeze_similarity", "infer_num_classes"]

def build_datasets(cfg: TrainConfig):
    """``(train_set, val_set)`` for ``cfg.dataset``; both have ``.classes``.

    ``digits``: :func:`fec_core.data.digits_datasets` (stratified seeded split, ``val_fraction``
    held out). ``shapes``: :func:`fec_core.data.shapes_datasets` (``.masks`` kept). ``imagefolder``:
    ``data_dir/train`` and ``data_dir/val`` with ``timm.data.create_transform`` (RandAugment
    ``cfg.auto_augment``, random erasing ``cfg.re_prob``, random-resized crops; validation: resize
    and center crop 0.9, bicubic).
    """
    if cfg.dataset == "digits":
        return D.digits_datasets(cfg.img_size, cfg.val_fraction, cfg.seed, augment=bool(cfg.augment))
    if cfg.dataset == "shapes":
        return D.shapes_datasets(cfg.train_samples, cfg.val_samples, cfg.img_size, cfg.seed, cfg.shapes_target,
                                 augment=bool(cfg.augment) and cfg.shapes_target == "label")
    if cfg.dataset == "imagefolder":
        if not cfg.data_dir:
            raise ValueError("dataset 'imagefolder' needs data_dir (--data-dir): a folder with train/<class>/* and "
                             "val/<class>/*; or use --dataset digits / shapes, which need no download")
        if os.path.exists(cfg.data_dir) and not os.path.isdir(cfg.data_dir):
            raise ValueError(f"data_dir {cfg.data_dir} is a file; give the folder that holds train/ and val/")
        val_tf = create_transform(cfg.img_size, is_training=False, interpolation="bicubic", crop_pct=0.9)
        try:
            train_tf = create_transform(cfg.img_size, is_training=True, auto_augment=cfg.auto_augment,
                                        re_prob=cfg.re_prob, re_mode="pixel", interpolation="random",
                                        color_jitter=0.4) if cfg.augment else val_tf
        except (AssertionError, ValueError, KeyError) as e:  # timm asserts on an unknown policy
            raise ValueError(f"auto_augment (--aa) {cfg.auto_augment!r} is not a timm augmentation policy such as "
                             f"'rand-m9-mstd0.5-inc1' ({e}); 'none' switches it off") from None
        return D.image_folder_datasets(cfg.data_dir, train_tf, val_tf)
    raise ValueError(f"unknown dataset {cfg.dataset!r}")


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """``timm.create_model(cfg.model, num_classes=..., drop_path_rate=cfg.drop_path)``; with
    ``cfg.pretrained`` the official weights are loaded (:func:`fec_core.load_checkpoint`; a head
    for another number of classes is left fresh)."""
    try:
        model = timm.create_model(cfg.model, num_classes=num_classes, drop_path_rate=cfg.drop_path)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ValueError(f"unknown model {cfg.model!r}; FEC variants: {timm.list_models('fec_*')}") from e
        raise
    if cfg.pretrained:
        load_pretrained(model, cfg.pretrained)
    return model


def load_pretrained(model: nn.Module, path: str) -> nn.Module:
    """:func:`fec_core.load_checkpoint` (official or fec_core weights, clear errors); its notes
    (e.g. "classifier head not loaded ... keeps its new head") are printed, not warned."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_checkpoint(model, path)
    for w in caught:
        print0(f"note: {w.message}")
    return model


def infer_num_classes(cfg, train_set, model) -> Optional[int]:
    if cfg.num_classes:
        return cfg.num_classes
    classes = getattr(train_set, "classes", None)
    if classes:
        return len(classes)
    return getattr(model, "num_classes", None) or None


def freeze_similarity(model: nn.Module) -> int:
    """Set ``requires_grad=False`` on every :class:`~fec_core.layers.ClusterPool`'s ``conv_f``
    (it only feeds an argmax and never gets a gradient). Returns the number of tensors frozen."""
    n = 0
    for m in model.modules():
        if isinstance(m, ClusterPool):
            for p in m.conv_f.parameters():
                p.requires_grad_(False)
                n += 1
    return n
