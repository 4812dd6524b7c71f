"""Loading checkpoints (fec_core.checkpoint): official layouts and prefixes, timm's loader,
full MMSegmentation / MMDetection files into backbones, clear errors."""
import warnings

import pytest
import timm
import torch

import fec_core
from conftest import golden_model, load_golden, official_state_dict
from fec_core import FEC, CheckpointError, load_checkpoint
from fec_core.checkpoint import split_backbone


@pytest.fixture
def golden():
    return load_golden("tiny_cls")


@pytest.mark.parametrize("wrap", ["bare", "state_dict", "state_dict_ema", "model", "module_prefix"])
def test_official_file_layouts_load(tmp_path, golden, wrap):
    sd = golden["state_dict"]
    obj = {"module." + k: v for k, v in sd.items()} if wrap == "module_prefix" else sd
    if wrap not in ("bare", "module_prefix"):
        obj = {wrap: obj, "epoch": 3}
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    model = load_checkpoint(golden_model(golden["config"]), path).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(golden["input"]), golden["outputs"][0], rtol=0, atol=1e-5)


def test_ema_weights_preferred_when_asked(golden):
    sd = golden["state_dict"]
    ema = {k: v + 1 for k, v in sd.items()}
    model = load_checkpoint(golden_model(golden["config"]), {"state_dict": sd, "state_dict_ema": ema}, use_ema=True)
    assert torch.equal(model.stem.proj.weight, ema["patch_embed.proj.weight"])


