"""The training loop (chapter 10): :func:`fit`, and :func:`evaluate_config` (``--evaluate``).

A run is built by one function, :func:`prepare`, which both use: the datasets, checked
(:class:`RunData`), the model, the loss, Mixup/CutMix and the metric (:class:`Objective`)
and the loaders (:class:`Loaders`). :func:`fit` then builds the optimizer, schedule, loss
scaler and EMA (:class:`Optimization`: timm's factories; ``timm.utils.NativeScaler`` for
fp16, the only precision that needs one, as timm's ``train.py`` does), resumes and opens the
run folder (:mod:`~fec_core.train.runfiles`), and per epoch trains, validates and saves. Each
step is a function that takes what it needs and returns what it builds.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, NativeScaler, dispatch_clip_grad, is_primary
from tqdm.auto import tqdm

from .build import build_datasets, build_model, freeze_similarity, infer_num_classes, load_pretrained
from .config import BUILTIN_DATASETS, TrainConfig
from .distributed import Dist, Shard, amp_dtype_for, epoch_seed, init_distributed, print0, seed_all, sum_over_processes
from .evaluation import FitResult, evaluate, output_classes
from .metrics import IGNORE_INDEX, Accuracy, MeanIoU, Metric, as_metric, is_per_pixel
from .runfiles import (Progress, RunFolder, checkpoint_bytes, load_model_state, open_run_folder,
                       read_training_checkpoint, resume_training, save_epoch, stop_on_signals, training_checkpoint,
                       write_final_weights)

__all__ = ["fit", "evaluate_config", "prepare", "RunData", "Objective", "Loaders", "Prepared", "Optimization"]


@dataclass
class RunData:
    """The datasets of a run, checked: ``classes`` (``None`` when the dataset names none) and
    whether the targets are per-pixel class maps (segmentation)."""

    train_set: Any
    val_set: Any
    classes: Optional[Tuple[str, ...]]
    per_pixel: bool


@dataclass
class Objective:
    """What training minimizes and what picks the best epoch: the training loss (on Mixup/CutMix
    targets when ``mixup`` is set), the validation loss and the metric."""

    train_loss: Callable
    val_loss: Callable
    mixup: Optional[Mixup]
    metric: Metric


@dataclass
class Loaders:
    """Training batches shuffled per epoch (``sampler``) and the validation shard of this process."""

    sampler: torch.utils.data.DistributedSampler
    train: torch.utils.data.DataLoader
    val: torch.utils.data.DataLoader

    @property
    def steps(self) -> int:
        return len(self.train)


@dataclass
class Prepared:
    """What :func:`prepare` builds for a config."""

    data: RunData
    model: nn.Module
    num_classes: Optional[int]
    model_name: str
    objective: Objective
    loaders: Loaders


@dataclass
class Optimization:
    """How the weights move: optimizer, per-update schedule over ``total_epochs`` (warm-up and
    cool-down included), peak ``lr`` for the ``global_batch``, autocast dtype, the fp16 loss
    scaler (``None`` otherwise) and the EMA (``None`` without ``cfg.ema``)."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    total_epochs: int
    lr: float
    global_batch: int
    amp_dtype: Optional[torch.dtype]
    scaler: Optional[NativeScaler]
    ema: Optional[ModelEmaV3]


