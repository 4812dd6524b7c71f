#!/usr/bin/env bash
# The CUDA check of issues 16 and 24 in one command: versions, the CUDA tests, the benchmark
# against the official code in the same run (eager PyTorch, the Triton kernels, and both
# under torch.compile; timm's poolformer_s12 and deit_tiny as yardsticks), a summary of
# the targets. Everything lands under $OUT:
#   gpu_check.log   all output          gpu_tests.log   pytest tests/test_gpu.py
#   gpu_bench.json  merged benchmark    gpu_bench.md    its table      gpu_bench.png  plot
#   gpu_profile.txt top operators of one step per path (fec_small inference and training)
#   gpu_targets.txt the targets of issue 24, each with its number and its ratio to the
#                   official code measured in the same run
#
# Usage (repository root):
#   bash scripts/gpu_check.sh               on the GPU machine (about 5.5 minutes: the parts
#                                           run in the order below until the budget is spent)
#   bash scripts/gpu_check.sh --dry-run     on a CPU: the same steps at tiny sizes, tests on
#                                           the CPU with Triton's interpreter (catches typos)
# Environment: OUT (default /tmp/gpu_check_out), PYTHON (default python3),
#   GPU_CHECK_BUDGET seconds for the whole script (default 330, so that one device call of
#   about 6 minutes leaves room for a second; each part also has its own limit, and a part
#   that would start with under 20 s left is skipped: the log says which),
#   GPU_CHECK_PARTS the parts to run (default all, in this order), e.g. "small_compiled_train
#   large_train tests_compiled" for a second call that finishes what a first one skipped
#   (merge the two bench.json files with python -m fec_core.bench --merge),
#   GPU_CHECK_SKIP_TESTS=1 to leave out both test parts.
# Parts, in order: tests (CUDA tests without the compiled ones), small_infer, small_train,
#   small_compiled_infer, large_infer, small_dense, small_dense_4096, small_compiled_train,
#   large_train, tests_compiled. Give the device call a time limit of GPU_CHECK_BUDGET + 60 s
#   (start-up, the last merge and the summary of the targets come after the budget).
# Needs .gpu/ (ignored by git, carried to the GPU machine): official_fec.py (a verbatim
# copy of github guikunchen/FEC models/fec.py; torch_scatter is replaced at load time by
# fec_core.bench.load_official) and wheels/ (timm, einops: installed only if missing).
set -u
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-/tmp/gpu_check_out}
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-330}
ALL_PARTS="tests small_infer small_train small_compiled_infer large_infer small_dense small_dense_4096 \
small_compiled_train large_train tests_compiled"
PARTS=${GPU_CHECK_PARTS:-$ALL_PARTS}
START=$(date +%s)
DEADLINE=$((START + BUDGET))
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

say() { echo "[gpu_check $(($(date +%s) - START))s] $*"; }
for p in $PARTS; do
    case " $ALL_PARTS " in *" $p "*) ;; *) say "unknown part '$p' in GPU_CHECK_PARTS; parts: $ALL_PARTS"; exit 2;; esac
done
wanted() { case " $PARTS " in *" $1 "*) return 0;; *) return 1;; esac; }

# run_part NAME LIMIT_SECONDS COMMAND...: run under `timeout`, never past the deadline
run_part() {
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE - $(date +%s)))
    if [ "$left" -lt 20 ]; then
        say "SKIP $name: only ${left}s of the budget left"
        return 124
    fi
    [ "$limit" -gt $((left - 10)) ] && limit=$((left - 10))  # 10 s to merge what it measured
    say "START $name (limit ${limit}s)"
    timeout -k 10 "$limit" "$@"
    local rc=$?
    say "END $name: exit $rc$([ $rc -eq 124 ] && echo ' (TIMED OUT)')"
    return $rc
}

# ---------------------------------------------------------------- 0. packages
say "python: $(command -v "$PY"); parts: $PARTS; budget ${BUDGET}s"
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
print("fec_core", fec_core.__version__, fec_core.__file__, "| Triton kernels:", k.HAS_TRITON, "mode", k.mode())
EOF

# ---------------------------------------------------------------- 2. CUDA tests
if [ $DRY -eq 0 ]; then
    TEST_ENV=()
else  # the same tests on the CPU, the kernels in Triton's interpreter
    TEST_ENV=(env FEC_TEST_DEVICE=cpu TRITON_INTERPRET=1 FEC_KERNELS=on)
