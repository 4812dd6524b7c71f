"""The backbone (fec_core.model): timm integration, forward API, cluster records, input
checks, model size, and the literal and fast paths of a whole model."""
import pytest
import timm
import torch
import torch.nn.functional as F

import fec_core
from conftest import assert_paths_agree, tiny_fec
from fec_core import FEC
from fec_core.costs import count_macs


def test_create_model_arguments_reach_the_model():
    """The classifier and drop-path arguments of timm.create_model (timm's contract for every
    registered name, heads and features included: test_ecosystem.py)."""
    m = timm.create_model("fec_small", num_classes=10, drop_path_rate=0.1)
    assert isinstance(m, FEC) and m.num_classes == 10 and m.get_classifier().out_features == 10
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for s in m.stages for b in s.blocks]
    assert rates[0] == 0 and max(rates) == pytest.approx(0.1) and rates == sorted(rates)  # linear in depth
    m.reset_classifier(3)
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 3) and m.get_classifier().out_features == 3


def test_features_only_picks_stages_of_a_non_square_input():
    m = timm.create_model("fec_small", features_only=True, out_indices=(1, 2))
    assert m.feature_info.channels() == [64, 196] and m.feature_info.reduction() == [8, 16]
    assert [tuple(o.shape) for o in m(torch.randn(1, 3, 96, 128))] == [(1, 64, 12, 16), (1, 196, 6, 8)]


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
    assert tuple(encodes[0].index.shape) == (1, 4, 1, 1, 56, 56) and encodes[0].proposal == (4, 4)
    assert all(int(r.index.max()) < r.num_centers for r in recs)
    assert recs[0].official_name == "network.0.0.token_mixer" and pools[0].official_name == "network.1"
    assert all(not l.record for l in m.clustering_layers())  # recording switched off again
    # the stage of every record: from the module name, by the one helper
    assert [r.stage for r in pools] == [1, 2, 3] and [r.stage for r in encodes].count(2) == 5
    assert fec_core.records.stage_and_block("stages.2.blocks.4.token_mixer") == (2, 4)
    assert fec_core.records.stage_and_block("stages.3.downsample") == (3, None)
    assert fec_core.records.stage_and_block("stem.proj") == (0, None)


def test_bad_inputs_raise_clear_errors():
    m = tiny_fec(proposal=(2, 2, 2, 1))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        m(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="input channels"):
        m(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match="stages.1.downsample.*fold 1x1"):
        m(torch.randn(1, 3, 36, 64))  # 9x16 map before the first pooling: odd
    folded = tiny_fec(proposal=(2, 2, 2, 1), fold=(2, 2, 1, 1))
    with pytest.raises(ValueError, match="stages.0.blocks.0.token_mixer.*5x16.*fold 2x2"):
        folded(torch.randn(1, 3, 20, 64))
    with pytest.raises(ValueError, match="stages.1.downsample.*6x16.*fold 2x2.*even"):
        folded(torch.randn(1, 3, 24, 64))
    with pytest.raises(ValueError, match="entries"):
        FEC(layers=(1, 1), embed_dims=(8, 16, 24, 32))


def test_any_valid_size_works_including_non_square():
    m = tiny_fec(proposal=(2, 2, 2, 1)).eval()
    for size in [(32, 32), (64, 96), (160, 32), (33, 35)]:  # 33 -> stem floors to 8 like the official code
        assert m(torch.randn(1, 3, *size)).shape == (1, 4)


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


# ----------------------------------------------------------------------------- cluster records
def _cosine(region_keys, grid):
    """Keys of one region [C, w, h] -> cosine of every center (adaptive pooling) with every point, [M, N]."""
    ck = F.adaptive_avg_pool2d(region_keys[None], grid)[0].flatten(1).T  # [M, C]
    pk = region_keys.flatten(1).T  # [N, C]
    return F.normalize(ck, dim=1) @ F.normalize(pk, dim=1).T


