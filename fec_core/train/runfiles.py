"""The files of a run (chapter 10): ``latest.pt``, ``best.pt``, ``metrics.jsonl``,
``config.json``, written so that nothing is lost whatever instant the run is killed at, and
``best.safetensors`` (best.pt's weights) when the run ends; what a checkpoint holds and how a
run resumes from it.

Every file goes through ``name.tmp``, fsync and a rename (:func:`atomic_save`); a failed write
raises :class:`SaveError` (which file, why: disk full, permission, read-only) and keeps the
previous version. ``latest.pt`` is written before ``best.pt``; :func:`repair_best` restores a
``best.pt`` that a kill between the two left behind. Not ``timm.utils.CheckpointSaver``: it too
writes a temporary file (``tmp.pth.tar``) and renames it over ``last.pth.tar``, but it removes the old
``last.pth.tar`` first (for Windows), so a kill between the two leaves none; it does not fsync before
the rename, nor hold a Ctrl-C until the file is complete; it keeps a top-k of epoch files, stores
the ``args`` namespace, and has nothing to repair a ``model_best`` that a kill left one epoch
behind.

Checkpoints hold plain types only (tensors, numbers, strings, lists, dicts:
:func:`training_checkpoint`), so they are read back with ``weights_only=True``
(:func:`fec_core.checkpoint.read_file`); :func:`resume_training` puts one back into a run.
Ctrl-C (SIGINT) and SIGTERM (SLURM, Kubernetes, ``timeout``) stop a run the same way
(:func:`stop_on_signals`): a file being written is completed first, then ``KeyboardInterrupt`` /
:class:`Terminated`."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from safetensors.torch import save as safetensors_bytes
from timm.utils import is_primary

from .. import __version__
from ..checkpoint import CheckpointError, raise_if_mismatch, read_file
from .distributed import Dist, all_ok, print0

__all__ = ["SaveError", "Terminated", "RUN_FILES", "SAFETENSORS", "atomic_save", "atomic_write_text", "atomic_copy",
           "prepare_output", "checkpoint_bytes", "warn_if_little_space", "repair_best", "checkpoint_path",
           "read_training_checkpoint", "load_model_state", "saved_epoch", "write_safetensors", "stop_on_signals",
           "Progress", "RunFolder", "open_run_folder", "training_checkpoint", "save_epoch", "write_final_weights",
           "resume_training", "restore_schedule"]

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
        with _ctrl_c_after_write():
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException as e:  # a second Ctrl-C / SIGTERM in the middle of a write: no partial file stays
        with contextlib.suppress(OSError):
            os.remove(tmp)
        stop = _caused_by(e, KeyboardInterrupt)  # torch.save can mask it with a RuntimeError
        if stop is not None:
            raise type(stop)() from None
        cause = _os_error(e)
        if cause is not None:
            kept = "the previous version is kept" if os.path.exists(path) else "nothing was written"
            err = SaveError(f"could not write {path}: {_why(cause, os.path.dirname(os.path.abspath(path)))}; {kept}")
            err.errno = cause.errno
            raise err from e
        raise


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (what SLURM, Kubernetes, ``timeout`` and ``kill`` send): the run stops
    as at Ctrl-C. A ``KeyboardInterrupt``, so that whatever handles Ctrl-C handles it too."""


_STOPS = {signal.SIGINT: KeyboardInterrupt, signal.SIGTERM: Terminated}
_DEFAULTS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}


class _Signals:
    writing = False  # a run file is being written: a first signal waits for it
    held: list = []  # the signal that waits
    received: list = []  # every stop signal since stop_on_signals began


def _on_stop_signal(signum, frame):
    _Signals.received.append(signum)
    if _Signals.writing and not _Signals.held:
        _Signals.held.append(signum)
        return
    raise _STOPS[signum]()


@contextlib.contextmanager
def _stop_handlers():
    """Route SIGINT and SIGTERM to :func:`_on_stop_signal` where they have Python's default
    handler (a handler the user installed is left alone); yields whether any is routed. Only
    in the main thread, where Python delivers signals."""
    saved = {}
    if threading.current_thread() is threading.main_thread():
        for signum, default in _DEFAULTS.items():
            current = signal.getsignal(signum)
            if current is default or current is _on_stop_signal:
                saved[signum] = current
                signal.signal(signum, _on_stop_signal)
    try:
        yield bool(saved)
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def _ctrl_c_after_write():
    """Hold a first Ctrl-C (SIGINT) or SIGTERM until the file is complete, then raise
    ``KeyboardInterrupt`` / :class:`Terminated`: the run stops with the checkpoint it was
    writing. A second signal interrupts at once."""
    with _stop_handlers() as active:
        if not active:
            yield
            return
        _Signals.writing, _Signals.held = True, []
        try:
            yield
        finally:
            _Signals.writing, held, _Signals.held = False, _Signals.held, []
        if held:
            raise _STOPS[held[0]]()


