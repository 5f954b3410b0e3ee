"""The precision policy (training/precision.py): trainable weights keep fp32 masters on every one-process path, frozen
ones stay bit-identical in model.dtype, one AdamW step at lr 2e-5 moves every element that has a gradient, resume is
exact, and the pure-bf16 opt-out is what it says (the negative control: the same check fails there).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from llava_train.config import from_dict
from llava_train.config_io import ConfigError
from llava_train.train import run
from llava_train.training.precision import PrecisionPolicy, describe, resolve_precision
from tiny_models import losses, tiny_config, write_anyres_data, write_tiny_data

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
LR = 2e-5  # the LLaVA-1.5 finetune recipe's learning rate


def cfg_with(**parts: Any) -> Any:
    """A minimal run config with `model` / `train` entries overridden (no files are touched)."""
    data = {"stage": "finetune", "model": {"dtype": "bfloat16"}, "train": {"output_dir": "/tmp/x"}}
    for key, value in parts.items():
        data[key] = {**data.get(key, {}), **value}
    return from_dict(data)


# -- the policy table --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "train", "want"),
    [
        ({"dtype": "bfloat16"}, {"bf16": True}, PrecisionPolicy("bfloat16", "float32", "bfloat16", "llava-train")),
        ({"dtype": "float16"}, {"fp16": True}, PrecisionPolicy("float16", "float32", "float16", "llava-train")),
        ({"dtype": "float32"}, {}, PrecisionPolicy("float32", "float32", "float32", "llava-train")),
        ({"dtype": "float32"}, {"bf16": True}, PrecisionPolicy("float32", "float32", "bfloat16", "llava-train")),
        (
            {"dtype": "bfloat16", "master_weights": False},
            {"bf16": True},
            PrecisionPolicy("bfloat16", "bfloat16", "bfloat16", "none"),
        ),
        (
            {"dtype": "float32"},
            {"bf16": True, "deepspeed": str(REPO / "configs" / "deepspeed" / "zero3.json")},
            PrecisionPolicy("bfloat16", "float32", "bfloat16", "deepspeed"),
        ),
        (
            {"dtype": "bfloat16"},
            {"deepspeed": str(REPO / "configs" / "deepspeed" / "zero2.json")},
            PrecisionPolicy("bfloat16", "float32", "bfloat16", "deepspeed"),
        ),
    ],
)
def test_policy_table(model: dict, train: dict, want: PrecisionPolicy) -> None:
    assert resolve_precision(cfg_with(model=model, train=train)) == want


@pytest.mark.parametrize(
    ("model", "train", "message"),
    [
        (
            {"dtype": "bfloat16"},
            {},
            "model.dtype=bfloat16 keeps frozen weights in bfloat16 and trainable ones in fp32",
        ),
        ({"dtype": "float16", "master_weights": False}, {"fp16": True}, "fp16 loss scaling needs fp32 trainable"),
        (
            {"dtype": "bfloat16"},
            {"deepspeed": {"zero_optimization": {"stage": 0}}},
            "under DeepSpeed ZeRO stage 0 without bf16/fp16",
        ),
    ],
)
def test_combinations_that_cannot_train_right_are_one_line_errors(model: dict, train: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_precision(cfg_with(model=model, train=train))


def test_fp16_on_cpu_is_refused() -> None:
    """accelerate silently runs fp16 on CPU without autocast or loss scaling."""
    cfg = cfg_with(model={"dtype": "float16"}, train={"fp16": True})
    assert resolve_precision(cfg).compute == "float16"
    with pytest.raises(ConfigError, match="train.fp16 needs a GPU"):
        resolve_precision(cfg, on_cpu=True)


def test_startup_line() -> None:
    mixed = PrecisionPolicy("bfloat16", "float32", "bfloat16", "llava-train")
    assert describe(mixed, 1_100_000_000, 300_000_000) == (
        "precision: 1.10B trainable in fp32 (master weights, fp32 optimizer state), 0.30B frozen in bf16, "
        "compute bf16 autocast"
    )
    ds = PrecisionPolicy("bfloat16", "float32", "bfloat16", "deepspeed")
    assert describe(ds, 6_400, 120_000) == (
        "precision: 6.40K trainable (fp32 master weights and optimizer state held by DeepSpeed's optimizer), "
        "120.00K frozen in bf16, compute bf16 (DeepSpeed)"
    )
    pure = PrecisionPolicy("bfloat16", "bfloat16", "bfloat16", "none")
    assert describe(pure, 10, 2000).startswith("precision: 0.01K trainable in bf16 (stepped in bf16: no master")


# -- one step on every one-process path --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("precision")
    ws = write_tiny_data(root / "data")
    ws["lm"], ws["vision"], ws["root"] = str(root / "models" / "lm"), str(root / "models" / "vision"), str(root)
    anyres = write_anyres_data(root / "anyres", "llava_next")
    ws["anyres_pretrain"], ws["anyres_images"] = anyres["pretrain"], anyres["images"]
    return ws


def bf16_config(ws: dict[str, str], path: str, out: Path, steps: int = 1, **train: Any) -> dict[str, Any]:
    """The tiny preset built in bf16 (frozen parts bf16), bf16 autocast, `steps` AdamW steps at lr 2e-5."""
    stage = "pretrain" if path in ("stage1", "llava_next") else "finetune"
    args = dict(max_steps=steps, save_steps=steps, learning_rate=LR, lr_scheduler_type="constant", bf16=True)
    config = tiny_config(ws, stage, str(out), **{**args, **train})
    config["model"]["dtype"] = "bfloat16"
    config["data"]["group_by_modality_length"] = False
    if path == "vision_tower":
        config["model"]["train_vision_tower"] = True
    if path == "lora":
        config["lora"] = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}
    if path == "llava_next":
        config["model"]["arch"] = "llava_next"
        config["data"]["train"] = [{"path": ws["anyres_pretrain"], "image_folder": ws["anyres_images"]}]
        config["data"]["model_max_length"] = 512
    return config


def start_state(cfg: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The model as `train.run` has it when the optimizer is built (same seed, same steps): its trainable tensors by
    the names checkpoints save them under (peft's for a LoRA model) and its frozen ones by plain runtime name."""
    from transformers import set_seed

    from llava_train.train import build_components
    from llava_train.training.assembly import prepare_model
    from llava_train.training.precision import resolve_precision

    set_seed(cfg.train["seed"])
    model = prepare_model(build_components(cfg).model, cfg, resolve_precision(cfg))
    frozen = {n.removeprefix("base_model.model."): p.detach().clone() for n, p in model.named_parameters()}
    frozen = {n: p for n, p in frozen.items() if ".lora_" not in n and ".modules_to_save." not in n}
    if cfg.lora.enabled:
        from peft import get_peft_model_state_dict

        trainable = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    else:
        trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return trainable, {n: p for n, p in frozen.items() if n not in trainable and "original_module" not in n}


