"""Benchmark: the literal clustering path against the fast path, side by side (chapter 12).

``python -m fec_core.bench`` (or ``fec-bench``) builds one model, then for every
combination of mode (inference, training step), dtype (float32, bfloat16 autocast),
batch size and resolution times the literal path and the fast path in the same
process, alternating their iterations so that both see the same machine load. It
reports per path: latency (median and best of ``--iters``), throughput in images
per second, CPU time per step and peak memory, and writes ``bench.json``,
``bench.md`` (a Markdown table) and ``bench.png`` (a plot) to ``--out-dir``. It prints
the device name first.

Peak memory is measured in one extra step per path: on CUDA with
``torch.cuda.max_memory_allocated`` (absolute: weights, input and activations), on
CPU from the allocation events of PyTorch's CPU allocator recorded by
``torch.profiler`` (bytes allocated above the level before the step). A training
step is forward, cross-entropy on random labels, backward and an SGD step.

On a machine shared with other programs, multi-threaded CPU timings are erratic
because OpenMP threads spin while they wait for each other; run with
``OMP_WAIT_POLICY=PASSIVE`` (it must be set before Python starts) or ``--threads 1``.

Examples::

    python -m fec_core.bench                                   # CPU: fec_small, batch 8, 224x224, fp32
    python -m fec_core.bench --device cuda --batch-sizes 64 128 256 --dtypes fp32 bf16
    python -m fec_core.bench --device cuda --dense --batch-sizes 1 --resolutions 512 1024 2048 \\
        --modes infer --paths fast                             # memory against pixels
    python -m fec_core.bench --model fec_tiny --batch-sizes 2 --resolutions 64 --iters 2
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

__all__ = ["BenchConfig", "Result", "run", "run_cli", "device_name", "peak_cpu_bytes", "literal_dense_bytes",
           "to_markdown", "plot", "main"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PATHS = ("literal", "fast", "compiled")
MODES = ("infer", "train")


@dataclass
class BenchConfig:
    """What to measure. ``paths``: ``literal``, ``fast`` and optionally ``compiled``
    (the fast path under ``torch.compile``)."""

    model: str = "fec_small"
    device: str = "cpu"
    batch_sizes: List[int] = field(default_factory=lambda: [8])
    resolutions: List[int] = field(default_factory=lambda: [224])
    modes: List[str] = field(default_factory=lambda: ["infer"])
    dtypes: List[str] = field(default_factory=lambda: ["fp32"])
    paths: List[str] = field(default_factory=lambda: ["literal", "fast"])
    iters: int = 5
    warmup: int = 1
    dense: bool = False
    max_dense_gib: float = 4.0
    memory: bool = True
    seed: int = 0


@dataclass
class Result:
    """One measured (or skipped) combination."""

    path: str
    mode: str
    dtype: str
    batch: int
    resolution: int
    status: str = "ok"  # ok | oom | skipped: <why> | error: <msg>
    latency_ms: Optional[float] = None  # median over iters
    latency_ms_min: Optional[float] = None
    throughput: Optional[float] = None  # images per second, from the median latency
    cpu_ms: Optional[float] = None  # process CPU time per step (median)
    peak_mem_bytes: Optional[int] = None
    times_ms: List[float] = field(default_factory=list)


# ----------------------------------------------------------------------------- helpers
def device_name(device: torch.device) -> str:
    """A human-readable name: the GPU's name, or the CPU model with the thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} (CPU, {torch.get_num_threads()} threads)"


