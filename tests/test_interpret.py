"""Tracing clusters to the pixels and merging them (fec_core.interpret, fec_core.regions),
emergent segmentation (fec_core.foreground), chapter 11; drawing and the CLI: test_visualize.py."""
import pytest
import torch
import torch.nn.functional as F

from conftest import UNEVEN, tiny_fec
from fec_core import clustering as cl
from fec_core.foreground import (border_share, evaluate_segmentation, foreground_from_regions, foreground_iou,
                                 kmeans_foreground, patch_oracle, segment_foreground)
from fec_core.interpret import encode_clusters, merge_regions, pool_parents, stem_points, trace_clusters




def test_stem_points_cover_every_pixel_including_leftovers():
    pts = stem_points(10, 9)  # 2x2 patches; the last rows / column join the nearest patch
    assert pts.shape == (10, 9)
    assert pts[0, 0] == 0 and pts[3, 4] == 1 and pts[4, 0] == 2 and pts[9, 8] == 3
    assert set(pts.unique().tolist()) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="smaller than one"):
        stem_points(3, 8)


def test_pool_parents_reproduce_the_pooled_representatives():
    """Independent check of the index layout: rebuilding each pooling layer's output from
    ``pool_parents`` (Eq. 6 by hand) gives the layer's output, with folds on a non-square input."""
    model = tiny_fec(**UNEVEN).eval()
    x = torch.randn(2, 3, 130, 194)  # stem 32x48, folds along rows in one stage, columns in another
    seen = {}
    for i in range(1, 4):
        model.stages[i].downsample.register_forward_hook(lambda m, inp, out, i=i: seen.__setitem__(i, (inp[0], out)))
    with torch.no_grad():
        _, records = model.forward_with_clusters(x)
        pools = [r for r in records if r.kind == "pool"]
        assert len(pools) == 3
        for i, rec in enumerate(pools, 1):
            inp, out = seen[i]
            layer = model.stages[i].downsample
            v = layer.conv_v(inp)
            b, d, h, w = v.shape
            parent = pool_parents(rec)
            assert parent.shape == (b, h * w) and int(parent.max()) < h * w // 4
            sums = F.avg_pool2d(v, 2).flatten(2).clone()  # the center value counts as one member
            counts = torch.ones(b, h * w // 4)
            sums.scatter_add_(2, parent[:, None, :].expand(-1, d, -1), v.flatten(2))
            counts.scatter_add_(1, parent, torch.ones(b, h * w))
            reps = (sums / counts[:, None]).reshape(b, d, h // 2, w // 2)
            torch.testing.assert_close(layer.conv_skip(inp) + layer.norm2(reps), out, rtol=0, atol=1e-5)


def test_encode_clusters_match_a_direct_assignment():
    """Stage 0's encode labels at every pixel equal the gated argmax recomputed from the layer's
    parameters on the unfolded map (fold (2, 1), proposal (2, 3))."""
    model = tiny_fec(**UNEVEN).eval()
    x = torch.randn(1, 3, 64, 96)
    seen = {}
    mixer = model.stages[0].blocks[0].token_mixer
    mixer.register_forward_hook(lambda m, inp, out: seen.__setitem__("x", inp[0]))
    _, maps, _ = trace_clusters(model, x)
    feat = seen["x"]
    keys = mixer.f(feat).reshape(mixer.heads, mixer.head_dim, 16, 24)
    for head in range(mixer.heads):
        labels = torch.empty(16, 24, dtype=torch.long)
        for r in range(2):  # fold regions along rows: rows 0-7 and 8-15
            k = keys[head, :, 8 * r:8 * r + 8]  # [C, 8, 24]
            ck = F.adaptive_avg_pool2d(k, (2, 3)).flatten(1).T  # [6, C]
            sim = cl.similarity(ck[None], k.flatten(1).T[None])[0]
            idx = cl.gate(sim, mixer.sim_alpha, mixer.sim_beta).argmax(0)
            labels[8 * r:8 * r + 8] = (idx + 6 * r).reshape(8, 24)
        pix = [m for m in maps if m.name == mixer.name and m.head == head][0].labels[0]
        expected = labels.repeat_interleave(4, 0).repeat_interleave(4, 1)
        assert torch.equal(pix, expected)


def test_trace_gives_nested_label_maps_at_image_resolution():
    model = tiny_fec(**UNEVEN).eval()
    x = torch.randn(2, 3, 128, 192)
    out, maps, feats = trace_clusters(model, x)
    assert out.shape == (2, 4)
    assert [m.kind for m in maps].count("encode") == 8 and [m.kind for m in maps].count("pool") == 3
    assert [tuple(f.shape[-2:]) for f in feats] == [(32, 48), (16, 24), (8, 12), (4, 6)]
    hierarchy = [m for m in maps if m.kind in ("stem", "pool")]
    assert [m.grid for m in hierarchy] == [(32, 48), (16, 24), (8, 12), (4, 6)]
    for m in maps:
        assert m.labels.shape == (2, 128, 192) and m.labels.dtype == torch.long
        assert int(m.labels.max()) < m.num_clusters and int(m.labels.min()) >= 0
    for fine, coarse in zip(hierarchy, hierarchy[1:]):  # pooling only merges: a finer cluster never splits
        img = torch.arange(2).view(2, 1, 1).expand_as(fine.labels)
        pairs = torch.unique(torch.stack([img.flatten(), fine.labels.flatten(), coarse.labels.flatten()]), dim=1)
        assert pairs.shape[1] == torch.unique(torch.stack([img.flatten(), fine.labels.flatten()]), dim=1).shape[1]
    # stage 2: fold (2, 2) regions with a (1, 2) center grid each
    enc = [m for m in maps if m.kind == "encode" and m.stage == 2 and m.head == 0][0]
    assert enc.num_clusters == 2 * 2 * 2


@pytest.mark.parametrize("dense", [False, True])
def test_trace_clusters_returns_the_forward_output_and_the_stage_outputs(dense):
    """One pass gives what ``model(x)`` and :meth:`FEC.forward_intermediates` give (same
    arithmetic: exact), for a classifier and for a dense model (normalized stage outputs)."""
    model = tiny_fec(**UNEVEN, dense=dense).eval()
    x = torch.randn(1, 3, 64, 64)
    out, _, feats = trace_clusters(model, x)
    with torch.no_grad():
        assert torch.equal(out, model(x))
        for mine, theirs in zip(feats, model.forward_intermediates(x, intermediates_only=True), strict=True):
            assert torch.equal(mine, theirs)


def test_encode_clusters_rejects_pool_records_and_vice_versa():
    model = tiny_fec(**UNEVEN).eval()
    _, records = model.forward_with_clusters(torch.randn(1, 3, 64, 64))
    enc = next(r for r in records if r.kind == "encode")
    pool = next(r for r in records if r.kind == "pool")
    assert encode_clusters(enc).shape[:2] == (1, 2)
    with pytest.raises(ValueError, match="not a pooling layer"):
        pool_parents(enc)
    with pytest.raises(ValueError, match="not an encode layer"):
        encode_clusters(pool)


def test_merge_regions_groups_by_features_and_orders_by_area():
    feats = torch.zeros(1, 3, 2, 2)
    feats[0, :, 0, 0] = torch.tensor([1.0, 0, 0])  # one odd representative, three alike
    feats[0, :, 0, 1] = feats[0, :, 1, 0] = feats[0, :, 1, 1] = torch.tensor([0, 1.0, 0.1])
    labels = torch.tensor([[0, 1], [2, 3]]).repeat_interleave(4, 0).repeat_interleave(4, 1)[None]
    regions = merge_regions(feats, labels, 2)
    assert regions.shape == (1, 8, 8)
    assert (regions[0, :4, :4] == 1).all() and (regions[0, 4:] == 0).all()  # the big region is 0
    with pytest.raises(ValueError, match="choose 1 <= k <= 4"):
        merge_regions(feats, labels, 5)


def test_foreground_is_the_region_off_the_border():
    regions = torch.zeros(1, 10, 10, dtype=torch.long)
    regions[0, 3:8, 2:6] = 1
    share = border_share(regions, 2)
    assert torch.allclose(share, torch.tensor([[1.0, 0.0]]))
    fg = foreground_from_regions(regions, 2)
    assert fg.sum() == 20 and fg[0, 4, 3]
    regions[0] = 1 - regions[0]  # labels swapped: still the inner square
    assert torch.equal(foreground_from_regions(regions, 2), fg)


def test_iou_and_oracle():
    a = torch.zeros(2, 8, 8, dtype=torch.bool)
    b = a.clone()
    a[0, :4] = True
    b[0, :2] = True
    iou = foreground_iou(a, b)
    assert iou.tolist() == [0.5, 1.0]  # the second image: both empty
    assert torch.equal(patch_oracle(a), a)
    table = evaluate_segmentation({"x": a}, b)
    assert table["x"]["miou"] == pytest.approx(0.75) and table["x"]["hit50"] == 1.0
    with pytest.raises(ValueError, match="differ in shape"):
        foreground_iou(a, b[:, :4])


def test_pixel_kmeans_baseline_solves_color_shapes():
    """On the default shapes (the shape's color is set apart) k-means on RGB + xy is nearly perfect:
    the reason the measurement uses ``contrast='texture'``."""
    from fec_core.data import make_shapes

    x, _, m = make_shapes(12, 64, seed=5)
    assert foreground_iou(kmeans_foreground(x, xy_weight=0.5), m).mean() > 0.9


@pytest.mark.slow
def test_emergent_segmentation_beats_both_baselines():
    """The chapter's measurement, small: an FEC trained only on shape *labels* (fec_core.train.fit,
    texture-defined shapes) segments held-out images better than the same FEC untrained and than
    k-means on the pixels' RGB + coordinates, by a clear margin (fixed seeds)."""
    from fec_core.data import SHAPE_CLASSES, TensorImageDataset, make_shapes
    from fec_core.train import TrainConfig, fit

    x, y, _ = make_shapes(2300, 64, seed=0, contrast="texture")
    train, val = TensorImageDataset(x[:2000], y[:2000], SHAPE_CLASSES), TensorImageDataset(x[2000:], y[2000:],
                                                                                           SHAPE_CLASSES)

    chapter = dict(layer_scale=None, embed_dims=(16, 32, 64, 96), mlp_ratios=(4, 4, 4, 4), heads=(2, 2, 4, 4),
                   head_dim=(8, 8, 16, 16))  # wider than the unit tests' FEC: the chapter's model
    result = fit(TrainConfig(dataset="shapes", epochs=8, threads=1, seed=0), model=tiny_fec(**chapter),
                 train_set=train, val_set=val, progress=False)
    untrained = tiny_fec(**chapter)
    xt, _, mt = make_shapes(200, 64, seed=1000, contrast="texture")
    table = evaluate_segmentation({
        "trained": segment_foreground(result.model, xt, stage=1),
        "untrained": segment_foreground(untrained, xt, stage=1),
        "pixels": kmeans_foreground(xt),
    }, mt)
    trained = table["trained"]["miou"]
    assert trained > 0.45, table
    assert trained > table["untrained"]["miou"] + 0.25, table
    assert trained > table["pixels"]["miou"] + 0.25, table
