"""Tests of the training loop (fec_core.train, chapter 10): recipe, exact resume, DDP, bad input."""
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

from conftest import golden_model, load_golden, shapes_sets, states_equal, tiny_cfg, tiny_fec, write_png
from fec_core import CheckpointError
from fec_core.train import (OFFICIAL_IMAGENET_RECIPE, PRESETS, Accuracy, MeanIoU, TrainConfig, build_datasets,
                            evaluate, fit, iou_per_class, main, plot_history, read_history)

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- recipe
def test_default_config_is_the_official_imagenet_recipe():
    """The official train.py defaults with cmds/train.sh's options (github guikunchen/FEC),
    without the 10 cool-down epochs, EMA off as in the script."""
    cfg = TrainConfig(data_dir="/data/imagenet")
    assert all(getattr(cfg, k) == v for k, v in OFFICIAL_IMAGENET_RECIPE.items())
    assert (cfg.cooldown_epochs, cfg.ema, cfg.min_lr, cfg.workers) == (0, False, 1e-6, 8)
    assert (cfg.dataset, cfg.model, cfg.img_size, cfg.epochs, cfg.warmup_epochs) == ("imagefolder", "fec_small", 224, 300, 5)
    assert (cfg.lr_base, cfg.weight_decay, cfg.warmup_lr, cfg.opt, cfg.sched) == (1e-3, 0.05, 1e-6, "adamw", "cosine")
    assert (cfg.smoothing, cfg.mixup, cfg.cutmix, cfg.drop_path, cfg.re_prob) == (0.1, 0.8, 1.0, 0.1, 0.25)
    assert cfg.auto_augment == "rand-m9-mstd0.5-inc1"
    # explicit values win over the preset; the digits preset is a small CPU recipe
    assert TrainConfig(dataset="digits", epochs=3).epochs == 3
    assert TrainConfig(dataset="digits").model == PRESETS["digits"]["model"] == "fec_tiny"
    with pytest.raises(ValueError, match="unknown dataset"):
        TrainConfig(dataset="mnist")


def test_no_weight_decay_on_norms_biases_layer_scales_and_gate():
    """timm's optimizer factory excludes 1-D tensors from weight decay: check that FEC's layer
    scales and gate parameters are 1-D, so they land in the no-decay group."""
    from timm.optim import create_optimizer_v2

    from fec_core.train import freeze_similarity

    model = tiny_fec()
    freeze_similarity(model)
    opt = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05, filter_bias_and_bn=True)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in opt.param_groups}
    decay, no_decay = groups[0.05], groups[0.0]
    special = {n for n in names.values() if any(k in n for k in ("layer_scale_", "sim_alpha", "sim_beta"))}
    assert len(special) == 4 * 4 and special <= no_decay  # 4 blocks x (2 layer scales + alpha + beta)
    assert all(model.get_parameter(n).ndim <= 1 for n in no_decay)  # norms, biases, scales, gate
    assert all(model.get_parameter(n).ndim > 1 for n in decay)
    assert any(n.endswith("norm1.weight") for n in no_decay) and any(n.endswith(".bias") for n in no_decay)
    assert any(n.endswith("token_mixer.f.weight") for n in decay) and any(n.endswith("fc1.weight") for n in decay)
    # conv_f is frozen: in no group at all
    assert not any("conv_f" in n for n in decay | no_decay)
    assert isinstance(opt, torch.optim.AdamW)


def test_freezing_conv_f_changes_nothing():
    """conv_f only feeds an argmax (it gets no gradient: test_clustering.py, test_ecosystem.py),
    so AdamW skips it (no weight decay either) and freezing it gives bit-identical training."""
    train, val = shapes_sets(32, 16)
    init = {k: v.clone() for k, v in tiny_fec().state_dict().items()}
    res = [fit(tiny_cfg(epochs=1, freeze_similarity=freeze), model=tiny_fec(), train_set=train, val_set=val,
               progress=False) for freeze in (True, False)]
    assert states_equal(res[0].model.state_dict(), res[1].model.state_dict())
    final = res[1].model.state_dict()
    assert all(torch.equal(final[k], init[k]) for k in final if ".conv_f." in k)
    assert not torch.equal(final["stem.proj.weight"], init["stem.proj.weight"])


