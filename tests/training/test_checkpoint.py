"""Checkpoint weights (runtime names, trainable-only for partial stages, only rank 0 builds and writes them) and
the checkpoint's HF-native export (`train.export_hf`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llava_train.config import from_dict
from llava_train.train import run
from llava_train.training.checkpoint import (
    CHECKPOINT_INFO,
    COMPLETE_MARKER,
    HF_EXPORT_DIR,
    runtime_state_dict,
    save_checkpoint_weights,
    write_hf_folder,
)
from llava_train.training.resume import check_checkpoint
from tiny_models import tiny_config, tiny_llava, write_tiny_data


def test_rank0_writes_runtime_named_weights(tmp_path: Path) -> None:
    model = tiny_llava("sdpa")
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    assert save_checkpoint_weights(model, tmp_path, trainable_only=True, frozen_from={"language_model": "lm"}) == 4
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert sorted(saved) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert all(name.startswith("model.multi_modal_projector.") for name in saved)
    assert (tmp_path / CHECKPOINT_INFO).is_file()


def test_other_ranks_copy_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 7B DDP run used to build a 14 GB CPU state dict on every rank before the rank check."""
    model = tiny_llava("sdpa")
    copies: list[int] = []
    clone = torch.Tensor.clone

    def counting_clone(self: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        copies.append(self.numel())
        return clone(self, *args, **kwargs)

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(torch.Tensor, "clone", counting_clone)
    assert save_checkpoint_weights(model, tmp_path / "ckpt", trainable_only=False, frozen_from={}) == 0
    assert copies == [] and not (tmp_path / "ckpt").exists()
    monkeypatch.setenv("RANK", "0")
    assert save_checkpoint_weights(model, tmp_path / "ckpt", trainable_only=False, frozen_from={}) > 0
    assert sum(copies) == sum(p.numel() for p in model.parameters())


def test_hf_folder_casts_every_floating_tensor_to_model_dtype(tmp_path: Path) -> None:
    """Trainable parameters may be fp32 masters beside bf16 frozen ones: the export is all `model.dtype`."""
    from transformers import AutoModelForImageTextToText

    model = tiny_llava("sdpa")
    model.model.language_model.to(torch.bfloat16)  # frozen part in bf16, projector and tower in fp32
    write_hf_folder(model, runtime_state_dict(model, trainable_only=False), "bfloat16", tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    expected = model.model.multi_modal_projector.linear_1.weight.to(torch.bfloat16)
    assert torch.equal(loaded.model.multi_modal_projector.linear_1.weight, expected)


# Loads a folder as a client would (no llava-train import) and prints its greedy answer and first scores.
CLIENT = """
import json, sys
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
out = {}
for name, folder in json.loads(sys.argv[1]).items():
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    proc = AutoProcessor.from_pretrained(folder)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]
    prompt = proc.apply_chat_template(msgs, add_generation_prompt=True)
    inputs = proc(images=Image.open(sys.argv[2]), text=prompt, return_tensors="pt")
    gen = model.generate(
        **inputs, max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True
    )
    out[name] = {"ids": gen.sequences[0].tolist(), "scores": gen.scores[0][0].tolist(),
                 "padding": proc.tokenizer.padding_side}
assert "llava_train" not in sys.modules
print(json.dumps(out))
"""


def _client_answers(folders: dict[str, Path], image: str) -> dict:
    arg = json.dumps({k: str(v) for k, v in folders.items()})
    res = subprocess.run([sys.executable, "-c", CLIENT, arg, image], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _assert_same_weights(a: Path, b: Path) -> None:
    from transformers import AutoModelForImageTextToText

    sa = AutoModelForImageTextToText.from_pretrained(a).state_dict()
    sb = AutoModelForImageTextToText.from_pretrained(b).state_dict()
    assert sorted(sa) == sorted(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("export")
    paths = write_tiny_data(root / "data", n=8, text_only=2)
    paths.update(lm=str(root / "models" / "lm"), vision=str(root / "models" / "vision"), root=str(root))
    return paths


def test_stage1_checkpoint_exports_a_complete_hf_folder_that_rotates_with_it(workspace: dict[str, str]) -> None:
    out = Path(workspace["root"]) / "pretrain"
    cfg = tiny_config(workspace, "pretrain", str(out), max_steps=4, save_steps=2, save_total_limit=1, export_hf=True)
    run(from_dict(cfg))
    assert not (out / "checkpoint-2").exists()  # rotated away, its export with it
    ckpt = out / "checkpoint-4"
    hf = ckpt / HF_EXPORT_DIR
    # The checkpoint itself stays trainable-only; its export is the whole model, in the marker's manifest.
    assert sorted(load_file(ckpt / "model.safetensors")) == [
        f"model.multi_modal_projector.{k}"
        for k in ("linear_1.bias", "linear_1.weight", "linear_2.bias", "linear_2.weight")
    ]
    manifest = json.loads((ckpt / COMPLETE_MARKER).read_text())["files"]
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer_config.json"):
        assert f"{HF_EXPORT_DIR}/{name}" in manifest
    assert (hf / "chat_template.jinja").is_file() and not (ckpt / f".{HF_EXPORT_DIR}.tmp").exists()
    assert check_checkpoint(ckpt) is None
    _assert_same_weights(hf, out)
    answers = _client_answers({"export": hf, "final": out}, workspace["images"] + "/0.png")
    assert answers["export"] == answers["final"]
    assert answers["export"]["padding"] == "left"


def test_lora_checkpoint_export_is_the_merged_model(workspace: dict[str, str]) -> None:
    out = Path(workspace["root"]) / "lora"
    cfg = tiny_config(workspace, "finetune", str(out), max_steps=2, save_steps=2, export_hf=True)
    cfg["lora"] = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}
    run(from_dict(cfg))
    hf = out / "checkpoint-2" / HF_EXPORT_DIR
    assert not any("lora" in k for k in load_file(hf / "model.safetensors"))
    _assert_same_weights(hf, out)
    answers = _client_answers({"export": hf, "final": out}, workspace["images"] + "/0.png")
    assert answers["export"] == answers["final"]


def test_a_failed_export_leaves_a_complete_checkpoint_and_the_run_goes_on(
    workspace: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import llava_train.training.checkpoint as checkpoint

    def broken(model: object, ckpt: Path, *args: object) -> None:
        (ckpt / f".{HF_EXPORT_DIR}.tmp").mkdir()  # half written
        raise RuntimeError("export broke")

    monkeypatch.setattr(checkpoint, "export_checkpoint", broken)
    out = Path(workspace["root"]) / "broken"
    run(from_dict(tiny_config(workspace, "pretrain", str(out), max_steps=2, save_steps=2, export_hf=True)))
    ckpt = out / "checkpoint-2"
    assert check_checkpoint(ckpt) is None and (out / "model.safetensors").is_file()
    assert not (ckpt / HF_EXPORT_DIR).exists() and not (ckpt / f".{HF_EXPORT_DIR}.tmp").exists()


def test_export_hf_must_be_a_bool() -> None:
    from llava_train.config_io import ConfigError

    with pytest.raises(ConfigError, match="train.export_hf must be true or false, got 'yes'"):
        from_dict({"train": {"output_dir": "x", "export_hf": "yes"}})