fi
PYTEST=("$PY" -m pytest -p no:cacheprovider -q -rs --timeout=120 --durations=8 -o addopts="" tests/test_gpu.py)
run_tests() {  # run_tests NAME LIMIT -k EXPRESSION
    if [ "${GPU_CHECK_SKIP_TESTS:-0}" = 1 ]; then
        say "SKIP $1 (GPU_CHECK_SKIP_TESTS=1)"
        return 0
    fi
    run_part "$1" "$2" ${TEST_ENV[@]+"${TEST_ENV[@]}"} "${PYTEST[@]}" "$3" "$4" 2>&1 | tee -a "$OUT/gpu_tests.log"
}
# the kernels, layers and model first; the compiled tests (inductor compiles: slow) last
wanted tests && run_tests "CUDA tests" 100 -k "not compiled"

# ---------------------------------------------------------------- 3. benchmark
OFFICIAL=()
if [ -f .gpu/official_fec.py ]; then
    OFFICIAL=(--official .gpu/official_fec.py)
    REF=(official)
else
    say "WARNING: .gpu/official_fec.py is missing: no official code in the benchmark"
    REF=()
fi
YARDSTICKS=(--compare poolformer_s12 deit_tiny_patch16_224)
if [ $DRY -eq 0 ]; then
    DEV=cuda; B_INF=256; B_TRAIN=128; RES=224; DENSE_RES=(512 1024 2048); BIG_RES=4096
    IT=(--iters 5 --warmup 2); IT_BIG=(--iters 2 --warmup 1)
else
    DEV=cpu; B_INF=2; B_TRAIN=2; RES=64; DENSE_RES=(64 128); BIG_RES=256
    IT=(--iters 1 --warmup 0 --threads 1); IT_BIG=("${IT[@]}"); YARDSTICKS=(--compare resnet18)
fi
BENCH=("$PY" -m fec_core.bench --device "$DEV" --quiet --no-plot)
EAGER=(${REF[@]+"${REF[@]}"} fast kernel)  # eager: PyTorch ops only, and with the Triton kernels
COMPILED=(${REF[@]+"${REF[@]}"} compiled compiled_kernel)

