"""Training FEC (book chapter 10): the paper's ImageNet recipe built from timm's parts.

Python API (stable; other chapters build on it)::

    from fec_core.train import TrainConfig, fit, evaluate, build_datasets, plot_history

    cfg = TrainConfig(dataset="digits", epochs=20, output_dir=None)  # fields left out: the dataset's preset
    result = fit(cfg)                        # -> FitResult
    result.model                             # the trained model (final weights, unwrapped)
    result.history[-1]                       # {'epoch': 20, 'train_loss', 'val_loss', 'val_acc', 'lr',
                                             #  'images_per_s', 'epoch_time_s'} (+ 'ema_val_*' with EMA)
    result.best_metric, result.best_epoch, result.metric_name   # e.g. 0.99, 18, 'acc'
    result.output_dir, result.latest_path, result.best_path, result.metrics_path
    plot_history(result)                     # loss, metric and learning-rate curves (matplotlib Figure)
    evaluate(result.model, val_set)          # {'loss': ..., 'acc': ...}

    # Anything can be swapped: a model, torch Datasets yielding (image, target), a loss, a metric.
    # Per-pixel targets ([H, W] long) are detected and switch off Mixup/CutMix and label smoothing:
    fit(cfg, model=seg_model, train_set=train, val_set=val,
        loss_fn=torch.nn.CrossEntropyLoss(ignore_index=255), metric=MeanIoU(num_classes=5))

``TrainConfig`` fields left at ``None`` are filled from :data:`PRESETS` for the dataset:
``'imagefolder'`` (the default) is the paper's ImageNet recipe, ``'digits'`` and ``'shapes'``
are small offline recipes for a CPU. ``cfg.resume`` continues a run exactly, ``cfg.pretrained``
starts from a released official checkpoint (new head). A metric is a :class:`Metric`
(``update(output, target)`` / ``compute() -> dict``; its first key, :attr:`Metric.name`, picks
the best checkpoint, higher is better) or a plain function ``fn(output, target) -> float``
averaged over samples. :class:`Accuracy` and :class:`MeanIoU` are provided.

What ``fit`` writes to ``output_dir`` (``None``: nothing): ``latest.pt`` and ``best.pt`` (model,
optimizer, scheduler, grad scaler, EMA, epoch, config, history; plain types only, read back
with ``weights_only=True``), ``metrics.jsonl`` (one JSON line per epoch), ``config.json``, and
when the run ends ``best.safetensors`` (best.pt's weights: the EMA's if kept). A directory
that already holds a run is refused unless it is resumed. Nothing is lost whatever instant
the run is killed at (tested by a SIGKILL before and after every write):

* the folder is created and ``config.json`` written *before* training, so a folder under a
  file, without permission or on a read-only disk is reported at once (and little free
  space is warned about);
* every file is written to ``name.tmp``, flushed to disk and renamed over ``name``; a failed
  write (disk full, permission) raises :class:`SaveError` naming the file and the reason,
  keeps the previous version and removes the ``.tmp``;
* after each epoch ``latest.pt`` is written first, then ``best.pt`` (if the epoch improved),
  then the log. On resume a ``best.pt`` left one improvement behind is restored from
  ``latest.pt`` and the log is rewritten from the checkpoint's history.

Resuming with the same settings continues exactly. Resuming with other ``epochs`` (or another
lr, warm-up, ...) re-plans the learning-rate schedule as if the run had started with the new
settings and says so (``--resume RUN --epochs 40`` on a finished 20-epoch run trains epochs
21-40 on the second half of a 40-epoch cosine). Bad settings raise a ``ValueError`` naming the
field and what it accepts; settings that are almost surely mistakes warn.

Command line (``python -m fec_core.train --help``)::

    python -m fec_core.train --dataset digits                     # CPU, a few minutes
    python -m fec_core.train --resume runs/digits-fec_tiny-...    # continue (also after Ctrl-C or SIGTERM)
    python -m fec_core.train --dataset digits --evaluate --resume runs/digits-fec_tiny-.../best.pt
    torchrun --nproc_per_node=8 -m fec_core.train --data-dir /data/imagenet --model fec_small

The ImageNet recipe (``PAPER_RECIPE``; chapter 10 gives the source of each setting: the
supplement, the official ``train.py`` / ``cmds/train.sh``, or this library): AdamW, lr 1e-3 for
a global batch of 1,024 images (scaling it linearly with other batch sizes is this library's
rule, not the paper's), weight decay 0.05 (none on
1-D parameters: norms, biases, layer scales ``layer_scale_1/2``, ``sim_alpha``/``sim_beta``),
cosine schedule to 1e-6 with 5 warm-up epochs from 1e-6, 300 epochs, label smoothing 0.1,
Mixup 0.8 / CutMix 1.0, RandAugment ``rand-m9-mstd0.5-inc1``, random erasing 0.25, drop path
0.1, mixed precision. The official script steps the schedule per epoch and adds 10
cool-down epochs at the minimum lr; here the schedule is stepped per update
(``cooldown_epochs=10`` mirrors the rest).

The pooling layers' ``conv_f`` (:class:`fec_core.layers.ClusterPool`) only feeds an argmax,
so it never receives a gradient. Its ``.grad`` stays ``None``, and AdamW skips such
parameters entirely, weight decay included: under the official recipe ``conv_f`` keeps its
initial (or pretrained) weights. ``fit`` makes that explicit by setting
``conv_f.requires_grad_(False)`` (``freeze_similarity=True``): the optimizer leaves it out,
DDP needs no ``find_unused_parameters`` (which would otherwise be required: without it DDP
raises an error at the second step) and the result is bit-identical to training without
freezing (tested). Were ``conv_f`` given a zero gradient instead of none, AdamW's decoupled
weight decay would shrink its weight (but not its bias) every step and change which
center each point picks.

Package layout (one concern per module): :mod:`~fec_core.train.config` (presets and
:class:`TrainConfig`), :mod:`~fec_core.train.metrics`, :mod:`~fec_core.train.build` (datasets,
model), :mod:`~fec_core.train.distributed` (processes, devices, seeds),
:mod:`~fec_core.train.runfiles` (the run's files, safe under kills),
:mod:`~fec_core.train.loop` (:func:`fit`), :mod:`~fec_core.train.evaluation` (:func:`evaluate`),
:mod:`~fec_core.train.curves` and :mod:`~fec_core.train.cli`.
Everything public is importable from ``fec_core.train`` itself.
"""
from .build import build_datasets, build_model, freeze_similarity, load_pretrained
from .cli import main
from .config import BUILTIN_DATASETS, PAPER_RECIPE, PRESETS, TrainConfig
from .curves import plot_history, read_history
from .evaluation import FitResult, evaluate
from .loop import fit
from .metrics import Accuracy, BatchMean, MeanIoU, Metric, iou_per_class
from .runfiles import SaveError

__all__ = ["TrainConfig", "PRESETS", "PAPER_RECIPE", "FitResult", "fit", "evaluate", "build_datasets", "build_model",
           "load_pretrained", "freeze_similarity", "plot_history", "read_history", "Metric", "Accuracy", "MeanIoU",
           "BatchMean", "iou_per_class", "SaveError", "main"]