@contextlib.contextmanager
def stop_on_signals():
    """For the length of a run (:func:`fit`): SIGTERM stops it as Ctrl-C does, raising
    :class:`Terminated` (a first signal during a file write waits for the file). Under
    ``torchrun`` every rank gets the signal; a rank whose collective broke because another
    rank had already stopped also raises the stop, not the broken connection."""
    with _stop_handlers():
        _Signals.received = []
        try:
            yield
        except KeyboardInterrupt:
            raise
        except BaseException as e:
            if _Signals.received:
                raise _STOPS[_Signals.received[0]]() from e
            raise
        finally:
            _Signals.received = []


def _caused_by(e: Optional[BaseException], kind: type) -> Optional[BaseException]:
    """The exception of type ``kind`` in ``e``'s chain (``__cause__``/``__context__``):
    ``torch.save`` turns a failed or interrupted write into a ``RuntimeError`` ("unexpected
    pos ...") raised while handling the original exception."""
    for _ in range(8):
        if e is None or isinstance(e, kind):
            return e
        e = e.__cause__ or e.__context__
    return None


def _os_error(e: BaseException) -> Optional[OSError]:
    """The ``OSError`` behind ``e`` (see :func:`_caused_by`)."""
    return _caused_by(e, OSError)


def atomic_save(obj: Any, path: str) -> None:
    _write_atomic(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str) -> None:
    _write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def atomic_copy(src: str, dst: str) -> None:
    def copy(f):
        with open(src, "rb") as g:
            shutil.copyfileobj(g, f, 1 << 20)
    _write_atomic(dst, copy)


#: The weights of ``best.pt`` in timm's and the Hub's format, written when a run ends.
SAFETENSORS = "best.safetensors"
RUN_FILES = ("latest.pt", "best.pt", "metrics.jsonl", "config.json", SAFETENSORS)


def prepare_output(out: str, config_text: str) -> None:
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
        atomic_write_text(config_text, os.path.join(out, "config.json"))
    except SaveError as e:
        raise SaveError(f"the output folder {out} is not writable: {e}") from None


def checkpoint_bytes(model: nn.Module, ema: bool) -> int:
    """About the size of a training checkpoint: weights, AdamW's two moments, EMA weights."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    moments = 2 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return weights * (2 if ema else 1) + moments


def warn_if_little_space(out: str, per_file: int, files: int) -> None:
    """Warn before training when ``out`` has less room than ``files`` checkpoints need (3 for a
    new run: latest.pt, best.pt and the one being written; 1 when resuming in place)."""
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(out).free
        if free < per_file * files:
            what = "latest.pt, best.pt and the one being written" if files > 1 else "the one being written"
            warnings.warn(f"{out} has {_size(free)} free but a checkpoint takes about {_size(per_file)} and the run "
                          f"needs room for {files} more ({what}): saving is likely to fail; free some space or "
                          f"choose another --output-dir", stacklevel=3)


def saved_epoch(path: str) -> Optional[int]:
    """The ``epoch`` recorded in a training checkpoint, ``None`` if it is missing or unreadable."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"])
    except Exception:
        return None


def repair_best(resume: Dict[str, Any], best: str) -> None:
    """Make ``best.pt`` agree with the ``best_epoch`` that ``latest.pt`` records.

    ``fit`` writes ``latest.pt`` before ``best.pt``; a run stopped between the two leaves
    ``best.pt`` one improvement behind, and then the best epoch is the latest one, so
    ``latest.pt`` is copied over it."""
    want, epoch = resume.get("best_epoch"), int(resume["epoch"])
    if want is None or os.path.abspath(resume["path"]) == os.path.abspath(best):
        return
    have = saved_epoch(best) if os.path.exists(best) else None
    if have == want:
        return
    if want == epoch:
        atomic_copy(resume["path"], best)
        print0(f"note: best.pt held {f'epoch {have}' if have else 'no checkpoint'} but the best epoch is "
                f"{want} (the run stopped between writing latest.pt and best.pt); restored it from latest.pt")
    else:
        warnings.warn(f"{best} holds {f'epoch {have}' if have else 'no checkpoint'}, not the best epoch {want} "
                      f"that {resume['path']} records, and that epoch's weights are not on disk any more",
                      stacklevel=3)