merge() {  # join what has been measured so far into $OUT (so a timeout loses nothing)
    local files=("$WORK"/parts/*/bench.json)
    [ -f "${files[0]}" ] || return 0
    "$PY" -m fec_core.bench --merge "${files[@]}" --out-dir "$WORK/merged" --no-plot > "$WORK/merge.log" 2>&1 \
        || { cat "$WORK/merge.log"; return 1; }
    "$PY" - "$WORK/merged" "$BUDGET" "$PARTS" <<'EOF'
import json, os, sys  # the one command that made the run; each part's own is under meta.runs
from fec_core.bench import to_markdown
out, budget, parts = sys.argv[1:]
rep = json.load(open(os.path.join(out, "bench.json")))
rep["meta"]["command"] = (f"GPU_CHECK_BUDGET={budget} GPU_CHECK_PARTS='{parts}' bash scripts/gpu_check.sh "
                          "(one call on the device machine; each part's own command is under runs)")
json.dump(rep, open(os.path.join(out, "bench.json"), "w"), indent=1)
open(os.path.join(out, "bench.md"), "w").write(to_markdown(rep))
EOF
    cp "$WORK/merged/bench.json" "$OUT/gpu_bench.json"
    cp "$WORK/merged/bench.md" "$OUT/gpu_bench.md"
    cat "$WORK"/parts/*/profile.txt > "$OUT/gpu_profile.txt" 2>/dev/null || rm -f "$OUT/gpu_profile.txt"
    return 0
}

# bench_part ID NAME LIMIT ARGS...: one process of the benchmark, then merge
bench_part() {
    local id=$1 name=$2 limit=$3
    shift 3
    wanted "$id" || return 0
    run_part "$name" "$limit" "${BENCH[@]}" "$@" --out-dir "$WORK/parts/$id"
    merge
}

bench_part small_infer "fec_small inference b$B_INF fp32+bf16" 60 --model fec_small ${OFFICIAL[@]+"${OFFICIAL[@]}"} \
    "${IT[@]}" --paths "${EAGER[@]}" "${YARDSTICKS[@]}" --modes infer --dtypes fp32 bf16 --batch-sizes $B_INF \
    --resolutions $RES --profile
bench_part small_train "fec_small training b$B_TRAIN bf16" 60 --model fec_small ${OFFICIAL[@]+"${OFFICIAL[@]}"} \
    "${IT[@]}" --paths "${EAGER[@]}" "${YARDSTICKS[@]}" --modes train --dtypes bf16 --batch-sizes $B_TRAIN \
    --resolutions $RES --profile
bench_part small_compiled_infer "fec_small compiled inference b$B_INF bf16" 120 --model fec_small \
    ${OFFICIAL[@]+"${OFFICIAL[@]}"} "${IT[@]}" --paths "${COMPILED[@]}" --modes infer --dtypes bf16 \
    --batch-sizes $B_INF --resolutions $RES
bench_part large_infer "fec_large inference b$B_INF fp32+bf16" 60 --model fec_large ${OFFICIAL[@]+"${OFFICIAL[@]}"} \
    "${IT[@]}" --paths "${EAGER[@]}" --modes infer --dtypes fp32 bf16 --batch-sizes $B_INF --resolutions $RES
bench_part small_dense "fec_small dense features ${DENSE_RES[*]} b1" 50 --model fec_small \
    ${OFFICIAL[@]+"${OFFICIAL[@]}"} "${IT[@]}" --paths "${EAGER[@]}" --dense --modes infer --dtypes fp32 bf16 \
    --batch-sizes 1 --resolutions "${DENSE_RES[@]}" --max-literal-gib 40
bench_part small_dense_4096 "fec_small dense features ${BIG_RES} b1 bf16" 45 --model fec_small "${IT_BIG[@]}" \
    --paths fast kernel --dense --modes infer --dtypes bf16 --batch-sizes 1 --resolutions $BIG_RES
bench_part small_compiled_train "fec_small compiled training b$B_TRAIN bf16" 180 --model fec_small \
    ${OFFICIAL[@]+"${OFFICIAL[@]}"} "${IT[@]}" --paths "${COMPILED[@]}" --modes train --dtypes bf16 \
    --batch-sizes $B_TRAIN --resolutions $RES
bench_part large_train "fec_large training b$B_TRAIN bf16" 60 --model fec_large ${OFFICIAL[@]+"${OFFICIAL[@]}"} \
    "${IT[@]}" --paths "${EAGER[@]}" --modes train --dtypes bf16 --batch-sizes $B_TRAIN --resolutions $RES
wanted tests_compiled && run_tests "CUDA tests (compiled)" 120 -k "compiled"
# the plot of everything (the parts skip theirs to save time)
if compgen -G "$WORK/parts/*/bench.json" > /dev/null; then
    "$PY" -m fec_core.bench --merge "$WORK"/parts/*/bench.json --out-dir "$WORK/plot" > /dev/null 2>&1 \
        && cp "$WORK/plot/bench.png" "$OUT/gpu_bench.png"
fi

# ---------------------------------------------------------------- 4. targets
[ -f "$OUT/gpu_bench.json" ] && "$PY" - "$OUT/gpu_bench.json" <<'EOF' | tee "$OUT/gpu_targets.txt"
import json, sys
rep = json.load(open(sys.argv[1]))
rows = [r for r in rep["results"] if r["status"] == "ok"]
meta = rep["meta"]
print(f"\n== targets (issue 24) on {meta['device_name']}, torch {meta['torch']}, {meta['date']}")
EAGER, ALL = ("fast", "kernel"), ("fast", "kernel", "compiled", "compiled_kernel")
res = max((r["resolution"] for r in rows if not r.get("dense")), default=224)
bi = max((r["batch"] for r in rows if r["mode"] == "infer" and not r.get("dense")), default=256)
bt = max((r["batch"] for r in rows if r["mode"] == "train"), default=128)


def get(model, mode, dtype, batch, path, resolution=res, dense=False):
    for r in rows:
        if (r.get("model"), r["mode"], r["dtype"], r["batch"], r["resolution"], r["path"], bool(r.get("dense"))) \
                == (model, mode, dtype, batch, resolution, path, dense):
            return r
    return None


def gib(r):
    return float("nan") if r is None or r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / 2 ** 30


def best(model, mode, dtype, batch, paths):
    found = [r for r in (get(model, mode, dtype, batch, p) for p in paths) if r is not None]
    return max(found, key=lambda r: r["throughput"]) if found else None


def vs_official(r, o):
    if r is None or o is None:
        return "official not measured"
    return f"{r['throughput'] / o['throughput']:.2f}x the official code ({o['throughput']:.0f} img/s, {gib(o):.2f} GiB)"


def line(ok, what, value, goal, ratio=""):
    verdict = "n/a " if ok is None else ("MET " if ok else "MISS")
    print(f"{verdict} {what}: {value} (target {goal}){' | ' + ratio if ratio else ''}")


def paths_line(model, mode, dtype, batch):
    yardsticks = dict.fromkeys(r["path"] for r in rows if r["path"].startswith("timm:"))
    got = [(p, get(model, mode, dtype, batch, p)) for p in ("official",) + ALL + tuple(yardsticks)]
    print("     " + ", ".join(f"{p} {r['throughput']:.0f} img/s {gib(r):.2f} GiB" for p, r in got if r is not None))


for dt in ("bf16", "fp32"):  # fec_small inference
    o = get("fec_small", "infer", dt, bi, "official")
    e, f = best("fec_small", "infer", dt, bi, EAGER), best("fec_small", "infer", dt, bi, ALL)
    if f is None:
        print(f"n/a  fec_small inference {dt} b{bi}: not measured")
        continue
    if dt == "bf16":
        line(None if e is None else e["throughput"] >= 8000, f"fec_small inference {dt} b{bi}, eager",
             "not measured" if e is None else f"{e['path']} {e['throughput']:.0f} img/s", ">= 8000",
             vs_official(e, o))
        line(f["throughput"] >= 12000, f"fec_small inference {dt} b{bi}, fastest path",
             f"{f['path']} {f['throughput']:.0f} img/s", ">= 12000 (3.4x official)", vs_official(f, o))
        line(gib(f) <= 1.0, f"fec_small inference {dt} b{bi}, peak memory of the fastest path",
             f"{gib(f):.2f} GiB ({f['path']})", "<= 1 GiB")
    else:
        print(f"     fec_small inference {dt} b{bi}: fastest {f['path']} {f['throughput']:.0f} img/s | "
              f"{vs_official(f, o)}")
    paths_line("fec_small", "infer", dt, bi)
o = get("fec_small", "train", "bf16", bt, "official")
f = best("fec_small", "train", "bf16", bt, ALL)
if f is None:
    print("n/a  fec_small training: not measured")
else:
    line(f["throughput"] >= 3000, f"fec_small training step bf16 b{bt}, fastest path",
         f"{f['path']} {f['throughput']:.0f} img/s", ">= 3000 (2.6x official)", vs_official(f, o))
    line(gib(f) <= 5.0, f"fec_small training step bf16 b{bt}, peak memory of the fastest path",
         f"{gib(f):.2f} GiB ({f['path']})", "<= 5 GiB")
    paths_line("fec_small", "train", "bf16", bt)
for dt in ("bf16", "fp32"):  # fec_large inference
    o = get("fec_large", "infer", dt, bi, "official")
    f = best("fec_large", "infer", dt, bi, ALL)
    if f is None:
        print(f"n/a  fec_large inference {dt}: not measured")
        continue
    line(None if o is None else f["throughput"] >= 3 * o["throughput"],
         f"fec_large inference {dt} b{bi}, fastest path", f"{f['path']} {f['throughput']:.0f} img/s", ">= 3x official",
         vs_official(f, o))
    paths_line("fec_large", "infer", dt, bi)
o, f = get("fec_large", "train", "bf16", bt, "official"), best("fec_large", "train", "bf16", bt, ALL)
if f is not None:
    print(f"     fec_large training bf16 b{bt}: fastest {f['path']} {f['throughput']:.0f} img/s "
          f"{gib(f):.2f} GiB | {vs_official(f, o)}")
dense = [r for r in rows if r.get("dense")]
for dt in ("fp32", "bf16"):
    for p in ("fast", "kernel"):
        pts = sorted((r["resolution"], r) for r in dense if r["dtype"] == dt and r["path"] == p)
        if not pts:
            continue
        desc = ", ".join(f"{s}px {gib(r):.2f} GiB {r['latency_ms']:.0f} ms" for s, r in pts)
        at = dict(pts).get(2048)
        line(None if at is None else gib(at) <= 1.0, f"fec_small dense b1 {dt} {p}: peak memory", desc,
             "<= 1 GiB at 2048 px; 4096 px measured")
        for s, r in pts:
            off = get("fec_small", "infer", dt, 1, "official", resolution=s, dense=True)
            if off is not None:
                print(f"     official at {s}px {dt}: {gib(off):.2f} GiB, {off['latency_ms']:.1f} ms")
bad = [r for r in rep["results"] if r["status"] != "ok" and not r["status"].startswith("skipped")]
for r in bad:
    print(f"NOT OK {r.get('model')} {r['mode']} {r['dtype']} b{r['batch']} {r['resolution']} {r['path']}: {r['status']}")
EOF
say "done; files in $OUT:"
ls -la "$OUT"
rm -rf "$WORK"
sleep 2  # let tee write the last lines of gpu_check.log
