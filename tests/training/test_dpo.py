"""Stage dpo on CPU with the tiny preset: preference rows in TRL / RLAIF-V / LLaVA-RLHF form, exact pair labels,
bad pairs, step-0 loss ln 2 with zero rewards, rewards that separate, resume, LoRA with the adapter reference."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from llava_train.config import DpoConfig, from_dict
from llava_train.config_io import ConfigError
from llava_train.train import run
from llava_train.training.dpo import preference_loss
from tiny_models import losses, tiny_config, write_tiny_data

NAMES = ["red", "green", "blue", "yellow"]
LN2_FP32 = torch.tensor(math.log(2.0), dtype=torch.float32).item()  # -log sigmoid(0) in fp32
TYPED_QUESTION = [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]


def wrong(colour: str) -> str:
    return NAMES[(NAMES.index(colour) + 1) % len(NAMES)]


def preference_rows(n: int) -> list[dict[str, Any]]:
    """Colour questions about image i (colour NAMES[i % 4]) with the right answer chosen, in the three forms, a
    multi-turn prompt and text-only rows."""
    rows: list[dict[str, Any]] = []
    for i in range(n):
        right, bad = NAMES[i % 4], wrong(NAMES[i % 4])
        form = i % 4
        if form == 0:  # TRL: messages with typed content, `images`
            rows.append(
                {
                    "id": f"trl{i}",
                    "images": [f"{i}.png"],
                    "prompt": [{"role": "user", "content": TYPED_QUESTION}],
                    "chosen": [{"role": "assistant", "content": right}],
                    "rejected": [{"role": "assistant", "content": bad}],
                }
            )
        elif form == 1:  # RLAIF-V: question string without a tag, image
            rows.append({"id": f"rlaif{i}", "image": f"{i}.png", "question": "What colour is it?", "chosen": right,
                         "rejected": bad})  # fmt: skip
        elif form == 2:  # LLaVA-RLHF: conversations prompt, output_1 / output_2, preference
            rows.append(
                {
                    "id": f"rlhf{i}",
                    "image": f"{i}.png",
                    "conversations": [{"from": "human", "value": "<image>\nWhat colour is it?"}],
                    "output_1": {"from": "llava", "value": bad},
                    "output_2": {"from": "llava", "value": right},
                    "preference": 2,
                }
            )
        else:  # multi-turn prompt: the earlier reply is context, only the last one trains
            rows.append(
                {
                    "id": f"multi{i}",
                    "image": f"{i}.png",
                    "prompt": [
                        {"from": "human", "value": "<image>\nWhat colour is it?"},
                        {"from": "gpt", "value": right},
                        {"from": "human", "value": "Answer again."},
                    ],
                    "chosen": right,
                    "rejected": bad,
                }
            )
    for i in range(4):
        rows.append({"id": f"text{i}", "prompt": f"Say {NAMES[i]}.", "chosen": NAMES[i], "rejected": wrong(NAMES[i])})
    return rows


BAD_ROWS = [
    {"id": "same", "image": "0.png", "question": "What colour is it?", "chosen": "red", "rejected": " red "},
    {"id": "one-sided", "image": "0.png", "question": "What colour is it?", "chosen": "red"},
    {"id": "long", "image": "0.png", "question": "What colour is it?", "chosen": "red " * 400, "rejected": "blue"},
]


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("dpo")
    paths = write_tiny_data(root / "data", n=16)
    paths.update(lm=str(root / "models" / "lm"), vision=str(root / "models" / "vision"), root=str(root))
    (root / "data" / "pairs.json").write_text(json.dumps(preference_rows(16)))
    (root / "data" / "pairs_bad.json").write_text(json.dumps(preference_rows(16) + BAD_ROWS))
    (root / "data" / "heldout.json").write_text(json.dumps(preference_rows(8)[:8]))
    paths["pairs"] = str(root / "data" / "pairs.json")
    # The starting model: a short finetune, HF-native.
    finetuned = root / "runs" / "finetune"
    run(from_dict(tiny_config(paths, "finetune", str(finetuned), max_steps=8, save_steps=100)))
    paths["finetuned"] = str(finetuned)
    return paths


def dpo_config(ws: dict[str, str], out: Path, reference: str = "frozen", **train: Any) -> dict[str, Any]:
    cfg = tiny_config(ws, "finetune", str(out), **{"max_steps": 6, "save_steps": 100, "learning_rate": 1e-3, **train})
    cfg["stage"] = "dpo"
    cfg["model"]["init_from"] = ws["finetuned"]
    cfg["data"]["train"][0]["path"] = ws["pairs"]
    cfg["data"]["group_by_modality_length"] = False
    cfg["dpo"] = {"beta": 0.1, "reference": reference}
    return cfg


def test_sigmoid_loss_is_ln2_when_reference_is_policy() -> None:
    logps = torch.tensor([-3.5, -7.25, -4.0, -2.0])  # [chosen x2; rejected x2]
    loss, metrics = preference_loss(logps, logps.clone(), torch.tensor([2, 3, 2, 1]), DpoConfig())
    assert loss.item() == LN2_FP32
    assert all(torch.equal(metrics[k], torch.zeros(2)) for k in ("rewards/chosen", "rewards/rejected"))


def test_pairs_in_every_form_give_exact_labels_sharing_the_image(ws: dict[str, str]) -> None:
    from llava_train.components import load_components
    from llava_train.data.dataset import build_dataset
    from llava_train.data.preference import PairCollator

    cfg = from_dict(dpo_config(ws, Path(ws["root"]) / "runs" / "labels"))
    parts = load_components(cfg)
    ds = build_dataset(cfg.data, parts, preference=True)
    assert len(ds) == 20
    tok = parts.tokenizer
    for i in range(len(ds)):
        item = ds[i]
        chosen, rejected = item["input_ids"].tolist(), item["rejected_input_ids"].tolist()
        trained_c = [t for t in item["labels"].tolist() if t != -100]
        trained_r = [t for t in item["rejected_labels"].tolist() if t != -100]
        # One trained span each: the final reply + the end marker; the prompt (image block included) is shared.
        right = NAMES[i % 4] if i < 16 else NAMES[i - 16]
        assert tok.decode(trained_c).strip() == f"{right}</s>", item["id"]
        assert tok.decode(trained_r).strip() == f"{wrong(right)}</s>", item["id"]
        prompt_c = len(chosen) - len(trained_c)
        assert chosen[:prompt_c] == rejected[: len(rejected) - len(trained_r)], item["id"]
        assert item["labels"][prompt_c:].ne(-100).all() and item["labels"][:prompt_c].eq(-100).all()
        assert item["num_images"] == (0 if i >= 16 else 1)
    batch = PairCollator(tok.pad_token_id)([ds[0], ds[1], ds[16]])
    assert batch["input_ids"].shape[0] == 6 and batch["pixel_values"].shape[0] == 4  # 2 images x 2 sides
    assert batch["ids"] == [ds[0]["id"], ds[1]["id"], ds[16]["id"]] * 2
    assert batch["indices"].tolist() == [0, 1, 16]


def test_rlaif_v_parquet_with_embedded_images_reads_as_published(ws: dict[str, str], tmp_path: Path) -> None:
    """RLAIF-V's parquet layout (question / chosen / rejected / an HF `Image` struct of PNG bytes, extra columns)."""
    import io

    import datasets
    from PIL import Image

    from llava_train.components import load_components
    from llava_train.data.dataset import build_dataset

    def png(colour: str) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (40, 32), {"red": (220, 30, 30), "blue": (30, 30, 220)}[colour]).save(buf, format="PNG")
        return buf.getvalue()

    rows = {
        "ds_name": ["OmniLMM-12B", "RLHF-V"],
        "image": [{"bytes": png("red"), "path": None}, {"bytes": png("blue"), "path": None}],
        "question": ["What colour is it?", "Describe it."],
        "chosen": ["red", "A blue image."],
        "rejected": ["blue", "A red image."],
        "origin_dataset": ["x", "y"],
        "idx": [0, 1],
    }
    features = datasets.Features(
        {k: datasets.Image() if k == "image" else datasets.Value("int64" if k == "idx" else "string") for k in rows}
    )
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "rlaif-v-00000.parquet"))
    cfg_dict = dpo_config(ws, tmp_path / "run")
    cfg_dict["data"]["train"] = [{"path": str(tmp_path)}]
    cfg = from_dict(cfg_dict)
    parts = load_components(cfg)
    ds = build_dataset(cfg.data, parts, preference=True)
    assert len(ds) == 2
    item = ds[1]
    assert item["num_images"] == 1 and item["pixel_values"].shape[0] == 1
    tok = parts.tokenizer
    assert tok.decode([t for t in item["labels"].tolist() if t != -100]).strip() == "A blue image.</s>"
    assert tok.decode([t for t in item["rejected_labels"].tolist() if t != -100]).strip() == "A red image.</s>"
    assert parts.image_token_id in item["input_ids"].tolist()


