"""A fused Triton kernel for one clustering *encode* step (Eqs. 5-7, chapter 12).

The PyTorch fast path of :func:`fec_core.clustering.cluster_encode` runs its steps as
separate passes over memory: normalize the point keys (seven element-wise passes), the
``[B, M, N]`` cosine, the gate ``sigmoid(beta + alpha * cos)`` (three more passes over
``[B, M, N]``), the argmax over ``M``, the scatter of the values (after a float32 copy),
the gather and the multiplication by the gate; in training each saves its result and
its backward is as many passes again. :func:`fused_encode` does the per-point work in
two kernels forward and two backward, each reading every point's key and value once:

* **assign and aggregate** (one program: a block of points of one batch element): the
  norm and unit vector of every point key, its cosine with all ``M`` centers, the gate,
  the argmax (Eq. 5), then the block's sums of values per center and member counts
  (Eq. 6) as one product with the block's one-hot assignment, added atomically into a
  ``[B, D, M]`` float32 buffer. Nothing of size ``M x N`` reaches memory.
* **dispatch** (Eq. 7): ``out_n = w_n * r_{index_n}``, the representatives
  ``r = (sums + c) / (counts + 1)`` (formed in PyTorch: ``[B, D, M]``, small) gathered
  from cache.
* **backward, per point**: the gradient of the gate value (``<g_n, r_{index_n}>``), of
  the sigmoid, of ``alpha`` and ``beta`` (per-block partial sums, added up in PyTorch),
  of the winning cosine, of the point keys through the normalization
  (``(du - u <u, du>) / |x|``, recomputing ``u`` from the keys), and, by one-hot products
  added atomically, of the representatives and of the center keys.
* **backward, dispatch**: the gradient of the values is the representatives' gradient
  divided by ``counts + 1``, gathered back to the points (the dispatch kernel again).

Gradients reach ``alpha``, ``beta``, the point keys, the unit center keys (and, through
PyTorch's autograd outside the op, the pooled center keys and their normalization),
the values and the center values, exactly as the PyTorch path's autograd through the
argmax-selected gate: only each point's winning center receives a gradient.

Precision: the same equations in the same order as the PyTorch path, with every
intermediate rounded to the type the PyTorch path would store it in: the norm is summed
in float32 and rounded to the keys' type, as is the unit vector, which is then rounded
to the type of the cosine (the autocast type, as ``matmul`` casts its inputs); products
are summed in float32 (``input_precision="ieee"``, no TF32; half inputs are widened, so
no tensor cores: the kernel is memory-bound) and the cosine is rounded to its type before
the gate, which is computed in the gate's type (float32 for the model's float32
``sim_alpha`` / ``sim_beta``, even under autocast). Sums of values are float32 (as
:func:`~fec_core.clustering.aggregate`), the output is ``r * w`` in the type PyTorch's
promotion gives. The kernel sums the ``C`` products of a cosine, and the members of a
cluster, in its own order, so its values differ from cuBLAS's by rounding, and on an
exact near-tie (two gate values within a rounding step) it may pick the other center:
assignments keep :mod:`fec_core.numerics`' contract, not bit-equality. Ties go to the
lowest center index, like ``torch.max``. The atomic additions make the sums (forward)
and the gradients of representatives and centers (backward) non-deterministic in
their last bits, like PyTorch's ``scatter_add_`` on CUDA.

What it cannot do: it needs Triton, and runs on CUDA tensors (or on CPU tensors in
Triton's interpreter, ``TRITON_INTERPRET=1``, for the tests); keys and values of at
most 128 channels and at most 128 centers (every released setting has 24 or 32
channels and 4 to 100 centers; other inputs take the PyTorch path); scalar ``alpha`` and
``beta``; float32, float16 and bfloat16 only; no double backward (the backward is not
itself differentiable); NaN or infinite inputs are not handled (one infinite value
would spread NaN through the one-hot products of the aggregation). TorchScript takes
the PyTorch path (scripting skips the kernel), ``torch.compile`` and ``torch.export``
keep the kernel as one operator (``fec_core::fused_encode``), ONNX has no form for it
(export from CPU tensors, or with ``FEC_KERNELS=off``). The mode switch is
:func:`fec_core.config.kernel_mode` (``FEC_KERNELS``), shared with the pooling kernel.

Memory traffic, per point and head of fec_small's first stage under bfloat16 autocast
(``scripts/encode_traffic.py``: every operator counted as reading its inputs and writing
its outputs once): the PyTorch path moves 1,725 bytes forward and 4,041 backward in 33
and 59 operators; with the kernel, 305 and 658 in 12 and 26. Of these, the center pooling
(Eq. 4, outside the kernel: it needs every point before the first similarity) is a third
of the forward, and its gradient, added to the kernel's, 60 percent of the backward.
"""
from __future__ import annotations