@stop_on_signals()
def fit(cfg: TrainConfig, model: Optional[nn.Module] = None, train_set=None, val_set=None,
        loss_fn: Optional[Callable] = None, metric=None, progress: bool = True) -> FitResult:
    """Train with ``cfg`` (chapter 10); see :mod:`fec_core.train` for the recipe and the files.

    ``model``: ``None`` builds ``cfg.model`` (:func:`build_model`); any ``nn.Module`` works.
    ``train_set`` / ``val_set``: ``None`` builds ``cfg.dataset`` (:func:`build_datasets`); else
    torch Datasets yielding ``(image [3, H, W], target)`` with ``target`` a class index or a
    per-pixel class map ``[H, W]``. ``loss_fn(output, target)``: ``None`` gives the recipe's
    loss (SoftTargetCrossEntropy with Mixup/CutMix, LabelSmoothingCrossEntropy, or
    cross-entropy; ``ignore_index=255`` for per-pixel targets); a custom loss receives the
    raw targets, is used for validation too, and switches Mixup/CutMix off. ``metric``: a
    :class:`Metric`, a function ``(output, target) -> float``, or ``None`` (:class:`Accuracy`,
    or :class:`MeanIoU` for per-pixel targets). ``progress``: tqdm bars and a line per epoch.

    Runs under ``torchrun`` unchanged (DDP; rank 0 writes the files). Ctrl-C raises
    ``KeyboardInterrupt`` and SIGTERM :class:`~fec_core.train.runfiles.Terminated` (on every
    rank), after the file being written is complete: the epoch in progress is all that is lost.
    Returns a :class:`FitResult`.
    """
    with _processes(cfg) as d:
        resume = read_training_checkpoint(cfg.resume) if cfg.resume else None
        run = prepare(cfg, d, model, train_set, val_set, loss_fn, metric)
        opt = build_optimization(cfg, run.model, d, run.loaders.steps)
        if resume is None:
            state = Progress()
        else:
            state = resume_training(resume, run.model, opt.optimizer, opt.scheduler, opt.scaler, opt.ema, cfg,
                                    run.loaders.steps, opt.total_epochs)
        folder = open_run_folder(cfg.output_dir, resume, cfg.to_dict(), state.history,
                                 checkpoint_bytes(run.model, opt.ema is not None), d)
        net = _wrap_ddp(run.model, cfg, d)
        if is_primary(d) and progress:
            _print_plan(run, opt, d)
        for epoch in range(state.start_epoch, opt.total_epochs):
            _run_epoch(cfg, d, run, opt, net, state, folder, epoch, progress)
        write_final_weights(folder, d)
        if progress and is_primary(d) and state.best_metric is not None:
            print0(f"best val {run.objective.metric.name} {state.best_metric:.4f} (epoch {state.best_epoch})"
                   + (f"; run folder: {folder.path}" if folder else ""))
        return FitResult(model=run.model, history=state.history, best_metric=state.best_metric,
                         best_epoch=state.best_epoch, metric_name=run.objective.metric.name, config=cfg,
                         classes=run.data.classes, ema_model=opt.ema.module if opt.ema is not None else None,
                         lr=opt.lr, output_dir=folder.path if folder else None,
                         latest_path=folder.latest if folder else None, best_path=folder.best if folder else None,
                         metrics_path=folder.metrics if folder else None)


def evaluate_config(cfg: TrainConfig, progress: bool = True) -> Tuple[Dict[str, float], str, int]:
    """Evaluate the weights ``cfg`` names on its validation set, as :func:`fit` validates
    (``python -m fec_core.train --evaluate``): the training checkpoint ``cfg.resume`` (its EMA
    weights with ``cfg.ema``), else ``cfg.pretrained``, else random initial weights. Returns
    ``(metrics, where the weights came from, number of validation images)``."""
    ckpt = read_training_checkpoint(cfg.resume) if cfg.resume else None
    if ckpt is not None:
        cfg = dataclasses.replace(cfg, pretrained=None, num_classes=ckpt.get("num_classes") or cfg.num_classes)
    with _processes(cfg) as d:
        run = prepare(cfg, d)
        source = cfg.pretrained or "random initial weights (no --resume or --pretrained given)"
        if ckpt is not None:
            ema = cfg.ema and ckpt.get("state_dict_ema") is not None
            state = ckpt["state_dict_ema"] if ema else ckpt["model"]
            load_model_state(run.model, state, ckpt["path"], f"{ckpt.get('model_name') or ckpt['config'].get('model')}")
            source = ckpt["path"] + (" (EMA weights)" if ema else "")
        res = evaluate(run.model, run.loaders.val, loss_fn=run.objective.val_loss, metric=run.objective.metric,
                       device=d.device, amp_dtype=amp_dtype_for(cfg.amp, d.device), progress=progress and is_primary(d))
        return res, source, len(run.data.val_set)


@contextlib.contextmanager
def _processes(cfg: TrainConfig) -> Iterator[Dist]:
    """This process's :class:`Dist` for the length of a run, with ``cfg.threads`` CPU threads;
    afterwards the thread count is restored and a process group created here is destroyed."""
    d = init_distributed(cfg.device)
    threads_before = torch.get_num_threads()
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        yield d
    finally:
        torch.set_num_threads(threads_before)
        if d.owned and dist.is_initialized():
            dist.destroy_process_group()


