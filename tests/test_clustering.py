"""The equations (fec_core.clustering): each function against its definition, the tie rule,
the tiled assignment, and the literal and fast paths of the two layer functions in values,
assignments and gradients (the layers and the whole model: test_layers.py, test_model.py)."""
import pytest
import torch
import torch.nn.functional as F

from fec_core import clustering as cl


def _kv(b=3, c=6, d=5, w=8, h=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, c, w, h, generator=g, dtype=torch.float64, requires_grad=True)
    values = torch.randn(b, d, w, h, generator=g, dtype=torch.float64, requires_grad=True)
    return keys, values


# ----------------------------------------------------------------------------- fold, centers, similarity
def test_fold_roundtrip_and_errors():
    x = torch.randn(2, 3, 8, 12)
    f = cl.fold(x, 2, 3)
    assert f.shape == (12, 3, 4, 4)
    torch.testing.assert_close(f[1], x[0, :, 0:4, 4:8])  # region (0, 1) of image 0
    assert torch.equal(cl.unfold(f, 2, 3), x)
    with pytest.raises(ValueError, match="cannot be folded"):
        cl.fold(x, 3, 3)


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


# ----------------------------------------------------------------------------- assignment
def test_assignment_follows_the_gate_sign():
    cos = torch.randn(2, 5, 30)
    idx_pos = cl.assign(cl.gate(cos, torch.tensor([2.0]), torch.tensor([0.3])))[1]
    idx_neg = cl.assign(cl.gate(cos, torch.tensor([-2.0]), torch.tensor([0.3])))[1]
    assert torch.equal(idx_pos, cos.argmax(1))
    assert torch.equal(idx_neg, cos.argmin(1))


def test_ties_go_to_the_first_center_in_every_path():
    # Exact ties: integer keys whose normalized products are exact in any summation order.
    ck = torch.tensor([[[1., 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]])  # 0 == 2, 1 == 3
    pk = torch.tensor([[[2., 0, 0, 0], [0, 3, 0, 0], [0, 0, 0, 1], [1, 1, 0, 0], [0, 0, 5, 0]]])
    want = torch.tensor([[0, 1, 0, 0, 4]])
    cos = cl.similarity(ck, pk)
    assert torch.equal(cl.assign(cos)[1], want)
    for budget in (1, 2, 3, 7, 1 << 20):  # tiles over points and over centers (a running maximum)
        assert torch.equal(cl.assign_nearest(ck, pk, max_elements=budget), want), budget
    # alpha = 0: every gate value is sigmoid(beta), all centers tie, every point goes to center 0
    _, idx = cl.assign(cl.gate(cos, torch.zeros(1), torch.tensor([1.5])))
    assert torch.equal(idx, torch.zeros_like(idx))


@pytest.mark.parametrize("b,m,n,c", [(2, 16, 200, 8), (2, 49, 196, 16), (3, 196, 500, 24), (1, 70, 301, 8),
                                     (5, 300, 257, 4)])
def test_assign_nearest_is_the_dense_argmax_for_any_tile(b, m, n, c):
    torch.manual_seed(b * m + n)
    ck, pk = torch.randn(b, m, c), torch.randn(b, n, c)
    ref = cl.assign(cl.similarity(ck, pk))[1]
    # budgets that exercise the smallest tiles, one shot, point tiles, batch splits and
    # center tiles (running max)
    for budget in (1, 37, 4096, 20000, b * m * 128 - 1, b * m * n - 1, 1 << 24):
        assert torch.equal(cl.assign_nearest(ck, pk, max_elements=budget), ref), budget


def test_assign_nearest_rejects_bad_shapes():
    with pytest.raises(ValueError, match="center_keys"):
        cl.assign_nearest(torch.randn(2, 4, 8), torch.randn(2, 10, 6))
    with pytest.raises(ValueError, match="max_elements"):
        cl.assign_nearest(torch.randn(2, 4, 8), torch.randn(2, 10, 8), max_elements=0)


# ----------------------------------------------------------------------------- aggregate and dispatch
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
    torch.testing.assert_close(cl.aggregate_literal(values, cvals, cl.one_hot(index, 4)), out)


def test_aggregate_gradient_is_divided_by_cluster_size():
    """Chapter 6: each value's gradient is the upstream one divided by ``1 + |cluster|``."""
    values = torch.randn(2, 30, 4, requires_grad=True)
    centers = torch.randn(2, 6, 4, requires_grad=True)
    index = torch.randint(0, 5, (2, 30))  # center 5 stays empty
    upstream = torch.randn(2, 6, 4)
    (cl.aggregate(values, centers, index) * upstream).sum().backward()
    sizes = F.one_hot(index, 6).sum(1).double()  # [2, 6]
    for b in range(2):
        want_v = upstream[b, index[b]] / (1 + sizes[b, index[b]]).unsqueeze(-1).float()
        torch.testing.assert_close(values.grad[b], want_v)
        torch.testing.assert_close(centers.grad[b], upstream[b] / (1 + sizes[b]).unsqueeze(-1).float())
    assert torch.equal(centers.grad[:, 5], upstream[:, 5])  # empty cluster: the whole gradient


def test_aggregate_accumulates_half_precision_in_float32():
    v = torch.rand(1, 4, 4096) + 1.0  # many members: a bfloat16 running sum would lose them
    cv = torch.rand(1, 4, 2)
    index = torch.zeros(1, 4096, dtype=torch.long)
    exact = cl.aggregate(v.double(), cv.double(), index, channels_first=True)
    half = cl.aggregate(v.bfloat16(), cv.bfloat16(), index, channels_first=True)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.double(), exact, atol=0, rtol=1e-2)
    # against the public points-first form
    torch.testing.assert_close(cl.aggregate(v, cv, index, channels_first=True).transpose(1, 2),
                               cl.aggregate(v.transpose(1, 2), cv.transpose(1, 2), index))


