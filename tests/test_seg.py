"""Dense prediction (fec_core.seg, chapter 13): multi-scale features, the Semantic FPN head,
shapes segmentation trained through fec_core.train.fit, and a torchvision detector on FEC."""
import pytest
import timm
import torch

import fec_core  # noqa: F401  (registers the FEC models with timm)
from conftest import tiny_fec
from fec_core import SETTINGS
from fec_core.seg import (IGNORE_INDEX, SEG_CLASSES, FECBackboneWithFPN, FECSegmenter, SemanticFPN, backbone_fec,
                          feature_channels, segmentation_loss, shapes_segmentation, train_segmentation)
from fec_core.train import FitResult, MeanIoU, evaluate


# ----------------------------------------------------------------------------- multi-scale features
@pytest.mark.parametrize("setting", ["seg", "det"])
@pytest.mark.parametrize("size", [(64, 64), (96, 160), (128, 64)])
def test_features_only_strides_channels_and_settings(setting, size):
    m = timm.create_model("fec_tiny", features_only=True, setting=setting).eval()
    chans, strides = m.feature_info.channels(), m.feature_info.reduction()
    assert strides == [4, 8, 16, 32] and chans == [24, 48, 96, 128]
    assert feature_channels(m) == (chans, strides)
    fec = backbone_fec(m)
    # the official dense-prediction settings reach every layer
    enc = [b.token_mixer for s in fec.stages for b in s.blocks]
    pools = [s.downsample for s in fec.stages[1:]]
    for i, s in enumerate(fec.stages):
        for b in s.blocks:
            p = SETTINGS[setting]["proposal"][i]
            assert b.token_mixer.proposal == (p, p) and b.token_mixer.fold == (SETTINGS[setting]["fold"][i],) * 2
    assert [p.fold for p in pools] == [(f, f) for f in SETTINGS[setting]["fold"][1:]]
    assert len(enc) == 5
    h, w = size
    feats = m(torch.randn(2, 3, h, w))
    assert [tuple(f.shape) for f in feats] == [(2, c, h // s, w // s) for c, s in zip(chans, strides)]
    assert all(torch.isfinite(f).all() for f in feats)


@pytest.mark.parametrize("setting", ["seg", "det"])
def test_forward_intermediates_matches_features_only(setting):
    dense = timm.create_model("fec_tiny", setting=setting, dense=True).eval()
    assert dense.dense and dense.num_classes == 0
    wrapped = timm.create_model("fec_tiny", features_only=True, setting=setting).eval()
    wrapped.model.load_state_dict(dense.state_dict())
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        final, inter = dense.forward_intermediates(x)
        only = dense.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
        early = dense.forward_intermediates(x, indices=[0, 2], stop_early=True, intermediates_only=True)
        feats = wrapped(x)
    assert len(inter) == 4 and all(torch.equal(a, b) for a, b in zip(inter, feats))
    assert torch.equal(final, inter[-1])
    assert torch.equal(only[0], inter[1]) and torch.equal(only[1], inter[3])
    assert len(early) == 2 and torch.equal(early[0], inter[0]) and torch.equal(early[1], inter[2])
    # the normalized stage outputs (GroupNorm with one group: zero mean per sample at init)
    assert all(f.mean(dim=(1, 2, 3)).abs().max() < 1e-4 for f in inter)


@pytest.mark.parametrize("setting,size,layer", [
    ("seg", (70, 70), "stages.1.downsample"),      # 17x17 stage-0 map: cannot pool to half
    ("seg", (80, 64), "stages.3.downsample"),      # 20 -> 10 -> 5: the last pooling needs an even map
    ("det", (100, 100), "stages.0.blocks.0"),      # 25x25 cannot be split into 2x2 fold regions
    ("det", (48, 64), "stages.3.downsample"),
])
def test_invalid_sizes_raise_a_clear_error(setting, size, layer):
    m = timm.create_model("fec_tiny", features_only=True, setting=setting)
    with pytest.raises(ValueError, match=rf"{layer}.*fold"):
        m(torch.randn(1, 3, *size))
    with pytest.raises(ValueError, match="image batch"):
        m(torch.randn(3, 64, 64))


def test_classifier_backbone_is_refused_by_the_heads():
    classifier = tiny_fec(num_classes=5)
    with pytest.raises(ValueError, match="dense=True"):
        FECSegmenter(classifier, 5)
    with pytest.raises(ValueError, match="feature_info"):
        FECSegmenter(torch.nn.Conv2d(3, 8, 1), 5)


# ----------------------------------------------------------------------------- Semantic FPN
def test_semantic_fpn_shapes_levels_and_errors():
    chans = [8, 16, 24, 32]
    head = SemanticFPN(chans, num_classes=5, fpn_channels=16, head_channels=8)
    # 1, 1, 2 and 3 conv steps for strides 4, 8, 16, 32 (one 2x upsampling per step but the first level's)
    assert [len(s) for s in head.scale_heads] == [1, 1, 2, 3]
    feats = [torch.randn(2, c, 24 // 2 ** i, 40 // 2 ** i) for i, c in enumerate(chans)]  # last map 3x5
    out = head(feats)
    assert out.shape == (2, 5, 24, 40)
    pyramid = head.fpn(feats)
    assert [tuple(p.shape) for p in pyramid] == [(2, 16, 24 // 2 ** i, 40 // 2 ** i) for i in range(4)]
    # the top-down path: the finest pyramid level depends on the coarsest backbone map, not the reverse
    x = [f.clone().requires_grad_() for f in feats]
    head.fpn(x)[0].sum().backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in x)
    x = [f.clone().requires_grad_() for f in feats]
    head.fpn(x)[3].sum().backward()
    assert x[3].grad.abs().sum() > 0 and all(f.grad is None for f in x[:3])
    with pytest.raises(ValueError, match="4 feature maps"):
        head(feats[:3])
    with pytest.raises(ValueError, match=r"feature 1 should be \[B, 16"):
        head([feats[0], feats[0], feats[2], feats[3]])
    with pytest.raises(ValueError, match="same length"):
        SemanticFPN(chans, 5, strides=(4, 8, 16))


def test_segmenter_output_and_gradients():
    torch.manual_seed(0)
    seg = FECSegmenter(timm.create_model("fec_tiny", features_only=True, setting="seg"), len(SEG_CLASSES),
                       fpn_channels=32, head_channels=16)
    x = torch.randn(2, 3, 64, 96)
    target = torch.randint(0, len(SEG_CLASSES), (2, 64, 96))
    target[:, :4] = IGNORE_INDEX
    logits = seg(x)
    assert logits.shape == (2, len(SEG_CLASSES), 64, 96)
    segmentation_loss(logits, target).backward()
    no_grad = [n for n, p in seg.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # only the pooling layers' conv_f (it feeds an argmax) gets no gradient
    assert no_grad and all(".conv_f." in n for n in no_grad)
    assert seg.predict(x).shape == (2, 64, 96)
    with pytest.raises(ValueError, match="target"):
        segmentation_loss(logits, target[:, :32])


# ----------------------------------------------------------------------------- data
def test_shapes_segmentation_is_the_mask_task_of_shapes():
    from fec_core.data import shapes_datasets

    tr, va = shapes_segmentation(6, 2, size=32, seed=3)  # its targets: test_data.py
    assert tr.classes == SEG_CLASSES and len(tr) == 6 and len(va) == 2
    ref = shapes_datasets(6, 2, 32, seed=3, target="mask")[1]
    assert all(torch.equal(va[i][0], ref[i][0]) and torch.equal(va[i][1], ref[i][1]) for i in range(2))


# ----------------------------------------------------------------------------- training through fit
def all_background_miou(val_set, num_classes):
    metric = MeanIoU(num_classes)
    for _, y in val_set:
        metric.update(torch.nn.functional.one_hot(torch.zeros_like(y), num_classes).permute(2, 0, 1)[None].float(),
                      y[None])
    return metric.compute()["miou"]


def test_short_segmentation_training_improves_miou():
    """fit() trains a segmenter: on the shape-versus-background split of ``shapes`` (the
    five-class task needs minutes, chapter 13), a few seconds lift mIoU well above both the
    untrained model and the all-background answer."""
    from fec_core.data import TensorImageDataset, make_shapes

    images, _, masks = make_shapes(256 + 48, 32, seed=0)
    classes = ("background", "shape")
    tr = TensorImageDataset(images[:256], masks[:256].long(), classes)
    va = TensorImageDataset(images[256:], masks[256:].long(), classes)
    torch.manual_seed(0)
    model = FECSegmenter(tiny_fec(dense=True, embed_dims=(16, 32, 48, 64)), 2, fpn_channels=32, head_channels=32)
    before = evaluate(model, va)["miou"]
    trivial = all_background_miou(va, 2)
    res = train_segmentation(model=model, train_set=tr, val_set=va, progress=False, epochs=6, batch_size=8,
                             img_size=32, lr=3e-3)
    assert isinstance(res, FitResult) and res.metric_name == "miou" and len(res.history) == 6
    curve = [h["val_miou"] for h in res.history]
    after = curve[-1]
    assert after == pytest.approx(evaluate(res.model, va)["miou"])
    assert res.history[-1]["train_loss"] < 0.6 * res.history[0]["train_loss"]
    assert after > max(before, trivial) + 0.15, (before, trivial, curve)


def test_train_segmentation_defaults_build_the_recipe_model():
    from fec_core.seg import SEG_RECIPE
    from fec_core.train import TrainConfig

    res = train_segmentation(progress=False, setting="seg", train_samples=16, val_samples=8, epochs=1,
                             batch_size=8, img_size=32)
    seg = res.model
    assert isinstance(seg, FECSegmenter) and seg.num_classes == len(SEG_CLASSES)
    assert backbone_fec(seg.backbone).stages[0].blocks[0].token_mixer.proposal == (10, 10)
    assert res.config.model == SEG_RECIPE["model"] and res.config.shapes_target == "mask"
    assert 0 <= res.history[0]["val_miou"] <= 1
    with pytest.raises(ValueError, match="either"):
        train_segmentation(TrainConfig(**SEG_RECIPE), epochs=1)


def test_train_segmentation_rejects_label_targets():
    from fec_core.data import shapes_datasets

    tr, va = shapes_datasets(8, 4, 32, target="label")
    with pytest.raises(ValueError, match="per-pixel"):
        train_segmentation(model=FECSegmenter(tiny_fec(dense=True), 4), train_set=tr, val_set=va, progress=False)


# ----------------------------------------------------------------------------- torchvision detection
def test_torchvision_faster_rcnn_on_fec_features():
    from torchvision.models.detection import FasterRCNN

    torch.manual_seed(0)
    body = timm.create_model("fec_tiny", features_only=True, setting="det")
    backbone = FECBackboneWithFPN(body, out_channels=32)
    assert backbone.out_channels == 32 and backbone.strides == [4, 8, 16, 32, 64]
    feats = backbone(torch.randn(1, 3, 128, 128))
    assert list(feats) == ["0", "1", "2", "3", "pool"]
    assert [tuple(f.shape) for f in feats.values()] == [(1, 32, 128 // s, 128 // s) for s in (4, 8, 16, 32, 64)]

    model = FasterRCNN(backbone, num_classes=3, min_size=128, max_size=128, rpn_batch_size_per_image=64,
                       box_batch_size_per_image=32)
    images = [torch.rand(3, 128, 128), torch.rand(3, 96, 128)]  # padded to multiples of 32 by the transform
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0], [70.0, 5.0, 120.0, 50.0]]),
                "labels": torch.tensor([1, 2])},
               {"boxes": torch.tensor([[30.0, 30.0, 80.0, 70.0]]), "labels": torch.tensor([2])}]
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for n, p in body.named_parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert body.model.stem.proj.weight.grad.abs().sum() > 0  # the loss reaches the FEC backbone

    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    for det, img in zip(out, images):
        assert set(det) == {"boxes", "labels", "scores"}
        n = len(det["scores"])
        assert det["boxes"].shape == (n, 4) and det["labels"].shape == (n,)
        if n:
            assert (det["boxes"][:, 2] <= img.shape[-1]).all() and (det["boxes"][:, 3] <= img.shape[-2]).all()
