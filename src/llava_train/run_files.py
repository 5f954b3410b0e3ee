"""The names of the files and folders a run writes (its run folder, its checkpoints): one home, no imports.

Every module that writes or reads one of them takes the name from here, so a rename is one line.
"""

from __future__ import annotations

# The run folder.
CONFIG_FILENAME = "llava_train_config.yaml"  # the resolved config (also inside every checkpoint)
METRICS_FILENAME = "metrics.jsonl"  # every logged scalar, one JSON object per log
LOSS_PLOT_FILENAME = "loss.png"
DATA_SUMMARY_FILENAME = "data_summary.json"  # what the training index held (and skipped)
PREEMPTED_FILE = "llava_train_preempted.json"  # written when a preemption signal stopped the run
PROJECTOR_FILE = "projector.safetensors"  # the projector (+ NeXT/OneVision newline) alone: the stage hand-off
ADAPTER_DIR = "adapter"  # LoRA runs: the adapter (+ projector) beside the merged model
TRAINING_ARGS_JSON = "training_args.json"  # HF's TrainingArguments as JSON (the final folder holds no pickle)
REFERENCE_LOGPS_FILENAME = "dpo_reference_logps.safetensors"  # dpo.reference precomputed: [items, 2] per split

# Inside checkpoint-N/.
CHECKPOINT_INFO = "llava_train_checkpoint.json"  # kind (full / trainable-only) and where frozen parts come from
COMPLETE_MARKER = "llava_train_complete.json"  # written last: its manifest makes the checkpoint complete
HF_EXPORT_DIR = "hf"  # `train.export_hf`: the checkpoint as an HF-native folder
STEP0_DIR = "step-0"  # `eval.lmms_eval_step0`: the starting model's export (`<run>/step-0/hf`), outside rotation
LMMS_RESULT_FILE = "lmms_eval.json"  # a folder's lmms-eval scores
LMMS_PENDING_FILE = "lmms_eval.pending"  # its eval is queued or running (rotation keeps the folder)
LMMS_OUTPUT_DIR = "lmms_eval_out"  # lmms-eval's own output for that folder

# `llava-train data validate` / `eval` outputs.
DATA_REPORT = "data_report.json"
EVAL_REPORT_FILENAME = "eval_report.json"
EVAL_PREDICTIONS_FILENAME = "eval_predictions.jsonl"
