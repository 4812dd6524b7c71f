"""The fast clustering path against the literal path (issue 6, chapter 12).

Values and gradients of the encode and pooling layers and of whole models agree
between the two paths (folding and non-square inputs included), the assignments are
identical, the pooling assignment's tiles give the same indices for any memory
budget, the model's forward traces into one graph for ``torch.compile``, the Triton
kernel matches its PyTorch reference in Triton's CPU interpreter, and the benchmark
writes its three files. CUDA tests are skipped without a GPU.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fec_core.clustering as cl
from fec_core import FEC, kernels, load_checkpoint
from fec_core.layers import ClusterEncode, ClusterPool
from conftest import tiny_model

DATA = Path(__file__).parent / "data"
GOLDEN = ["tiny_cls", "tiny_fold_dense", "tiny_rect_dense"]
HAS_CUDA = torch.cuda.is_available()


tiny = tiny_model


def grads(module, x, literal):
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
    out_f, gx_f, g_f = grads(module, x, literal=False)
    out_l, gx_l, g_l = grads(module, x, literal=True)
    for a, b in zip(out_f, out_l):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)
    torch.testing.assert_close(gx_f, gx_l, atol=atol, rtol=1e-4)
    assert g_f.keys() == g_l.keys()
    for k in g_f:
        torch.testing.assert_close(g_f[k], g_l[k], atol=atol, rtol=1e-4, msg=f"gradient of {k}")
    return g_f


# ----------------------------------------------------------------------------- golden tensors
def _build_golden(cfg):
    return FEC(layers=cfg["layers"], embed_dims=cfg["embed_dims"], mlp_ratios=cfg["mlp_ratios"], heads=cfg["heads"],
               head_dim=cfg["head_dim"], proposal=list(zip(cfg["proposal_w"], cfg["proposal_h"])),
               fold=list(zip(cfg["fold_w"], cfg["fold_h"])), num_classes=cfg.get("num_classes", 0),
               dense=cfg.get("fork_feat", False))


@pytest.mark.parametrize("name", GOLDEN)
@pytest.mark.parametrize("literal", [False, True])
def test_golden_parity_both_paths(name, literal):
    d = torch.load(DATA / f"{name}.pt", weights_only=False)
    m = _build_golden(d["config"])
    load_checkpoint(m, d["state_dict"])
    m.eval().set_literal(literal)
    with torch.no_grad():
        out, recs = m.forward_with_clusters(d["input"], intermediates=m.dense)
    outs = out if isinstance(out, list) else [out]
    for a, b in zip(outs, d["outputs"]):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)
    assert {r.official_name for r in recs} == set(d["assignments"])
    for r in recs:
        assert torch.equal(r.index, d["assignments"][r.official_name]), r.official_name


# ----------------------------------------------------------------------------- layers
@pytest.mark.parametrize("fold,size", [((1, 1), (12, 12)), ((2, 2), (12, 16)), ((1, 2), (10, 14))])
def test_encode_layer_values_and_gradients(fold, size):
    torch.manual_seed(0)
    layer = ClusterEncode(16, heads=2, head_dim=6, proposal=(3, 2) if fold == (1, 1) else (2, 2), fold=fold)
    with torch.no_grad():
        layer.sim_alpha.fill_(-1.3)  # alpha < 0: the argmax picks the least similar center
        layer.sim_beta.fill_(0.4)
    x = torch.randn(3, 16, *size)
    g = assert_paths_agree(layer, x)
    assert g["sim_alpha"].abs() > 0 and g["f.weight"].abs().sum() > 0  # the gate carries a gradient


@pytest.mark.parametrize("fold,size", [((1, 1), (12, 12)), ((2, 2), (16, 12)), ((1, 1), (10, 6))])
def test_pool_layer_values_and_gradients(fold, size):
    torch.manual_seed(0)
    layer = ClusterPool(12, 20, fold=fold)
    x = torch.randn(2, 12, *size)
    g = assert_paths_agree(layer, x)
    assert "conv_f.weight" not in g  # the argmax cuts the key convolution off, on both paths
    assert g["conv_v.weight"].abs().sum() > 0


def test_encode_and_pool_functions_identical_assignments():
    torch.manual_seed(0)
    alpha, beta = torch.tensor([0.8]), torch.tensor([-0.3])
    for shape, grid in [((6, 8, 14, 10), (7, 5)), ((4, 12, 16, 16), (4, 4))]:
        k, v = torch.randn(shape), torch.randn(shape)
        (of, i_f), (ol, i_l) = (cl.cluster_encode(k, v, alpha, beta, grid, literal=lit) for lit in (False, True))
        assert torch.equal(i_f, i_l)
        torch.testing.assert_close(of, ol, atol=1e-6, rtol=1e-5)
        (rf, j_f), (rl, j_l) = (cl.cluster_pool(k, v, literal=lit) for lit in (False, True))
        assert torch.equal(j_f, j_l)
        torch.testing.assert_close(rf, rl, atol=1e-6, rtol=1e-5)
        assert of.transpose(1, 2).is_contiguous()  # the fast path's output is channels first


def test_empty_clusters_keep_their_center():
    # all points identical: they all join center 0, every other representative is its center value
    k = torch.ones(1, 4, 8, 8)
    v = torch.randn(1, 5, 8, 8)
    reps, index = cl.cluster_pool(k, v)
    assert torch.equal(index, torch.zeros_like(index))
    centers = F.avg_pool2d(v, 2)
    torch.testing.assert_close(reps.flatten(2)[..., 1:], centers.flatten(2)[..., 1:])
    torch.testing.assert_close(reps, cl.cluster_pool(k, v, literal=True)[0])


# ----------------------------------------------------------------------------- whole model
@pytest.mark.parametrize("kw,size", [
    (dict(), (64, 64)),
    (dict(fold=(2, 2, 1, 1), proposal=(2, 2, 2, 1), dense=True), (64, 64)),
    (dict(proposal=((2, 3), (2, 3), (1, 2), (1, 1)), dense=True), (64, 96)),
])
def test_model_values_and_gradients(kw, size):
    m = tiny(**kw)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(3))
    g = assert_paths_agree(m, x, atol=2e-5)
    assert len(g) > 20
    m.eval()
    with torch.no_grad():
        recs_f = m.set_literal(False).forward_with_clusters(x)[1]
        recs_l = m.set_literal(True).forward_with_clusters(x)[1]
    assert len(recs_f) == len(recs_l) == 7
    for a, b in zip(recs_f, recs_l):
        assert torch.equal(a.index, b.index), a.name


def test_bf16_autocast_paths_agree_closely():
    m = tiny().eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = m.set_literal(False)(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = m.set_literal(False)(x).float()
            lit = m.set_literal(True)(x).float()
    scale = ref.abs().max()
    assert (fast - ref).abs().max() < 0.1 * scale
    assert (lit - ref).abs().max() < 0.1 * scale


def test_aggregate_accumulates_half_precision_in_float32():
    torch.manual_seed(0)
    v = torch.rand(1, 4, 4096) + 1.0  # many members: a bfloat16 running sum would lose them
    cv = torch.rand(1, 4, 2)
    index = torch.zeros(1, 4096, dtype=torch.long)
    exact = cl.aggregate(v.double(), cv.double(), index, channels_first=True)
    half = cl.aggregate(v.bfloat16(), cv.bfloat16(), index, channels_first=True)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.double(), exact, atol=0, rtol=1e-2)
    # against the public points-first form
    torch.testing.assert_close(cl.aggregate(v, cv, index, channels_first=True).transpose(1, 2),
                               cl.aggregate(v.transpose(1, 2), cv.transpose(1, 2), index))


# ----------------------------------------------------------------------------- tiled assignment
@pytest.mark.parametrize("b,m,n,c", [(2, 49, 196, 16), (3, 196, 500, 24), (1, 70, 301, 8), (5, 300, 257, 4)])
def test_assign_nearest_any_budget(b, m, n, c):
    torch.manual_seed(b * m + n)
    ck, pk = torch.randn(b, m, c), torch.randn(b, n, c)
    ref = cl.assign(cl.similarity(ck, pk))[1]
    # budgets that exercise one shot, point tiles, batch splits and center tiles (running max)
    for budget in (4096, 20000, b * m * 128 - 1, b * m * n - 1, 1 << 24):
        assert torch.equal(cl.assign_nearest(ck, pk, max_elements=budget), ref), budget


def test_assign_nearest_ties_go_to_the_first_center():
    torch.manual_seed(0)
    ck, pk = torch.randn(2, 40, 8), torch.randn(2, 300, 8)
    twice = torch.cat([ck, ck], dim=1)  # every center twice: the copy must never win
    for budget in (50, 1000, 1 << 24):
        idx = cl.assign_nearest(twice, pk, max_elements=budget)
        assert idx.max() < 40
        assert torch.equal(idx, cl.assign(cl.similarity(twice, pk))[1])


def test_assign_nearest_rejects_bad_shapes():
    with pytest.raises(ValueError, match="center_keys"):
        cl.assign_nearest(torch.randn(2, 4, 8), torch.randn(2, 10, 6))
    with pytest.raises(ValueError, match="max_elements"):
        cl.assign_nearest(torch.randn(2, 4, 8), torch.randn(2, 10, 8), max_elements=0)


def test_cluster_pool_memory_is_linear_in_points():
    """Peak allocation of the fast pooling step grows like N, the literal one like N^2."""
    from fec_core.bench import peak_cpu_bytes
    peaks = {}
    for side in (32, 64):
        k, v = torch.randn(1, 8, side, side), torch.randn(1, 8, side, side)
        with torch.no_grad():
            peaks[side] = (peak_cpu_bytes(lambda: cl.cluster_pool(k, v)),
                           peak_cpu_bytes(lambda: cl.cluster_pool(k, v, literal=True)))
    if any(p is None for pair in peaks.values() for p in pair):
        pytest.skip("torch.profiler gives no allocation events here")
    fast_ratio = peaks[64][0] / peaks[32][0]
    lit_ratio = peaks[64][1] / peaks[32][1]
    assert fast_ratio < 6, peaks  # 4x the points: about 4x the memory
    assert lit_ratio > 10, peaks  # the dense [N/4, N] similarity: about 16x


# ----------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("literal", [False, True])
def test_forward_traces_without_graph_breaks(literal):
    m = tiny().eval().set_literal(literal)
    x = torch.randn(2, 3, 64, 64)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(m)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_training_step_matches_eager():
    """AOTAutograd traces forward and backward of the fast path (no code generation, so no
    compiler is needed) and gives eager's gradients."""
    m = tiny()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    out.square().sum().backward()
    g_c = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)
    m(x).square().sum().backward()
    for n, p in m.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(g_c[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


# ----------------------------------------------------------------------------- Triton kernel
_INTERPRET_SCRIPT = textwrap.dedent(r"""
    import torch, torch.nn.functional as F
    import fec_core.clustering as cl
    from fec_core import kernels
    assert kernels.INTERPRET and kernels.HAS_TRITON
    from fec_core.numerics import assert_assignments_close, tolerance
    torch.manual_seed(0)
    # The interpreter's dots and MKL's matmul sum in different orders (and differ between
    # CPUs): picks are checked under the numerical contract, not for equality.
    for (b, m, n, c) in [(2, 49, 196, 16), (1, 70, 130, 40), (3, 16, 64, 8)]:
        ck = F.normalize(torch.randn(b, m, c), dim=-1)
        pk = F.normalize(torch.randn(b, n, c), dim=-1)
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            c_, p_ = ck.to(dt), pk.to(dt)
            got = kernels.cosine_argmax(c_, p_)
            scores = torch.matmul(p_.double(), c_.double().transpose(1, 2)).transpose(1, 2)
            assert_assignments_close(scores, got, expected=kernels.cosine_argmax_reference(c_, p_),
                                     atol=tolerance(dt), msg=f"{dt} {(b, m, n, c)}")
            twice = torch.cat([c_, c_], 1)  # duplicates: same arithmetic, the first copy wins
            assert int(kernels.cosine_argmax(twice, p_).max()) < m
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: inputs cast like matmul would
            assert torch.equal(kernels.cosine_argmax(ck, pk), kernels.cosine_argmax(ck.bfloat16(), pk.bfloat16()))
    # through the layer function, with the kernel forced on
    kernels.set_mode("on")
    k, v = torch.randn(2, 8, 16, 12), torch.randn(2, 8, 16, 12)
    rf, jf = cl.cluster_pool(k, v)
    rl, jl = cl.cluster_pool(k, v, literal=True)
    kd = k.double()
    scores = cl.similarity(cl.to_points(cl.centers(kd, (8, 6))), cl.to_points(kd))
    assert_assignments_close(scores, jf, expected=jl, atol=tolerance(torch.float32))
    cv, pv = cl.to_points(cl.centers(v, (8, 6))), cl.to_points(v)
    ref = cl.aggregate_dense(pv, cv, cl.one_hot(jf, cv.shape[1]))  # the literal sums of the same pick
    assert torch.allclose(rf.flatten(2).transpose(1, 2), ref, atol=1e-6)
    # the kernel is a registered custom op: traced into one graph, with and without autocast
    def pool_amp(k, v):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return cl.cluster_pool(k, v)
    for fn in (cl.cluster_pool, pool_amp):
        torch._dynamo.reset()
        ex = torch._dynamo.explain(fn)(k, v)
        assert ex.graph_count == 1 and ex.graph_break_count == 0, ex.break_reasons
    torch._dynamo.reset()
    rc, jc = torch.compile(cl.cluster_pool, backend="aot_eager", fullgraph=True)(k, v)
    assert torch.equal(jc, jf) and torch.allclose(rc, rf)
    print("KERNEL-OK")
""")


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="Triton is not installed")
def test_triton_kernel_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", FEC_KERNELS="auto")
    proc = subprocess.run([sys.executable, "-c", _INTERPRET_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "KERNEL-OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_kernel_mode_and_fallback():
    assert kernels.mode() in ("auto", "off", "on")
    with pytest.raises(ValueError):
        kernels.set_mode("sometimes")
    c = torch.randn(1, 4, 8)
    if not kernels.INTERPRET:
        assert not kernels.use_kernel(c, c)  # CPU tensors use the PyTorch tiles in 'auto' mode
    before = kernels.mode()
    try:
        kernels.set_mode("off")
        assert not kernels.use_kernel(c, c)
    finally:
        kernels.set_mode(before)


# ----------------------------------------------------------------------------- benchmark
def test_bench_writes_json_table_and_plot(tmp_path):
    from fec_core import bench
    threads = torch.get_num_threads()
    try:
        report = bench.run_cli(["--model", "fec_tiny", "--device", "cpu", "--batch-sizes", "2", "--resolutions", "64",
                             "--modes", "infer", "train", "--iters", "1", "--warmup", "0", "--threads", "1",
                             "--out-dir", str(tmp_path), "--quiet"])
    finally:
        torch.set_num_threads(threads)
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["meta"]["device"] == "cpu" and "1 threads" in data["meta"]["device_name"]
    assert data["meta"]["command"].startswith("python -m fec_core.bench")
    rows = data["results"]
    assert {(r["path"], r["mode"]) for r in rows} == {(p, m) for p in ("literal", "fast") for m in ("infer", "train")}
    for r in rows:
        assert r["status"] == "ok" and r["latency_ms"] > 0 and r["throughput"] > 0
        assert r["peak_mem_bytes"] is None or r["peak_mem_bytes"] > 0
    md = (tmp_path / "bench.md").read_text()
    assert md.count("| fec_tiny | infer |") == 2 and "speedup vs literal" in md
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    assert report["results"] == rows


def test_bench_skips_literal_beyond_dense_limit(tmp_path):
    from fec_core import bench
    report = bench.run_cli(["--model", "fec_tiny", "--device", "cpu", "--batch-sizes", "1", "--resolutions", "64",
                         "--iters", "1", "--warmup", "0", "--max-dense-gib", "0.000001", "--no-memory",
                         "--no-plot", "--out-dir", str(tmp_path), "--quiet"])
    lit = [r for r in report["results"] if r["path"] == "literal"][0]
    assert lit["status"].startswith("skipped") and lit["latency_ms"] is None
    assert [r for r in report["results"] if r["path"] == "fast"][0]["status"] == "ok"


def test_bench_command_line(tmp_path):
    """``python -m fec_core.bench`` as a user runs it: exit status 0, device name printed, files written."""
    proc = subprocess.run([sys.executable, "-m", "fec_core.bench", "--model", "fec_tiny", "--batch-sizes", "1",
                           "--resolutions", "64", "--iters", "1", "--warmup", "0", "--threads", "1", "--no-memory",
                           "--no-plot", "--quiet", "--out-dir", str(tmp_path)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("device: ")
    assert json.loads((tmp_path / "bench.json").read_text())["meta"]["command"].endswith(str(tmp_path))


def test_bench_rejects_bad_arguments():
    from fec_core import bench
    with pytest.raises(ValueError, match="multiple of 32"):
        bench.run(bench.BenchConfig(model="fec_tiny", resolutions=[100]), progress=False)
    with pytest.raises(ValueError, match="batch sizes"):
        bench.run(bench.BenchConfig(model="fec_tiny", batch_sizes=[0]), progress=False)
    with pytest.raises(ValueError, match="not an FEC variant"):
        bench.run(bench.BenchConfig(model="resnet18"), progress=False)
    with pytest.raises(ValueError, match="--official"):
        bench.run(bench.BenchConfig(model="fec_tiny", paths=["official", "fast"]), progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            bench.run(bench.BenchConfig(model="fec_tiny", device="cuda"), progress=False)


BAD_SETTINGS = [
    (["--device", "cuda:7"], "CUDA"),
    (["--device", "tpu"], "not a device name"),
    (["--batch-sizes", "0"], "batch sizes [0]"),
    (["--batch-sizes", "10000000"], "the input alone needs"),
    (["--resolutions", "100"], "resolution 100"),
    (["--iters", "0"], "iters 0"),
    (["--threads", "0"], "--threads 0"),
    (["--model", "resnet50"], "not an FEC variant"),
    (["--paths", "official", "fast"], "--official FILE"),
    (["--official", "no_such_file.py"], "no such file"),
    (["--out-dir", "/dev/null/x"], "--out-dir /dev/null/x"),
    (["--merge", "no_such.json"], "cannot read it"),
]


@pytest.mark.parametrize("args,message", BAD_SETTINGS)
def test_bench_bad_settings_one_line(args, message, capsys):
    """Settings that cannot work: exit status 2 and one line on stderr, before any model
    is built (issue 14)."""
    from fec_core import bench
    if args[:2] == ["--device", "cuda:7"] and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 CUDA devices")
    assert bench.main(["--model", "fec_tiny", "--quiet", *args]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m fec_core.bench: error:"), captured.err
    assert message in lines[0] and not captured.out


@pytest.mark.parametrize("args,message", [BAD_SETTINGS[0], BAD_SETTINGS[3], BAD_SETTINGS[10]])
def test_bench_cli_bad_settings_no_traceback(args, message):
    """The same as a user sees it: a subprocess, one line, no traceback."""
    if args[:2] == ["--device", "cuda:7"] and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 CUDA devices")
    proc = subprocess.run([sys.executable, "-m", "fec_core.bench", "--model", "fec_tiny", "--quiet", *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr, proc.stderr


def test_bench_official_same_weights(tmp_path):
    """``--official``: a stand-in official file (our model under the official key names)
    is built, given the same weights and timed next to ours; the report says how far
    its outputs are from ours and the speedup over it."""
    fake = tmp_path / "fake_official.py"
    fake.write_text(textwrap.dedent('''
        import torch.nn as nn
        from timm.models.registry import register_model  # switched off while bench loads the file
        from fec_core import FEC, VARIANTS

        class Official(nn.Module):
            """Our model's parts under the official names: patch_embed, network.{2i} (the
            blocks of stage i), network.{2i-1} (its pooling layer), norm, head."""
            def __init__(self, num_classes=1000):
                super().__init__()
                inner = FEC(**VARIANTS["fec_tiny"], num_classes=num_classes)
                self.patch_embed = inner.stem
                net = []
                for i, stage in enumerate(inner.stages):
                    net += ([stage.downsample] if i else []) + [stage.blocks]
                self.network = nn.ModuleList(net)
                self.norm, self.head = inner.norm, inner.head
                object.__setattr__(self, "inner", inner)  # not a submodule: no second key set

            def forward(self, x):
                return self.inner(x)

        @register_model
        def fec_tiny(**kw):
            return Official(**kw)
    '''))
    from fec_core import bench
    report = bench.run_cli(["--model", "fec_tiny", "--device", "cpu", "--official", str(fake), "--batch-sizes", "1",
                            "--resolutions", "64", "--iters", "1", "--warmup", "0", "--no-memory", "--no-plot",
                            "--quiet", "--out-dir", str(tmp_path / "out")])
    import timm
    assert type(timm.create_model("fec_tiny")).__name__ == "FEC"  # the registry still holds ours
    assert [r["path"] for r in report["results"]] == ["official", "literal", "fast"]
    assert all(r["status"] == "ok" for r in report["results"])
    agreement = report["meta"]["official"]["agreement"]
    assert agreement["max_abs_diff"] <= 1e-5 * max(1.0, agreement["output_scale"])
    md = (tmp_path / "out" / "bench.md").read_text()
    assert "speedup vs official" in md and "| official |" in md and "Official code (fec_tiny" in md


def test_bench_merge_joins_reports(tmp_path):
    from fec_core import bench
    paths = []
    for model in ("fec_tiny",):
        for mode in ("infer", "train"):
            out = tmp_path / mode
            bench.run_cli(["--model", model, "--device", "cpu", "--batch-sizes", "1", "--resolutions", "32",
                           "--modes", mode, "--paths", "fast", "--iters", "1", "--warmup", "0", "--no-memory",
                           "--no-plot", "--quiet", "--out-dir", str(out)])
            paths.append(str(out / "bench.json"))
    merged = bench.run_cli(["--merge", *paths, "--out-dir", str(tmp_path / "all"), "--no-plot"])
    assert [r["mode"] for r in merged["results"]] == ["infer", "train"]
    assert len(merged["meta"]["runs"]) == 2 and merged["meta"]["command"].count("python -m fec_core.bench") == 2
    assert json.loads((tmp_path / "all" / "bench.json").read_text())["results"] == merged["results"]