def test_inspect_shows_both_sides_with_the_final_reply_trained(ws: dict[str, str], tmp_path: Path) -> None:
    import io

    from llava_train.components import load_components
    from llava_train.data.validate import inspect_samples

    cfg = from_dict(dpo_config(ws, tmp_path / "run"))
    out = io.StringIO()
    jsonl = tmp_path / "samples.jsonl"
    inspect_samples(cfg, load_components(cfg), indices=[3], jsonl_path=str(jsonl), out=out, color=False)
    text = out.getvalue()
    chosen, rejected = text.split("# chosen\n")[1].split("# rejected\n")
    # Multi-turn: the earlier reply is context; only the final one is marked.
    assert chosen.count("[[") == 1 and "ASSISTANT: yellow</s>" in chosen and chosen.strip().endswith("[[ yellow</s>]]")
    assert rejected.strip().endswith("[[ red</s>]]")
    line = json.loads(jsonl.read_text())
    prompt = next(i for i, label in enumerate(line["labels"]) if label != -100)
    assert line["input_ids"][:prompt] == line["rejected_input_ids"][:prompt]
    assert line["labels"][prompt:] != line["rejected_labels"][prompt:]


def test_bad_pairs_are_reported_by_reason(ws: dict[str, str]) -> None:
    from llava_train.components import load_components
    from llava_train.data.validate import validate

    cfg_dict = dpo_config(ws, Path(ws["root"]) / "runs" / "validate")
    cfg_dict["data"]["train"][0]["path"] = str(Path(ws["root"]) / "data" / "pairs_bad.json")
    cfg = from_dict(cfg_dict)
    report = validate(cfg, load_components(cfg), num_workers=1)
    bad = {b["id"]: b["reason"] for b in report["bad_rows"]}
    assert bad == {"same": "identical_pair", "one-sided": "missing_side", "long": "too_long"}
    detail = next(b["detail"] for b in report["bad_rows"] if b["id"] == "long")
    assert "chosen" in detail and "never truncated" in detail


