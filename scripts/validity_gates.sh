#!/usr/bin/env bash
# The per-key gate (python -m moewm.evaluation.validity) for every design of the routing study and the design search,
# one torch thread, one design after another: 3,317 unwatermarked texts of nine origins, 10 deployed keys ranked among
# the same 999 reference keys (scored once for all keys), the calibrated detector only (--no-model-null).
#   scripts/validity_gates.sh [OUT_DIR] [NAME ...]      (default outputs/validity_gates; NAME: only those gates)
# Writes OUT_DIR/<name>_<model>/validity.{json,md} and prints each gate's wall time; a gate already written is skipped.
# scripts/routing_goal.py reads them (--validity MODEL:POINT=OUT_DIR/<name>_<model>/validity.json).
set -euo pipefail
out=${1:-outputs/validity_gates}
shift || true
mkdir -p "$out"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
wanted=" $* "
gate() {  # name model watermark-json extractor-json encoder-json
  [[ "$wanted" == "  " || "$wanted" == *" $1 "* ]] || return 0
  [[ -f "$out/$1_$2/validity.json" ]] && { echo "$1 $2: done before ($out/$1_$2)"; return 0; }
  local start=$(date +%s)
  python -m moewm.evaluation.validity --model "$2" --prompts 64 --baseline-keys 0 --no-model-null \
    --watermark "$3" --extractor "$4" --encoder "$5" --out "$out/$1_$2" > "$out/$1_$2.log" 2>&1
  echo "$1 $2: $(( $(date +%s) - start )) s"
}
for model in tiny_moe tiny_olmoe; do
  gate shipped "$model" '{}' '{}' '{}'
  gate twin "$model" '{"tournament": {"routing_layers": 0}}' '{}' '{}'
  gate r10 "$model" '{"tournament": {"routing_layers": 10}}' '{}' '{}'
  gate b4 "$model" '{"tournament": {"block_bits": 4}}' '{}' '{}'
  gate synthid_n4 "$model" '{"kind": "synthid", "synthid": {"ngram_len": 4}}' '{}' '{}'
  gate synthid_n3 "$model" '{"kind": "synthid", "synthid": {"ngram_len": 3}}' '{}' '{}'
  gate common16k "$model" '{"tournament": {"routed_contexts": 16384}}' '{}' '{}'
  gate lsh_rpart_ctx "$model" '{"kind": "moe_lsh"}' '{}' '{"pools": "random_partition", "green_lists": "hashed", "context_tokens": 1}'
  gate lsh_rpart_ctx_twin "$model" '{"kind": "moe_lsh"}' '{}' \
    '{"pools": "random_partition", "green_lists": "hashed", "context_tokens": 1, "routing_free": true}'
done
gate b2 tiny_moe '{"tournament": {"block_bits": 2}}' '{}' '{}'
gate b1 tiny_moe '{"tournament": {"block_bits": 1}}' '{}' '{}'
gate top1 tiny_moe '{}' '{"use_top_k": true, "k": 1}' '{}'
gate r4 tiny_moe '{"tournament": {"routing_layers": 4}}' '{}' '{}'
