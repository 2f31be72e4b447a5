#!/usr/bin/env bash
# The benchmark's `schemes` section (every scheme of the registry: generation against plain sampling, detection
# against one full-logits forward) on the four CPU models of BENCHMARKS.md, one torch thread:
# tiny_moe, tiny_olmoe, and full-width Qwen1.5-MoE and OLMoE with random weights shrunk to one layer.
#   scripts/bench_schemes.sh [OUT_DIR]          (default benchmarks/; JSON and Markdown per model, wall time printed)
set -euo pipefail
out=${1:-benchmarks}
mkdir -p "$out"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
start=$(date +%s)
bench() {  # name, then the model options
  local name=$1; shift
  python -m moewm.bench "$@" --threads 1 --sections schemes --repeats 3 --out "$out/schemes_$name.json" --markdown "$out/schemes_$name.md"
}
bench tiny_moe
bench tiny_olmoe --model-config conf/model/tiny_olmoe.yaml
bench qwen_moe_1layer --model-config conf/model/qwen_moe.yaml --random-init --dtype float32 --device cpu --set architecture.num_hidden_layers=1 --pools random
bench olmoe_1layer --model-config conf/model/olmoe.yaml --random-init --dtype float32 --device cpu --set architecture.num_hidden_layers=1 --pools random
echo "schemes benchmark: 4 models in $(( $(date +%s) - start )) s; results in $out/schemes_*.json"
