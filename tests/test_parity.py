"""Parity with the official implementation: the golden tensors of tests/data (see its README)."""
import hashlib
import json

import pytest
import torch

from conftest import DATA, GOLDEN, golden_model, load_golden
from fec_core import load_checkpoint


def test_golden_files_are_intact():
    manifest = json.loads((DATA / "manifest.json").read_text())
    for name in GOLDEN:
        digest = hashlib.sha256((DATA / f"{name}.pt").read_bytes()).hexdigest()
        assert digest == manifest[name]["sha256"], name


@pytest.mark.parametrize("literal", [False, True], ids=["fast", "literal"])
@pytest.mark.parametrize("name", GOLDEN)
def test_outputs_and_assignments_match_official(name, literal):
    g = load_golden(name)
    model = golden_model(g["config"])
    load_checkpoint(model, g["state_dict"])
    model.eval().set_literal(literal)
    assert sum(p.numel() for p in model.parameters()) == json.loads(
        (DATA / "manifest.json").read_text())[name]["params"]
    with torch.no_grad():
        out, records = model.forward_with_clusters(g["input"], intermediates=model.dense)
    outs = out if isinstance(out, list) else [out]
    assert len(outs) == len(g["outputs"])
    for ours, ref in zip(outs, g["outputs"]):
        assert ours.shape == ref.shape
        # float32 sums in another order: within 2e-6 + 1e-5 |ref|, and never more than 1e-5
        bound = (2e-6 + 1e-5 * ref.abs()).clamp(max=1e-5)
        assert ((ours - ref).abs() <= bound).all(), f"{name}: max difference {(ours - ref).abs().max():.3g}"
    assert [r.official_name for r in records] == list(g["assignments"])
    for r in records:
        assert r.kind == g["assignment_kinds"][r.official_name]
        ref = g["assignments"][r.official_name]
        assert r.index.shape == ref.shape, r.name
        assert torch.equal(r.index, ref), f"{r.name}: {(r.index != ref).sum().item()} assignments differ"


def test_official_key_layout_of_released_variants_loads():
    """Every official key of fec_small/base/large maps onto our modules with the right shape."""
    import timm

    from fec_core.checkpoint import check_state_dict

    manifest = json.loads((DATA / "manifest.json").read_text())
    for variant in ("fec_small", "fec_base", "fec_large"):
        keys = manifest[variant]["state_dict"]
        fake = {k: torch.zeros(shape) for k, shape in keys}
        model = timm.create_model(variant)
        assert sum(p.numel() for p in model.parameters()) == manifest[variant]["params"]
        from fec_core.model import checkpoint_filter_fn

        mapped = check_state_dict(model, checkpoint_filter_fn(fake))
        assert set(mapped) == set(model.state_dict())
