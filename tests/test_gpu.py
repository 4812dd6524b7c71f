"""The CUDA path (issue 16, chapter 12): fast against literal path in float32, float16
and bfloat16, the Triton kernel against the PyTorch tiles, ``torch.compile`` with
``fullgraph=True``, and the benchmark, all on a CUDA device.

Every test here is marked ``gpu`` and skipped without CUDA. Assignments are checked
under the numerical contract of :mod:`fec_core.numerics`: a pick is correct when its
score (recomputed in float64) is within the dtype's rounding bound of the best, and
must be *the* argmax wherever the best two scores are farther apart; values and
gradients are compared within a stated relative bound per dtype (:data:`REL`).

``FEC_TEST_DEVICE=cpu`` runs the same tests on the CPU (a dry run of
``scripts/gpu_check.sh``; the kernel tests then need ``TRITON_INTERPRET=1`` and
``FEC_KERNELS=on``, and the compile tests ``FEC_TEST_COMPILE=1``).
"""
from __future__ import annotations

import functools
import json
import os

import pytest
import torch
import torch.nn.functional as F

import fec_core.clustering as cl
from fec_core import config, kernels
from fec_core.numerics import assert_assignments_close, tolerance
from conftest import tiny_fec

DEVICE = os.environ.get("FEC_TEST_DEVICE", "cuda")
ON_CUDA = DEVICE.startswith("cuda")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(), reason="needs a CUDA device")]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
#: Largest difference allowed between the two paths' values and gradients, relative to
#: the largest magnitude: a few rounding steps of the dtype (float32: no TF32 anywhere).
REL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
KERNEL_HERE = kernels.HAS_TRITON and (ON_CUDA or (kernels.INTERPRET and config.kernel_mode() == "on"))
#: Whether the fast encode path runs the fused Triton kernel here (fec_core.kernels_encode).
ENCODE_KERNEL_HERE = KERNEL_HERE and config.kernel_mode() != "off"
COMPILE_HERE = ON_CUDA or os.environ.get("FEC_TEST_COMPILE") == "1"