def test_config_checks() -> None:
    base = {"stage": "dpo", "train": {"output_dir": "/tmp/x"}}
    with pytest.raises(ConfigError, match="model.init_from"):
        from_dict(base)
    with pytest.raises(ConfigError, match="needs lora.enabled"):
        from_dict({**base, "model": {"init_from": "/x"}, "dpo": {"reference": "adapter"}})
    with pytest.raises(ConfigError, match="dpo.loss"):
        from_dict({**base, "model": {"init_from": "/x"}, "dpo": {"loss": "kto"}})


def test_bf16_frozen_reference_runs_under_the_policy_autocast(ws: dict[str, str]) -> None:
    """bf16 frozen parts + fp32 masters (the GPU recipe's precision): the frozen copy runs under the same autocast as
    the policy (outside accelerate's prepared forward it would mix fp32 and bf16), so step 0 is still exact."""
    cfg = dpo_config(ws, Path(ws["root"]) / "runs" / "dpo-bf16", "frozen", max_steps=2, bf16=True)
    cfg["model"]["dtype"] = "bfloat16"
    logs = [h for h in run(from_dict(cfg)).log_history if "loss" in h]
    assert logs[0]["rewards/margins"] == 0.0 and logs[0]["loss"] == LN2_FP32


def test_frozen_reference_is_refused_under_zero3(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers.integrations

    from llava_train.training.dpo import preference_trainer_kwargs

    cfg = from_dict({"stage": "dpo", "model": {"init_from": "/x"}, "train": {"output_dir": "/tmp/x"}})
    monkeypatch.setattr(transformers.integrations, "is_deepspeed_zero3_enabled", lambda: True)
    with pytest.raises(ConfigError, match="dpo.reference=precomputed"):
        preference_trainer_kwargs(cfg, torch.nn.Linear(1, 1))
    cfg.dpo.reference = "precomputed"
    assert preference_trainer_kwargs(cfg, torch.nn.Linear(1, 1))["ref_model"] is None


@pytest.mark.parametrize("reference", ["frozen", "precomputed"])
def test_step0_loss_is_ln2_rewards_zero_then_rewards_separate(reference: str, ws: dict[str, str]) -> None:
    out = Path(ws["root"]) / "runs" / f"dpo-{reference}"
    cfg = dpo_config(ws, out, reference, max_steps=40, learning_rate=3e-3, lr_scheduler_type="constant")
    result = run(from_dict(cfg))
    logs = [h for h in result.log_history if "loss" in h]
    first = logs[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    if reference == "frozen":  # the frozen copy is the policy bit for bit at step 0: exactly ln 2 (fp32)
        assert first["loss"] == LN2_FP32
        assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0 and first["rewards/margins"] == 0.0
    else:  # reference log-probs of other batch compositions (padding): equal to float rounding
        assert abs(first["rewards/margins"]) < 1e-5

    # The pairs need the image (each wrong answer is another image's right one): the rewards separate over the
    # last quarter of the run (measured: margins ~0.9, loss ~0.4 over steps 31-40, from 0 and ln 2).
    def late(key: str) -> float:
        return sum(h[key] for h in logs[-10:]) / 10

    assert late("rewards/margins") > 0.3 and late("rewards/accuracies") > 0.7
    assert late("rewards/chosen") > late("rewards/rejected")
    assert late("loss") < 0.6
    if reference == "precomputed":
        assert (out / "dpo_reference_logps.safetensors").is_file()
    from transformers import AutoModelForImageTextToText, AutoProcessor

    AutoModelForImageTextToText.from_pretrained(out)
    AutoProcessor.from_pretrained(out)


@pytest.mark.parametrize("reference", ["frozen", "precomputed", "adapter"])
def test_kill_9_and_resume_continue_the_dpo_loss_sequence_exactly(reference: str, ws: dict[str, str]) -> None:
    """kill -9 (tests/fault_runner.py) at step 4 of 6, after checkpoint-3: resume=auto gives the uninterrupted
    run's losses (precomputed: read back from the run folder; adapter: LoRA, the resumed model without adapters)."""
    root = Path(ws["root"]) / "runs" / f"resume-{reference}"

    def config(out: Path, **train: Any) -> dict[str, Any]:
        cfg = dpo_config(ws, out, reference, save_steps=3, **train)
        if reference == "adapter":
            cfg["lora"] = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}
            cfg["train"]["learning_rate"] = 1e-2
        return cfg

    full = losses(run(from_dict(config(root / "full"))).log_history)
    cut = root / "cut"
    path = root / "cut.yaml"
    path.write_text(yaml.safe_dump(config(cut)))
    runner = Path(__file__).resolve().parents[1] / "fault_runner.py"
    proc = subprocess.run(
        [sys.executable, str(runner), "sigkill", "4", "0", str(path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert (cut / "checkpoint-3" / "llava_train_complete.json").is_file()
    resumed = losses(run(from_dict(config(cut, resume_from_checkpoint="auto"))).log_history)
    assert sorted(s for s in resumed if s > 3) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5, abs=1e-6), (step, resumed[step], full[step])
    assert len({round(full[s], 4) for s in (4, 5, 6)}) > 1  # the losses move (not ln 2 throughout)


def test_lora_dpo_with_adapter_reference(ws: dict[str, str]) -> None:
    out = Path(ws["root"]) / "runs" / "dpo-lora"
    cfg = dpo_config(ws, out, "adapter", max_steps=12, learning_rate=1e-2)
    cfg["lora"] = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}
    result = run(from_dict(cfg))
    logs = [h for h in result.log_history if "loss" in h]
    assert logs[0]["rewards/margins"] == 0.0 and logs[0]["loss"] == LN2_FP32  # adapters start as a no-op
    assert logs[-1]["rewards/margins"] > 0
    from transformers import AutoModelForImageTextToText

    merged = AutoModelForImageTextToText.from_pretrained(out)
    assert not any("lora_" in n for n, _ in merged.named_parameters())


def test_eval_pairs_log_eval_rewards_with_the_precomputed_reference(ws: dict[str, str]) -> None:
    """`data.eval` pairs get their own precomputed reference (from the starting model, at step 0)."""
    out = Path(ws["root"]) / "runs" / "dpo-eval"
    cfg = dpo_config(ws, out, "precomputed", max_steps=4, eval_strategy="steps", eval_steps=2)
    cfg["data"]["eval"] = [dict(cfg["data"]["train"][0])]
    result = run(from_dict(cfg))
    evals = [h for h in result.log_history if "eval_loss" in h]
    assert len(evals) == 2
    for h in evals:
        assert {"eval_rewards/chosen", "eval_rewards/margins", "eval_rewards/accuracies"} <= set(h)
    from safetensors.torch import load_file

    table = load_file(out / "dpo_reference_logps.safetensors")
    assert table["train"].shape == (20, 2) and table["eval"].shape == (20, 2)
    assert torch.allclose(table["train"], table["eval"])  # the same pairs, the same starting model
