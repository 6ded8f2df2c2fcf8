#!/usr/bin/env bash
# One-shot GPU check (scripts/gpu_check.py): on one H100/H200, in a few minutes, bf16 vs
# fp32 losses, attention backends on packed rows, the stage-2 proxy's step time / tokens/s /
# MFU, its peak memory against the planner, and a profile. Installs nothing: run it from a
# checkout whose environment has the project (make demo / pip install -e .).
#
#   scripts/gpu_check.sh                      # on a GPU machine
#   scripts/gpu_check.sh --cpu-smoke          # the same code on the tiny model, on the CPU
#   scripts/gpu_check.sh model.attn_implementation=flex   # Hydra overrides for every run
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
exec "$PYTHON" scripts/gpu_check.py "$@"
