#!/usr/bin/env bash
# Launch qwenvl-train with torchrun on one node or many. Every argument is a Hydra override.
#
#   one node, all its GPUs:
#     scripts/launch_torchrun.sh stage=pretrain model=qwenvl_7b parallel=zero2
#   N nodes, fixed ranks (run on every node, NODE_RANK = 0..N-1):
#     NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 scripts/launch_torchrun.sh stage=multitask ...
#   N nodes, c10d rendezvous (same command on every node; ranks are assigned):
#     NNODES=4 RDZV_BACKEND=c10d MASTER_ADDR=node0 scripts/launch_torchrun.sh stage=sft ...
#
# Environment (defaults): NNODES (1), NODE_RANK (0), NPROC_PER_NODE (visible GPUs, else 1),
# MASTER_ADDR (none: single-node --standalone), MASTER_PORT (29500), RDZV_BACKEND (static |
# c10d), RDZV_ID (qwenvl), PYTHON (the interpreter next to `torchrun`, else .venv's, else
# python3), TORCHRUN (another torchrun command: then its own failure report is shown),
# TORCHRUN_ARGS (extra torchrun flags), DRY_RUN=1 prints the command instead of running it.
#
# torchrun runs as `python -m qwenvl_train.cli.launch`: the same torchrun, which reports a
# failed worker in one line instead of its ChildFailedError traceback. Its workers live in
# sessions of their own; each asks the kernel for SIGTERM when torchrun dies, so killing
# this launcher's process group (even with SIGKILL) stops them too (they save and exit).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

visible_gpus() {
    local n=0
    if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
        IFS=',' read -r -a ids <<< "$CUDA_VISIBLE_DEVICES"
        n="${#ids[@]}"
    elif command -v nvidia-smi > /dev/null 2>&1; then
        n="$(nvidia-smi -L 2> /dev/null | grep -c '^GPU' || true)"
    fi
    echo "$n"
}

NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-}"
MASTER_PORT="${MASTER_PORT:-29500}"
RDZV_BACKEND="${RDZV_BACKEND:-static}"
RDZV_ID="${RDZV_ID:-qwenvl}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE="$(visible_gpus)"
    [[ "$NPROC_PER_NODE" -gt 0 ]] || NPROC_PER_NODE=1  # CPU: one process
fi

if [[ -n "${TORCHRUN:-}" ]]; then
    launcher=("$TORCHRUN")
else
    if [[ -z "${PYTHON:-}" ]]; then
        PYTHON=python3
        if command -v torchrun > /dev/null 2>&1 \
                && [[ -x "$(dirname "$(command -v torchrun)")/python" ]]; then
            PYTHON="$(dirname "$(command -v torchrun)")/python"
        elif [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then
            PYTHON="$REPO_ROOT/.venv/bin/python"
        fi
    fi
    launcher=("$PYTHON" -m qwenvl_train.cli.launch)
fi

# On SIGTERM (preemption, SLURM --signal) torchrun forwards the signal to the workers and
# SIGKILLs them after this many seconds; the trainer needs that time to write a checkpoint.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-100}"
# Importable from a source checkout without `pip install -e .`.
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"

args=(--nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE")
if [[ "$NNODES" == "1" && -z "$MASTER_ADDR" ]]; then
    # A free localhost port: several single-node jobs on one machine do not clash.
    args+=(--standalone)
elif [[ -z "$MASTER_ADDR" ]]; then
    echo "launch_torchrun.sh: NNODES=$NNODES needs MASTER_ADDR (the first node's address)" >&2
    exit 2
elif [[ "$RDZV_BACKEND" == "c10d" ]]; then
    args+=(--rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$RDZV_ID")
elif [[ "$RDZV_BACKEND" == "static" ]]; then
    args+=(--node-rank="$NODE_RANK" --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT")
else
    echo "launch_torchrun.sh: RDZV_BACKEND=$RDZV_BACKEND; allowed: static, c10d" >&2
    exit 2
fi
extra=()
if [[ -n "${TORCHRUN_ARGS:-}" ]]; then
    read -r -a extra <<< "$TORCHRUN_ARGS"
fi

cmd=("${launcher[@]}" "${args[@]}" ${extra[@]+"${extra[@]}"} -m qwenvl_train.cli.train "$@")
echo "+ ${cmd[*]}" >&2
if [[ "${DRY_RUN:-0}" == "1" ]]; then
    exit 0
fi
# exec: signals (SIGTERM on preemption) reach torchrun itself, not a wrapper shell.
exec "${cmd[@]}"
