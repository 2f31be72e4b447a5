#!/usr/bin/env bash
# Key validity over many keys (python -m moewm.evaluation.key_validity) for the designs whose 10-key gate disagreed:
# the shipped design, its routing-free twin, routing only where common, SynthID ngram_len 3 and 4. A routing design:
# its 1,000 public keys, each ranked among the other 999; SynthID: 100 keys, each its own exact test. The 3,061
# human texts of the five corpora (shipped and held out). One torch thread a job.
#   [MODELS="tiny_olmoe"] scripts/key_validity.sh [OUT_DIR] [NAME ...]   (default outputs/key_validity; NAME: only those;
#   MODELS: the models of the routing designs, default both)
# Writes OUT_DIR/<name>_<model>/key_validity.{json,md}; a study already written is skipped. The twin and SynthID read
# the tokens alone, so they run on tiny_moe only (tiny_olmoe shares its tokenizer: the same statistics).
set -euo pipefail
out=${1:-outputs/key_validity}
shift || true
mkdir -p "$out"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
wanted=" $* "
study() {  # name model watermark-json [more arguments]
  [[ "$wanted" == "  " || "$wanted" == *" $1 "* ]] || return 0
  [[ -f "$out/$1_$2/key_validity.json" ]] && { echo "$1 $2: done before ($out/$1_$2)"; return 0; }
  local start=$(date +%s)
  python -m moewm.evaluation.key_validity --model "$2" --watermark "$3" "${@:4}" --out "$out/$1_$2" > "$out/$1_$2.log" 2>&1
  echo "$1 $2: $(( $(date +%s) - start )) s"
}
models=${MODELS:-tiny_moe tiny_olmoe}
study twin tiny_moe '{"tournament": {"routing_layers": 0}}'
study synthid_n3 tiny_moe '{"kind": "synthid", "synthid": {"ngram_len": 3}}' --keys 100
study synthid_n4 tiny_moe '{"kind": "synthid", "synthid": {"ngram_len": 4}}' --keys 100
for model in $models; do
  study shipped "$model" '{}'
  study common16k "$model" '{"tournament": {"routed_contexts": 16384}}'
done
