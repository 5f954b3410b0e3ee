"""End-to-end stages on CPU with a tiny random-init LLaVA: artifacts, hand-off, HF-native reload, resume."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llava_train.config import from_dict
from llava_train.train import run
from tiny_models import losses, tiny_config, write_tiny_data


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("e2e")
    paths = write_tiny_data(root / "data")
    paths["lm"] = str(root / "models" / "lm")
    paths["vision"] = str(root / "models" / "vision")
    paths["root"] = str(root)
    return paths


# Per-step losses of the seeded tiny runs (as torchtune pins its recipes' losses): any change to labels, the
# loss, the data order, the optimizer groups or initialisation shows here (re-pinned when the builder stopped
# random-initialising what the checkpoints overwrite and new embedding rows became the old rows' mean).
# fp32 on CPU; 4 decimals.
PRETRAIN_LOSSES = [
    6.2168, 6.0801, 6.1028, 6.0307, 5.9567, 5.9315, 5.8076, 5.8736, 5.7889, 5.8828,
    5.875, 5.8145, 5.748, 5.8483, 5.7804, 5.7465, 5.6846, 5.721, 5.7742, 5.8421,
]  # fmt: skip
FINETUNE_LOSSES = [
    6.1743, 5.5401, 5.6889, 5.1888, 4.9507, 4.6183, 4.435, 4.2486, 4.0308, 3.7889,
    3.7578, 3.5925, 3.4676, 3.3887, 3.1728, 3.0981, 3.1366, 3.0823, 3.0725, 2.9078,
]  # fmt: skip


@pytest.fixture(scope="module")
def pretrained(workspace: dict[str, str]) -> dict[str, object]:
    out = str(Path(workspace["root"]) / "runs" / "pretrain")
    result = run(from_dict(tiny_config(workspace, "pretrain", out)))
    return {"out": out, "result": result}


def test_pretrain_writes_projector_and_small_resumable_checkpoints(pretrained: dict) -> None:
    out = Path(pretrained["out"])
    assert pretrained["result"].global_step == 20
    proj = load_file(out / "projector.safetensors")
    assert sorted(proj) == ["linear_1.bias", "linear_1.weight", "linear_2.bias", "linear_2.weight"]
    for step in (10, 20):
        ckpt = out / f"checkpoint-{step}"
        for name in (
            "projector.safetensors",
            "model.safetensors",
            "optimizer.pt",
            "scheduler.pt",
            "trainer_state.json",
            "llava_train_config.yaml",
            "llava_train_checkpoint.json",
        ):
            assert (ckpt / name).is_file(), f"{ckpt.name} lacks {name}"
        weights = load_file(ckpt / "model.safetensors")
        # Only what trains is in a stage-1 checkpoint: the projector's four tensors.
        assert sorted(weights) == sorted(f"model.multi_modal_projector.{k}" for k in proj)
    last = load_file(out / "checkpoint-20" / "model.safetensors")
    for k, v in proj.items():
        assert torch.equal(last[f"model.multi_modal_projector.{k}"], v)
    # The final folder is a full HF-native model.
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert (out / "llava_train_config.yaml").is_file()
    loss = losses(pretrained["result"].log_history)
    first, last_five = loss[1], sum(loss[s] for s in range(16, 21)) / 5
    assert last_five < first, f"stage-1 loss did not go down: {first} -> {last_five}"


def test_final_folder_loads_with_plain_transformers_and_generates(pretrained: dict, workspace: dict) -> None:
    script = textwrap.dedent(f"""
        import sys, torch
        from PIL import Image
        from transformers import AutoModelForImageTextToText, AutoProcessor
        out = {pretrained["out"]!r}
        model = AutoModelForImageTextToText.from_pretrained(out)
        proc = AutoProcessor.from_pretrained(out)
        msgs = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "Describe."}}]}}]
        prompt = proc.apply_chat_template(msgs, add_generation_prompt=True)
        inputs = proc(images=Image.open({workspace["images"] + "/0.png"!r}), text=prompt, return_tensors="pt")
        ids = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        assert ids.shape[1] > inputs["input_ids"].shape[1]
        assert "llava_train" not in sys.modules
        print("OK", prompt.count("<image>"))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().startswith("OK")


def test_saved_chat_template_renders_the_trained_prompt(pretrained: dict) -> None:
    from transformers import AutoProcessor

    from llava_train.data.templates import get_template
    from llava_train.llava_format import Turn

    proc = AutoProcessor.from_pretrained(pretrained["out"])
    turns = [Turn("user", "<image>\nDescribe."), Turn("assistant", "a red image")]
    msgs = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]},
        {"role": "assistant", "content": "a red image"},
    ]
    rendered = proc.apply_chat_template(msgs)
    assert rendered == get_template("plain").prompt(turns, proc.tokenizer)


