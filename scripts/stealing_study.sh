#!/usr/bin/env bash
# The watermark-stealing study of docs/stealing.md on one model, one core: the attacker's corpora, then the
# text-only spoofing curve (N = 250, 1000, 4000; delta_att 8) of every scheme, appended to one report.
#   scripts/stealing_study.sh MODEL [SCHEME ...]      (default: every scheme below)
# Corpora continue where a stopped run ended (scripts/stealing_corpora.py); a rerun of a scheme replaces its
# report rows (--append keeps the others). Wall time per corpus and per row is logged; the total is printed.
set -euo pipefail
model=${1:?usage: scripts/stealing_study.sh MODEL [SCHEME ...]}
shift
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
corpora=${CORPORA:-outputs/stealing/corpora}
out=${OUT:-outputs/stealing/results/$model}
declare -A spec=(
  [shipped]='{}'
  [twin]='{"tournament": {"routing_layers": 0}}'
  [r10]='{"tournament": {"routing_layers": 10}}'
  [synthid_n2]='{"kind": "synthid", "synthid": {"ngram_len": 2}}'
  [synthid_n3]='{"kind": "synthid", "synthid": {"ngram_len": 3}}'
  [synthid_n4]='{"kind": "synthid", "synthid": {"ngram_len": 4}}'
  [synthid_n5]='{"kind": "synthid", "synthid": {"ngram_len": 5}}'
  [kgw_h1]='{"kind": "kgw", "kgw": {"seeding_scheme": "lefthash", "context_width": 1}}'
  [kgw_h4]='{"kind": "kgw", "kgw": {"seeding_scheme": "lefthash", "context_width": 4}}'
  [kgw_self4]='{"kind": "kgw", "kgw": {"seeding_scheme": "selfhash", "context_width": 4}}'
)
schemes=("$@")
[ ${#schemes[@]} -gt 0 ] || schemes=(shipped twin r10 synthid_n2 synthid_n3 synthid_n4 synthid_n5 kgw_h1 kgw_h4 kgw_self4)
for s in "${schemes[@]}"; do
  [ -n "${spec[$s]+x}" ] || { echo "unknown scheme '$s': allowed ${!spec[*]}" >&2; exit 2; }
done
start=$(date +%s)
python scripts/stealing_corpora.py --model "$model" --name plain --count 4000 --out "$corpora"
for s in "${schemes[@]}"; do
  python scripts/stealing_corpora.py --model "$model" --name "$s" --watermark "${spec[$s]}" --count 4000 --out "$corpora"
  python -m moewm.evaluation.stealing --model "$model" --corpora "$corpora" --schemes "$s" --counts 250,1000,4000 \
    --attackers text_only --deltas 8 --scrub-count 0 --threads 1 --append --out "$out"
done
echo "stealing study, $model: ${schemes[*]} in $(( $(date +%s) - start )) s"
