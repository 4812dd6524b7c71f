"""The backbone: timm integration, forward API, cluster records, input checks, model size."""
import pytest
import timm
import torch

import fec_core
from fec_core import FEC
from fec_core.costs import count_macs

TINY = dict(layers=(1, 1, 1, 1), embed_dims=(8, 16, 24, 32), mlp_ratios=(2, 2, 2, 2), heads=(2, 2, 2, 2),
            head_dim=(4, 4, 4, 4), proposal=(2, 2, 2, 1))


def test_timm_registry_and_classifier_api():
    assert {"fec_small", "fec_base", "fec_large"} <= set(timm.list_models("fec_*"))
    m = timm.create_model("fec_small", num_classes=10, drop_path_rate=0.1)
    assert isinstance(m, FEC) and m.num_classes == 10
    assert m.pretrained_cfg["classifier"] == "head" and m.default_cfg["input_size"] == (3, 224, 224)
    assert max(getattr(b.drop_path, "drop_prob", 0.0) for s in m.stages for b in s.blocks) == pytest.approx(0.1)
    x = torch.randn(2, 3, 64, 64)
    feats = m.forward_features(x)
    assert feats.shape == (2, 320, 2, 2)
    assert m.forward_head(feats, pre_logits=True).shape == (2, 320)
    assert m.forward_head(feats).shape == (2, 10)
    m.reset_classifier(3)
    assert m(x).shape == (2, 3) and m.get_classifier().out_features == 3
    m.reset_classifier(0)
    assert m(x).shape == (2, 320)


def test_features_only_and_feature_info():
    m = timm.create_model("fec_small", features_only=True, out_indices=(0, 1, 2, 3))
    assert m.feature_info.channels() == [32, 64, 196, 320]
    assert m.feature_info.reduction() == [4, 8, 16, 32]
    outs = m(torch.randn(1, 3, 96, 128))
    assert [tuple(o.shape) for o in outs] == [(1, 32, 24, 32), (1, 64, 12, 16), (1, 196, 6, 8), (1, 320, 3, 4)]
    m2 = timm.create_model("fec_small", features_only=True, out_indices=(1, 2))
    assert [o.shape[1] for o in m2(torch.randn(1, 3, 64, 64))] == [64, 196]


def test_dense_settings_by_name_and_argument():
    seg = timm.create_model("fec_small_seg")
    assert not seg.dense and seg.num_classes == 0 and seg.stages[0].blocks[0].token_mixer.proposal == (10, 10)
    assert seg(torch.randn(1, 3, 64, 64)).shape == (1, 320)  # a tensor, as every timm model returns
    assert timm.create_model("fec_small", setting="seg", features_only=True).model.dense
    det = timm.create_model("fec_small", setting="det")
    assert det.stages[0].blocks[0].token_mixer.fold == (2, 2) and det.stages[2].blocks[0].token_mixer.fold == (1, 1)
    assert det.stages[1].downsample.fold == (2, 2) and det.stages[3].downsample.fold == (1, 1)
    outs = det.forward_intermediates(torch.randn(1, 3, 128, 96), intermediates_only=True)
    assert [o.shape[-2:] for o in outs] == [(32, 24), (16, 12), (8, 6), (4, 3)]
    with pytest.raises(ValueError, match="unknown setting"):
        timm.create_model("fec_small", setting="nope")


def test_forward_with_clusters_records():
    m = timm.create_model("fec_small").eval()
    with torch.no_grad():
        out, recs = m.forward_with_clusters(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000)
    pools = [r for r in recs if r.kind == "pool"]
    encodes = [r for r in recs if r.kind == "encode"]
    assert len(encodes) == 14 and len(pools) == 3
    assert [tuple(r.index.shape) for r in pools] == [(1, 1, 1, 56, 56), (1, 1, 1, 28, 28), (1, 1, 1, 14, 14)]
    assert tuple(encodes[0].index.shape) == (1, 4, 1, 1, 56, 56) and encodes[0].grid == (4, 4)
    assert all(int(r.index.max()) < r.num_centers for r in recs)
    assert recs[0].official_name == "network.0.0.token_mixer" and pools[0].official_name == "network.1"
    assert all(not l.record for l in m.clustering_layers())  # recording switched off again
    # the stage of every record: from the module name, by the one helper
    assert [r.stage for r in pools] == [1, 2, 3] and [r.stage for r in encodes].count(2) == 5
    assert fec_core.model.stage_and_block("stages.2.blocks.4.token_mixer") == (2, 4)
    assert fec_core.model.stage_and_block("stages.3.downsample") == (3, None)
    assert fec_core.model.stage_and_block("stem.proj") == (0, None)


def test_bad_inputs_raise_clear_errors():
    m = FEC(**TINY, num_classes=4)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        m(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="input channels"):
        m(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match="stages.1.downsample.*fold 1x1"):
        m(torch.randn(1, 3, 36, 64))  # 9x16 map before the first pooling: odd
    folded = FEC(**{**TINY, "fold": (2, 2, 1, 1)}, num_classes=4)
    with pytest.raises(ValueError, match="stages.0.blocks.0.token_mixer.*5x16.*fold 2x2"):
        folded(torch.randn(1, 3, 20, 64))
    with pytest.raises(ValueError, match="stages.1.downsample.*6x16.*fold 2x2.*even"):
        folded(torch.randn(1, 3, 24, 64))
    with pytest.raises(ValueError, match="entries"):
        FEC(layers=(1, 1), embed_dims=(8, 16, 24, 32))


def test_any_valid_size_works_including_non_square():
    m = FEC(**TINY, num_classes=4).eval()
    for size in [(32, 32), (64, 96), (160, 32), (33, 35)]:  # 33 -> stem floors to 8 like the official code
        assert m(torch.randn(1, 3, *size)).shape == (1, 4)


def test_literal_switch_gives_same_model_output_and_gradients():
    torch.manual_seed(1)
    m = FEC(**TINY, num_classes=4, layer_scale_init_value=1.0).double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    res = []
    for literal in (False, True):
        m.zero_grad()
        m.set_literal(literal)
        y = m(x)
        y.square().sum().backward()
        res.append((y.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(res[0][0], res[1][0])
    assert res[0][1].keys() == res[1][1].keys()
    for k in res[0][1]:
        torch.testing.assert_close(res[0][1][k], res[1][1][k], msg=k)
    assert not any("conv_f" in k for k in res[0][1])  # pooling keys never get a gradient
    assert any("token_mixer.f." in k for k in res[0][1])  # encode keys do (through the gate)


@pytest.mark.parametrize("name,params_mib,macs_g", [("fec_small", 5.46, 1.355), ("fec_base", 14.39, 3.335),
                                                    ("fec_large", 28.34, 6.478)])
def test_paper_model_size_column(name, params_mib, macs_g):
    m = timm.create_model(name).eval()
    assert round(sum(p.numel() for p in m.parameters()) / 2 ** 20, 2) == params_mib
    assert count_macs(m, 224) / 1e9 == pytest.approx(macs_g, rel=0.05)


def test_create_model_shortcut():
    assert isinstance(fec_core.create_model("fec_tiny", num_classes=3), FEC)
    with pytest.raises(ValueError, match="not an FEC model"):
        fec_core.create_model("resnet18")