def test_finetune_starts_from_stage1_projector_and_learns(pretrained: dict, workspace: dict) -> None:
    from llava_train.components import load_components

    out = str(Path(workspace["root"]) / "runs" / "finetune")
    cfg = from_dict(tiny_config(workspace, "finetune", out, learning_rate=3e-3))
    cfg.model.init_from = pretrained["out"]
    model = load_components(cfg).model
    saved = load_file(Path(pretrained["out"]) / "projector.safetensors")
    state = model.model.multi_modal_projector.state_dict()
    for k, v in saved.items():
        assert torch.equal(state[k], v), f"projector {k} not loaded from stage 1"
    result = run(cfg)
    loss = losses(result.log_history)
    assert [loss[s] for s in range(1, 21)] == pytest.approx(FINETUNE_LOSSES, abs=1e-3)
    assert (Path(out) / "model.safetensors").is_file()


def test_pretrain_loss_sequence_is_pinned(pretrained: dict) -> None:
    loss = losses(pretrained["result"].log_history)
    assert [loss[s] for s in range(1, 21)] == pytest.approx(PRETRAIN_LOSSES, abs=1e-3)


@pytest.mark.parametrize("batching", ["grouped", "padded", "packed"])
def test_resume_reproduces_the_uninterrupted_loss_sequence(batching: str, workspace: dict) -> None:
    """kill -9 right after checkpoint-4 of 8 (mid-epoch): resume=auto continues the losses exactly, whatever the
    batching (LLaVA's modality-grouped sampler, HF's random one, packed rows)."""
    root = Path(workspace["root"]) / "runs" / f"resume-{batching}"

    def config(out: Path, **train: object) -> dict:
        cfg = tiny_config(workspace, "finetune", str(out), max_steps=8, save_steps=4, **train)
        cfg["data"]["group_by_modality_length"] = batching == "grouped"
        if batching == "packed":
            cfg["data"].update(packing=True, packing_length=256)
            cfg["train"]["per_device_train_batch_size"] = 1
        return cfg

    full = run(from_dict(config(root / "full")))
    cut = root / "cut"
    shutil.copytree(root / "full" / "checkpoint-4", cut / "checkpoint-4")
    resumed = run(from_dict(config(cut, resume_from_checkpoint="auto")))
    a, b = losses(full.log_history), losses(resumed.log_history)
    assert sorted(s for s in b if s > 4) == [5, 6, 7, 8]
    for step in (5, 6, 7, 8):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), f"step {step}: {b[step]} != {a[step]}"


def test_lora_finetune_checkpoints_hold_projector_and_final_folder_is_merged(
    pretrained: dict, workspace: dict
) -> None:
    out = Path(workspace["root"]) / "runs" / "lora"
    cfg = tiny_config(workspace, "finetune", str(out), max_steps=6, save_steps=3)
    cfg["model"]["init_from"] = pretrained["out"]
    cfg["lora"] = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}
    cfg["optim"] = {"projector_lr": 1e-3}
    run(from_dict(cfg))
    stage1 = load_file(Path(pretrained["out"]) / "projector.safetensors")
    for step in (3, 6):
        ckpt = out / f"checkpoint-{step}"
        adapter = load_file(ckpt / "adapter_model.safetensors")
        assert any("lora_A" in k for k in adapter) and not any("vision_tower" in k for k in adapter)
        proj_keys = [k for k in adapter if "multi_modal_projector" in k]
        assert len(proj_keys) == 4, "the intermediate checkpoint must carry the trained projector"
        assert (ckpt / "projector.safetensors").is_file()
    final_proj = load_file(out / "projector.safetensors")
    assert any(not torch.equal(final_proj[k], stage1[k]) for k in stage1), "projector did not train"
    # The final folder is a merged, HF-native model (no adapter needed to load it).
    from transformers import AutoModelForImageTextToText

    merged = AutoModelForImageTextToText.from_pretrained(out)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    for k, v in final_proj.items():
        assert torch.equal(merged.model.multi_modal_projector.state_dict()[k], v)
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_packed_finetune_trains_on_whole_sample_rows(workspace: dict) -> None:
    out = Path(workspace["root"]) / "runs" / "packed"
    cfg = tiny_config(workspace, "finetune", str(out), max_steps=8, per_device_train_batch_size=1, save_steps=100)
    cfg["data"].update({"packing": True, "packing_length": 256})
    result = run(from_dict(cfg))
    loss = losses(result.log_history)
    assert len(loss) == 8 and all(v == v and v > 0 for v in loss.values())
    assert sum(loss[s] for s in (6, 7, 8)) / 3 < sum(loss[s] for s in (1, 2, 3)) / 3
    assert (out / "model.safetensors").is_file()