def test_dispatch_gather_equals_dense_product():
    reps, index = torch.randn(2, 4, 3), torch.randint(0, 4, (2, 10))
    weight = torch.rand(2, 10)
    mask = cl.one_hot(index, 4)
    dense = cl.dispatch_literal(reps, mask * weight[:, None, :])
    torch.testing.assert_close(cl.dispatch(reps, index, weight), dense)


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


# ----------------------------------------------------------------------------- the layer functions
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
    assert outs[1][0].transpose(1, 2).is_contiguous()  # the fast path's output is channels first


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


@pytest.mark.parametrize("literal", [False, True])
def test_pool_index_is_row_major_over_the_output_map(literal):
    """Chapter 8: index ``m`` names the output cell at row ``m // (W/2)``, column ``m % (W/2)``."""
    keys, values = torch.randn(2, 5, 8, 6), torch.randn(2, 3, 8, 6)
    reps, index = cl.cluster_pool(keys, values, literal=literal)  # reps [2, 3, 4, 3]
    assert reps.shape == (2, 3, 4, 3) and index.shape == (2, 48)
    windows = F.avg_pool2d(values, 2)  # center values, [2, 3, 4, 3]
    points = values.flatten(2)  # [2, 3, 48]
    for b in range(2):
        for m in range(12):
            row, col = divmod(m, 3)
            members = points[b][:, index[b] == m]
            want = (windows[b, :, row, col] + members.sum(1)) / (1 + members.shape[1])
            torch.testing.assert_close(reps[b, :, row, col], want)


def test_flat_regions_tie_the_same_way_in_literal_and_fast_pooling():
    """A constant patch makes its centers identical: both paths send its points to the first
    of them (or literal and fast models would disagree on flat images), and the other tied
    centers, left empty, keep their center values."""
    keys = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    keys[:, :, :4, :] = 1.0  # flat top half: the 2 x 4 centers of rows 0-1 are all the same
    values = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    rep_fast, idx_fast = cl.cluster_pool(keys, values, literal=False)
    rep_lit, idx_lit = cl.cluster_pool(keys, values, literal=True)
    assert torch.equal(idx_fast, idx_lit)
    torch.testing.assert_close(rep_fast, rep_lit)
    top = idx_fast.reshape(2, 8, 8)[:, :4]
    assert torch.equal(top, torch.zeros_like(top))  # first of the tied (flat) centers
    assert not ((idx_fast >= 1) & (idx_fast < 8)).any()  # the other flat centers stay empty
    empty = rep_fast.flatten(2)[..., 1:8]
    torch.testing.assert_close(empty, F.avg_pool2d(values, 2).flatten(2)[..., 1:8])


def test_pool_rejects_odd_maps():
    keys, values = _kv(w=7, h=6)
    with pytest.raises(ValueError, match="even"):
        cl.cluster_pool(keys, values)


def test_cluster_pool_memory_is_linear_in_points():
    """Peak allocation of the fast pooling step grows like N, the literal one like N^2."""
    from fec_core.bench import peak_cpu_bytes
    peaks = {}
    for side in (32, 64):
        k, v = torch.randn(1, 8, side, side), torch.randn(1, 8, side, side)
        with torch.no_grad():
            peaks[side] = (peak_cpu_bytes(lambda: cl.cluster_pool(k, v)),
                           peak_cpu_bytes(lambda: cl.cluster_pool(k, v, literal=True)))
    if any(p is None for pair in peaks.values() for p in pair):
        pytest.skip("torch.profiler gives no allocation events here")
    fast_ratio = peaks[64][0] / peaks[32][0]
    lit_ratio = peaks[64][1] / peaks[32][1]
    assert fast_ratio < 6, peaks  # 4x the points: about 4x the memory
    assert lit_ratio > 10, peaks  # the dense [N/4, N] similarity: about 16x
