"""FEC in the PyTorch ecosystem (issue 13): timm's model contract for every registered
name, TorchScript, torch.fx, torch.compile, torch.export, ONNX + onnxruntime (full
downstream checkpoints: test_checkpoint.py; the API's answers to bad inputs: test_model.py).

The per-name checks are our equivalent of timm's ``tests/test_models.py``, run the way
timm runs them (TorchScript under ``set_scriptable(True)``; FX through torchvision's
feature extraction with timm's tracer settings), at 64x64 inputs so the file stays fast
on a CPU. The one documented exception to timm's contract: a pooling layer's ``conv_f``
only feeds an argmax (Eq. 5 of the pooling layer, book chapter 8), so it never receives
a gradient; the backward tests assert exactly that set and nothing more.
"""
import math
import warnings

import pytest
import torch
import timm
from timm import set_scriptable
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor

from conftest import tiny_fec
from fec_core import FEC, clustering as cl
from fec_core.numerics import assert_assignments_close

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")

NAMES = sorted(timm.list_models("fec_*"))
SIZE = 64  # every setting accepts 64x64 (det: 16x16 stage-0 map in 2x2 fold regions)
#: Parameters without a gradient, by design: the pooling layers' key convolutions (argmax only).
NO_GRAD = {f"stages.{i}.downsample.conv_f.{p}" for i in (1, 2, 3) for p in ("weight", "bias")}


def images(b=1, size=SIZE, seed=0):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_registered_names():
    assert NAMES == sorted([f"fec_{v}{s}" for v in ("small", "base", "large") for s in ("", "_seg", "_det")]
                           + ["fec_tiny"])


