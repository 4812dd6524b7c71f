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

import torch
import torch.nn as nn

from .measure import _is_oom, _measure_memory, _profile_table, _step_fn, _sync, device_name, literal_dense_bytes
from .official import _agreement, _build_official
from .settings import BenchConfig, Result, check_config

__all__ = ["run"]


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
    from .. import kernels as _kernels
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
