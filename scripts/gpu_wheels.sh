#!/usr/bin/env bash
# The Python packages moewm needs that the GPU machine's image lacks (hydra-core, omegaconf, wandb, submitit, the
# hydra launchers) and every one of their own requirements that the image lacks or holds too old, as wheels in
# .whl/ (git-ignored through .git/info/exclude): the GPU machine has no network, so they travel with the working
# tree and scripts/gpu_check.sh installs them from there (--no-index --no-deps).
#
# Versions are the ones this project's tests pass with. The list is the requirements' closure, read from each
# wheel's Requires-Dist (`unzip -p .whl/NAME-*.whl '*/METADATA' | grep ^Requires-Dist`, extras skipped), less what
# the image holds (its package list: /work/.library/device/KINDS.md); typing-extensions and protobuf come along
# because pydantic and googleapis-common-protos need newer ones than an image may hold.
# Usage: scripts/gpu_wheels.sh   (from anywhere; writes <repo>/.whl). Exit status 0 when every wheel is there.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
EXCLUDE="$(git rev-parse --git-path info/exclude)"
grep -qx '/.whl/' "$EXCLUDE" 2>/dev/null || echo '/.whl/' >> "$EXCLUDE"
mkdir -p .whl

WHEELS=(
  # hydra and omegaconf
  hydra-core==1.3.8 omegaconf==2.3.1 hydra-submitit-launcher==1.2.0 hydra-joblib-launcher==1.2.0 submitit==1.5.4
  # wandb 0.31 and what it requires
  wandb==0.31.0 cwevals==0.0.1b1 distro==1.9.0 sniffio==1.3.1 platformdirs==4.14.9
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
  opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2 opentelemetry-proto==1.45.2
  opentelemetry-exporter-otlp-proto-http==1.45.2 opentelemetry-exporter-otlp-proto-common==1.45.2
  opentelemetry-exporter-http-transport==0.66b2 opentelemetry-exporter-otlp-common==0.66b2
  googleapis-common-protos==1.76.0 protobuf==7.36.2
)
# The exact command of the device notes (Python 3.12, manylinux x86-64), one package at a time so that a miss names it.
for spec in "${WHEELS[@]}"; do
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$spec"
done
# antlr4-python3-runtime 4.9.3 (omegaconf's parser, pinned by hydra-core and omegaconf) is published as source only:
# it is pure Python, so the wheel built here is the one pip would build there.
ls .whl/antlr4_python3_runtime-4.9.3-*.whl >/dev/null 2>&1 || "$PYTHON" -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3

count=$(ls .whl/*.whl | wc -l)
echo "gpu_wheels: $count wheels in $ROOT/.whl ($(du -sh .whl | cut -f1)); name .whl in the device call's carry"
