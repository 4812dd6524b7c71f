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
   and :func:`aggregate_literal` (literal, with the one-hot mask).
5. **dispatch** (Eq. 7, chapter 7, encode layers only): every point receives
   its representative scaled by its gate value. :func:`dispatch` (gather) and
   :func:`dispatch_literal` (literal, the ``[B, M, N, D]`` product of the paper).

:func:`cluster_encode` and :func:`cluster_pool` chain the steps for the two
kinds of layer (chapter 8 for pooling). Both have a *literal* path that mirrors
the math with dense tensors, and a *fast* path (the default) that never builds
the dense ``[B, M, N]`` mask nor the ``[B, M, N, D]`` dispatch product, and, for
pooling, never the ``[B, N/4, N]`` similarity. Tests check that both paths give
the same numbers and gradients. Chapter 12 (performance) explains the fast path's
internals: the layer functions call :func:`aggregate` and :func:`dispatch` with
``channels_first=True`` (``[B, D, N]``, the layout the 1x1 convolutions produce) so that
the scatter and the gather read and write contiguous rows and the output needs no
transpose copy, and the pooling assignment runs over tiles with a running maximum
(:func:`assign_nearest`; on CUDA a fused Triton kernel, :mod:`fec_core.kernels`),
so that its memory grows linearly with the number of pixels. On CUDA the encode step after
the center pooling runs as one fused Triton kernel too (:func:`fec_core.kernels.fused_encode`:
the same equations, forward and backward).

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
    "centers", "similarity", "unit", "gate", "assign", "assign_nearest", "one_hot",
    "aggregate", "aggregate_literal", "dispatch", "dispatch_literal",
    "cluster_encode", "cluster_pool", "fold", "unfold", "to_points",
    "scatter_backend", "set_scatter_backend", "HAS_TORCH_SCATTER",
]

if HAS_TORCH_SCATTER:  # the optional backend (fec_core.config chooses)
    from torch_scatter import scatter_sum as _ts_scatter_sum  # type: ignore
else:  # pragma: no cover - depends on the environment
    _ts_scatter_sum = None


# --------------------------------------------------------------------------- layout
def fold(x: torch.Tensor, fold_w: int, fold_h: int) -> torch.Tensor:
    """Region folding: split ``[B, C, W, H]`` into ``fold_w x fold_h`` regions,
    ``[B * fold_w * fold_h, C, W / fold_w, H / fold_h]`` (region index row-major):
    ``fold_w`` regions down the rows (``W``, the first spatial axis, as in the official
    code) and ``fold_h`` across the columns.

    Clustering then happens inside each region (chapter 5). The sizes must divide.
    """
    if fold_w == 1 and fold_h == 1:
        return x
    b, c, rows, cols = x.shape
    if rows % fold_w or cols % fold_h:
        raise ValueError(f"feature map {rows}x{cols} cannot be folded into {fold_w}x{fold_h} regions")
    x = x.reshape(b, c, fold_w, rows // fold_w, fold_h, cols // fold_h)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b * fold_w * fold_h, c, rows // fold_w, cols // fold_h)


def unfold(x: torch.Tensor, fold_w: int, fold_h: int) -> torch.Tensor:
    """Inverse of :func:`fold`: ``[B * fold_w * fold_h, C, rows, cols]`` (one region each)
    -> ``[B, C, fold_w * rows, fold_h * cols]``."""
    if fold_w == 1 and fold_h == 1:
        return x
    bf, c, rows, cols = x.shape  # one region's rows and columns
    b = bf // (fold_w * fold_h)
    x = x.reshape(b, fold_w, fold_h, c, rows, cols).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, fold_w * rows, fold_h * cols)


def to_points(x: torch.Tensor) -> torch.Tensor:
    """A feature map ``[B, C, W, H]`` as a set of points ``[B, N, C]``, ``N = W * H`` row-major."""
    return x.flatten(2).transpose(1, 2)


