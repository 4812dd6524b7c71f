"""Loading checkpoints (fec_core.checkpoint): official layouts and prefixes, timm's loader,
full MMSegmentation / MMDetection files into backbones, clear errors; files from strangers
(no code runs unless trusted), timm's ``args`` namespaces, safetensors."""
import argparse
import os
import shlex
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import fec_core
from conftest import golden_model, load_golden, official_state_dict, shapes_sets, tiny_cfg, tiny_fec, write_png
from fec_core import FEC, CheckpointError, load_checkpoint, read_state_dict
from fec_core.checkpoint import read_file, split_backbone, trusted

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


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
        load_checkpoint(tiny_fec(num_classes=5), sd)


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
    # the meta dict of mmcv 1.x's save_checkpoint as the official seg/det code writes it
    meta = dict(mmseg_version="0.24.0+3ba3b3c", mmcv_version="1.6.0", time="Tue Mar 12 09:41:07 2024",
                config="model = dict(type='EncoderDecoder', backbone=dict(type='fec_small_seg'))\n",
                CLASSES=("wall", "building", "sky"), PALETTE=[[120, 120, 120], [180, 120, 120], [6, 230, 230]],
                env_info="sys.platform: linux\nPython: 3.9.18\nCUDA available: True", seed=1234567,
                exp_name="fpn_fec_small_ade20k_80k.py", epoch=1, iter=80000,
                hook_msgs=dict(last_ckpt="work_dirs/fpn_fec_small/iter_80000.pth",
                               best_ckpt="work_dirs/fpn_fec_small/best_mIoU_iter_80000.pth",
                               best_score=np.float64(0.4213)))  # EvalHook(save_best=...)
    optimizer = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(4)}},
                 "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "weight_decay": 1e-4, "params": [0]}]}
    return {"meta": meta, "state_dict": sd, "optimizer": optimizer}


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
    dense = official_state_dict(tiny_fec(dense=True))
    with pytest.raises(CheckpointError, match="features_only=True"):
        load_checkpoint(tiny_fec(num_classes=0), dense)
    with pytest.raises(TypeError, match="features_only wrapper"):
        load_checkpoint(torch.nn.Linear(2, 2), dense)
    assert fec_core.load_checkpoint is load_checkpoint


