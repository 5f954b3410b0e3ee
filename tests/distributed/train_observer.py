"""Runs `llava_train.train.main` unchanged under a launcher and records what the 2-rank tests assert.

Usage (what tests/distributed/test_deepspeed_cpu.py runs):
    deepspeed --num_gpus 2 tests/distributed/train_observer.py REPORT_DIR CONFIG.yaml [key=value ...]
The train module's own steps are wrapped (not replaced): after `build_components` it records each
parameter's local and full size and, when `model.init_from` holds a projector, whether the
gathered projector equals the saved one; after `build_trainer` it records every micro-batch's
sample ids, image counts and trained-token counts, and after the first step the optimizer's named
group learning rates and the parameter sizes again (now inside the DeepSpeed engine). It also counts
the sources this rank really scanned (a scan read from the cache does not count). Each rank writes
`REPORT_DIR/rank<R>.json` after training (at exit).
"""

from __future__ import annotations

import atexit
import json
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

import llava_train.train as train_module
from llava_train.utils.distributed import full_numel, gathered, local_numel, rank

PROJECTOR_FILE = "projector.safetensors"


class _Recorder(TrainerCallback):
    def __init__(self, trainer: Any, report: dict[str, Any]) -> None:
        self.trainer = trainer
        self.report = report

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if "group_lrs" not in self.report:
            groups = self.trainer.optimizer.param_groups
            self.report["group_lrs"] = {g["name"]: float(g.get("initial_lr", g["lr"])) for g in groups}
            named = self.trainer.model.named_parameters()
            self.report["shards_training"] = {n: [local_numel(p), full_numel(p)] for n, p in named}


def _projector_matches(model: Any, folder: str) -> bool:
    from safetensors.torch import load_file

    saved = load_file(str(Path(folder) / PROJECTOR_FILE))
    projector = model.model.multi_modal_projector
    params = dict(projector.named_parameters())
    with gathered(list(params.values()), modifier_rank=None):
        return sorted(saved) == sorted(params) and all(
            torch.equal(params[k].detach().float().cpu(), saved[k].float()) for k in saved
        )


def main(report_dir: str, argv: list[str]) -> int:
    report: dict[str, Any] = {"batches": []}
    build_components, build_trainer = train_module.build_components, train_module.build_trainer

    def observed_build_components(cfg: Any) -> Any:
        parts = build_components(cfg)
        model = parts.model
        report["shards_built"] = {n: [local_numel(p), full_numel(p)] for n, p in model.named_parameters()}
        init = cfg.model.init_from
        if init and (Path(init) / PROJECTOR_FILE).is_file():
            report["projector_equals_init"] = _projector_matches(model, init)
        return parts

    def observed_build_trainer(*args: Any, **kwargs: Any) -> Any:
        trainer = build_trainer(*args, **kwargs)
        collate = trainer.data_collator

        def recording(items: list[dict[str, Any]]) -> dict[str, Any]:
            batch = collate(items)
            trained = int((batch["labels"][:, 1:] != -100).sum())  # what the loss projects through lm_head
            report["batches"].append(
                {
                    "ids": list(batch["ids"]),
                    "images": int(batch["num_images"].sum()),
                    "crops": int(batch["pixel_values"].shape[0]) if "pixel_values" in batch else 0,
                    "videos": int(batch["num_videos"].sum()),
                    "trained": trained,
                }
            )
            return batch

        trainer.data_collator = recording
        trainer.add_callback(_Recorder(trainer, report))
        report["world_size"] = trainer.args.world_size
        return trainer

    import llava_train.data.scan_cache as scan_module  # cached_scan calls scan_source from there

    scan_source = scan_module.scan_source
    report["scans"] = 0

    def counted_scan(*args: Any, **kwargs: Any) -> Any:
        report["scans"] += 1  # a real scan; a cached one never gets here
        return scan_source(*args, **kwargs)

    scan_module.scan_source = counted_scan
    train_module.build_components = observed_build_components
    train_module.build_trainer = observed_build_trainer
    rank_now = rank()

    def write_report() -> None:
        Path(report_dir).mkdir(parents=True, exist_ok=True)
        Path(report_dir, f"rank{rank_now}.json").write_text(json.dumps(report))

    # At exit: a launched rank ends inside `main` (utils.distributed.exit_after_teardown runs atexit handlers).
    atexit.register(write_report)
    return train_module.main(argv)


if __name__ == "__main__":
    # The deepspeed launcher adds `--local_rank=N` (the same value is in the LOCAL_RANK env var).
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    raise SystemExit(main(args[0], args[1:]))
