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

With ``--official FILE`` (a copy of the official ``models/fec.py``, github
guikunchen/FEC) the official model is built too and timed in the same process as
path ``official``, next to ours: our model is loaded with the official model's
weights (through :func:`fec_core.checkpoint_filter_fn`), and the tables give each
path's speedup over the official code. If ``torch_scatter`` is not installed, the
official file's ``scatter_sum`` is served by an ``index_add_`` stand-in (the same sum,
see :func:`load_official`). ``--merge A.json B.json`` joins reports of several runs
into one (one row per model, path and setting) and ``--profile`` writes the top
kernels of one step per path (``torch.profiler``) to ``profile.txt``.

Examples::

    python -m fec_core.bench                                   # CPU: fec_small, batch 8, 224x224, fp32
    python -m fec_core.bench --device cuda --batch-sizes 64 128 256 --dtypes fp32 bf16
    python -m fec_core.bench --device cuda --dense --batch-sizes 1 --resolutions 512 1024 2048 \\
        --modes infer --paths fast                             # memory against pixels
    python -m fec_core.bench --model fec_tiny --batch-sizes 2 --resolutions 64 --iters 2
    python -m fec_core.bench --device cuda --official official_fec.py --paths official fast \
        --model fec_large --batch-sizes 256 --modes infer --dtypes fp32 bf16
    python -m fec_core.bench --merge run1/bench.json run2/bench.json --out-dir all
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
           "load_official", "merge_reports", "to_markdown", "plot", "main"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PATHS = ("official", "literal", "fast", "compiled")
MODES = ("infer", "train")


@dataclass
class BenchConfig:
    """What to measure. ``paths``: ``literal``, ``fast`` and optionally ``compiled``
    (the fast path under ``torch.compile``) and ``official`` (the official code from
    the file ``official``, with the same weights)."""

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
    official: Optional[str] = None
    profile: bool = False


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
    base_mem_bytes: Optional[int] = None  # CUDA: allocated before the step (weights, input)
    times_ms: List[float] = field(default_factory=list)
    model: str = ""
    dense: bool = False


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


def load_official(path: str):
    """Import the official ``models/fec.py`` from the file ``path`` as a module.

    The file imports ``torch_scatter.scatter_sum``; when ``torch_scatter`` is not
    installed, a stand-in module serves it with ``index_add_`` (the file calls it only
    as ``scatter_sum(src [K, D], index [K], dim=0, dim_size=S)``: the same sums into a
    zero ``[S, D]`` tensor, in ``src``'s dtype, as torch_scatter's ``scatter_add_``).
    Its ``@register_model`` is switched off while it loads, so that timm's
    ``fec_small`` stays ours. What the file prints while loading (mmseg / mmdet
    notices) is discarded.
    """
    import importlib.util
    import io
    import types

    if not os.path.isfile(path):
        raise ValueError(f"--official {path}: no such file (a copy of the official models/fec.py)")
    if importlib.util.find_spec("torch_scatter") is None and "torch_scatter" not in sys.modules:
        shim = types.ModuleType("torch_scatter")

        def scatter_sum(src, index, dim=0, dim_size=None):
            if dim != 0 or src.ndim != 2:
                raise NotImplementedError("the stand-in scatter_sum covers dim=0 on [K, D] only")
            size = int(index.max()) + 1 if dim_size is None else dim_size
            return src.new_zeros(size, src.shape[1]).index_add_(0, index, src)
        shim.scatter_sum = scatter_sum
        shim.__fec_core_stand_in__ = True
        sys.modules["torch_scatter"] = shim
    import timm.models
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import timm.models.registry as deprecated_registry
    saved = (timm.models.register_model, deprecated_registry.register_model)
    timm.models.register_model = deprecated_registry.register_model = lambda fn: fn
    import importlib.machinery
    loader = importlib.machinery.SourceFileLoader("fec_official", path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("fec_official", loader))
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            loader.exec_module(module)
    except ImportError as err:
        raise ValueError(f"--official {path}: cannot import it ({err}); it needs einops and timm") from err
    except Exception as err:  # noqa: BLE001 - not Python, or not the official file
        raise ValueError(f"--official {path}: not a loadable models/fec.py ({type(err).__name__}: {err})"
                         ) from err
    finally:
        timm.models.register_model, deprecated_registry.register_model = saved
    return module


