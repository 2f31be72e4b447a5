#!/usr/bin/env bash
# The watermark-stealing study of docs/stealing.md on one model, one core: the attacker's corpora, then the
# text-only spoofing curve (N = 250, 1000, 4000; delta_att 8) of every design, appended to one report.
#   scripts/stealing_study.sh MODEL [POINT ...]      (default: the designs below; any point of conf/tradeoff)
# A design is a trade-off point, so the study's rows and the routing study's points share their names.
# Corpora continue where a stopped run ended (scripts/stealing_corpora.py); a rerun of a design replaces its
# report rows (--append keeps the others). Wall time per corpus and per row is logged; the total is printed.
# Environment: CORPORA (default outputs/stealing/corpora), OUT (outputs/stealing/results/MODEL), COUNTS.
set -euo pipefail
model=${1:?usage: scripts/stealing_study.sh MODEL [POINT ...]}
shift
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
corpora=${CORPORA:-outputs/stealing/corpora}
out=${OUT:-outputs/stealing/results/$model}
counts=${COUNTS:-250,1000,4000}
points=("$@")
[ ${#points[@]} -gt 0 ] || points=(tournament_m20_b8_ctx2 tournament_m20_b8_ctx2_twin tournament_m20_b8_ctx2_r10 tournament_m20_b8_ctx2_common16k
  synthid_n2_k20 synthid_n3_k20 synthid_n4_k20 synthid_k20 kgw_g025_d2 kgw_g025_d2_h4 kgw_g025_d2_self4)
for p in "${points[@]}"; do
  [ -f "conf/tradeoff/$p.yaml" ] || { echo "unknown design '$p': allowed values are the points of conf/tradeoff" >&2; exit 2; }
done
largest=${counts##*,}
start=$(date +%s)
python scripts/stealing_corpora.py --model "$model" --name plain --count "$largest" --out "$corpora"
for p in "${points[@]}"; do
  python scripts/stealing_corpora.py --model "$model" --point "$p" --count "$largest" --out "$corpora"
  python -m moewm.evaluation.stealing --model "$model" --corpora "$corpora" --schemes "$p" --counts "$counts" \
    --attackers text_only --deltas 8 --scrub-count 0 --threads 1 --append --out "$out"
done
echo "stealing study, $model: ${points[*]} in $(( $(date +%s) - start )) s"
