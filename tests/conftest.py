"""What the tests share: the golden tensors, the one tiny FEC (:func:`tiny_fec`), the
literal-versus-fast check, the training tests' small runs, one thread for tiny models, and the
``slow`` selection.

One test file per module of ``fec_core``: test_clustering.py (the equations), test_layers.py,
test_model.py (with records), test_checkpoint.py, test_data.py, test_train.py (the train
package), test_interpret.py (with regions and foreground), test_visualize.py, test_seg.py,
test_kernels.py, test_bench.py, test_costs.py, test_config.py, test_numerics.py; and across
modules test_imports.py (the package's structure), test_parity.py (the golden tensors of the
official code), test_ecosystem.py (timm's contract, TorchScript, FX, compile, export, ONNX),
test_reliability.py (kills, full disks, bad input) and test_gpu.py (the CUDA path).
Tests marked ``slow`` (more than about 10 s on one thread) are left out of ``pytest tests``
unless ``--run-slow`` (or an explicit ``-m``) is given; ``python3 dev.py test`` runs them.
"""
from pathlib import Path

import numpy as np
import pytest
import torch

DATA = Path(__file__).parent / "data"
GOLDEN = ("tiny_cls", "tiny_fold_dense", "tiny_rect_dense")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest (and reproducibly) on one thread, above all on a busy machine.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- golden tensors
def load_golden(name):
    return torch.load(DATA / f"{name}.pt", map_location="cpu", weights_only=False)


def golden_model(cfg, **kw):
    """Build our FEC from an official-code config dict (as stored in the golden files)."""
    from fec_core import FEC

    return FEC(layers=cfg["layers"], embed_dims=cfg["embed_dims"], mlp_ratios=cfg["mlp_ratios"],
               heads=cfg["heads"], head_dim=cfg["head_dim"],
               proposal=list(zip(cfg["proposal_w"], cfg["proposal_h"])),
               fold=list(zip(cfg["fold_w"], cfg["fold_h"])),
               num_classes=cfg.get("num_classes", 0), dense=cfg.get("fork_feat", False), **kw)


def official_state_dict(model, prefix=""):
    """``model``'s weights under the official code's key names (``network.*``, ``norm{2i}``), prefixed."""
    from fec_core.records import official_name

    out = {}
    for k, v in model.state_dict().items():
        mod, _, leaf = k.rpartition(".")
        out[f"{prefix}{official_name(mod)}.{leaf}"] = v.clone()
    return out


# ----------------------------------------------------------------------------- the tiny FEC
#: The tests' FEC: four stages of one block (16 to 40 channels, two heads), 4 classes (the
#: ``shapes`` dataset's), a few thousand parameters.
TINY = dict(layers=(1, 1, 1, 1), embed_dims=(16, 24, 32, 40), mlp_ratios=(2, 2, 2, 2), heads=(2, 2, 2, 2),
            head_dim=(8, 8, 8, 8), num_classes=4)


def tiny_fec(layer_scale=0.5, **kw):
    """The one FEC the tests build (:data:`TINY`, seed 0); keyword arguments override its
    settings. ``layer_scale``: the value of every layer scale, lifted from FEC's 1e-5 to 0.5
    so that the clustering shows in the output; ``None`` keeps FEC's initial value.
    (``timm.create_model('fec_tiny')`` is the registered variant, used where timm's path is
    what a test checks.)"""
    from fec_core import FEC

    args = dict(TINY, **kw)
    if layer_scale is not None:
        args.setdefault("layer_scale_init_value", layer_scale)
    torch.manual_seed(0)
    return FEC(**args)


#: Uneven folds and center grids for :func:`tiny_fec`: everything that could confuse a layout.
UNEVEN = dict(proposal=((2, 3), (2, 2), (1, 2), (1, 1)), fold=((2, 1), (1, 2), (2, 2), (1, 1)))


def _run_path(module, x, literal):
    """Output and gradients (input and every parameter) of ``module`` on one path."""
    for m in module.modules():
        if hasattr(m, "literal"):
            m.literal = literal
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = module(x)
    outs = out if isinstance(out, (list, tuple)) else [out]
    torch.manual_seed(1)
    loss = sum((o * torch.randn_like(o)).sum() for o in outs)
    loss.backward()
    g = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return [o.detach() for o in outs], x.grad.clone(), g


def assert_paths_agree(module, x, atol=1e-5):
    """The literal and the fast path of a layer or model give the same outputs and the same
    gradients (input and parameters, the same set of them); returns the fast path's."""
    out_f, gx_f, g_f = _run_path(module, x, literal=False)
    out_l, gx_l, g_l = _run_path(module, x, literal=True)
    for a, b in zip(out_f, out_l):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)
    torch.testing.assert_close(gx_f, gx_l, atol=atol, rtol=1e-4)
    assert g_f.keys() == g_l.keys()
    for k in g_f:
        torch.testing.assert_close(g_f[k], g_l[k], atol=atol, rtol=1e-4, msg=f"gradient of {k}")
    return g_f


# ----------------------------------------------------------------------------- small training runs
def tiny_cfg(tmp=None, **kw):
    """A TrainConfig for a few seconds of training on ``shapes`` (32x32, 48 + 16 images)."""
    from fec_core.train import TrainConfig

    base = dict(dataset="shapes", img_size=32, train_samples=48, val_samples=16, epochs=2, batch_size=16,
                output_dir=str(tmp) if tmp else None)
    return TrainConfig(**{**base, **kw})


def shapes_sets(n_train=48, n_val=16):
    from fec_core.train import build_datasets

    return build_datasets(tiny_cfg(train_samples=n_train, val_samples=n_val))


def states_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def write_png(path, seed=0, size=40):
    """A random RGB image file (for image-folder datasets and the CLIs)."""
    from PIL import Image

    img = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(path)


# ----------------------------------------------------------------------------- slow tests
def pytest_collection_modifyitems(config, items):
    """Leave the tests of tests/ marked ``slow`` out unless --run-slow (an option of the top
    conftest.py) or an explicit -m asks for them; ``pytest book/`` still runs every chapter."""
    if config.getoption("--run-slow") or config.option.markexpr:
        return
    here = Path(__file__).parent
    slow = [it for it in items if it.get_closest_marker("slow") and here in Path(str(it.path)).parents]
    if slow:
        config.hook.pytest_deselected(items=slow)
        left_out = set(map(id, slow))
        items[:] = [it for it in items if id(it) not in left_out]


def pytest_report_header(config):
    if not (config.getoption("--run-slow") or config.option.markexpr):
        return "tests marked slow are left out (--run-slow runs them; python3 dev.py test does)"