@pytest.fixture(autouse=True)
def _no_tf32():
    """float32 means float32 here: no TF32 in cuDNN's convolutions (on by default) or
    in matrix products, so that float32 comparisons hold to float32 bounds."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _gen(seed):
    return torch.Generator(device="cpu").manual_seed(seed)


def _rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=_gen(seed)).to(DEVICE, dtype)


def clustered_keys(b, c, w, h, block, seed=0, noise=0.02, dtype=torch.float32):
    """Keys ``[B, C, W, H]`` whose ``block``-sized regions each share one random direction
    (plus a little noise): every point is far closer to its own region's center than to
    any other, so no assignment is a near-tie in any dtype."""
    g = _gen(seed)
    d = F.normalize(torch.randn(b, c, w // block[0], h // block[1], generator=g), dim=1)
    d = d.repeat_interleave(block[0], dim=2).repeat_interleave(block[1], dim=3)
    return (d + noise * torch.randn(b, c, w, h, generator=g)).to(DEVICE, dtype)


def assert_rel_close(a, b, dtype, what):
    a, b = a.double(), b.double()
    scale = float(b.abs().max().clamp_min(1e-12))
    err = float((a - b).abs().max())
    assert err <= REL[dtype] * scale, f"{what} ({dtype}): max difference {err:.3g} > {REL[dtype]:g} x {scale:.3g}"


def assert_as_accurate(fast, literal, exact, dtype, what):
    """The fast path's error against a float64 run (``exact``) is at most twice the
    literal path's, plus REL of the largest magnitude: for quantities that cancel
    (gradients through a normalization) the dtype's rounding of the intermediate
    terms, not of the result, sets the error, and both paths pay it."""
    exact = exact.double()
    scale = float(exact.abs().max().clamp_min(1e-12))
    err_f = float((fast.double() - exact).abs().max())
    err_l = float((literal.double() - exact).abs().max())
    assert err_f <= 2 * err_l + REL[dtype] * scale, \
        f"{what} ({dtype}): fast path off by {err_f:.3g}, literal by {err_l:.3g}, largest value {scale:.3g}"


def pool_scores(k):
    """Pooling similarities ``[B, M, N]`` recomputed in float64 from the keys as given."""
    k = k.detach().double()
    grid = (k.shape[2] // 2, k.shape[3] // 2)
    return cl.similarity(cl.to_points(cl.centers(k, grid)), cl.to_points(k))


def encode_scores(k, alpha, beta, grid):
    k, alpha, beta = k.detach().double(), alpha.detach().double(), beta.detach().double()
    return cl.gate(cl.similarity(cl.to_points(cl.centers(k, grid)), cl.to_points(k)), alpha, beta)


def _pool(k, v, literal):
    v = v.detach().clone().requires_grad_(True)
    reps, index = cl.cluster_pool(k, v, literal=literal)
    w = torch.randn(reps.shape, generator=_gen(5)).to(reps.device)
    (reps.float() * w).sum().backward()
    return reps.detach(), index, v.grad


def _encode(k, v, alpha, beta, grid, literal):
    k, v, alpha, beta = (t.detach().clone().requires_grad_(True) for t in (k, v, alpha, beta))
    out, index = cl.cluster_encode(k, v, alpha, beta, grid, literal=literal)
    w = torch.randn(out.shape, generator=_gen(6)).to(out.device)
    (out.float() * w).sum().backward()
    return out.detach(), index, [t.grad for t in (k, v, alpha, beta)]


# ----------------------------------------------------------------------------- layer functions
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pool_paths_agree_clear_assignments(dtype):
    """No near-ties: identical assignments, values and gradients within REL."""
    k = clustered_keys(2, 32, 24, 16, (2, 2), seed=1, dtype=dtype)
    v = _rand(2, 20, 24, 16, seed=2, dtype=dtype)
    rf, jf, gf = _pool(k, v, literal=False)
    rl, jl, gl = _pool(k, v, literal=True)
    rx, jx, gx = _pool(k.double(), v.double(), literal=True)
    assert rf.dtype == dtype and jf.device == k.device
    assert torch.equal(jf, jl) and torch.equal(jf, jx)
    assert_assignments_close(pool_scores(k), jf, expected=jl, atol=tolerance(dtype))
    assert_as_accurate(rf, rl, rx, dtype, "representatives")
    assert_as_accurate(gf, gl, gx, dtype, "value gradient")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pool_paths_random_keys_keep_the_contract(dtype):
    """Random keys (near-ties happen): both picks within the bound of the best, equal
    outside near-ties, and the fast representatives are the literal aggregation of the
    fast assignment."""
    k = _rand(3, 24, 32, 28, seed=3, dtype=dtype)
    v = _rand(3, 16, 32, 28, seed=4, dtype=dtype)
    rf, jf, _ = _pool(k, v, literal=False)
    _, jl, _ = _pool(k, v, literal=True)
    scores = pool_scores(k)
    assert_assignments_close(scores, jl, atol=tolerance(dtype), msg="literal")
    assert_assignments_close(scores, jf, expected=jl, atol=tolerance(dtype), msg="fast")
    grid = (k.shape[2] // 2, k.shape[3] // 2)
    cv, pv = cl.to_points(cl.centers(v, grid)), cl.to_points(v)
    ref = cl.aggregate_literal(pv, cv, cl.one_hot(jf, cv.shape[1], pv.dtype))  # [B, M, D]
    assert_rel_close(rf.flatten(2).transpose(1, 2), ref, dtype, "representatives of the fast assignment")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_encode_paths_agree_clear_assignments(dtype):
    grid = (3, 2)
    k = clustered_keys(4, 12, 12, 10, (4, 5), seed=7, dtype=dtype)
    v = _rand(4, 10, 12, 10, seed=8, dtype=dtype)
    alpha = torch.tensor([1.7], device=DEVICE, dtype=dtype)
    beta = torch.tensor([-0.4], device=DEVICE, dtype=dtype)
    of, jf, gf = _encode(k, v, alpha, beta, grid, literal=False)
    ol, jl, gl = _encode(k, v, alpha, beta, grid, literal=True)
    ox, jx, gx = _encode(*(t.double() for t in (k, v, alpha, beta)), grid, literal=True)
    assert torch.equal(jf, jl) and torch.equal(jf, jx)
    assert_assignments_close(encode_scores(k, alpha, beta, grid), jf, expected=jl, atol=tolerance(dtype))
    assert_as_accurate(of, ol, ox, dtype, "encode output")
    for name, a, b, c in zip(("keys", "values", "alpha", "beta"), gf, gl, gx):
        assert_as_accurate(a, b, c, dtype, f"gradient of {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_encode_paths_random_keys_keep_the_contract(dtype):
    grid = (4, 4)
    k = _rand(6, 16, 20, 16, seed=9, dtype=dtype)
    v = _rand(6, 8, 20, 16, seed=10, dtype=dtype)
    alpha = torch.tensor([0.9], device=DEVICE, dtype=dtype)
    beta = torch.tensor([0.2], device=DEVICE, dtype=dtype)
    _, jf, _ = _encode(k, v, alpha, beta, grid, literal=False)
    _, jl, _ = _encode(k, v, alpha, beta, grid, literal=True)
    if not ENCODE_KERNEL_HERE:
        assert torch.equal(jf, jl)  # both paths argmax the very same gate values: same bits
    # the gate (sigmoid' <= 1/4) shrinks the cosine's rounding error; its own rounding
    # stays below the dtype's bound (the fused kernel's sums: other arithmetic, the contract)
    assert_assignments_close(encode_scores(k, alpha, beta, grid), jf, expected=jl, atol=tolerance(dtype))


# ----------------------------------------------------------------------------- whole model
def _model_run(m, x, literal, dtype):
    m.set_literal(literal).zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        outs, recs = m.forward_with_clusters(x, intermediates=m.dense)  # dense: the 4 stage outputs
    outs = outs if isinstance(outs, list) else [outs]
    loss = sum((o.float() * torch.randn(o.shape, generator=_gen(11)).to(o.device)).sum() for o in outs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}
    return [o.detach().float() for o in outs], x.grad, grads, recs


def _mean_rel(a, ref):
    return float((a.double() - ref.double()).abs().mean() / ref.double().abs().mean())


def _agree(out_a, out_b, recs_a, recs_b, what):
    """Strict (1e-4) where every assignment agrees. The pooling layers' picks come from
    different arithmetic on the two sides (the Triton kernel or PyTorch tiles against a
    dense matmul, or another device), so a float32 near-tie (within 1e-5) may flip a point,
    which changes its features downstream: then at least 99% of the assignments must
    agree and the outputs' mean difference stay below 1% of their mean magnitude."""
    same = sum(int((a.index.cpu() == b.index.cpu()).sum()) for a, b in zip(recs_a, recs_b))
    total = sum(a.index.numel() for a in recs_a)
    if same == total:
        for a, b in zip(out_a, out_b):
            torch.testing.assert_close(a.cpu(), b.cpu(), atol=1e-4, rtol=1e-4, msg=what)
        return True
    assert same >= 0.99 * total, f"{what}: {total - same} of {total} assignments differ"
    for a, b in zip(out_a, out_b):
        assert _mean_rel(a.cpu(), b.cpu()) <= 1e-2, what
    return False