from typing import Tuple

import torch

from .config import HAS_TRITON, INTERPRET, kernel_mode

__all__ = ["use_encode_kernel", "fused_encode", "MAX_CHANNELS", "MAX_CENTERS"]

if HAS_TRITON:  # fec_core.config detected it
    import triton
    import triton.language as tl

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Largest key / value channels per head and number of centers the kernel serves (one
#: block each); larger layers take the PyTorch path.
MAX_CHANNELS = 128
MAX_CENTERS = 128


def use_encode_kernel(keys: torch.Tensor, values: torch.Tensor, num_centers: int,
                      alpha: torch.Tensor, beta: torch.Tensor) -> bool:
    """Whether :func:`fused_encode` will serve an encode step with these inputs
    (``keys`` [B, C, ...], ``values`` [B, D, ...]) under the current kernel mode."""
    mode = kernel_mode()
    if not HAS_TRITON or mode == "off":
        return False
    if not (keys.is_cuda or INTERPRET) or (mode == "auto" and (not keys.is_cuda or INTERPRET)):
        return False
    if keys.device != values.device or alpha.numel() != 1 or beta.numel() != 1:
        return False
    if any(t.dtype not in _DTYPES for t in (keys, values, alpha, beta)):
        return False
    return keys.shape[1] <= MAX_CHANNELS and values.shape[1] <= MAX_CHANNELS and 1 <= num_centers <= MAX_CENTERS


def _promoted(dtype: torch.dtype, s: torch.Tensor) -> torch.dtype:
    """The type of ``tensor_of(dtype) * s`` under PyTorch's promotion (a 0-dim float ``s``
    does not widen a float tensor)."""
    return dtype if s.dim() == 0 else torch.promote_types(dtype, s.dtype)


def fused_encode(point_keys: torch.Tensor, center_units: torch.Tensor, values: torch.Tensor,
                 center_values: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Similarity, gate, assignment, aggregation and dispatch of one encode step, fused
    (Eqs. 5-7; chapter 12). Differentiable in every float input.

    ``point_keys`` [B, C, N] (raw: normalized inside), ``center_units`` [B, C, M] (unit
    center keys, ``unit(centers)`` of :mod:`fec_core.clustering`), ``values`` [B, D, N],
    ``center_values`` [B, D, M], ``alpha``, ``beta`` one element each ->
    ``(out [B, D, N], index [B, N])``: the encode layer's output channels first and each
    point's center, as the PyTorch fast path computes them::

        gate[m, n] = sigmoid(beta + alpha * <center_units[:, m], unit(point_keys[:, n])>)
        index[n] = argmax_m gate[m, n];  w[n] = gate[index[n], n]
        r[:, m] = (center_values[:, m] + sum_{n: index[n] = m} values[:, n]) / (1 + |m|)
        out[:, n] = w[n] * r[:, index[n]]

    Under autocast the cosine is computed in the autocast type (as ``matmul`` would).
    Raises ``RuntimeError`` without Triton, or for CPU tensors outside the interpreter.
    """
    if not HAS_TRITON:
        raise RuntimeError("fused_encode needs Triton (pip install triton)")
    _check(point_keys, center_units, values, center_values, alpha, beta)
    dev = point_keys.device.type
    if torch.is_autocast_enabled(dev):
        cos_dtype = torch.get_autocast_dtype(dev)
    else:
        cos_dtype = torch.promote_types(point_keys.dtype, center_units.dtype)
    gate_dtype = _promoted(_promoted(cos_dtype, alpha), beta)
    if cos_dtype not in _DTYPES or gate_dtype not in _DTYPES:
        raise TypeError(f"fused_encode supports float32, float16 and bfloat16, got a {cos_dtype} "
                        f"cosine and a {gate_dtype} gate")
    out, index, _, _, _ = _encode_op(point_keys, center_units.to(cos_dtype), values,
                                     center_values.to(values.dtype), alpha.reshape(1).to(gate_dtype),
                                     beta.reshape(1).to(gate_dtype))
    return out, index


def _check(x, c, v, cv, alpha, beta) -> None:
    if x.ndim != 3 or c.ndim != 3 or v.ndim != 3 or cv.ndim != 3:
        raise ValueError("fused_encode expects point_keys [B, C, N], center_units [B, C, M], values [B, D, N] "
                         "and center_values [B, D, M]")
    (b, ch, n), m, d = x.shape, c.shape[2], v.shape[1]
    if tuple(c.shape) != (b, ch, m) or tuple(v.shape) != (b, d, n) or tuple(cv.shape) != (b, d, m):
        raise ValueError(f"fused_encode: shapes do not fit: point_keys {tuple(x.shape)}, center_units "
                         f"{tuple(c.shape)}, values {tuple(v.shape)}, center_values {tuple(cv.shape)}")
    if not 1 <= m <= MAX_CENTERS or ch > MAX_CHANNELS or d > MAX_CHANNELS:
        raise ValueError(f"fused_encode serves 1 to {MAX_CENTERS} centers and at most {MAX_CHANNELS} channels, "
                         f"got {m} centers, {ch} key and {d} value channels")
    if alpha.numel() != 1 or beta.numel() != 1:
        raise ValueError("fused_encode needs one alpha and one beta")
    if any(t.dtype not in _DTYPES for t in (x, v, cv, alpha, beta)):
        raise TypeError("fused_encode supports float32, float16 and bfloat16 tensors")
    if not (x.is_cuda or INTERPRET):
        raise RuntimeError("fused_encode runs on CUDA tensors, or on CPU tensors in Triton's interpreter "
                           "(TRITON_INTERPRET=1 set before starting Python)")


def _pow2(n: int) -> int:
    return max(16, 1 << (max(n, 1) - 1).bit_length())


# --------------------------------------------------------------------------- kernels
if HAS_TRITON:
    @triton.jit
    def _round(x, DTYPE: tl.constexpr):
        """float32 ``x`` rounded to ``DTYPE`` (to nearest, ties to even), as float32. bfloat16
        by its bits, as PyTorch rounds it (Triton's interpreter would truncate)."""
        if DTYPE == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            y = bits.to(tl.float32, bitcast=True)
        else:
            y = x.to(DTYPE).to(tl.float32)
        return y

    @triton.jit
    def _unit_points(x_ptr, b, offs_c, offs_n, C, N, sxb, sxc, sxn):
        """A [BLOCK_C, BLOCK_N] tile of point keys, in float32: (x, |x| clamped, x / |x|)."""
        mask = (offs_c[:, None] < C) & (offs_n[None, :] < N)
        x = tl.load(x_ptr + b * sxb + offs_c[:, None] * sxc + offs_n[None, :] * sxn, mask=mask,
                    other=0.0).to(tl.float32)
        norm = tl.maximum(tl.sqrt(tl.sum(x * x, axis=0)), 1e-12)
        norm = _round(norm, x_ptr.dtype.element_ty)  # unit() divides by the norm in the keys' type
        norm = tl.where(offs_n < N, norm, 1.0)  # padding: no 0 / 0 (1e-12 is 0 in float16)
        u = _round(x / norm[None, :], x_ptr.dtype.element_ty)
        return x, norm, u

    @triton.jit
    def _assign_aggregate_kernel(x_ptr, c_ptr, v_ptr, alpha_ptr, beta_ptr,
                                 index_ptr, best_ptr, sums_ptr, counts_ptr,
                                 N, M, C, D, NB,
                                 sxb, sxc, sxn, scb, scc, scm, svb, svd, svn,
                                 BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                                 BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
        """One program: block ``pid_n`` of BLOCK_N points (of NB) of batch element ``b``.
        Writes index and gate value per point; adds the block's value sums [D, M] and counts
        [M] atomically."""
        pid = tl.program_id(0).to(tl.int64)  # one grid axis: no 65535 limit on the batch
        b, pid_n = pid // NB, pid % NB
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_c = tl.arange(0, BLOCK_C)
        offs_d = tl.arange(0, BLOCK_D)
        n_ok = offs_n < N
        m_ok = offs_m < M
        _, _, u = _unit_points(x_ptr, b, offs_c, offs_n, C, N, sxb, sxc, sxn)
        u = _round(u, c_ptr.dtype.element_ty)  # matmul's inputs in the cosine's (autocast) type
        cen = tl.load(c_ptr + b * scb + offs_c[:, None] * scc + offs_m[None, :] * scm,
                      mask=(offs_c[:, None] < C) & m_ok[None, :], other=0.0).to(tl.float32)
        cos = _round(tl.dot(tl.trans(u), cen, input_precision="ieee"), c_ptr.dtype.element_ty)  # [BN, BM]
        alpha = tl.load(alpha_ptr).to(tl.float32)
        beta = tl.load(beta_ptr).to(tl.float32)
        gate_ty = best_ptr.dtype.element_ty  # each step of sigmoid(beta + alpha * cos) in its type
        z = _round(beta + _round(alpha * cos, gate_ty), gate_ty)
        g = _round(tl.sigmoid(z), gate_ty)
        g = tl.where(m_ok[None, :], g, float("-inf"))
        best, idx = tl.max(g, axis=1, return_indices=True, return_indices_tie_break_left=True)
        tl.store(index_ptr + b * N + offs_n, idx.to(tl.int64), mask=n_ok)
        tl.store(best_ptr + b * N + offs_n, best.to(gate_ty), mask=n_ok)
        onehot = ((idx[:, None] == offs_m[None, :]) & n_ok[:, None]).to(tl.float32)  # [BLOCK_N, BLOCK_M]
        tl.atomic_add(counts_ptr + b * M + offs_m, tl.sum(onehot, axis=0), mask=m_ok)
        val = tl.load(v_ptr + b * svb + offs_d[:, None] * svd + offs_n[None, :] * svn,
                      mask=(offs_d[:, None] < D) & n_ok[None, :], other=0.0).to(tl.float32)
        sums = tl.dot(val, onehot, input_precision="ieee")  # [BLOCK_D, BLOCK_M]: exact one-hot sums
        tl.atomic_add(sums_ptr + b * D * M + offs_d[:, None] * M + offs_m[None, :], sums,
                      mask=(offs_d[:, None] < D) & m_ok[None, :])

    @triton.jit
    def _dispatch_kernel(t_ptr, index_ptr, w_ptr, out_ptr, N, M, D, NB,
                         stb, std, stm, sob, sod, son,
                         HAS_WEIGHT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """``out[b, :, n] = table[b, :, index[b, n]] (* w[b, n])``: Eq. 7 (and the values'
        gradient); the [D, M] table of one batch element stays in cache."""
        pid = tl.program_id(0).to(tl.int64)
        b, pid_n = pid // NB, pid % NB
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        n_ok = offs_n < N
        mask = (offs_d[:, None] < D) & n_ok[None, :]
        idx = tl.load(index_ptr + b * N + offs_n, mask=n_ok, other=0)
        rows = tl.load(t_ptr + b * stb + offs_d[:, None] * std + idx[None, :] * stm, mask=mask, other=0.0)
        rows = rows.to(tl.float32)
        if HAS_WEIGHT:
            rows = rows * tl.load(w_ptr + b * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + b * sob + offs_d[:, None] * sod + offs_n[None, :] * son,
                 _round(rows, out_ptr.dtype.element_ty).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _encode_backward_kernel(g_ptr, x_ptr, c_ptr, r_ptr, alpha_ptr, index_ptr, best_ptr,
                                dx_ptr, dr_ptr, dc_ptr, dab_ptr,
                                N, M, C, D, NB,
                                sgb, sgd, sgn, sxb, sxc, sxn, scb, scc, scm, srb, srd, srm,
                                BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
        """One program: the gradients of BLOCK_N points. Writes d(point keys); adds
        d(representatives) [D, M] and d(center units) [C, M] atomically; writes this
        block's partial sums of d(alpha), d(beta)."""
        pid = tl.program_id(0).to(tl.int64)
        b, pid_n = pid // NB, pid % NB
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_c = tl.arange(0, BLOCK_C)
        offs_d = tl.arange(0, BLOCK_D)
        n_ok = offs_n < N
        m_ok = offs_m < M
        d_mask = (offs_d[:, None] < D) & n_ok[None, :]
        c_mask = (offs_c[:, None] < C) & n_ok[None, :]
        idx = tl.load(index_ptr + b * N + offs_n, mask=n_ok, other=0)
        w = tl.load(best_ptr + b * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + b * sgb + offs_d[:, None] * sgd + offs_n[None, :] * sgn, mask=d_mask,
                    other=0.0).to(tl.float32)
        # out = w * r[index]: d w = <g, r[index]>, d r[m] = sum over members of w g
        r_j = tl.load(r_ptr + b * srb + offs_d[:, None] * srd + idx[None, :] * srm, mask=d_mask,
                      other=0.0).to(tl.float32)
        dw = tl.sum(g * r_j, axis=0)
        onehot = ((idx[:, None] == offs_m[None, :]) & n_ok[:, None]).to(tl.float32)  # [BLOCK_N, BLOCK_M]
        dr = tl.dot(g * w[None, :], onehot, input_precision="ieee")
        tl.atomic_add(dr_ptr + b * D * M + offs_d[:, None] * M + offs_m[None, :], dr,
                      mask=(offs_d[:, None] < D) & m_ok[None, :])
        # w = sigmoid(z), z = beta + alpha * cos of the winning center
        dz = dw * w * (1.0 - w)
        x, norm, u = _unit_points(x_ptr, b, offs_c, offs_n, C, N, sxb, sxc, sxn)
        u_cos = _round(u, c_ptr.dtype.element_ty)
        c_j = tl.load(c_ptr + b * scb + offs_c[:, None] * scc + idx[None, :] * scm, mask=c_mask,
                      other=0.0).to(tl.float32)
        cos = _round(tl.sum(c_j * u_cos, axis=0), c_ptr.dtype.element_ty)
        tl.store(dab_ptr + pid * 2, tl.sum(dz * cos, axis=0))
        tl.store(dab_ptr + pid * 2 + 1, tl.sum(dz, axis=0))
        dcos = dz * tl.load(alpha_ptr).to(tl.float32)
        dc = tl.dot(u_cos * dcos[None, :], onehot, input_precision="ieee")  # [BLOCK_C, BLOCK_M]
        tl.atomic_add(dc_ptr + b * C * M + offs_c[:, None] * M + offs_m[None, :], dc,
                      mask=(offs_c[:, None] < C) & m_ok[None, :])
        # u = x / max(|x|, eps): dx = (du - u <u, du>) / |x|, or du / eps where clamped
        du = c_j * dcos[None, :]
        raw = tl.sqrt(tl.sum(x * x, axis=0))
        proj = tl.where(raw >= 1e-12, tl.sum(u * du, axis=0), 0.0)
        dx = (du - u * proj[None, :]) / norm[None, :]
        dx_ty = dx_ptr.dtype.element_ty
        tl.store(dx_ptr + b * C * N + offs_c[:, None] * N + offs_n[None, :], _round(dx, dx_ty).to(dx_ty), mask=c_mask)


_FWD_BLOCK_N = 128  # points per program, forward
_BWD_BLOCK_N = 64  # backward: more live tiles per program


def _blocks(n: int, cap: int) -> int:
    return min(cap, _pow2(n))


def _out_dtype(v: torch.Tensor, alpha: torch.Tensor) -> torch.dtype:
    return torch.promote_types(v.dtype, alpha.dtype)  # picked (values' type) * gate value


def _forward(x, c, v, cv, alpha, beta):
    b, ch, n = x.shape
    m, d = c.shape[2], v.shape[1]
    dev = x.device
    out = torch.empty(b, d, n, device=dev, dtype=_out_dtype(v, alpha))
    index = torch.zeros(b, n, device=dev, dtype=torch.int64)
    best = torch.empty(b, n, device=dev, dtype=alpha.dtype)
    sums = torch.zeros(b, d, m, device=dev, dtype=torch.float32)
    counts = torch.zeros(b, m, device=dev, dtype=torch.float32)
    if b and n:
        bn = _blocks(n, _FWD_BLOCK_N)
        nb = triton.cdiv(n, bn)
        _assign_aggregate_kernel[(b * nb,)](
            x, c, v, alpha, beta, index, best, sums, counts, n, m, ch, d, nb,
            x.stride(0), x.stride(1), x.stride(2), c.stride(0), c.stride(1), c.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            BLOCK_N=bn, BLOCK_M=_pow2(m), BLOCK_C=_pow2(ch), BLOCK_D=_pow2(d))
    # Eq. 6 as fec_core.clustering.aggregate forms it: float32 sums plus the center value
    reps = ((sums + cv) / (counts.unsqueeze(1) + 1.0)).to(v.dtype)
    _dispatch(reps, index, best, out)
    return out, index, best, reps, counts


def _dispatch(table, index, weight, out):
    b, d, n = out.shape
    if not (b and n):
        return out
    bn = _blocks(n, _FWD_BLOCK_N)
    nb = triton.cdiv(n, bn)
    _dispatch_kernel[(b * nb,)](
        table, index, weight if weight is not None else index, out, n, table.shape[2], d, nb,
        table.stride(0), table.stride(1), table.stride(2), out.stride(0), out.stride(1), out.stride(2),
        HAS_WEIGHT=weight is not None, BLOCK_N=bn, BLOCK_D=_pow2(d))
    return out


def _backward(grad, x, c, alpha, index, best, reps, counts):
    b, ch, n = x.shape
    m, d = c.shape[2], reps.shape[1]
    dev = x.device
    dx = torch.empty(b, ch, n, device=dev, dtype=x.dtype)
    dr = torch.zeros(b, d, m, device=dev, dtype=torch.float32)
    dc = torch.zeros(b, ch, m, device=dev, dtype=torch.float32)
    bn = _blocks(n, _BWD_BLOCK_N)
    nb = triton.cdiv(n, bn) if n else 0
    dab = torch.zeros(b, max(nb, 1), 2, device=dev, dtype=torch.float32)
    if b and n:
        _encode_backward_kernel[(b * nb,)](
            grad, x, c, reps, alpha, index, best, dx, dr, dc, dab, n, m, ch, d, nb,
            grad.stride(0), grad.stride(1), grad.stride(2), x.stride(0), x.stride(1), x.stride(2),
            c.stride(0), c.stride(1), c.stride(2), reps.stride(0), reps.stride(1), reps.stride(2),
            BLOCK_N=bn, BLOCK_M=_pow2(m), BLOCK_C=_pow2(ch), BLOCK_D=_pow2(d))
    # r = (sums + cv) / (counts + 1): both receive d r / (counts + 1); the values' share is
    # gathered back to the members
    ds = dr / (counts.unsqueeze(1) + 1.0)
    dv = _dispatch(ds, index, None, torch.empty(b, d, n, device=dev, dtype=reps.dtype))
    dab = dab.sum(dim=(0, 1))
    return (dx, dc.to(c.dtype), dv, ds.to(reps.dtype), dab[0:1].to(alpha.dtype, copy=True),
            dab[1:2].to(alpha.dtype, copy=True))


# --------------------------------------------------------------------------- custom ops
@torch.library.custom_op("fec_core::fused_encode", mutates_args=())
def _encode_op(x: torch.Tensor, c: torch.Tensor, v: torch.Tensor, cv: torch.Tensor, alpha: torch.Tensor,
               beta: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(x, c, v, cv, alpha, beta)


@_encode_op.register_fake
def _(x, c, v, cv, alpha, beta):
    b, _, n = x.shape
    m, d = c.shape[2], v.shape[1]
    return (x.new_empty(b, d, n, dtype=_out_dtype(v, alpha)), x.new_empty(b, n, dtype=torch.int64),
            x.new_empty(b, n, dtype=alpha.dtype), x.new_empty(b, d, m, dtype=v.dtype),
            x.new_empty(b, m, dtype=torch.float32))


@torch.library.custom_op("fec_core::fused_encode_backward", mutates_args=())
def _encode_backward_op(grad: torch.Tensor, x: torch.Tensor, c: torch.Tensor, alpha: torch.Tensor,
                        index: torch.Tensor, best: torch.Tensor, reps: torch.Tensor, counts: torch.Tensor
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                   torch.Tensor]:
    return _backward(grad, x, c, alpha, index, best, reps, counts)


@_encode_backward_op.register_fake
def _(grad, x, c, alpha, index, best, reps, counts):
    (b, ch, n), m, d = x.shape, c.shape[2], reps.shape[1]
    return (x.new_empty(b, ch, n), c.new_empty(b, ch, m), reps.new_empty(b, d, n), reps.new_empty(b, d, m),
            alpha.new_empty(1), alpha.new_empty(1))


def _setup_context(ctx, inputs, output):
    x, c, _, _, alpha, _ = inputs
    _, index, best, reps, counts = output
    ctx.save_for_backward(x, c, alpha, index, best, reps, counts)
    ctx.mark_non_differentiable(index, best, reps, counts)


def _encode_grad(ctx, grad_out, *_unused):
    x, c, alpha, index, best, reps, counts = ctx.saved_tensors
    if grad_out is None:
        return None, None, None, None, None, None
    return _encode_backward_op(grad_out, x, c, alpha, index, best, reps, counts)


_encode_op.register_autograd(_encode_grad, setup_context=_setup_context)
