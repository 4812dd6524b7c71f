"""The command line of the benchmark (``python -m fec_core.bench``, ``fec-bench``;
chapter 12): settings that cannot work end with one line on stderr and exit status 2."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

import torch

from ..cliutil import DEBUG_HELP, debugging, one_line, print_error
from .measure import device_name
from .report import merge_reports, plot, to_markdown
from .runner import run
from .settings import DTYPES, MODES, PATHS, BenchConfig, check_config

__all__ = ["run_cli", "main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fec_core.bench",
                                description="Literal vs fast clustering path (and the official code): "
                                            "throughput, latency, peak memory.")
    p.add_argument("--model", default="fec_small", help="timm model name (fec_tiny/small/base/large)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda if available)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                   help="default: 8 on CPU, 64 128 256 on CUDA")
    p.add_argument("--resolutions", type=int, nargs="+", default=[224], help="square input sides (multiples of 32)")
    p.add_argument("--modes", nargs="+", default=None, choices=MODES,
                   help="infer and/or train (default: infer on CPU, both on CUDA)")
    p.add_argument("--dtypes", nargs="+", default=None, choices=tuple(DTYPES),
                   help="fp32 and/or bf16 autocast (default: fp32 on CPU, both on CUDA)")
    p.add_argument("--paths", nargs="*", default=None, choices=PATHS,
                   help="fast = the fast path in PyTorch ops; kernel = the fast path with the Triton "
                        "kernels (CUDA); compiled, compiled_kernel = the same under torch.compile; "
                        "official = the official code (needs --official). Default: literal fast, and "
                        "official with --official; none (--paths with no value) to time only the "
                        "--compare models")
    p.add_argument("--official", default=None, metavar="FILE",
                   help="a copy of the official models/fec.py (github guikunchen/FEC): time it too")
    p.add_argument("--compare", nargs="+", default=[], metavar="MODEL",
                   help="timm models to time in the same run and setting as yardsticks "
                        "(e.g. deit_tiny_patch16_224 poolformer_s12)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations per path (default 5 CPU, 20 CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up iterations per path (default 1 CPU, 5 CUDA)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--dense", action="store_true", help="dense features (4 stage outputs, no classifier)")
    p.add_argument("--max-literal-gib", type=float, default=None,
                   help="skip the literal and official paths where their dense tensors would exceed this "
                        "(default 4 CPU, 40 CUDA)")
    p.add_argument("--no-memory", action="store_true", help="do not measure peak memory")
    p.add_argument("--profile", action="store_true",
                   help="also write profile.txt: the top operators of one step per path (torch.profiler)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="join these bench.json files into one report (nothing is measured)")
    p.add_argument("--out-dir", default="bench_out", help="where bench.json, bench.md and bench.png go")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    return p


def _write(report: dict, out_dir: str, plot_it: bool) -> None:
    _check_out_dir(out_dir)
    profiles = report.get("profiles")
    with open(os.path.join(out_dir, "bench.json"), "w") as f:
        json.dump({k: v for k, v in report.items() if k != "profiles"}, f, indent=1)
    md = to_markdown(report)
    with open(os.path.join(out_dir, "bench.md"), "w") as f:
        f.write(md)
    if profiles:
        with open(os.path.join(out_dir, "profile.txt"), "w") as f:
            for pr in profiles:
                f.write(f"=== {pr['model']} {pr['path']} {pr['mode']} {pr['dtype']} batch {pr['batch']} "
                        f"{pr['resolution']}px\n{pr['table']}\n\n")
    if plot_it:
        plot(report, os.path.join(out_dir, "bench.png"))
    print(md)
    print(f"wrote {os.path.join(out_dir, 'bench.json')}, bench.md{', profile.txt' if profiles else ''}"
          f"{', bench.png' if plot_it else ''}", flush=True)


def _check_out_dir(out_dir: str) -> None:
    """Create ``out_dir`` and test-write it, before anything is measured."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, ".bench-write-test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise ValueError(f"--out-dir {out_dir}: cannot write there ({err.strerror})") from err


def run_cli(argv: Optional[List[str]] = None) -> dict:
    """Parse command-line arguments, run the benchmark (or merge reports), write the
    files; returns the report. Settings that cannot work raise ``ValueError`` before
    anything is built."""
    args = _parser().parse_args(argv)
    command = " ".join(["python -m fec_core.bench"] + (argv if argv is not None else sys.argv[1:]))
    if args.merge:
        reports = []
        for path in args.merge:
            try:
                with open(path) as f:
                    reports.append(json.load(f))
            except (OSError, ValueError) as err:
                raise ValueError(f"--merge {path}: cannot read it as a bench.json ({err})") from err
        report = merge_reports(reports)
        _write(report, args.out_dir, not args.no_plot)
        return report
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads {args.threads}: must be at least 1")
        torch.set_num_threads(args.threads)
    dev = args.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = dev.startswith("cuda")
    cfg = BenchConfig(
        model=args.model, device=dev,
        batch_sizes=args.batch_sizes or ([64, 128, 256] if gpu else [8]),
        resolutions=args.resolutions,
        modes=args.modes or (["infer", "train"] if gpu else ["infer"]),
        dtypes=args.dtypes or (["fp32", "bf16"] if gpu else ["fp32"]),
        paths=args.paths if args.paths is not None else (
            ["official", "literal", "fast"] if args.official else ["literal", "fast"]),
        iters=args.iters if args.iters is not None else (20 if gpu else 5),
        warmup=args.warmup if args.warmup is not None else (5 if gpu else 1),
        dense=args.dense,
        max_literal_gib=args.max_literal_gib if args.max_literal_gib is not None else (40.0 if gpu else 4.0),
        memory=not args.no_memory, seed=args.seed, official=args.official, profile=args.profile,
        references=list(args.compare))
    device = check_config(cfg)  # a clear error before the device name or any model
    _check_out_dir(args.out_dir)
    print(f"device: {device_name(device)}", flush=True)
    report = run(cfg, progress=not args.quiet)
    report["meta"]["command"] = command
    _write(report, args.out_dir, not args.no_plot)
    return report


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``python -m fec_core.bench`` and ``fec-bench``; see :func:`run_cli`.
    A setting that cannot work, or a file that cannot be read or written, ends with one line
    on stderr (its traceback too with ``--debug`` or ``FEC_DEBUG=1``) and exit status 2;
    Ctrl-C with exit status 130. ``--official FILE`` imports that Python file: it runs it."""
    args = sys.argv[1:] if argv is None else list(argv)
    debug = debugging("--debug" in args)
    try:
        run_cli(args)
    except (ValueError, OSError) as err:
        print_error(f"python -m fec_core.bench: error: {one_line(err)}", err, debug)
        return 2
    except KeyboardInterrupt as err:
        print_error("python -m fec_core.bench: interrupted (nothing written)", err, debug)
        return 130
    return 0