def test_model_paths_agree_float32_and_match_the_cpu():
    m = tiny_fec(dense=True, fold=(2, 2, 1, 1), proposal=(2, 2, 2, 1)).to(DEVICE)
    x = _rand(2, 3, 64, 64, seed=0)
    of, gxf, gf, rf = _model_run(m, x, False, torch.float32)
    ol, gxl, gl, rl = _model_run(m, x, True, torch.float32)
    for a, b in zip(rf, rl):
        if a.kind == "encode" and a.stage == 0 and not ENCODE_KERNEL_HERE:  # same arithmetic: same bits
            assert torch.equal(a.index, b.index), a.name
    if _agree(of, ol, rf, rl, "fast vs literal"):
        torch.testing.assert_close(gxf, gxl, atol=1e-4, rtol=1e-3)
        assert gf.keys() == gl.keys() and len(gf) > 20
        for n in gf:
            torch.testing.assert_close(gf[n], gl[n], atol=1e-4, rtol=1e-3, msg=n)
    m_cpu = tiny_fec(dense=True, fold=(2, 2, 1, 1), proposal=(2, 2, 2, 1)).eval()
    with torch.no_grad():
        out_cpu, rec_cpu = m_cpu.forward_with_clusters(x.cpu(), intermediates=True)
    _agree(of, out_cpu, rf, rec_cpu, f"{DEVICE} vs cpu")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("seed", [1, 2])
