#!/usr/bin/env bash
# The CUDA check of issue 16 in one command: versions, the CUDA tests, the benchmark
# against the official code, a summary of the targets. Everything lands under $OUT:
#   gpu_check.log   all output          gpu_tests.log   pytest tests/test_gpu.py
#   gpu_bench.json  merged benchmark    gpu_bench.md    its table      gpu_bench.png  plot
#   gpu_profile.txt top operators of one step per path (fec_small)
#
# Usage (repository root):
#   bash scripts/gpu_check.sh               on the GPU machine (about 5-7 minutes)
#   bash scripts/gpu_check.sh --dry-run     on a CPU: the same steps at tiny sizes, tests on
#                                           the CPU with Triton's interpreter (catches typos)
# Environment: OUT (default /tmp/gpu_check_out), PYTHON (default python3),
#   GPU_CHECK_BUDGET seconds for the whole script (default 400; each part also has its own
#   limit, and a part that would start with under 20 s left is skipped),
#   GPU_CHECK_SKIP_TESTS=1 to rerun the benchmark alone.
# Needs .gpu/ (ignored by git, carried to the GPU machine): official_fec.py (a verbatim
# copy of github guikunchen/FEC models/fec.py; torch_scatter is replaced at load time by
# fec_core.bench.load_official) and wheels/ (timm, einops: installed only if missing).
set -u
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-/tmp/gpu_check_out}
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-400}
START=$(date +%s)
DEADLINE=$((START + BUDGET))
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

say() { echo "[gpu_check $(($(date +%s) - START))s] $*"; }

# run_part NAME LIMIT_SECONDS COMMAND...: run under `timeout`, never past the deadline
run_part() {
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE - $(date +%s)))
    if [ "$left" -lt 20 ]; then
        say "SKIP $name: only ${left}s of the budget left"
        return 124
    fi
    [ "$limit" -gt $((left - 5)) ] && limit=$((left - 5))
    say "START $name (limit ${limit}s)"
    timeout -k 10 "$limit" "$@"
    local rc=$?
    say "END $name: exit $rc$([ $rc -eq 124 ] && echo ' (TIMED OUT)')"
    return $rc
}

# ---------------------------------------------------------------- 0. packages
say "python: $(command -v "$PY")"
if ! "$PY" -c "import einops" 2>/dev/null || \
   ! "$PY" -c "from timm.models._features import feature_take_indices; from timm.layers import DropPath" 2>/dev/null; then
    say "installing the carried wheels (einops and/or a newer timm) into /tmp/gpu_site"
    WHEELS=""
    "$PY" -c "import einops" 2>/dev/null || WHEELS="$WHEELS $(ls .gpu/wheels/einops-*.whl)"
    "$PY" -c "from timm.models._features import feature_take_indices" 2>/dev/null || \
        WHEELS="$WHEELS $(ls .gpu/wheels/timm-*.whl)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_site $WHEELS \
        && export PYTHONPATH="/tmp/gpu_site:$PYTHONPATH" || say "WARNING: installing$WHEELS failed"
fi

# ---------------------------------------------------------------- 1. versions
if [ $DRY -eq 0 ]; then
    nvidia-smi || say "nvidia-smi failed"
