"""Regions by k-means (book chapter 11): what merging FEC's representatives
(:func:`fec_core.interpret.merge_regions`) and the pixel baseline
(:func:`fec_core.foreground.kmeans_pixels`) share.

* :func:`kmeans_labels`: scikit-learn's k-means (:cite:`lloyd1982kmeans`) on a set of vectors;
* :func:`one_thread`: the context in which it runs, on one thread;
* :func:`number_by_area`: regions renumbered by decreasing area, so that a label map does not
  depend on the arbitrary order in which k-means lists its clusters.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

__all__ = ["kmeans_labels", "one_thread", "number_by_area"]


def kmeans_labels(points: np.ndarray, k: int, seed: int, n_init: int) -> np.ndarray:
    """scikit-learn's k-means on ``points`` ``[N, D]`` (in float64) -> labels ``[N]`` in ``0..k-1``.

    ``n_init`` starts from ``random_state=seed``, the best kept. Call it inside
    :func:`one_thread`: for the small problems here (one image at a time) thread start-up costs
    far more than it saves, especially on a busy machine.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning when fewer distinct points than k
        return KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(points.astype(np.float64)).labels_


def one_thread():
    """A context in which scikit-learn's k-means (and any BLAS / OpenMP pool) runs on one
    thread. Entered once per batch of images, not per image: entering it inspects every loaded
    library, about 4 ms, as long as a small k-means itself (measured, chapter 11's images)."""
    return threadpool_limits(1)


def number_by_area(labels: torch.Tensor, k: int) -> torch.Tensor:
    """Renumber ``labels`` (any shape, values ``0..k-1``) by decreasing pixel count: region 0 is
    the largest (ties: the smaller label first)."""
    counts = torch.bincount(labels.reshape(-1), minlength=k)
    order = sorted(range(k), key=lambda j: (-int(counts[j]), j))
    remap = torch.empty(k, dtype=torch.long, device=labels.device)
    remap[torch.tensor(order, device=labels.device)] = torch.arange(k, device=labels.device)
    return remap[labels]
