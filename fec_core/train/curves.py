"""Training curves (chapter 10): a run's history from wherever it is kept, and its plot."""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

import matplotlib.pyplot as plt

from .evaluation import FitResult
from .runfiles import read_training_checkpoint

__all__ = ["read_history", "plot_history"]

def read_history(source) -> List[Dict[str, float]]:
    """History as a list of dicts from a :class:`FitResult`, a list, a ``metrics.jsonl`` file,
    a run folder or a checkpoint."""
    if isinstance(source, FitResult):
        return source.history
    if isinstance(source, (list, tuple)):
        return list(source)
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no metrics log at {path}")
    if path.endswith(".pt"):
        return list(read_training_checkpoint(path)["history"])
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_history(source, metric: Optional[str] = None, axes=None, title: Optional[str] = None):
    """Plot training curves: loss (train and validation), the validation metric (and EMA's)
    and the learning rate, per epoch. ``source``: see :func:`read_history`. ``metric``: the
    history key suffix to plot (default: the first ``val_*`` key other than the loss).
    Returns the matplotlib Figure."""
    hist = read_history(source)
    if not hist:
        raise ValueError("the history is empty: nothing to plot")
    if metric is None:
        keys = [k[4:] for k in hist[0] if k.startswith("val_") and k != "val_loss"]
        metric = keys[0] if keys else None
    if axes is None:
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    else:
        fig = axes[0].figure
    ep = [h["epoch"] for h in hist]
    ax = axes[0]
    ax.plot(ep, [h["train_loss"] for h in hist], "o-", ms=3, label="train")
    ax.plot(ep, [h["val_loss"] for h in hist], "o-", ms=3, label="validation")
    ax.set(xlabel="epoch", ylabel="loss", title="loss")
    ax.legend()
    ax = axes[1]
    if metric is not None:
        ax.plot(ep, [h[f"val_{metric}"] for h in hist], "o-", ms=3, color="C2", label="model")
        if f"ema_val_{metric}" in hist[0]:
            ax.plot(ep, [h[f"ema_val_{metric}"] for h in hist], "o-", ms=3, color="C3", label="EMA")
            ax.legend()
        ax.set(xlabel="epoch", ylabel=metric, title=f"validation {metric}")
    ax = axes[2]
    ax.plot(ep, [h["lr"] for h in hist], "o-", ms=3, color="C4")
    ax.set(xlabel="epoch", ylabel="at the end of the epoch", title="learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