# ----------------------------------------------------------------------------- checkpoints and resume
class CrashingDataset(torch.utils.data.Dataset):
    """Fails after ``crash_at`` items: a run that dies in the middle of an epoch."""

    def __init__(self, base, crash_at):
        self.base, self.crash_at, self.calls = base, crash_at, 0
        self.classes = base.classes

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.calls += 1
        if self.calls > self.crash_at:
            raise RuntimeError("simulated crash")
        return self.base[i]


def test_resume_continues_exactly(tmp_path):
    """Mixup, CutMix, label smoothing, drop path and EMA on: a run killed in epoch 2 and resumed
    gives the same losses and weights as an uninterrupted run; the failed run left epoch 1's
    checkpoints intact."""
    train, val = shapes_sets(48, 16)
    kw = dict(epochs=2, mixup=0.8, cutmix=1.0, smoothing=0.1, drop_path=0.1, ema=True, ema_decay=0.9)

    full = fit(tiny_cfg(tmp_path / "full", **kw), model=tiny_fec(drop_path_rate=0.1), train_set=train, val_set=val,
               progress=False)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tiny_cfg(run, **kw), model=tiny_fec(drop_path_rate=0.1), train_set=CrashingDataset(train, 48 + 20),
            val_set=val, progress=False)
    saved = torch.load(run / "latest.pt", weights_only=True)
    assert saved["epoch"] == 1 and len(read_history(run)) == 1
    resumed = fit(tiny_cfg(run, resume=str(run), **kw), model=tiny_fec(drop_path_rate=0.1), train_set=train,
                  val_set=val, progress=False)
    a, b = full.history, resumed.history
    assert [h["epoch"] for h in b] == [1, 2]
    for key in ("train_loss", "val_loss", "val_acc", "ema_val_loss", "lr"):
        assert a[1][key] == b[1][key], key
    assert states_equal(full.model.state_dict(), resumed.model.state_dict())
    assert states_equal(full.ema_model.state_dict(), resumed.ema_model.state_dict())
    assert [json.loads(l)["epoch"] for l in open(run / "metrics.jsonl")] == [1, 2]
    ck = torch.load(run / "latest.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "state_dict_ema", "epoch", "config"} <= set(ck)
    assert ck["epoch"] == 2 and ck["config"]["mixup"] == 0.8


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    train, val = shapes_sets(32, 16)
    fit(tiny_cfg(tmp_path, epochs=1), model=tiny_fec(), train_set=train, val_set=val, progress=False)
    before = (tmp_path / "latest.pt").read_bytes()
    other = tiny_fec(embed_dims=(8, 16, 24, 40))
    with pytest.raises(CheckpointError, match="does not fit this model"):
        fit(tiny_cfg(tmp_path, epochs=2, resume=str(tmp_path)), model=other, train_set=train, val_set=val,
            progress=False)
    with pytest.raises(CheckpointError, match="not a fec_core training checkpoint"):
        torch.save(other.state_dict(), tmp_path / "weights.pt")
        fit(tiny_cfg(None, resume=str(tmp_path / "weights.pt")), model=tiny_fec(), train_set=train, val_set=val,
            progress=False)
    # a new run into a folder that holds a run is refused; nothing was overwritten
    with pytest.raises(FileExistsError, match="already holds a training run"):
        fit(tiny_cfg(tmp_path, epochs=1), model=tiny_fec(), train_set=train, val_set=val, progress=False)
    assert (tmp_path / "latest.pt").read_bytes() == before


def test_pretrained_official_checkpoint_gets_a_new_head(tmp_path):
    golden = load_golden("tiny_cls")  # official key names, 5 classes
    path = tmp_path / "official.pth"
    torch.save({"state_dict": golden["state_dict"]}, path)
    train, val = build_datasets(tiny_cfg(img_size=64, train_samples=32, val_samples=16))
    model = golden_model({**golden["config"], "num_classes": 4})
    res = fit(tiny_cfg(None, img_size=64, epochs=1, pretrained=str(path)), model=model, train_set=train,
              val_set=val, progress=False)
    sd = res.model.state_dict()
    assert sd["head.weight"].shape[0] == 4
    conv_f = [k for k in golden["state_dict"] if "conv_f" in k]
    assert conv_f  # frozen and never trained: still the official weights
    from fec_core import read_state_dict
    official = read_state_dict({"state_dict": golden["state_dict"]})
    assert all(torch.equal(sd[k], official[k]) for k in official if "conv_f" in k)


# ----------------------------------------------------------------------------- DDP
DDP_SCRIPT = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    sys.path.insert(0, {tests!r})
    from conftest import tiny_cfg, tiny_fec, shapes_sets
    from fec_core.train import fit
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # fit() also does this itself under torchrun; here it reuses it
    train, val = shapes_sets(32, 16)
    for name, kw in (("frozen", {{}}), ("unused", dict(freeze_similarity=False, find_unused_parameters=True))):
        res = fit(tiny_cfg(None, epochs=1, batch_size=8, drop_path=0.1, mixup=0.8, cutmix=1.0, **kw),
                  model=tiny_fec(drop_path_rate=0.1), train_set=train, val_set=val, progress=False)
        torch.save({{"state": res.model.state_dict(), "history": res.history}},
                   os.path.join({out!r}, "%s%s.pt" % (name, os.environ["RANK"])))
    dist.destroy_process_group()
""")


@pytest.mark.slow
@pytest.mark.process
def test_ddp_two_processes_on_cpu_end_with_identical_weights(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT.format(tests=os.path.dirname(__file__), out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"frozen{r}.pt", weights_only=True) for r in (0, 1))
    assert states_equal(r0["state"], r1["state"])
    init = tiny_fec().state_dict()
    assert not torch.equal(r0["state"]["stem.proj.weight"], init["stem.proj.weight"])  # it trained
    assert all(torch.equal(r0["state"][k], init[k]) for k in init if ".conv_f." in k)  # no decay on conv_f
    h = r0["history"][0]
    for key in ("train_loss", "val_loss", "val_acc", "lr"):  # reduced over both ranks
        assert h[key] == r1["history"][0][key]
    # the validation shards of both ranks make up the whole validation set
    model = tiny_fec()
    model.load_state_dict(r0["state"])
    ref = evaluate(model.eval(), shapes_sets(32, 16)[1])
    assert h["val_loss"] == pytest.approx(ref["loss"], rel=1e-4) and abs(h["val_acc"] - ref["acc"]) <= 1 / 16
    # the official way (conv_f trainable, DDP(find_unused_parameters=True)) trains the same weights
    u0, u1 = (torch.load(tmp_path / f"unused{r}.pt", weights_only=True) for r in (0, 1))
    assert states_equal(u0["state"], u1["state"]) and states_equal(u0["state"], r0["state"])


# ----------------------------------------------------------------------------- image folders and bad input
def test_image_folder_training_with_the_papers_transforms(tmp_path):
    """A small ImageNet-layout folder through the full recipe (RandAugment, random erasing,
    Mixup/CutMix, label smoothing): one epoch runs, the CLI writes its files and prints where."""
    for split, n in (("train", 8), ("val", 4)):
        for c, cls in enumerate(("a", "b")):
            (tmp_path / "data" / split / cls).mkdir(parents=True)
            for i in range(n):
                write_png(tmp_path / "data" / split / cls / f"{i}.png", seed=100 * c + i)
    cfg = TrainConfig(data_dir=str(tmp_path / "data"), img_size=32, epochs=1, batch_size=8, workers=0)
    train, val = build_datasets(cfg)
    x, y = train[0]
    assert x.shape == (3, 32, 32) and isinstance(y, int)
    res = fit(cfg, model=tiny_fec(num_classes=2), progress=False)
    assert len(res.history) == 1 and math.isfinite(res.history[0]["train_loss"])
    # a batch larger than the dataset: a clear message, nothing written
    with pytest.raises(ValueError, match="batch size 64 is larger than the training set: 16 samples"):
        fit(TrainConfig(data_dir=str(tmp_path / "data"), img_size=32, epochs=1, batch_size=64, workers=0,
                        output_dir=str(tmp_path / "out")), model=tiny_fec(num_classes=2), progress=False)
    assert not (tmp_path / "out").exists()
    # an unreadable image stops the run with its name; an earlier run's files stay as they were
    (tmp_path / "data" / "train" / "a" / "0.png").write_bytes(b"garbage")
    with pytest.raises(OSError, match="cannot read image .*0.png"):
        fit(TrainConfig(data_dir=str(tmp_path / "data"), img_size=32, epochs=1, batch_size=8, workers=0,
                        output_dir=str(tmp_path / "out")), model=tiny_fec(num_classes=2), progress=False)
    assert not (tmp_path / "out" / "latest.pt").exists()


def test_cli(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--dataset", "shapes", "--img-size", "32", "--train-samples", "32", "--val-samples", "16",
            "--epochs", "1", "-b", "16", "--output-dir", str(out), "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"saved in {out}" in printed
    for name in ("latest.pt", "best.pt", "metrics.jsonl", "config.json", "curves.png"):
        assert (out / name).is_file(), name
    line = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert {"epoch", "train_loss", "val_loss", "val_acc", "lr", "images_per_s"} <= set(line)
    # evaluate only: the same accuracy as the log, nothing written
    before = sorted(os.listdir(out))
    assert main(["--evaluate", "--resume", str(out / "latest.pt"), "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["acc"] == pytest.approx(line["val_acc"], abs=1e-6)
    assert sorted(os.listdir(out)) == before
    # errors are messages, not tracebacks
    assert main(args) == 2
    assert "already holds a training run" in capsys.readouterr().err
    assert main(["--dataset", "shapes", "--train-samples", "8", "--val-samples", "8", "-b", "64",
                 "--output-dir", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "larger than the training set" in capsys.readouterr().err
    assert main(["--data-dir", str(tmp_path / "missing"), "--no-progress"]) == 2
    assert "dataset folder not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------- custom task
class TinySeg(nn.Module):
    """A per-pixel classifier [B, 3, H, W] -> [B, K, H, W] (stands in for a segmentation head)."""

    def __init__(self, k=5):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, k, 1))

    def forward(self, x):
        return self.net(x)


def test_dense_targets_custom_model_loss_and_metric():
    train, val = build_datasets(tiny_cfg(shapes_target="mask", train_samples=32, val_samples=16))
    assert train[0][1].shape == (32, 32) and train.classes[0] == "background"
    cfg = tiny_cfg(epochs=1, mixup=0.8, cutmix=1.0)  # switched off by themselves for per-pixel targets
    res = fit(cfg, model=TinySeg(), train_set=train, val_set=val, loss_fn=nn.CrossEntropyLoss(ignore_index=255),
              metric=MeanIoU(5), progress=False)
    h = res.history[0]
    assert res.metric_name == "miou" and 0 <= h["val_miou"] <= 1 and 0 <= h["val_pixel_acc"] <= 1
    # defaults for per-pixel targets: CE + mIoU; a plain function works as a metric too
    res2 = fit(cfg, model=TinySeg(), train_set=train, val_set=val, progress=False)
    assert "val_miou" in res2.history[0]
    def pixel_accuracy(output, target):
        return (output.argmax(1) == target).float().mean()

    r = evaluate(res.model, val, loss_fn=nn.CrossEntropyLoss(), metric=pixel_accuracy, batch_size=5)
    assert r["pixel_accuracy"] == pytest.approx(h["val_pixel_acc"], abs=1e-6)
    assert r["loss"] == pytest.approx(h["val_loss"], rel=1e-5)


def test_one_rule_tells_per_pixel_targets_from_image_labels():
    """``is_per_pixel``: the rule of fit, evaluate and train_segmentation (integer maps only)."""
    from fec_core.train.metrics import is_per_pixel

    assert is_per_pixel(torch.zeros(4, 5, dtype=torch.long)) and is_per_pixel(torch.zeros(4, 5, dtype=torch.uint8))
    assert is_per_pixel(torch.zeros(2, 4, 5, dtype=torch.long), batched=True)
    assert not is_per_pixel(torch.zeros(2, 4, 5, dtype=torch.long))  # a batch is not one sample's map
    assert not is_per_pixel(torch.tensor(3)) and not is_per_pixel(3)  # one label per image
    assert not is_per_pixel(torch.zeros(4, 5))  # float: soft targets, not classes
    assert not is_per_pixel(torch.zeros(2, 10), batched=True)  # Mixup's soft labels [B, K]


def test_metrics_are_correct():
    acc = Accuracy((1, 2))
    out = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [3.0, 1.0, 2.0], [1.0, 2.0, 3.0]])
    acc.update(out, torch.tensor([0, 2, 2, 0]))
    assert acc.compute() == {"acc": 0.25, "acc2": 0.75}
    target = torch.tensor([[0, 0, 1, 1], [0, 2, 2, 255]])[None]  # 255: ignored
    pred = torch.tensor([[0, 1, 1, 1], [0, 2, 0, 1]])[None]
    miou = MeanIoU(4)
    miou.update(nn.functional.one_hot(pred, 4).permute(0, 3, 1, 2).float(), target)
    iou = iou_per_class(miou.state["confusion"])
    # class 0: TP 2, FP 1, FN 1; class 1: TP 2, FP 1; class 2: TP 1, FN 1; class 3 absent (NaN, left out)
    assert torch.allclose(iou[:3], torch.tensor([0.5, 2 / 3, 0.5], dtype=torch.float64)) and math.isnan(iou[3])
    r = miou.compute()
    assert r["miou"] == pytest.approx((0.5 + 2 / 3 + 0.5) / 3) and r["pixel_acc"] == pytest.approx(5 / 7)
    # evaluate's defaults: cross-entropy and accuracy, means per sample over uneven batches
    model = tiny_fec().eval()
    _, val = shapes_sets(16, 16)
    r = evaluate(model, val, batch_size=5)  # batches of 5, 5, 5 and 1
    correct, loss = 0, 0.0
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(val, batch_size=5):
            logits = model(x)
            correct += int((logits.argmax(1) == y).sum())
            loss += float(nn.functional.cross_entropy(logits, y)) * len(y)
    assert set(r) == {"loss", "acc"}
    assert r["acc"] == correct / 16 and r["loss"] == pytest.approx(loss / 16, rel=1e-6)


def test_plot_history(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    hist = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.2 / e, "val_acc": 0.5 + e / 10, "lr": 1e-3 / e,
             "images_per_s": 10.0} for e in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in hist))
    assert read_history(tmp_path) == hist
    fig = plot_history(tmp_path)
    assert len(fig.axes) == 3
    assert list(fig.axes[1].lines[0].get_ydata()) == [0.6, 0.7, 0.8]
    with pytest.raises(FileNotFoundError):
        read_history(tmp_path / "missing")


def test_bf16_autocast_runs_on_cpu():
    res = fit(tiny_cfg(epochs=1, amp="bf16"), model=tiny_fec(), train_set=shapes_sets(32, 16)[0],
              val_set=shapes_sets(32, 16)[1], progress=False)
    assert math.isfinite(res.history[0]["train_loss"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_on_gpu(amp):
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    train, val = shapes_sets(64, 32)
    res = fit(tiny_cfg(epochs=2, amp=amp, device="cuda"), model=tiny_fec(), train_set=train, val_set=val,
              progress=False)
    assert all(math.isfinite(h["train_loss"]) for h in res.history)
    assert res.history[1]["train_loss"] < res.history[0]["train_loss"] * 1.5