# ----------------------------------------------------------------------------- files from strangers
class Evil:
    """What a hostile checkpoint carries: unpickling it runs a shell command (here: touch a
    marker file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def hostile(tmp_path, state_dict, **more):
    """A checkpoint holding real weights and a payload; returns (file, marker)."""
    marker = tmp_path / "marker"
    path = tmp_path / "downloaded.pth"
    torch.save({"state_dict": state_dict, "x": Evil(marker), **more}, path)
    return path, marker


def test_a_hostile_pickle_is_refused_and_runs_nothing(tmp_path, golden):
    """The file of the issue (torch.save of weights and an object whose __reduce__ is
    os.system): refused with one line naming the global and the opt-in; the command does not
    run. With trust=True (or inside trusted()) it is loaded, and the command runs: the marker
    test can fail."""
    path, marker = hostile(tmp_path, golden["state_dict"])
    model = golden_model(golden["config"])
    for load in (lambda: load_checkpoint(model, path), lambda: read_state_dict(path), lambda: read_file(path)):
        with pytest.raises(CheckpointError) as e:
            load()
        msg = str(e.value)
        assert "\n" not in msg and f"refusing to unpickle {path}: it needs posix.system" in msg.replace("nt.", "posix.")
        assert "trust=True" in msg and "--trust-checkpoint" in msg
        assert not marker.exists()
    with pytest.warns(UserWarning, match="posix.system: unpickled in full because it is trusted|nt.system"):
        load_checkpoint(model, path, trust=True)
    assert marker.exists()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(golden["input"]), golden["outputs"][0], rtol=0, atol=1e-5)
    marker.unlink()
    with trusted(), pytest.warns(UserWarning, match="trusted"):
        read_state_dict(path)
    assert marker.exists()
    marker.unlink()
    with trusted(False), pytest.raises(CheckpointError, match="refusing"):
        read_state_dict(path)
    assert not marker.exists()


def _cli(module, *args):
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=300, cwd=ROOT)
    return proc.returncode, proc.stdout, proc.stderr


def _hostile_cli_runs(tmp_path):
    torch.manual_seed(0)
    path, marker = hostile(tmp_path, official_state_dict(timm.create_model("fec_tiny", num_classes=4)),
                           optimizer={}, config={"dataset": "digits"})
    image = tmp_path / "photo.png"
    write_png(image, size=64)
    return path, marker, [("fec_core.visualize", image, "--model", "fec_tiny", "--checkpoint", path, "-o", tmp_path / "o.png"),
            ("fec_core.train", "--resume", path, "--no-progress"),
            ("fec_core.train", "--dataset", "digits", "--pretrained", path, "--epochs", "1", "--output-dir",
             tmp_path / "run", "--no-progress")]


@pytest.mark.skipif(torch.__version__ < "2.6", reason="aliased safe globals need torch 2.6")
def test_numpy_scalars_saved_under_numpy_1_names(tmp_path):
    """A file written with numpy 1 names the scalar's rebuilder numpy.core.multiarray.scalar
    (numpy 2: numpy._core): both read with weights_only=True, to the same values."""
    path = tmp_path / "meta.pth"
    torch.save({"meta": {"hook_msgs": {"best_score": np.float64(0.4213)}}}, path)
    with zipfile.ZipFile(path) as src:
        entries = [(i.filename, src.read(i.filename)) for i in src.infolist()]
    old = tmp_path / "meta_numpy1.pth"
    with zipfile.ZipFile(old, "w", zipfile.ZIP_STORED) as dst:
        for name, data in entries:
            if name.endswith("data.pkl"):
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            dst.writestr(name, data)
    assert "numpy.core.multiarray.scalar" in torch.serialization.get_unsafe_globals_in_checkpoint(old)
    for p in (path, old):
        score = read_file(p)["meta"]["hook_msgs"]["best_score"]
        assert score == 0.4213 and isinstance(score, np.float64)


def test_a_hostile_pickle_given_to_the_command_line_mains(tmp_path, capsys):
    """In this process (fast): the CLIs' main() refuse it in one line, nothing runs."""
    from fec_core.train import main as train
    from fec_core.visualize import main as visualize

    path, marker, runs = _hostile_cli_runs(tmp_path)
    for module, *args in runs:
        main = visualize if module == "fec_core.visualize" else train
        assert main([str(a) for a in args]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: refusing to unpickle {path}") and err.count("\n") == 1, err
        assert not marker.exists()


@pytest.mark.slow
@pytest.mark.process
def test_a_hostile_pickle_through_the_command_lines(tmp_path):
    """The same file given to python -m fec_core.visualize --checkpoint and to python -m
    fec_core.train --resume / --pretrained: exit 2, exactly one line on stderr, no traceback,
    no marker; with --trust-checkpoint visualize loads it (and the command runs)."""
    path, marker, runs = _hostile_cli_runs(tmp_path)
    for module, *args in runs:
        code, _, err = _cli(module, *args)
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith(f"error: refusing to unpickle {path}: it needs ") and "--trust-checkpoint" in err
        assert not marker.exists()
    assert not (tmp_path / "o.png").exists() and not (tmp_path / "run" / "latest.pt").exists()
    code, out, err = _cli(*runs[0], "--size", "32", "--trust-checkpoint")
    assert code == 0 and marker.exists() and (tmp_path / "o.png").exists(), err
    assert "unpickled in full because it is trusted" in err and f"loaded {path} into fec_tiny" in out


def test_an_official_training_checkpoint_with_args_loads_without_trust(tmp_path, golden):
    """What timm's CheckpointSaver (used by the official train.py, timm 0.9) writes: args as an
    argparse.Namespace next to epoch, arch, metric, optimizer, scaler and EMA state. It loads
    with weights_only=True (argparse.Namespace allowed), with nothing refused."""
    sd = golden["state_dict"]
    args = argparse.Namespace(model="fec_small", lr=None, lr_base=1e-3, opt="adamw", weight_decay=0.05,
                              sched="cosine", epochs=300, input_size=None, img_size=224, batch_size=128,
                              aa="rand-m9-mstd0.5-inc1", mixup=0.8, cutmix=1.0, smoothing=0.1, drop_path=0.1,
                              model_kwargs={}, device="cuda:0", distributed=True, world_size=8, rank=0,
                              prefetcher=True, amp=True, output="", eval_metric="top1")
    ckpt = {"epoch": 299, "arch": "fec_small", "state_dict": sd, "optimizer": {"state": {}, "param_groups": []},
            "version": 2, "args": args, "amp_scaler": {"scale": 65536.0, "growth_factor": 2.0,
                                                     "backoff_factor": 0.5, "growth_interval": 2000,
                                                     "_growth_tracker": 0},
            "state_dict_ema": {k: v.clone() for k, v in sd.items()}, "metric": 72.418}
    path = tmp_path / "model_best.pth.tar"
    torch.save(ckpt, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing unpickled in full, nothing to warn about
        loaded = read_file(path)
        model = load_checkpoint(golden_model(golden["config"]), path).eval()
    assert loaded["args"] == args and loaded["metric"] == 72.418 and loaded["arch"] == "fec_small"
    with torch.no_grad():
        torch.testing.assert_close(model(golden["input"]), golden["outputs"][0], rtol=0, atol=1e-5)


def test_safetensors_load_through_the_same_mapping(tmp_path, golden):
    """Official weights saved as safetensors (timm's and the Hub's format) load through
    load_checkpoint's key mapping; the format is recognised by its header under any name; a
    broken file is one clear error."""
    model = golden_model(golden["config"])
    path = tmp_path / "fec.safetensors"
    save_file({"module." + k: v.contiguous() for k, v in golden["state_dict"].items()}, str(path),
              metadata={"format": "pt"})
    for source in (path, tmp_path / "fec.bin"):
        if not source.exists():
            source.write_bytes(path.read_bytes())
        load_checkpoint(model, source).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(golden["input"]), golden["outputs"][0], rtol=0, atol=1e-5)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="cut.safetensors: it is corrupt or not a safetensors file"):
        load_checkpoint(model, cut)


