"""Metrics accumulated over batches and reduced over processes (chapter 10):
:class:`Accuracy`, :class:`MeanIoU` (with :func:`iou_per_class`), :class:`BatchMean`.

:class:`Accuracy` counts with ``timm.utils.accuracy`` and :class:`BatchMean` averages with
``timm.utils.AverageMeter``. What is ours is what DDP needs: each metric keeps counts and sums
(not a batch's percentage or a process's mean), summed across the processes at the end of an
epoch (:meth:`Metric.all_reduce`), so that every sample counts once whatever the shard sizes.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn as nn
from timm.utils import AverageMeter, accuracy

from .distributed import sum_over_processes

__all__ = ["Metric", "Accuracy", "iou_per_class", "MeanIoU", "BatchMean", "as_metric", "IGNORE_INDEX",
           "is_per_pixel"]

#: Target value of pixels that count for no class (the per-pixel loss and :class:`MeanIoU` skip them).
IGNORE_INDEX = 255

_CLASS_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def is_per_pixel(target, batched: bool = False) -> bool:
    """Whether ``target`` is a per-pixel class map (segmentation: :class:`MeanIoU`, a loss that
    skips :data:`IGNORE_INDEX`) rather than one label per image (:class:`Accuracy`): an integer
    tensor ``[H, W]``, or ``[B, H, W]`` when ``batched``. The one rule of ``fit``, ``evaluate``
    and :func:`fec_core.seg.train_segmentation`."""
    return isinstance(target, torch.Tensor) and target.dtype in _CLASS_DTYPES and target.ndim == 2 + int(batched)

class Metric:
    """A metric accumulated over batches: ``reset()``, ``update(output, target)``, ``compute()``.

    State lives in ``self.state`` (a dict of tensors that are *summed* across processes under
    DDP). ``compute()`` returns a dict whose first key (:attr:`name`) is the main metric
    (higher is better; it picks ``best.pt``).
    """

    name = "metric"

    def __init__(self):
        self.state: Dict[str, torch.Tensor] = {}
        self.reset()

    def reset(self) -> None:
        raise NotImplementedError

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        raise NotImplementedError

    def compute(self) -> Dict[str, float]:
        raise NotImplementedError

    def all_reduce(self) -> None:
        """Sum the state over all processes (a no-op without torch.distributed)."""
        sum_over_processes(*self.state.values())


class Accuracy(Metric):
    """Top-1 accuracy ``'acc'`` (and top-5 ``'acc5'`` with ``topk=(1, 5)``) of logits ``[B, K]``
    against class indices ``[B]`` (or soft targets ``[B, K]``, their argmax)."""

    name = "acc"

    def __init__(self, topk: Sequence[int] = (1,)):
        self.topk = tuple(topk)
        super().__init__()

    def reset(self) -> None:
        self.state = {"correct": torch.zeros(len(self.topk), dtype=torch.float64), "count": torch.zeros((), dtype=torch.float64)}

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        if target.ndim == 2:
            target = target.argmax(1)
        percent = torch.stack(accuracy(output, target, topk=self.topk))  # this batch's, float32
        correct = (percent.double() * target.numel() / 100).round()  # back to counts: exact
        dev = self.state["correct"].device
        if dev != correct.device:
            self.state = {k_: v.to(correct.device) for k_, v in self.state.items()}
        self.state["correct"] += correct
        self.state["count"] += target.numel()

    def compute(self) -> Dict[str, float]:
        n = max(self.state["count"].item(), 1.0)
        return {("acc" if t == 1 else f"acc{t}"): self.state["correct"][i].item() / n for i, t in enumerate(self.topk)}


def iou_per_class(confusion: torch.Tensor) -> torch.Tensor:
    """IoU of every class from a confusion matrix ``[K, K]`` (row: true, column: predicted),
    ``TP / (TP + FP + FN)``; NaN for a class neither present nor predicted. The mean over the
    non-NaN entries is the mIoU of :class:`MeanIoU` (its ``state['confusion']``)."""
    conf = confusion.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))


class MeanIoU(Metric):
    """Semantic segmentation: mean intersection-over-union ``'miou'`` and pixel accuracy
    ``'pixel_acc'`` from a confusion matrix. ``output`` logits ``[B, K, h, w]`` (upsampled
    bilinearly to the target's size when they differ), ``target`` ``[B, H, W]`` class indices;
    pixels equal to ``ignore_index`` are skipped; classes absent from both prediction and
    target are left out of the mean."""

    name = "miou"

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        super().__init__()

    def reset(self) -> None:
        self.state = {"confusion": torch.zeros(self.num_classes, self.num_classes, dtype=torch.float64)}

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        if output.shape[-2:] != target.shape[-2:]:
            output = nn.functional.interpolate(output.float(), size=target.shape[-2:], mode="bilinear",
                                               align_corners=False)
        pred, target = output.argmax(1).flatten(), target.flatten()
        keep = target != self.ignore_index
        k = self.num_classes
        cm = torch.bincount(target[keep] * k + pred[keep], minlength=k * k).reshape(k, k).to(torch.float64)
        self.state["confusion"] = self.state["confusion"].to(cm.device) + cm

    def compute(self) -> Dict[str, float]:
        cm = self.state["confusion"]
        iou = iou_per_class(cm)
        miou = iou.nanmean().item() if not iou.isnan().all() else 0.0
        return {"miou": miou, "pixel_acc": (cm.diag().sum() / cm.sum().clamp_min(1)).item()}


class BatchMean(Metric):
    """Wraps a plain ``fn(output, target) -> float`` (a batch mean): the sample-weighted mean,
    kept by a ``timm.utils.AverageMeter`` (its sum and count are what :meth:`all_reduce` sums)."""

    def __init__(self, fn: Callable, name: Optional[str] = None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "metric")
        super().__init__()

    def reset(self) -> None:
        self.meter = AverageMeter()

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        value = self.fn(output, target)
        self.meter.update(value.item() if isinstance(value, torch.Tensor) else float(value), len(target))

    def all_reduce(self) -> None:
        totals = torch.tensor([self.meter.sum, self.meter.count], dtype=torch.float64)
        sum_over_processes(totals)
        self.meter.sum, self.meter.count = totals.tolist()

    def compute(self) -> Dict[str, float]:
        return {self.name: self.meter.sum / max(self.meter.count, 1.0)}


def as_metric(metric) -> Metric:
    """``metric`` as a :class:`Metric` (a plain function becomes a :class:`BatchMean`)."""
    if metric is None or isinstance(metric, Metric):
        return metric
    if callable(metric):
        return BatchMean(metric)
    raise TypeError(f"metric must be a fec_core.train.Metric or a function (output, target) -> float, got {metric!r}")
