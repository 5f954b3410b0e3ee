#!/usr/bin/env bash
# Run the GPU bench presets on one lent H100 in ONE device call, writing JSON lines to $OUT:
#   run(command="bash scripts/bench_gpu.sh", timeout_s=600)
# The device image has torch, transformers 5.17, accelerate and peft but no internet, no datasets,
# no deepspeed, no wandb: the bench needs none of them. Our package goes on PYTHONPATH (an editable
# install would need setuptools from the network under build isolation).
# Env: PRESETS (default "gpu-1b-finetune gpu-7b-pretrain gpu-7b-lora-finetune gpu-7b-next-finetune"), MODES (default
# hf-padded,packed,ours,ours-compile,ours-flex), STEPS (default:
# the preset's), PYTHON (default python), PROFILE (default 1: two extra profiled steps per mode after
# the timed ones add the top-5 GPU kernels as `top_ops` to each JSON line; PROFILE=0 skips them),
# EXTRA (more bench arguments, e.g. "--rows 1" when a preset runs out of memory), SMOKE (default 1: first
# scripts/cuda_smoke.sh, the product's own train + predict commands on the GPU; 0 skips it).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
PRESETS="${PRESETS:-gpu-1b-finetune gpu-7b-pretrain gpu-7b-lora-finetune gpu-7b-next-finetune}"
MODES="${MODES:-hf-padded,packed,ours,ours-compile,ours-flex}"
PY="${PYTHON:-python}"

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch, transformers, accelerate, peft; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'accelerate', accelerate.__version__, 'peft', peft.__version__)"
  "$PY" -c "import liger_kernel; print('liger-kernel', liger_kernel.__version__)" 2>/dev/null \
    || echo "liger-kernel not installed (chunked lm_head + cross entropy is used)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

status=0
if [ "${SMOKE:-1}" = "1" ]; then
  # The product first: both stages + predict on the GPU (bf16, packing); ~1 minute.
  echo "== CUDA smoke run (llava-train train x2 + predict)"
  OUT="$OUT" PYTHON="$PY" bash scripts/cuda_smoke.sh || { status=1; echo "smoke run failed"; }
fi
for preset in $PRESETS; do
  args=(--preset "$preset" --modes "$MODES")
  [ -n "${STEPS:-}" ] && args+=(--steps "$STEPS")
  [ "${PROFILE:-1}" = "1" ] && args+=(--profile)
  # shellcheck disable=SC2206  # e.g. EXTRA="--rows 1 --packing-length 8192" (word splitting wanted)
  [ -n "${EXTRA:-}" ] && args+=(${EXTRA})
  echo "== bench $preset ($MODES)"
  # One mode failing (e.g. out of memory) must not lose the other presets' lines.
  "$PY" -m llava_train.cli bench "${args[@]}" > "$OUT/bench_${preset}.jsonl" 2> "$OUT/bench_${preset}.log" \
    || { status=1; echo "bench $preset failed; tail of its log:"; tail -n 30 "$OUT/bench_${preset}.log"; }
  cat "$OUT/bench_${preset}.jsonl"
done
echo "== summary"
"$PY" -m llava_train.tools.bench.table "$OUT"/bench_*.jsonl | tee "$OUT/summary.md"
exit $status
