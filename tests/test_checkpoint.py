"""Loading checkpoints: official layouts, prefixes, clear errors."""
import warnings

import pytest
import torch

from conftest import golden_model, load_golden, official_state_dict
from fec_core import CheckpointError, load_checkpoint


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
    import timm

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
    import timm

    model = timm.create_model("fec_tiny", num_classes=5)
    official = {k: v + 0.5 for k, v in official_state_dict(model).items()}
    path = tmp_path / "fec_tiny_official.pth"
    torch.save({"model": official}, path)
    loaded = timm.create_model("fec_tiny", num_classes=5, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    loaded_sd = loaded.state_dict()
    assert loaded_sd.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(loaded_sd[k], v + 0.5) != k.startswith("head."), k
