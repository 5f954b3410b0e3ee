"""Worker for tests/model/test_builder_zero3.py (2 processes, DeepSpeed ZeRO-3 on CPU): build, load, projector I/O.

Writes `<out>/rank<R>.json` with what the test asserts: whether parameters are really partitioned,
whether the gathered weights equal the source folders', and the projector save/load/init_from checks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def _source(folder: str) -> dict[str, torch.Tensor]:
    with safe_open(str(Path(folder) / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def main(out_dir: str, ds_config: str, lm: str, vt: str) -> None:
    import torch.distributed as dist
    from transformers import TrainingArguments

    from llava_train.components import load_components
    from llava_train.config import from_dict
    from llava_train.model.projector import load_projector, projector_module, save_projector
    from llava_train.utils.distributed import (
        exit_after_teardown,
        full_numel,
        gathered,
        local_numel,
        prepare_distributed,
        rank,
        shutdown_distributed,
    )

    out = Path(out_dir)
    kwargs = prepare_distributed({"output_dir": str(out / "args"), "deepspeed": ds_config, "report_to": []})
    # Before the model, and kept alive: transformers holds the DeepSpeed config by weak reference, and
    # while it lives `_from_config` builds under deepspeed.zero.Init.
    args = TrainingArguments(**kwargs)

    def cfg(init_from: str | None = None):
        model = {"language_model": lm, "vision_tower": vt, "dtype": "float32", "init_from": init_from}
        return from_dict({"stage": "finetune", "model": model, "train": {"output_dir": str(out / "run")}})

    model = load_components(cfg()).model
    up = model.model.language_model.layers[0].mlp.up_proj.weight
    report: dict = {"rank": rank(), "partitioned": bool(hasattr(up, "ds_id") and local_numel(up) < full_numel(up))}

    lm_src, vt_src = _source(lm), _source(vt)
    with gathered(list(model.parameters()), modifier_rank=None):
        text = model.model.language_model.state_dict()
        vision = model.model.vision_tower.state_dict()
        lm_ok = all(
            torch.equal(model.lm_head.weight[:512], t)
            if k == "lm_head.weight"
            else torch.equal(text[k.removeprefix("model.")][: t.shape[0]], t)
            for k, t in lm_src.items()
        )
        vt_ok = all(
            torch.equal(vision[k if k in vision else k.removeprefix("vision_model.")], t) for k, t in vt_src.items()
        )
        report["embedding_rows"] = int(model.get_input_embeddings().weight.shape[0])
    report["lm_loaded"], report["vision_loaded"] = bool(lm_ok), bool(vt_ok)

    # Known projector values written by rank 0, loaded into partitioned parameters on every rank.
    known = out / "known" / "projector.safetensors"
    if rank() == 0:
        shapes = {
            "linear_1.weight": (64, 32),
            "linear_1.bias": (64,),
            "linear_2.weight": (64, 64),
            "linear_2.bias": (64,),
        }
        values = {
            k: torch.arange(torch.Size(s).numel(), dtype=torch.float32).reshape(s) / 1000 for k, s in shapes.items()
        }
        known.parent.mkdir(parents=True, exist_ok=True)
        save_file(values, str(known))
    dist.barrier()
    load_projector(model, known)
    save_projector(model, out / "saved" / "projector.safetensors")
    dist.barrier()
    with (
        safe_open(str(known), framework="pt") as a,
        safe_open(str(out / "saved" / "projector.safetensors"), "pt") as b,
    ):
        report["projector_round_trip"] = sorted(a.keys()) == sorted(b.keys()) and all(  # noqa: SIM118
            torch.equal(a.get_tensor(k), b.get_tensor(k))
            for k in a.keys()  # noqa: SIM118
        )
    # A stage-2 model starting from the stage-1 folder gets the projector inside its partitions.
    second = load_components(cfg(init_from=str(out / "saved"))).model
    proj = projector_module(second)
    with gathered(list(proj.parameters()), modifier_rank=None):
        report["init_from_projector"] = bool(torch.equal(proj.linear_2.bias.detach(), torch.arange(64.0) / 1000))
    report["zero3"] = bool(args.deepspeed)
    (out / f"rank{rank()}.json").write_text(json.dumps(report))
    shutdown_distributed(True)  # as every llava-train process ends: no teardown race at exit
    exit_after_teardown(0)  # and as launched ranks leave: never a C++ finalization abort (seen once in CI)


if __name__ == "__main__":
    positional = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main(*positional)