@pytest.mark.parametrize("ema", [False, True])
def test_a_training_run_writes_best_safetensors(tmp_path, ema):
    """fit() ends by writing best.safetensors beside best.pt: best.pt's weights (the EMA's
    when the run kept one: they chose best.pt), the epoch and metric in its metadata; loaded
    with load_checkpoint it gives the logits of best.pt, bit for bit."""
    from safetensors import safe_open

    train, val = shapes_sets(32, 16)
    res = fit_tiny(tmp_path, train, val, ema=ema, ema_decay=0.5)
    best = torch.load(res.best_path, weights_only=True)
    tensors = load_file(tmp_path / "best.safetensors")
    weights = best["state_dict_ema"] if ema else best["model"]
    assert tensors.keys() == weights.keys() and all(torch.equal(tensors[k], weights[k]) for k in weights)
    with safe_open(tmp_path / "best.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["epoch"] == str(res.best_epoch) == str(best["epoch"])
    assert meta["weights"] == ("ema" if ema else "model") and meta["metric"].startswith("acc ")
    x = torch.stack([val[i][0] for i in range(4)])
    a = load_checkpoint(tiny_fec(), tmp_path / "best.safetensors").eval()
    b = load_checkpoint(tiny_fec(), res.best_path, use_ema=ema).eval()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def fit_tiny(out, train, val, **kw):
    from fec_core.train import fit

    return fit(tiny_cfg(out, epochs=2, **kw), model=tiny_fec(), train_set=train, val_set=val, progress=False)
