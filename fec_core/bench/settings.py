"""What the benchmark measures (chapter 12): :class:`BenchConfig`, one :class:`Result` per
measured combination, and :func:`check_config`, which refuses a setting that cannot work
before anything is built."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional

import timm
import torch

from ..config import HAS_TRITON, INTERPRET

__all__ = ["DTYPES", "PATHS", "MODES", "PATH_KERNEL_MODE", "KERNEL_PATHS", "BenchConfig", "Result", "check_config",
           "kernels_available"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PATHS = ("official", "literal", "fast", "kernel", "compiled", "compiled_kernel")
MODES = ("infer", "train")
#: The kernel mode (:func:`fec_core.config.set_kernel_mode`) each of our paths runs in:
#: ``fast`` and ``compiled`` in PyTorch ops only, ``kernel`` and ``compiled_kernel`` with
#: the Triton kernels (pooling assignment and encode step; CUDA, or Triton's interpreter).
PATH_KERNEL_MODE = {"literal": "off", "fast": "off", "kernel": "on", "compiled": "off", "compiled_kernel": "on"}
KERNEL_PATHS = ("kernel", "compiled_kernel")


@dataclass
class BenchConfig:
    """What to measure. ``paths``: ``literal``, ``fast`` (PyTorch ops only), ``kernel``
    (the fast path with the Triton kernels: CUDA), ``compiled`` and ``compiled_kernel``
    (the same two under ``torch.compile``) and ``official`` (the official code from the
    file ``official``, with the same weights). A kernel path where the kernels cannot run
    is reported as skipped. ``references``: timm models timed in the same run and setting
    as yardsticks (reported as paths ``timm:<name>``)."""

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
    max_literal_gib: float = 4.0
    memory: bool = True
    seed: int = 0
    official: Optional[str] = None
    profile: bool = False
    references: List[str] = field(default_factory=list)  # timm models timed as yardsticks


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


def check_config(cfg: BenchConfig) -> torch.device:
    """Raise ``ValueError`` naming the setting for anything that cannot work (before any
    model is built); returns the device."""
    for name, vals, allowed in (("modes", cfg.modes, MODES), ("dtypes", cfg.dtypes, tuple(DTYPES)),
                                ("paths", cfg.paths, PATHS)):
        bad = [v for v in vals if v not in allowed]
        if bad or (not vals and not (name == "paths" and cfg.references)):  # yardsticks alone
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
    if not cfg.max_literal_gib > 0:
        raise ValueError(f"max_literal_gib {cfg.max_literal_gib}: must be positive")
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
    if cfg.model not in timm.list_models("fec_*"):
        raise ValueError(f"model {cfg.model!r} is not an FEC variant; choose one of {timm.list_models('fec_*')}")
    for name in cfg.references:
        if not timm.is_model(name):
            raise ValueError(f"--compare {name}: not a timm model name (e.g. deit_tiny_patch16_224, poolformer_s12)")
    if cfg.references and cfg.dense:
        raise ValueError("--compare times classifiers: it cannot be combined with --dense")
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


def kernels_available(device: torch.device) -> bool:
    """Whether the Triton kernels can run on ``device``: CUDA with Triton, or a CPU inside
    Triton's interpreter (``TRITON_INTERPRET=1``)."""
    return HAS_TRITON and (device.type == "cuda" or INTERPRET)
