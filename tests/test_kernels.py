"""The Triton kernel (fec_core.kernels): the fused cosine argmax against its PyTorch
reference in Triton's CPU interpreter (under the numerical contract of fec_core.numerics),
through the pooling function and traced by torch.compile; the mode switch and the CPU
fallback. On a CUDA device: test_gpu.py."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fec_core import kernels

_INTERPRET_SCRIPT = textwrap.dedent(r"""
    import torch, torch.nn.functional as F
    import fec_core.clustering as cl
    from fec_core import kernels
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
            assert_assignments_close(scores, got, expected=kernels.cosine_argmax_reference(c_, p_),
                                     atol=tolerance(dt), msg=f"{dt} {(b, m, n, c)}")
            twice = torch.cat([c_, c_], 1)  # duplicates: same arithmetic, the first copy wins
            assert int(kernels.cosine_argmax(twice, p_).max()) < m
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: inputs cast like matmul would
            assert torch.equal(kernels.cosine_argmax(ck, pk), kernels.cosine_argmax(ck.bfloat16(), pk.bfloat16()))
    # through the layer function, with the kernel forced on
    kernels.set_mode("on")
    k, v = torch.randn(2, 8, 16, 12), torch.randn(2, 8, 16, 12)
    rf, jf = cl.cluster_pool(k, v)
    rl, jl = cl.cluster_pool(k, v, literal=True)
    kd = k.double()
    scores = cl.similarity(cl.to_points(cl.centers(kd, (8, 6))), cl.to_points(kd))
    assert_assignments_close(scores, jf, expected=jl, atol=tolerance(torch.float32))
    cv, pv = cl.to_points(cl.centers(v, (8, 6))), cl.to_points(v)
    ref = cl.aggregate_dense(pv, cv, cl.one_hot(jf, cv.shape[1]))  # the literal sums of the same pick
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
    assert kernels.mode() in ("auto", "off", "on")
    with pytest.raises(ValueError):
        kernels.set_mode("sometimes")
    c = torch.randn(1, 4, 8)
    if not kernels.INTERPRET:
        assert not kernels.use_kernel(c, c)  # CPU tensors use the PyTorch tiles in 'auto' mode
    before = kernels.mode()
    try:
        kernels.set_mode("off")
        assert not kernels.use_kernel(c, c)
    finally:
        kernels.set_mode(before)

