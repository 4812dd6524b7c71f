"""Training settings (chapter 10): the official training script's ImageNet settings
(:data:`OFFICIAL_IMAGENET_RECIPE`), the small offline presets, and :class:`TrainConfig` with
its checks (a ``ValueError`` naming the field, its value and what it accepts; a warning for
settings that are almost surely mistakes)."""
from __future__ import annotations

import dataclasses
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch

from .runfiles import read_training_checkpoint

__all__ = ["OFFICIAL_IMAGENET_RECIPE", "PRESETS", "BUILTIN_DATASETS", "TrainConfig"]

#: The official training script's ImageNet-1k settings (``dataset='imagefolder'``): the
#: defaults of the official ``train.py`` with the options of its ``cmds/train.sh``, without
#: the 10 cool-down epochs (``cooldown_epochs=0``: 300 epochs, not 310) and with EMA off, as
#: in the script (the supplement mentions EMA; ``ema=True`` adds it). ``batch_size`` is per
#: process: 8 x 128 = the official global batch of 1,024 (``cmds/train.sh``: 4 GPUs x 256).
#: The peak lr is ``lr_base * global batch / 1024`` (the script takes ``--lr 1e-3`` as given;
#: the same at 1,024). What differs beyond the settings (bf16 autocast, the schedule stepped
#: per update, not per epoch): chapter 10.
OFFICIAL_IMAGENET_RECIPE: Dict[str, Any] = dict(
    model="fec_small", img_size=224, epochs=300, batch_size=128, lr_base=1e-3, min_lr=1e-6, warmup_lr=1e-6,
    warmup_epochs=5, cooldown_epochs=0, weight_decay=0.05, smoothing=0.1, mixup=0.8, cutmix=1.0, drop_path=0.1,
    auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, augment=True, workers=8)

