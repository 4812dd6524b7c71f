"""The benchmark's main loop (chapter 12): :func:`run` builds the model (and the official
one), then for every mode, dtype, batch size and resolution times the paths in the same
process, alternating their iterations."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict
from typing import Callable, Dict, List

import timm
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..config import kernel_mode, set_kernel_mode
from .measure import device_name, is_oom, literal_tensor_bytes, measure_memory, profile_table, step_fn, synchronize
from .official import agreement, build_official
from .settings import KERNEL_PATHS, PATH_KERNEL_MODE, BenchConfig, Result, check_config, kernels_available

__all__ = ["run"]


def _build(cfg: BenchConfig, device: torch.device) -> nn.Module:
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


def _meta(cfg: BenchConfig, device: torch.device, model: nn.Module, official) -> dict:
    """What the report says about the run: device, versions, threads, method, agreement."""
    meta = dict(
        device=str(device), device_name=device_name(device), model=cfg.model, dense=cfg.dense,
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), command=None,
        torch=torch.__version__, python=platform.python_version(), threads=torch.get_num_threads(),
        cpu_count=os.cpu_count(), cpu_capability=torch.backends.cpu.get_cpu_capability(),
        iters=cfg.iters, warmup=cfg.warmup, references=list(cfg.references),
        memory_method=("torch.cuda.max_memory_allocated (absolute)" if device.type == "cuda" else
                       "torch.profiler CPU allocation events (above the level before the step)")
        if cfg.memory else None,
        parameters=sum(p.numel() for p in model.parameters()),
    )
    if device.type == "cuda":
        meta.update(cuda=torch.version.cuda, gpu_memory_bytes=torch.cuda.get_device_properties(device).total_memory,
                    tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32,
                    cudnn_benchmark=torch.backends.cudnn.benchmark)
    meta.update(triton_kernel=kernels_available(device),
                kernel_modes={p: PATH_KERNEL_MODE[p] for p in cfg.paths if p in PATH_KERNEL_MODE})
    if official is not None:
        meta["official"] = dict(file=os.path.basename(cfg.official),
                                scatter=("index_add_ stand-in" if getattr(sys.modules.get("torch_scatter"),
                                         "__fec_core_stand_in__", False) else "torch_scatter"),
                                agreement=agreement(model, official, device, min(cfg.resolutions)))
    return meta


def _build_references(cfg: BenchConfig, device: torch.device) -> Dict[str, nn.Module]:
    """The timm models timed beside FEC as yardsticks (``--compare``), randomly initialised."""
    torch.manual_seed(cfg.seed)
    return {f"timm:{name}": timm.create_model(name).to(device) for name in cfg.references}


def _fail(res: Result, err: BaseException) -> None:
    res.status = "oom" if is_oom(err) else f"error: {type(err).__name__}: {err}"[:300]


class _Setting:
    """One (mode, dtype, batch, resolution): the paths' step functions and their timings."""

    def __init__(self, row: Dict[str, Result], bar):
        self.row, self.bar = row, bar
        self.steps: Dict[str, Callable[[], None]] = {}
        self.wall: Dict[str, List[float]] = {}
        self.cpu: Dict[str, List[float]] = {}

    def drop(self, p: str, err: BaseException, device: torch.device) -> None:
        """Report ``err`` for path ``p`` and go on with the other paths."""
        _fail(self.row[p], err)
        del self.steps[p]
        self.bar.update(1)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def warm_up(self, warmup: int, device: torch.device) -> None:
        for p in list(self.steps):
            try:
                for _ in range(max(warmup, 1 if p.startswith("compiled") else 0)):  # compiled: compile now
                    self.steps[p]()
                synchronize(device)
            except Exception as err:  # noqa: BLE001 - report and go on with the other paths
                self.drop(p, err, device)

    def time(self, iters: int, device: torch.device) -> None:
        """Alternate the paths' iterations, so that a slower moment of the machine hits all."""
        self.wall = {p: [] for p in self.steps}
        self.cpu = {p: [] for p in self.steps}
        for _ in range(iters):
            for p in list(self.steps):
                try:
                    synchronize(device)
                    t0, c0 = time.perf_counter(), time.process_time()
                    self.steps[p]()
                    synchronize(device)
                    self.wall[p].append(time.perf_counter() - t0)
                    self.cpu[p].append(time.process_time() - c0)
                except Exception as err:  # noqa: BLE001
                    self.drop(p, err, device)

    def record(self, cfg: BenchConfig, device: torch.device, profiles: List[dict]) -> None:
        for p, step in self.steps.items():
            res, wall = self.row[p], self.wall[p]
            med = statistics.median(wall)
            res.latency_ms, res.latency_ms_min = 1e3 * med, 1e3 * min(wall)
            res.throughput = res.batch / med
            res.cpu_ms = 1e3 * statistics.median(self.cpu[p])
            res.times_ms = [round(1e3 * t, 3) for t in wall]
            if cfg.memory:
                try:
                    res.peak_mem_bytes, res.base_mem_bytes = measure_memory(step, device)
                except Exception as err:  # noqa: BLE001
                    res.status = "oom" if is_oom(err) else res.status
            if cfg.profile:
                try:
                    table = profile_table(step, device)
                except Exception as err:  # noqa: BLE001
                    table = f"profiler failed: {type(err).__name__}: {err}"
                profiles.append(dict(model=cfg.model, path=p, mode=res.mode, dtype=res.dtype, batch=res.batch,
                                     resolution=res.resolution, table=table))
            self.bar.update(1)