def prepare(cfg: TrainConfig, d: Dist, model: Optional[nn.Module] = None, train_set=None, val_set=None,
            loss_fn: Optional[Callable] = None, metric=None) -> Prepared:
    """The datasets (``cfg.dataset`` where not given), the model on ``d.device`` (``cfg.model``
    where not given), the objective and the loaders of a run: what :func:`fit` trains and
    :func:`evaluate_config` evaluates. Everything is checked before anything is written."""
    data = build_data(cfg, d, train_set, val_set)
    model, num_classes, model_name = build_network(cfg, data, d, model)
    objective = build_objective(cfg, data, model, num_classes, d, loss_fn, metric)
    return Prepared(data, model, num_classes, model_name, objective, build_loaders(cfg, data, d))


def build_data(cfg: TrainConfig, d: Dist, train_set=None, val_set=None) -> RunData:
    """The datasets, checked before anything is built or written."""
    if train_set is None or val_set is None:
        built_train, built_val = build_datasets(cfg)
        train_set = built_train if train_set is None else train_set
        val_set = built_val if val_set is None else val_set
    if len(train_set) == 0 or len(val_set) == 0:
        raise ValueError(f"empty dataset: {len(train_set)} training and {len(val_set)} validation samples")
    classes = tuple(getattr(train_set, "classes", ()) or ()) or None
    per_pixel = is_per_pixel(train_set[0][1])
    if classes is not None and len(classes) == 1 and not per_pixel:
        warnings.warn(f"the training data has a single class ({classes[0]!r}): every prediction is right, the "
                      f"loss goes to 0 and the accuracy is 1.0 whatever the model learns; an image folder "
                      f"needs one subfolder per class", stacklevel=4)
    per_rank = len(train_set) // d.world
    if cfg.batch_size > per_rank:
        where = f" per process ({d.world} processes)" if d.enabled else ""
        raise ValueError(f"batch size {cfg.batch_size} is larger than the training set: {len(train_set)} samples"
                         f"{where}; use --batch-size {max(1, per_rank // 2)} or less")
    return RunData(train_set, val_set, classes, per_pixel)


def build_network(cfg: TrainConfig, data: RunData, d: Dist,
                  model: Optional[nn.Module] = None) -> Tuple[nn.Module, Optional[int], str]:
    """``(model, number of classes, model name)``: ``model`` or ``cfg.model`` built with the same
    seed on every rank (identical initial weights), ``cfg.pretrained`` loaded, the pooling
    layers' ``conv_f`` frozen (``cfg.freeze_similarity``), on ``d.device``."""
    torch.manual_seed(cfg.seed)
    num_classes = infer_num_classes(cfg, data.train_set, model)
    model_name = cfg.model if model is None else type(model).__name__
    if model is None:
        if num_classes is None:
            raise ValueError("cannot tell the number of classes: give the dataset a .classes or set num_classes")
        model = build_model(cfg, num_classes)
    elif cfg.pretrained:
        load_pretrained(model, cfg.pretrained)
    model_classes = getattr(model, "num_classes", None)
    if not data.per_pixel and data.classes and model_classes and model_classes != len(data.classes):
        raise ValueError(f"the model has {model_classes} outputs but the dataset has {len(data.classes)} classes; "
                         f"call model.reset_classifier({len(data.classes)}) or set num_classes")
    if cfg.freeze_similarity:
        freeze_similarity(model)
    model.to(d.device)
    if d.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return model, num_classes, model_name


def build_objective(cfg: TrainConfig, data: RunData, model: nn.Module, num_classes: Optional[int], d: Dist,
                    loss_fn: Optional[Callable] = None, metric=None) -> Objective:
    """The recipe's losses (or ``loss_fn``), Mixup/CutMix, and the metric that picks best.pt."""
    mixup = None
    if loss_fn is not None:
        train_loss = val_loss = loss_fn
    elif data.per_pixel:
        train_loss = val_loss = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX, label_smoothing=0.0)
    elif (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.augment:
        if cfg.batch_size % 2:
            raise ValueError(f"Mixup/CutMix need an even batch size, got {cfg.batch_size}")
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing,
                      num_classes=num_classes)
        train_loss, val_loss = SoftTargetCrossEntropy(), nn.CrossEntropyLoss()
    elif cfg.smoothing > 0:
        train_loss, val_loss = LabelSmoothingCrossEntropy(cfg.smoothing), nn.CrossEntropyLoss()
    else:
        train_loss = val_loss = nn.CrossEntropyLoss()
    metric = as_metric(metric)
    if metric is None and data.per_pixel:
        x = data.train_set[0][0][None].to(d.device)
        metric = MeanIoU(num_classes or output_classes(model, x))
    elif metric is None:
        top5 = (num_classes or 0) >= 10 and cfg.dataset not in BUILTIN_DATASETS
        metric = Accuracy((1, 5) if top5 else (1,))
    return Objective(train_loss, val_loss, mixup, metric)


