"""The benchmark (fec_core.bench): its three files, its command line, the skipped literal
path, the official code timed next to ours, merged reports, and one-line answers to
settings that cannot work. On a CUDA device: test_gpu.py."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

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
                         "--iters", "1", "--warmup", "0", "--max-literal-gib", "0.000001", "--no-memory",
                         "--no-plot", "--out-dir", str(tmp_path), "--quiet"])
    lit = [r for r in report["results"] if r["path"] == "literal"][0]
    assert lit["status"].startswith("skipped") and lit["latency_ms"] is None
    assert [r for r in report["results"] if r["path"] == "fast"][0]["status"] == "ok"



def test_bench_kernel_paths_run_in_their_kernel_mode(tmp_path, monkeypatch):
    """The Triton kernels' paths (issue 24) are accepted; on a CPU outside Triton's
    interpreter they are reported as skipped while the others run; every step of ours runs
    in its path's kernel mode (fast: 'off', kernel: 'on'), and the mode is restored."""
    from fec_core import bench, config
    from fec_core.bench import runner
    seen = []
    real = runner._on_path

    def spy(model, path):
        before = real(model, path)

        def step():
            before()
            seen.append((path, config.kernel_mode()))
        return step
    monkeypatch.setattr(runner, "_on_path", spy)
    here = bench.kernels_available(torch.device("cpu"))
    paths = ["fast", "kernel"] + ([] if here else ["compiled_kernel"])  # compiling in the interpreter: slow
    mode = config.kernel_mode()
    report = bench.run_cli(["--model", "fec_tiny", "--device", "cpu", "--batch-sizes", "1", "--resolutions", "64",
                            "--iters", "1", "--warmup", "0", "--no-memory", "--no-plot", "--paths", *paths,
                            "--out-dir", str(tmp_path), "--quiet"])
    rows = {r["path"]: r for r in report["results"]}
    assert set(rows) == set(paths) and rows["fast"]["status"] == "ok"
    for p in paths[1:]:
        assert rows[p]["status"] == "ok" if here else rows[p]["status"].startswith("skipped: the Triton kernels")
    assert ("fast", "off") in seen and all(m == bench.PATH_KERNEL_MODE[p] for p, m in seen)
    assert report["meta"]["kernel_modes"] == {p: bench.PATH_KERNEL_MODE[p] for p in paths}
    assert config.kernel_mode() == mode
    assert "| kernel |" in (tmp_path / "bench.md").read_text()

def test_bench_times_timm_yardsticks_in_the_same_run(tmp_path):
    """``--compare``: a timm model timed in the same setting, reported as path timm:<name>,
    with its speedup over the literal path in the table and a bar in the plot."""
    from fec_core import bench
    report = bench.run_cli(["--model", "fec_tiny", "--device", "cpu", "--batch-sizes", "1", "--resolutions", "64",
                            "--iters", "1", "--warmup", "0", "--no-memory", "--compare", "resnet18",
                            "--out-dir", str(tmp_path), "--quiet"])
    rows = {r["path"]: r for r in report["results"]}
    assert set(rows) == {"literal", "fast", "timm:resnet18"}
    assert rows["timm:resnet18"]["status"] == "ok" and rows["timm:resnet18"]["latency_ms"] > 0
    assert report["meta"]["references"] == ["resnet18"]
    assert "| timm:resnet18 |" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    # --paths with no value: the yardsticks alone (one model per process, scripts/cpu_bench.sh)
    alone = bench.run_cli(["--model", "fec_tiny", "--device", "cpu", "--batch-sizes", "1", "--resolutions", "64",
                           "--iters", "1", "--warmup", "0", "--no-memory", "--no-plot", "--paths", "--compare",
                           "resnet18", "--out-dir", str(tmp_path / "alone"), "--quiet"])
    assert [r["path"] for r in alone["results"]] == ["timm:resnet18"]


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
    (["--compare", "no_such_net"], "--compare no_such_net: not a timm model"),
    (["--compare", "resnet18", "--dense"], "cannot be combined with --dense"),
    (["--paths"], "paths []: choose one or more"),
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


@pytest.mark.slow
@pytest.mark.parametrize("args,message", [BAD_SETTINGS[0], BAD_SETTINGS[3], BAD_SETTINGS[10]])
@pytest.mark.process
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


def test_bench_merge_combines_rounds_of_the_same_setting(tmp_path):
    """scripts/cpu_bench.sh times every implementation once per round; --merge makes one
    row of each setting and path: the median of the rounds' medians."""
    from fec_core import bench
    paths = []
    for i in range(3):
        out = tmp_path / f"round{i}"
        bench.run_cli(["--model", "fec_tiny", "--device", "cpu", "--batch-sizes", "2", "--resolutions", "32",
                       "--modes", "infer", "--paths", "fast", "--iters", "2", "--warmup", "0", "--no-memory",
                       "--no-plot", "--quiet", "--out-dir", str(out)])
        paths.append(str(out / "bench.json"))
    rounds = [json.loads(open(p).read())["results"][0] for p in paths]
    merged = bench.run_cli(["--merge", *paths, "--out-dir", str(tmp_path / "all"), "--no-plot"])
    (row,) = merged["results"]
    assert row["round_latency_ms"] == [r["latency_ms"] for r in rounds]
    assert row["latency_ms"] == sorted(row["round_latency_ms"])[1]
    assert row["latency_ms_min"] == min(r["latency_ms_min"] for r in rounds)
    assert row["times_ms"] == [t for r in rounds for t in r["times_ms"]]
    assert abs(row["throughput"] - 2 / (row["latency_ms"] / 1e3)) < 1e-9
    assert "3 rounds" in (tmp_path / "all" / "bench.md").read_text()
