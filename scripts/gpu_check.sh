#!/usr/bin/env bash
# GPU check in one command, for a machine with one CUDA GPU and no network (about 5 minutes on an H100):
#   1. the GPU-marked tests (pytest -m gpu), 2. scripts/gpu_check.py: tiny_moe and Qwen1.5-MoE-A2.7B at
#   full size with random weights, bf16 and NF4: tokens/s plain vs watermarked, detection tokens/s, peak
#   CUDA memory, estimator vs measured weights, signature flip rate bf16 -> NF4, 3. python -m moewm.bench
#   on the GPU for tiny_moe (every section) and full-size random-init Qwen1.5-MoE in bf16 (generation,
#   detection, calibrated detection at R=999 with half the texts watermarked -- its 1.2x target --,
#   memory, and the schemes section: every registered scheme's sampling against plain sampling and its detection
#   against one forward, the shipped tournament's 1.03x and 1.2x targets), then the schemes section on tiny_olmoe
#   and full-size random-init OLMoE: the GPU tables of BENCHMARKS.md (bench_*.json / bench_*.md).
# The GPU image lacks hydra-core, omegaconf, wandb and submitit: run scripts/gpu_wheels.sh here first (it fills .whl/)
# and name .whl in the device call's carry; this script installs them into /tmp/site when .whl/ is there.
# Usage: scripts/gpu_check.sh [OUTPUT_DIR]   (default: $OUT, else ./gpu_check_out). Exit status: 0 when all pass.
# GPU_CHECK_STEPS (default "tests check bench") picks steps, e.g. GPU_CHECK_STEPS=bench to rerun only the
# benchmark within one 10-minute call.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUTDIR="${1:-${OUT:-$ROOT/gpu_check_out}}"
PYTHON="${PYTHON:-python}"
mkdir -p "$OUTDIR"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true TOKENIZERS_PARALLELISM=false
cd "$ROOT"
if compgen -G "$ROOT/.whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site \
    || { echo "gpu_check: installing the wheels of .whl/ failed" >&2; exit 2; }
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

"$PYTHON" - <<'PY' || { echo "gpu_check: no CUDA device visible to torch" >&2; exit 2; }
import torch, sys
sys.exit(0 if torch.cuda.is_available() else 1)
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUTDIR/nvidia_smi.csv" 2>&1 || true

STEPS="${GPU_CHECK_STEPS:-tests check bench}"
has_step() { [[ " $STEPS " == *" $1 "* ]]; }
status=0
start=$(date +%s)
pytest_rc=skipped; check_rc=skipped; bench_rc=skipped
if has_step tests; then
  timeout 200 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider --junitxml="$OUTDIR/pytest_gpu.xml" 2>&1 | tee "$OUTDIR/pytest_gpu.txt"
  pytest_rc=${PIPESTATUS[0]}
  [ "$pytest_rc" -eq 0 ] || status=1
fi
if has_step check; then
  timeout 270 "$PYTHON" scripts/gpu_check.py --out "$OUTDIR/gpu_check.json" 2>&1 | tee "$OUTDIR/gpu_check.log"
  check_rc=${PIPESTATUS[0]}
  [ "$check_rc" -eq 0 ] || status=1
fi
if has_step bench; then
  bench_rc=0
  timeout 300 "$PYTHON" -m moewm.bench --device cuda --out "$OUTDIR/bench_tiny_moe.json" \
    --markdown "$OUTDIR/bench_tiny_moe.md" 2>&1 | tee "$OUTDIR/bench_tiny_moe.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || bench_rc=1
  timeout 300 "$PYTHON" -m moewm.bench --model-config conf/model/qwen_moe.yaml --random-init --dtype bfloat16 \
    --device cuda --sections generation,detection,calibrated,schemes,memory --cal-reference-keys 249,999 --cal-texts-grid 32 \
    --repeats 3 --out "$OUTDIR/bench_qwen_moe.json" \
    --markdown "$OUTDIR/bench_qwen_moe.md" 2>&1 | tee "$OUTDIR/bench_qwen_moe.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || bench_rc=1
  for spec in "tiny_olmoe:--model-config conf/model/tiny_olmoe.yaml" "olmoe:--model-config conf/model/olmoe.yaml --random-init --dtype bfloat16"; do
    name="${spec%%:*}"
    # shellcheck disable=SC2086
    timeout 240 "$PYTHON" -m moewm.bench ${spec#*:} --device cuda --sections schemes --repeats 3 --out "$OUTDIR/bench_$name.json" \
      --markdown "$OUTDIR/bench_$name.md" 2>&1 | tee "$OUTDIR/bench_$name.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || bench_rc=1
  done
  [ "$bench_rc" -eq 0 ] || status=1
fi
echo "gpu_check: steps [$STEPS]: pytest rc=$pytest_rc, gpu_check.py rc=$check_rc, bench rc=$bench_rc, $(( $(date +%s) - start )) s; results in $OUTDIR"
exit $status
