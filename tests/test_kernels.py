"""The Triton kernels (fec_core.kernels): the fused cosine argmax of pooling layers and
the fused encode step, each against its PyTorch path in Triton's CPU interpreter (values,
gradients, assignments under the numerical contract of fec_core.numerics), traced by
torch.compile, and through a whole model; the mode switch and the CPU fallback. On a CUDA
device: test_gpu.py."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fec_core.clustering as cl
from fec_core import config, kernels, kernels_encode

_INTERPRET_SCRIPT = textwrap.dedent(r"""
    import torch, torch.nn.functional as F
    import fec_core.clustering as cl
    from fec_core import config, kernels
    assert kernels.INTERPRET and kernels.HAS_TRITON
    from fec_core.numerics import assert_assignments_close, tolerance
    torch.manual_seed(0)
    # The interpreter's dots and MKL's matmul sum in different orders (and differ between
    # CPUs): picks are checked under the numerical contract, not for equality.
    for (b, m, n, c) in [(2, 49, 196, 16), (1, 70, 130, 40), (3, 16, 64, 8)]:
        ck = F.normalize(torch.randn(b, m, c), dim=-1)
        pk = F.normalize(torch.randn(b, n, c), dim=-1)
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            c_, p_ = ck.to(dt), pk.to(dt)
            got = kernels.cosine_argmax(c_, p_)
            scores = torch.matmul(p_.double(), c_.double().transpose(1, 2)).transpose(1, 2)
            reference = kernels.cosine_argmax_reference(c_, p_)
            assert_assignments_close(scores, got, expected=reference, atol=tolerance(dt),
                                     msg=f"{dt} {(b, m, n, c)}")
            # every center twice: either copy may win (the interpreter's dots are numpy's, and
            # an OpenBLAS build may round two copies of a row differently by their position);
            # reduced to the original centers, the picks keep the contract
            twice = kernels.cosine_argmax(torch.cat([c_, c_], 1), p_)
            assert int(twice.max()) < 2 * m
            assert_assignments_close(scores, twice % m, expected=reference, atol=tolerance(dt),
                                     msg=f"duplicated centers, {dt} {(b, m, n, c)}")
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: inputs cast like matmul would
            assert torch.equal(kernels.cosine_argmax(ck, pk), kernels.cosine_argmax(ck.bfloat16(), pk.bfloat16()))
    # through the layer function, with the kernel forced on
    config.set_kernel_mode("on")
    k, v = torch.randn(2, 8, 16, 12), torch.randn(2, 8, 16, 12)
    rf, jf = cl.cluster_pool(k, v)
    rl, jl = cl.cluster_pool(k, v, literal=True)
    kd = k.double()
    scores = cl.similarity(cl.to_points(cl.centers(kd, (8, 6))), cl.to_points(kd))
    assert_assignments_close(scores, jf, expected=jl, atol=tolerance(torch.float32))
    cv, pv = cl.to_points(cl.centers(v, (8, 6))), cl.to_points(v)
    ref = cl.aggregate_literal(pv, cv, cl.one_hot(jf, cv.shape[1]))  # the literal sums of the same pick
    assert torch.allclose(rf.flatten(2).transpose(1, 2), ref, atol=1e-6)
    # the kernel is a registered custom op: traced into one graph, with and without autocast
    def pool_amp(k, v):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return cl.cluster_pool(k, v)
    for fn in (cl.cluster_pool, pool_amp):
        torch._dynamo.reset()
        ex = torch._dynamo.explain(fn)(k, v)
        assert ex.graph_count == 1 and ex.graph_break_count == 0, ex.break_reasons
    torch._dynamo.reset()
    rc, jc = torch.compile(cl.cluster_pool, backend="aot_eager", fullgraph=True)(k, v)
    assert torch.equal(jc, jf) and torch.allclose(rc, rf)
    print("KERNEL-OK")
