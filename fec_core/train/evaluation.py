"""Evaluation (chapter 10): :func:`evaluate` a model on a dataset, and :class:`FitResult`,
what :func:`fec_core.train.fit` returns."""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .config import TrainConfig
from .distributed import sum_over_processes
from .metrics import IGNORE_INDEX, Accuracy, MeanIoU, as_metric, is_per_pixel

__all__ = ["FitResult", "evaluate", "output_classes"]


@dataclass
class FitResult:
    """What :func:`fit` returns. Also readable like a dict (``result['history']``)."""

    model: nn.Module
    history: List[Dict[str, float]]
    best_metric: Optional[float]
    best_epoch: Optional[int]
    metric_name: str
    config: TrainConfig
    classes: Optional[Tuple[str, ...]] = None
    ema_model: Optional[nn.Module] = None
    lr: Optional[float] = None
    output_dir: Optional[str] = None
    latest_path: Optional[str] = None
    best_path: Optional[str] = None
    metrics_path: Optional[str] = None

    def __getitem__(self, key: str):
        return getattr(self, key)

    def keys(self):
        return [f.name for f in dataclasses.fields(self)]


@torch.no_grad()
def evaluate(model: nn.Module, data, loss_fn: Optional[Callable] = None, metric=None, device=None,
             batch_size: int = 256, amp_dtype: Optional[torch.dtype] = None, progress: bool = False,
             workers: int = 0) -> Dict[str, float]:
    """Evaluate ``model`` on ``data`` (a Dataset or DataLoader yielding ``(image, target)``).

    Returns ``{'loss': mean loss, **metric.compute()}``; defaults: cross-entropy and
    :class:`Accuracy` for class targets, cross-entropy (``ignore_index=255``) and
    :class:`MeanIoU` for per-pixel targets. Under torch.distributed, pass a DataLoader
    whose sampler shards the data: sums are reduced over the processes.
    """
    if device is None:
        device = next(model.parameters()).device
    if isinstance(data, torch.utils.data.DataLoader):
        loader = data
    else:
        if len(data) == 0:
            raise ValueError("the evaluation dataset is empty")
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=workers)
    metric = as_metric(metric)
    per_pixel = None
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext())
    for x, y in tqdm(loader, desc="eval", leave=False, disable=not progress):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if per_pixel is None:
            per_pixel = is_per_pixel(y, batched=True)
            if loss_fn is None:
                loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX) if per_pixel else nn.CrossEntropyLoss()
            if metric is None:
                metric = MeanIoU(output_classes(model, x)) if per_pixel else Accuracy()
        with autocast:
            output = model(x)
            loss = loss_fn(output, y)
        output = output.float()
        loss_sum += loss.detach().double() * len(x)
        count += len(x)
        metric.update(output, y)
    if metric is None:
        raise ValueError("the evaluation data yielded no batches")
    sum_over_processes(loss_sum, count)
    metric.all_reduce()
    model.train(was_training)
    return {"loss": (loss_sum / count.clamp_min(1)).item(), **metric.compute()}


def output_classes(model: nn.Module, x: torch.Tensor) -> int:
    n = getattr(model, "num_classes", None)
    if n:
        return int(n)
    return int(model(x[:1]).shape[1])
