"""The training loop (chapter 10): :func:`fit` and :func:`evaluate`.

:func:`fit` is a few steps, each a function below: check the data, build the model, the loss
and metric, the loaders, the optimizer and schedule (timm's factories), resume, open the run
folder, then per epoch train, validate and save. The state a run carries from step to step
is one :class:`_Run`. AMP uses ``torch.amp`` directly rather than ``timm.utils.NativeScaler``:
bf16 needs no scaler, and the scaler's state is saved and restored with the run.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from .build import build_datasets, build_model, freeze_similarity, infer_num_classes, load_pretrained
from .config import BUILTIN_DATASETS, TrainConfig
from .distributed import Dist, Shard, all_ok, amp_dtype_for, epoch_seed, init_distributed, print0, resolve_device, seed_all
from .evaluation import FitResult, evaluate, output_classes
from .metrics import IGNORE_INDEX, Accuracy, MeanIoU, Metric, as_metric, is_per_pixel
from .runfiles import (SAFETENSORS, SaveError, atomic_save, atomic_write_text, checkpoint_bytes, load_model_state,
                       prepare_output, read_training_checkpoint, repair_best, stop_on_signals, warn_if_little_space,
                       write_safetensors)

__all__ = ["fit"]


@dataclass
class _Run:
    """What one call of :func:`fit` builds and carries from epoch to epoch."""

    cfg: TrainConfig
    d: Dist
    device: torch.device
    train_set: Any = None
    val_set: Any = None
    classes: Optional[Tuple[str, ...]] = None
    per_pixel: bool = False  # per-pixel class maps as targets (segmentation)
    model: Optional[nn.Module] = None
    net: Optional[nn.Module] = None
    num_classes: Optional[int] = None
    model_name: str = ""
    train_loss: Optional[Callable] = None
    val_loss: Optional[Callable] = None
    mixup_fn: Optional[Callable] = None
    metric: Optional[Metric] = None
    sampler: Any = None
    train_loader: Any = None
    val_loader: Any = None
    steps_per_epoch: int = 0
    global_batch: int = 0
    lr: float = 0.0
    optimizer: Any = None
    scheduler: Any = None
    total_epochs: int = 0
    amp_dtype: Optional[torch.dtype] = None
    scaler: Any = None
    ema: Any = None
    start_epoch: int = 0
    history: List[Dict[str, float]] = field(default_factory=list)
    best_metric: Optional[float] = None
    best_epoch: Optional[int] = None
    folder: Optional[str] = None  # the run folder (cfg.output_dir, or the resumed run's)
    latest: Optional[str] = None
    best: Optional[str] = None
    metrics_path: Optional[str] = None


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
    d = init_distributed(cfg.device)
    threads_before = torch.get_num_threads()
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        run = _Run(cfg, d, resolve_device(cfg.device, d))
        resume = read_training_checkpoint(cfg.resume) if cfg.resume else None
        _setup_data(run, train_set, val_set)
        _setup_model(run, model)
        _setup_loss_and_metric(run, loss_fn, metric)
        _setup_loaders(run)
        _setup_optimization(run)
        if resume is not None:
            _resume(run, resume)
        _open_run_folder(run, resume)
        _wrap_ddp(run)
        if d.main and progress:
            _print_plan(run)
        for epoch in range(run.start_epoch, run.total_epochs):
            _run_epoch(run, epoch, progress)
        _save_safetensors(run)
        if progress and d.main and run.best_metric is not None:
            print0(f"best val {run.metric.name} {run.best_metric:.4f} (epoch {run.best_epoch})"
                   + (f"; run folder: {run.folder}" if run.folder else ""))
        return FitResult(model=run.model, history=run.history, best_metric=run.best_metric,
                         best_epoch=run.best_epoch, metric_name=run.metric.name, config=cfg, classes=run.classes,
                         ema_model=run.ema.module if run.ema is not None else None, lr=run.lr, output_dir=run.folder,
                         latest_path=run.latest, best_path=run.best, metrics_path=run.metrics_path)
    finally:
        torch.set_num_threads(threads_before)
        if d.owned and dist.is_initialized():
            dist.destroy_process_group()


def _setup_data(run: _Run, train_set, val_set) -> None:
    """The datasets, checked before anything is built or written."""
    cfg, d = run.cfg, run.d
    if train_set is None or val_set is None:
        built_train, built_val = build_datasets(cfg)
        train_set = built_train if train_set is None else train_set
        val_set = built_val if val_set is None else val_set
    if len(train_set) == 0 or len(val_set) == 0:
        raise ValueError(f"empty dataset: {len(train_set)} training and {len(val_set)} validation samples")
    run.train_set, run.val_set = train_set, val_set
    run.classes = tuple(getattr(train_set, "classes", ()) or ()) or None
    run.per_pixel = is_per_pixel(train_set[0][1])
    if run.classes is not None and len(run.classes) == 1 and not run.per_pixel:
        warnings.warn(f"the training data has a single class ({run.classes[0]!r}): every prediction is right, the "
                      f"loss goes to 0 and the accuracy is 1.0 whatever the model learns; an image folder "
                      f"needs one subfolder per class", stacklevel=3)
    per_rank = len(train_set) // d.world
    if cfg.batch_size > per_rank:
        where = f" per process ({d.world} processes)" if d.enabled else ""
        raise ValueError(f"batch size {cfg.batch_size} is larger than the training set: {len(train_set)} samples"
                         f"{where}; use --batch-size {max(1, per_rank // 2)} or less")


def _setup_model(run: _Run, model: Optional[nn.Module]) -> None:
    """The model (same seed on every rank: identical initial weights), on its device."""
    cfg, classes = run.cfg, run.classes
    torch.manual_seed(cfg.seed)
    run.num_classes = infer_num_classes(cfg, run.train_set, model)
    run.model_name = cfg.model if model is None else type(model).__name__
    if model is None:
        if run.num_classes is None:
            raise ValueError("cannot tell the number of classes: give the dataset a .classes or set num_classes")
        model = build_model(cfg, run.num_classes)
    elif cfg.pretrained:
        load_pretrained(model, cfg.pretrained)
    model_classes = getattr(model, "num_classes", None)
    if not run.per_pixel and classes and model_classes and model_classes != len(classes):
        raise ValueError(f"the model has {model_classes} outputs but the dataset has {len(classes)} classes; "
                         f"call model.reset_classifier({len(classes)}) or set num_classes")
    if cfg.freeze_similarity:
        freeze_similarity(model)
    model.to(run.device)
    if run.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    run.model = run.net = model


def _setup_loss_and_metric(run: _Run, loss_fn: Optional[Callable], metric) -> None:
    """The recipe's losses (or ``loss_fn``), Mixup/CutMix, and the metric that picks best.pt."""
    cfg = run.cfg
    if loss_fn is not None:
        run.train_loss = run.val_loss = loss_fn
    else:
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
        if run.per_pixel:
            run.train_loss = run.val_loss = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX, label_smoothing=0.0)
        elif (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.augment:
            from timm.data import Mixup
            if cfg.batch_size % 2:
                raise ValueError(f"Mixup/CutMix need an even batch size, got {cfg.batch_size}")
            run.mixup_fn = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing,
                                 num_classes=run.num_classes)
            run.train_loss, run.val_loss = SoftTargetCrossEntropy(), nn.CrossEntropyLoss()
        elif cfg.smoothing > 0:
            run.train_loss, run.val_loss = LabelSmoothingCrossEntropy(cfg.smoothing), nn.CrossEntropyLoss()
        else:
            run.train_loss = run.val_loss = nn.CrossEntropyLoss()
    metric = as_metric(metric)
    if metric is None and run.per_pixel:
        x = run.train_set[0][0][None].to(run.device)
        metric = MeanIoU(run.num_classes or output_classes(run.model, x))
    elif metric is None:
        top5 = (run.num_classes or 0) >= 10 and cfg.dataset not in BUILTIN_DATASETS
        metric = Accuracy((1, 5) if top5 else (1,))
    run.metric = metric


