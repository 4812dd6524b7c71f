"""The layers (fec_core.layers): the encode and pooling layers on both paths, with fold
regions and non-square maps, and where their gradients go (chapters 7 and 8)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


class _Ops(TorchDispatchMode):
    """Records every ATen operation run inside it, with the number of elements it returned."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append((str(func.overloadpacket), out.numel() if isinstance(out, torch.Tensor) else None))
        return out


@pytest.mark.parametrize("rows,cols", [(2, 2), (7, 7), (8, 8), (12, 10)])
def test_pointwise_is_one_product_and_autocast_casts_the_bias_at_its_own_size(rows, cols):
    """layers.pointwise (chapter 12): below POINTWISE_BMM_MIN points one addmm over all points,
    from there one baddbmm; under bf16 autocast its output has the bits of the same product on
    bf16 inputs, and the bias [O] is cast as it is, never as a [B, O, H * W] tensor (when it
    was expanded first, that copy was 13% of fec_small's inference memory traffic)."""
    b, c, o = 3, 8, 16  # o != c: a cast of the output's size can only be a widened bias
    x, w, bias = torch.randn(b, c, rows, cols), torch.randn(o, c), torch.randn(o)
    rec = _Ops()
    with torch.autocast("cpu", dtype=torch.bfloat16), rec:
        out = pointwise(x, w, bias)
    products = [op for op, _ in rec.ops if op in ("aten.addmm", "aten.baddbmm", "aten.bmm", "aten.mm")]
    assert products == (["aten.addmm"] if rows * cols < POINTWISE_BMM_MIN else ["aten.baddbmm"])
    casts = [n for op, n in rec.ops if op == "aten._to_copy"]
    assert bias.numel() in casts and out.numel() not in casts, casts
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, pointwise(x.bfloat16(), w.bfloat16(), bias.bfloat16()))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_scripted_pointwise_takes_the_same_branch():
    """TorchScript reads no module globals, so layers._bmm_min repeats POINTWISE_BMM_MIN as a
    literal: the scripted function must pick the same form (the same bits) on both sides."""
    scripted = torch.jit.script(pointwise)
    side = int(POINTWISE_BMM_MIN ** 0.5)
    for rows, cols in ((side - 1, side), (side, side)):
        x, w, b = torch.randn(3, 8, rows, cols), torch.randn(5, 8), torch.randn(5)
        assert torch.equal(scripted(x, w, b), pointwise(x, w, b))
