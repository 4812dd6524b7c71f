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
import warnings
from typing import Any, Dict, Optional, Sequence

import torch
import torch.distributed as dist

from ..cliutil import DEBUG_HELP, one_line, print_error
from .build import build_datasets, build_model
from .config import PRESETS, TrainConfig
from .curves import plot_history
from .distributed import Shard, amp_dtype_for, init_distributed, resolve_device
from .evaluation import evaluate
from .loop import fit
from .runfiles import SAFETENSORS, SaveError, Terminated, load_model_state, read_training_checkpoint, saved_epoch

__all__ = ["main"]


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
    a("--trust-checkpoint", dest="trust_checkpoint", action="store_true",
      help="unpickle --resume / --pretrained files in full even when they hold more than tensors and plain "
           "values; this runs any code the file carries: only for files from a source you trust")
    a("--debug", action="store_true", help=DEBUG_HELP)
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
    from ..checkpoint import trusted

    p = _parser()
    ns = vars(p.parse_args(argv))
    evaluate_only, progress = ns.get("evaluate", False), ns.get("progress", True)
    debug, trust = ns.pop("debug", False), ns.pop("trust_checkpoint", False)
    with warnings.catch_warnings(), trusted(trust):
        warnings.showwarning = _print_warning
        return _main(ns, evaluate_only, progress, debug)


def _main(ns: Dict[str, Any], evaluate_only: bool, progress: bool, debug: bool = False) -> int:
    from ..checkpoint import CheckpointError

    cfg = None
    try:
        cfg = _config_from_args(ns)
        if evaluate_only:
            return _evaluate_cli(cfg, progress)
        if cfg.output_dir is None and cfg.resume is None:
            cfg.output_dir = os.path.join("runs", f"{cfg.dataset}-{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}")
        result = fit(cfg, progress=progress)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (Terminated)
        if _rank0():
            print_error(_interrupted(cfg, e, evaluate_only), e, debug, lead="\n")
        return 143 if isinstance(e, Terminated) else 130
    except (FloatingPointError, SaveError, torch.OutOfMemoryError) as e:
        advice = "; lower --batch-size" if isinstance(e, torch.OutOfMemoryError) else ""
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
            import matplotlib
            matplotlib.use("Agg")
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


def _evaluate_cli(cfg: TrainConfig, progress: bool) -> int:
    from ..checkpoint import CheckpointError

    d = init_distributed(cfg.device)
    device = resolve_device(cfg.device, d)
    _, val_set = build_datasets(cfg)
    classes = getattr(val_set, "classes", None)
    source = "random initial weights (no --resume or --pretrained given)"
    if cfg.resume:
        ckpt = read_training_checkpoint(cfg.resume)
        model = build_model(dataclasses.replace(cfg, pretrained=None), ckpt.get("num_classes") or len(classes))
        state = ckpt["state_dict_ema"] if cfg.ema and ckpt.get("state_dict_ema") is not None else ckpt["model"]
        load_model_state(model, state, ckpt["path"], f"{ckpt.get('model_name') or ckpt['config'].get('model')}")
        source = ckpt["path"] + (" (EMA weights)" if state is ckpt.get("state_dict_ema") else "")
    else:
        model = build_model(cfg, cfg.num_classes or len(classes))
        if cfg.pretrained:
            source = cfg.pretrained
    if classes and getattr(model, "num_classes", len(classes)) != len(classes):
        raise CheckpointError(f"the weights have {model.num_classes} classes but the dataset has {len(classes)}")
    model.to(device)
    loader = torch.utils.data.DataLoader(val_set, batch_size=cfg.batch_size,
                                         sampler=Shard(len(val_set), d.rank, d.world), num_workers=cfg.workers)
    res = evaluate(model, loader, device=device, amp_dtype=amp_dtype_for(cfg.amp, device), progress=progress and d.main)
    if d.main:
        print(f"evaluated {source} on {len(val_set)} validation images")
        print(json.dumps({k: round(v, 6) for k, v in res.items()}))
    if d.owned:
        dist.destroy_process_group()
    return 0