# --------------------------------------------------------------------------- Eq. 4
def centers(x: torch.Tensor, proposal: Tuple[int, int]) -> torch.Tensor:
    """Center initialization (Eq. 4, chapter 3): adaptive average pooling.

    ``x`` [B, C, W, H] -> [B, C, gw, gh] for the center grid ``proposal = (gw, gh)`` (the
    official code's ``proposal_w``, ``proposal_h``). Where the grid divides the map this is a
    plain average pooling (identical windows, fewer kernels); otherwise PyTorch's adaptive
    pooling, whose windows may overlap.
    """
    gw, gh = proposal
    rows, cols = x.shape[-2:]
    if rows % gw == 0 and cols % gh == 0:
        if (rows, cols) == (gw, gh):
            return x
        return F.avg_pool2d(x, (rows // gw, cols // gh))
    return F.adaptive_avg_pool2d(x, (gw, gh))


# --------------------------------------------------------------------------- Eq. 5
def similarity(center_keys: torch.Tensor, point_keys: torch.Tensor) -> torch.Tensor:
    """Cosine similarity (Eq. 5, chapter 4).

    ``center_keys`` [B, M, C], ``point_keys`` [B, N, C] -> ``cos`` [B, M, N],
    ``cos[b, m, n] = <k_m, k_n> / (|k_m| |k_n|)`` (norms clamped at 1e-12).
    """
    return torch.matmul(unit(center_keys), unit(point_keys).transpose(-2, -1))


def unit(x: torch.Tensor) -> torch.Tensor:
    """``x / max(|x|, 1e-12)`` along the last axis: the unit vectors of the cosine (Eq. 5),
    ``F.normalize(x, dim=-1)`` up to rounding.

    The norm is ``sqrt(sum(x * x))``, summed in float32 for half and bfloat16 inputs: on a
    CPU, ``torch.linalg.vector_norm`` (inside ``F.normalize``) is up to 30 times slower when,
    as here, the channels are the strided axis of a channels-first map (chapter 12).
    """
    xf = x.float() if x.dtype == torch.float16 or x.dtype == torch.bfloat16 else x
    norm = xf.mul(xf).sum(dim=-1, keepdim=True).sqrt().clamp_min(1e-12)
    return x / norm.to(x.dtype)


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
        return _cosine_argmax(unit(center_keys), unit(point_keys), max_elements)


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
def aggregate(values: torch.Tensor, center_values: torch.Tensor, index: torch.Tensor,
              channels_first: bool = False) -> torch.Tensor:
    """Aggregation (Eq. 6, chapter 6), scatter form.

    ``values`` [B, N, D], ``center_values`` [B, M, D], ``index`` [B, N] ->
    representatives [B, M, D], ``r_m = (c_m + sum_{n: index_n = m} v_n) / (1 + |m|)``.
    The center value counts as one member, so an empty cluster keeps its center.
    One scatter-add of the values into their clusters (native ``scatter_add_`` or
    ``torch_scatter``), one of ones for the sizes: no dense mask.

    ``channels_first=True`` is the layout the model runs (chapter 12): ``values``
    [B, D, N], ``center_values`` [B, D, M] -> [B, D, M]. The key and value maps come out of
    1x1 convolutions as [B, D, W, H], so [B, D, N] is a free view and the scatter writes
    contiguous rows. Points-first inputs are handled as transposed views of the same
    computation. Half and bfloat16 values are summed in float32 (as a matrix product
    would accumulate them) and returned in their own type.
    """
    if not channels_first:  # [B, N, D] as a [B, D, N] view
        values, center_values = values.transpose(1, 2), center_values.transpose(1, 2)
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
    reps = reps.to(values.dtype) if half else reps
    return reps if channels_first else reps.transpose(1, 2)


def aggregate_literal(values: torch.Tensor, center_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Aggregation (Eq. 6), literal form with the one-hot ``mask`` [B, M, N]:
    ``R = (C + mask @ V) / (1 + mask.sum(-1))``. Same shapes as :func:`aggregate`."""
    return (torch.bmm(mask, values) + center_values) / (mask.sum(dim=-1, keepdim=True) + 1.0)


# --------------------------------------------------------------------------- Eq. 7
def dispatch(representatives: torch.Tensor, index: torch.Tensor, weight: torch.Tensor,
             channels_first: bool = False) -> torch.Tensor:
    """Dispatch (Eq. 7, chapter 7), gather form.

    ``representatives`` [B, M, D], ``index`` [B, N], ``weight`` [B, N] (the winning
    gate value) -> [B, N, D], ``out_n = weight_n * r_{index_n}``.
    ``channels_first=True`` (the model's layout, chapter 12): ``representatives``
    [B, D, M] -> [B, D, N], already the layout of the next 1x1 convolution. The same
    gather along the other axis.
    """
    if not channels_first:  # [B, M, D] -> [B, N, D]
        d = representatives.shape[-1]
        picked = torch.gather(representatives, 1, index.unsqueeze(-1).expand(-1, -1, d))
        return picked * weight.unsqueeze(-1)
    d = representatives.shape[1]
    picked = torch.gather(representatives, 2, index.unsqueeze(1).expand(-1, d, -1))
    return picked * weight.unsqueeze(1)


def dispatch_literal(representatives: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Dispatch (Eq. 7), literal form: ``out_n = sum_m weights[m, n] * r_m``, ``weights``
    [B, M, N]. Builds the dense ``[B, M, N, D]`` product, the form of the supplement's
    Algorithm S1 (``(R.unsqueeze(1) * refined_M.unsqueeze(-1)).sum(0)``).

    The model passes the *masked* gate (zero outside each point's winning center), as the
    official code does and the released weights were trained with; Algorithm S1 as
    printed passes the unmasked gate ``sigmoid(alpha * M + beta)`` (every representative
    reaches every point) and assigns by the raw cosine rather than by the gate. Chapter 7
    compares the three side by side."""
    return (representatives.unsqueeze(2) * weights.unsqueeze(-1)).sum(dim=1)


# --------------------------------------------------------------------------- layers
def cluster_encode(keys: torch.Tensor, values: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                   proposal: Tuple[int, int], literal: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """One clustering *encode* step (Eqs. 4-7, Algorithm S1 ``encoding``), per head and region.

    ``keys`` [B, C, W, H], ``values`` [B, D, W, H] -> ``(out [B, N, D], index [B, N])``:
    centers by pooling to the center grid ``proposal``, gated cosine similarity, argmax over the gate,
    aggregation, dispatch. ``literal=True`` uses the one-hot mask (:func:`aggregate_literal`) and the
    ``[B, M, N, D]`` dispatch (:func:`dispatch_literal`).
    The fast path returns ``out`` as a ``[B, N, D]`` view of a channels-first
    ``[B, D, N]`` tensor (so ``out.transpose(1, 2)`` is contiguous, chapter 12); on CUDA,
    when Triton is installed, one fused kernel runs its steps after the center pooling
    (:func:`fec_core.kernels.fused_encode`, the same equations).
    """
    ck_map, cv_map = centers(keys, proposal), centers(values, proposal)
    if not literal and not torch.jit.is_scripting():
        if _kernels.use_encode_kernel(keys, values, proposal[0] * proposal[1], alpha, beta):  # fused (chapter 12)
            out, index = _kernels.fused_encode(keys.flatten(2), unit(to_points(ck_map)).transpose(1, 2),
                                               values.flatten(2), cv_map.flatten(2), alpha, beta)
            return out.transpose(1, 2), index
    scores = gate(similarity(to_points(ck_map), to_points(keys)), alpha, beta)  # [B, M, N], M small
    best, index = assign(scores)
    if literal:
        pv, cv = to_points(values), to_points(cv_map)
        mask = one_hot(index, cv.shape[1], scores.dtype)
        reps = aggregate_literal(pv, cv, mask)
        return dispatch_literal(reps, scores * mask), index
    # fast path, channels first: [B, D, N] views, no mask, no [B, M, N, D] product
    reps = aggregate(values.flatten(2), cv_map.flatten(2), index, channels_first=True)  # [B, D, M]
    out = dispatch(reps, index, best, channels_first=True)  # [B, D, N]
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
    b, _, rows, cols = keys.shape
    if rows % 2 or cols % 2:
        raise ValueError(f"cluster pooling needs an even feature map, got {rows}x{cols}")
    proposal = (rows // 2, cols // 2)  # N/4 centers: one per 2x2 window
    ck_map, cv_map = centers(keys, proposal), centers(values, proposal)
    if literal:
        ck, cv = to_points(ck_map), to_points(cv_map)
        pk, pv = to_points(keys), to_points(values)
        _, index = assign(similarity(ck, pk))
        reps = aggregate_literal(pv, cv, one_hot(index, ck.shape[1], pv.dtype))
        return reps.transpose(1, 2).reshape(b, -1, proposal[0], proposal[1]), index
    index = assign_nearest(to_points(ck_map), to_points(keys))
    reps = aggregate(values.flatten(2), cv_map.flatten(2), index, channels_first=True)  # [B, D, M]
    return reps.reshape(b, -1, proposal[0], proposal[1]), index


# FX (torch.fx, torchvision's feature extraction, timm's FX features): these functions
# branch on tensor shapes, so a symbolic trace records each as one call instead of
# tracing into it. TorchScript and torch.compile / torch.export see them as usual.
for _name in ("fold", "unfold", "centers", "assign_nearest", "cluster_encode", "cluster_pool"):
    torch.fx.wrap(_name)
del _name
