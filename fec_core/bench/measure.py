"""How one step is timed and weighed (chapter 12): the device's name, one inference or
training step, peak memory (CUDA allocator, or the CPU allocator's events recorded by
``torch.profiler``), the literal path's largest dense tensors, an operator profile."""
from __future__ import annotations

import contextlib
import os
import platform
import sys
import warnings
from typing import Callable, Optional

import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile

from ..layers import ClusterEncode, ClusterPool
from .settings import DTYPES

__all__ = ["device_name", "peak_cpu_bytes", "literal_tensor_bytes", "quiet_native_stderr", "synchronize", "step_fn",
           "measure_memory", "profile_table", "is_oom"]


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
def quiet_native_stderr():
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
    try:
        with quiet_native_stderr(), warnings.catch_warnings():
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


def literal_tensor_bytes(model: nn.Module, batch: int, resolution: int, bytes_per: int = 4) -> int:
    """The largest dense tensors of the literal path for one input size, in bytes: per
    pooling layer the ``[B, N/4, N]`` similarity and its one-hot mask, per encode layer
    the ``[B * heads, M, N, D]`` dispatch product (used to skip sizes that cannot fit)."""
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


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_fn(net: nn.Module, mode: str, dtype: str, x: torch.Tensor, y: torch.Tensor,
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


def measure_memory(fn: Callable[[], None], device: torch.device):
    """``(peak, base)`` bytes of one step: on CUDA the absolute peak and what was allocated
    before it; on CPU the peak above the level before the step (base ``None``)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return int(torch.cuda.max_memory_allocated(device)), int(base)
    return peak_cpu_bytes(fn), None


def profile_table(fn: Callable[[], None], device: torch.device, rows: int = 25) -> str:
    """The ``rows`` most expensive operators of one step, by device (or CPU) time."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with quiet_native_stderr(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=acts) as prof:
            fn()
            synchronize(device)
    keys = ("device_time_total", "cuda_time_total") if device.type == "cuda" else ("cpu_time_total",)
    for key in keys:  # the CUDA column's name changed across torch versions
        try:
            return prof.key_averages().table(sort_by=key, row_limit=rows)
        except Exception:  # noqa: BLE001
            continue
    return prof.key_averages().table(row_limit=rows)


def is_oom(err: BaseException) -> bool:
    """Whether ``err`` is the device (or the host) running out of memory."""
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()
