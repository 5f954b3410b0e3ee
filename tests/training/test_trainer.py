"""LLaVATrainer pieces: optimizer groups carry per-module learning rates; the start-up check catches losses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llava_train.training.trainer import (
    OptimizerGroupError,
    build_param_groups,
    expected_group_lrs,
    verify_group_lrs,
)


class _Proj(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(4, 4)


class _Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.vision_tower = nn.Linear(4, 4)
        self.multi_modal_projector = _Proj()
        self.language_model = nn.ModuleDict({"layer": nn.Linear(4, 4), "norm": nn.LayerNorm(4)})


class _Llava(nn.Module):
    """Same parameter naming as transformers' LlavaForConditionalGeneration."""

    def __init__(self) -> None:
        super().__init__()
        self.model = _Inner()
        self.lm_head = nn.Linear(4, 8, bias=False)


def _groups(overrides: dict) -> list[dict]:
    model = _Llava()
    model.model.vision_tower.requires_grad_(False)
    decay = {n for n, _ in model.named_parameters() if n.endswith("weight") and "norm" not in n}
    return build_param_groups(model, decay, weight_decay=0.1, base_lr=2e-5, lr_overrides=overrides)


def test_groups_split_by_module_and_decay() -> None:
    groups = {g["name"]: g for g in _groups({"projector": 1e-3, "vision_tower": None})}
    assert sorted(groups) == [
        "language_model/decay",
        "language_model/no_decay",
        "projector/decay",
        "projector/no_decay",
    ]
    assert groups["projector/decay"]["lr"] == 1e-3 and groups["projector/no_decay"]["lr"] == 1e-3
    assert groups["language_model/decay"]["lr"] == 2e-5
    assert groups["language_model/decay"]["weight_decay"] == 0.1
    assert groups["language_model/no_decay"]["weight_decay"] == 0.0
    # lm_head trains at the language model's rate; norms and biases never decay.
    assert sum(p.numel() for p in groups["language_model/decay"]["params"]) == 16 + 32
    assert sum(p.numel() for p in groups["language_model/no_decay"]["params"]) == 4 + 4 + 4


def test_verify_accepts_configured_rates_after_scheduler_scaling() -> None:
    groups = _groups({"projector": 1e-3})
    opt = torch.optim.AdamW(groups, lr=2e-5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0)  # warmup starts at lr 0
    assert opt.param_groups[0]["lr"] == 0.0
    seen = dict(verify_group_lrs(opt, expected_group_lrs(2e-5, {"projector": 1e-3})))
    assert seen["projector/decay"] == 1e-3 and seen["language_model/decay"] == 2e-5
    del sched


def test_verify_rejects_lost_or_wrong_rates() -> None:
    model = _Llava()
    plain = torch.optim.AdamW(model.parameters(), lr=2e-5)  # what a DeepSpeed `optimizer` block builds
    with pytest.raises(OptimizerGroupError, match="DeepSpeed JSON `optimizer` block"):
        verify_group_lrs(plain, expected_group_lrs(2e-5, {"projector": 1e-3}))
    opt = torch.optim.AdamW(_groups({}), lr=2e-5)
    with pytest.raises(OptimizerGroupError, match=r"projector/decay has lr 2e-05, config asks for 0.001"):
        verify_group_lrs(opt, expected_group_lrs(2e-5, {"projector": 1e-3}))


def test_text_only_step_gives_the_projector_a_zero_gradient_with_one_process(tmp_path) -> None:
    """1 and N processes optimise alike: a text-only micro-batch runs the blank-image keepalive even with one
    process, so the projector's gradient is zero (AdamW then moves it by momentum as on N GPUs), not None."""
    from transformers import TrainingArguments

    from llava_train.data.collator import PaddingCollator
    from llava_train.training.trainer import LLaVATrainer
    from tiny_models import sample, tiny_llava

    model = tiny_llava("sdpa")
    model.model.vision_tower.requires_grad_(False)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], remove_unused_columns=False)
    trainer = LLaVATrainer(model=model, args=args, data_collator=PaddingCollator(pad_token_id=0))
    assert trainer.args.world_size == 1
    batch = PaddingCollator(pad_token_id=0)([sample(9, 0, seed=1, sid="t0"), sample(5, 0, seed=2, sid="t1")])
    trainer.current_gradient_accumulation_steps = 1  # set by train(); one micro-batch per step here
    trainer.training_step(trainer.model, batch)
    grads = [p.grad for p in model.model.multi_modal_projector.parameters()]
    assert all(g is not None for g in grads)
    assert all(bool((g == 0).all()) for g in grads)
    assert model.model.language_model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
