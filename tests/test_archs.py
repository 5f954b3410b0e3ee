"""LLaVA-NeXT and LLaVA-OneVision end to end on CPU with tiny parts and images of mixed sizes.

Per arch: both stages (projector + image newline handed over), the output served by plain
transformers on three aspect ratios, exact labels with variable image blocks, packed logits equal
to per-sample logits, LoRA checkpoints carrying the newline, and an over-long image rejected by
`data validate` as too_long.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from llava_train.config import from_dict
from llava_train.train import run
from tiny_models import ANYRES_SIZES, losses, tiny_config, write_anyres_data

ARCHS = ["llava_next", "llava_onevision"]
FRAMES = 4


def arch_config(ws: dict[str, str], arch: str, stage: str, out: str, **train: object) -> dict:
    config = tiny_config(ws, stage, out, **{"max_steps": 4, "save_steps": 2, **train})
    config["model"]["arch"] = arch
    config["data"]["model_max_length"] = 512
    config["data"]["video_frames"] = FRAMES
    config["data"]["group_by_modality_length"] = False
    return config


@pytest.fixture(scope="module", params=ARCHS)
def runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    ws = write_anyres_data(root / "data", arch)
    ws["lm"], ws["vision"] = str(root / "models" / "lm"), str(root / "models" / "vision")
    pre_out, ft_out = str(root / "runs" / "pretrain"), str(root / "runs" / "finetune")
    pre = run(from_dict(arch_config(ws, arch, "pretrain", pre_out)))
    ft_cfg = arch_config(ws, arch, "finetune", ft_out)
    ft_cfg["model"]["init_from"] = pre_out
    ft = run(from_dict(ft_cfg))
    return {"arch": arch, "ws": ws, "root": root, "pre": pre, "ft": ft, "pre_out": pre_out, "ft_out": ft_out}


def components(runs: dict, stage: str = "finetune", weights: bool = False):
    from llava_train.components import load_components

    config = arch_config(runs["ws"], runs["arch"], stage, str(runs["root"] / "probe"))
    if stage == "finetune":
        config["model"]["init_from"] = runs["pre_out"]
    cfg = from_dict(config)
    return cfg, load_components(cfg, weights=weights)


def test_both_stages_train_and_hand_over_projector_and_newline(runs: dict) -> None:
    pre_losses, ft_losses = losses(runs["pre"].log_history), losses(runs["ft"].log_history)
    assert sorted(pre_losses) == sorted(ft_losses) == [1, 2, 3, 4]
    assert ft_losses[4] < ft_losses[1]
    saved = load_file(str(Path(runs["pre_out"]) / "projector.safetensors"))
    assert sorted(saved) == ["image_newline", "linear_1.bias", "linear_1.weight", "linear_2.bias", "linear_2.weight"]
    early = load_file(str(Path(runs["pre_out"]) / "checkpoint-2" / "projector.safetensors"))
    assert not torch.equal(early["image_newline"], saved["image_newline"])  # stage 1 trains the newline
    _, parts = components(runs, weights=True)
    assert torch.equal(parts.model.model.image_newline.detach(), saved["image_newline"])
    assert torch.equal(parts.model.model.multi_modal_projector.linear_1.weight.detach(), saved["linear_1.weight"])
    config = json.loads((Path(runs["ft_out"]) / "config.json").read_text())
    assert config["model_type"] == runs["arch"]
    assert config["image_grid_pinpoints"][:2] == (
        [[32, 64], [64, 32]] if runs["arch"] == "llava_next" else [[32, 32], [32, 64]]
    )


SERVE = textwrap.dedent(
    """
    import json, sys
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor
    folder = sys.argv[1]
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    try:
        processor = AutoProcessor.from_pretrained(folder)
    except ImportError as e:
        # transformers' OneVision processor needs torchvision for its video half, even for images; build it
        # from the saved files as AutoProcessor would (images and text only).
        assert "Torchvision" in str(e) or "torchvision" in str(e), e
        from transformers import AutoTokenizer, LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor
        class NoVideo(LlavaOnevisionProcessor):
            def check_argument_for_proper_class(self, name, arg):
                if name == "video_processor" and arg is None:
                    return None
                return super().check_argument_for_proper_class(name, arg)
        saved = json.load(open(folder + "/processor_config.json"))
        image = {k: v for k, v in saved["image_processor"].items() if k != "image_processor_type"}
        keys = ("num_image_tokens", "vision_feature_select_strategy", "vision_aspect_ratio", "image_token",
                "video_token")
        processor = NoVideo(image_processor=LlavaOnevisionImageProcessorPil(**image),
                            tokenizer=AutoTokenizer.from_pretrained(folder), video_processor=None,
                            chat_template=open(folder + "/chat_template.jinja").read(),
                            **{k: saved[k] for k in keys})
    out = []
    for w, h in json.loads(sys.argv[2]):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=Image.new("RGB", (w, h), (220, 30, 30)), text=prompt, return_tensors="pt")
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        new_tokens = generated.shape[1] - inputs["input_ids"].shape[1]
        out.append([int((inputs["input_ids"] == model.config.image_token_id).sum()), new_tokens])
    assert not any(m.startswith("llava_train") for m in sys.modules)
    print(json.dumps(out))
    """
)


def test_output_generates_in_plain_transformers_on_three_aspect_ratios(runs: dict, tmp_path: Path) -> None:
    sizes = [(40, 32), (32, 96), (90, 30)]  # wide, tall, very wide: three different grids
    script = tmp_path / "serve.py"
    script.write_text(SERVE)
    proc = subprocess.run(
        [sys.executable, str(script), runs["ft_out"], json.dumps(sizes)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    _, parts = components(runs)
    assert [c for c, _ in counts] == [parts.geometry.image_tokens(h, w) for w, h in sizes]
    assert all(1 <= n <= 3 for _, n in counts)  # it generated (greedy may stop at the end marker)
    assert len({c for c, _ in counts}) == 3


def test_labels_are_exact_with_variable_image_blocks(runs: dict) -> None:
    from llava_train.data.dataset import build_dataset

    cfg, parts = components(runs)
    ds = build_dataset(cfg.data, parts, split="train")
    tok = parts.tokenizer
    seen_counts = set()
    for i in range(len(ds)):
        item = ds[i]
        ids, labels = item["input_ids"], item["labels"]
        row = json.loads(Path(runs["ws"]["finetune"]).read_text())[item["row"]]
        images = row.get("image")
        images = [images] if isinstance(images, str) else list(images or [])
        placeholder = ids == parts.image_token_id
        if images:
            sizes = [Image.open(Path(runs["ws"]["images"]) / p).size for p in images]
            expected = sum(parts.geometry.image_tokens(h, w, len(images)) for w, h in sizes)
            assert int(placeholder.sum()) == expected, row["id"]
            seen_counts.add(expected)
            assert item["image_sizes"].tolist() == [[h, w] for w, h in sizes]
            crops = sum(parts.geometry.crops(h, w, len(images)) for w, h in sizes)
            assert tuple(item["pixel_values"].shape) == (crops, 3, 32, 32)
        if "video" in row:
            video = ids == parts.video_token_id
            assert int(video.sum()) == parts.geometry.video_tokens(FRAMES) == FRAMES * 2 * 2 + 1
            assert tuple(item["pixel_values_videos"].shape) == (1, FRAMES, 3, 32, 32)
        # Exactly the assistant replies + end marker train; no image or video position ever does.
        trained = labels != -100
        assert not bool((trained & (placeholder | (ids == (parts.video_token_id or -1)))).any())
        assert torch.equal(labels[trained], ids[trained])
        replies = [t["value"] for t in row["conversations"] if t["from"] == "gpt"]
        assert tok.decode(ids[trained]).replace(" ", "") == "".join(r + "</s>" for r in replies).replace(" ", "")
    assert len(seen_counts) >= 4  # variable image blocks


def test_packed_logits_equal_per_sample_logits(runs: dict) -> None:
    from transformers import AutoModelForImageTextToText

    from llava_train.data.collator import BATCH_ONLY_KEYS
    from llava_train.data.dataset import build_dataset
    from llava_train.data.packing import PackingCollator

    cfg, parts = components(runs)
    ds = build_dataset(cfg.data, parts, split="train")
    model = AutoModelForImageTextToText.from_pretrained(runs["ft_out"], attn_implementation="sdpa").eval()
    by_id = {ds[i]["id"]: ds[i] for i in range(len(ds))}
    picks = ["f0", "f1", "t0", "f2"] + (["m5", "v0"] if runs["arch"] == "llava_onevision" else [])
    items = [by_id[p] for p in picks]
    ov = runs["arch"] == "llava_onevision"
    batch = PackingCollator(parts.tokenizer.pad_token_id, batch_num_images=ov)([items])
    keys = ("pixel_values", "image_sizes", "pixel_values_videos")
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k not in ("labels", *BATCH_ONLY_KEYS)}).logits
        start = 0
        for it in items:
            n = len(it["input_ids"])
            alone_inputs = {k: it[k] for k in keys if k in it}
            if ov and "pixel_values" in it:
                alone_inputs["batch_num_images"] = torch.tensor([it["num_images"]])
            alone = model(input_ids=it["input_ids"][None], **alone_inputs).logits
            torch.testing.assert_close(packed[0, start : start + n], alone[0], atol=1e-5, rtol=0)
            start += n


def test_lora_checkpoints_carry_the_newline_and_resume_restores_it(runs: dict, tmp_path: Path) -> None:
    out = str(tmp_path / "lora")
    config = arch_config(runs["ws"], runs["arch"], "finetune", out, max_steps=4, save_steps=2)
    config["model"]["init_from"] = runs["pre_out"]
    config["lora"] = {"enabled": True, "r": 4, "alpha": 8}
    full = run(from_dict(config))
    for step in (2, 4):
        saved = load_file(str(Path(out) / f"checkpoint-{step}" / "projector.safetensors"))
        assert "image_newline" in saved
    # Resume from checkpoint-2 (kill -9 after it): the newline comes back from the checkpoint's projector
    # file (peft's adapter cannot hold it), so steps 3-4 repeat exactly.
    resumed_out = str(tmp_path / "lora_resumed")
    shutil.copytree(Path(out) / "checkpoint-2", Path(resumed_out) / "checkpoint-2")
    config["train"]["output_dir"] = resumed_out
    config["train"]["resume_from_checkpoint"] = "auto"
    resumed = run(from_dict(config))
    a, b = losses(full.log_history), losses(resumed.log_history)
    assert {3, 4} <= set(b)  # (steps 1-2 come from the checkpoint's trainer state)
    for step in (3, 4):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step
    final = load_file(str(Path(out) / "projector.safetensors"))["image_newline"]
    again = load_file(str(Path(resumed_out) / "projector.safetensors"))["image_newline"]
    torch.testing.assert_close(again, final, atol=1e-7, rtol=0)


def test_an_image_over_the_length_budget_is_a_too_long_row(runs: dict, tmp_path: Path) -> None:
    from llava_train.components import load_components
    from llava_train.data.validate import validate

    big = Path(runs["ws"]["images"]) / "big.png"
    Image.new("RGB", (64, 64), (0, 0, 0)).save(big)  # the largest grid: the most tokens one image can give
    rows = [
        {
            "id": "ok",
            "image": "0.png",
            "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}],
        },
        {
            "id": "big",
            "image": "big.png",
            "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}],
        },
    ]
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(rows))
    from llava_train.data.dataset import make_context
    from llava_train.data.scan import process_record

    cfg, parts = components(runs)
    ok_length = len(process_record(rows[0], make_context(cfg.data, cfg.data.train[0], parts)).sample.input_ids)
    extra = parts.geometry.image_tokens(64, 64) - parts.geometry.image_tokens(32, 40)  # the big image's surplus
    budget = ok_length + extra // 2  # fits the small image, not the 64 x 64 one
    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(
            cfg.data,
            train=[dataclasses.replace(cfg.data.train[0], path=str(data))],
            model_max_length=budget,
            on_bad_sample="skip",
            cache_dir=None,
        ),
    )
    assert extra > 2
    report = validate(cfg, load_components(cfg, weights=False), num_workers=1)
    assert [(b["id"], b["reason"]) for b in report["bad_rows"]] == [("big", "too_long")]
    source = report["sources"][0]
    assert source["image_tokens"]["max"] == parts.geometry.image_tokens(32, 40)


def test_sizes_cover_wide_tall_and_square() -> None:
    ratios = {round(w / h, 1) for w, h in ANYRES_SIZES}
    assert min(ratios) < 0.5 and max(ratios) > 2 and 1.0 in ratios


def test_predict_batches_one_image_two_image_and_text_requests(runs: dict) -> None:
    """`llava-train predict`'s predictor: a batch of mixed requests decodes as each request alone."""
    from llava_train import infer

    model, processor = infer.load(runs["ft_out"], device="cpu")
    predictor = infer.make_predictor(model, processor, infer.GenerationOptions(max_new_tokens=4))
    folder = Path(runs["ws"]["images"])
    one, two = Image.open(folder / "0.png").convert("RGB"), Image.open(folder / "1.png").convert("RGB")
    requests = [
        infer.Request([{"role": "user", "content": infer.user_content("What colour is it?", 1)}], [one]),
        infer.Request([{"role": "user", "content": infer.user_content("Which colours?", 2)}], [one, two]),
        infer.Request([{"role": "user", "content": infer.user_content("Say red.", 0)}], []),
    ]
    batched = predictor(requests)
    assert batched == [predictor([r])[0] for r in requests]
