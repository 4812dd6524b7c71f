"""What chapters 6-8 (aggregation, dispatch, pooling) rely on and the core tests do not check:

* the gradient of aggregation reaches each value divided by ``1 + |cluster|`` (chapter 6);
* every parameter of an encode layer (``f``, ``v``, ``proj``, ``sim_alpha``, ``sim_beta``) gets a
  nonzero gradient, on both paths, and the keys get theirs only through the gate (chapter 7);
* in a whole model the parameters without a gradient are exactly the pooling layers' ``conv_f``,
  and freezing them changes neither the output nor any other gradient (chapter 8);
* a pooling index ``m`` names the output cell at row ``m // (W/2)``, column ``m % (W/2)``, the
  layout the book uses to follow pixels through the three pooling layers (chapter 8).
"""
import pytest
import torch
import torch.nn.functional as F

from fec_core import FEC
from fec_core import clustering as cl
from fec_core.layers import ClusterEncode, ClusterPool

TINY = dict(layers=(1, 1, 1, 1), embed_dims=(8, 16, 24, 32), mlp_ratios=(2, 2, 2, 2), heads=(2, 2, 2, 2),
            head_dim=(4, 4, 4, 4), proposal=(2, 2, 1, 1), num_classes=5)


def test_aggregate_gradient_is_divided_by_cluster_size():
    torch.manual_seed(0)
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


@pytest.mark.parametrize("literal", [False, True])
def test_every_encode_parameter_gets_a_gradient(literal):
    torch.manual_seed(0)
    layer = ClusterEncode(8, heads=2, head_dim=4, proposal=(2, 2), literal=literal)
    x = torch.randn(2, 8, 6, 6)
    (layer(x) - torch.randn(2, 8, 6, 6)).square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_without_the_gate_the_keys_get_no_gradient():
    """Dispatch with weight 1 instead of the gate: f, sim_alpha, sim_beta drop out (chapter 7)."""
    torch.manual_seed(0)
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


def test_only_pooling_keys_lack_gradients_and_freezing_them_changes_nothing():
    torch.manual_seed(0)
    model = FEC(**TINY)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 3])

    def run():
        model.zero_grad(set_to_none=True)
        out = model(x)
        F.cross_entropy(out, y).backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    out, grads = run()
    missing = {n for n, _ in model.named_parameters()} - set(grads)
    assert missing == {f"stages.{i}.downsample.conv_f.{w}" for i in (1, 2, 3) for w in ("weight", "bias")}
    for m in model.modules():
        if isinstance(m, ClusterPool):
            m.conv_f.requires_grad_(False)
    out2, grads2 = run()
    assert torch.equal(out, out2) and grads.keys() == grads2.keys()
    assert all(torch.equal(grads[n], grads2[n]) for n in grads)


@pytest.mark.parametrize("literal", [False, True])
def test_pool_index_is_row_major_over_the_output_map(literal):
    torch.manual_seed(0)
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