def test_run_folder_has_exact_data_summary(pretrained: dict) -> None:
    summary = json.loads((Path(pretrained["out"]) / "data_summary.json").read_text())
    (src,) = summary["sources"]
    assert (summary["items"], src["rows"], src["good"], src["used"], src["images"], src["text_only"]) == (
        32,
        32,
        32,
        32,
        32,
        0,
    )
    assert summary["skipped"] == {} and src["bad_by_reason"] == {} and (src["split"], src["weight"]) == ("train", 1.0)
    # <s> + 16 image tokens + caption "a <colour> image" + "\n": the same numbers `data validate` reports.
    assert src["tokens"] == {"p50": 21, "p90": 26, "p99": 26, "max": 26}


def test_prediction_rows_for_the_wandb_table(pretrained: dict, workspace: dict) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from llava_train.training.predictions import eval_predictions_fn

    cfg = from_dict(tiny_config(workspace, "finetune", str(Path(workspace["root"]) / "runs" / "unused")))
    cfg.data.eval = cfg.data.train
    cfg.wandb.log_predictions = 2
    model = AutoModelForImageTextToText.from_pretrained(pretrained["out"]).train()
    rows = eval_predictions_fn(cfg, AutoProcessor.from_pretrained(pretrained["out"]))(model)
    assert [r["reference"] for r in rows] == ["red", "green"]
    assert all(isinstance(r["prediction"], str) and r["image"] is not None for r in rows)
    # The stage-1 folder carries the plain template: image placeholder, then the earlier reply.
    assert rows[0]["prompt"] == "<image>red\n"
    assert model.training, "model returned to training mode"
    cfg.data.eval = []
    assert eval_predictions_fn(cfg, None) is None


# -- the modern recipe: the LM's own chat template (`template: tokenizer`), served as trained --------------


@pytest.fixture(scope="module")
def tokenizer_template_run(workspace: dict[str, str]) -> dict[str, str]:
    """A Qwen2-style tiny LM + SigLIP finetuned with `template: tokenizer` and a configured system prompt."""
    root = Path(workspace["root"])
    out = root / "runs" / "tokenizer-template"
    cfg = tiny_config(workspace, "finetune", str(out), max_steps=4, save_strategy="no")
    cfg["model"] = {
        "language_model": str(root / "models" / "lm_chatml"),
        "vision_tower": str(root / "models" / "vision_siglip"),
        "preset": "tiny_chatml",
        "dtype": "float32",
    }
    cfg["data"].update(template="tokenizer", system_prompt="Answer with one word.")
    run(from_dict(cfg))
    return {"out": str(out), **workspace}


README_SNIPPET = """
import json, sys
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
model = AutoModelForImageTextToText.from_pretrained(sys.argv[1])
processor = AutoProcessor.from_pretrained(sys.argv[1])
image = Image.open(sys.argv[2])
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=image, text=prompt, return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
print(processor.decode(out[0]))
assert "llava_train" not in sys.modules
print(json.dumps(inputs["input_ids"][0].tolist()))
"""