""")


@pytest.mark.slow
@pytest.mark.skipif(not kernels.HAS_TRITON, reason="Triton is not installed")
def test_triton_kernel_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", FEC_KERNELS="auto")
    proc = subprocess.run([sys.executable, "-c", _INTERPRET_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "KERNEL-OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_kernel_mode_and_fallback():
    assert config.kernel_mode() in ("auto", "off", "on")
    with pytest.raises(ValueError):
        config.set_kernel_mode("sometimes")
    c = torch.randn(1, 4, 8)
    if not kernels.INTERPRET:
        assert not kernels.use_kernel(c, c)  # CPU tensors use the PyTorch tiles in 'auto' mode
    before = config.kernel_mode()
    try:
        config.set_kernel_mode("off")
        assert not kernels.use_kernel(c, c)
    finally:
        config.set_kernel_mode(before)



# ----------------------------------------------------------------------------- encode kernel
_ENCODE_SCRIPT = textwrap.dedent(r"""
    import torch
    import fec_core.clustering as cl
    from fec_core import config, kernels
    from fec_core.numerics import assert_assignments_close, tolerance
    assert kernels.INTERPRET and kernels.HAS_TRITON
    torch.manual_seed(0)
    # largest error allowed beyond twice the PyTorch path's own (against float64), relative
    # to the largest magnitude: a few rounding steps of the type
    REL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}

    def encode(k, v, a, b, grid, mode, amp=None):
        config.set_kernel_mode(mode)
        k, v, a, b = (t.detach().clone().requires_grad_(True) for t in (k, v, a, b))
        with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
            out, index = cl.cluster_encode(k, v, a, b, grid)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        (out.double() * w).sum().backward()
        return out.detach(), index, [t.grad for t in (k, v, a, b)]

    def scores(k, a, b, grid):  # the gate, in float64, from the keys as given
        k, a, b = k.detach().double(), a.detach().double(), b.detach().double()
        return cl.gate(cl.similarity(cl.to_points(cl.centers(k, grid)), cl.to_points(k)), a, b)

    def exact(k, v, a, b, grid, index):
        # the PyTorch path in float64 with the picks fixed to index: the reference for
        # either path's values and gradients, whichever center a near-tie gave it
        k, v, a, b = (t.detach().double().requires_grad_(True) for t in (k, v, a, b))
        ck, cv = cl.centers(k, grid), cl.centers(v, grid)
        g = cl.gate(cl.similarity(cl.to_points(ck), cl.to_points(k)), a, b)
        reps = cl.aggregate(v.flatten(2), cv.flatten(2), index, channels_first=True)
        out = cl.dispatch(reps, index, g.gather(1, index.unsqueeze(1)).squeeze(1), channels_first=True)
        w = torch.randn(out.shape[0], out.shape[2], out.shape[1], generator=torch.Generator().manual_seed(3),
                        dtype=torch.float64)
        (out.transpose(1, 2) * w).sum().backward()
        return out.transpose(1, 2).detach(), [t.grad for t in (k, v, a, b)]

    def as_accurate(got, ref, exact_got, exact_ref, dt, what):
        # the kernel's error against float64 at most twice the PyTorch path's, plus REL
        scale = float(exact_ref.abs().max().clamp_min(1e-30))
        e_got = float((got.double() - exact_got).abs().max())
        e_ref = float((ref.double() - exact_ref).abs().max())
        assert e_got <= 2 * e_ref + REL[dt] * scale, f"{what} {dt}: {e_got:.3g} vs {e_ref:.3g} (scale {scale:.3g})"

    # (batch, key channels, value channels, rows, cols, grid): odd sizes pad every block;
    # 100 centers (the segmentation setting), one center, fewer points than a block
    SHAPES = [(3, 12, 10, 12, 10, (3, 2)), (6, 24, 20, 20, 16, (4, 4)), (2, 32, 32, 20, 20, (10, 10)),
              (2, 8, 6, 3, 5, (1, 1))]
    # (inputs, autocast, alpha and beta): the model's float32 gate under half inputs and
    # autocast, and a model cast to half as a whole (the gate in half as well)
    CASES = ((torch.float32, None, torch.float32), (torch.float16, None, torch.float32),
             (torch.bfloat16, None, torch.float32), (torch.float32, torch.bfloat16, torch.float32),
             (torch.bfloat16, None, torch.bfloat16), (torch.float16, None, torch.float16))
    for i, (bs, c, d, rows, cols, grid) in enumerate(SHAPES):
        k, v = torch.randn(bs, c, rows, cols), torch.randn(bs, d, rows, cols)
        for alpha, beta in ((1.7, -0.4), (-3.0, 0.5), (40.0, 0.0)):  # < 0: least similar wins; 40: saturated
            for dt, amp, pt in CASES if i < 2 else CASES[::3]:  # the interpreter is slow: fewer on big shapes
                a, b = torch.tensor([alpha], dtype=pt), torch.tensor([beta], dtype=pt)
                kk, vv = k.to(dt), v.to(dt)
                ok, jk, gk = encode(kk, vv, a, b, grid, "on", amp)
                ot, jt, gt = encode(kk, vv, a, b, grid, "off", amp)
                what = f"{(bs, c, d, rows, cols, grid)} alpha {alpha} {dt} autocast {amp} gate {pt}"
                assert ok.dtype == ot.dtype and jk.dtype == torch.int64, what
                assert all(x.dtype == y.dtype for x, y in zip(gk, gt)), what
                sc = scores(kk.to(amp) if amp else kk, a, b, grid)
                assert_assignments_close(sc, jk, expected=jt, atol=tolerance(amp or dt), msg=what)
                if dt == torch.float32 and amp is None and torch.equal(jk, jt):  # same numbers to rounding
                    torch.testing.assert_close(ok, ot, rtol=1e-5, atol=1e-6, msg=what)
                    for x, y in zip(gk, gt):
                        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5 * float(y.abs().max()), msg=what)
                xk, gxk = exact(kk, vv, a, b, grid, jk)
                xt, gxt = exact(kk, vv, a, b, grid, jt)
                as_accurate(ok, ot, xk, xt, amp or dt, what + " out")
                for name, x, y, ex, ey in zip(("keys", "values", "alpha", "beta"), gk, gt, gxk, gxt):
                    as_accurate(x, y, ex, ey, amp or dt, what + " gradient of " + name)
    print("VALUES-OK")

    # ties: duplicated centers give the first copy, like torch.max
    x, cu = torch.randn(2, 8, 40), torch.nn.functional.normalize(torch.randn(2, 8, 5), dim=1)
    vals, cvals = torch.randn(2, 6, 40), torch.randn(2, 6, 10)
    _, index = kernels.fused_encode(x, torch.cat([cu, cu], 2), vals, cvals, torch.ones(1), torch.zeros(1))
    assert int(index.max()) < 5
    # the custom ops: schema, fake tensors, autograd registration, AOT dispatch
    from torch.library import opcheck
    args = [t.clone().requires_grad_(True) for t in (x, cu, vals, cvals[..., :5], torch.ones(1), torch.zeros(1))]
    for name, res in opcheck(torch.ops.fec_core.fused_encode.default, args).items():
        assert res == "SUCCESS", (name, res)
    out, index, best, reps, counts = torch.ops.fec_core.fused_encode(*[t.detach() for t in args])
    bw = (torch.randn_like(out), x, cu, torch.ones(1), index, best, reps, counts)
    for name, res in opcheck(torch.ops.fec_core.fused_encode_backward.default, bw,
                             test_utils=("test_schema", "test_faketensor")).items():
        assert res == "SUCCESS", (name, res)
    print("OPS-OK")

    # one graph for torch.compile, with and without autocast; compiled forward and backward
    config.set_kernel_mode("on")
    k, v = torch.randn(2, 8, 8, 6, requires_grad=True), torch.randn(2, 8, 8, 6, requires_grad=True)
    a, b = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.zeros(1))
    def enc(k, v, a, b):
        return cl.cluster_encode(k, v, a, b, (2, 2))
    def enc_amp(k, v, a, b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return cl.cluster_encode(k, v, a, b, (2, 2))
    for fn in (enc, enc_amp):
        torch._dynamo.reset()
        ex = torch._dynamo.explain(fn)(k, v, a, b)
        assert ex.graph_count == 1 and ex.graph_break_count == 0, ex.break_reasons
        gm = ex.graphs[0]
        assert "fused_encode" in str(gm.code), "the kernel is not in the graph"
    torch._dynamo.reset()
    oc, jc = torch.compile(enc, backend="aot_eager", fullgraph=True)(k, v, a, b)
    oc.sum().backward()
    g_c = [t.grad.clone() for t in (k, v, a, b)]
    for t in (k, v, a, b):
        t.grad = None
    oe, je = enc(k, v, a, b)
    oe.sum().backward()
    assert torch.equal(jc, je) and torch.allclose(oc, oe)
    for x, y in zip(g_c, (k.grad, v.grad, a.grad, b.grad)):
        torch.testing.assert_close(x, y)
    print("COMPILE-OK")

    # a whole model, forward and backward: kernels on against off
    import timm
    import fec_core  # noqa: F401
    m = timm.create_model("fec_tiny", num_classes=10)
    img = torch.randn(2, 3, 64, 64)
    def model_run(mode):
        config.set_kernel_mode(mode)
        m.zero_grad(set_to_none=True)
        out, recs = m.forward_with_clusters(img)
        out.square().sum().backward()
        return out.detach(), recs, {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    o1, r1, g1 = model_run("on")
    o0, r0, g0 = model_run("off")
    assert all(torch.equal(p.index, q.index) for p, q in zip(r1, r0))  # random float32 weights: no near-tie
    torch.testing.assert_close(o1, o0, rtol=1e-4, atol=1e-5)
    assert g1.keys() == g0.keys() and len(g0) > 100
    scale = max(float(g.abs().max()) for g in g0.values())
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-3, atol=1e-5 * scale, msg=n)
    print("MODEL-OK")
""")


@pytest.mark.slow
@pytest.mark.skipif(not kernels.HAS_TRITON, reason="Triton is not installed")
def test_encode_kernel_in_interpreter():
    """The fused encode step (fec_core.kernels_encode) against the PyTorch path, run in
    Triton's interpreter: assignments under the contract, values and gradients in float32
    equal to rounding and, against float64, as accurate as the PyTorch path's in every type
    (half inputs, autocast); ties, the custom ops' registration, one torch.compile graph, and
    a whole model forward and backward."""
    env = dict(os.environ, TRITON_INTERPRET="1", FEC_KERNELS="auto", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _ENCODE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "MODEL-OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_encode_kernel_switch_and_fallback():
    """Without the interpreter CPU tensors take the PyTorch path in every mode (the same
    numbers as mode 'off'); layers beyond the kernel's sizes always do; bad inputs raise."""
    k, v = torch.randn(2, 8, 6, 4), torch.randn(2, 6, 6, 4)
    a, b = torch.ones(1), torch.zeros(1)
    before = config.kernel_mode()
    try:
        config.set_kernel_mode("off")
        assert not kernels.use_encode_kernel(k, v, 4, a, b)
        ref = cl.cluster_encode(k, v, a, b, (2, 2))
        if kernels.HAS_TRITON:
            config.set_kernel_mode("on")
            assert kernels.use_encode_kernel(k, v, 4, a, b) == kernels.INTERPRET
            assert not kernels.use_encode_kernel(k, v, kernels_encode.MAX_CENTERS + 1, a, b)  # too many centers
            assert not kernels.use_encode_kernel(k.double(), v.double(), 4, a, b)
            assert not kernels.use_encode_kernel(k, v, 4, torch.ones(2), b)  # alpha per channel: not scalar
            if not kernels.INTERPRET:
                got = cl.cluster_encode(k, v, a, b, (2, 2))
                assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
                with pytest.raises(RuntimeError, match="interpreter"):
                    kernels.fused_encode(k.flatten(2), k.flatten(2)[..., :4], v.flatten(2), v.flatten(2)[..., :4], a, b)
            with pytest.raises(ValueError, match="shapes do not fit"):
                kernels.fused_encode(k.flatten(2), k.flatten(2)[:, :4, :4], v.flatten(2), v.flatten(2)[..., :4], a, b)
        config.set_kernel_mode("auto")
        assert not kernels.use_encode_kernel(k, v, 4, a, b)  # 'auto': CUDA tensors only
    finally:
        config.set_kernel_mode(before)
