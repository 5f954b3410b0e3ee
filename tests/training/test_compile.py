"""perf.compile: the regions it compiles, eager-equal numbers, and a packed run whose losses equal eager's."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from llava_train.config import from_dict
from llava_train.config_io import ConfigError
from llava_train.data.collator import PaddingCollator
from llava_train.train import run
from llava_train.training.compile import compile_regions, compile_regions_of
from tiny_models import losses, sample, tiny_config, tiny_llava, write_tiny_data


def test_regions_are_every_vision_and_lm_layer_list() -> None:
    model = tiny_llava("sdpa")
    assert compile_regions_of(model) == ["model.vision_tower.encoder.layers", "model.language_model.layers"]


def test_compiled_layers_equal_eager_forward_and_backward() -> None:
    eager, compiled = tiny_llava("sdpa"), tiny_llava("sdpa")  # same seed: the same weights
    assert compile_regions(compiled) == 4  # 2 CLIP encoder layers + 2 Llama decoder layers
    batch = PaddingCollator(0)([sample(20, 1, 0, "a"), sample(12, 2, 1, "b")])
    inputs = {k: batch[k] for k in ("input_ids", "labels", "attention_mask", "pixel_values")}
    outs = []
    for model in (eager, compiled):
        out = model(**inputs)
        out.loss.backward()
        outs.append(out)
    torch.testing.assert_close(outs[1].logits, outs[0].logits, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    # The module tree and state dict are untouched: checkpoints and save_pretrained see the same names.
    assert list(compiled.state_dict()) == list(eager.state_dict())


def test_compile_is_refused_under_zero3(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers.integrations

    monkeypatch.setattr(transformers.integrations, "is_deepspeed_zero3_enabled", lambda: True)
    with pytest.raises(ConfigError, match="perf.compile is not supported under DeepSpeed ZeRO-3"):
        compile_regions(tiny_llava("sdpa"))


def test_packed_run_with_compile_has_eager_losses(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ws = write_tiny_data(tmp_path / "data", n=16, text_only=2)
    ws.update(lm=str(tmp_path / "lm"), vision=str(tmp_path / "vision"))
    results = {}
    logger = logging.getLogger("llava_train")
    logger.addHandler(caplog.handler)  # our logger does not propagate to the root logger
    try:
        for flag in (False, True):
            cfg = tiny_config(ws, "finetune", str(tmp_path / f"run-{flag}"), max_steps=4, save_strategy="no")
            cfg["train"]["per_device_train_batch_size"] = 1
            cfg["data"].update(packing=True, packing_length=256)
            cfg["perf"] = {"compile": flag}
            results[flag] = losses(run(from_dict(cfg)).log_history)
    finally:
        logger.removeHandler(caplog.handler)
    assert list(results[True]) == [1, 2, 3, 4]
    assert "perf.compile: 4 layers compiled" in caplog.text
    for step, value in results[False].items():
        assert results[True][step] == pytest.approx(value, rel=1e-4), step
