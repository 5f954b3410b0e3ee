"""Worker for tests/distributed/test_deepspeed_cpu.py (`deepspeed --num_gpus 2`): tiny Llama + HF Trainer on CPU.

Writes `<out>/rank<R>.json` with what the test asserts: world sizes, the sample ids this rank
trained on, each parameter's local/full size, the partial-weight load check and the losses.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from llava_train.utils.distributed import (
    full_numel,
    gathered,
    load_state_dict_gathered,
    local_numel,
    prepare_distributed,
    rank,
    shutdown_distributed,
    world_size,
    zero3_enabled,
)

NUM_SAMPLES = 16
SEQ = 8
VOCAB = 96


class IdDataset(torch.utils.data.Dataset):
    """Sample i is the token sequence (i, i+1, ...) mod VOCAB; the collator reports which ids it saw."""

    def __len__(self) -> int:
        return NUM_SAMPLES

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"idx": i, "input_ids": torch.arange(i, i + SEQ) % VOCAB}


def main(out_dir: str, ds_config: str) -> None:
    kwargs = prepare_distributed(
        {
            "output_dir": out_dir,
            "deepspeed": ds_config,
            "per_device_train_batch_size": 2,
            "max_steps": 4,
            "learning_rate": 5e-3,
            "logging_steps": 1,
            "save_strategy": "no",
            "report_to": [],
            "remove_unused_columns": False,
            "seed": 0,
        }
    )
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    args = TrainingArguments(**kwargs)
    # After TrainingArguments: `_from_config` then builds the model under deepspeed.zero.Init (ZeRO-3).
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    )
    model = LlamaForCausalLM._from_config(config)

    # Partial weights. Under ZeRO-3 every rank offers different values and modifier rank 0's must win
    # everywhere; without partitioning each rank keeps what it loads, so all ranks load the same.
    head = model.lm_head
    wanted = torch.arange(VOCAB * 64, dtype=torch.float32).reshape(VOCAB, 64) / 1e5
    load_state_dict_gathered(head, {"weight": wanted + (rank() if zero3_enabled() else 0)})
    with gathered(head, modifier_rank=None):
        head_equal = bool(torch.equal(head.weight.detach().float(), wanted))

    seen: list[int] = []

    def collate(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        seen.extend(int(b["idx"]) for b in batch)
        ids = torch.stack([b["input_ids"] for b in batch])
        return {"input_ids": ids, "labels": ids.clone()}

    trainer = Trainer(model=model, args=args, train_dataset=IdDataset(), data_collator=collate)
    shards = {n: [local_numel(p), full_numel(p)] for n, p in model.named_parameters()}
    trainer.train()
    ds_cfg = trainer.accelerator.state.deepspeed_plugin.deepspeed_config
    report = {
        "rank": rank(),
        "world_size": world_size(),
        "args_world_size": args.world_size,
        "train_batch_size": ds_cfg["train_batch_size"],
        "zero_stage": ds_cfg["zero_optimization"]["stage"],
        "zero3_enabled": zero3_enabled(),
        "seen": seen,
        "shards": shards,
        "head_equal": head_equal,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    }
    Path(out_dir, f"rank{rank()}.json").write_text(json.dumps(report))
    shutdown_distributed(True)  # as every llava-train process ends: no teardown race at exit, no /dev/shm leak


if __name__ == "__main__":
    # The deepspeed launcher adds `--local_rank=N` (the same value is in the LOCAL_RANK env var).
    positional = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main(positional[0], positional[1])
