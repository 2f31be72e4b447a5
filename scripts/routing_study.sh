#!/usr/bin/env bash
# The routing watermark's headline study on both embedded models at once (conf/experiment/routing_study.yaml):
# tiny_moe judged by tiny_olmoe and tiny_olmoe judged by tiny_moe, one torch thread each, so 2 cores run both.
#   scripts/routing_study.sh [OUT_DIR] [extra hydra overrides...]
# Each sweep writes its tradeoff.md / tradeoff.csv / Pareto plots under OUT_DIR/<model>; the wall time is printed.
set -euo pipefail
out=${1:-outputs/routing_study/$(date +%Y-%m-%d_%H-%M-%S)}
shift || true
mkdir -p "$out"
start=$(date +%s)
run() {  # model judge
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python -m moewm -m experiment=routing_study model="$1" eval.oracle_model="$2" \
    progress=false logger=none hydra.sweep.dir="$out/$1" "${@:3}" > "$out/$1.log" 2>&1
}
run tiny_moe tiny_olmoe "$@" &
first=$!
run tiny_olmoe tiny_moe "$@" &
second=$!
status=0
wait $first || { echo "tiny_moe sweep failed: see $out/tiny_moe.log" >&2; status=1; }
wait $second || { echo "tiny_olmoe sweep failed: see $out/tiny_olmoe.log" >&2; status=1; }
echo "routing study: both models in $(( $(date +%s) - start )) s; reports: $out/tiny_moe/tradeoff.md, $out/tiny_olmoe/tradeoff.md"
exit $status