#: Presets per dataset: the fields a :class:`TrainConfig` leaves at ``None`` come from here.
PRESETS: Dict[str, Dict[str, Any]] = {
    "imagefolder": {**OFFICIAL_IMAGENET_RECIPE, "threads": 0},
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


def _option(default: Any, help: str, *, preset: bool = False, flags: Tuple[str, ...] = (),
            choices: Optional[Tuple[str, ...]] = None):
    """A :class:`TrainConfig` field and its command-line option (:mod:`fec_core.train.cli` builds
    the parser from these): ``help`` documents both; ``preset``: ``None`` by default, filled from
    :data:`PRESETS`; ``flags``: the option's names where they are not ``--field-name`` (timm's
    ``train.py`` spellings such as ``--aa``, or ``--no-...`` for a switch that is on by default);
    ``choices``: the values it accepts."""
    return dataclasses.field(default=default, metadata=dict(help=help, preset=preset, flags=flags, choices=choices))


@dataclass
class TrainConfig:
    """Everything a training run needs; saved in every checkpoint.

    Fields marked *preset* default to ``None`` and are filled from :data:`PRESETS` for
    ``dataset`` when the config is made (explicit values win). Each field's help is its
    metadata (``dataclasses.fields(TrainConfig)``), the same text as the help of its option in
    ``python -m fec_core.train --help``. The groups:

    * data: ``dataset``, ``data_dir``, ``img_size``, ``num_classes``, ``val_fraction``,
      ``train_samples``, ``val_samples``, ``shapes_target``, ``workers``;
    * model: ``model``, ``drop_path``, ``pretrained``, ``freeze_similarity`` (freeze the
      pooling layers' ``conv_f``, see :mod:`fec_core.train`);
    * optimization: ``epochs``, ``batch_size`` (per process), ``lr``, ``lr_base``, ``min_lr``,
      ``warmup_lr``, ``warmup_epochs``, ``cooldown_epochs``, ``weight_decay``, ``opt``,
      ``sched``, ``clip_grad``;
    * regularization: ``smoothing``, ``mixup``, ``cutmix``, ``auto_augment``, ``re_prob``,
      ``augment``;
    * extras: ``ema``, ``ema_decay``, ``amp``;
    * bookkeeping: ``output_dir``, ``resume``, ``seed``, ``device``, ``threads``,
      ``find_unused_parameters``, ``log_interval``.
    """

    dataset: str = _option("imagefolder", "'imagefolder' (the ImageNet layout under data_dir: train/<class>/* and "
                                          "val/<class>/*; the default with --data-dir), or the offline 'digits' or "
                                          "'shapes'", choices=tuple(sorted(PRESETS)))
    data_dir: Optional[str] = _option(None, "the folder holding train/<class>/* and val/<class>/* (imagefolder)")
    model: Optional[str] = _option(None, "timm model name (fec_tiny, fec_small, fec_base, fec_large)", preset=True)
    img_size: Optional[int] = _option(None, "input side in pixels", preset=True)
    num_classes: Optional[int] = _option(None, "classifier size (default: the dataset's number of classes)")
    epochs: Optional[int] = _option(None, "epochs to train; with --resume another number re-plans the learning-rate "
                                          "schedule (said in the log)", preset=True)
    batch_size: Optional[int] = _option(None, "batch size per process", preset=True, flags=("-b", "--batch-size"))
    lr: Optional[float] = _option(None, "peak learning rate (default: lr_base x global batch / 1024)")
    lr_base: Optional[float] = _option(None, "learning rate per 1,024 images (the official script: 1e-3)", preset=True)
    min_lr: Optional[float] = _option(None, "learning rate at the end of the cosine schedule", preset=True)
    warmup_lr: Optional[float] = _option(None, "learning rate at the start of the warm-up", preset=True)
    warmup_epochs: Optional[int] = _option(None, "epochs of linear warm-up", preset=True)
    cooldown_epochs: Optional[int] = _option(None, "epochs at min_lr after the schedule (the official script: 10)",
                                             preset=True)
    weight_decay: Optional[float] = _option(None, "AdamW's weight decay (none on 1-D parameters)", preset=True)
    opt: str = _option("adamw", "timm optimizer name")
    sched: str = _option("cosine", "timm scheduler name")
    clip_grad: Optional[float] = _option(None, "maximum gradient norm (default: no clipping)")
    smoothing: Optional[float] = _option(None, "label smoothing", preset=True)
    mixup: Optional[float] = _option(None, "Mixup alpha (0: off)", preset=True)
    cutmix: Optional[float] = _option(None, "CutMix alpha (0: off)", preset=True)
    drop_path: Optional[float] = _option(None, "drop-path rate of the last block (linear in depth)", preset=True)
    auto_augment: Optional[str] = _option(None, "RandAugment policy for image folders ('' or 'none': off)",
                                          preset=True, flags=("--aa",))
    re_prob: Optional[float] = _option(None, "random erasing probability (image folders)", preset=True,
                                       flags=("--reprob",))
    augment: Optional[bool] = _option(None, "training augmentation (--no-aug: none at all)", preset=True,
                                      flags=("--no-aug",))
    workers: Optional[int] = _option(None, "DataLoader worker processes", preset=True)
    val_fraction: float = _option(0.25, "digits: the held-out share (stratified)")
    train_samples: int = _option(2000, "shapes: training images")
    val_samples: int = _option(500, "shapes: validation images")
    shapes_target: str = _option("label", "shapes: 'label' (one class per image) or 'mask' (a class per pixel)",
                                 choices=("label", "mask"))
    ema: bool = _option(False, "keep an EMA of the weights (timm.utils.ModelEmaV3; best.pt is chosen by its metric)")
    ema_decay: float = _option(0.9998, "EMA decay per update")
    amp: str = _option("auto", "mixed precision: 'auto' (bf16 on GPUs that support it, else fp16 with a loss scaler; "
                               "none on a CPU), 'bf16', 'fp16' or 'off'", choices=("auto", "bf16", "fp16", "off"))
    pretrained: Optional[str] = _option(None, "an official (or fec_core) checkpoint to start from; the head is "
                                              "replaced when the number of classes differs")
    freeze_similarity: bool = _option(True, "freeze the pooling layers' conv_f, which only feeds an argmax "
                                            "(--no-freeze-similarity: leave it to the optimizer, which skips it)",
                                      flags=("--no-freeze-similarity",))
    output_dir: Optional[str] = _option(None, "the run folder (None: save nothing; the command line's default: "
                                              "runs/<dataset>-<model>-<time>)")
    resume: Optional[str] = _option(None, "a checkpoint file or run folder to continue (its config is reused)")
    seed: int = _option(0, "seed of the model, the data order and the augmentations")
    device: str = _option("auto", "'auto', 'cpu', 'cuda' or 'cuda:<index>'")
    threads: Optional[int] = _option(None, "CPU threads for PyTorch during the run, restored afterwards (0: "
                                           "PyTorch's choice; the small presets use 1: their tiny convolutions gain "
                                           "little from more, a busy machine loses a lot, and one thread gives the "
                                           "same numbers from run to run)", preset=True)
    find_unused_parameters: bool = _option(False, "DDP: for custom models with parameters that get no gradient")
    log_interval: int = _option(20, "steps between updates of the progress bar's loss")

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
        _check_fields(self)

    @classmethod
    def from_checkpoint(cls, path: str, **overrides) -> "TrainConfig":
        """The config a checkpoint (file or run folder) was trained with, updated by ``overrides``."""
        ckpt = read_training_checkpoint(path)
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


def _check_fields(cfg: "TrainConfig") -> None:
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
    for f in dataclasses.fields(cfg):
        allowed = f.metadata["choices"]
        if allowed and getattr(cfg, f.name) not in allowed:
            raise ValueError(f"{f.name} must be one of {', '.join(map(repr, allowed))}, got {getattr(cfg, f.name)!r}")
    if cfg.device != "auto":
        try:
            torch.device(cfg.device)
        except (RuntimeError, TypeError, ValueError):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:<index>', got {cfg.device!r}") from None
    cpus = os.cpu_count() or 1
    if cfg.workers > 4 * cpus:
        warnings.warn(f"workers {cfg.workers} is far more than this machine's {cpus} CPUs: each is a process "
                      f"holding a copy of the dataset object", stacklevel=3)
    if cfg.warmup_epochs >= cfg.epochs > 1:
        warnings.warn(f"warmup_epochs ({cfg.warmup_epochs}) >= epochs ({cfg.epochs}): the whole run is warm-up "
                      f"and the learning rate never reaches its peak", stacklevel=3)