def build_loaders(cfg: TrainConfig, data: RunData, d: Dist) -> Loaders:
    """Training batches shuffled per epoch (DistributedSampler, also for one process);
    validation sharded without padding (:class:`~fec_core.train.distributed.Shard`) so every
    sample counts once."""
    pin = d.device.type == "cuda"
    sampler = torch.utils.data.DistributedSampler(data.train_set, num_replicas=d.world, rank=d.rank, shuffle=True,
                                                  seed=cfg.seed, drop_last=True)
    train = torch.utils.data.DataLoader(data.train_set, batch_size=cfg.batch_size, sampler=sampler,
                                        num_workers=cfg.workers, pin_memory=pin, drop_last=True,
                                        persistent_workers=False)
    val = torch.utils.data.DataLoader(data.val_set, batch_size=cfg.batch_size,
                                      sampler=Shard(len(data.val_set), d.rank, d.world), num_workers=cfg.workers,
                                      pin_memory=pin)
    return Loaders(sampler, train, val)


def build_optimization(cfg: TrainConfig, model: nn.Module, d: Dist, steps_per_epoch: int) -> Optimization:
    """Optimizer, per-update schedule, AMP, EMA (timm's factories)."""
    global_batch = cfg.batch_size * d.world
    lr = cfg.lr if cfg.lr is not None else cfg.lr_base * global_batch / 1024
    if lr >= 1.0:
        warnings.warn(f"peak learning rate {lr:.3g} is far above the usual 1e-4..1e-2 for AdamW: training is "
                      f"likely to diverge", stacklevel=3)
    if cfg.min_lr > lr:
        warnings.warn(f"min_lr ({cfg.min_lr:.3g}) is above the peak lr ({lr:.3g}): the schedule rises", stacklevel=3)
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay, filter_bias_and_bn=True)
    scheduler, total_epochs = create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr,
        min_lr=cfg.min_lr, cooldown_epochs=cfg.cooldown_epochs, step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    amp_dtype = amp_dtype_for(cfg.amp, d.device)
    scaler = NativeScaler() if amp_dtype == torch.float16 else None
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema else None
    return Optimization(optimizer, scheduler, total_epochs, lr, global_batch, amp_dtype, scaler, ema)


def _wrap_ddp(model: nn.Module, cfg: TrainConfig, d: Dist) -> nn.Module:
    """What the training step calls: ``model``, or its DDP wrapper under torchrun."""
    if not d.enabled:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                                               find_unused_parameters=cfg.find_unused_parameters)


def _print_plan(run: Prepared, opt: Optimization, d: Dist) -> None:
    n_params = sum(p.numel() for p in run.model.parameters())
    print0(f"training {run.model_name} ({n_params:,} parameters) on {len(run.data.train_set):,} images "
           f"({run.loaders.steps} steps/epoch, global batch {opt.global_batch}, peak lr {opt.lr:.3g}) on "
           f"{d.device}{f' x {d.world} processes' if d.enabled else ''}"
           f"{f', amp {opt.amp_dtype}' if opt.amp_dtype else ''}")