def _build(cfg: BenchConfig, device: torch.device) -> nn.Module:
    import timm

    import fec_core  # noqa: F401  (registers the models)
    kwargs = dict(num_classes=0 if cfg.dense else 1000)
    if cfg.dense:
        kwargs["dense"] = True
    torch.manual_seed(cfg.seed)
    return timm.create_model(cfg.model, **kwargs).to(device)


def _build_official(cfg: BenchConfig, model: nn.Module, device: torch.device) -> nn.Module:
    """The official model of the same variant; ``model`` (ours) gets its weights."""
    from .model import checkpoint_filter_fn
    module = load_official(cfg.official)
    if not hasattr(module, cfg.model):
        raise ValueError(f"--official {cfg.official} defines no {cfg.model!r} "
                         f"(it has fec_small, fec_base, fec_large)")
    torch.manual_seed(cfg.seed)
    kwargs = dict(fork_feat=True) if cfg.dense else dict(num_classes=1000)
    official = getattr(module, cfg.model)(**kwargs)
    model.load_state_dict(checkpoint_filter_fn(official.state_dict()), strict=True)
    return official.to(device)


def _agreement(model: nn.Module, official: nn.Module, device: torch.device, resolution: int) -> dict:
    """Largest output difference between ours (fast path) and the official code on two
    random images in float32: a check that both run the same model with the same weights."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, resolution, resolution, generator=gen).to(device)
    model.eval().set_literal(False)
    official.eval()
    with torch.no_grad():
        a = model.forward_intermediates(x, intermediates_only=True) if model.dense else model(x)
        b = official(x)
    a = a if isinstance(a, (list, tuple)) else [a]
    b = b if isinstance(b, (list, tuple)) else [b]
    diff = max(float((u.float() - v.float()).abs().max()) for u, v in zip(a, b))
    scale = max(float(v.float().abs().max()) for v in b)
    return dict(max_abs_diff=diff, output_scale=scale, resolution=resolution)


class _StageOutputs(nn.Module):
    """The four stage outputs of a dense FEC (its ``forward``, as every timm model's, is one tensor)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        return self.model.forward_intermediates(x, intermediates_only=True)


def _step_fn(net: nn.Module, mode: str, dtype: str, x: torch.Tensor, y: torch.Tensor,
             device: torch.device, before: Callable[[], None]) -> Callable[[], None]:
    """A closure running one inference or training step of ``net`` (``before()`` first:
    it puts our model on the path being timed)."""
    use_amp = dtype != "fp32"
    amp_dtype = DTYPES[dtype]

    if mode == "infer":
        def step():
            before()
            net.eval()
            with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                net(x)
        return step

    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

    def train_step():
        before()
        net.train()
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


def _measure_memory(fn: Callable[[], None], device: torch.device):
    """``(peak, base)`` bytes of one step: on CUDA the absolute peak and what was allocated
    before it; on CPU the peak above the level before the step (base ``None``)."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return int(torch.cuda.max_memory_allocated(device)), int(base)
    return peak_cpu_bytes(fn), None


def _profile_table(fn: Callable[[], None], device: torch.device, rows: int = 25) -> str:
    """The ``rows`` most expensive operators of one step, by device (or CPU) time."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with _quiet_native_stderr(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=acts) as prof:
            fn()
            _sync(device)
    keys = ("device_time_total", "cuda_time_total") if device.type == "cuda" else ("cpu_time_total",)
    for key in keys:  # the CUDA column's name changed across torch versions
        try:
            return prof.key_averages().table(sort_by=key, row_limit=rows)
        except Exception:  # noqa: BLE001
            continue
    return prof.key_averages().table(row_limit=rows)


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


# ----------------------------------------------------------------------------- main loop
def check_config(cfg: BenchConfig) -> torch.device:
    """Raise ``ValueError`` naming the setting for anything that cannot work (before any
    model is built); returns the device."""
    for name, vals, allowed in (("modes", cfg.modes, MODES), ("dtypes", cfg.dtypes, tuple(DTYPES)),
                                ("paths", cfg.paths, PATHS)):
        bad = [v for v in vals if v not in allowed]
        if bad or not vals:
            raise ValueError(f"{name} {list(vals)}: choose one or more of {list(allowed)}")
    if cfg.iters < 1:
        raise ValueError(f"iters {cfg.iters}: must be at least 1")
    if cfg.warmup < 0:
        raise ValueError(f"warmup {cfg.warmup}: must be 0 or more")
    if not cfg.batch_sizes or any(b < 1 for b in cfg.batch_sizes):
        raise ValueError(f"batch sizes {cfg.batch_sizes}: each must be at least 1")
    for r in cfg.resolutions or [None]:
        if r is None or r < 32 or r % 32:
            raise ValueError(f"resolution {r} is not a positive multiple of 32 (FEC's total stride)")
    if not cfg.max_dense_gib > 0:
        raise ValueError(f"max_dense_gib {cfg.max_dense_gib}: must be positive")
    if "official" in cfg.paths and not cfg.official:
        raise ValueError("path 'official' needs the official model file (--official FILE)")
    if cfg.official and not os.path.isfile(cfg.official):
        raise ValueError(f"--official {cfg.official}: no such file (a copy of the official models/fec.py)")
    try:
        device = torch.device(cfg.device)
    except RuntimeError as err:
        raise ValueError(f"device {cfg.device!r} is not a device name (cpu, cuda, cuda:N)") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {cfg.device!r}: no CUDA device is available here (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {cfg.device!r}: there are only {torch.cuda.device_count()} CUDA devices")
    elif device.type != "cpu":
        raise ValueError(f"device {cfg.device!r}: the benchmark runs on cpu or cuda")
    import timm

    import fec_core  # noqa: F401  (registers the models)
    if cfg.model not in timm.list_models("fec_*"):
        raise ValueError(f"model {cfg.model!r} is not an FEC variant; choose one of {timm.list_models('fec_*')}")
    total = _device_memory(device)
    for b in cfg.batch_sizes:
        for r in cfg.resolutions:
            need = b * 3 * r * r * 4
            if total and need > total:
                raise ValueError(f"batch {b} at {r}x{r}: the input alone needs {need / 2 ** 30:.1f} GiB, "
                                 f"the {device.type} memory is {total / 2 ** 30:.1f} GiB")
    return device


def _device_memory(device: torch.device) -> Optional[int]:
    """Total memory of the device in bytes (CPU: physical memory), None if unknown."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.get_device_properties(device).total_memory)
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError, RuntimeError):
        return None


def run(cfg: BenchConfig, progress: bool = True) -> dict:
    """Run the benchmark; returns ``{'meta': ..., 'results': [Result as dict, ...]}``
    (and ``'profiles'``, one operator table per setting and path, with ``cfg.profile``)."""
    from tqdm.auto import tqdm

    device = check_config(cfg)
    model = _build(cfg, device)
    official = _build_official(cfg, model, device) if "official" in cfg.paths else None
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
    if device.type == "cuda":
        meta.update(cuda=torch.version.cuda, gpu_memory_bytes=torch.cuda.get_device_properties(device).total_memory,
                    tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32,
                    cudnn_benchmark=torch.backends.cudnn.benchmark)
    from . import kernels as _kernels
    meta.update(triton_kernel=bool(device.type == "cuda" and _kernels.HAS_TRITON and _kernels.mode() != "off"))
    if official is not None:
        meta["official"] = dict(file=os.path.basename(cfg.official),
                                scatter=("index_add_ stand-in" if getattr(sys.modules.get("torch_scatter"),
                                         "__fec_core_stand_in__", False) else "torch_scatter"),
                                agreement=_agreement(model, official, device, min(cfg.resolutions)))
    combos = [(mode, dt, b, r) for mode in cfg.modes for dt in cfg.dtypes
              for b in cfg.batch_sizes for r in cfg.resolutions]
    results: List[Result] = []
    profiles: List[dict] = []
    bar = tqdm(total=len(combos) * len(cfg.paths), desc="fec bench", disable=not progress)
    for mode, dt, b, r in combos:
        row: Dict[str, Result] = {p: Result(p, mode, dt, b, r, model=cfg.model, dense=cfg.dense)
                                  for p in cfg.paths}
        gen = torch.Generator().manual_seed(cfg.seed)
        try:
            x = torch.randn(b, 3, r, r, generator=gen).to(device)
            y = torch.randint(0, 1000, (b,), generator=gen).to(device)
        except RuntimeError as err:  # the input itself does not fit
            for res in row.values():
                res.status = "oom" if _is_oom(err) else f"error: {type(err).__name__}: {err}"[:300]
            results.extend(row[p] for p in cfg.paths)
            bar.update(len(cfg.paths))
            continue
        steps: Dict[str, Callable[[], None]] = {}
        limit = cfg.max_dense_gib * 2 ** 30
        for p in cfg.paths:
            if p in ("literal", "official") and literal_dense_bytes(model, b, r) > limit:
                gib = literal_dense_bytes(model, b, r) / 2 ** 30
                row[p].status = f"skipped: dense tensors of {gib:.3g} GiB > --max-dense-gib {cfg.max_dense_gib}"
                bar.update(1)
                continue
            ours = _StageOutputs(model) if cfg.dense else model
            net = official if p == "official" else ours
            if p == "compiled":
                if mode not in compiled:
                    compiled[mode] = torch.compile(ours)
                net = compiled[mode]
            steps[p] = _step_fn(net, mode, dt, x, y, device,
                                (lambda lit=(p == "literal"): model.set_literal(lit)))
        # warm-up (and compilation), then alternate the paths' iterations
        for p in list(steps):
            try:
                for _ in range(max(cfg.warmup, 1 if p == "compiled" else 0)):
                    steps[p]()
                _sync(device)
            except Exception as err:  # noqa: BLE001 - report and go on with the other paths
                row[p].status = "oom" if _is_oom(err) else f"error: {type(err).__name__}: {err}"[:300]
                del steps[p]
                bar.update(1)
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
                    bar.update(1)
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
                    res.peak_mem_bytes, res.base_mem_bytes = _measure_memory(steps[p], device)
                except Exception as err:  # noqa: BLE001
                    res.status = "oom" if _is_oom(err) else res.status
            if cfg.profile:
                try:
                    table = _profile_table(steps[p], device)
                except Exception as err:  # noqa: BLE001
                    table = f"profiler failed: {type(err).__name__}: {err}"
                profiles.append(dict(model=cfg.model, path=p, mode=mode, dtype=dt, batch=b, resolution=r,
                                     table=table))
            bar.update(1)
        results.extend(row[p] for p in cfg.paths)
        steps.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    model.set_literal(False)
    report = dict(meta=meta, results=[asdict(r) for r in results])
    if cfg.profile:
        report["profiles"] = profiles
    return report


def merge_reports(reports: List[dict]) -> dict:
    """Join reports of several runs (say, ``fec_small`` and ``fec_large``, or inference and
    training) into one: ``meta`` of the first run with the device, torch version and
    date, ``meta['runs']`` every run's own ``meta`` (its command among them), and
    all results, each naming its model."""
    if not reports:
        raise ValueError("nothing to merge")
    devices = {r["meta"]["device_name"] for r in reports}
    if len(devices) > 1:
        raise ValueError(f"the reports come from different devices: {sorted(devices)}")
    meta = {k: v for k, v in reports[0]["meta"].items() if k not in ("command", "model", "dense", "official",
                                                                      "parameters", "iters", "warmup")}
    meta["runs"] = [r["meta"] for r in reports]
    meta["command"] = " ; ".join(str(r["meta"].get("command")) for r in reports)
    meta["model"] = ", ".join(dict.fromkeys(r["meta"]["model"] for r in reports))
    meta["iters"] = ", ".join(dict.fromkeys(str(r["meta"]["iters"]) for r in reports))
    results = []
    for r in reports:
        for row in r["results"]:
            row = dict(row)
            row.setdefault("model", r["meta"]["model"])
            row.setdefault("dense", r["meta"].get("dense", False))
            results.append(row)
    out = dict(meta=meta, results=results)
    profiles = [p for r in reports for p in r.get("profiles", [])]
    if profiles:
        out["profiles"] = profiles
    return out


# ----------------------------------------------------------------------------- reports
def _key(r: dict) -> tuple:
    return (r.get("model", ""), r.get("dense", False), r["mode"], r["dtype"], r["batch"], r["resolution"])


def _speedup(results: List[dict], r: dict, reference: str = "literal") -> Optional[float]:
    """Latency of the ``reference`` path over ``r``'s, same model and setting (None if
    either did not run)."""
    for o in results:
        if o["path"] == reference and o["status"] == "ok" and r["status"] == "ok" and _key(o) == _key(r):
            return o["latency_ms"] / r["latency_ms"]
    return None


def to_markdown(report: dict) -> str:
    """The results as a Markdown table (one row per model, path and setting), with each
    path's speedup over the literal path and over the official code of the same setting."""
    meta = report["meta"]
    dense = any(r.get("dense") for r in report["results"]) or meta.get("dense")
    official = any(r["path"] == "official" for r in report["results"])
    lines = [f"Device: {meta['device_name']} ({meta['device']}), model `{meta['model']}`"
             f"{' (dense features)' if dense else ''}, torch {meta['torch']}, "
             f"{meta['iters']} timed iterations, {meta['date']}.", "",
             "| model | mode | dtype | batch | resolution | path | latency (ms, median) | img/s | CPU time (ms) "
             "| peak memory (MiB) | speedup vs literal |" + (" speedup vs official |" if official else "")
             + " status |",
             "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|" + ("---:|" if official else "") + "---|"]

    def f(v, fmt):
        return "" if v is None else format(v, fmt)

    def x(v):
        return "" if v is None else f"{v:.2f}x"
    for r in report["results"]:
        mem = None if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / 2 ** 20
        name = r.get("model") or meta["model"]
        name += " (dense)" if r.get("dense") else ""
        lines.append(f"| {name} | {r['mode']} | {r['dtype']} | {r['batch']} | {r['resolution']} | {r['path']} | "
                     f"{f(r['latency_ms'], '.1f')} | {f(r['throughput'], '.1f')} | {f(r['cpu_ms'], '.0f')} | "
                     f"{f(mem, '.1f')} | {x(_speedup(report['results'], r))} |"
                     + (f" {x(_speedup(report['results'], r, 'official'))} |" if official else "")
                     + f" {r['status']} |")
    runs = meta.get("runs") or [meta]
    for m in runs:
        if m.get("official"):
            a = m["official"]["agreement"]
            lines.append(f"\nOfficial code ({m['model']}, scatter: {m['official']['scatter']}): same weights; "
                         f"largest output difference to ours {a['max_abs_diff']:.2e} "
                         f"(outputs up to {a['output_scale']:.2e}) at {a['resolution']}x{a['resolution']}.")
    lines.append("")
    lines.append("Command: `" + str(meta.get("command")) + "`")
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
        if _key(r) not in keys:
            keys.append(_key(r))
    several = len({k[0] for k in keys}) > 1  # several models: name them under the bars
    resolutions = sorted({r["resolution"] for r in res})
    ncols = 3 if len(resolutions) > 1 else 2
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 4.2))
    width = 0.8 / max(1, len(paths))
    colors = {"official": "tab:red", "literal": "tab:gray", "fast": "tab:blue", "compiled": "tab:green"}
    for ax, field_, label in ((axes[0], "throughput", "images / s"), (axes[1], "peak_mem_bytes", "peak memory (MiB)")):
        for j, p in enumerate(paths):
            vals = []
            for k in keys:
                v = next((r[field_] for r in res if r["path"] == p and _key(r) == k), None)
                if v is not None and field_ == "peak_mem_bytes":
                    v = v / 2 ** 20
                vals.append(float("nan") if v is None else v)
            ax.bar([i + (j - (len(paths) - 1) / 2) * width for i in range(len(keys))], vals, width,
                   label=p, color=colors[p])
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([(f"{name}\n" if several else "") + f"{m} {d}\nb{b} {r}px"
                            for name, _, m, d, b, r in keys], fontsize=7)
        ax.set_ylabel(label)
        ax.legend()
    axes[0].set_title("throughput (higher is better)")
    axes[1].set_title("peak memory (lower is better)")
    if ncols == 3:
        ax = axes[2]
        styles = {"infer": "o-", "train": "s--"}
        reference = None
        for p in paths:
            for (name, m, d, b) in sorted({(r.get("model", ""), r["mode"], r["dtype"], r["batch"]) for r in res}):
                pts = sorted((r["resolution"] ** 2, r["peak_mem_bytes"] / 2 ** 20) for r in res
                             if r["path"] == p and (r.get("model", ""), r["mode"], r["dtype"], r["batch"])
                             == (name, m, d, b) and r["peak_mem_bytes"])
                if len(pts) > 1:
                    ax.loglog(*zip(*pts), styles[m], color=colors[p], label=f"{name} {p} {m} {d} b{b}")
                    if reference is None or (p in ("fast", "compiled") and reference[0] in ("literal", "official")):
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
    p.add_argument("--paths", nargs="+", default=None, choices=PATHS,
                   help="compiled = the fast path under torch.compile; official = the official code "
                        "(needs --official). Default: literal fast, and official with --official")
    p.add_argument("--official", default=None, metavar="FILE",
                   help="a copy of the official models/fec.py (github guikunchen/FEC): time it too")
    p.add_argument("--iters", type=int, default=None, help="timed iterations per path (default 5 CPU, 20 CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up iterations per path (default 1 CPU, 5 CUDA)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--dense", action="store_true", help="dense features (4 stage outputs, no classifier)")
    p.add_argument("--max-dense-gib", type=float, default=None,
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
        paths=args.paths or (["official", "literal", "fast"] if args.official else ["literal", "fast"]),
        iters=args.iters if args.iters is not None else (20 if gpu else 5),
        warmup=args.warmup if args.warmup is not None else (5 if gpu else 1),
        dense=args.dense,
        max_dense_gib=args.max_dense_gib if args.max_dense_gib is not None else (40.0 if gpu else 4.0),
        memory=not args.no_memory, seed=args.seed, official=args.official, profile=args.profile)
    device = check_config(cfg)  # a clear error before the device name or any model
    _check_out_dir(args.out_dir)
    print(f"device: {device_name(device)}", flush=True)
    report = run(cfg, progress=not args.quiet)
    report["meta"]["command"] = command
    _write(report, args.out_dir, not args.no_plot)
    return report


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``python -m fec_core.bench`` and ``fec-bench``; see :func:`run_cli`.
    A setting that cannot work ends with one line on stderr and exit status 2; Ctrl-C
    with exit status 130."""
    try:
        run_cli(argv)
    except ValueError as err:
        print(f"python -m fec_core.bench: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("python -m fec_core.bench: interrupted (nothing written)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
