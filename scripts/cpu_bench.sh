#!/usr/bin/env bash
# The recorded CPU run of chapter 12 (fec_core/results/cpu_bench.*): fec_small, batch 8,
# 224x224, float32, inference and a training step, two threads, each implementation in a
# process of its own (the official code, our literal, fast and compiled paths, and timm's
# deit_tiny and poolformer_s12 as yardsticks), in ROUNDS rounds (default 3: every
# implementation once per round, in turn, so that a machine that slows down for a while
# slows all of them), then one merged report: per row, the median of the rounds' medians.
#   bash scripts/cpu_bench.sh OFFICIAL_FEC_PY [OUT_DIR]
# OFFICIAL_FEC_PY: a copy of models/fec.py of github guikunchen/FEC (needs einops).
set -euo pipefail
official=${1:?usage: bash scripts/cpu_bench.sh OFFICIAL_FEC_PY [OUT_DIR]}
out=${2:-cpu_bench_out}
py=${PYTHON:-python}
rounds=${ROUNDS:-3}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}  # waiting threads sleep (chapter 12)
common=(--model fec_small --device cpu --batch-sizes 8 --resolutions 224 --modes infer train
        --threads 2 --quiet --no-plot)
mkdir -p "$out"
reports=()
for round in $(seq 1 "$rounds"); do
  dir="$out/round$round"
  "$py" -m fec_core.bench "${common[@]}" --paths official --official "$official" --out-dir "$dir/official"
  for path in literal fast compiled; do
    "$py" -m fec_core.bench "${common[@]}" --paths "$path" --out-dir "$dir/$path"
  done
  "$py" -m fec_core.bench "${common[@]}" --paths --compare deit_tiny_patch16_224 poolformer_s12 \
    --out-dir "$dir/yardsticks"
  reports+=("$dir"/{official,literal,fast,compiled,yardsticks}/bench.json)
done
"$py" -m fec_core.bench --merge "${reports[@]}" --out-dir "$out"