def _setup_loaders(run: _Run) -> None:
    """Training batches shuffled per epoch (DistributedSampler, also for one process);
    validation sharded without padding so every sample counts once."""
    cfg, d, pin = run.cfg, run.d, run.device.type == "cuda"
    run.sampler = torch.utils.data.DistributedSampler(run.train_set, num_replicas=d.world, rank=d.rank,
                                                      shuffle=True, seed=cfg.seed, drop_last=True)
    run.train_loader = torch.utils.data.DataLoader(
        run.train_set, batch_size=cfg.batch_size, sampler=run.sampler, num_workers=cfg.workers, pin_memory=pin,
        drop_last=True, persistent_workers=False)
    run.val_loader = torch.utils.data.DataLoader(
        run.val_set, batch_size=cfg.batch_size, sampler=Shard(len(run.val_set), d.rank, d.world),
        num_workers=cfg.workers, pin_memory=pin)
    run.steps_per_epoch = len(run.train_loader)


def _setup_optimization(run: _Run) -> None:
    """Optimizer, per-update schedule, AMP, EMA (timm's factories)."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    cfg = run.cfg
    run.global_batch = cfg.batch_size * run.d.world
    run.lr = lr = cfg.lr if cfg.lr is not None else cfg.lr_base * run.global_batch / 1024
    if lr >= 1.0:
        warnings.warn(f"peak learning rate {lr:.3g} is far above the usual 1e-4..1e-2 for AdamW: training is "
                      f"likely to diverge", stacklevel=3)
    if cfg.min_lr > lr:
        warnings.warn(f"min_lr ({cfg.min_lr:.3g}) is above the peak lr ({lr:.3g}): the schedule rises", stacklevel=3)
    run.optimizer = create_optimizer_v2(run.model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay,
                                        filter_bias_and_bn=True)
    run.scheduler, run.total_epochs = create_scheduler_v2(
        run.optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
        warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, cooldown_epochs=cfg.cooldown_epochs,
        step_on_epochs=False, updates_per_epoch=run.steps_per_epoch)
    run.amp_dtype = amp_dtype_for(cfg.amp, run.device)
    run.scaler = torch.amp.GradScaler("cuda") if run.amp_dtype == torch.float16 else None
    if cfg.ema:
        from timm.utils import ModelEmaV3
        run.ema = ModelEmaV3(run.model, decay=cfg.ema_decay)


def _resume(run: _Run, resume: Dict[str, Any]) -> None:
    """Weights, optimizer, schedule (re-planned if the user changed it), scaler, EMA, history."""
    from ..checkpoint import CheckpointError

    saved_for = resume.get("model_name") or resume.get("config", {}).get("model")
    load_model_state(run.model, resume["model"], resume["path"], f"{saved_for} with {resume.get('num_classes')} classes")
    try:
        run.optimizer.load_state_dict(resume["optimizer"])
    except ValueError as e:
        raise CheckpointError(f"optimizer state in {resume['path']} does not fit ({e})") from e
    run.start_epoch = start = int(resume["epoch"])
    if run.cfg.epochs < start:
        raise ValueError(f"epochs {run.cfg.epochs} is fewer than the {start} epochs {resume['path']} has already "
                         f"trained; to train on, resume with --epochs {start + 10}, say (the learning-rate schedule "
                         f"is then re-planned); to use the weights, load best.pt or latest.pt")
    _restore_schedule(run.scheduler, resume, run.cfg, start, start * run.steps_per_epoch, run.total_epochs)
    if run.scaler is not None and resume.get("scaler"):
        run.scaler.load_state_dict(resume["scaler"])
    if run.ema is not None:
        if resume.get("state_dict_ema") is None:
            raise CheckpointError(f"{resume['path']} has no EMA weights; resume without --ema")
        run.ema.module.load_state_dict(resume["state_dict_ema"])
    run.history = list(resume.get("history", []))[:start]
    run.best_metric, run.best_epoch = resume.get("best_metric"), resume.get("best_epoch")
    if start >= run.total_epochs:
        print0(f"{resume['path']} already finished its {start} epochs; nothing to train (to train on, resume "
               f"with --epochs {start + 10}, say: the learning-rate schedule is then re-planned)")


def _open_run_folder(run: _Run, resume: Optional[Dict[str, Any]]) -> None:
    """Never overwrite another run; create and test-write the folder before any training;
    repair a best.pt that a kill left behind; rewrite the log from the checkpoint."""
    folder = run.cfg.output_dir
    if folder is None and resume is not None:
        folder = os.path.dirname(resume["path"])
    if folder is None:
        return
    run.folder, run.latest, run.best = folder, os.path.join(folder, "latest.pt"), os.path.join(folder, "best.pt")
    run.metrics_path = os.path.join(folder, "metrics.jsonl")
    here = resume is not None and os.path.abspath(os.path.dirname(resume["path"])) == os.path.abspath(folder)
    if not here and any(os.path.exists(p) for p in (run.latest, run.best)):
        raise FileExistsError(f"{folder} already holds a training run (latest.pt / best.pt); resume it with "
                              f"--resume {folder} or choose another --output-dir")
    failure = None
    if run.d.main:
        try:
            prepare_output(folder, json.dumps(run.cfg.to_dict(), indent=2) + "\n")
            if here:
                repair_best(resume, run.best)
            atomic_write_text(_jsonl(run.history), run.metrics_path)
            warn_if_little_space(folder, checkpoint_bytes(run.model, run.ema is not None), 1 if here else 3)
        except OSError as e:
            failure = e
    if not all_ok(failure is None, run.d, run.device):
        raise failure if failure is not None else SaveError(f"rank 0 could not prepare {folder}")


def _wrap_ddp(run: _Run) -> None:
    if run.d.enabled:
        run.net = nn.parallel.DistributedDataParallel(
            run.model, device_ids=[run.device.index] if run.device.type == "cuda" else None,
            find_unused_parameters=run.cfg.find_unused_parameters)


def _print_plan(run: _Run) -> None:
    n_params = sum(p.numel() for p in run.model.parameters())
    d = run.d
    print0(f"training {run.model_name} ({n_params:,} parameters) on {len(run.train_set):,} images "
           f"({run.steps_per_epoch} steps/epoch, global batch {run.global_batch}, peak lr {run.lr:.3g}) on "
           f"{run.device}{f' x {d.world} processes' if d.enabled else ''}"
           f"{f', amp {run.amp_dtype}' if run.amp_dtype else ''}")


def _run_epoch(run: _Run, epoch: int, progress: bool) -> None:
    """Train one epoch, validate, keep the best, save."""
    from tqdm.auto import tqdm

    bar = tqdm(total=run.steps_per_epoch, desc=f"epoch {epoch + 1}/{run.total_epochs}", leave=True,
               disable=not (progress and run.d.main), dynamic_ncols=True)
    t0 = time.perf_counter()
    train_loss, images = _train_epoch(run, epoch, bar)
    train_time = time.perf_counter() - t0
    entry = {"epoch": epoch + 1, "train_loss": train_loss, **_validate(run)}
    entry.update({"lr": _current_lr(run.optimizer), "images_per_s": images / train_time,
                  "epoch_time_s": time.perf_counter() - t0})
    run.history.append(entry)
    name = run.metric.name
    score = entry[f"ema_val_{name}" if run.ema is not None else f"val_{name}"]
    improved = run.best_metric is None or score > run.best_metric
    if improved:
        run.best_metric, run.best_epoch = score, epoch + 1
    bar.set_postfix({"train_loss": f"{entry['train_loss']:.4f}", "val_loss": f"{entry['val_loss']:.4f}",
                     f"val_{name}": f"{entry[f'val_{name}']:.4f}"}, refresh=True)
    bar.close()
    _save_epoch(run, epoch, improved)


def _train_epoch(run: _Run, epoch: int, bar) -> Tuple[float, float]:
    """One pass over the training data; returns (mean loss, images), reduced over processes.
    Seeded per epoch and rank, so a resumed run draws the same batches and augmentations."""
    cfg, device, model, opt = run.cfg, run.device, run.model, run.optimizer
    seed_all(epoch_seed(cfg.seed, epoch, run.d.rank))
    run.sampler.set_epoch(epoch)
    run.net.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    step = epoch * run.steps_per_epoch
    autocast = torch.autocast(device.type, dtype=run.amp_dtype) if run.amp_dtype else contextlib.nullcontext()
    for i, (x, y) in enumerate(run.train_loader):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if run.mixup_fn is not None:
            x, y = run.mixup_fn(x, y)
        with autocast:
            loss = run.train_loss(run.net(x), y)
        opt.zero_grad(set_to_none=True)
        _backward_and_step(run, loss)
        step += 1
        run.scheduler.step_update(num_updates=step)
        if run.ema is not None:
            run.ema.update(model, step=step)
        loss_sum += loss.detach().double() * len(x)
        count += len(x)
        if (i + 1) % cfg.log_interval == 0 or i + 1 == run.steps_per_epoch:
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(f"the loss is {value} at epoch {epoch + 1}, step {i + 1}: training "
                                         f"diverged; lower the learning rate (now {_current_lr(opt):.3g})")
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{_current_lr(opt):.2e}", refresh=False)
        bar.update(1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if run.d.enabled:
        dist.all_reduce(loss_sum)
        dist.all_reduce(count)
    return (loss_sum / count).item(), count.item()


def _backward_and_step(run: _Run, loss: torch.Tensor) -> None:
    clip, params = run.cfg.clip_grad, run.model.parameters()
    if run.scaler is not None:  # fp16: scale the loss, unscale before clipping
        run.scaler.scale(loss).backward()
        if clip:
            run.scaler.unscale_(run.optimizer)
            nn.utils.clip_grad_norm_(params, clip)
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        loss.backward()
        if clip:
            nn.utils.clip_grad_norm_(params, clip)
        run.optimizer.step()


def _validate(run: _Run) -> Dict[str, float]:
    """``val_*`` (and ``ema_val_*``) entries of the epoch's log line."""
    kw = dict(loss_fn=run.val_loss, metric=run.metric, device=run.device, amp_dtype=run.amp_dtype)
    run.metric.reset()
    entry = {f"val_{k}": v for k, v in evaluate(run.model, run.val_loader, **kw).items()}
    if run.ema is not None:
        run.metric.reset()
        entry.update({f"ema_val_{k}": v for k, v in evaluate(run.ema.module, run.val_loader, **kw).items()})
    return entry


