"""``python -m fec_core.train`` (chapter 10): every option, and a one-line answer for every
value or file that cannot work (exit 2; the traceback with ``--debug`` or ``FEC_DEBUG=1``),
Ctrl-C (exit 130) and SIGTERM (exit 143) with the epoch reached and the command that
continues the run."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
import typing
import warnings
from typing import Any, Dict, Optional, Sequence

import matplotlib
import torch
import torch.distributed as dist

from ..checkpoint import CheckpointError, trusted
from ..cliutil import DEBUG_HELP, one_line, print_error
from .config import TrainConfig
from .curves import plot_history
from .loop import evaluate_config, fit
from .runfiles import SAFETENSORS, SaveError, Terminated, saved_epoch

__all__ = ["main"]

#: torch.OutOfMemoryError (torch >= 2.5) or, before it, the CUDA one it generalizes.
_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fec_core.train",
        description="Train FEC. Defaults: the official training script's ImageNet recipe (without its cool-down "
                    "epochs) for --data-dir, small CPU recipes for the "
                    "offline datasets (--dataset digits / shapes). Under torchrun, one process per GPU (DDP).",
        epilog="examples:\n  python -m fec_core.train --dataset digits\n"
               "  torchrun --nproc_per_node=8 -m fec_core.train --data-dir /data/imagenet --model fec_small\n"
               "  python -m fec_core.train --resume runs/<run>          # continue\n"
               "  python -m fec_core.train --evaluate --resume runs/<run>/best.pt",
        formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(TrainConfig):
        _add_field_option(p, f, _FIELD_TYPES[f.name])
    a = p.add_argument
    a("--evaluate", action="store_true", help="only evaluate (weights from --resume or --pretrained)")
    a("--no-progress", dest="progress", action="store_false")
    a("--trust-checkpoint", dest="trust_checkpoint", action="store_true",
      help="unpickle --resume / --pretrained files in full even when they hold more than tensors and plain "
           "values; this runs any code the file carries: only for files from a source you trust")
    a("--debug", action="store_true", help=DEBUG_HELP)
    return p


#: The type of every TrainConfig field (``Optional[int]`` -> ``int``), from its annotation.
_FIELD_TYPES = {name: next((t for t in typing.get_args(hint) if t is not type(None)), hint)
                for name, hint in typing.get_type_hints(TrainConfig).items()}


def _add_field_option(p: argparse.ArgumentParser, f: dataclasses.Field, kind: type) -> None:
    """The option of one :class:`TrainConfig` field: ``--field-name`` (or its metadata's
    ``flags``), its type, choices and help; a switch for a boolean (``--no-...`` where the field
    is on by default or by preset); the help gives the default where it does not say it."""
    meta = f.metadata
    flags = meta["flags"] or ("--" + f.name.replace("_", "-"),)
    default = "" if meta["preset"] or f.default is None or "default" in meta["help"] else f" (default {f.default})"
    text = meta["help"] + (" (default: the dataset's preset)" if meta["preset"] else default)
    if kind is bool:
        on = f.default is True or meta["preset"]
        p.add_argument(*flags, dest=f.name, action="store_false" if on else "store_true", help=meta["help"])
    else:
        p.add_argument(*flags, dest=f.name, type=kind, choices=meta["choices"], help=text)


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
                                 "--data-dir /path/to/imagenet trains with the official ImageNet recipe")
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


def _resume_command(out: str) -> str:
    """The command that continues the run in ``out`` (with torchrun when launched by it)."""
    rest = f"-m fec_core.train --resume {shlex.quote(out)}"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return f"python {rest}"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if local >= world:  # one machine
        return f"torchrun --standalone --nproc_per_node={local} {rest}"
    return f"torchrun --nnodes={world // local} --nproc_per_node={local} <your rendezvous options> {rest}"


def _resume_hint(cfg: Optional[TrainConfig]) -> str:
    out = _run_folder(cfg)
    latest = os.path.join(out, "latest.pt") if out else None
    if latest and os.path.isfile(latest):
        epoch = saved_epoch(latest)
        saved = f"epoch {epoch} is the last one saved" if epoch else "the last completed epoch is saved"
        return f"{saved}, in {latest}; continue with: {_resume_command(out)}"
    return "no epoch had completed, so nothing was saved"


def _interrupted(cfg: Optional[TrainConfig], e: KeyboardInterrupt, evaluate_only: bool) -> str:
    how = "by SIGTERM" if isinstance(e, Terminated) else "(Ctrl-C)"
    out = None if evaluate_only else _run_folder(cfg)
    epoch = saved_epoch(os.path.join(out, "latest.pt")) if out else None
    if epoch is None:
        return f"interrupted {how}: {'nothing to save' if evaluate_only else _resume_hint(cfg)}"
    return f"interrupted {how} during epoch {epoch + 1}: {_resume_hint(cfg)}"


def _rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _print_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m fec_core.train`` (and ``fec-train``).

    Exit codes: 0 done, 2 a clear error (bad value, missing, broken or refused file, failed
    save, diverged training, out of memory; one line, no traceback unless ``--debug`` or
    ``FEC_DEBUG=1``), 130 interrupted by Ctrl-C, 143 by SIGTERM (one line, from rank 0 under
    torchrun, says the epoch and how to resume). Files given to ``--resume`` / ``--pretrained``
    are read without running code (:func:`fec_core.checkpoint.read_file`) unless
    ``--trust-checkpoint``."""
    p = _parser()
    ns = vars(p.parse_args(argv))
    evaluate_only, progress = ns.get("evaluate", False), ns.get("progress", True)
    debug, trust = ns.pop("debug", False), ns.pop("trust_checkpoint", False)
    with warnings.catch_warnings(), trusted(trust):
        warnings.showwarning = _print_warning
        return _main(ns, evaluate_only, progress, debug)


