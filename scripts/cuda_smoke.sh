#!/usr/bin/env bash
# The product end to end on one GPU: `llava-train train` both stages of the demo's small config (bf16,
# packed rows of one shape, the given attention implementation), then `llava-train predict` on the output.
# Run it in the same device call as the bench: `bash scripts/cuda_smoke.sh` (scripts/bench_gpu.sh calls it
# first when SMOKE=1, the default). DEVICE=cpu runs the same commands on CPU (fp32) for a check here.
# Env: OUT (folder for the work dir and logs), ATTN (default sdpa), STEPS (default 20 per stage), PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
W="$OUT/smoke"
PY="${PYTHON:-python}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
STEPS="${STEPS:-20}"
if [ "${DEVICE:-cuda}" = "cpu" ]; then
  precision=(train.use_cpu=true model.dtype=float32)
else
  precision=(train.use_cpu=false train.bf16=true model.dtype=bfloat16 "model.attn_implementation=${ATTN:-sdpa}")
fi
common=(data.packing=true data.packing_length=512 train.per_device_train_batch_size=2 "train.max_steps=$STEPS"
  train.logging_steps=5 train.dataloader_num_workers=2 "${precision[@]}")
# Data, tokenizer and tiny parts from the demo (no part pretraining: this checks the code path, not accuracy).
"$PY" - "$W" <<'PYEOF'
import sys
from pathlib import Path
from llava_train.tools.demo import parts, shapes
from llava_train.tools.demo.run import DemoSize, stage_config
w = Path(sys.argv[1])
data = shapes.generate(w / "data", 200, 200, 16)
parts.write_parts(w, data, DemoSize())
import yaml
for stage in ("pretrain", "finetune"):
    cfg = stage_config(stage, w).to_dict()
    (w / f"{stage}.yaml").write_text(yaml.safe_dump(cfg))
PYEOF
"$PY" -m llava_train.cli train "$W/pretrain.yaml" "${common[@]}" > "$OUT/smoke_pretrain.log" 2>&1 \
  || { tail -n 40 "$OUT/smoke_pretrain.log"; exit 1; }
"$PY" -m llava_train.cli train "$W/finetune.yaml" "${common[@]}" > "$OUT/smoke_finetune.log" 2>&1 \
  || { tail -n 40 "$OUT/smoke_finetune.log"; exit 1; }
image=$(ls "$W"/data/images/eval/*.png | head -n 1)
answer=$("$PY" -m llava_train.cli predict "$W/model" --image "$image" \
  --prompt $'What color is the shape?\nAnswer the question using a single word or phrase.' 2> "$OUT/smoke_predict.log")
grep -h "train_runtime\|'loss'" "$OUT"/smoke_*.log | tail -n 4 || true
echo "smoke: both stages trained and saved ($W/model); predict -> '$answer'"