def assert_moved(name: str, before: torch.Tensor, after: torch.Tensor, steps: int) -> None:
    """Every element with a gradient moved by about the learning rate (AdamW's first steps move each element by
    lr x sign); rows of an embedding whose tokens were not in the batch have no gradient and stay put."""
    assert after.dtype == torch.float32, f"{name} saved as {after.dtype}, not its fp32 master"
    delta = (after - before.float()).abs()
    assert delta.max().item() <= steps * LR * 1.01, f"{name}: moved {delta.max().item():g} > {steps} x lr"
    if name.endswith("embed_tokens.weight"):
        rows = delta.amax(dim=1) > 0  # [vocab]: the rows of tokens in the batch
        assert rows.sum() > 0 and (delta[rows] > 0).float().mean().item() >= 0.99, name
        return
    changed = (delta > 0).float().mean().item()
    assert changed >= 0.99, f"{name}: only {changed:.1%} of its elements moved"


PATHS = {"stage1": 1, "finetune": 1, "vision_tower": 1, "llava_next": 1, "lora": 2}


@pytest.mark.parametrize("path", list(PATHS))
def test_one_step_moves_every_trainable_element_and_no_frozen_bit(path: str, workspace: dict, tmp_path: Path) -> None:
    """LoRA takes 2 steps: peft starts lora_B at 0, so lora_A's first gradient is exactly 0."""
    from transformers import AutoModelForImageTextToText

    steps = PATHS[path]
    cfg = from_dict(bf16_config(workspace, path, tmp_path / "run", steps=steps))
    trainable, frozen = start_state(cfg)
    run(cfg)
    ckpt = tmp_path / "run" / f"checkpoint-{steps}"
    saved = load_file(ckpt / ("adapter_model.safetensors" if path == "lora" else "model.safetensors"))
    assert set(trainable) <= set(saved)
    if path == "lora":
        assert any(".lora_A." in n for n in saved) and any("multi_modal_projector" in n for n in saved)
    if path == "llava_next":
        assert "model.image_newline" in trainable
    for name in sorted(trainable):
        assert_moved(name, trainable[name], saved[name], steps)
    # Frozen parameters: bit-identical bf16, read back from the final folder as a client loads it.
    final = dict(AutoModelForImageTextToText.from_pretrained(str(tmp_path / "run"), dtype="auto").named_parameters())
    if path == "lora":  # the merged adapters changed the LM's linears; the rest must not have moved
        frozen = {n: p for n, p in frozen.items() if not n.startswith("model.language_model.layers.")}
    assert len(frozen) > 10
    for name, before in frozen.items():
        assert final[name].dtype == torch.bfloat16, name
        assert torch.equal(final[name], before), f"frozen {name} changed"
    # The final folder is written in model.dtype.
    assert {t.dtype for t in load_file(tmp_path / "run" / "model.safetensors").values()} == {torch.bfloat16}