def test_tokenizer_template_model_serves_in_plain_transformers(tokenizer_template_run: dict[str, str]) -> None:
    """The README's snippet, in a process that never imports llava_train, gets exactly the training prompt ids."""
    from llava_train.config import load_config
    from llava_train.data.templates import run_template
    from llava_train.data.tokenize import load_tokenizer, tokenize_conversation
    from llava_train.llava_format import normalize_conversation

    out = tokenizer_template_run["out"]
    image = str(Path(tokenizer_template_run["images"]) / "0.png")
    res = subprocess.run(
        [sys.executable, "-c", README_SNIPPET, out, image], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    served = json.loads(res.stdout.strip().splitlines()[-1])
    cfg = load_config(Path(out) / "llava_train_config.yaml")
    tokenizer = load_tokenizer(out)
    turns = normalize_conversation(
        [{"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "red"}]
    )
    trained = tokenize_conversation(
        turns, run_template(cfg), tokenizer, tokenizer.convert_tokens_to_ids("<image>"), 16
    )
    first_trained = next(i for i, lab in enumerate(trained.labels) if lab != -100)
    assert served == trained.input_ids[:first_trained]
    assert "Answer with one word." in tokenizer.decode(served)


def test_predict_eval_and_prediction_table_on_a_tokenizer_template_model(
    tokenizer_template_run: dict[str, str], tmp_path: Path
) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from llava_train.cli import main as cli
    from llava_train.training.predictions import eval_predictions_fn

    out, images = tokenizer_template_run["out"], tokenizer_template_run["images"]
    assert (
        cli(["predict", out, "--image", f"{images}/0.png", "--prompt", "What colour is it?", "--max-new-tokens", "3"])
        == 0
    )
    assert (
        cli(
            [
                "eval",
                out,
                "--data",
                tokenizer_template_run["finetune"],
                "--image-folder",
                images,
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "eval_report.json").read_text())
    assert report["n"] == 36
    cfg = from_dict(tiny_config(tokenizer_template_run, "finetune", str(tmp_path / "unused")))
    cfg.data.eval, cfg.wandb.log_predictions = cfg.data.train, 2
    model = AutoModelForImageTextToText.from_pretrained(out)
    rows = eval_predictions_fn(cfg, AutoProcessor.from_pretrained(out))(model)
    assert [r["reference"] for r in rows] == ["red", "green"]
    assert rows[0]["prompt"].count("<image>") == 1 and "Answer with one word." in rows[0]["prompt"]


def test_a_missing_optional_extra_never_stops_the_final_save(
    workspace: dict, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """matplotlib (the `plot` extra) missing: the loss plot is a warning; the run trains and saves its model."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib...` now raises ImportError
    out = Path(workspace["root"]) / "runs" / "no-plot"
    cfg = tiny_config(workspace, "pretrain", str(out), max_steps=2, save_strategy="no")
    logger = __import__("logging").getLogger("llava_train")
    logger.addHandler(caplog.handler)
    try:
        run(from_dict(cfg))
    finally:
        logger.removeHandler(caplog.handler)
    assert (out / "model.safetensors").is_file() and (out / "projector.safetensors").is_file()
    assert not (out / "loss.png").exists()
    assert any("loss plot" in r.getMessage() and "matplotlib" in r.getMessage() for r in caplog.records)


def test_mixture_of_parquet_tar_and_json_trains_and_resumes_exactly(workspace: dict) -> None:
    """The finetune rows split across a folder of 3 parquet shards with embedded images, a webdataset tar and the
    JSON file: every row trains as a sample (same item count as JSON alone), and a resume from checkpoint-2 of 4
    reproduces the losses exactly."""
    import io
    import tarfile

    import datasets

    root = Path(workspace["root"]) / "mixed"
    rows = json.loads(Path(workspace["finetune"]).read_text())
    images = Path(workspace["images"])

    def embedded(row: dict) -> dict:
        blob = (images / row["image"]).read_bytes() if "image" in row else None
        return {"id": row["id"], "image": {"bytes": blob, "path": None} if blob else None, **_conv_json(row)}

    feats = datasets.Features(
        {"id": datasets.Value("string"), "image": datasets.Image(), "conversations": datasets.Value("string")}
    )
    (root / "parquet").mkdir(parents=True)
    for k in range(3):
        part = [embedded(r) for r in rows[k * 4 : k * 4 + 4]]
        table = {key: [p[key] for p in part] for key in ("id", "image", "conversations")}
        datasets.Dataset.from_dict(table, features=feats).to_parquet(str(root / "parquet" / f"train-{k}.parquet"))
    with tarfile.open(root / "train-0.tar", "w") as tf:
        for r in rows[12:24]:
            members = [(f"{r['id']}.json", json.dumps({"id": r["id"], "conversations": r["conversations"]}).encode())]
            if "image" in r:
                members.append((f"{r['id']}.png", (images / r["image"]).read_bytes()))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    (root / "rest.json").write_text(json.dumps(rows[24:]))

    def config(out: Path, **train: object) -> dict:
        cfg = tiny_config(workspace, "finetune", str(out), max_steps=4, save_steps=2, **train)
        cfg["data"]["train"] = [
            {"path": str(root / "parquet")},
            {"path": str(root / "train-0.tar")},
            {"path": str(root / "rest.json"), "image_folder": workspace["images"]},
        ]
        return cfg

    full = run(from_dict(config(root / "full")))
    summary = json.loads((root / "full" / "data_summary.json").read_text())
    assert summary["items"] == len(rows) and summary["skipped"] == {}
    assert [(s["name"], s["rows"]) for s in summary["sources"]] == [
        ("parquet", 12),
        ("train-0.tar", 12),
        ("rest.json", 12),
    ]
    shutil.copytree(root / "full" / "checkpoint-2", root / "cut" / "checkpoint-2")
    resumed = run(from_dict(config(root / "cut", resume_from_checkpoint="auto")))
    a, b = losses(full.log_history), losses(resumed.log_history)
    assert sorted(s for s in b if s > 2) == [3, 4]
    for step in (3, 4):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), f"step {step}: {b[step]} != {a[step]}"


def _conv_json(row: dict) -> dict:
    """The conversation as a JSON string column (how some hub datasets store it)."""
    return {"conversations": json.dumps(row["conversations"])}