def checkpoint_path(path: str) -> str:
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "latest.pt")) and os.path.exists(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{path} holds no checkpoint yet: the run stopped before its first epoch "
                                    f"ended; start it again with --output-dir {path}")
        path = os.path.join(path, "latest.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def read_training_checkpoint(path: str) -> Dict[str, Any]:
    """A fec_core training checkpoint (``latest.pt`` / ``best.pt``, or a run folder), read
    without running code (:func:`fec_core.checkpoint.read_file`)."""
    path = checkpoint_path(path)
    ckpt = read_file(path)
    if not isinstance(ckpt, dict) or "optimizer" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path} is not a fec_core training checkpoint (no optimizer/config state); "
                              f"to start from released weights use --pretrained {path}")
    ckpt["path"] = path
    return ckpt


def load_model_state(model: nn.Module, state: Dict[str, torch.Tensor], source: str, saved_for: str) -> None:
    """Strict load with a readable error for a checkpoint of another architecture."""
    raise_if_mismatch(model.state_dict(), state, f"checkpoint {source} does not fit this model: it was saved for {saved_for}")
    model.load_state_dict(state)


def write_safetensors(checkpoint: str, path: str) -> None:
    """Write the weights of the training checkpoint ``checkpoint`` to ``path`` as safetensors
    (timm's and the Hub's format: tensors only, nothing to unpickle): its EMA weights when
    the run kept an EMA (they chose ``best.pt``), else its model's. The metadata records
    which, the epoch, the model and the metric; :func:`fec_core.load_checkpoint` loads it."""
    ckpt = read_file(checkpoint)
    ema = ckpt.get("state_dict_ema")
    weights = ema if ema is not None else ckpt["model"]
    meta = {"format": "pt", "weights": "ema" if ema is not None else "model", "epoch": str(ckpt.get("epoch")),
            "model_name": str(ckpt.get("model_name")), "num_classes": str(ckpt.get("num_classes")),
            "metric": f"{ckpt.get('metric_name')} {ckpt.get('best_metric')}", "source": os.path.basename(checkpoint)}
    data = safetensors_bytes({k: v.detach().clone().contiguous() for k, v in weights.items()}, metadata=meta)
    _write_atomic(path, lambda f: f.write(data))


# ---------------------------------------------------------------------------- a run's state on disk
@dataclass
class Progress:
    """How far a run is: the epochs done (``start_epoch`` when it starts or resumes), one log
    entry per epoch (``history``), the best validation score and its epoch."""

    start_epoch: int = 0
    history: List[Dict[str, float]] = field(default_factory=list)
    best_metric: Optional[float] = None
    best_epoch: Optional[int] = None

    def record(self, entry: Dict[str, float], score: float) -> bool:
        """Log epoch ``entry['epoch']`` with its ``score`` (higher is better); whether it is the best so far."""
        self.history.append(entry)
        improved = self.best_metric is None or score > self.best_metric
        if improved:
            self.best_metric, self.best_epoch = score, entry["epoch"]
        return improved


@dataclass
class RunFolder:
    """The folder of a run and its files."""

    path: str

    @property
    def latest(self) -> str:
        return os.path.join(self.path, "latest.pt")

    @property
    def best(self) -> str:
        return os.path.join(self.path, "best.pt")

    @property
    def metrics(self) -> str:
        return os.path.join(self.path, "metrics.jsonl")


def _jsonl(history: List[Dict[str, float]]) -> str:
    return "".join(json.dumps(h) + "\n" for h in history)


def open_run_folder(output_dir: Optional[str], resume: Optional[Dict[str, Any]], config: Dict[str, Any],
                    history: List[Dict[str, float]], checkpoint_size: int, d: Dist) -> Optional[RunFolder]:
    """The run's folder (``output_dir``, or the resumed checkpoint's; ``None``: no files), ready
    before any training: never another run's (``FileExistsError``), created and test-written
    (``config.json``), a ``best.pt`` that a kill left behind repaired, the log rewritten from
    the checkpoint's ``history``, a warning when the disk has little room for checkpoints of
    ``checkpoint_size`` bytes. Rank 0 does the work; a failure stops every rank."""
    path = output_dir
    if path is None and resume is not None:
        path = os.path.dirname(resume["path"])
    if path is None:
        return None
    folder = RunFolder(path)
    here = resume is not None and os.path.abspath(os.path.dirname(resume["path"])) == os.path.abspath(path)
    if not here and any(os.path.exists(p) for p in (folder.latest, folder.best)):
        raise FileExistsError(f"{path} already holds a training run (latest.pt / best.pt); resume it with "
                              f"--resume {path} or choose another --output-dir")
    failure = None
    if is_primary(d):
        try:
            prepare_output(path, json.dumps(config, indent=2) + "\n")
            if here:
                repair_best(resume, folder.best)
            atomic_write_text(_jsonl(history), folder.metrics)
            warn_if_little_space(path, checkpoint_size, 1 if here else 3)
        except OSError as e:
            failure = e
    if not all_ok(failure is None, d):
        raise failure if failure is not None else SaveError(f"rank 0 could not prepare {path}")
    return folder


