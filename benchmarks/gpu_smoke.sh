#!/usr/bin/env bash
# One self-contained GPU check of the training step (ResNet-50, 224 px, bf16):
#   1. random tensors (the GPU alone), 2. real shards (decode + P x K stream + GPU),
# at several per-GPU batch sizes; images/s/GPU and the Smooth-AP loss's share of the step;
# and the gradient cache at the largest batch. Results: $OUT (or benchmarks/out/) as JSON + log.
#
#   bash benchmarks/gpu_smoke.sh            # needs the project's venv (.venv) with CUDA torch
#
# Figures go to benchmarks/RESULTS.md ("GPU smoke"). Takes ~5 minutes on one H100.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
LOG="$OUT/gpu_smoke.log"
exec > >(tee "$LOG") 2>&1

"$PY" - <<'PYEOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_smoke: no CUDA device visible to torch; run on a GPU machine")
import deepspeed, timm  # noqa: F401  (fail early if the environment is incomplete)
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__,
      "| deepspeed", deepspeed.__version__, "| GPUs", torch.cuda.device_count())
PYEOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

BATCHES=${BATCHES:-64,128,256}
COMMON=(--backbone resnet50 --image-size 224 --precision bf16 --batch-sizes "$BATCHES"
        --steps "${STEPS:-20}" --warmup 5)

echo "== 1/3 random tensors (GPU only)"
"$PY" benchmarks/train_step.py "${COMMON[@]}" --tensors --out "$OUT/gpu_tensors.json"

DATA=${DATA:-$OUT/shards}
if [ ! -f "$DATA/train/index.parquet" ]; then
  echo "== writing synthetic shards at 256 px to $DATA"
  "$PY" -m pipeline.cli make-shards synthetic --out "$DATA" --split train --classes 400 \
    --images-per-class 16 --image-size 256 --workers "$(nproc)" --no-progress
fi
echo "== 2/3 real shards (decode + P x K stream), $(nproc) CPUs"
"$PY" benchmarks/train_step.py "${COMMON[@]}" --data "$DATA" --workers "${WORKERS:-8}" \
  --out "$OUT/gpu_shards.json"

LARGEST=${BATCHES##*,}
echo "== 3/3 gradient cache at $LARGEST per GPU (chunks of 64) vs without"
"$PY" benchmarks/train_step.py --backbone resnet50 --image-size 224 --precision bf16 \
  --batch-sizes "$LARGEST" --chunk 64 --steps 10 --warmup 3 --tensors --out "$OUT/gpu_gradcache.json"
echo "done: $OUT"