def test_pure_bf16_opt_out_rounds_updates_away(workspace: dict, tmp_path: Path) -> None:
    """The negative control: `model.master_weights: false` steps bf16 weights and most updates vanish."""
    config = bf16_config(workspace, "finetune", tmp_path / "run")
    config["model"]["master_weights"] = False
    cfg = from_dict(config)
    before, _ = start_state(cfg)
    run(cfg)
    saved = load_file(tmp_path / "run" / "checkpoint-1" / "model.safetensors")
    weight = "model.multi_modal_projector.linear_2.weight"
    assert saved[weight].dtype == torch.bfloat16
    changed = (saved[weight] != before[weight]).float().mean().item()
    assert changed < 0.5, f"{changed:.1%} moved: expected most lr-2e-5 updates to round away in bf16"


# -- whole runs -------------------------------------------------------------------------------------------------

# 30 seeded finetune steps at lr 1e-3 (tiny_config's data and model); see docs/performance.md#precision.
LOSS_TOLERANCE = 0.01


def finetune_losses(ws: dict, out: Path, dtype: str, bf16: bool, master_weights: bool = True) -> list[float]:
    config = tiny_config(ws, "finetune", str(out), max_steps=30, save_strategy="no", learning_rate=1e-3, bf16=bf16)
    config["model"].update(dtype=dtype, master_weights=master_weights)
    history = losses(run(from_dict(config)).log_history)
    return [history[s] for s in range(1, 31)]


def test_bf16_frozen_parts_train_like_fp32(workspace: dict, tmp_path: Path) -> None:
    """Frozen parts in bf16 + fp32 masters + bf16 autocast follow the all-fp32 run within LOSS_TOLERANCE (0.0025
    measured); pure bf16 does not."""
    fp32 = finetune_losses(workspace, tmp_path / "fp32", "float32", bf16=False)
    mixed = finetune_losses(workspace, tmp_path / "mixed", "bfloat16", bf16=True)
    worst = max(abs(a - b) for a, b in zip(fp32, mixed))
    assert worst <= LOSS_TOLERANCE, f"mixed precision strays {worst:.4f} from fp32: {mixed} vs {fp32}"
    assert fp32[-1] < fp32[0] - 1.0
    # The tolerance is tight enough to catch lost updates: pure bf16 leaves it (0.03 measured).
    pure = finetune_losses(workspace, tmp_path / "pure", "bfloat16", bf16=True, master_weights=False)
    assert max(abs(a - b) for a, b in zip(fp32, pure)) > LOSS_TOLERANCE


def test_kill_9_and_resume_with_fp32_masters_is_exact(workspace: dict, tmp_path: Path) -> None:
    """kill -9 after checkpoint-4 of 8 (bf16 frozen parts, fp32 masters): resume=auto gives the same losses."""

    def config(out: Path, **train: Any) -> dict[str, Any]:
        return bf16_config(workspace, "finetune", out, steps=8, save_steps=4, learning_rate=1e-3, **train)

    full = losses(run(from_dict(config(tmp_path / "full"))).log_history)
    cut = tmp_path / "cut"
    path = tmp_path / "cut.yaml"
    path.write_text(yaml.safe_dump(config(cut)))
    proc = subprocess.run(
        [sys.executable, str(TESTS / "fault_runner.py"), "sigkill", "6", "0", str(path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert (cut / "checkpoint-4" / "llava_train_complete.json").is_file()
    shutil.rmtree(cut / "checkpoint-8", ignore_errors=True)
    resumed = losses(run(from_dict(config(cut, resume_from_checkpoint="auto"))).log_history)
    assert sorted(s for s in resumed if s > 4) == [5, 6, 7, 8]
    assert [resumed[s] for s in (5, 6, 7, 8)] == [full[s] for s in (5, 6, 7, 8)]
