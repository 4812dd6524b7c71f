"""The equations (fec_core.clustering): the literal and fast paths agree in values and gradients."""
import pytest
import torch
import torch.nn.functional as F

from fec_core import clustering as cl


def _kv(b=3, c=6, d=5, w=8, h=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, c, w, h, generator=g, dtype=torch.float64, requires_grad=True)
    values = torch.randn(b, d, w, h, generator=g, dtype=torch.float64, requires_grad=True)
    return keys, values


def test_centers_is_adaptive_average_pooling():
    x = torch.randn(2, 3, 12, 10, dtype=torch.float64)
    for grid in [(4, 5), (3, 2), (5, 3), (12, 10), (1, 1)]:
        torch.testing.assert_close(cl.centers(x, grid), F.adaptive_avg_pool2d(x, grid))


def test_similarity_is_cosine():
    c, p = torch.randn(2, 4, 7), torch.randn(2, 9, 7)
    cos = cl.similarity(c, p)
    assert cos.shape == (2, 4, 9)
    ref = torch.einsum("bmc,bnc->bmn", c, p) / (c.norm(dim=-1)[..., None] * p.norm(dim=-1)[:, None])
    torch.testing.assert_close(cos, ref)
    assert cos.abs().max() <= 1 + 1e-6


def test_assignment_follows_the_gate_sign():
    cos = torch.randn(2, 5, 30)
    idx_pos = cl.assign(cl.gate(cos, torch.tensor([2.0]), torch.tensor([0.3])))[1]
    idx_neg = cl.assign(cl.gate(cos, torch.tensor([-2.0]), torch.tensor([0.3])))[1]
    assert torch.equal(idx_pos, cos.argmax(1))
    assert torch.equal(idx_neg, cos.argmin(1))


def test_assign_nearest_matches_dense_argmax_for_any_tile():
    ck, pk = torch.randn(2, 16, 8), torch.randn(2, 200, 8)
    dense = cl.assign(cl.similarity(ck, pk))[1]
    for budget in [1, 37, 2 * 16 * 50, 1 << 24]:
        assert torch.equal(cl.assign_nearest(ck, pk, max_elements=budget), dense)


def test_aggregate_matches_the_definition_with_empty_clusters():
    values, cvals = torch.randn(2, 10, 3), torch.randn(2, 4, 3)
    index = torch.tensor([[0, 0, 1, 1, 1, 0, 3, 3, 0, 1], [2] * 10])  # cluster 2 empty in row 0
    out = cl.aggregate(values, cvals, index)
    for b in range(2):
        for m in range(4):
            members = values[b][index[b] == m]
            ref = (cvals[b, m] + members.sum(0)) / (1 + len(members))
            torch.testing.assert_close(out[b, m], ref)
    torch.testing.assert_close(out[0, 2], cvals[0, 2])  # empty cluster keeps its center value
    torch.testing.assert_close(cl.aggregate_dense(values, cvals, cl.one_hot(index, 4)), out)


def test_dispatch_gather_equals_dense_product():
    reps, index = torch.randn(2, 4, 3), torch.randint(0, 4, (2, 10))
    weight = torch.rand(2, 10)
    mask = cl.one_hot(index, 4)
    dense = cl.dispatch_dense(reps, mask * weight[:, None, :])
    torch.testing.assert_close(cl.dispatch(reps, index, weight), dense)


@pytest.mark.parametrize("grid", [(2, 3), (3, 5), (8, 12)])
def test_encode_literal_and_fast_agree_in_values_and_gradients(grid):
    outs, grads = [], []
    for literal in (True, False):
        keys, values = _kv()
        alpha = torch.tensor([-0.7], dtype=torch.float64, requires_grad=True)
        beta = torch.tensor([0.2], dtype=torch.float64, requires_grad=True)
        out, index = cl.cluster_encode(keys, values, alpha, beta, grid, literal=literal)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        outs.append((out.detach(), index))
        grads.append([t.grad for t in (keys, values, alpha, beta)])
    torch.testing.assert_close(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    assert all(g.abs().sum() > 0 for g in grads[1])  # keys, values, alpha, beta all reached


def test_pool_literal_and_fast_agree_and_keys_get_no_gradient():
    outs, grads = [], []
    for literal in (True, False):
        keys, values = _kv(w=8, h=6)
        reps, index = cl.cluster_pool(keys, values, literal=literal)
        assert reps.shape == (3, 5, 4, 3)
        (reps * torch.linspace(-1, 1, reps.numel(), dtype=reps.dtype).view_as(reps)).sum().backward()
        outs.append((reps.detach(), index))
        grads.append((keys.grad, values.grad))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1])
    torch.testing.assert_close(grads[0][1], grads[1][1])
    assert grads[0][0] is None and grads[1][0] is None  # the argmax cuts the keys off


def test_pool_rejects_odd_maps():
    keys, values = _kv(w=7, h=6)
    with pytest.raises(ValueError, match="even"):
        cl.cluster_pool(keys, values)


def test_fold_roundtrip_and_errors():
    x = torch.randn(2, 3, 8, 12)
    f = cl.fold(x, 2, 3)
    assert f.shape == (12, 3, 4, 4)
    torch.testing.assert_close(f[1], x[0, :, 0:4, 4:8])  # region (0, 1) of image 0
    assert torch.equal(cl.unfold(f, 2, 3), x)
    with pytest.raises(ValueError, match="cannot be folded"):
        cl.fold(x, 3, 3)


def test_scatter_backend_choice():
    assert cl.scatter_backend() in ("torch", "torch_scatter")
    with pytest.raises(ValueError):
        cl.set_scatter_backend("nope")
    if not cl.HAS_TORCH_SCATTER:
        with pytest.raises(ImportError, match="torch-scatter"):
            cl.set_scatter_backend("torch_scatter")


@pytest.mark.skipif(not cl.HAS_TORCH_SCATTER, reason="torch-scatter is not installed (optional extra)")
def test_torch_scatter_backend_matches_native():
    values, cvals, index = torch.randn(2, 50, 3), torch.randn(2, 6, 3), torch.randint(0, 6, (2, 50))
    native = cl.aggregate(values, cvals, index)
    cl.set_scatter_backend("torch_scatter")
    try:
        torch.testing.assert_close(cl.aggregate(values, cvals, index), native)
    finally:
        cl.set_scatter_backend("torch")
