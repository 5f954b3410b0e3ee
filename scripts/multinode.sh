#!/usr/bin/env bash
# Multi-node training with the deepspeed launcher and a hostfile (run it on the first node only; the
# launcher starts the other nodes' ranks over passwordless ssh). Every node needs the same checkout,
# venv, data and model paths; the output folder must be on storage every node writes (the final
# ZeRO-3 weights are gathered and written by global rank 0).
#   cp configs/hostfile.example configs/hostfile   # edit: one `hostname slots=N` line per node
#   CONFIG=configs/llava-1.5-13b/finetune.yaml scripts/multinode.sh [key=value ...]
# The global batch is nodes x slots x per-device batch x accumulation: adjust
# train.gradient_accumulation_steps to keep the recipe's (128 for stage 2, 256 for stage 1).
# Without ssh between nodes, use scripts/slurm/*.sbatch (srun starts one launcher per node).
set -euo pipefail
cd "$(dirname "$0")/.."

HOSTFILE=${HOSTFILE:-configs/hostfile}
MASTER_ADDR=${MASTER_ADDR:-$(awk '!/^#/ && NF {print $1; exit}' "$HOSTFILE")}
MASTER_PORT=${MASTER_PORT:-29500}
CONFIG=${CONFIG:-configs/llava-1.5-7b/finetune.yaml}

cmd=(deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
     --module llava_train.train "$CONFIG" "$@")
echo "+ ${cmd[*]}"
exec "${cmd[@]}"