fi
"$PY" - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version())
for name in ("triton", "timm", "einops", "torch_scatter", "numpy", "pytest"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', '?')} ({m.__file__})")
    except Exception as e:  # noqa: BLE001
        print(f"{name}: not importable ({type(e).__name__}: {e})")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("GPU:", torch.cuda.get_device_name(0), f"{p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor},",
          p.multi_processor_count, "SMs")
import fec_core, fec_core.kernels as k
print("fec_core", fec_core.__version__, fec_core.__file__, "| Triton kernel:", k.HAS_TRITON, "mode", k.mode())
EOF

# ---------------------------------------------------------------- 2. CUDA tests
if [ $DRY -eq 0 ]; then
    TEST_ENV=()
else  # the same tests on the CPU, the kernel in Triton's interpreter
    TEST_ENV=(env FEC_TEST_DEVICE=cpu TRITON_INTERPRET=1 FEC_KERNELS=on)
fi
if [ "${GPU_CHECK_SKIP_TESTS:-0}" = 1 ]; then
    say "SKIP CUDA tests (GPU_CHECK_SKIP_TESTS=1)"
else
run_part "CUDA tests" 200 ${TEST_ENV[@]+"${TEST_ENV[@]}"} "$PY" -m pytest -p no:cacheprovider -q -rs --timeout=150 \
    --durations=8 -o addopts="" tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log"
fi

# ---------------------------------------------------------------- 3. benchmark
OFFICIAL=()
if [ -f .gpu/official_fec.py ]; then
    OFFICIAL=(--official .gpu/official_fec.py)
    PATHS=(official literal fast)
else
    say "WARNING: .gpu/official_fec.py is missing: no official code in the benchmark"
    PATHS=(literal fast)
fi
if [ $DRY -eq 0 ]; then
    DEV=cuda; B_INF=256; B_TRAIN=128; RES=224; DENSE_RES=(512 1024 2048); IT=(--iters 5 --warmup 2)
else
    DEV=cpu; B_INF=2; B_TRAIN=2; RES=64; DENSE_RES=(64 128); IT=(--iters 1 --warmup 0 --threads 1)
fi
BENCH=("$PY" -m fec_core.bench --device "$DEV" "${IT[@]}" --quiet --no-plot)

merge() {  # join what has been measured so far into $OUT (so a timeout loses nothing)
    local files=("$WORK"/parts/*/bench.json)
    [ -f "${files[0]}" ] || return 0
    "$PY" -m fec_core.bench --merge "${files[@]}" --out-dir "$WORK/merged" > "$WORK/merge.log" 2>&1 \
        || { cat "$WORK/merge.log"; return 1; }
    cp "$WORK/merged/bench.json" "$OUT/gpu_bench.json"
    cp "$WORK/merged/bench.md" "$OUT/gpu_bench.md"
    [ -f "$WORK/merged/bench.png" ] && cp "$WORK/merged/bench.png" "$OUT/gpu_bench.png"
    cat "$WORK"/parts/*/profile.txt > "$OUT/gpu_profile.txt" 2>/dev/null || rm -f "$OUT/gpu_profile.txt"
    return 0
}

run_part "fec_small inference b$B_INF fp32+bf16" 75 "${BENCH[@]}" --model fec_small ${OFFICIAL[@]+"${OFFICIAL[@]}"} \
    --paths "${PATHS[@]}" --modes infer --dtypes fp32 bf16 --batch-sizes $B_INF --resolutions $RES --profile \
    --out-dir "$WORK/parts/1_small_infer"
merge
run_part "fec_small training b$B_TRAIN bf16" 75 "${BENCH[@]}" --model fec_small ${OFFICIAL[@]+"${OFFICIAL[@]}"} \
    --paths "${PATHS[@]}" --modes train --dtypes bf16 --batch-sizes $B_TRAIN --resolutions $RES --profile \
    --out-dir "$WORK/parts/2_small_train"
merge
run_part "fec_large inference b$B_INF fp32+bf16" 90 "${BENCH[@]}" --model fec_large ${OFFICIAL[@]+"${OFFICIAL[@]}"} \
    --paths "${PATHS[@]}" --modes infer --dtypes fp32 bf16 --batch-sizes $B_INF --resolutions $RES \
    --out-dir "$WORK/parts/3_large_infer"
merge
run_part "fec_small dense features ${DENSE_RES[*]} b1" 90 "${BENCH[@]}" --model fec_small ${OFFICIAL[@]+"${OFFICIAL[@]}"} \
    --paths "${PATHS[@]}" --dense --modes infer --dtypes fp32 bf16 --batch-sizes 1 --resolutions "${DENSE_RES[@]}" \
    --max-dense-gib 40 --out-dir "$WORK/parts/4_small_dense"
merge
run_part "fec_large training b$B_TRAIN bf16" 90 "${BENCH[@]}" --model fec_large ${OFFICIAL[@]+"${OFFICIAL[@]}"} \
    --paths "${PATHS[@]}" --modes train --dtypes bf16 --batch-sizes $B_TRAIN --resolutions $RES \
    --out-dir "$WORK/parts/5_large_train"
merge
run_part "fec_small compiled inference b$B_INF bf16" 120 "${BENCH[@]}" --model fec_small \
    --paths fast compiled --modes infer --dtypes bf16 --batch-sizes $B_INF --resolutions $RES \
    --out-dir "$WORK/parts/6_small_compiled"
merge
# the plot of everything (the parts above skip theirs to save time)
"$PY" -m fec_core.bench --merge "$WORK"/parts/*/bench.json --out-dir "$WORK/merged" > /dev/null 2>&1 \
    && cp "$WORK/merged/bench.png" "$OUT/gpu_bench.png"

# ---------------------------------------------------------------- 4. targets
[ -f "$OUT/gpu_bench.json" ] && "$PY" - "$OUT/gpu_bench.json" <<'EOF'
import json, sys
rep = json.load(open(sys.argv[1]))
rows = rep["results"]
print(f"\n== targets (issue 16) on {rep['meta']['device_name']}, torch {rep['meta']['torch']}, "
      f"{rep['meta']['date']}")

def row(model, mode, dtype, batch, res, path, dense=False):
    for r in rows:
        if (r.get("model"), r["mode"], r["dtype"], r["batch"], r["resolution"], r["path"], bool(r.get("dense"))) \
                == (model, mode, dtype, batch, res, path, dense) and r["status"] == "ok":
            return r
    return None

def gib(r):
    return None if r is None or r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / 2 ** 30

def line(what, value, goal, ok, official=None):
    ratio = "" if official is None else f" | vs official in this run: {official}"
    verdict = "n/a " if ok is None else ("MET " if ok else "MISS")
    print(f"{verdict} {what}: {value} (target {goal}){ratio}")

res = max((r["resolution"] for r in rows if not r.get("dense")), default=224)
bi = max((r["batch"] for r in rows if r["mode"] == "infer" and not r.get("dense")), default=256)
bt = max((r["batch"] for r in rows if r["mode"] == "train"), default=128)
for model, dt in (("fec_small", "bf16"), ("fec_small", "fp32"), ("fec_large", "bf16"), ("fec_large", "fp32")):
    f, o = row(model, "infer", dt, bi, res, "fast"), row(model, "infer", dt, bi, res, "official")
    c = row(model, "infer", dt, bi, res, "compiled")
    if f is None:
        print(f"n/a  {model} inference {dt}: not measured"); continue
    ratio = None if o is None else f"{f['throughput'] / o['throughput']:.2f}x ({o['throughput']:.0f} img/s, {gib(o):.2f} GiB)"
    extra = "" if c is None else f"; compiled {c['throughput']:.0f} img/s"
    if model == "fec_small" and dt == "bf16":
        line(f"{model} inference {dt} b{bi}: img/s", f"{f['throughput']:.0f}{extra}", ">= 10000",
             f["throughput"] >= 10000, ratio)
        line(f"{model} inference {dt} b{bi}: peak memory", f"{gib(f):.2f} GiB", "<= 1.5 GiB", gib(f) <= 1.5)
    elif model == "fec_large":
        line(f"{model} inference {dt} b{bi}: speedup over official", ratio or "official not measured", ">= 3x",
             None if o is None else f["throughput"] >= 3 * o["throughput"])
        print(f"     {model} {dt}: {f['throughput']:.0f} img/s, {gib(f):.2f} GiB")
    else:
        print(f"     {model} inference {dt} b{bi}: {f['throughput']:.0f} img/s, {gib(f):.2f} GiB | official: {ratio}")
for model in ("fec_small", "fec_large"):
    f, o = row(model, "train", "bf16", bt, res, "fast"), row(model, "train", "bf16", bt, res, "official")
    if f is None:
        print(f"n/a  {model} training: not measured"); continue
    ratio = None if o is None else f"{f['throughput'] / o['throughput']:.2f}x ({o['throughput']:.0f} img/s, {gib(o):.2f} GiB)"
    goal = 2500 if model == "fec_small" else None
    line(f"{model} training bf16 b{bt}: img/s", f"{f['throughput']:.0f} ({gib(f):.2f} GiB)",
         ">= 2500" if goal else "none", None if goal is None else f["throughput"] >= goal, ratio)
dense = sorted(((r["resolution"], r["dtype"], r) for r in rows if r.get("dense") and r["path"] == "fast"
                and r["status"] == "ok"), key=lambda t: t[:2])
for dt in ("fp32", "bf16"):
    pts = [(res_, r) for res_, d, r in dense if d == dt]
    if not pts:
        continue
    desc = ", ".join(f"{res_}px {gib(r):.2f} GiB" for res_, r in pts)
    top_res, top = pts[-1]
    line(f"fec_small dense b1 {dt} fast: peak memory at {top_res}px", desc, "<= 8 GiB at 2048px",
         gib(top) <= 8 if top_res == 2048 else None)
    if len(pts) > 1:
        (r0, a), (r1, b) = pts[-2], pts[-1]
        per_px = (b["peak_mem_bytes"] / r1 ** 2) / (a["peak_mem_bytes"] / r0 ** 2)
        print(f"     bytes per pixel {r1}px / {r0}px: {per_px:.2f} (1.0 = linear in pixels)")
    for res_, d, r in dense:
        if d == dt:
            o = row("fec_small", "infer", dt, 1, res_, "official", dense=True)
            if o is not None:
                print(f"     official at {res_}px {dt}: {gib(o):.2f} GiB, {o['latency_ms']:.1f} ms "
                      f"(fast {r['latency_ms']:.1f} ms)")
bad = [r for r in rows if r["status"] != "ok" and not r["status"].startswith("skipped")]
for r in bad:
    print(f"NOT OK {r.get('model')} {r['mode']} {r['dtype']} b{r['batch']} {r['resolution']} {r['path']}: {r['status']}")
EOF
say "done; files in $OUT:"
ls -la "$OUT"
rm -rf "$WORK"
sleep 2  # let tee write the last lines of gpu_check.log