def _save_epoch(run: _Run, epoch: int, improved: bool) -> None:
    """latest.pt, then best.pt (if improved), then the log; a failure stops every rank."""
    failure = None
    if run.folder is not None and run.d.main:
        ckpt = {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict() if run.scaler else None,
                "state_dict_ema": run.ema.module.state_dict() if run.ema is not None else None,
                "epoch": epoch + 1, "config": run.cfg.to_dict(), "history": run.history,
                "best_metric": run.best_metric, "best_epoch": run.best_epoch, "metric_name": run.metric.name,
                "classes": run.classes, "num_classes": run.num_classes, "model_name": run.model_name, "lr": run.lr,
                "fec_core_version": _version()}
        # order matters: latest.pt first (a kill before best.pt is repaired on resume, see
        # runfiles.repair_best), the log last (rewritten whole from the checkpoint on resume)
        try:
            atomic_save(ckpt, run.latest)
            if improved:
                atomic_save(ckpt, run.best)
            atomic_write_text(_jsonl(run.history), run.metrics_path)
        except SaveError as e:
            failure = e
    if not all_ok(failure is None, run.d, run.device):
        raise failure if failure is not None else SaveError(f"rank 0 could not save epoch {epoch + 1}")


def _save_safetensors(run: _Run) -> None:
    """``best.safetensors`` from ``best.pt`` when the run ends (again on every resume, so a kill
    before it is written is repaired); a failure stops every rank."""
    failure = None
    if run.folder is not None and run.d.main and os.path.exists(run.best):
        try:
            write_safetensors(run.best, os.path.join(run.folder, SAFETENSORS))
        except SaveError as e:
            failure = e
    if not all_ok(failure is None, run.d, run.device):
        raise failure if failure is not None else SaveError(f"rank 0 could not write {SAFETENSORS}")


def _jsonl(history: List[Dict[str, float]]) -> str:
    return "".join(json.dumps(h) + "\n" for h in history)


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
        print0(f"note: the learning-rate schedule is re-planned ({why}): training continues at epoch "
                f"{start_epoch + 1} of {total_epochs} with lr {lr:.3g}, as if the run had started with these "
                f"settings")


def _current_lr(optimizer) -> float:
    return max(g["lr"] for g in optimizer.param_groups)


def _version() -> str:
    from .. import __version__

    return __version__
