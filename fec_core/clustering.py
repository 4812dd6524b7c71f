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
the same numbers and gradients. Chapter 12 (performance) explains the fast path's
internals: the layer functions keep channels first (``[B, D, N]``) so that the
scatter and the gather read and write contiguous rows and the output needs no
transpose copy, and the pooling assignment runs over tiles with a running maximum
(:func:`assign_nearest`; on CUDA a fused Triton kernel, :mod:`fec_core.kernels`),
so that its memory grows linearly with the number of pixels.

Shapes: ``B`` batch (times heads and fold regions), ``N`` points, ``M`` centers,
``C`` key channels, ``D`` value channels. Feature maps are ``[B, C, W, H]`` in the
official code's naming: ``W`` is the *first* spatial axis (the rows, top to bottom)
and ``H`` the second (the columns), so ``W`` here is what images usually call the
height; points are numbered row-major, ``n = row * H + col``. Where other modules write
``[B, C, H, W]`` (PyTorch's usual letters), ``H`` is the rows: the same axes, other
letters. The book's notation page states this once.
"""
from typing import Tuple

import torch
import torch.fx
import torch.nn.functional as F

from . import config as _config
from . import kernels as _kernels
from .config import HAS_TORCH_SCATTER, scatter_backend, set_scatter_backend  # re-exported

__all__ = [
    "centers", "similarity", "gate", "assign", "assign_nearest", "one_hot",
    "aggregate", "aggregate_dense", "dispatch", "dispatch_dense",
    "cluster_encode", "cluster_pool", "fold", "unfold", "to_points",
    "scatter_backend", "set_scatter_backend", "HAS_TORCH_SCATTER",
]

if HAS_TORCH_SCATTER:  # the optional backend (fec_core.config chooses)
    from torch_scatter import scatter_sum as _ts_scatter_sum  # type: ignore
else:  # pragma: no cover - depends on the environment
    _ts_scatter_sum = None


def _scatter_sum(src: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """Sum rows of ``src`` [K, D] into ``size`` rows by ``index`` [K]."""
    if _config.scatter_backend() == "torch_scatter":
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
    """Hard cosine assignment without the full similarity matrix (chapter 8; chapter 12, performance).

    ``center_keys`` [B, M, C], ``point_keys`` [B, N, C] -> ``index`` [B, N], equal to
    ``assign(similarity(center_keys, point_keys))[1]`` (Eq. 5 with the plain cosine of
    pooling layers), computed over tiles of points (and, when ``B * M`` alone exceeds
    the budget, of centers, merged by a running maximum that keeps the first index on
    ties, as ``max`` does) so that at most ``max_elements`` similarities exist at once:
    memory grows linearly with ``N``. On CUDA a fused Triton kernel
    (:func:`fec_core.kernels.cosine_argmax`) computes similarity and argmax together
    when Triton is available. No gradient flows through an argmax, so it runs without
    autograd.
    """
    if not torch.jit.is_scripting():
        _check_assign_inputs(center_keys, point_keys, max_elements)
    with torch.no_grad():
        # Normalized exactly as similarity() does, so both paths compare the same numbers.
        c = F.normalize(center_keys, dim=-1)
        p = F.normalize(point_keys, dim=-1)
        return _cosine_argmax(c, p, max_elements)


@torch.jit.unused
def _check_assign_inputs(center_keys: torch.Tensor, point_keys: torch.Tensor, max_elements: int) -> None:
    if center_keys.ndim != 3 or point_keys.ndim != 3 or center_keys.shape[0] != point_keys.shape[0] \
            or center_keys.shape[2] != point_keys.shape[2]:
        raise ValueError(f"assign_nearest expects center_keys [B, M, C] and point_keys [B, N, C], "
                         f"got {tuple(center_keys.shape)} and {tuple(point_keys.shape)}")
    if max_elements < 1:
        raise ValueError(f"max_elements must be positive, got {max_elements}")


_MIN_TILE = 128  # fewest points per tile before the batch or the centers are split too
_CPU_TILE = 1 << 20  # on CPU, tiles of at most 4 MB of float32 (stay in cache): measured faster


def _tile_budget(x: torch.Tensor, max_elements: int) -> int:
    if torch.jit.is_scripting():  # TorchScript reads no module globals: the value of _CPU_TILE
        return max_elements if x.is_cuda else min(max_elements, 1 << 20)
    return max_elements if x.is_cuda else min(max_elements, _CPU_TILE)


def _min_tile(n: int) -> int:
    if torch.jit.is_scripting():  # the value of _MIN_TILE
        return min(n, 128)
    return min(n, _MIN_TILE)


def _cosine_argmax(c: torch.Tensor, p: torch.Tensor, max_elements: int) -> torch.Tensor:
    """``argmax_m <c_m, p_n>`` for unit vectors ``c`` [B, M, C], ``p`` [B, N, C] -> [B, N].

    Each tile is a ``[b_t, n_t, m_t]`` product ``p_t @ c_t^T`` (points in rows, so the
    maximum runs over the contiguous last axis) reduced at once, with
    ``b_t * n_t * m_t <= max_elements``. The batch is split first, then the points,
    and only when one image's ``M`` centers times ``128`` points exceed the budget,
    the centers, merged with a strict ``>`` (first index wins ties; NaN wins, as in
    ``max``).
    """
    if not torch.jit.is_scripting():
        if _kernels.use_kernel(c, p):
            return _kernels.cosine_argmax(c, p)
        if torch.compiler.is_compiling() and not isinstance(c.shape[0], int):
            # traced with a symbolic batch (torch.export, dynamic torch.compile): tiles sized
            # for one image, so that the graph holds for any batch size
            return _cosine_argmax_tiles(c, p, _tile_budget(c, max_elements), 1)
    budget = _tile_budget(c, max_elements)
    b, m, _ = c.shape
    min_tile = _min_tile(p.shape[1])
    if b > 1 and b * m * min_tile > budget:  # split the batch
        bt = max(1, budget // (m * min_tile))
        parts = []
        for i in range(0, b, bt):
            ci, pi = c[i:i + bt], p[i:i + bt]
            parts.append(_cosine_argmax_tiles(ci, pi, budget, ci.shape[0]))
        return torch.cat(parts, dim=0)
    return _cosine_argmax_tiles(c, p, budget, b)  # one product when it fits the budget


def _cosine_argmax_tiles(c: torch.Tensor, p: torch.Tensor, budget: int, b: int) -> torch.Tensor:
    """:func:`_cosine_argmax` for a batch whose ``b * M * min(N, 128)`` fits the budget
    (or ``b == 1``): tiles of points, and of centers when one tile of points is too big.
    ``b``: the batch size the tiles are sized for (``c.shape[0]``, or 1 under tracing, where
    the batch is symbolic: the tiles then depend on the image size only)."""
    m = c.shape[1]
    n = p.shape[1]
    if b * m * n <= budget:
        return torch.matmul(p, c.transpose(1, 2)).max(dim=-1)[1]
    min_tile = _min_tile(n)
    ct = c.transpose(1, 2)
    tn = budget // (b * m)
    parts = []
    if tn >= min_tile:  # tiles of points only: each tile sees every center
        for s in range(0, n, tn):
            parts.append(torch.matmul(p[:, s:s + tn], ct).max(dim=-1)[1])
        return torch.cat(parts, dim=1)
    tn = min_tile
    tm = max(1, budget // (b * tn))
    for s in range(0, n, tn):
        pt = p[:, s:s + tn]
        best, index = torch.matmul(pt, ct[:, :, :tm]).max(dim=-1)
        for t in range(tm, m, tm):
            val, idx = torch.matmul(pt, ct[:, :, t:t + tm]).max(dim=-1)
            better = (val > best) | (val.isnan() & ~best.isnan())
            best = torch.where(better, val, best)
            index = torch.where(better, idx + t, index)
        parts.append(index)
    return torch.cat(parts, dim=1)


def one_hot(index: torch.Tensor, num_centers: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
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
    """Dispatch (Eq. 7), literal form: ``out_n = sum_m weights[m, n] * r_m``, ``weights``
    [B, M, N]. Builds the dense ``[B, M, N, D]`` product, the form of the supplement's
    Algorithm S1 (``(R.unsqueeze(1) * refined_M.unsqueeze(-1)).sum(0)``).

    The model passes the *masked* gate (zero outside each point's winning center), as the
    official code does and the released weights were trained with; Algorithm S1 as
    printed passes the unmasked gate ``sigmoid(alpha * M + beta)`` (every representative
    reaches every point) and assigns by the raw cosine rather than by the gate. Chapter 7
    compares the three side by side."""
    return (representatives.unsqueeze(2) * weights.unsqueeze(-1)).sum(dim=1)


# --------------------------------------------------------------------------- fast path internals
# The layer functions below keep channels first: the key and value maps arrive as
# [B, D, W, H] (contiguous from the 1x1 convolutions), so [B, D, N] is a free view.
# Scattering and gathering along the last axis of [B, D, N] reads and writes
# contiguous rows, and the dispatched output is already in the layout the next
# convolution wants (no transpose copy). Public aggregate() / dispatch() keep the
# points-first [B, N, D] form of the book's chapters 6 and 7.

def _aggregate_cf(values: torch.Tensor, center_values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Aggregation (Eq. 6), channels first: ``values`` [B, D, N], ``center_values`` [B, D, M],
    ``index`` [B, N] -> representatives [B, D, M], ``(c_m + sum_{n in m} v_n) / (1 + |m|)``.

    Same numbers as :func:`aggregate` (to float rounding); one scatter-add along ``N``
    for the sums and one for the counts, no ``[B, M, N]`` mask, no transpose copy.
    Half and bfloat16 values are summed in float32 (as a matmul would accumulate them)
    and the result is returned in the values' type.
    """
    b, d, m = center_values.shape
    half = values.dtype == torch.float16 or values.dtype == torch.bfloat16
    src = values.float() if half else values
    rows = index.unsqueeze(1).expand(-1, d, -1)  # [B, D, N]: the cluster of every value
    if torch.jit.is_scripting():  # TorchScript: the native scatter
        sums = src.new_zeros(b, d, m).scatter_add_(2, rows, src)
    elif _config.scatter_backend() == "torch_scatter":
        sums = _ts_scatter_sum(src, rows, dim=2, dim_size=m)
    else:
        sums = src.new_zeros(b, d, m).scatter_add_(2, rows, src)
    counts = src.new_zeros(b, m).scatter_add_(1, index, src.new_ones([1]).expand(index.shape))
    reps = (sums + center_values) / (counts.unsqueeze(1) + 1.0)
    return reps.to(values.dtype) if half else reps


def _dispatch_cf(representatives: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Dispatch (Eq. 7), channels first: ``representatives`` [B, D, M], ``index`` [B, N],
    ``weight`` [B, N] -> [B, D, N], ``out[:, n] = weight_n * r_{index_n}`` (a gather)."""
    d = representatives.shape[1]
    picked = torch.gather(representatives, 2, index.unsqueeze(1).expand(-1, d, -1))
    return picked * weight.unsqueeze(1)


# --------------------------------------------------------------------------- layers
def cluster_encode(keys: torch.Tensor, values: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                   grid: Tuple[int, int], literal: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """One clustering *encode* step (Eqs. 4-7, Algorithm S1 ``encoding``), per head and region.

    ``keys`` [B, C, W, H], ``values`` [B, D, W, H] -> ``(out [B, N, D], index [B, N])``:
    centers by pooling to ``grid``, gated cosine similarity, argmax over the gate,
    aggregation, dispatch. ``literal=True`` uses the dense mask and dense dispatch.
    The fast path returns ``out`` as a ``[B, N, D]`` view of a channels-first
    ``[B, D, N]`` tensor (so ``out.transpose(1, 2)`` is contiguous, chapter 12).
    """
    ck_map, cv_map = centers(keys, grid), centers(values, grid)
    scores = gate(similarity(to_points(ck_map), to_points(keys)), alpha, beta)  # [B, M, N], M small
    best, index = assign(scores)
    if literal:
        pv, cv = to_points(values), to_points(cv_map)
        mask = one_hot(index, cv.shape[1], scores.dtype)
        reps = aggregate_dense(pv, cv, mask)
        return dispatch_dense(reps, scores * mask), index
    # fast path, channels first: [B, D, N] views, no mask, no [B, M, N, D] product
    reps = _aggregate_cf(values.flatten(2), cv_map.flatten(2), index)  # [B, D, M]
    out = _dispatch_cf(reps, index, best)  # [B, D, N]
    return out.transpose(1, 2), index  # [B, N, D] view of a channels-first tensor


def cluster_pool(keys: torch.Tensor, values: torch.Tensor, literal: bool = False
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """One clustering *pooling* step (Eqs. 4-6, Algorithm S1 ``pooling``, chapter 8).

    ``keys`` [B, C, W, H], ``values`` [B, D, W, H] with even ``W``, ``H`` ->
    ``(representatives [B, D, W/2, H/2], index [B, N])``: ``N/4`` centers by 2x2
    pooling, every point joins its most similar center (plain cosine, no gate),
    representatives by aggregation. The fast path tiles the similarity
    (:func:`assign_nearest`) instead of building ``[B, N/4, N]``, so its memory
    grows linearly with ``N`` (its compute stays quadratic: every point is compared
    with every center of its region).
    """
    b, _, w, h = keys.shape
    if w % 2 or h % 2:
        raise ValueError(f"cluster pooling needs an even feature map, got {w}x{h}")
    grid = (w // 2, h // 2)
    ck_map, cv_map = centers(keys, grid), centers(values, grid)
    if literal:
        ck, cv = to_points(ck_map), to_points(cv_map)
        pk, pv = to_points(keys), to_points(values)
        _, index = assign(similarity(ck, pk))
        reps = aggregate_dense(pv, cv, one_hot(index, ck.shape[1], pv.dtype))
        return reps.transpose(1, 2).reshape(b, -1, grid[0], grid[1]), index
    index = assign_nearest(to_points(ck_map), to_points(keys))
    reps = _aggregate_cf(values.flatten(2), cv_map.flatten(2), index)  # [B, D, M], channels first
    return reps.reshape(b, -1, grid[0], grid[1]), index


# FX (torch.fx, torchvision's feature extraction, timm's FX features): these functions
# branch on tensor shapes, so a symbolic trace records each as one call instead of
# tracing into it. TorchScript and torch.compile / torch.export see them as usual.
for _name in ("fold", "unfold", "centers", "assign_nearest", "cluster_encode", "cluster_pool"):
    torch.fx.wrap(_name)
del _name