def training_checkpoint(model: nn.Module, optimizer, scheduler, scaler, ema, epoch: int, config: Dict[str, Any],
                        progress: Progress, metric_name: str, classes: Optional[Tuple[str, ...]],
                        num_classes: Optional[int], model_name: str, lr: float) -> Dict[str, Any]:
    """What ``latest.pt`` / ``best.pt`` hold after ``epoch`` epochs, plain types only: the
    weights, the optimizer, schedule, loss scaler (``None`` without fp16) and EMA states, the
    config, the history and best epoch, and what the weights are for."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "state_dict_ema": ema.module.state_dict() if ema is not None else None,
            "epoch": epoch, "config": config, "history": progress.history,
            "best_metric": progress.best_metric, "best_epoch": progress.best_epoch, "metric_name": metric_name,
            "classes": classes, "num_classes": num_classes, "model_name": model_name, "lr": lr,
            "fec_core_version": __version__}


def save_epoch(folder: Optional[RunFolder], checkpoint: Dict[str, Any], improved: bool, d: Dist) -> None:
    """``latest.pt``, then ``best.pt`` (if ``improved``), then the log (on rank 0); a failure
    stops every rank. The order matters: a kill before ``best.pt`` is repaired on resume
    (:func:`repair_best`), and the log is rewritten whole from the checkpoint on resume."""
    failure = None
    if folder is not None and is_primary(d):
        try:
            atomic_save(checkpoint, folder.latest)
            if improved:
                atomic_save(checkpoint, folder.best)
            atomic_write_text(_jsonl(checkpoint["history"]), folder.metrics)
        except SaveError as e:
            failure = e
    if not all_ok(failure is None, d):
        raise failure if failure is not None else SaveError(f"rank 0 could not save epoch {checkpoint['epoch']}")


def write_final_weights(folder: Optional[RunFolder], d: Dist) -> None:
    """``best.safetensors`` from ``best.pt`` when the run ends (again on every resume, so a kill
    before it is written is repaired); a failure stops every rank."""
    failure = None
    if folder is not None and is_primary(d) and os.path.exists(folder.best):
        try:
            write_safetensors(folder.best, os.path.join(folder.path, SAFETENSORS))
        except SaveError as e:
            failure = e
    if not all_ok(failure is None, d):
        raise failure if failure is not None else SaveError(f"rank 0 could not write {SAFETENSORS}")


def resume_training(resume: Dict[str, Any], model: nn.Module, optimizer, scheduler, scaler, ema, cfg,
                    steps_per_epoch: int, total_epochs: int) -> Progress:
    """Put the training checkpoint ``resume`` (:func:`read_training_checkpoint`) back into a
    run: weights, optimizer, schedule (re-planned if ``cfg`` changed it: :func:`restore_schedule`),
    loss scaler, EMA; returns the run's :class:`Progress`. Clear errors for a checkpoint of
    another model, an optimizer state that does not fit, fewer ``cfg.epochs`` than done."""
    saved_for = resume.get("model_name") or resume.get("config", {}).get("model")
    load_model_state(model, resume["model"], resume["path"], f"{saved_for} with {resume.get('num_classes')} classes")
    try:
        optimizer.load_state_dict(resume["optimizer"])
    except ValueError as e:
        raise CheckpointError(f"optimizer state in {resume['path']} does not fit ({e})") from e
    start = int(resume["epoch"])
    if cfg.epochs < start:
        raise ValueError(f"epochs {cfg.epochs} is fewer than the {start} epochs {resume['path']} has already "
                         f"trained; to train on, resume with --epochs {start + 10}, say (the learning-rate schedule "
                         f"is then re-planned); to use the weights, load best.pt or latest.pt")
    restore_schedule(scheduler, resume, cfg, start, start * steps_per_epoch, total_epochs)
    if scaler is not None and resume.get("scaler"):
        scaler.load_state_dict(resume["scaler"])
    if ema is not None:
        if resume.get("state_dict_ema") is None:
            raise CheckpointError(f"{resume['path']} has no EMA weights; resume without --ema")
        ema.module.load_state_dict(resume["state_dict_ema"])
    if start >= total_epochs:
        print0(f"{resume['path']} already finished its {start} epochs; nothing to train (to train on, resume "
               f"with --epochs {start + 10}, say: the learning-rate schedule is then re-planned)")
    return Progress(start, list(resume.get("history", []))[:start], resume.get("best_metric"), resume.get("best_epoch"))


_SCHEDULE_FIELDS = ("epochs", "warmup_epochs", "cooldown_epochs", "lr", "lr_base", "min_lr", "warmup_lr", "sched",
                    "batch_size")


def restore_schedule(scheduler, resume: Dict[str, Any], cfg, start_epoch: int, step: int, total_epochs: int) -> None:
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