def test_model_paths_agree_under_autocast(dtype, seed):
    """Half-precision autocast: a near-tie may flip one point's center in one pooling
    layer, which changes that point's features in every later layer (in a small random
    model, several percent of the later assignments), on either path. So the whole
    model is held to this: the first encode layer (same inputs, same arithmetic on both
    paths) assigns identically, and for every output and the input gradient the fast
    path's mean error against the float32 model is at most 1.5 times the literal path's
    (plus REL): the fast path is as accurate as the paper's formulation. (With the fused
    encode kernel the first layer's arithmetic differs too: 99% of its points agree.)"""
    m = tiny_fec(dense=True).to(DEVICE)
    x = _rand(2, 3, 64, 64, seed=seed)
    of, gxf, _, rf = _model_run(m, x, False, dtype)
    ol, gxl, _, rl = _model_run(m, x, True, dtype)
    ox, gxx, _, _ = _model_run(m, x, False, torch.float32)
    same = rf[0].index == rl[0].index
    if ENCODE_KERNEL_HERE:  # the fused kernel sums the cosines in its own order: near-ties may flip
        assert float(same.float().mean()) >= 0.99
    else:
        assert bool(same.all())

    def err(a, ref):
        return float((a.double() - ref.double()).abs().mean() / ref.double().abs().mean())
    for i, (a, b, ref) in enumerate(zip(of + [gxf], ol + [gxl], ox + [gxx])):
        assert err(a, ref) <= 1.5 * err(b, ref) + REL[dtype], \
            f"output {i}: fast path off by {err(a, ref):.3g} (mean), literal by {err(b, ref):.3g}"


# ----------------------------------------------------------------------------- Triton kernel
KERNEL_SHAPES = ([(4, 784, 3136, 64), (2, 196, 784, 196), (1, 1000, 999, 33), (3, 16, 64, 8)] if ON_CUDA
                 else [(2, 49, 196, 16), (1, 70, 130, 40)])


@pytest.mark.skipif(not KERNEL_HERE, reason="the Triton kernel runs on CUDA (or in the interpreter)")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_against_pytorch_tiles(dtype):
    """The fused kernel against the PyTorch tiles (kernel switched off) and a float64
    reference, under the contract; duplicated centers: the first copy wins (the kernel
    computes both copies' scores with the same arithmetic)."""
    before = config.kernel_mode()
    for i, (b, m, n, c) in enumerate(KERNEL_SHAPES):
        ck = F.normalize(_rand(b, m, c, seed=20 + i), dim=-1).to(dtype)
        pk = F.normalize(_rand(b, n, c, seed=40 + i), dim=-1).to(dtype)
        got = kernels.cosine_argmax(ck, pk)
        try:
            config.set_kernel_mode("off")
            tiles = cl._cosine_argmax(ck, pk, 1 << 24)
            small_tiles = cl._cosine_argmax(ck, pk, 4096)  # center tiles and a running maximum
        finally:
            config.set_kernel_mode(before)
        scores = torch.matmul(pk.double(), ck.double().transpose(1, 2)).transpose(1, 2)  # [B, M, N]
        atol = tolerance(dtype)
        assert_assignments_close(scores, got, expected=tiles, atol=atol, msg=f"kernel {(b, m, n, c)}")
        assert_assignments_close(scores, small_tiles, expected=tiles, atol=atol, msg=f"tiles {(b, m, n, c)}")
        twice = torch.cat([ck, ck], dim=1)
        assert int(kernels.cosine_argmax(twice, pk).max()) < m
    with torch.autocast(ck.device.type, dtype=torch.bfloat16):  # inputs cast as matmul would cast them
        assert torch.equal(kernels.cosine_argmax(ck.float(), pk.float()),
                           kernels.cosine_argmax(ck.float().bfloat16(), pk.float().bfloat16()))


@pytest.mark.skipif(not KERNEL_HERE, reason="the Triton kernel runs on CUDA (or in the interpreter)")
def test_fast_path_uses_the_kernel_here():
    c = torch.zeros(1, 4, 8, device=DEVICE)
    assert kernels.use_kernel(c, c)


# ----------------------------------------------------------------------------- fused encode kernel
#: (batch, key channels, value channels, rows, cols, grid): fec_small's first and last stages
#: at 224 px (16 and 4 centers), the segmentation setting (100 centers)
ENCODE_SHAPES = ([(64, 24, 24, 56, 56, (4, 4)), (256, 24, 24, 7, 7, (2, 2)), (4, 32, 32, 40, 40, (10, 10))]
                 if ON_CUDA else [(3, 12, 10, 12, 10, (3, 2))])
