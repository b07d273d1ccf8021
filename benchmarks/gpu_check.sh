#!/usr/bin/env bash
# GPU check, about 5 minutes on one GPU: every reward's images/s at batch 1 vs 32 on full-size random-weight
# architectures in fp32/bf16/fp16 (vs the official per-image path), then the tiny-pipeline trainer (DPO) and
# bench smoke tests on CUDA. Without CUDA it says so and exits 0.
#   benchmarks/gpu_check.sh [OUT_DIR]      (PYTHON=... to pick the interpreter; default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
OUT="${1:-${OUT:-/tmp/prefalign-gpu-check}}"
mkdir -p "$OUT"
export PREFALIGN_NO_PROGRESS=1

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible; skipping the CUDA parts (reward throughput, trainer and bench smoke tests)"
    exit 0
fi
"$PY" -c "import torch; print('gpu_check:', torch.cuda.get_device_name(), 'torch', torch.__version__)"

echo "== reward throughput (full-size, random weights) -> $OUT/rewards.json"
timeout 240 "$PY" benchmarks/gpu_check.py --out "$OUT/rewards.json"

echo "== smoke: tiny pipelines, preference pairs"
"$PY" - "$OUT" <<'PYEOF'
import sys
from pathlib import Path
from prefalign.diffusion.tiny import save_tiny_pipeline
from prefalign.shapes.labels import make_preference_dataset
out = Path(sys.argv[1])
save_tiny_pipeline(out / "tiny-pixel", "pixel")
save_tiny_pipeline(out / "tiny-sd", "sd", sample_size=16)
make_preference_dataset(out / "pairs", 24, seed=3)
(out / "prompts.txt").write_text("a red circle\na blue square\n")
PYEOF

echo "== smoke: align --method dpo on CUDA"
rm -rf "$OUT/dpo"
timeout 120 "$PY" -m prefalign.cli align --method dpo --device cuda --out "$OUT/dpo" \
    model="$OUT/tiny-pixel" data.source="$OUT/pairs/train.parquet" train.steps=2 train.batch_size=2 eval.every=0

echo "== smoke: bench on CUDA (tiny SD, HPS v2.1 on its tiny fixture, shapes-oracle)"
rm -rf "$OUT/bench"
FIX=tests/fixtures/rewards
timeout 120 "$PY" -m prefalign.cli bench "file:$OUT/prompts.txt" --device cuda --out "$OUT/bench" \
    -g "diffusers:$OUT/tiny-sd?steps=2" -r hpsv2.1 -r shapes-oracle \
    --checkpoint "hpsv2.1=$FIX/openclip_tiny.safetensors" --option "hpsv2.1.model_config=$FIX/openclip_tiny.json"
echo "gpu_check: done; numbers in $OUT/rewards.json"