def _run_epoch(cfg: TrainConfig, d: Dist, run: Prepared, opt: Optimization, net: nn.Module, state: Progress,
               folder: Optional[RunFolder], epoch: int, progress: bool) -> None:
    """Train one epoch, validate, keep the best, save."""
    bar = tqdm(total=run.loaders.steps, desc=f"epoch {epoch + 1}/{opt.total_epochs}", leave=True,
               disable=not (progress and is_primary(d)), dynamic_ncols=True)
    t0 = time.perf_counter()
    train_loss, images = train_epoch(cfg, d, run, opt, net, epoch, bar)
    train_time = time.perf_counter() - t0
    entry = {"epoch": epoch + 1, "train_loss": train_loss,
             **validation_entries(run.model, opt.ema, run.loaders, run.objective, d.device, opt.amp_dtype)}
    entry.update({"lr": _current_lr(opt.optimizer), "images_per_s": images / train_time,
                  "epoch_time_s": time.perf_counter() - t0})
    name = run.objective.metric.name
    improved = state.record(entry, entry[f"ema_val_{name}" if opt.ema is not None else f"val_{name}"])
    bar.set_postfix({"train_loss": f"{entry['train_loss']:.4f}", "val_loss": f"{entry['val_loss']:.4f}",
                     f"val_{name}": f"{entry[f'val_{name}']:.4f}"}, refresh=True)
    bar.close()
    ckpt = training_checkpoint(run.model, opt.optimizer, opt.scheduler, opt.scaler, opt.ema, epoch + 1, cfg.to_dict(),
                               state, name, run.data.classes, run.num_classes, run.model_name, opt.lr)
    save_epoch(folder, ckpt, improved, d)


def train_epoch(cfg: TrainConfig, d: Dist, run: Prepared, opt: Optimization, net: nn.Module, epoch: int,
                bar) -> Tuple[float, float]:
    """One pass over the training data; returns (mean loss, images), summed over processes.
    Seeded per epoch and rank, so a resumed run draws the same batches and augmentations."""
    device, objective = d.device, run.objective
    seed_all(epoch_seed(cfg.seed, epoch, d.rank))
    run.loaders.sampler.set_epoch(epoch)
    net.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    step = epoch * run.loaders.steps
    autocast = torch.autocast(device.type, dtype=opt.amp_dtype) if opt.amp_dtype else contextlib.nullcontext()
    for i, (x, y) in enumerate(run.loaders.train):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if objective.mixup is not None:
            x, y = objective.mixup(x, y)
        with autocast:
            loss = objective.train_loss(net(x), y)
        opt.optimizer.zero_grad(set_to_none=True)
        _backward_and_step(loss, opt, run.model, cfg.clip_grad)
        step += 1
        opt.scheduler.step_update(num_updates=step)
        if opt.ema is not None:
            opt.ema.update(run.model, step=step)
        loss_sum += loss.detach().double() * len(x)
        count += len(x)
        if (i + 1) % cfg.log_interval == 0 or i + 1 == run.loaders.steps:
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(f"the loss is {value} at epoch {epoch + 1}, step {i + 1}: training "
                                         f"diverged; lower the learning rate (now {_current_lr(opt.optimizer):.3g})")
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{_current_lr(opt.optimizer):.2e}", refresh=False)
        bar.update(1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    sum_over_processes(loss_sum, count)
    return (loss_sum / count).item(), count.item()


def _backward_and_step(loss: torch.Tensor, opt: Optimization, model: nn.Module, clip: Optional[float]) -> None:
    """Backward, gradient clipping (``clip``: max norm), optimizer step; under fp16 through
    ``timm.utils.NativeScaler`` (scaled loss, unscaled before clipping)."""
    if opt.scaler is not None:
        opt.scaler(loss, opt.optimizer, clip_grad=clip or None, parameters=model.parameters())
        return
    loss.backward()
    if clip:
        dispatch_clip_grad(model.parameters(), clip)
    opt.optimizer.step()


def validation_entries(model: nn.Module, ema: Optional[ModelEmaV3], loaders: Loaders, objective: Objective,
                       device: torch.device, amp_dtype: Optional[torch.dtype]) -> Dict[str, float]:
    """The ``val_*`` (and, with an EMA, ``ema_val_*``) entries of an epoch's log line."""
    kw = dict(loss_fn=objective.val_loss, metric=objective.metric, device=device, amp_dtype=amp_dtype)
    objective.metric.reset()
    entry = {f"val_{k}": v for k, v in evaluate(model, loaders.val, **kw).items()}
    if ema is not None:
        objective.metric.reset()
        entry.update({f"ema_val_{k}": v for k, v in evaluate(ema.module, loaders.val, **kw).items()})
    return entry


def _current_lr(optimizer) -> float:
    return max(g["lr"] for g in optimizer.param_groups)
