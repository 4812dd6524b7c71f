"""Processes, devices and seeds (chapter 10): torchrun/DDP set-up, the device a config asks
for (checked, with a clear error), mixed precision, and the per-epoch seeding that makes a
resumed run bit-identical to an uninterrupted one.

Why not ``timm.utils.init_distributed_device`` / ``random_seed``: the former wants an argparse
namespace and picks the device itself (we check ``cfg.device`` and say what is missing); the
latter seeds once per process (``seed + rank``), while exact resume needs a seed per epoch."""
from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["Dist", "init_distributed", "print0", "resolve_device", "amp_dtype_for", "epoch_seed", "seed_all",
           "Shard", "all_ok"]

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owned: bool = False  # we called init_process_group

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_str: str) -> Dist:
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    use_cuda = torch.cuda.is_available() and device_str != "cpu"
    backend = "nccl" if use_cuda else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, owned=True)


def print0(*args, **kwargs):
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        from tqdm.auto import tqdm

        tqdm.write(" ".join(str(a) for a in args), file=kwargs.get("file", sys.stdout))


def resolve_device(device: str, d: Dist) -> torch.device:
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


def amp_dtype_for(amp: str, device: torch.device) -> Optional[torch.dtype]:
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
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def seed_all(s: int) -> None:
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


def all_ok(ok: bool, d: Dist, device: torch.device) -> bool:
    """Whether every process is ``ok`` (rank 0's file work failing must stop all ranks, not hang them)."""
    if not d.enabled:
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    dist.all_reduce(flag)
    return flag.item() == 0
