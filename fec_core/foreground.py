"""Unsupervised foreground segmentation from FEC's clusters (book chapter 11), its classical
baseline and their evaluation.

:func:`segment_foreground` traces the clusters of a model (:mod:`fec_core.interpret`),
merges the final representatives into two regions and calls the region least present on
the image border the foreground; :func:`kmeans_pixels` / :func:`kmeans_foreground` are
the classical baseline (k-means on RGB plus coordinates); :func:`patch_oracle` is the
ground truth rounded to stem patches (the ceiling of any traced map);
:func:`evaluate_segmentation` measures foreground IoU against ground-truth masks.

Shapes: ``B`` batch, ``H x W`` image (rows x columns).
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

from tqdm.auto import tqdm

from . import data
from .interpret import merge_regions, trace_clusters
from .model import FEC
from .regions import kmeans_labels, number_by_area, one_thread

__all__ = ["border_share", "foreground_from_regions", "segment_foreground", "kmeans_pixels",
           "kmeans_foreground", "patch_oracle", "foreground_iou", "evaluate_segmentation"]


def border_share(labels: torch.Tensor, k: int) -> torch.Tensor:
    """Fraction of the image border that each region covers: ``labels`` ``[B, H, W]``
    (values ``0..k-1``) -> FloatTensor ``[B, k]`` (rows sum to 1)."""
    b = labels.shape[0]
    border = torch.cat([labels[:, 0, :], labels[:, -1, :], labels[:, 1:-1, 0], labels[:, 1:-1, -1]], dim=1)
    counts = torch.zeros(b, k, device=labels.device).scatter_add_(1, border, torch.ones_like(border, dtype=torch.float))
    return counts / border.shape[1]


def foreground_from_regions(regions: torch.Tensor, k: int = 2) -> torch.Tensor:
    """Unsupervised foreground: the region least present on the image border.

    ``regions`` ``[B, H, W]`` with values ``0..k-1`` -> BoolTensor ``[B, H, W]``. The
    background of an object-centric image touches the border; the object rarely does.
    Ties go to the smaller region.
    """
    share = border_share(regions, k)
    area = torch.stack([(regions == j).flatten(1).sum(1) for j in range(k)], dim=1).float()
    score = share * 1e6 + area  # border share first, then area
    score = torch.where(area > 0, score, torch.full_like(score, float("inf")))
    fg = score.argmin(dim=1)
    return regions == fg.view(-1, 1, 1)


@torch.no_grad()
def segment_foreground(model: FEC, images: torch.Tensor, stage: int = -1, k: int = 2, seed: int = 0,
                       batch_size: int = 64, normalize: bool = True, progress: bool = False) -> torch.Tensor:
    """Emergent foreground segmentation from FEC's clusters, without any mask supervision.

    ``images`` ``[B, 3, H, W]`` in [0, 1], ImageNet-normalized here (:func:`fec_core.data.normalize`;
    ``normalize=False``: they are normalized already). For each image: trace the clusters
    (:func:`trace_clusters`), take the representatives of stage ``stage`` (default the
    last; stage ``s > 0`` ends with pooling layer ``s``) with every pixel's membership
    through the pooling hierarchy, merge them into ``k`` regions (:func:`merge_regions`)
    and call the region least present on the border the foreground
    (:func:`foreground_from_regions`). Returns BoolTensor ``[B, H, W]``.
    """
    was_training = model.training
    model.eval()
    masks = []
    try:
        for s in tqdm(range(0, images.shape[0], batch_size), disable=not progress, desc="segment"):
            x = images[s:s + batch_size]
            x = data.normalize(x) if normalize else x
            _, maps, feats = trace_clusters(model, x, heads=[])
            hierarchy = [m for m in maps if m.kind in ("stem", "pool")]
            st = stage % len(feats)
            if st >= len(hierarchy):
                raise ValueError(f"stage {stage}: the model has {len(hierarchy)} stages")
            regions = merge_regions(feats[st], hierarchy[st].labels, k, seed=seed)
            masks.append(foreground_from_regions(regions, k))
    finally:
        model.train(was_training)
    return torch.cat(masks)


def kmeans_pixels(images: torch.Tensor, k: int = 2, xy_weight: float = 0.5, seed: int = 0,
                  n_init: int = 4) -> torch.Tensor:
    """The classical baseline: k-means on every pixel's ``(R, G, B, x, y)``, per image.

    ``images`` ``[B, 3, H, W]`` in [0, 1]; coordinates scaled to [0, 1] and multiplied by
    ``xy_weight`` (0: colors only; the default 0.5 lets the coordinates span half the range of a
    color channel; chapter 11 compares 0, 0.5 and 1). Returns region labels LongTensor
    ``[B, H, W]`` (values ``0..k-1``, numbered by decreasing area).
    """
    b, _, h, w = images.shape
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    xy = torch.stack([yy, xx]).reshape(2, -1).T * xy_weight
    out = torch.empty(b, h, w, dtype=torch.long)
    with one_thread():
        for i in range(b):
            pts = torch.cat([images[i].detach().float().cpu().reshape(3, -1).T, xy], dim=1).numpy()
            labels = torch.from_numpy(kmeans_labels(pts, k, seed, n_init)).long().reshape(h, w)
            out[i] = number_by_area(labels, k)
    return out


def kmeans_foreground(images: torch.Tensor, k: int = 2, xy_weight: float = 0.5, seed: int = 0) -> torch.Tensor:
    """The classical baseline end to end: :func:`kmeans_pixels` then :func:`foreground_from_regions`.
    ``images`` ``[B, 3, H, W]`` in [0, 1] -> BoolTensor ``[B, H, W]``."""
    return foreground_from_regions(kmeans_pixels(images, k, xy_weight, seed), k)


def patch_oracle(masks: torch.Tensor, patch: int = 4) -> torch.Tensor:
    """The ground truth rounded to whole ``patch x patch`` stem patches (a reference, not a
    method: it reads the masks). ``masks`` ``[B, H, W]`` bool ->
    the majority vote of each patch, broadcast back to ``[B, H, W]``. FEC's traced label
    maps are constant on stem patches, so this mask's IoU is roughly their ceiling (the
    majority vote maximizes pixel accuracy; IoU's optimum can differ slightly)."""
    b, h, w = masks.shape
    if h % patch or w % patch:
        raise ValueError(f"masks {h}x{w} are not made of whole {patch}x{patch} patches")
    votes = F.avg_pool2d(masks.float().unsqueeze(1), patch) > 0.5
    return votes.repeat_interleave(patch, -2).repeat_interleave(patch, -1)[:, 0]


def foreground_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image foreground IoU: ``pred``, ``target`` BoolTensor ``[B, H, W]`` -> ``[B]``
    (``|pred & target| / |pred | target|``; 1 when both are empty)."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    pred, target = pred.bool().flatten(1), target.bool().flatten(1)
    inter = (pred & target).sum(1).float()
    union = (pred | target).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def evaluate_segmentation(predictions: Dict[str, torch.Tensor], masks: torch.Tensor) -> Dict[str, Dict[str, float]]:
    """Foreground IoU of several methods against ground-truth ``masks`` ``[B, H, W]``.

    ``predictions``: method name -> BoolTensor ``[B, H, W]``. Returns, per method, the mean
    IoU, its standard error and the share of images with IoU >= 0.5.
    """
    table = {}
    for name, pred in predictions.items():
        iou = foreground_iou(pred, masks)
        table[name] = dict(miou=float(iou.mean()), sem=float(iou.std() / max(len(iou), 1) ** 0.5),
                           hit50=float((iou >= 0.5).float().mean()))
    return table