ENCODE_CASES = [(torch.float32, None), (torch.float16, None), (torch.bfloat16, None), (torch.float32, torch.bfloat16)]


def _encode_on(k, v, alpha, beta, grid, mode, amp):
    """cluster_encode's fast path in kernel ``mode``, forward and backward (a fixed random
    weighting of the output as the loss): ``(out, index, grads of k, v, alpha, beta)``."""
    before = config.kernel_mode()
    try:
        config.set_kernel_mode(mode)
        k, v, alpha, beta = (t.detach().clone().requires_grad_(True) for t in (k, v, alpha, beta))
        with torch.autocast(k.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            out, index = cl.cluster_encode(k, v, alpha, beta, grid)
        w = torch.randn(out.shape, generator=_gen(13), dtype=torch.float64).to(out.device)
        (out.double() * w).sum().backward()
        return out.detach(), index, [t.grad for t in (k, v, alpha, beta)]
    finally:
        config.set_kernel_mode(before)


def _encode_fixed(k, v, alpha, beta, grid, index):
    """The PyTorch path in float64 with the picks fixed to ``index`` (the same loss): the
    reference for a path's values and gradients, whichever center a near-tie gave it."""
    k, v, alpha, beta = (t.detach().double().requires_grad_(True) for t in (k, v, alpha, beta))
    ck, cv = cl.centers(k, grid), cl.centers(v, grid)
    g = cl.gate(cl.similarity(cl.to_points(ck), cl.to_points(k)), alpha, beta)
    reps = cl.aggregate(v.flatten(2), cv.flatten(2), index, channels_first=True)
    out = cl.dispatch(reps, index, g.gather(1, index.unsqueeze(1)).squeeze(1), channels_first=True).transpose(1, 2)
    w = torch.randn(out.shape, generator=_gen(13), dtype=torch.float64).to(out.device)
    (out * w).sum().backward()
    return out.detach(), [t.grad for t in (k, v, alpha, beta)]


@pytest.mark.skipif(not KERNEL_HERE, reason="the Triton kernels run on CUDA (or in the interpreter)")
@pytest.mark.parametrize("dtype,amp", ENCODE_CASES, ids=lambda c: str(c))
def test_encode_kernel_against_pytorch_path(dtype, amp):
    """The fused encode kernel against the PyTorch path (kernels off) on the model's
    shapes: picks under the contract (gate recomputed in float64); values and the
    gradients of keys, values, alpha and beta at most twice as far from float64 (with the
    picks each path made) as the PyTorch path's, plus REL; float32 values equal to rounding."""
    for i, (bs, c, d, rows, cols, grid) in enumerate(ENCODE_SHAPES):
        k = _rand(bs, c, rows, cols, seed=60 + i, dtype=dtype)
        v = _rand(bs, d, rows, cols, seed=70 + i, dtype=dtype)
        alpha = torch.tensor([1.3], device=DEVICE)
        beta = torch.tensor([-0.2], device=DEVICE)
        ok, jk, gk = _encode_on(k, v, alpha, beta, grid, "on", amp)
        ot, jt, gt = _encode_on(k, v, alpha, beta, grid, "off", amp)
        what = f"{(bs, c, d, rows, cols, grid)} {dtype} autocast {amp}"
        assert ok.dtype == ot.dtype and all(a.dtype == b.dtype for a, b in zip(gk, gt)), what
        kd = amp or dtype
        scores = encode_scores(k.to(kd) if amp else k, alpha, beta, grid)
        assert_assignments_close(scores, jk, expected=jt, atol=tolerance(kd), msg=what)
        xk, gxk = _encode_fixed(k, v, alpha, beta, grid, jk)
        xt, gxt = _encode_fixed(k, v, alpha, beta, grid, jt)
        for name, a, b, ea, eb in zip(("out", "keys", "values", "alpha", "beta"), [ok] + gk, [ot] + gt,
                                      [xk] + gxk, [xt] + gxt):
            scale = float(eb.abs().max().clamp_min(1e-30))
            err_k, err_t = float((a.double() - ea).abs().max()), float((b.double() - eb).abs().max())
            assert err_k <= 2 * err_t + REL[kd] * scale, f"{what} {name}: kernel {err_k:.3g}, PyTorch {err_t:.3g}"
        if dtype == torch.float32 and amp is None and torch.equal(jk, jt):
            torch.testing.assert_close(ok, ot, rtol=1e-5, atol=1e-6, msg=what)


@pytest.mark.skipif(not KERNEL_HERE, reason="the Triton kernels run on CUDA (or in the interpreter)")
def test_encode_kernel_ties_go_to_the_first_center():
    """Duplicated centers (an exact tie, the same arithmetic for both copies): the first
    copy wins, as torch.max picks it; the representatives of the unused copies are their
    centers (an empty cluster keeps its center value)."""
    x = _rand(3, 24, 500, seed=80)
    cu = F.normalize(_rand(3, 24, 6, seed=81), dim=1)
    vals, cvals = _rand(3, 16, 500, seed=82), _rand(3, 16, 12, seed=83)
    out, index = kernels.fused_encode(x, torch.cat([cu, cu], 2), vals, cvals, torch.ones(1, device=DEVICE),
                                      torch.zeros(1, device=DEVICE))
    assert int(index.max()) < 6
    _, index1 = kernels.fused_encode(x, cu, vals, cvals[..., :6], torch.ones(1, device=DEVICE),
                                     torch.zeros(1, device=DEVICE))
    assert torch.equal(index, index1)


@pytest.mark.skipif(not (KERNEL_HERE and COMPILE_HERE), reason="needs the kernels and inductor")
def test_encode_kernel_compiled_matches_eager():
    """torch.compile(fullgraph=True) with the fused encode kernel in the graph, forward and
    backward: the eager kernel's picks, values and gradients (the custom op runs the same
    kernels in both)."""
    k, v = _rand(8, 24, 28, 28, seed=90), _rand(8, 24, 28, 28, seed=91)
    alpha, beta = torch.tensor([1.1], device=DEVICE), torch.tensor([0.1], device=DEVICE)
    before = config.kernel_mode()
    try:
        config.set_kernel_mode("on")

        def enc(k, v, a, b):
            return cl.cluster_encode(k, v, a, b, (4, 4))
        torch._dynamo.reset()
        compiled = torch.compile(enc, fullgraph=True)
        results = []
        for fn in (compiled, enc):
            args = [t.clone().requires_grad_(True) for t in (k, v, alpha, beta)]
            out, index = fn(*args)
            (out * torch.randn(out.shape, generator=_gen(14)).to(out.device)).sum().backward()
            results.append((out.detach(), index, [t.grad for t in args]))
    finally:
        config.set_kernel_mode(before)
    (oc, jc, gc), (oe, je, ge) = results
    assert torch.equal(jc, je)
    torch.testing.assert_close(oc, oe, rtol=1e-5, atol=1e-6)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not KERNEL_HERE, reason="the Triton kernels run on CUDA (or in the interpreter)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_model_with_and_without_kernels(dtype):
    """A whole model forward and backward with the Triton kernels on against off: float32
    strict where every assignment agrees (see _agree); under bf16 autocast, each path's mean
    error against the float32 model within 1.5 times the other's plus REL."""
    m = tiny_fec(dense=True).to(DEVICE)
    x = _rand(2, 3, 64, 64, seed=15)
    before = config.kernel_mode()
    try:
        config.set_kernel_mode("on")
        on = _model_run(m, x, False, dtype)
        config.set_kernel_mode("off")
        off = _model_run(m, x, False, dtype)
        ref = _model_run(m, x, False, torch.float32) if dtype != torch.float32 else off
    finally:
        config.set_kernel_mode(before)
    if dtype == torch.float32:
        if _agree(on[0], off[0], on[3], off[3], "kernels on vs off"):
            for n in off[2]:
                torch.testing.assert_close(on[2][n], off[2][n], atol=1e-4, rtol=1e-3, msg=n)
        return
    for i, (a, b, r) in enumerate(zip(on[0] + [on[1]], off[0] + [off[1]], ref[0] + [ref[1]])):
        assert _mean_rel(a, r) <= 1.5 * _mean_rel(b, r) + REL[dtype], f"output {i}"


# ----------------------------------------------------------------------------- torch.compile
def _compiled_close(got, ref, what):
    """Inductor fuses the key convolution with the normalization and rounds differently:
    a float32 near-tie may flip a point's center (seen on a CPU: one of 1024 points, its
    two best scores 1e-6 apart), which changes its features downstream. So: the stage-0
    output (no pooling layer yet) within 1e-4, later outputs within 2% in mean."""
    torch.testing.assert_close(got[0], ref[0], atol=1e-4, rtol=1e-4, msg=f"{what}, stage 0")
    for i, (a, b) in enumerate(zip(got[1:], ref[1:]), 1):
        assert _mean_rel(a, b) <= 2e-2, f"{what}, stage {i}: mean difference {_mean_rel(a, b):.3g}"


@pytest.mark.skipif(not COMPILE_HERE, reason="inductor on the CPU is slow: FEC_TEST_COMPILE=1")
def test_compiled_fullgraph_matches_eager():
    """``torch.compile(fullgraph=True)`` (inductor; on CUDA with the Triton kernel as a
    custom op inside the graph) of the fast path, forward and backward: one graph
    (fullgraph raises on a break), eager's outputs and gradients (see _compiled_close)."""
    m = tiny_fec(dense=True).to(DEVICE)
    stages = functools.partial(m.forward_intermediates, intermediates_only=True)  # the 4 outputs
    x = _rand(4, 3, 64, 64, seed=3)
    torch._dynamo.reset()
    compiled = torch.compile(stages, fullgraph=True)
    m.eval()
    with torch.no_grad():
        _compiled_close(compiled(x), stages(x), "eval forward")
    m.train()
    w = [torch.randn(o.shape, generator=_gen(12)).to(DEVICE) for o in stages(x)]
    m.zero_grad(set_to_none=True)
    sum((o * wi).sum() for o, wi in zip(compiled(x), w)).backward()
    g_c = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)
    sum((o * wi).sum() for o, wi in zip(stages(x), w)).backward()
    g_e = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert g_c.keys() == g_e.keys() and len(g_e) > 20
    stem = [n for n in g_e if n.startswith("stem.")]
    flat_c = torch.cat([g_c[n].flatten() for n in g_e])
    flat_e = torch.cat([g_e[n].flatten() for n in g_e])
    assert _mean_rel(flat_c, flat_e) <= 2e-2
    for n in stem:  # the stem's gradient gathers every stage's: bounded in mean as well
        assert _mean_rel(g_c[n], g_e[n]) <= 5e-2, n


