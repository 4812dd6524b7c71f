"""The equations of FEC as small functions, one concept per function.

Chen et al., *Neural Clustering based Visual Representation Learning*, CVPR 2024.
Every clustering layer of FEC runs the same four steps on a set of points
(pixels) with keys ``K`` (used to compare) and values ``V`` (what is averaged):

1. **center initialization** (Eq. 4, book chapter 3): adaptive average pooling of
   the key map and of the value map gives ``M`` center keys and center values.
   :func:`centers`.
2. **similarity** (Eq. 5, chapter 4): cosine similarity between every center and
   every point. :func:`similarity`; in encode layers it is passed through the
   learned gate ``sigmoid(beta + alpha * cos)``, :func:`gate`.
3. **assignment** (Eq. 5, chapter 5): each point joins its most similar center
   (hard argmax). :func:`assign`, :func:`assign_nearest` (memory-lean),
   :func:`one_hot` (the dense mask of the literal path).
4. **aggregation** (Eq. 6, chapter 6): each representative is the average of
   its center value and its members' values,
   ``r_m = (c_m + sum_{n in m} v_n) / (1 + |m|)``. :func:`aggregate` (scatter)
   and :func:`aggregate_dense` (literal, with the one-hot mask).
5. **dispatch** (Eq. 7, chapter 7, encode layers only): every point receives
   its representative scaled by its gate value. :func:`dispatch` (gather) and
   :func:`dispatch_dense` (literal, the ``[B, M, N, D]`` product of the paper).

:func:`cluster_encode` and :func:`cluster_pool` chain the steps for the two
kinds of layer (chapter 8 for pooling). Both have a *literal* path that mirrors
the math with dense tensors, and a *fast* path (the default) that never builds
the dense ``[B, M, N]`` mask nor the ``[B, M, N, D]`` dispatch product, and, for
pooling, never the ``[B, N/4, N]`` similarity. Tests check that both paths give
the same numbers and gradients.

Shapes: ``B`` batch (times heads and fold regions), ``N`` points, ``M`` centers,
``C`` key channels, ``D`` value channels.
"""
from __future__ import annotations

import os
from typing import Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "centers", "similarity", "gate", "assign", "assign_nearest", "one_hot",
    "aggregate", "aggregate_dense", "dispatch", "dispatch_dense",
    "cluster_encode", "cluster_pool", "fold", "unfold", "to_points",
    "scatter_backend", "set_scatter_backend", "HAS_TORCH_SCATTER",
]

try:  # optional backend, detected at import
    from torch_scatter import scatter_sum as _ts_scatter_sum  # type: ignore
    HAS_TORCH_SCATTER = True
except Exception:  # pragma: no cover - depends on the environment
    _ts_scatter_sum = None
    HAS_TORCH_SCATTER = False

_BACKEND = os.environ.get("FEC_SCATTER_BACKEND", "torch")
if _BACKEND not in ("torch", "torch_scatter") or (_BACKEND == "torch_scatter" and not HAS_TORCH_SCATTER):
    _BACKEND = "torch"


def scatter_backend() -> str:
    """Name of the backend used by :func:`aggregate`: ``'torch'`` or ``'torch_scatter'``."""
    return _BACKEND


def set_scatter_backend(name: str) -> None:
    """Choose the scatter backend: ``'torch'`` (native ``index_add_``, the default)
    or ``'torch_scatter'`` (needs the optional ``torch-scatter`` package)."""
    global _BACKEND
    if name not in ("torch", "torch_scatter"):
        raise ValueError(f"unknown scatter backend {name!r}; use 'torch' or 'torch_scatter'")
    if name == "torch_scatter" and not HAS_TORCH_SCATTER:
        raise ImportError("torch-scatter is not installed: pip install 'fec-core[scatter]'")
    _BACKEND = name


