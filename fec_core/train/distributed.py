"""Processes, devices and seeds (chapter 10): the device a config asks for (checked, with a
clear error), torchrun / SLURM set-up, sums over processes, mixed precision, and the per-epoch
seeding that makes a resumed run bit-identical to an uninterrupted one.

timm's parts where they do the job: ``timm.utils.init_distributed_device_so`` creates the
process group and picks each rank's device, ``timm.utils.is_primary`` tells the process that
prints and writes. Our own, and why:

* :func:`resolve_device` checks ``cfg.device`` first (timm asserts; the message here says what
  is missing and what to use instead), and a process group the caller created is reused;
* :func:`sum_over_processes`: sums, not ``timm.utils.reduce_tensor``'s mean over processes,
  because the validation shards (:class:`Shard`, no padding) differ in size;
* :func:`seed_all` with :func:`epoch_seed`: ``timm.utils.random_seed`` seeds once per process
  (``seed + rank``), while exact resume needs a seed per epoch.
"""
from __future__ import annotations

import dataclasses
import os
import random
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from timm.utils import is_primary
from timm.utils.distributed import init_distributed_device_so
from tqdm.auto import tqdm

__all__ = ["Dist", "init_distributed", "print0", "resolve_device", "sum_over_processes", "amp_dtype_for",
           "epoch_seed", "seed_all", "Shard", "all_ok"]


@dataclass
class Dist:
    """This process's place in the run: ``rank`` of ``world`` processes (``local_rank`` on its
    machine), its ``device``, and whether :func:`init_distributed` created the process group
    (``owned``: it destroys it at the end). ``timm.utils.is_primary(d)``: rank 0."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owned: bool = False
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world > 1


def _this_process() -> Dist:
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return Dist()


def init_distributed(device: str) -> Dist:
    """This process's :class:`Dist` for a run on ``device`` (``'auto'``, ``'cpu'``, ``'cuda'``,
    ``'cuda:1'``, checked by :func:`resolve_device`). Under torchrun or SLURM
    (``WORLD_SIZE`` > 1) ``timm.utils.init_distributed_device_so`` creates the process group
    (NCCL on CUDA, else Gloo) and gives each rank the GPU of its local rank; a process group
    that already exists is used as it is."""
    if dist.is_available() and dist.is_initialized():
        here = _this_process()
        return dataclasses.replace(here, device=resolve_device(device, here))
    wanted = resolve_device(device, Dist())
    info = init_distributed_device_so(device=wanted.type)
    d = Dist(info["global_rank"], info["world_size"], info["local_rank"], owned=info["distributed"])
    return dataclasses.replace(d, device=wanted if not d.enabled else resolve_device(device, d))


def print0(*args, file=None) -> None:
    """``print`` on the primary process only (``timm.utils.is_primary``), through ``tqdm.write``
    so that the line lands above any progress bar; callable where no :class:`Dist` is at hand."""
    if is_primary(_this_process()):
        tqdm.write(" ".join(str(a) for a in args), file=file or sys.stdout)


def resolve_device(device: str, d: Dist) -> torch.device:
    """The ``torch.device`` that ``device`` names, or a ``ValueError`` saying what is missing
    and what to use instead: ``'auto'`` is CUDA when available, else the CPU; under DDP
    (``d.enabled``) a CUDA device is the GPU of the process's local rank."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for but this machine has no CUDA device that PyTorch "
                             f"can use; use --device cpu (or 'auto')")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} "
                             f"CUDA device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        if d.enabled or dev.index is None:
            dev = torch.device("cuda", d.local_rank if d.enabled else torch.cuda.current_device())
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} was asked for but MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {device!r} is not supported for training; use 'auto', 'cpu' or 'cuda'")
    return dev


def sum_over_processes(*tensors: torch.Tensor) -> None:
    """Sum each tensor in place over all processes (nothing without a process group). Under
    NCCL a CPU tensor travels through the process's GPU."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    gpu = dist.get_backend() == "nccl"
    for t in tensors:
        if gpu and not t.is_cuda:
            on_gpu = t.cuda()
            dist.all_reduce(on_gpu)
            t.copy_(on_gpu)
        else:
            dist.all_reduce(t)


def amp_dtype_for(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of ``cfg.amp`` on ``device`` (``None``: no autocast): ``'auto'`` is
    bf16 on GPUs that support it, else fp16, and none on a CPU."""
    if amp == "off":
        return None
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("amp 'fp16' needs a CUDA device; use 'bf16' or 'off' on a CPU")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one epoch on one rank (``numpy.random.SeedSequence`` of all three)."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def seed_all(s: int) -> None:
    """Seed Python's, NumPy's and PyTorch's generators with ``s``."""
    random.seed(s)
    np.random.seed(s % 2 ** 32)
    torch.manual_seed(s)


class Shard(torch.utils.data.Sampler):
    """Indices ``rank, rank + world, ...``: every sample once over all processes (no padding)."""

    def __init__(self, n: int, rank: int, world: int):
        self.idx = range(rank, n, world)

    def __iter__(self):
        return iter(self.idx)

    def __len__(self):
        return len(self.idx)


def all_ok(ok: bool, d: Dist) -> bool:
    """Whether every process is ``ok`` (rank 0's file work failing must stop all ranks, not hang them)."""
    if not d.enabled:
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device=d.device)
    dist.all_reduce(flag)
    return flag.item() == 0
