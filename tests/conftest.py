import os
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"
GOLDEN = ("tiny_cls", "tiny_fold_dense", "tiny_rect_dense")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest (and reproducibly) on one thread, above all on a busy machine.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model(**kw):
    """A tiny FEC (layers 1-1-1-1, widths 16-40, seed 0) with the layer scale lifted from
    1e-5 to 0.5, so that the clustering shows in the output. Keyword arguments override."""
    from fec_core import FEC

    args = dict(layers=(1, 1, 1, 1), embed_dims=(16, 24, 32, 40), mlp_ratios=(2, 2, 2, 2), heads=(2, 2, 2, 2),
                head_dim=(8, 8, 8, 8), num_classes=7)
    args.update(kw)
    torch.manual_seed(0)
    m = FEC(**args)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "layer_scale" in name:
                p.fill_(0.5)
    return m
