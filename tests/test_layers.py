"""The layers (fec_core.layers): the encode and pooling layers on both paths, with fold
regions and non-square maps, and where their gradients go (chapters 7 and 8)."""
import pytest
import torch

from conftest import assert_paths_agree
from fec_core import clustering as cl
from fec_core.layers import POINTWISE_BMM_MIN, ClusterEncode, ClusterPool, pointwise


@pytest.mark.parametrize("fold,size", [((1, 1), (12, 12)), ((2, 2), (12, 16)), ((1, 2), (10, 14))])
def test_encode_layer_paths_agree_and_every_parameter_learns(fold, size):
    layer = ClusterEncode(16, heads=2, head_dim=6, proposal=(3, 2) if fold == (1, 1) else (2, 2), fold=fold)
    with torch.no_grad():
        layer.sim_alpha.fill_(-1.3)  # alpha < 0: the argmax picks the least similar center
        layer.sim_beta.fill_(0.4)
    x = torch.randn(3, 16, *size)
    g = assert_paths_agree(layer, x)
    # f, v, proj, sim_alpha, sim_beta: every parameter gets a nonzero gradient (the keys through the gate)
    assert g.keys() == dict(layer.named_parameters()).keys()
    assert all(t.abs().sum() > 0 for t in g.values()), [n for n, t in g.items() if not t.abs().sum() > 0]


def test_without_the_gate_the_keys_get_no_gradient():
    """Chapter 7: the layer is the composition of the equations; dispatching with weight 1
    instead of the gate, f, sim_alpha and sim_beta drop out of the gradient."""
    layer = ClusterEncode(8, heads=1, head_dim=4, proposal=(2, 2))
    x = torch.randn(1, 8, 6, 6)
    keys, values = layer.f(x), layer.v(x)
    ck, cv = cl.to_points(cl.centers(keys, (2, 2))), cl.to_points(cl.centers(values, (2, 2)))
    best, index = cl.assign(cl.gate(cl.similarity(ck, cl.to_points(keys)), layer.sim_alpha, layer.sim_beta))
    reps = cl.aggregate(cl.to_points(values), cv, index)
    gated = cl.dispatch(reps, index, best)
    torch.testing.assert_close(layer.proj(gated.transpose(1, 2).reshape(1, 4, 6, 6)), layer(x))
    ungated = cl.dispatch(reps, index, torch.ones_like(best))
    layer.proj(ungated.transpose(1, 2).reshape(1, 4, 6, 6)).square().sum().backward()
    missing = sorted(n for n, p in layer.named_parameters() if p.grad is None)
    assert missing == ["f.bias", "f.weight", "sim_alpha", "sim_beta"]


@pytest.mark.parametrize("fold,size", [((1, 1), (12, 12)), ((2, 2), (16, 12)), ((1, 1), (10, 6))])
def test_pool_layer_paths_agree(fold, size):
    layer = ClusterPool(12, 20, fold=fold)
    x = torch.randn(2, 12, *size)
    g = assert_paths_agree(layer, x)
    assert g["conv_v.weight"].abs().sum() > 0


@pytest.mark.parametrize("rows,cols", [(1, 1), (2, 3), (7, 7), (8, 8), (12, 10)])
def test_pointwise_is_a_1x1_convolution_on_both_sides_of_its_threshold(rows, cols):
    """layers.pointwise (chapter 12): one baddbmm for maps of at least POINTWISE_BMM_MIN points,
    one F.linear over all points below; both are F.conv2d up to rounding, in values and
    gradients, and return a contiguous channels-first map."""
    torch.manual_seed(0)
    x = torch.randn(5, 12, rows, cols, dtype=torch.float64, requires_grad=True)
    w = torch.randn(20, 12, dtype=torch.float64, requires_grad=True)
    b = torch.randn(20, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 20, rows, cols, dtype=torch.float64)
    for bias in (b, None):
        out = pointwise(x, w, bias)
        ref = torch.nn.functional.conv2d(x, w[:, :, None, None], bias)
        assert out.is_contiguous() and out.shape == ref.shape
        got = torch.autograd.grad(out, (x, w), g)
        want = torch.autograd.grad(ref, (x, w), g)
        torch.testing.assert_close(out, ref)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e)
    with torch.no_grad():  # the branch taken: the same arithmetic, so the same bits
        if rows * cols < POINTWISE_BMM_MIN:
            flat = torch.nn.functional.linear(x.permute(0, 2, 3, 1).reshape(-1, 12), w, b)
            expect = flat.reshape(5, rows, cols, 20).permute(0, 3, 1, 2)
        else:
            flat = torch.baddbmm(b.reshape(1, -1, 1).expand(5, -1, rows * cols), w.expand(5, -1, -1),
                                 x.reshape(5, 12, -1))
            expect = flat.reshape(5, 20, rows, cols)
        assert torch.equal(pointwise(x, w, b), expect)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_scripted_pointwise_takes_the_same_branch():
    """TorchScript reads no module globals, so layers._bmm_min repeats POINTWISE_BMM_MIN as a
    literal: the scripted function must pick the same form (the same bits) on both sides."""
    scripted = torch.jit.script(pointwise)
    side = int(POINTWISE_BMM_MIN ** 0.5)
    for rows, cols in ((side - 1, side), (side, side)):
        x, w, b = torch.randn(3, 8, rows, cols), torch.randn(5, 8), torch.randn(5)
        assert torch.equal(scripted(x, w, b), pointwise(x, w, b))