@pytest.mark.parametrize("literal", [False, True])
def test_records_hold_the_assignment_of_every_image_head_and_region(literal):
    """Chapters 3-5: the records of ``forward_with_clusters`` with several images, heads and
    fold regions (``[B, heads, fold_w, fold_h, w, h]`` for encode layers, ``[B, fold_w, fold_h,
    w, h]`` for pooling), recomputed per image, head and region with plain PyTorch, on a
    non-square input and with a negative ``sim_alpha``."""
    model = tiny_fec(proposal=((2, 3), (2, 2), (2, 2), (1, 1)), fold=(2, 2, 1, 1), literal=literal).double()
    model.eval()
    mixer = model.stages[0].blocks[0].token_mixer
    d = mixer.head_dim
    with torch.no_grad():
        mixer.sim_alpha.fill_(-0.8)  # the gate decreases with similarity: the argmax is an argmin of cos
        mixer.sim_beta.fill_(0.3)
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64)  # stage-1 map 16x24, regions 8x12
    with torch.no_grad():
        _, records = model.forward_with_clusters(x)
        enc, pool = records[0], next(r for r in records if r.kind == "pool")
        keys = mixer.f(model.stages[0].blocks[0].norm1(model.stem(x)))  # [2, 2 * d, 16, 24]
        pool_keys = model.stages[1].downsample.conv_f(model.stages[0](model.stem(x)))  # [2, C, 16, 24]

    assert enc.name == "stages.0.blocks.0.token_mixer" and enc.proposal == (2, 3) and enc.fold == (2, 2)
    assert tuple(enc.index.shape) == (2, 2, 2, 2, 8, 12)
    assert tuple(pool.index.shape) == (2, 2, 2, 8, 12) and pool.proposal == (4, 6)
    changed = False
    for b in range(2):
        for p in range(2):
            for q in range(2):
                rows, cols = slice(8 * p, 8 * p + 8), slice(12 * q, 12 * q + 12)
                for e in range(2):
                    cos = _cosine(keys[b, d * e:d * e + d, rows, cols], (2, 3))
                    want = torch.sigmoid(mixer.sim_beta + mixer.sim_alpha * cos).argmax(0)
                    assert torch.equal(enc.index[b, e, p, q].flatten(), want), (b, e, p, q)
                    assert torch.equal(want, cos.argmin(0))  # alpha < 0: the least similar center
                    changed = changed or not torch.equal(want, cos.argmax(0))
                want_pool = _cosine(pool_keys[b, :, rows, cols], (4, 6)).argmax(0)
                assert torch.equal(pool.index[b, p, q].flatten(), want_pool), (b, p, q)
    assert changed  # the negative alpha really changed the assignment


# ----------------------------------------------------------------------------- literal and fast paths
@pytest.mark.parametrize("kw,size", [
    (dict(), (64, 64)),
    (dict(fold=(2, 2, 1, 1), proposal=(2, 2, 2, 1), dense=True), (64, 64)),
    (dict(proposal=((2, 3), (2, 3), (1, 2), (1, 1)), dense=True), (64, 96)),
])
def test_literal_and_fast_models_agree(kw, size):
    """Outputs, gradients of the input and of every parameter, and every layer's assignment,
    with fold regions, dense outputs and a non-square input."""
    m = tiny_fec(**kw)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(3))
    g = assert_paths_agree(m, x, atol=2e-5)
    assert len(g) > 20
    m.eval()
    with torch.no_grad():
        recs_f = m.set_literal(False).forward_with_clusters(x)[1]
        recs_l = m.set_literal(True).forward_with_clusters(x)[1]
    assert len(recs_f) == len(recs_l) == 7
    for a, b in zip(recs_f, recs_l):
        assert torch.equal(a.index, b.index), a.name


def test_bf16_autocast_paths_agree_closely():
    m = tiny_fec().eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = m.set_literal(False)(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = m.set_literal(False)(x).float()
            lit = m.set_literal(True)(x).float()
    scale = ref.abs().max()
    assert (fast - ref).abs().max() < 0.1 * scale
    assert (lit - ref).abs().max() < 0.1 * scale


# ----------------------------------------------------------------------------- bad inputs (issue 14)
def test_bad_image_batches_get_clear_errors():
    m = tiny_fec().eval()
    with pytest.raises(TypeError, match="floating-point image batch, got torch.uint8"):
        m(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(TypeError, match="input is torch.float64 but the model's weights are torch.float32"):
        m(torch.zeros(1, 3, 64, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match="empty batch"):
        m(torch.zeros(0, 3, 64, 64))
    with torch.no_grad():  # what works stays working: a float64 model on float64 images
        assert m.double()(torch.zeros(1, 3, 64, 64, dtype=torch.float64)).dtype == torch.float64


def test_bad_classifier_resets_are_named():
    m = tiny_fec()
    with pytest.raises(ValueError, match="num_classes must be an int >= 0.*-1"):
        m.reset_classifier(-1)
    with pytest.raises(ValueError, match="global_pool"):
        m.reset_classifier(3, "max")


@pytest.mark.parametrize("kw,match", [
    (dict(fold=0), r"fold\[0\] must be a positive int"),
    (dict(proposal=0), r"proposal\[0\] must be a positive int"),
    (dict(proposal=(4, (2, 0), 2, 2)), r"proposal\[1\].*\(2, 0\)"),
    (dict(num_classes=-1), r"num_classes must be an int >= 0.*-1"),
    (dict(drop_path_rate=1.0), r"drop_path_rate must be in \[0, 1\), got 1.0"),
    (dict(drop_path_rate=-0.1), r"drop_path_rate must be in \[0, 1\)"),
    (dict(drop_rate=2), r"drop_rate must be in \[0, 1\)"),
    (dict(global_pool="max"), "global_pool"),
    (dict(features_only=True, out_indices=()), "out_indices must name at least one"),
    (dict(features_only=True, out_indices=(0, 4)), r"\[4\] not stage indices"),
])
def test_bad_constructor_arguments_are_named(kw, match):
    if "fold" in kw or "proposal" in kw:
        kw = {k: (v,) * 4 if isinstance(v, int) else v for k, v in kw.items()}
    with pytest.raises(ValueError, match=match):
        timm.create_model("fec_tiny", **kw)