def _scatter_sum(src: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """Sum rows of ``src`` [K, D] into ``size`` rows by ``index`` [K]."""
    if _BACKEND == "torch_scatter":
        return _ts_scatter_sum(src, index, dim=0, dim_size=size)
    out = src.new_zeros(size, src.shape[-1])
    return out.index_add_(0, index, src)


# --------------------------------------------------------------------------- layout
def fold(x: torch.Tensor, fold_w: int, fold_h: int) -> torch.Tensor:
    """Region folding: split ``[B, C, W, H]`` into ``fold_w x fold_h`` regions,
    ``[B * fold_w * fold_h, C, W / fold_w, H / fold_h]`` (region index row-major).

    Clustering then happens inside each region (chapter 5). The sizes must divide.
    """
    if fold_w == 1 and fold_h == 1:
        return x
    b, c, w, h = x.shape
    if w % fold_w or h % fold_h:
        raise ValueError(f"feature map {w}x{h} cannot be folded into {fold_w}x{fold_h} regions")
    x = x.reshape(b, c, fold_w, w // fold_w, fold_h, h // fold_h)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b * fold_w * fold_h, c, w // fold_w, h // fold_h)


def unfold(x: torch.Tensor, fold_w: int, fold_h: int) -> torch.Tensor:
    """Inverse of :func:`fold`: ``[B * fw * fh, C, w, h]`` -> ``[B, C, fw * w, fh * h]``."""
    if fold_w == 1 and fold_h == 1:
        return x
    bf, c, w, h = x.shape
    b = bf // (fold_w * fold_h)
    x = x.reshape(b, fold_w, fold_h, c, w, h).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, fold_w * w, fold_h * h)


def to_points(x: torch.Tensor) -> torch.Tensor:
    """A feature map ``[B, C, W, H]`` as a set of points ``[B, N, C]``, ``N = W * H`` row-major."""
    return x.flatten(2).transpose(1, 2)


# --------------------------------------------------------------------------- Eq. 4
def centers(x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """Center initialization (Eq. 4, chapter 3): adaptive average pooling.

    ``x`` [B, C, W, H] -> [B, C, gw, gh] with ``grid = (gw, gh)``. Where the grid
    divides the map this is a plain average pooling (identical windows, fewer
    kernels); otherwise PyTorch's adaptive pooling, whose windows may overlap.
    """
    gw, gh = grid
    w, h = x.shape[-2:]
    if w % gw == 0 and h % gh == 0:
        if (w, h) == (gw, gh):
            return x
        return F.avg_pool2d(x, (w // gw, h // gh))
    return F.adaptive_avg_pool2d(x, (gw, gh))


# --------------------------------------------------------------------------- Eq. 5
def similarity(center_keys: torch.Tensor, point_keys: torch.Tensor) -> torch.Tensor:
    """Cosine similarity (Eq. 5, chapter 4).

    ``center_keys`` [B, M, C], ``point_keys`` [B, N, C] -> ``cos`` [B, M, N],
    ``cos[b, m, n] = <k_m, k_n> / (|k_m| |k_n|)`` (norms clamped at 1e-12).
    """
    c = F.normalize(center_keys, dim=-1)
    p = F.normalize(point_keys, dim=-1)
    return torch.matmul(c, p.transpose(-2, -1))


def gate(cos: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """The learned similarity gate of encode layers (Eq. 5/7): ``sigmoid(beta + alpha * cos)``.

    Any shape; ``alpha`` and ``beta`` are scalars (shape ``[1]``). With ``alpha < 0``
    the gate *decreases* with similarity, so the argmax over the gate picks the
    least similar center: FEC assigns by the gate, not by the raw cosine.
    """
    return torch.sigmoid(beta + alpha * cos)


def assign(scores: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Hard assignment (Eq. 5, chapter 5): every point joins its best center.

    ``scores`` [B, M, N] -> ``(best [B, N], index [B, N])`` with
    ``index[b, n] = argmax_m scores[b, m, n]`` and ``best`` the winning score
    (differentiable; the index is not).
    """
    best, index = scores.max(dim=1)
    return best, index


def assign_nearest(center_keys: torch.Tensor, point_keys: torch.Tensor,
                   max_elements: int = 1 << 24) -> torch.Tensor:
    """Hard cosine assignment without the full similarity matrix (chapter 8, performance).

    ``center_keys`` [B, M, C], ``point_keys`` [B, N, C] -> ``index`` [B, N], equal to
    ``assign(similarity(center_keys, point_keys))[1]``, computed over tiles of points
    so that at most ``max_elements`` similarities exist at once. No gradient
    flows through an argmax, so it runs without autograd.
    """
    b, m, _ = center_keys.shape
    n = point_keys.shape[1]
    with torch.no_grad():
        c = F.normalize(center_keys, dim=-1)
        step = max(1, max_elements // max(1, b * m))
        if step >= n:
            return torch.matmul(c, F.normalize(point_keys, dim=-1).transpose(-2, -1)).argmax(dim=1)
        parts = []
        for s in range(0, n, step):
            p = F.normalize(point_keys[:, s:s + step], dim=-1)
            parts.append(torch.matmul(c, p.transpose(-2, -1)).argmax(dim=1))
        return torch.cat(parts, dim=1)


def one_hot(index: torch.Tensor, num_centers: int, dtype=torch.float32) -> torch.Tensor:
    """The dense assignment mask of the literal path: ``index`` [B, N] -> [B, M, N] with
    ``mask[b, m, n] = 1`` iff point ``n`` belongs to center ``m``."""
    return F.one_hot(index, num_centers).transpose(1, 2).to(dtype)


# --------------------------------------------------------------------------- Eq. 6
def aggregate(values: torch.Tensor, center_values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Aggregation (Eq. 6, chapter 6), scatter form.

    ``values`` [B, N, D], ``center_values`` [B, M, D], ``index`` [B, N] ->
    representatives [B, M, D], ``r_m = (c_m + sum_{n: index_n = m} v_n) / (1 + |m|)``.
    The center value counts as one member, so an empty cluster keeps its center.
    Uses a scatter-add (native ``index_add_`` or ``torch_scatter``), no dense mask.
    """
    b, m, d = center_values.shape
    n = values.shape[1]
    flat = (index + torch.arange(b, device=index.device).unsqueeze(1) * m).reshape(-1)
    sums = _scatter_sum(values.reshape(b * n, d), flat, b * m).reshape(b, m, d)
    counts = torch.zeros(b * m, device=values.device, dtype=values.dtype)
    counts = counts.index_add_(0, flat, torch.ones_like(flat, dtype=values.dtype)).reshape(b, m, 1)
    return (sums + center_values) / (counts + 1.0)


def aggregate_dense(values: torch.Tensor, center_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Aggregation (Eq. 6), literal form with the one-hot ``mask`` [B, M, N]:
    ``R = (C + mask @ V) / (1 + mask.sum(-1))``. Same shapes as :func:`aggregate`."""
    return (torch.bmm(mask, values) + center_values) / (mask.sum(dim=-1, keepdim=True) + 1.0)


# --------------------------------------------------------------------------- Eq. 7
def dispatch(representatives: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Dispatch (Eq. 7, chapter 7), gather form.

    ``representatives`` [B, M, D], ``index`` [B, N], ``weight`` [B, N] (the winning
    gate value) -> [B, N, D], ``out_n = weight_n * r_{index_n}``.
    """
    d = representatives.shape[-1]
    picked = torch.gather(representatives, 1, index.unsqueeze(-1).expand(-1, -1, d))
    return picked * weight.unsqueeze(-1)


def dispatch_dense(representatives: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Dispatch (Eq. 7), literal form: ``out_n = sum_m weights[m, n] * r_m`` with the masked
    gate ``weights`` [B, M, N] (zero outside the winning center). Builds the dense
    ``[B, M, N, D]`` product, as written in the paper's pseudo code."""
    return (representatives.unsqueeze(2) * weights.unsqueeze(-1)).sum(dim=1)


# --------------------------------------------------------------------------- layers
def cluster_encode(keys: torch.Tensor, values: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                   grid: Tuple[int, int], literal: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """One clustering *encode* step (Eqs. 4-7, Algorithm S1 ``encoding``), per head and region.

    ``keys`` [B, C, W, H], ``values`` [B, D, W, H] -> ``(out [B, N, D], index [B, N])``:
    centers by pooling to ``grid``, gated cosine similarity, argmax over the gate,
    aggregation, dispatch. ``literal=True`` uses the dense mask and dense dispatch.
    """
    ck, cv = to_points(centers(keys, grid)), to_points(centers(values, grid))
    pk, pv = to_points(keys), to_points(values)
    scores = gate(similarity(ck, pk), alpha, beta)  # [B, M, N]
    best, index = assign(scores)
    if literal:
        mask = one_hot(index, ck.shape[1], scores.dtype)
        reps = aggregate_dense(pv, cv, mask)
        return dispatch_dense(reps, scores * mask), index
    reps = aggregate(pv, cv, index)
    return dispatch(reps, index, best), index


def cluster_pool(keys: torch.Tensor, values: torch.Tensor, literal: bool = False
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """One clustering *pooling* step (Eqs. 4-6, Algorithm S1 ``pooling``, chapter 8).

    ``keys`` [B, C, W, H], ``values`` [B, D, W, H] with even ``W``, ``H`` ->
    ``(representatives [B, D, W/2, H/2], index [B, N])``: ``N/4`` centers by 2x2
    pooling, every point joins its most similar center (plain cosine, no gate),
    representatives by aggregation. The fast path tiles the similarity
    (:func:`assign_nearest`) instead of building ``[B, N/4, N]``.
    """
    b, _, w, h = keys.shape
    if w % 2 or h % 2:
        raise ValueError(f"cluster pooling needs an even feature map, got {w}x{h}")
    grid = (w // 2, h // 2)
    ck, cv = to_points(centers(keys, grid)), to_points(centers(values, grid))
    pk, pv = to_points(keys), to_points(values)
    if literal:
        _, index = assign(similarity(ck, pk))
        reps = aggregate_dense(pv, cv, one_hot(index, ck.shape[1], pv.dtype))
    else:
        index = assign_nearest(ck, pk)
        reps = aggregate(pv, cv, index)
    return reps.transpose(1, 2).reshape(b, -1, grid[0], grid[1]), index