def test_missing_file_and_corrupt_file(tmp_path, golden):
    model = golden_model(golden["config"])
    with pytest.raises(FileNotFoundError, match="not found"):
        load_checkpoint(model, tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(model, bad)
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_checkpoint(model, tmp_path / "tensor.pth")


def test_mismatches_are_named(golden):
    sd = dict(golden["state_dict"])
    model = golden_model(golden["config"])
    missing = {k: v for k, v in sd.items() if k != "network.0.0.token_mixer.sim_alpha"}
    with pytest.raises(CheckpointError, match=r"missing keys: stages\.0\.blocks\.0\.token_mixer\.sim_alpha"):
        load_checkpoint(model, missing)
    with pytest.raises(CheckpointError, match=r"unexpected keys: extra\.weight"):
        load_checkpoint(model, {**sd, "extra.weight": torch.zeros(1)})
    wrong = {**sd, "network.1.conv_v.weight": torch.zeros(3, 3, 1, 1)}
    with pytest.raises(CheckpointError, match=r"stages\.1\.downsample\.conv_v\.weight: checkpoint \(3, 3, 1, 1\)"):
        load_checkpoint(model, wrong)
    with pytest.raises(CheckpointError, match="another FEC variant"):
        load_checkpoint(timm.create_model("fec_tiny", num_classes=5), sd)


def test_head_dropped_on_purpose_for_new_classes(golden):
    cfg = dict(golden["config"], num_classes=7)
    model = golden_model(cfg)
    fresh_head = model.head.weight.clone()
    with pytest.warns(UserWarning, match="classifier head not loaded"):
        load_checkpoint(model, golden["state_dict"])
    assert torch.equal(model.head.weight, fresh_head)
    assert torch.equal(model.stem.proj.weight, golden["state_dict"]["patch_embed.proj.weight"])


def test_classification_checkpoint_into_dense_model(golden):
    cfg = dict(golden["config"], fork_feat=True)
    model = golden_model(cfg)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        load_checkpoint(model, golden["state_dict"])
    assert any("output norms" in str(x.message) for x in w)
    assert len(model.forward_intermediates(golden["input"], intermediates_only=True)) == 4


def test_timm_pretrained_file_uses_filter_fn(tmp_path):
    """timm's own loader (pretrained_cfg_overlay=dict(file=...)) maps every official key onto
    its module: each loaded tensor is the one saved under the official name (but the head's:
    timm leaves the classifier fresh when num_classes differs from the config's 1000)."""
    model = timm.create_model("fec_tiny", num_classes=5)
    official = {k: v + 0.5 for k, v in official_state_dict(model).items()}
    path = tmp_path / "fec_tiny_official.pth"
    torch.save({"model": official}, path)
    loaded = timm.create_model("fec_tiny", num_classes=5, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    loaded_sd = loaded.state_dict()
    assert loaded_sd.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(loaded_sd[k], v + 0.5) != k.startswith("head."), k


# ----------------------------------------------------------------------------- downstream checkpoints and backbones
def downstream(backbone: FEC, layout: str) -> dict:
    """A synthetic full MMSegmentation / MMDetection checkpoint around ``backbone``."""
    sd = official_state_dict(backbone, "backbone.")
    heads = dict(seg=["decode_head.conv_seg.weight", "auxiliary_head.conv_seg.weight", "neck.lateral_convs.0.w"],
                 det=["neck.fpn_convs.0.conv.weight", "rpn_head.rpn_cls.weight", "roi_head.bbox_head.fc_cls.weight"])
    for k in heads[layout]:
        sd[k] = torch.randn(4, 4)
    return {"meta": {"mmseg_version": "1.2.2"}, "state_dict": sd, "optimizer": {"state": {}}}


@pytest.mark.parametrize("layout,skipped", [("seg", ["auxiliary_head", "decode_head", "neck"]),
                                            ("det", ["neck", "roi_head", "rpn_head"])])
def test_full_downstream_checkpoint_gives_its_backbone(tmp_path, layout, skipped):
    torch.manual_seed(1)
    source = timm.create_model("fec_tiny", setting=layout, dense=True)
    path = tmp_path / f"{layout}.pth"
    torch.save(downstream(source, layout), path)
    backbone = timm.create_model("fec_tiny", setting=layout, features_only=True).eval()
    with pytest.warns(UserWarning, match=f"skipping {', '.join(skipped)}"):
        loaded, report = load_checkpoint(backbone, path, report=True)
    assert loaded is backbone and report == skipped
    for k, v in source.state_dict().items():
        assert torch.equal(backbone.model.state_dict()[k], v), k
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in
                   zip(backbone(x), source.eval().forward_intermediates(x, intermediates_only=True)))
    # a backbone part that does not fit still fails, naming the key
    bad = downstream(source, layout)
    bad["state_dict"]["backbone.network.1.conv_v.weight"] = torch.zeros(3, 3, 1, 1)
    with pytest.raises(CheckpointError, match=r"stages\.1\.downsample\.conv_v\.weight: checkpoint \(3, 3, 1, 1\)"):
        load_checkpoint(backbone, bad)


def test_split_backbone_keeps_plain_checkpoints_whole():
    sd = {"patch_embed.proj.weight": torch.zeros(1), "network.0.0.norm1.weight": torch.zeros(1)}
    assert split_backbone(sd) == (sd, [])
    full = {"module.backbone.a": torch.zeros(1), "module.decode_head.b": torch.zeros(1)}
    assert split_backbone(full) == ({"module.backbone.a": full["module.backbone.a"]}, ["decode_head"])


def test_classification_checkpoint_into_features_only_backbone(tmp_path):
    torch.manual_seed(2)
    classifier = timm.create_model("fec_tiny")
    torch.save({"model": official_state_dict(classifier)}, tmp_path / "cls.pth")
    backbone = timm.create_model("fec_tiny", features_only=True, setting="seg")  # the README's backbone
    with pytest.warns(UserWarning, match="output norms"):
        load_checkpoint(backbone, tmp_path / "cls.pth")
    assert torch.equal(backbone.model.stem.proj.weight, classifier.stem.proj.weight)
    # the wrapper's own file (keys 'model.*') loads back into a fresh wrapper
    torch.save(backbone.state_dict(), tmp_path / "wrapper.pth")
    again = load_checkpoint(timm.create_model("fec_tiny", features_only=True, setting="seg"), tmp_path / "wrapper.pth")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), backbone.state_dict().values()))
    # a pruned backbone (out_indices up to stage 1) takes what it keeps
    pruned = timm.create_model("fec_tiny", features_only=True, out_indices=(0, 1))
    with pytest.warns(UserWarning, match="stages 2 and later not loaded"):
        load_checkpoint(pruned, tmp_path / "cls.pth")
    assert len(pruned(torch.randn(1, 3, 64, 64))) == 2


def test_dense_checkpoint_into_a_classifier_says_how():
    dense = official_state_dict(timm.create_model("fec_tiny", dense=True))
    with pytest.raises(CheckpointError, match="features_only=True"):
        load_checkpoint(timm.create_model("fec_tiny", num_classes=0), dense)
    with pytest.raises(TypeError, match="features_only wrapper"):
        load_checkpoint(torch.nn.Linear(2, 2), dense)
    assert fec_core.load_checkpoint is load_checkpoint
