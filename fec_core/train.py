"""Training FEC (book chapter 10): the paper's ImageNet recipe built from timm's parts.

Python API (stable; other chapters build on it)::

    from fec_core.train import TrainConfig, fit, evaluate, build_datasets, plot_history

    cfg = TrainConfig(dataset="digits", epochs=20, output_dir=None)  # fields left out: the dataset's preset
    result = fit(cfg)                        # -> FitResult
    result.model                             # the trained model (final weights, unwrapped)
    result.history[-1]                       # {'epoch': 20, 'train_loss', 'val_loss', 'val_acc', 'lr',
                                             #  'images_per_s', 'epoch_time_s'} (+ 'ema_val_*' with EMA)
    result.best_metric, result.best_epoch, result.metric_name   # e.g. 0.99, 18, 'acc'
    result.output_dir, result.latest_path, result.best_path, result.metrics_path
    plot_history(result)                     # loss, metric and learning-rate curves (matplotlib Figure)
    evaluate(result.model, val_set)          # {'loss': ..., 'acc': ...}

    # Anything can be swapped: a model, torch Datasets yielding (image, target), a loss, a metric.
    # Per-pixel targets ([H, W] long) are detected and switch off Mixup/CutMix and label smoothing:
    fit(cfg, model=seg_model, train_set=train, val_set=val,
        loss_fn=torch.nn.CrossEntropyLoss(ignore_index=255), metric=MeanIoU(num_classes=5))

``TrainConfig`` fields left at ``None`` are filled from :data:`PRESETS` for the dataset:
``'imagefolder'`` (the default) is the paper's ImageNet recipe, ``'digits'`` and ``'shapes'``
are small offline recipes for a CPU. ``cfg.resume`` continues a run exactly, ``cfg.pretrained``
starts from a released official checkpoint (new head). A metric is a :class:`Metric`
(``update(output, target)`` / ``compute() -> dict``; its first key, :attr:`Metric.name`, picks
the best checkpoint, higher is better) or a plain function ``fn(output, target) -> float``
averaged over samples. :class:`Accuracy` and :class:`MeanIoU` are provided.

What ``fit`` writes to ``output_dir`` (``None``: nothing): ``latest.pt`` and ``best.pt`` (model,
optimizer, scheduler, grad scaler, EMA, epoch, config, history), ``metrics.jsonl`` (one JSON
line per epoch) and ``config.json``. A directory that already holds a run is refused unless
it is resumed. Nothing is lost whatever instant the run is killed at (tested by a SIGKILL
before and after every write):

* the folder is created and ``config.json`` written *before* training, so a folder under a
  file, without permission or on a read-only disk is reported at once (and little free
  space is warned about);
* every file is written to ``name.tmp``, flushed to disk and renamed over ``name``; a failed
  write (disk full, permission) raises :class:`SaveError` naming the file and the reason,
  keeps the previous version and removes the ``.tmp``;
* after each epoch ``latest.pt`` is written first, then ``best.pt`` (if the epoch improved),
  then the log. On resume a ``best.pt`` left one improvement behind is restored from
  ``latest.pt`` and the log is rewritten from the checkpoint's history.

Resuming with the same settings continues exactly. Resuming with other ``epochs`` (or another
lr, warm-up, ...) re-plans the learning-rate schedule as if the run had started with the new
settings and says so (``--resume RUN --epochs 40`` on a finished 20-epoch run trains epochs
21-40 on the second half of a 40-epoch cosine). Bad settings raise a ``ValueError`` naming the
field and what it accepts; settings that are almost surely mistakes warn.

Command line (``python -m fec_core.train --help``)::

    python -m fec_core.train --dataset digits                     # CPU, a few minutes
    python -m fec_core.train --resume runs/digits-fec_tiny-...    # continue that run (also after Ctrl-C)
    python -m fec_core.train --dataset digits --evaluate --resume runs/digits-fec_tiny-.../best.pt
    torchrun --nproc_per_node=8 -m fec_core.train --data-dir /data/imagenet --model fec_small

The paper's recipe (its ImageNet setup and the official ``train.py`` / ``cmds/train.sh``): AdamW, lr
1e-3 per 1,024 images (scaled linearly with the global batch), weight decay 0.05 (none on
1-D parameters: norms, biases, layer scales ``layer_scale_1/2``, ``sim_alpha``/``sim_beta``),
cosine schedule to 1e-6 with 5 warm-up epochs from 1e-6, 300 epochs, label smoothing 0.1,
Mixup 0.8 / CutMix 1.0, RandAugment ``rand-m9-mstd0.5-inc1``, random erasing 0.25, drop path
0.1, mixed precision. The official script steps the schedule per epoch and adds 10
cool-down epochs at the minimum lr; here the schedule is stepped per update
(``cooldown_epochs=10`` mirrors the rest).

The pooling layers' ``conv_f`` (:class:`fec_core.layers.ClusterPool`) only feeds an argmax,
so it never receives a gradient. Its ``.grad`` stays ``None``, and AdamW skips such
parameters entirely, weight decay included: under the official recipe ``conv_f`` keeps its
initial (or pretrained) weights. ``fit`` makes that explicit by setting
``conv_f.requires_grad_(False)`` (``freeze_similarity=True``): the optimizer leaves it out,
DDP needs no ``find_unused_parameters`` (which would otherwise be required: without it DDP
raises an error at the second step) and the result is bit-identical to training without
freezing (tested). Were ``conv_f`` given a zero gradient instead of none, AdamW's decoupled
weight decay would shrink its weight (but not its bias) every step and change which
center each point picks.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["TrainConfig", "PRESETS", "PAPER_RECIPE", "FitResult", "fit", "evaluate", "build_datasets", "build_model",
           "load_pretrained", "freeze_similarity", "plot_history", "read_history", "Metric", "Accuracy", "MeanIoU",
           "BatchMean", "SaveError", "main"]

# ----------------------------------------------------------------------------- configuration
#: The paper's ImageNet-1k recipe (``dataset='imagefolder'``); ``batch_size`` is per process
#: (8 GPUs x 128 = the paper's 1,024), the peak lr is ``lr_base * global batch / 1024``.
PAPER_RECIPE: Dict[str, Any] = dict(
    model="fec_small", img_size=224, epochs=300, batch_size=128, lr_base=1e-3, min_lr=1e-6, warmup_lr=1e-6,
    warmup_epochs=5, cooldown_epochs=0, weight_decay=0.05, smoothing=0.1, mixup=0.8, cutmix=1.0, drop_path=0.1,
    auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, augment=True, workers=8)

#: Presets per dataset: the fields a :class:`TrainConfig` leaves at ``None`` come from here.
PRESETS: Dict[str, Dict[str, Any]] = {
    "imagefolder": {**PAPER_RECIPE, "threads": 0},
    # 1,347 training images of 32x32 (chapter 10): about a minute of one CPU core for >= 98%
    # held-out accuracy. A higher lr (2e-3 at batch 64), one warm-up epoch, a light affine
    # jitter instead of RandAugment / Mixup / CutMix, no drop path.
    "digits": dict(model="fec_tiny", img_size=32, epochs=30, batch_size=64, lr_base=0.032, min_lr=1e-5,
                   warmup_lr=1e-6, warmup_epochs=1, cooldown_epochs=0, weight_decay=0.05, smoothing=0.1,
                   mixup=0.0, cutmix=0.0, drop_path=0.0, auto_augment=None, re_prob=0.0, augment=True, workers=0,
                   threads=1),
    # generated images, deterministic from the seed. A hard task at this size: measured, 10 epochs
    # on 2,000 images leave fec_tiny near chance (27% of 4 classes) and a 4-layer CNN at 57%;
    # raise train_samples / epochs for a usable classifier.
    "shapes": dict(model="fec_tiny", img_size=64, epochs=10, batch_size=64, lr_base=0.032, min_lr=1e-5,
                   warmup_lr=1e-6, warmup_epochs=1, cooldown_epochs=0, weight_decay=0.05, smoothing=0.1,
                   mixup=0.0, cutmix=0.0, drop_path=0.0, auto_augment=None, re_prob=0.0, augment=False, workers=0,
                   threads=1),
}

BUILTIN_DATASETS = ("digits", "shapes")


@dataclass
class TrainConfig:
    """Everything a training run needs; saved in every checkpoint.

    Fields marked *preset* default to ``None`` and are filled from :data:`PRESETS` for
    ``dataset`` when the config is made (explicit values win).

    Data: ``dataset`` ``'imagefolder'`` (ImageNet layout under ``data_dir``: ``train/<class>/*``,
    ``val/<class>/*``), ``'digits'`` or ``'shapes'``; ``img_size`` (*preset*); ``num_classes``
    (``None``: from the dataset); ``val_fraction`` (digits: the held-out share, stratified);
    ``train_samples`` / ``val_samples`` (shapes); ``shapes_target`` ``'label'`` or ``'mask'``;
    ``workers`` (*preset*, DataLoader processes).
    Model: ``model`` (*preset*, a timm name such as ``fec_tiny``/``fec_small``), ``drop_path``
    (*preset*), ``pretrained`` (an official checkpoint file; the head is replaced when the
    number of classes differs), ``freeze_similarity`` (freeze the pooling layers' ``conv_f``,
    see the module docstring).
    Optimization: ``epochs``, ``batch_size`` (per process), ``lr`` (peak; ``None``: ``lr_base *
    global batch / 1024``), ``lr_base``, ``min_lr``, ``warmup_lr``, ``warmup_epochs``,
    ``cooldown_epochs``, ``weight_decay`` (all *preset*), ``opt`` ('adamw'), ``sched`` ('cosine'),
    ``clip_grad`` (max grad norm or ``None``).
    Regularization (*preset*): ``smoothing``, ``mixup``, ``cutmix`` (alphas; 0 = off),
    ``auto_augment`` (image folders; ``''``/``'none'`` = off), ``re_prob`` (random erasing, image
    folders), ``augment`` (``False``: no training augmentation at all).
    Extras: ``ema`` (keep an EMA of the weights, ``timm.utils.ModelEmaV3``), ``ema_decay``,
    ``amp`` ('auto': bf16 on GPUs that support it, else fp16 with a grad scaler, none on a
    CPU; or 'bf16', 'fp16', 'off').
    Bookkeeping: ``output_dir`` (``None``: save nothing), ``resume`` (a checkpoint file or run
    folder), ``seed``, ``device`` ('auto', 'cpu', 'cuda', 'cuda:1'), ``threads`` (CPU threads
    for PyTorch during ``fit``, restored afterwards; 0 leaves PyTorch's choice; the small presets use 1:
    their tiny convolutions gain little from more, a busy machine loses a lot, and one thread
    gives the same numbers on every machine), ``find_unused_parameters``
    (DDP, for custom models with parameters that get no gradient), ``log_interval`` (steps).
    """

    dataset: str = "imagefolder"
    data_dir: Optional[str] = None
    model: Optional[str] = None
    img_size: Optional[int] = None
    num_classes: Optional[int] = None
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    lr_base: Optional[float] = None
    min_lr: Optional[float] = None
    warmup_lr: Optional[float] = None
    warmup_epochs: Optional[int] = None
    cooldown_epochs: Optional[int] = None
    weight_decay: Optional[float] = None
    opt: str = "adamw"
    sched: str = "cosine"
    clip_grad: Optional[float] = None
    smoothing: Optional[float] = None
    mixup: Optional[float] = None
    cutmix: Optional[float] = None
    drop_path: Optional[float] = None
    auto_augment: Optional[str] = None
    re_prob: Optional[float] = None
    augment: Optional[bool] = None
    workers: Optional[int] = None
    val_fraction: float = 0.25
    train_samples: int = 2000
    val_samples: int = 500
    shapes_target: str = "label"
    ema: bool = False
    ema_decay: float = 0.9998
    amp: str = "auto"
    pretrained: Optional[str] = None
    freeze_similarity: bool = True
    output_dir: Optional[str] = None
    resume: Optional[str] = None
    seed: int = 0
    device: str = "auto"
    threads: Optional[int] = None
    find_unused_parameters: bool = False
    log_interval: int = 20

    def __post_init__(self):
        kind = self.dataset if self.dataset in PRESETS else None
        if kind is None:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose one of {sorted(PRESETS)} "
                             f"(or pass your own train_set / val_set to fit())")
        preset = PRESETS[kind]
        for name, value in preset.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.auto_augment in ("", "none", "None"):
            self.auto_augment = None
        _validate(self)

    @classmethod
    def from_checkpoint(cls, path: str, **overrides) -> "TrainConfig":
        """The config a checkpoint (file or run folder) was trained with, updated by ``overrides``."""
        ckpt = _read_training_checkpoint(path)
        known = {f.name for f in dataclasses.fields(cls)}
        saved = {k: v for k, v in ckpt["config"].items() if k in known}
        return cls(**{**saved, **overrides})

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# What each numeric field accepts: (kind, low, high, low included, high included); None: unbounded.
_RULES: Dict[str, Tuple[type, Optional[float], Optional[float], bool, bool]] = {
    "epochs": (int, 1, None, True, True), "batch_size": (int, 1, None, True, True),
    "img_size": (int, 1, None, True, True), "log_interval": (int, 1, None, True, True),
    "train_samples": (int, 1, None, True, True), "val_samples": (int, 1, None, True, True),
    "num_classes": (int, 1, None, True, True), "warmup_epochs": (int, 0, None, True, True),
    "cooldown_epochs": (int, 0, None, True, True), "workers": (int, 0, None, True, True),
    "threads": (int, 0, None, True, True), "seed": (int, 0, 2 ** 63 - 1, True, True),
    "lr": (float, 0, None, False, True), "lr_base": (float, 0, None, False, True),
    "clip_grad": (float, 0, None, False, True), "min_lr": (float, 0, None, True, True),
    "warmup_lr": (float, 0, None, True, True), "weight_decay": (float, 0, None, True, True),
    "mixup": (float, 0, None, True, True), "cutmix": (float, 0, None, True, True),
    "smoothing": (float, 0, 1, True, False), "drop_path": (float, 0, 1, True, False),
    "ema_decay": (float, 0, 1, True, False), "re_prob": (float, 0, 1, True, True),
    "val_fraction": (float, 0, 1, False, False),
}


def _rule_text(kind, lo, hi, lo_in, hi_in) -> str:
    what = "an integer" if kind is int else "a number"
    if hi is None:
        return f"{what} {'>=' if lo_in else '>'} {lo}"
    return f"{what} in {'[' if lo_in else '('}{lo}, {hi}{']' if hi_in else ')'}"


def _validate(cfg: "TrainConfig") -> None:
    """A ``ValueError`` / ``TypeError`` naming the field, its value and what is allowed."""
    for name, (kind, lo, hi, lo_in, hi_in) in _RULES.items():
        v = getattr(cfg, name)
        if v is None and name not in ("epochs", "batch_size", "img_size"):
            continue
        ok_type = isinstance(v, int) if kind is int else isinstance(v, (int, float))
        if isinstance(v, bool) or not ok_type:
            raise TypeError(f"{name} must be {_rule_text(kind, lo, hi, lo_in, hi_in)}, got {v!r}")
        if not math.isfinite(v) or (v < lo if lo_in else v <= lo) or (
                hi is not None and (v > hi if hi_in else v >= hi)):
            raise ValueError(f"{name} must be {_rule_text(kind, lo, hi, lo_in, hi_in)}, got {v!r}")
    choices = {"amp": ("auto", "bf16", "fp16", "off"), "shapes_target": ("label", "mask")}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {getattr(cfg, name)!r}")
    if cfg.device != "auto":
        try:
            torch.device(cfg.device)
        except (RuntimeError, TypeError, ValueError):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:<index>', got {cfg.device!r}") from None
    if cfg.warmup_epochs >= cfg.epochs > 1:
        warnings.warn(f"warmup_epochs ({cfg.warmup_epochs}) >= epochs ({cfg.epochs}): the whole run is warm-up "
                      f"and the learning rate never reaches its peak", stacklevel=3)


# ----------------------------------------------------------------------------- metrics
class Metric:
    """A metric accumulated over batches: ``reset()``, ``update(output, target)``, ``compute()``.

    State lives in ``self.state`` (a dict of tensors that are *summed* across processes under
    DDP). ``compute()`` returns a dict whose first key (:attr:`name`) is the main metric
    (higher is better; it picks ``best.pt``).
    """

    name = "metric"

    def __init__(self):
        self.state: Dict[str, torch.Tensor] = {}
        self.reset()

    def reset(self) -> None:
        raise NotImplementedError

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        raise NotImplementedError

    def compute(self) -> Dict[str, float]:
        raise NotImplementedError

    def all_reduce(self) -> None:
        """Sum the state over all processes (a no-op without torch.distributed)."""
        if dist.is_available() and dist.is_initialized():
            for k, v in self.state.items():
                t = v.clone()
                dist.all_reduce(t)
                self.state[k] = t


class Accuracy(Metric):
    """Top-1 accuracy ``'acc'`` (and top-5 ``'acc5'`` with ``topk=(1, 5)``) of logits ``[B, K]``
    against class indices ``[B]`` (or soft targets ``[B, K]``, their argmax)."""

    name = "acc"

    def __init__(self, topk: Sequence[int] = (1,)):
        self.topk = tuple(topk)
        super().__init__()

    def reset(self) -> None:
        self.state = {"correct": torch.zeros(len(self.topk), dtype=torch.float64), "count": torch.zeros((), dtype=torch.float64)}

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        if target.ndim == 2:
            target = target.argmax(1)
        k = min(max(self.topk), output.shape[1])
        pred = output.topk(k, dim=1).indices
        hit = pred.eq(target.view(-1, 1))
        correct = torch.stack([hit[:, :min(t, k)].any(1).sum() for t in self.topk]).to(torch.float64)
        dev = self.state["correct"].device
        if dev != correct.device:
            self.state = {k_: v.to(correct.device) for k_, v in self.state.items()}
        self.state["correct"] += correct
        self.state["count"] += target.numel()

    def compute(self) -> Dict[str, float]:
        n = max(self.state["count"].item(), 1.0)
        return {("acc" if t == 1 else f"acc{t}"): self.state["correct"][i].item() / n for i, t in enumerate(self.topk)}


def iou_per_class(confusion: torch.Tensor) -> torch.Tensor:
    """IoU of every class from a confusion matrix ``[K, K]`` (row: true, column: predicted),
    ``TP / (TP + FP + FN)``; NaN for a class neither present nor predicted. The mean over the
    non-NaN entries is the mIoU of :class:`MeanIoU` (its ``state['confusion']``)."""
    conf = confusion.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))


class MeanIoU(Metric):
    """Semantic segmentation: mean intersection-over-union ``'miou'`` and pixel accuracy
    ``'pixel_acc'`` from a confusion matrix. ``output`` logits ``[B, K, h, w]`` (upsampled
    bilinearly to the target's size when they differ), ``target`` ``[B, H, W]`` class indices;
    pixels equal to ``ignore_index`` are skipped; classes absent from both prediction and
    target are left out of the mean."""

    name = "miou"

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        super().__init__()

    def reset(self) -> None:
        self.state = {"confusion": torch.zeros(self.num_classes, self.num_classes, dtype=torch.float64)}

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        if output.shape[-2:] != target.shape[-2:]:
            output = nn.functional.interpolate(output.float(), size=target.shape[-2:], mode="bilinear",
                                               align_corners=False)
        pred, target = output.argmax(1).flatten(), target.flatten()
        keep = target != self.ignore_index
        k = self.num_classes
        cm = torch.bincount(target[keep] * k + pred[keep], minlength=k * k).reshape(k, k).to(torch.float64)
        self.state["confusion"] = self.state["confusion"].to(cm.device) + cm

    def compute(self) -> Dict[str, float]:
        cm = self.state["confusion"]
        iou = iou_per_class(cm)
        miou = iou.nanmean().item() if not iou.isnan().all() else 0.0
        return {"miou": miou, "pixel_acc": (cm.diag().sum() / cm.sum().clamp_min(1)).item()}


class BatchMean(Metric):
    """Wraps a plain ``fn(output, target) -> float`` (a batch mean): the sample-weighted mean."""

    def __init__(self, fn: Callable, name: Optional[str] = None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "metric")
        super().__init__()

    def reset(self) -> None:
        self.state = {"sum": torch.zeros((), dtype=torch.float64), "count": torch.zeros((), dtype=torch.float64)}

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        value = self.fn(output, target)
        value = value.item() if isinstance(value, torch.Tensor) else float(value)
        self.state["sum"] += value * len(target)
        self.state["count"] += len(target)

    def compute(self) -> Dict[str, float]:
        return {self.name: self.state["sum"].item() / max(self.state["count"].item(), 1.0)}


def _as_metric(metric) -> Metric:
    if metric is None or isinstance(metric, Metric):
        return metric
    if callable(metric):
        return BatchMean(metric)
    raise TypeError(f"metric must be a fec_core.train.Metric or a function (output, target) -> float, got {metric!r}")


# ----------------------------------------------------------------------------- data and model
def build_datasets(cfg: TrainConfig):
    """``(train_set, val_set)`` for ``cfg.dataset``; both have ``.classes``.

    ``digits``: :func:`fec_core.data.digits_datasets` (stratified seeded split, ``val_fraction``
    held out). ``shapes``: :func:`fec_core.data.shapes_datasets` (``.masks`` kept). ``imagefolder``:
    ``data_dir/train`` and ``data_dir/val`` with ``timm.data.create_transform`` (RandAugment
    ``cfg.auto_augment``, random erasing ``cfg.re_prob``, random-resized crops; validation: resize
    and center crop 0.9, bicubic).
    """
    from . import data as D

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
        from timm.data import create_transform

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
    import timm

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
    from .checkpoint import load_checkpoint

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_checkpoint(model, path)
    for w in caught:
        _print0(f"note: {w.message}")
    return model


def _targets_are_dense(dataset) -> bool:
    target = dataset[0][1]
    return isinstance(target, torch.Tensor) and target.ndim >= 1


def _num_classes(cfg, train_set, model) -> Optional[int]:
    if cfg.num_classes:
        return cfg.num_classes
    classes = getattr(train_set, "classes", None)
    if classes:
        return len(classes)
    return getattr(model, "num_classes", None) or None


def freeze_similarity(model: nn.Module) -> int:
    """Set ``requires_grad=False`` on every :class:`~fec_core.layers.ClusterPool`'s ``conv_f``
    (it only feeds an argmax and never gets a gradient). Returns the number of tensors frozen."""
    from .layers import ClusterPool

    n = 0
    for m in model.modules():
        if isinstance(m, ClusterPool):
            for p in m.conv_f.parameters():
                p.requires_grad_(False)
                n += 1
    return n


# ----------------------------------------------------------------------------- distributed helpers
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owned: bool = False  # we called init_process_group

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_str: str) -> _Dist:
    if dist.is_available() and dist.is_initialized():
        return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    use_cuda = torch.cuda.is_available() and device_str != "cpu"
    backend = "nccl" if use_cuda else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    return _Dist(dist.get_rank(), dist.get_world_size(), local_rank, owned=True)


def _print0(*args, **kwargs):
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        from tqdm.auto import tqdm

        tqdm.write(" ".join(str(a) for a in args), file=kwargs.get("file", sys.stdout))


def _resolve_device(device: str, d: _Dist) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for but this machine has no CUDA device that PyTorch "
                             f"can use; use --device cpu (or 'auto')")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} "
                             f"CUDA device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        if d.enabled or dev.index is None:
            dev = torch.device("cuda", d.local_rank if d.enabled else torch.cuda.current_device())
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} was asked for but MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {device!r} is not supported for training; use 'auto', 'cpu' or 'cuda'")
    return dev


def _amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    if amp == "off":
        return None
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("amp 'fp16' needs a CUDA device; use 'bf16' or 'off' on a CPU")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def _seed_all(s: int) -> None:
    random.seed(s)
    np.random.seed(s % 2 ** 32)
    torch.manual_seed(s)


def _worker_init(worker_id: int) -> None:
    s = torch.initial_seed() % 2 ** 32  # distinct per worker, derived from the seeded loader
    random.seed(s)
    np.random.seed(s)


class _Shard(torch.utils.data.Sampler):
    """Indices ``rank, rank + world, ...``: every sample once over all processes (no padding)."""

    def __init__(self, n: int, rank: int, world: int):
        self.idx = range(rank, n, world)

    def __iter__(self):
        return iter(self.idx)

    def __len__(self):
        return len(self.idx)


# ----------------------------------------------------------------------------- checkpoints
class SaveError(OSError):
    """A run file could not be written (disk full, no permission, ...). The message says which
    file and why; the previous version of the file is kept and no partial file is left."""


_WHY = {errno.ENOSPC: "the disk is full", getattr(errno, "EDQUOT", -1): "the disk quota is exceeded",
        errno.EACCES: "permission denied", errno.EPERM: "permission denied",
        errno.EROFS: "the filesystem is read-only", errno.ENOTDIR: "a part of the path is a file, not a folder"}


def _why(e: OSError, folder: str) -> str:
    why = _WHY.get(e.errno) or e.strerror or str(e)
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        with contextlib.suppress(OSError):
            why += f" ({_size(shutil.disk_usage(folder).free)} free there)"
    return why


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _write_atomic(path: str, write: Callable[[Any], None]) -> None:
    """Write ``path`` through ``path.tmp`` then ``os.replace``: a reader (or a run killed at
    any instant) sees the old file or the new one, never a part. On failure the ``.tmp`` is
    removed and a :class:`SaveError` says what failed."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # also Ctrl-C in the middle of a write: no partial file stays
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError):
            kept = "the previous version is kept" if os.path.exists(path) else "nothing was written"
            err = SaveError(f"could not write {path}: {_why(e, os.path.dirname(os.path.abspath(path)))}; {kept}")
            err.errno = e.errno
            raise err from e
        raise


def _atomic_save(obj: Any, path: str) -> None:
    _write_atomic(path, lambda f: torch.save(obj, f))


def _atomic_write_text(text: str, path: str) -> None:
    _write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def _atomic_copy(src: str, dst: str) -> None:
    def copy(f):
        with open(src, "rb") as g:
            shutil.copyfileobj(g, f, 1 << 20)
    _write_atomic(dst, copy)


RUN_FILES = ("latest.pt", "best.pt", "metrics.jsonl", "config.json")


def _prepare_output(out: str, config_text: str) -> None:
    """Create the run folder and write ``config.json`` (the test write) before any training:
    a folder under a file, without permission or on a read-only filesystem is reported now,
    not after the first epoch. Leftover ``*.tmp`` files of a killed run are removed."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise SaveError(f"cannot use {out} as the output folder: it is a file")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        parent = os.path.abspath(out)
        while parent and not os.path.exists(parent):
            parent = os.path.dirname(parent)
        why = f"{parent} is a file, not a folder" if os.path.isfile(parent) else _why(e, parent)
        raise SaveError(f"cannot create the output folder {out}: {why}") from None
    for name in RUN_FILES:
        with contextlib.suppress(OSError):
            os.remove(os.path.join(out, name + ".tmp"))
    try:
        _atomic_write_text(config_text, os.path.join(out, "config.json"))
    except SaveError as e:
        raise SaveError(f"the output folder {out} is not writable: {e}") from None


def _checkpoint_bytes(model: nn.Module, ema: bool) -> int:
    """About the size of a training checkpoint: weights, AdamW's two moments, EMA weights."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    moments = 2 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return weights * (2 if ema else 1) + moments


def _warn_if_little_space(out: str, per_file: int, files: int) -> None:
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(out).free
        if free < per_file * files:
            warnings.warn(f"{out} has {_size(free)} free but each checkpoint takes about {_size(per_file)} and "
                          f"{files} may be on disk at once (latest.pt, best.pt and the one being written): "
                          f"saving is likely to fail; free some space or choose another --output-dir",
                          stacklevel=3)


def _saved_epoch(path: str) -> Optional[int]:
    """The ``epoch`` recorded in a training checkpoint, ``None`` if it is missing or unreadable."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=False, mmap=True)["epoch"])
    except Exception:
        return None


def _repair_best(resume: Dict[str, Any], best: str) -> None:
    """Make ``best.pt`` agree with the ``best_epoch`` that ``latest.pt`` records.

    ``fit`` writes ``latest.pt`` before ``best.pt``; a run stopped between the two leaves
    ``best.pt`` one improvement behind, and then the best epoch is the latest one, so
    ``latest.pt`` is copied over it."""
    want, epoch = resume.get("best_epoch"), int(resume["epoch"])
    if want is None or os.path.abspath(resume["path"]) == os.path.abspath(best):
        return
    have = _saved_epoch(best) if os.path.exists(best) else None
    if have == want:
        return
    if want == epoch:
        _atomic_copy(resume["path"], best)
        _print0(f"note: best.pt held {f'epoch {have}' if have else 'no checkpoint'} but the best epoch is "
                f"{want} (the run stopped between writing latest.pt and best.pt); restored it from latest.pt")
    else:
        warnings.warn(f"{best} holds {f'epoch {have}' if have else 'no checkpoint'}, not the best epoch {want} "
                      f"that {resume['path']} records, and that epoch's weights are not on disk any more",
                      stacklevel=3)


def _checkpoint_path(path: str) -> str:
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "latest.pt")) and os.path.exists(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{path} holds no checkpoint yet: the run stopped before its first epoch "
                                    f"ended; start it again with --output-dir {path}")
        path = os.path.join(path, "latest.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def _read_training_checkpoint(path: str) -> Dict[str, Any]:
    from .checkpoint import CheckpointError

    path = _checkpoint_path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: it is corrupt or not a PyTorch file ({e})") from e
    if not isinstance(ckpt, dict) or "optimizer" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path} is not a fec_core training checkpoint (no optimizer/config state); "
                              f"to start from released weights use --pretrained {path}")
    ckpt["path"] = path
    return ckpt


def _load_model_state(model: nn.Module, state: Dict[str, torch.Tensor], source: str, saved_for: str) -> None:
    """Strict load with a readable error for a checkpoint of another architecture."""
    from .checkpoint import raise_if_mismatch

    raise_if_mismatch(model.state_dict(), state, f"checkpoint {source} does not fit this model: it was saved for {saved_for}")
    model.load_state_dict(state)


# ----------------------------------------------------------------------------- results
@dataclass
class FitResult:
    """What :func:`fit` returns. Also readable like a dict (``result['history']``)."""

    model: nn.Module
    history: List[Dict[str, float]]
    best_metric: Optional[float]
    best_epoch: Optional[int]
    metric_name: str
    config: TrainConfig
    classes: Optional[Tuple[str, ...]] = None
    ema_model: Optional[nn.Module] = None
    lr: Optional[float] = None
    output_dir: Optional[str] = None
    latest_path: Optional[str] = None
    best_path: Optional[str] = None
    metrics_path: Optional[str] = None

    def __getitem__(self, key: str):
        return getattr(self, key)

    def keys(self):
        return [f.name for f in dataclasses.fields(self)]


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: nn.Module, data, loss_fn: Optional[Callable] = None, metric=None, device=None,
             batch_size: int = 256, amp_dtype: Optional[torch.dtype] = None, progress: bool = False,
             workers: int = 0) -> Dict[str, float]:
    """Evaluate ``model`` on ``data`` (a Dataset or DataLoader yielding ``(image, target)``).

    Returns ``{'loss': mean loss, **metric.compute()}``; defaults: cross-entropy and
    :class:`Accuracy` for class targets, cross-entropy (``ignore_index=255``) and
    :class:`MeanIoU` for per-pixel targets. Under torch.distributed, pass a DataLoader
    whose sampler shards the data: sums are reduced over the processes.
    """
    from tqdm.auto import tqdm

    if device is None:
        device = next(model.parameters()).device
    if isinstance(data, torch.utils.data.DataLoader):
        loader = data
    else:
        if len(data) == 0:
            raise ValueError("the evaluation dataset is empty")
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=workers)
    metric = _as_metric(metric)
    dense = None
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext())
    for x, y in tqdm(loader, desc="eval", leave=False, disable=not progress):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if dense is None:
            dense = y.ndim >= 2 and y.dtype in (torch.long, torch.int32, torch.int64, torch.uint8)
            if loss_fn is None:
                loss_fn = nn.CrossEntropyLoss(ignore_index=255) if dense else nn.CrossEntropyLoss()
            if metric is None:
                metric = MeanIoU(_output_classes(model, x)) if dense else Accuracy()
        with autocast:
            out = model(x)
            loss = loss_fn(out, y)
        out = out.float()
        loss_sum += loss.detach().double() * len(x)
        count += len(x)
        metric.update(out, y)
    if metric is None:
        raise ValueError("the evaluation data yielded no batches")
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(loss_sum)
        dist.all_reduce(count)
        metric.all_reduce()
    model.train(was_training)
    return {"loss": (loss_sum / count.clamp_min(1)).item(), **metric.compute()}


def _output_classes(model: nn.Module, x: torch.Tensor) -> int:
    n = getattr(model, "num_classes", None)
    if n:
        return int(n)
    return int(model(x[:1]).shape[1])


# ----------------------------------------------------------------------------- the loop
def fit(cfg: TrainConfig, model: Optional[nn.Module] = None, train_set=None, val_set=None,
        loss_fn: Optional[Callable] = None, metric=None, progress: bool = True) -> FitResult:
    """Train with ``cfg`` (chapter 10); see the module docstring for the recipe.

    ``model``: ``None`` builds ``cfg.model`` (:func:`build_model`); any ``nn.Module`` works.
    ``train_set`` / ``val_set``: ``None`` builds ``cfg.dataset`` (:func:`build_datasets`); else
    torch Datasets yielding ``(image [3, H, W], target)`` with ``target`` a class index or a
    per-pixel class map ``[H, W]``. ``loss_fn(output, target)``: ``None`` gives the recipe's
    loss (SoftTargetCrossEntropy with Mixup/CutMix, LabelSmoothingCrossEntropy, or
    cross-entropy; ``ignore_index=255`` for per-pixel targets); a custom loss receives the
    raw targets, is used for validation too, and switches Mixup/CutMix off. ``metric``: a
    :class:`Metric`, a function ``(output, target) -> float``, or ``None`` (:class:`Accuracy`,
    or :class:`MeanIoU` for per-pixel targets). ``progress``: tqdm bars and a line per epoch.

    Runs under ``torchrun`` unchanged (DDP; rank 0 writes the files).
    Returns a :class:`FitResult`.
    """
    from tqdm.auto import tqdm

    from .checkpoint import CheckpointError

    d = _init_distributed(cfg.device)
    threads_before = torch.get_num_threads()
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        device = _resolve_device(cfg.device, d)
        resume = _read_training_checkpoint(cfg.resume) if cfg.resume else None

        # ---- data (validated before anything is written)
        if train_set is None or val_set is None:
            built_train, built_val = build_datasets(cfg)
            train_set = built_train if train_set is None else train_set
            val_set = built_val if val_set is None else val_set
        if len(train_set) == 0 or len(val_set) == 0:
            raise ValueError(f"empty dataset: {len(train_set)} training and {len(val_set)} validation samples")
        classes = tuple(getattr(train_set, "classes", ()) or ()) or None
        dense = _targets_are_dense(train_set)
        if classes is not None and len(classes) == 1 and not dense:
            warnings.warn(f"the training data has a single class ({classes[0]!r}): every prediction is right, the "
                          f"loss goes to 0 and the accuracy is 1.0 whatever the model learns; an image folder "
                          f"needs one subfolder per class", stacklevel=2)
        per_rank = len(train_set) // d.world
        if cfg.batch_size > per_rank:
            where = f" per process ({d.world} processes)" if d.enabled else ""
            raise ValueError(f"batch size {cfg.batch_size} is larger than the training set: {len(train_set)} samples"
                             f"{where}; use --batch-size {max(1, per_rank // 2)} or less")

        # ---- model (same seed on every rank: identical initial weights)
        torch.manual_seed(cfg.seed)
        num_classes = _num_classes(cfg, train_set, model)
        model_name = cfg.model if model is None else type(model).__name__
        if model is None:
            if num_classes is None:
                raise ValueError("cannot tell the number of classes: give the dataset a .classes or set num_classes")
            model = build_model(cfg, num_classes)
        elif cfg.pretrained:
            load_pretrained(model, cfg.pretrained)
        model_classes = getattr(model, "num_classes", None)
        if not dense and classes and model_classes and model_classes != len(classes):
            raise ValueError(f"the model has {model_classes} outputs but the dataset has {len(classes)} classes; "
                             f"call model.reset_classifier({len(classes)}) or set num_classes")
        if cfg.freeze_similarity:
            freeze_similarity(model)
        model.to(device)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True

        # ---- loss, mixup, metric
        mixup_fn = None
        if loss_fn is None:
            from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
            if dense:
                train_loss = val_loss = nn.CrossEntropyLoss(ignore_index=255, label_smoothing=0.0)
            elif (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.augment:
                from timm.data import Mixup
                if cfg.batch_size % 2:
                    raise ValueError(f"Mixup/CutMix need an even batch size, got {cfg.batch_size}")
                mixup_fn = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing,
                                 num_classes=num_classes)
                train_loss, val_loss = SoftTargetCrossEntropy(), nn.CrossEntropyLoss()
            elif cfg.smoothing > 0:
                train_loss, val_loss = LabelSmoothingCrossEntropy(cfg.smoothing), nn.CrossEntropyLoss()
            else:
                train_loss = val_loss = nn.CrossEntropyLoss()
        else:
            train_loss = val_loss = loss_fn
        metric = _as_metric(metric)
        if metric is None:
            metric = MeanIoU(num_classes or _output_classes(model, train_set[0][0][None].to(device))) if dense \
                else Accuracy((1, 5) if (num_classes or 0) >= 10 and not cfg.dataset in BUILTIN_DATASETS else (1,))

        # ---- loaders
        pin = device.type == "cuda"
        sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=d.world, rank=d.rank, shuffle=True,
                                                      seed=cfg.seed, drop_last=True)
        train_loader = torch.utils.data.DataLoader(
            train_set, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers, pin_memory=pin,
            drop_last=True, worker_init_fn=_worker_init, persistent_workers=False)
        val_loader = torch.utils.data.DataLoader(
            val_set, batch_size=cfg.batch_size, sampler=_Shard(len(val_set), d.rank, d.world),
            num_workers=cfg.workers, pin_memory=pin)
        steps_per_epoch = len(train_loader)

        # ---- optimizer, schedule, AMP, EMA (timm's factories)
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2
        global_batch = cfg.batch_size * d.world
        lr = cfg.lr if cfg.lr is not None else cfg.lr_base * global_batch / 1024
        if lr >= 1.0:
            warnings.warn(f"peak learning rate {lr:.3g} is far above the usual 1e-4..1e-2 for AdamW: training is "
                          f"likely to diverge", stacklevel=2)
        if cfg.min_lr > lr:
            warnings.warn(f"min_lr ({cfg.min_lr:.3g}) is above the peak lr ({lr:.3g}): the schedule rises",
                          stacklevel=2)
        optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay,
                                        filter_bias_and_bn=True)
        scheduler, total_epochs = create_scheduler_v2(
            optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
            warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, cooldown_epochs=cfg.cooldown_epochs,
            step_on_epochs=False, updates_per_epoch=steps_per_epoch)
        amp_dtype = _amp_dtype(cfg.amp, device)
        scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
        ema = None
        if cfg.ema:
            from timm.utils import ModelEmaV3
            ema = ModelEmaV3(model, decay=cfg.ema_decay)

        # ---- resume
        start_epoch, history, best_metric, best_epoch = 0, [], None, None
        if resume is not None:
            saved_for = resume.get("model_name") or resume.get("config", {}).get("model")
            _load_model_state(model, resume["model"], resume["path"],
                              f"{saved_for} with {resume.get('num_classes')} classes")
            try:
                optimizer.load_state_dict(resume["optimizer"])
            except ValueError as e:
                raise CheckpointError(f"optimizer state in {resume['path']} does not fit ({e})") from e
            start_epoch = int(resume["epoch"])
            _restore_schedule(scheduler, resume, cfg, start_epoch, start_epoch * steps_per_epoch, total_epochs)
            if scaler is not None and resume.get("scaler"):
                scaler.load_state_dict(resume["scaler"])
            if ema is not None:
                if resume.get("state_dict_ema") is None:
                    raise CheckpointError(f"{resume['path']} has no EMA weights; resume without --ema")
                ema.module.load_state_dict(resume["state_dict_ema"])
            history = list(resume.get("history", []))[:start_epoch]
            best_metric, best_epoch = resume.get("best_metric"), resume.get("best_epoch")
            if start_epoch >= total_epochs:
                _print0(f"{resume['path']} already finished its {start_epoch} epochs and {total_epochs} were asked "
                        f"for; nothing to train (to train on, resume with --epochs {start_epoch + 10}, say: the "
                        f"learning-rate schedule is then re-planned)")

        # ---- output folder: never overwrite another run
        out = cfg.output_dir
        if out is None and resume is not None:
            out = os.path.dirname(resume["path"])
        latest = best = metrics_path = None
        if out is not None:
            latest, best = os.path.join(out, "latest.pt"), os.path.join(out, "best.pt")
            metrics_path = os.path.join(out, "metrics.jsonl")
            resuming_here = resume is not None and os.path.abspath(os.path.dirname(resume["path"])) == os.path.abspath(out)
            if not resuming_here and any(os.path.exists(p) for p in (latest, best)):
                raise FileExistsError(f"{out} already holds a training run (latest.pt / best.pt); resume it with "
                                      f"--resume {out} or choose another --output-dir")
            # created and test-written now, before any training; best.pt repaired if a kill left it behind
            failure = None
            if d.main:
                try:
                    _prepare_output(out, json.dumps(cfg.to_dict(), indent=2) + "\n")
                    if resuming_here:
                        _repair_best(resume, best)
                    _atomic_write_text("".join(json.dumps(h) + "\n" for h in history), metrics_path)
                    files = 2 if resuming_here else 3
                    _warn_if_little_space(out, _checkpoint_bytes(model, ema is not None), files)
                except OSError as e:
                    failure = e
            if not _all_ok(failure is None, d, device):
                raise failure if failure is not None else SaveError(f"rank 0 could not prepare {out}")

        # ---- DDP
        net = model
        if d.enabled:
            net = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=cfg.find_unused_parameters)

        if d.main and progress:
            n_params = sum(p.numel() for p in model.parameters())
            _print0(f"training {model_name} ({n_params:,} parameters) on "
                    f"{len(train_set):,} images ({steps_per_epoch} steps/epoch, global batch {global_batch}, "
                    f"peak lr {lr:.3g}) on {device}{f' x {d.world} processes' if d.enabled else ''}"
                    f"{f', amp {amp_dtype}' if amp_dtype else ''}")

        metric_name = metric.name
        step = start_epoch * steps_per_epoch
        for epoch in range(start_epoch, total_epochs):
            _seed_all(_epoch_seed(cfg.seed, epoch, d.rank))
            sampler.set_epoch(epoch)
            net.train()
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            count = torch.zeros((), dtype=torch.float64, device=device)
            bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{total_epochs}", leave=True,
                       disable=not (progress and d.main), dynamic_ncols=True)
            t0 = time.perf_counter()
            for i, (x, y) in enumerate(train_loader):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if mixup_fn is not None:
                    x, y = mixup_fn(x, y)
                with (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()):
                    out_ = net(x)
                    loss = train_loss(out_, y)
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    if cfg.clip_grad:
                        scaler.unscale_(optimizer)
                        nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    if cfg.clip_grad:
                        nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                    optimizer.step()
                step += 1
                scheduler.step_update(num_updates=step)
                if ema is not None:
                    ema.update(model, step=step)
                loss_sum += loss.detach().double() * len(x)
                count += len(x)
                if (i + 1) % cfg.log_interval == 0 or i + 1 == steps_per_epoch:
                    value = loss.item()
                    if not math.isfinite(value):
                        raise FloatingPointError(f"the loss is {value} at epoch {epoch + 1}, step {i + 1}: training "
                                                 f"diverged; lower the learning rate (now {_current_lr(optimizer):.3g})")
                    bar.set_postfix(loss=f"{value:.4f}", lr=f"{_current_lr(optimizer):.2e}", refresh=False)
                bar.update(1)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_time = time.perf_counter() - t0
            if d.enabled:
                dist.all_reduce(loss_sum)
                dist.all_reduce(count)
            entry = {"epoch": epoch + 1, "train_loss": (loss_sum / count).item()}
            metric.reset()
            res = evaluate(model, val_loader, loss_fn=val_loss, metric=metric, device=device, amp_dtype=amp_dtype)
            entry.update({f"val_{k}": v for k, v in res.items()})
            if ema is not None:
                metric.reset()
                res_ema = evaluate(ema.module, val_loader, loss_fn=val_loss, metric=metric, device=device,
                                   amp_dtype=amp_dtype)
                entry.update({f"ema_val_{k}": v for k, v in res_ema.items()})
            entry.update({"lr": _current_lr(optimizer), "images_per_s": count.item() / train_time,
                          "epoch_time_s": time.perf_counter() - t0})
            history.append(entry)
            score = entry[f"ema_val_{metric_name}" if ema is not None else f"val_{metric_name}"]
            improved = best_metric is None or score > best_metric
            if improved:
                best_metric, best_epoch = score, epoch + 1
            bar.set_postfix({"train_loss": f"{entry['train_loss']:.4f}", "val_loss": f"{entry['val_loss']:.4f}",
                             f"val_{metric_name}": f"{entry[f'val_{metric_name}']:.4f}"}, refresh=True)
            bar.close()
            failure = None
            if out is not None and d.main:
                ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                        "state_dict_ema": ema.module.state_dict() if ema is not None else None,
                        "epoch": epoch + 1, "config": cfg.to_dict(), "history": history,
                        "best_metric": best_metric, "best_epoch": best_epoch, "metric_name": metric_name,
                        "classes": classes, "num_classes": num_classes, "model_name": model_name, "lr": lr,
                        "fec_core_version": _version()}
                # order matters: latest.pt first (a kill before best.pt is repaired on resume, see
                # _repair_best), the log last (rewritten whole from the checkpoint's history on resume)
                try:
                    _atomic_save(ckpt, latest)
                    if improved:
                        _atomic_save(ckpt, best)
                    _atomic_write_text("".join(json.dumps(h) + "\n" for h in history), metrics_path)
                except SaveError as e:
                    failure = e
            if not _all_ok(failure is None, d, device):
                raise failure if failure is not None else SaveError(f"rank 0 could not save epoch {epoch + 1}")
        if progress and d.main and best_metric is not None:
            _print0(f"best val {metric_name} {best_metric:.4f} (epoch {best_epoch})"
                    + (f"; run folder: {out}" if out else ""))
        return FitResult(model=model, history=history, best_metric=best_metric, best_epoch=best_epoch,
                         metric_name=metric_name, config=cfg, classes=classes,
                         ema_model=ema.module if ema is not None else None, lr=lr, output_dir=out,
                         latest_path=latest, best_path=best, metrics_path=metrics_path)
    finally:
        torch.set_num_threads(threads_before)
        if d.owned and dist.is_initialized():
            dist.destroy_process_group()


def _all_ok(ok: bool, d: _Dist, device: torch.device) -> bool:
    """Whether every process is ``ok`` (rank 0's file work failing must stop all ranks, not hang them)."""
    if not d.enabled:
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    dist.all_reduce(flag)
    return flag.item() == 0


_SCHEDULE_FIELDS = ("epochs", "warmup_epochs", "cooldown_epochs", "lr", "lr_base", "min_lr", "warmup_lr", "sched",
                    "batch_size")


def _restore_schedule(scheduler, resume: Dict[str, Any], cfg: TrainConfig, start_epoch: int, step: int,
                      total_epochs: int) -> None:
    """Continue the saved learning-rate schedule, or re-plan it when the user changed it.

    timm's scheduler state is its plan (``t_initial``, ``warmup_t``, base rates, ...). When it
    equals the plan built from ``cfg`` the run continues exactly. Otherwise (``--resume RUN
    --epochs 40`` on a 20-epoch run, another ``--lr``, ...) the new plan is kept, as if the
    run had been started with it, continuing at update ``step``, and the log says so."""
    saved, fresh = resume["scheduler"], scheduler.state_dict()
    if saved == fresh:
        scheduler.load_state_dict(saved)
        return
    old = resume.get("config", {})
    changes = [f"{k} {old.get(k)!r} -> {getattr(cfg, k)!r}" for k in _SCHEDULE_FIELDS
               if k in old and old.get(k) != getattr(cfg, k)]
    why = ", ".join(changes) or "the number of steps per epoch changed"
    scheduler.step_update(num_updates=step)
    lr = max(g["lr"] for g in scheduler.optimizer.param_groups)
    if start_epoch < total_epochs:
        _print0(f"note: the learning-rate schedule is re-planned ({why}): training continues at epoch "
                f"{start_epoch + 1} of {total_epochs} with lr {lr:.3g}, as if the run had started with these "
                f"settings")


def _current_lr(optimizer) -> float:
    return max(g["lr"] for g in optimizer.param_groups)


def _version() -> str:
    from . import __version__

    return __version__


# ----------------------------------------------------------------------------- curves
def read_history(source) -> List[Dict[str, float]]:
    """History as a list of dicts from a :class:`FitResult`, a list, a ``metrics.jsonl`` file,
    a run folder or a checkpoint."""
    if isinstance(source, FitResult):
        return source.history
    if isinstance(source, (list, tuple)):
        return list(source)
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no metrics log at {path}")
    if path.endswith(".pt"):
        return list(_read_training_checkpoint(path)["history"])
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_history(source, metric: Optional[str] = None, axes=None, title: Optional[str] = None):
    """Plot training curves: loss (train and validation), the validation metric (and EMA's)
    and the learning rate, per epoch. ``source``: see :func:`read_history`. ``metric``: the
    history key suffix to plot (default: the first ``val_*`` key other than the loss).
    Returns the matplotlib Figure."""
    import matplotlib.pyplot as plt

    hist = read_history(source)
    if not hist:
        raise ValueError("the history is empty: nothing to plot")
    if metric is None:
        keys = [k[4:] for k in hist[0] if k.startswith("val_") and k != "val_loss"]
        metric = keys[0] if keys else None
    if axes is None:
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    else:
        fig = axes[0].figure
    ep = [h["epoch"] for h in hist]
    ax = axes[0]
    ax.plot(ep, [h["train_loss"] for h in hist], "o-", ms=3, label="train")
    ax.plot(ep, [h["val_loss"] for h in hist], "o-", ms=3, label="validation")
    ax.set(xlabel="epoch", ylabel="loss", title="loss")
    ax.legend()
    ax = axes[1]
    if metric is not None:
        ax.plot(ep, [h[f"val_{metric}"] for h in hist], "o-", ms=3, color="C2", label="model")
        if f"ema_val_{metric}" in hist[0]:
            ax.plot(ep, [h[f"ema_val_{metric}"] for h in hist], "o-", ms=3, color="C3", label="EMA")
            ax.legend()
        ax.set(xlabel="epoch", ylabel=metric, title=f"validation {metric}")
    ax = axes[2]
    ax.plot(ep, [h["lr"] for h in hist], "o-", ms=3, color="C4")
    ax.set(xlabel="epoch", ylabel="at the end of the epoch", title="learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- command line
def _parser() -> argparse.ArgumentParser:
    S = argparse.SUPPRESS
    p = argparse.ArgumentParser(
        prog="python -m fec_core.train",
        description="Train FEC. Defaults: the paper's ImageNet recipe for --data-dir, small CPU recipes for the "
                    "offline datasets (--dataset digits / shapes). Under torchrun, one process per GPU (DDP).",
        epilog="examples:\n  python -m fec_core.train --dataset digits\n"
               "  torchrun --nproc_per_node=8 -m fec_core.train --data-dir /data/imagenet --model fec_small\n"
               "  python -m fec_core.train --resume runs/<run>          # continue\n"
               "  python -m fec_core.train --evaluate --resume runs/<run>/best.pt",
        formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=S)
    a = p.add_argument
    a("--dataset", choices=sorted(PRESETS), help="digits, shapes (offline) or imagefolder (default with --data-dir)")
    a("--data-dir", dest="data_dir", help="ImageNet-layout folder with train/<class>/* and val/<class>/*")
    a("--model", help="timm model name (fec_tiny, fec_small, fec_base, fec_large)")
    a("--img-size", dest="img_size", type=int)
    a("--num-classes", dest="num_classes", type=int)
    a("--epochs", type=int, help="with --resume: another number re-plans the learning-rate schedule (said in the log)")
    a("-b", "--batch-size", dest="batch_size", type=int, help="per process")
    a("--lr", type=float, help="peak lr (default: lr-base x global batch / 1024)")
    a("--lr-base", dest="lr_base", type=float, help="lr per 1024 images (paper: 1e-3)")
    a("--min-lr", dest="min_lr", type=float)
    a("--warmup-lr", dest="warmup_lr", type=float)
    a("--warmup-epochs", dest="warmup_epochs", type=int)
    a("--cooldown-epochs", dest="cooldown_epochs", type=int)
    a("--weight-decay", dest="weight_decay", type=float)
    a("--opt", help="timm optimizer name (adamw)")
    a("--sched", help="timm scheduler name (cosine)")
    a("--clip-grad", dest="clip_grad", type=float)
    a("--smoothing", type=float)
    a("--mixup", type=float)
    a("--cutmix", type=float)
    a("--drop-path", dest="drop_path", type=float)
    a("--aa", dest="auto_augment", help="RandAugment policy for image folders, 'none' to disable")
    a("--reprob", dest="re_prob", type=float, help="random erasing probability (image folders)")
    a("--no-aug", dest="augment", action="store_false", help="no training augmentation")
    a("--workers", type=int)
    a("--val-fraction", dest="val_fraction", type=float, help="digits: held-out share")
    a("--train-samples", dest="train_samples", type=int, help="shapes")
    a("--val-samples", dest="val_samples", type=int, help="shapes")
    a("--ema", action="store_true", help="keep an EMA of the weights (best.pt is chosen by EMA's metric)")
    a("--ema-decay", dest="ema_decay", type=float)
    a("--amp", choices=("auto", "bf16", "fp16", "off"))
    a("--pretrained", help="official checkpoint to start from (new head for another number of classes)")
    a("--resume", help="checkpoint file or run folder to continue (its config is reused)")
    a("--output-dir", dest="output_dir", help="default: runs/<dataset>-<model>-<time>")
    a("--seed", type=int)
    a("--device", help="auto, cpu, cuda, cuda:1")
    a("--threads", type=int, help="CPU threads for PyTorch (0: PyTorch's choice; digits/shapes presets: 1)")
    a("--find-unused-parameters", dest="find_unused_parameters", action="store_true")
    a("--evaluate", action="store_true", help="only evaluate (weights from --resume or --pretrained)")
    a("--no-progress", dest="progress", action="store_false")
    return p


def _config_from_args(args: Dict[str, Any]) -> TrainConfig:
    args = dict(args)
    args.pop("evaluate", None)
    args.pop("progress", None)
    if args.get("resume") and "dataset" not in args:
        args.setdefault("output_dir", None)  # None: the checkpoint's folder, wherever it was moved
        cfg = TrainConfig.from_checkpoint(args["resume"], **args)
    else:
        if "dataset" not in args:
            if not args.get("data_dir"):
                raise ValueError("choose a dataset: --dataset digits (or shapes) trains offline in minutes; "
                                 "--data-dir /path/to/imagenet trains with the paper's recipe")
            args["dataset"] = "imagefolder"
        cfg = TrainConfig(**args)
    return cfg


def _run_folder(cfg: Optional[TrainConfig]) -> Optional[str]:
    if cfg is None:
        return None
    if cfg.output_dir:
        return cfg.output_dir
    if cfg.resume:
        return cfg.resume if os.path.isdir(cfg.resume) else os.path.dirname(cfg.resume) or "."
    return None


def _resume_hint(cfg: Optional[TrainConfig]) -> str:
    out = _run_folder(cfg)
    if out and os.path.isfile(os.path.join(out, "latest.pt")):
        return (f"the last completed epoch is saved in {os.path.join(out, 'latest.pt')}; continue with: "
                f"python -m fec_core.train --resume {out}")
    return "no epoch had completed, so nothing was saved"


def _print_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m fec_core.train`` (and ``fec-train``).

    Exit codes: 0 done, 2 a clear error (bad value, missing file, failed save, diverged
    training, out of memory; one line, no traceback), 130 interrupted (Ctrl-C; the line says
    how to resume)."""
    p = _parser()
    ns = vars(p.parse_args(argv))
    evaluate_only, progress = ns.get("evaluate", False), ns.get("progress", True)
    with warnings.catch_warnings():
        warnings.showwarning = _print_warning
        return _main(ns, evaluate_only, progress)


def _main(ns: Dict[str, Any], evaluate_only: bool, progress: bool) -> int:
    from .checkpoint import CheckpointError

    cfg = None
    try:
        cfg = _config_from_args(ns)
        if evaluate_only:
            return _evaluate_cli(cfg, progress)
        if cfg.output_dir is None and cfg.resume is None:
            cfg.output_dir = os.path.join("runs", f"{cfg.dataset}-{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}")
        result = fit(cfg, progress=progress)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {_resume_hint(cfg)}", file=sys.stderr)
        return 130
    except (FloatingPointError, SaveError, torch.OutOfMemoryError) as e:
        advice = "; lower --batch-size" if isinstance(e, torch.OutOfMemoryError) else ""
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {first}{advice}\n{_resume_hint(cfg)}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, FileExistsError, CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result.output_dir and (not dist.is_initialized()) and int(os.environ.get("RANK", "0")) == 0:
        try:
            import matplotlib
            matplotlib.use("Agg")
            fig = plot_history(result, title=os.path.basename(os.path.normpath(result.output_dir)))
            fig.savefig(os.path.join(result.output_dir, "curves.png"), dpi=100)
            curves = ", curves.png"
        except Exception as e:  # a plot is a bonus; the run itself succeeded
            curves = f" (no curves.png: {e})"
        last = result.history[-1] if result.history else {}
        print(f"final: " + ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k != "epoch"))
        print(f"saved in {result.output_dir}: latest.pt, best.pt (epoch {result.best_epoch}), metrics.jsonl, "
              f"config.json{curves}")
    return 0


def _evaluate_cli(cfg: TrainConfig, progress: bool) -> int:
    from .checkpoint import CheckpointError

    d = _init_distributed(cfg.device)
    device = _resolve_device(cfg.device, d)
    _, val_set = build_datasets(cfg)
    classes = getattr(val_set, "classes", None)
    source = "random initial weights (no --resume or --pretrained given)"
    if cfg.resume:
        ckpt = _read_training_checkpoint(cfg.resume)
        model = build_model(dataclasses.replace(cfg, pretrained=None), ckpt.get("num_classes") or len(classes))
        state = ckpt["state_dict_ema"] if cfg.ema and ckpt.get("state_dict_ema") is not None else ckpt["model"]
        _load_model_state(model, state, ckpt["path"], f"{ckpt.get('model_name') or ckpt['config'].get('model')}")
        source = ckpt["path"] + (" (EMA weights)" if state is ckpt.get("state_dict_ema") else "")
    else:
        model = build_model(cfg, cfg.num_classes or len(classes))
        if cfg.pretrained:
            source = cfg.pretrained
    if classes and getattr(model, "num_classes", len(classes)) != len(classes):
        raise CheckpointError(f"the weights have {model.num_classes} classes but the dataset has {len(classes)}")
    model.to(device)
    loader = torch.utils.data.DataLoader(val_set, batch_size=cfg.batch_size,
                                         sampler=_Shard(len(val_set), d.rank, d.world), num_workers=cfg.workers)
    res = evaluate(model, loader, device=device, amp_dtype=_amp_dtype(cfg.amp, device), progress=progress and d.main)
    if d.main:
        print(f"evaluated {source} on {len(val_set)} validation images")
        print(json.dumps({k: round(v, 6) for k, v in res.items()}))
    if d.owned:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
