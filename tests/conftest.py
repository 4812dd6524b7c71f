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