def _on_path(model: nn.Module, path: str) -> Callable[[], None]:
    """What runs before every step of ``path``: our model on its literal or fast path and
    in its kernel mode (nothing for the official code and the yardsticks)."""
    mode = PATH_KERNEL_MODE.get(path)

    def before() -> None:
        model.set_literal(path == "literal")
        if mode is not None:
            set_kernel_mode(mode)
    return before


def run(cfg: BenchConfig, progress: bool = True) -> dict:
    """Run the benchmark; returns ``{'meta': ..., 'results': [Result as dict, ...]}``
    (and ``'profiles'``, one operator table per setting and path, with ``cfg.profile``).
    The kernel mode is set per path while it runs and restored at the end."""
    saved = kernel_mode()
    try:
        return _run(cfg, progress)
    finally:
        set_kernel_mode(saved)


def _run(cfg: BenchConfig, progress: bool) -> dict:
    device = check_config(cfg)
    model = _build(cfg, device)
    official = build_official(cfg, model, device) if "official" in cfg.paths else None
    nets = dict(_build_references(cfg, device))
    names = list(cfg.paths) + list(nets)
    meta = _meta(cfg, device, model, official)
    compiled: Dict[tuple, nn.Module] = {}
    if any(p.startswith("compiled") for p in cfg.paths):  # one graph per mode, dtype and kernel mode
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
    combos = [(mode, dt, b, r) for mode in cfg.modes for dt in cfg.dtypes
              for b in cfg.batch_sizes for r in cfg.resolutions]
    results: List[Result] = []
    profiles: List[dict] = []
    bar = tqdm(total=len(combos) * len(names), desc="fec bench", disable=not progress)
    for mode, dt, b, r in combos:
        setting = _Setting({p: Result(p, mode, dt, b, r, model=cfg.model, dense=cfg.dense) for p in names}, bar)
        gen = torch.Generator().manual_seed(cfg.seed)
        try:
            x = torch.randn(b, 3, r, r, generator=gen).to(device)
            y = torch.randint(0, 1000, (b,), generator=gen).to(device)
        except RuntimeError as err:  # the input itself does not fit
            for res in setting.row.values():
                _fail(res, err)
            results.extend(setting.row.values())
            bar.update(len(names))
            continue
        limit = cfg.max_literal_gib * 2 ** 30
        for p in names:
            if p in ("literal", "official") and literal_tensor_bytes(model, b, r) > limit:
                gib = literal_tensor_bytes(model, b, r) / 2 ** 30
                setting.row[p].status = (f"skipped: literal tensors of {gib:.3g} GiB > "
                                         f"--max-literal-gib {cfg.max_literal_gib}")
                bar.update(1)
                continue
            if p in KERNEL_PATHS and not kernels_available(device):
                setting.row[p].status = ("skipped: the Triton kernels run on CUDA with Triton installed "
                                         "(on a CPU only in Triton's interpreter, TRITON_INTERPRET=1)")
                bar.update(1)
                continue
            ours = _StageOutputs(model) if cfg.dense else model
            net = {"official": official}.get(p, nets.get(p, ours))
            if p.startswith("compiled"):
                if (p, mode) not in compiled:
                    compiled[(p, mode)] = torch.compile(ours)
                net = compiled[(p, mode)]
            setting.steps[p] = step_fn(net, mode, dt, x, y, device, _on_path(model, p))
        setting.warm_up(cfg.warmup, device)
        setting.time(cfg.iters, device)
        setting.record(cfg, device, profiles)
        results.extend(setting.row[p] for p in names)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    model.set_literal(False)
    report = dict(meta=meta, results=[asdict(r) for r in results])
    if cfg.profile:
        report["profiles"] = profiles
    return report
