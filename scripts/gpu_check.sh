#!/usr/bin/env bash
# GPU check in one command, for a machine with one CUDA GPU and no network (about 5 minutes on an H100):
#   1. the GPU-marked tests (pytest -m gpu), 2. scripts/gpu_check.py: tiny_moe and Qwen1.5-MoE-A2.7B at
#   full size with random weights, bf16 and NF4: tokens/s plain vs watermarked, detection tokens/s, peak
#   CUDA memory, estimator vs measured weights, signature flip rate bf16 -> NF4.
# Usage: scripts/gpu_check.sh [OUTPUT_DIR]   (default: $OUT, else ./gpu_check_out). Exit status: 0 when both pass.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUTDIR="${1:-${OUT:-$ROOT/gpu_check_out}}"
PYTHON="${PYTHON:-python}"
mkdir -p "$OUTDIR"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"

"$PYTHON" - <<'PY' || { echo "gpu_check: no CUDA device visible to torch" >&2; exit 2; }
import torch, sys
sys.exit(0 if torch.cuda.is_available() else 1)
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUTDIR/nvidia_smi.csv" 2>&1 || true

status=0
start=$(date +%s)
timeout 200 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider --junitxml="$OUTDIR/pytest_gpu.xml" 2>&1 | tee "$OUTDIR/pytest_gpu.txt"
pytest_rc=${PIPESTATUS[0]}
[ "$pytest_rc" -eq 0 ] || status=1
timeout 270 "$PYTHON" scripts/gpu_check.py --out "$OUTDIR/gpu_check.json" 2>&1 | tee "$OUTDIR/gpu_check.log"
bench_rc=${PIPESTATUS[0]}
[ "$bench_rc" -eq 0 ] || status=1
echo "gpu_check: pytest rc=$pytest_rc, benchmark rc=$bench_rc, $(( $(date +%s) - start )) s; results in $OUTDIR"
exit $status