@contextlib.contextmanager
def _quiet_native_stderr():
    """Silence what native code writes to file descriptor 2 (the profiler's own log lines)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real stderr: nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_cpu_bytes(fn: Callable[[], object]) -> Optional[int]:
    """Peak bytes allocated by PyTorch's CPU allocator while ``fn()`` runs, above the level
    before it, from ``torch.profiler``'s allocation events. ``None`` if unavailable.
    (The profiler's log lines on stderr are silenced while it runs.)"""
    from torch.profiler import ProfilerActivity, profile
    try:
        with _quiet_native_stderr(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                fn()
        events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    except Exception:  # private profiler API: report n/a rather than fail
        return None
    events.sort(key=lambda t: t[0])
    cur = peak = 0
    for _, nbytes in events:
        cur += nbytes
        peak = max(peak, cur)
    return peak


def literal_dense_bytes(model: nn.Module, batch: int, resolution: int, bytes_per: int = 4) -> int:
    """The largest dense tensors of the literal path for one input size, in bytes: per
    pooling layer the ``[B, N/4, N]`` similarity and its one-hot mask, per encode layer
    the ``[B * heads, M, N, D]`` dispatch product (used to skip sizes that cannot fit)."""
    from .layers import ClusterEncode, ClusterPool
    side = resolution // 4
    worst = 0
    for stage_idx, stage in enumerate(model.stages):
        s = side // (2 ** stage_idx)
        for m in stage.modules():
            if isinstance(m, ClusterPool):
                fw, fh = m.fold
                n = (2 * s // fw) * (2 * s // fh)
                worst = max(worst, 2 * batch * fw * fh * (n // 4) * n * bytes_per)
            elif isinstance(m, ClusterEncode):
                fw, fh = m.fold
                n = (s // fw) * (s // fh)
                mm = m.proposal[0] * m.proposal[1]
                worst = max(worst, batch * m.heads * fw * fh * mm * n * m.head_dim * bytes_per)
    return worst


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build(cfg: BenchConfig, device: torch.device) -> nn.Module:
    import timm

    import fec_core  # noqa: F401  (registers the models)
    kwargs = dict(num_classes=0 if cfg.dense else 1000)
    if cfg.dense:
        kwargs["dense"] = True
    torch.manual_seed(cfg.seed)
    return timm.create_model(cfg.model, **kwargs).to(device)


class _StageOutputs(nn.Module):
    """The four stage outputs of a dense FEC (its ``forward``, as every timm model's, is one tensor)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        return self.model.forward_intermediates(x, intermediates_only=True)


def _step_fn(model: nn.Module, path: str, mode: str, dtype: str, x: torch.Tensor, y: torch.Tensor,
             device: torch.device, compiled: Dict[str, nn.Module]) -> Callable[[], None]:
    """A closure running one inference or training step of ``path``."""
    net = _StageOutputs(model) if getattr(model, "dense", False) else model
    if path == "compiled":
        key = mode
        if key not in compiled:
            compiled[key] = torch.compile(net)
        net = compiled[key]
    use_amp = dtype != "fp32"
    amp_dtype = DTYPES[dtype]

    def set_path():
        model.set_literal(path == "literal")

    if mode == "infer":
        def step():
            set_path()
            model.eval()
            with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                net(x)
        return step

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

    def train_step():
        set_path()
        model.train()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            out = net(x)
            if isinstance(out, (list, tuple)):  # dense features: a stand-in loss
                loss = sum(o.float().pow(2).mean() for o in out)
            else:
                loss = nn.functional.cross_entropy(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return train_step


def _measure_memory(fn: Callable[[], None], device: torch.device) -> Optional[int]:
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return int(torch.cuda.max_memory_allocated(device))
    return peak_cpu_bytes(fn)


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


# ----------------------------------------------------------------------------- main loop
def run(cfg: BenchConfig, progress: bool = True) -> dict:
    """Run the benchmark; returns ``{'meta': ..., 'results': [Result as dict, ...]}``."""
    from tqdm.auto import tqdm

    for name, vals, allowed in (("modes", cfg.modes, MODES), ("dtypes", cfg.dtypes, tuple(DTYPES)),
                                ("paths", cfg.paths, PATHS)):
        bad = [v for v in vals if v not in allowed]
        if bad:
            raise ValueError(f"unknown {name} {bad}; choose from {list(allowed)}")
    if cfg.iters < 1 or cfg.warmup < 0:
        raise ValueError("iters must be >= 1 and warmup >= 0")
    for r in cfg.resolutions:
        if r % 32:
            raise ValueError(f"resolution {r} is not a multiple of 32 (FEC's total stride)")
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but no CUDA device is available")
    model = _build(cfg, device)
    compiled: Dict[str, nn.Module] = {}
    meta = dict(
        device=str(device), device_name=device_name(device), model=cfg.model, dense=cfg.dense,
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), command=None,
        torch=torch.__version__, python=platform.python_version(), threads=torch.get_num_threads(),
        cpu_count=os.cpu_count(), iters=cfg.iters, warmup=cfg.warmup,
        memory_method=("torch.cuda.max_memory_allocated (absolute)" if device.type == "cuda" else
                       "torch.profiler CPU allocation events (above the level before the step)")
        if cfg.memory else None,
        parameters=sum(p.numel() for p in model.parameters()),
    )
    combos = [(mode, dt, b, r) for mode in cfg.modes for dt in cfg.dtypes
              for b in cfg.batch_sizes for r in cfg.resolutions]
    results: List[Result] = []
    bar = tqdm(total=len(combos) * len(cfg.paths), desc="fec bench", disable=not progress)
    for mode, dt, b, r in combos:
        gen = torch.Generator().manual_seed(cfg.seed)
        x = torch.randn(b, 3, r, r, generator=gen).to(device)
        y = torch.randint(0, 1000, (b,), generator=gen).to(device)
        row: Dict[str, Result] = {p: Result(p, mode, dt, b, r) for p in cfg.paths}
        steps: Dict[str, Callable[[], None]] = {}
        limit = cfg.max_dense_gib * 2 ** 30
        for p in cfg.paths:
            if p == "literal" and literal_dense_bytes(model, b, r) > limit:
                gib = literal_dense_bytes(model, b, r) / 2 ** 30
                row[p].status = f"skipped: dense tensors of {gib:.1f} GiB > --max-dense-gib {cfg.max_dense_gib}"
                bar.update(1)
                continue
            steps[p] = _step_fn(model, p, mode, dt, x, y, device, compiled)
        # warm-up (and compilation), then alternate the paths' iterations
        for p in list(steps):
            try:
                for _ in range(max(cfg.warmup, 1 if p == "compiled" else 0)):
                    steps[p]()
                _sync(device)
            except Exception as err:  # noqa: BLE001 - report and go on with the other paths
                row[p].status = "oom" if _is_oom(err) else f"error: {type(err).__name__}: {err}"[:300]
                del steps[p]
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        wall: Dict[str, List[float]] = {p: [] for p in steps}
        cpu: Dict[str, List[float]] = {p: [] for p in steps}
        for _ in range(cfg.iters):
            for p in list(steps):
                try:
                    _sync(device)
                    t0, c0 = time.perf_counter(), time.process_time()
                    steps[p]()
                    _sync(device)
                    wall[p].append(time.perf_counter() - t0)
                    cpu[p].append(time.process_time() - c0)
                except Exception as err:  # noqa: BLE001
                    row[p].status = "oom" if _is_oom(err) else f"error: {type(err).__name__}: {err}"[:300]
                    del steps[p]
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
        for p in steps:
            res = row[p]
            med = statistics.median(wall[p])
            res.latency_ms, res.latency_ms_min = 1e3 * med, 1e3 * min(wall[p])
            res.throughput = b / med
            res.cpu_ms = 1e3 * statistics.median(cpu[p])
            res.times_ms = [round(1e3 * t, 3) for t in wall[p]]
            if cfg.memory:
                try:
                    res.peak_mem_bytes = _measure_memory(steps[p], device)
                except Exception as err:  # noqa: BLE001
                    res.status = "oom" if _is_oom(err) else res.status
            bar.update(1)
        results.extend(row[p] for p in cfg.paths)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    model.set_literal(False)
    return dict(meta=meta, results=[asdict(r) for r in results])


# ----------------------------------------------------------------------------- reports
def _speedup(results: List[dict], r: dict) -> Optional[float]:
    for o in results:
        if (o["path"] == "literal" and o["status"] == "ok" and r["status"] == "ok"
                and all(o[k] == r[k] for k in ("mode", "dtype", "batch", "resolution"))):
            return o["latency_ms"] / r["latency_ms"]
    return None


def to_markdown(report: dict) -> str:
    """The results as a Markdown table (one row per path and setting), with the speedup
    of each path over the literal path of the same setting."""
    meta = report["meta"]
    lines = [f"Device: {meta['device_name']} ({meta['device']}), model `{meta['model']}`"
             f"{' (dense features)' if meta.get('dense') else ''}, torch {meta['torch']}, "
             f"{meta['iters']} timed iterations, {meta['date']}.", "",
             "| mode | dtype | batch | resolution | path | latency (ms, median) | img/s | CPU time (ms) "
             "| peak memory (MiB) | speedup vs literal | status |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---|"]

    def f(v, fmt):
        return "" if v is None else format(v, fmt)
    for r in report["results"]:
        sp = _speedup(report["results"], r)
        mem = None if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / 2 ** 20
        lines.append(f"| {r['mode']} | {r['dtype']} | {r['batch']} | {r['resolution']} | {r['path']} | "
                     f"{f(r['latency_ms'], '.1f')} | {f(r['throughput'], '.1f')} | {f(r['cpu_ms'], '.0f')} | "
                     f"{f(mem, '.1f')} | {'' if sp is None else f'{sp:.2f}x'} | {r['status']} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Optional[str] = None):
    """Bar charts of throughput and peak memory per setting and path, and, when several
    resolutions were measured, peak memory against the number of pixels (log-log)."""
    import matplotlib
    if path is not None and "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")  # writing a file from a script: no display needed
    import matplotlib.pyplot as plt

    res = report["results"]
    paths = [p for p in PATHS if any(r["path"] == p for r in res)]
    keys = []
    for r in res:
        k = (r["mode"], r["dtype"], r["batch"], r["resolution"])
        if k not in keys:
            keys.append(k)
    resolutions = sorted({r["resolution"] for r in res})
    ncols = 3 if len(resolutions) > 1 else 2
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 4.2))
    width = 0.8 / max(1, len(paths))
    colors = {"literal": "tab:gray", "fast": "tab:blue", "compiled": "tab:green"}
    for ax, field_, label in ((axes[0], "throughput", "images / s"), (axes[1], "peak_mem_bytes", "peak memory (MiB)")):
        for j, p in enumerate(paths):
            vals = []
            for k in keys:
                v = next((r[field_] for r in res if r["path"] == p and
                          (r["mode"], r["dtype"], r["batch"], r["resolution"]) == k), None)
                if v is not None and field_ == "peak_mem_bytes":
                    v = v / 2 ** 20
                vals.append(float("nan") if v is None else v)
            ax.bar([i + (j - (len(paths) - 1) / 2) * width for i in range(len(keys))], vals, width,
                   label=p, color=colors[p])
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([f"{m} {d}\nb{b} {r}px" for m, d, b, r in keys], fontsize=7)
        ax.set_ylabel(label)
        ax.legend()
    axes[0].set_title("throughput (higher is better)")
    axes[1].set_title("peak memory (lower is better)")
    if ncols == 3:
        ax = axes[2]
        styles = {"infer": "o-", "train": "s--"}
        reference = None
        for p in paths:
            for (m, d, b) in sorted({(r["mode"], r["dtype"], r["batch"]) for r in res}):
                pts = sorted((r["resolution"] ** 2, r["peak_mem_bytes"] / 2 ** 20) for r in res
                             if r["path"] == p and (r["mode"], r["dtype"], r["batch"]) == (m, d, b)
                             and r["peak_mem_bytes"])
                if len(pts) > 1:
                    ax.loglog(*zip(*pts), styles[m], color=colors[p], label=f"{p} {m} {d} b{b}")
                    if reference is None or (p != "literal" and reference[0] == "literal"):
                        reference = (p, pts)
        if reference is not None:
            pts = reference[1]
            xs = [pts[0][0], pts[-1][0]]
            ax.loglog(xs, [pts[0][1], pts[0][1] * xs[1] / xs[0]], "k:", label="linear in pixels")
        ax.set_xlabel("pixels per image")
        ax.set_ylabel("peak memory (MiB)")
        ax.set_title("memory against input size")
        ax.legend(fontsize=7)
    fig.suptitle(f"{report['meta']['model']} on {report['meta']['device_name']}", fontsize=10)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig


# ----------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fec_core.bench",
                                description="Literal vs fast clustering path: throughput, latency, peak memory.")
    p.add_argument("--model", default="fec_small", help="timm model name (fec_tiny/small/base/large)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda if available)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                   help="default: 8 on CPU, 64 128 256 on CUDA")
    p.add_argument("--resolutions", type=int, nargs="+", default=[224], help="square input sides (multiples of 32)")
    p.add_argument("--modes", nargs="+", default=None, choices=MODES,
                   help="infer and/or train (default: infer on CPU, both on CUDA)")
    p.add_argument("--dtypes", nargs="+", default=None, choices=tuple(DTYPES),
                   help="fp32 and/or bf16 autocast (default: fp32 on CPU, both on CUDA)")
    p.add_argument("--paths", nargs="+", default=["literal", "fast"], choices=PATHS,
                   help="compiled = the fast path under torch.compile")
    p.add_argument("--iters", type=int, default=None, help="timed iterations per path (default 5 CPU, 20 CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up iterations per path (default 1 CPU, 5 CUDA)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--dense", action="store_true", help="dense features (4 stage outputs, no classifier)")
    p.add_argument("--max-dense-gib", type=float, default=None,
                   help="skip the literal path where its dense tensors would exceed this (default 4 CPU, 40 CUDA)")
    p.add_argument("--no-memory", action="store_true", help="do not measure peak memory")
    p.add_argument("--out-dir", default="bench_out", help="where bench.json, bench.md and bench.png go")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--seed", type=int, default=0)
    return p


def run_cli(argv: Optional[List[str]] = None) -> dict:
    """Parse command-line arguments, run the benchmark, write the files; returns the report."""
    args = _parser().parse_args(argv)
    if args.threads:
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
        paths=args.paths,
        iters=args.iters if args.iters is not None else (20 if gpu else 5),
        warmup=args.warmup if args.warmup is not None else (5 if gpu else 1),
        dense=args.dense,
        max_dense_gib=args.max_dense_gib if args.max_dense_gib is not None else (40.0 if gpu else 4.0),
        memory=not args.no_memory, seed=args.seed)
    print(f"device: {device_name(torch.device(dev))}", flush=True)
    report = run(cfg, progress=not args.quiet)
    report["meta"]["command"] = " ".join(["python -m fec_core.bench"] + (argv if argv is not None else sys.argv[1:]))
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "bench.json"), "w") as f:
        json.dump(report, f, indent=1)
    md = to_markdown(report)
    with open(os.path.join(args.out_dir, "bench.md"), "w") as f:
        f.write(md)
    if not args.no_plot:
        plot(report, os.path.join(args.out_dir, "bench.png"))
    print(md)
    print(f"wrote {os.path.join(args.out_dir, 'bench.json')}, bench.md"
          f"{'' if args.no_plot else ', bench.png'}")
    return report


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``python -m fec_core.bench`` and ``fec-bench``; see :func:`run_cli`."""
    run_cli(argv)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
