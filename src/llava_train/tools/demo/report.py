"""The demo's evaluation and report: held-out exact match per question type (images through `llava-train eval`'s
code, videos through plain transformers on the exported folder), the before / after table, and a chat on a new
image. `tools.demo.run` calls these after each stage.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

from llava_train import infer
from llava_train.data.images import preprocess_video
from llava_train.tools.demo import shapes


def evaluate_model(model_dir: Path, data: shapes.DemoData, out_dir: Path, limit: int | None, plain: bool) -> dict:
    """Greedy eval on the held-out split; a `plain` (stage-1) model writes a caption and stops at the newline.
    The OneVision demo's video questions (`eval_video.json`, which `infer.evaluate` does not read) are scored
    by `evaluate_videos` and merged into the report's `per_type`."""
    options = infer.GenerationOptions(max_new_tokens=24 if plain else 8, batch_size=32, stop=["\n"] if plain else [])
    report = infer.evaluate(model_dir, data.eval, data.image_folder, out_dir, options=options, limit=limit)
    videos = data.root / "eval_video.json"
    if videos.exists():
        rows = evaluate_videos(model_dir, json.loads(videos.read_text())[:limit], data.image_folder, options)
        report["per_type"].update(infer.score(rows)["per_type"])
        (Path(out_dir) / "eval_video_predictions.json").write_text(json.dumps(rows, indent=1))
    return report


def evaluate_videos(
    model_dir: Path, rows: list[dict[str, Any]], image_folder: Path, options: infer.GenerationOptions
) -> list[dict[str, Any]]:
    """Greedy answers to video rows (`video`: a list of frame files) through the exported folder with plain
    transformers: the chat template renders the video item, its placeholder is expanded to the model's
    count (frames x pooled tokens + 1 newline) and the frames go in as `pixel_values_videos`, preprocessed
    as training does (`data.images.preprocess_video`, equal to transformers' video processor, which needs
    torchvision, absent here). One row at a time: the demo's eval is a few dozen videos."""
    import torch
    from PIL import Image

    model, processor = infer.load(model_dir)
    tok = processor.tokenizer
    vision = model.config.vision_config
    pooled = math.ceil(vision.image_size // vision.patch_size / 2) ** 2  # per frame, after 2x2 pooling
    out = []
    for row in rows:
        frames = [Image.open(image_folder / f).convert("RGB") for f in row["video"]]
        conv = row["conversations"]
        question = conv[-2]["value"].replace("<video>\n", "").replace("<video>", "")
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        prompt = prompt.replace(processor.video_token, processor.video_token * (len(frames) * pooled + 1))
        inputs = tok(prompt, return_tensors="pt", add_special_tokens=False)
        pixels = preprocess_video(frames, processor.image_processor, vision.image_size).to(model.dtype)
        with torch.inference_mode():
            ids = model.generate(
                **inputs,
                pixel_values_videos=pixels,
                max_new_tokens=options.max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=tok.pad_token_id,
            )
        text = tok.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        prediction = infer._cut(text, options.stop)
        out.append({"id": row["id"], "type": row["type"], "prediction": prediction, "reference": conv[-1]["value"]})
    return out


def build_table(reports: dict[str, dict[str, Any]], chance: dict[str, float]) -> dict[str, Any]:
    """Per question type (those of `chance`, in its order): chance rate, then exact / contains match after each
    phase."""
    rows = {}
    for qtype in chance:
        row: dict[str, Any] = {"chance": chance[qtype]}
        for phase, report in reports.items():
            s = report["per_type"].get(qtype)
            row[phase] = None if s is None else {"exact": s["exact_match"], "contains": s["contains_match"]}
        rows[qtype] = row
    return {"phases": list(reports), "rows": rows}


def format_table(table: dict[str, Any]) -> str:
    """Markdown: one row per question type, `exact (contains)` per phase, then the chance rate."""
    phases = table["phases"]
    head = "| question type | " + " | ".join(phases) + " | chance |"
    lines = [head, "| --- |" + " --- |" * (len(phases) + 1)]
    for qtype, row in table["rows"].items():
        cells = []
        for phase in phases:
            c = row[phase]
            cells.append("n/a" if c is None else f"{c['exact']:.0%} ({c['contains']:.0%})")
        lines.append(f"| {qtype} | " + " | ".join(cells) + f" | {row['chance']:.0%} |")
    lines.append("")
    lines.append(
        "Cells: exact match (contains match) on the held-out split (unseen colour x shape x position triples)."
    )
    return "\n".join(lines)


def sample_chat(model_dir: Path, image_size: int, seed: int, out_dir: Path) -> dict[str, Any]:
    """Draw a new held-out image and ask its colour, shape and position through the exported folder;
    returns the image and, per question, the answer and the truth."""
    rng = random.Random(f"{seed}-chat")
    color, shape, position = rng.choice(shapes.HELD_OUT)
    item = shapes.Item(color, shape, position, "large")
    path = out_dir / "chat_image.png"
    shapes.draw([item], image_size, rng).save(path)
    # One load of the exported folder for the three questions.
    predictor = infer.make_predictor(*infer.load(model_dir), infer.GenerationOptions(max_new_tokens=8))
    turns = []
    for kind, truth in (("colour", color), ("shape", shape), ("position", position)):
        question = f"{shapes.QUESTIONS[kind][0]}\n{shapes.SHORT_ANSWER}"
        answer = infer.predict(None, [path], question, predictor=predictor)
        turns.append({"type": kind, "question": question, "answer": answer, "truth": truth})
    return {"image": str(path), "turns": turns}
