"""Fused Triton kernels (chapter 12): the pooling assignment here, the encode step in
:mod:`fec_core.kernels_encode` (:func:`fused_encode`, re-exported), both behind one switch.

**Pooling assignment** (Eq. 5 of pooling layers).

A clustering pooling layer compares each of its ``N`` points with all ``N/4``
centers and keeps the best one. Written with PyTorch ops this is a matrix product
that writes ``B * N/4 * N`` similarities to memory, then a reduction that reads them
back. :func:`cosine_argmax` does both in one kernel: a block of points is compared
with one block of centers at a time, and only the running maximum and its index
per point stay in registers. Nothing quadratic is ever written to memory.

The kernels are used on CUDA tensors when Triton is installed (the kernel mode,
:func:`fec_core.config.kernel_mode`, is ``'auto'``, the default). Everywhere else
:func:`fec_core.clustering.assign_nearest` uses its plain PyTorch tiles, which give the same
indices, and :func:`fec_core.clustering.cluster_encode` its PyTorch fast path. The environment
variable ``FEC_KERNELS`` (``auto``, ``off``, ``on``) or :func:`fec_core.config.set_kernel_mode`
chooses; ``on``
also runs the kernels on CPU tensors, which only works in Triton's interpreter
(``TRITON_INTERPRET=1`` set before Python starts): that is how the tests check the
kernels on a machine without a GPU.

Precision: the products are summed in full float32 (``input_precision="ieee"``, no
TF32); half and bfloat16 inputs are widened to float32 first (their products are
exact there) and each similarity is rounded back to the input's type before the
comparison, as a half-precision ``matmul`` followed by ``max`` would round it (this
gives up tensor cores for a kernel that is memory-bound anyway). Ties go to the lowest center index, like ``torch.max``. The
kernel sums the ``C`` products in its own order, so on an exact near-tie (two centers
within one rounding step) it may pick the other center than cuBLAS would; NaN
inputs are not handled (keys are normalized with a clamped norm, so none arise).
"""
from __future__ import annotations

import torch

from .config import HAS_TRITON, INTERPRET, kernel_mode  # HAS_TRITON, INTERPRET re-exported
from .kernels_encode import fused_encode, use_encode_kernel  # re-exported: the encode kernel

__all__ = ["HAS_TRITON", "INTERPRET", "use_kernel", "cosine_argmax", "cosine_argmax_reference", "fused_encode",
           "use_encode_kernel"]

if HAS_TRITON:  # fec_core.config detected it
    import triton
    import triton.language as tl