# ----------------------------------------------------------------------------- timm's contract
@pytest.mark.parametrize("name", NAMES)
def test_forward_and_grad_checkpointing(name):
    m = timm.create_model(name).eval()
    x = images()
    with torch.no_grad():
        out = m(x)
        assert out.shape == (1, m.num_classes or m.num_features) and torch.isfinite(out).all()
        m.set_grad_checkpointing()
        torch.testing.assert_close(m(x), out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_backward_only_conv_f_lacks_a_gradient(name):
    m = timm.create_model(name, num_classes=42).train()
    out = m(images(2))
    assert out.shape == (2, 42)
    out.mean().backward()
    no_grad = {n for n, p in m.named_parameters() if p.grad is None}
    assert no_grad == NO_GRAD
    assert all(torch.isfinite(p.grad).all() for n, p in m.named_parameters() if n not in NO_GRAD)


@pytest.mark.parametrize("name", NAMES)
def test_default_cfgs_and_heads(name):
    m = timm.create_model(name).eval()
    cfg = m.pretrained_cfg
    assert m.num_classes >= 0 and m.num_features > 0 and m.head_hidden_size > 0
    assert tuple(cfg["pool_size"]) == tuple(s // 32 for s in cfg["input_size"][1:])
    sd = m.state_dict()
    assert cfg["first_conv"] + ".weight" in sd
    if cfg["num_classes"]:
        assert cfg["classifier"] + ".weight" in sd and m.num_classes == cfg["num_classes"]
    x = images()
    with torch.no_grad():
        feats = m.forward_features(x)
        assert feats.shape == (1, m.num_features, SIZE // 32, SIZE // 32)
        pre = m.forward_head(feats, pre_logits=True)
        assert pre.shape == (1, m.head_hidden_size)
        m.reset_classifier(0)
        assert m.num_classes == 0 and m(x).shape == pre.shape
        m.reset_classifier(0, "")
        assert m(x).shape == feats.shape
        bare = timm.create_model(name, num_classes=0, global_pool="").eval()
        assert bare(x).shape == feats.shape


@pytest.mark.parametrize("name", NAMES)
def test_features_only_and_forward_intermediates(name):
    m = timm.create_model(name).eval()
    wrapped = timm.create_model(name, features_only=True).eval()
    assert wrapped.feature_info.channels() == list(m.embed_dims)
    assert wrapped.feature_info.reduction() == [4, 8, 16, 32]
    x = images()
    with torch.no_grad():
        feats = wrapped(x)
        final, inter = m.forward_intermediates(x)
        torch.testing.assert_close(final, m.forward_features(x))
        m.set_grad_checkpointing()
        torch.testing.assert_close(m.forward_intermediates(x)[0], final, rtol=1e-4, atol=1e-5)
    for f, g, c, r in zip(feats, inter, m.embed_dims, [4, 8, 16, 32]):
        assert f.shape == g.shape == (1, c, math.ceil(SIZE / r), math.ceil(SIZE / r))
        assert torch.isfinite(f).all()
    # the wrapper's maps are the per-stage normalized ones (GroupNorm: zero mean per sample)
    assert all(f.mean().abs() < 1e-4 for f in feats)


def _fx_model(model):
    """timm's FX feature extractor (its tracer settings: notrace modules and functions) of
    the model's output, the ``head`` call (timm's test finds the same node by name lists)."""
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                         param_shapes_constant=True)
    return create_feature_extractor(model, return_nodes=["head"], tracer_kwargs=tracer_kwargs)


@pytest.fixture
def no_jit_profiling():
    """As timm's test module: the legacy profiling passes only slow the first calls down."""
    old = torch._C._jit_set_profiling_mode(False)
    yield
    torch._C._jit_set_profiling_mode(old)


@pytest.mark.parametrize("name", NAMES)
def test_torchscript_fx_and_fx_torchscript(name, no_jit_profiling):
    with set_scriptable(True):
        m = timm.create_model(name).eval()
    x = images()
    with torch.no_grad():
        ref = m(x)
        scripted = torch.jit.script(m)
        torch.testing.assert_close(scripted(x), ref, rtol=1e-5, atol=1e-6)
        fx = _fx_model(m)
        assert torch.equal(next(iter(fx(x).values())), ref)  # the same operations, traced
        fx_scripted = torch.jit.script(fx)
        torch.testing.assert_close(next(iter(fx_scripted(x).values())), ref, rtol=1e-5, atol=1e-6)


def test_fx_backward_and_torchvision_feature_extraction():
    m = tiny_fec(num_classes=42).train()
    fx = _fx_model(m)
    out = next(iter(fx(images(2)).values()))
    out.mean().backward()
    assert out.shape == (2, 42)
    assert {n for n, p in fx.named_parameters() if p.grad is None} == NO_GRAD
    # torchvision's extractor with its default tracer (no timm settings), as a user calls it
    m = timm.create_model("fec_tiny", setting="det").eval()
    ext = create_feature_extractor(m, ["stages.1", "stages.3"])
    x = images(2)
    with torch.no_grad():
        out = ext(x)
        ref = m.forward_intermediates(x, intermediates_only=True)
    assert torch.equal(out["stages.1"], ref[1]) and torch.equal(out["stages.3"], ref[3])
    # a wrong input size still gets the layer's clear message from the traced graph
    with pytest.raises(ValueError, match="stages.1.downsample.*fold 2x2"):
        ext(images(1, 72))


# ----------------------------------------------------------------------------- compile, export, ONNX
@pytest.mark.parametrize("literal", [False, True])
def test_forward_traces_into_one_graph(literal):
    """torch.compile sees one graph without breaks, on both clustering paths."""
    m = tiny_fec().eval().set_literal(literal)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(m)(images(2))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_training_step_matches_eager():
    """torch.compile(fullgraph=True) with AOTAutograd (no code generation, so no compiler is
    needed) traces forward and backward of the fast path and gives eager's outputs and
    gradients (inductor on CUDA: test_gpu.py). Layer scales at 0.5, not 1e-5, so that the
    clustering shows in the output."""
    m = tiny_fec()
    x = images(2)
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    out.square().sum().backward()
    g_c = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)
    ref = m(x)
    ref.square().sum().backward()
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert g_c.keys() == {n for n, p in m.named_parameters() if p.grad is not None}
    for n, p in m.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(g_c[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)
    torch._dynamo.reset()


class LogitsAndAssignments(torch.nn.Module):
    """An FEC's logits plus the assignment maps of its first encode layer and first
    pooling layer, computed by the functions the model runs (``cluster_encode``,
    ``cluster_pool``), so that an exported graph can be checked on both."""

    def __init__(self, fec: FEC):
        super().__init__()
        self.fec = fec

    def forward(self, x):
        f = self.fec
        h = f.stem(x)
        block = f.stages[0].blocks[0]
        mix = block.token_mixer  # fold 1x1 in the cls setting
        z = block.norm1(h)
        b, _, w, hh = z.shape
        keys = mix.f(z).reshape(b * mix.heads, mix.head_dim, w, hh)
        values = mix.v(z).reshape(b * mix.heads, mix.head_dim, w, hh)
        _, enc = cl.cluster_encode(keys, values, mix.sim_alpha, mix.sim_beta, mix.proposal)
        h = f.stages[0](h)
        pool = f.stages[1].downsample
        _, pooled = cl.cluster_pool(pool.conv_f(h), pool.conv_v(h))
        return f.forward_head(f.forward_features(x)), enc, pooled


def _scores(wrapper, x):
    """float64 scores of the two layers' assignments (the reference for the argmax contract)."""
    f = wrapper.fec
    with torch.no_grad():
        h = f.stem(x)
        block = f.stages[0].blocks[0]
        mix = block.token_mixer
        z = block.norm1(h)
        b, _, w, hh = z.shape
        keys = mix.f(z).reshape(b * mix.heads, mix.head_dim, w, hh).double()
        ck = cl.centers(keys, mix.proposal)
        enc = cl.gate(cl.similarity(cl.to_points(ck), cl.to_points(keys)), mix.sim_alpha.double(),
                      mix.sim_beta.double())
        h = f.stages[0](h)
        k = f.stages[1].downsample.conv_f(h).double()
        pool = cl.similarity(cl.to_points(cl.centers(k, (k.shape[2] // 2, k.shape[3] // 2))), cl.to_points(k))
    return enc, pool


@pytest.fixture(scope="module")
def exported():
    """fec_tiny (with its assignment maps) exported once with a dynamic batch size.

    The pooling assignment's tile budget is lowered while exporting, so that even 64x64
    inputs take the tiled path (points and centers): its tiles must not depend on the
    symbolic batch size (if they did, fec_small at 224x224 would not export)."""
    torch.manual_seed(0)
    wrapper = LogitsAndAssignments(timm.create_model("fec_tiny").eval()).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    budget, cl._CPU_TILE = cl._CPU_TILE, 1 << 12
    try:
        ep = torch.export.export(wrapper, (images(2),), dynamic_shapes={"x": {0: batch}})
    finally:
        cl._CPU_TILE = budget
    return wrapper, ep


def photo_batch(b):
    """The bundled photograph at fec_tiny's trained input size (64x64), plus noise images."""
    from fec_core.data import sample_image, to_tensor

    photo = to_tensor(sample_image(64))
    return torch.cat([photo, images(b - 1, seed=5)]) if b > 1 else photo


def test_wrapper_gives_the_models_own_assignments(exported):
    wrapper, _ = exported
    x = photo_batch(2)
    with torch.no_grad():
        logits, enc, pooled = wrapper(x)
        out, records = wrapper.fec.forward_with_clusters(x)
    assert torch.equal(logits, out)
    assert torch.equal(enc.reshape(records[0].index.shape), records[0].index)  # stages.0.blocks.0
    first_pool = next(r for r in records if r.kind == "pool")
    assert torch.equal(pooled.reshape(first_pool.index.shape), first_pool.index)


@pytest.mark.parametrize("b", [1, 3])
def test_export_with_dynamic_batch(exported, b):
    wrapper, ep = exported
    x = photo_batch(b)
    with torch.no_grad():
        ref = wrapper(x)
        out = ep.module()(x)
    assert out[0].shape == (b, 1000)
    assert (out[0] - ref[0]).abs().max() <= 1e-5 * ref[0].abs().max()
    for got, want, scores in zip(out[1:], ref[1:], _scores(wrapper, x)):
        assert_assignments_close(scores, got, want, msg="torch.export")


@pytest.mark.slow
def test_onnx_runtime_reproduces_logits_and_assignments(exported, tmp_path):
    pytest.importorskip("onnxscript")
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    wrapper, ep = exported
    path = tmp_path / "fec_tiny.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(ep, (images(2),), str(path), dynamo=True, optimize=False, input_names=["images"],
                          output_names=["logits", "encode_index", "pool_index"], verbose=False)
    onnx.checker.check_model(str(path))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    for b in (1, 3):  # the exported batch size is dynamic
        x = photo_batch(b)
        with torch.no_grad():
            ref = wrapper(x)
        logits, enc, pooled = (torch.from_numpy(a) for a in session.run(None, {"images": x.numpy()}))
        assert logits.shape == (b, 1000)
        assert (logits - ref[0]).abs().max() <= 1e-4 * ref[0].abs().max()  # 1e-4 relative
        for got, want, scores in zip((enc, pooled), ref[1:], _scores(wrapper, x)):
            assert_assignments_close(scores, got, want, msg="onnxruntime")
