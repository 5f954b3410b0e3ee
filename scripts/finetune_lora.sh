#!/usr/bin/env bash
# LLaVA-1.5 stage 2 with LoRA on the LLM (ZeRO-3) on one machine with the deepspeed launcher.
#   scripts/finetune_lora.sh [key=value ...]          e.g. scripts/finetune_lora.sh train.per_device_train_batch_size=8 train.gradient_accumulation_steps=2
#   NUM_GPUS=4 MASTER_PORT=29600 CONFIG=configs/llava-1.5-13b/finetune_lora.yaml scripts/finetune_lora.sh
# Extra arguments are config overrides passed through unchanged. Keep the global batch (GPUs x per-device
# batch x accumulation) of the recipe when changing NUM_GPUS. Check memory first: llava-train plan $CONFIG
set -euo pipefail
cd "$(dirname "$0")/.."

NUM_GPUS=${NUM_GPUS:-8}
MASTER_PORT=${MASTER_PORT:-29500}
CONFIG=${CONFIG:-configs/llava-1.5-7b/finetune_lora.yaml}

cmd=(deepspeed --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT" --module llava_train.train "$CONFIG" "$@")
echo "+ ${cmd[*]}"
exec "${cmd[@]}"