def use_kernel(c: torch.Tensor, p: torch.Tensor) -> bool:
    """Whether :func:`cosine_argmax` will serve these inputs under the current mode."""
    if not HAS_TRITON or kernel_mode() == "off" or c.dtype not in _DTYPES or p.dtype != c.dtype:
        return False
    if kernel_mode() == "on":
        return c.is_cuda or INTERPRET
    return c.is_cuda and p.is_cuda and not INTERPRET


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def cosine_argmax_reference(c: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch version of :func:`cosine_argmax`: ``(p @ c^T).max(-1)`` -> index [B, N]."""
    return torch.matmul(p, c.transpose(1, 2)).max(dim=-1)[1]


if HAS_TRITON:
    @triton.jit
    def _cosine_argmax_kernel(c_ptr, p_ptr, out_ptr, M, N, C,
                              stride_cb, stride_cm, stride_cc,
                              stride_pb, stride_pn, stride_pc,
                              stride_ob, stride_on,
                              ROUND_TO_INPUT: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
        """One program: BLOCK_N points of batch element ``b`` against all M centers."""
        pid_n = tl.program_id(0)
        b = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m0 = tl.arange(0, BLOCK_M)
        offs_c0 = tl.arange(0, BLOCK_C)
        best = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
        best_idx = tl.zeros((BLOCK_N,), dtype=tl.int32)
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + offs_m0
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):
                offs_c = c0 + offs_c0
                pt = tl.load(p_ptr + b * stride_pb + offs_n[:, None] * stride_pn + offs_c[None, :] * stride_pc,
                             mask=(offs_n[:, None] < N) & (offs_c[None, :] < C), other=0.0).to(tl.float32)
                ct = tl.load(c_ptr + b * stride_cb + offs_m[None, :] * stride_cm + offs_c[:, None] * stride_cc,
                             mask=(offs_m[None, :] < M) & (offs_c[:, None] < C), other=0.0).to(tl.float32)
                # Half inputs are widened: their products are exact in float32, so this is
                # a half-precision matmul with float32 accumulation (and Triton's CPU
                # interpreter, which the tests use, gets bfloat16 dots wrong).
                acc += tl.dot(pt, ct, input_precision="ieee")
            if ROUND_TO_INPUT:  # compare what a half-precision matmul would have stored
                acc = acc.to(c_ptr.dtype.element_ty).to(tl.float32)
            acc = tl.where(offs_m[None, :] < M, acc, float("-inf"))
            val, idx = tl.max(acc, axis=1, return_indices=True, return_indices_tie_break_left=True)
            better = val > best  # strict: an earlier block keeps a tie
            best = tl.where(better, val, best)
            best_idx = tl.where(better, idx + m0, best_idx)
        tl.store(out_ptr + b * stride_ob + offs_n * stride_on, best_idx.to(tl.int64), mask=offs_n < N)


def _launch(c: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    b, m, ch = c.shape
    n = p.shape[1]
    out = torch.empty(b, n, dtype=torch.int64, device=p.device)
    if n == 0 or b == 0:
        return out
    block_n, block_m = 64, 64
    block_c = 32 if ch > 16 else 16
    grid = (triton.cdiv(n, block_n), b)
    _cosine_argmax_kernel[grid](
        c, p, out, m, n, ch,
        c.stride(0), c.stride(1), c.stride(2), p.stride(0), p.stride(1), p.stride(2),
        out.stride(0), out.stride(1),
        ROUND_TO_INPUT=c.dtype != torch.float32,
        BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_C=block_c)
    return out


@torch.library.custom_op("fec_core::cosine_argmax", mutates_args=())
def _cosine_argmax_op(c: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return _launch(c, p)


@_cosine_argmax_op.register_fake
def _(c: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return p.new_empty(p.shape[0], p.shape[1], dtype=torch.int64)


def cosine_argmax(c: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Fused similarity + argmax (pooling assignment, Eq. 5; chapter 12).

    ``c`` [B, M, C] and ``p`` [B, N, C], unit vectors (as :func:`torch.nn.functional.normalize`
    leaves them) -> ``index`` [B, N] (int64) with ``index[b, n] = argmax_m <c[b, m], p[b, n]>``,
    ties to the lowest ``m``. Under autocast the inputs are cast to the autocast type
    first, as ``torch.matmul`` would. Raises ``RuntimeError`` when Triton is missing.
    """
    if not HAS_TRITON:
        raise RuntimeError("cosine_argmax needs Triton (pip install triton)")
    if c.ndim != 3 or p.ndim != 3 or c.shape[0] != p.shape[0] or c.shape[2] != p.shape[2]:
        raise ValueError(f"cosine_argmax expects c [B, M, C] and p [B, N, C], got {tuple(c.shape)} and {tuple(p.shape)}")
    if c.shape[1] == 0:
        raise ValueError("cosine_argmax needs at least one center")
    if not (c.is_cuda or INTERPRET):
        raise RuntimeError("cosine_argmax runs on CUDA tensors, or on CPU tensors in Triton's "
                           "interpreter (TRITON_INTERPRET=1 set before starting Python)")
    dev = c.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        c, p = c.to(dt), p.to(dt)
    if p.dtype != c.dtype:
        p = p.to(c.dtype)
    if c.dtype not in _DTYPES:
        raise TypeError(f"cosine_argmax supports float32, float16 and bfloat16, got {c.dtype}")
    return _cosine_argmax_op(c.detach(), p.detach())