def _main(ns: Dict[str, Any], evaluate_only: bool, progress: bool, debug: bool = False) -> int:
    cfg = None
    try:
        cfg = _config_from_args(ns)
        if evaluate_only:
            res, source, n = evaluate_config(cfg, progress)
            if _rank0():
                print(f"evaluated {source} on {n} validation images")
                print(json.dumps({k: round(v, 6) for k, v in res.items()}))
            return 0
        if cfg.output_dir is None and cfg.resume is None:
            cfg.output_dir = os.path.join("runs", f"{cfg.dataset}-{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}")
        result = fit(cfg, progress=progress)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (Terminated)
        if _rank0():
            print_error(_interrupted(cfg, e, evaluate_only), e, debug, lead="\n")
        return 143 if isinstance(e, Terminated) else 130
    except (FloatingPointError, SaveError, _OUT_OF_MEMORY) as e:
        advice = "; lower --batch-size" if isinstance(e, _OUT_OF_MEMORY) else ""
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print_error(f"error: {first}{advice}; {_resume_hint(cfg)}", e, debug)
        return 2
    except (ValueError, FileNotFoundError, FileExistsError, CheckpointError, OSError) as e:
        print_error(f"error: {one_line(e)}", e, debug)
        return 2
    except (RuntimeError, MemoryError) as e:
        if not isinstance(e, MemoryError) and "not enough memory" not in str(e) and "out of memory" not in str(e):
            raise  # a bug: keep its traceback
        print_error(f"error: out of memory ({str(e).strip().splitlines()[0][-120:]}); lower --batch-size or "
                    f"--img-size; {_resume_hint(cfg)}", e, debug)
        return 2
    if result.output_dir and (not dist.is_initialized()) and int(os.environ.get("RANK", "0")) == 0:
        try:
            matplotlib.use("Agg")  # a file, no window
            fig = plot_history(result, title=os.path.basename(os.path.normpath(result.output_dir)))
            fig.savefig(os.path.join(result.output_dir, "curves.png"), dpi=100)
            curves = ", curves.png"
        except Exception as e:  # a plot is a bonus; the run itself succeeded
            curves = f" (no curves.png: {e})"
        last = result.history[-1] if result.history else {}
        print(f"final: " + ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k != "epoch"))
        weights = os.path.exists(os.path.join(result.output_dir, SAFETENSORS))
        print(f"saved in {result.output_dir}: latest.pt, best.pt (epoch {result.best_epoch})"
              f"{f', {SAFETENSORS} (its weights)' if weights else ''}, metrics.jsonl, config.json{curves}")
    return 0