@pytest.mark.skipif(not COMPILE_HERE, reason="inductor on the CPU is slow: FEC_TEST_COMPILE=1")
def test_compiled_bf16_autocast_inference():
    """bf16 autocast, compiled against eager: both round to bf16 and may flip near-ties
    (test_model_paths_agree_under_autocast), so neither is the reference. The float32
    eager model is; the compiled model's mean error against it is at most 1.5 times the
    eager bf16 model's (plus REL), stage by stage."""
    m = tiny_fec(dense=True).to(DEVICE).eval()
    stages = functools.partial(m.forward_intermediates, intermediates_only=True)  # the 4 outputs
    x = _rand(4, 3, 64, 64, seed=4)
    torch._dynamo.reset()
    compiled = torch.compile(stages, fullgraph=True)
    with torch.no_grad():
        ref = [o.double() for o in stages(x)]
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            a, b = [o.double() for o in compiled(x)], [o.double() for o in stages(x)]

    def err(u, r):
        return float((u - r).abs().mean() / r.abs().mean())
    for i, (u, v, r) in enumerate(zip(a, b, ref)):
        assert err(u, r) <= 1.5 * err(v, r) + REL[torch.bfloat16], \
            f"stage {i}: compiled off by {err(u, r):.3g} (mean), eager bf16 by {err(v, r):.3g}"


# ----------------------------------------------------------------------------- benchmark
def test_bench_smoke_on_the_device(tmp_path):
    from fec_core import bench
    report = bench.run_cli(["--model", "fec_tiny", "--device", DEVICE, "--batch-sizes", "4", "--resolutions", "64",
                            "--dtypes", "fp32", "bf16", "--modes", "infer", "train", "--iters", "2",
                            "--warmup", "1", "--out-dir", str(tmp_path), "--quiet", "--no-plot"])
    assert len(report["results"]) == 8
    for r in report["results"]:
        assert r["status"] == "ok" and r["throughput"] > 0, r
        assert r["peak_mem_bytes"] is None or r["peak_mem_bytes"] > 0
    meta = json.loads((tmp_path / "bench.json").read_text())["meta"]
    assert meta["torch"] == torch.__version__ and meta["command"].startswith("python -m fec_core.bench")
    if ON_CUDA:
        assert meta["device_name"] == torch.cuda.get_device_name() and meta["triton_kernel"] == kernels.HAS_TRITON
