#!/usr/bin/env bash
# The recorded CPU run of chapter 12 (fec_core/results/cpu_bench.*): fec_small, batch 8,
# 224x224, float32, inference and a training step, two threads, each implementation in a
# process of its own (the official code, our literal, fast and compiled paths, and timm's
# deit_tiny and poolformer_s12 as yardsticks), then one merged report.
#   bash scripts/cpu_bench.sh OFFICIAL_FEC_PY [OUT_DIR]
# OFFICIAL_FEC_PY: a copy of models/fec.py of github guikunchen/FEC (needs einops).
set -euo pipefail
official=${1:?usage: bash scripts/cpu_bench.sh OFFICIAL_FEC_PY [OUT_DIR]}
out=${2:-cpu_bench_out}
py=${PYTHON:-python}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}  # waiting threads sleep (chapter 12)
common=(--model fec_small --device cpu --batch-sizes 8 --resolutions 224 --modes infer train
        --threads 2 --quiet --no-plot)
mkdir -p "$out"
"$py" -m fec_core.bench "${common[@]}" --paths official --official "$official" --out-dir "$out/official"
for path in literal fast compiled; do
  "$py" -m fec_core.bench "${common[@]}" --paths "$path" --out-dir "$out/$path"
done
"$py" -m fec_core.bench "${common[@]}" --paths --compare deit_tiny_patch16_224 poolformer_s12 \
  --out-dir "$out/yardsticks"
"$py" -m fec_core.bench --merge "$out"/{official,literal,fast,compiled,yardsticks}/bench.json \
  --out-dir "$out"
