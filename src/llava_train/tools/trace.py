"""`llava-train trace`: walk one sample through LLaVA, from its raw row to the loss on its trained positions.

Every step is the run's own code (the dataset's record processing and item building, the collator,
the HF-native model's forward): nothing here re-derives a sample, so what `trace` shows is what
training computes. The model-side steps are read with forward hooks during ONE ordinary forward
(vision tower output, projector input/output, the LM's `inputs_embeds`), then checked against each
other: the merged embeddings at the image positions must equal the image features the model made,
and the text positions the token embeddings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TextIO

import torch

from llava_train.components import load_components
from llava_train.config import RunConfig
from llava_train.data.collator import BATCH_ONLY_KEYS, PaddingCollator
from llava_train.data.dataset import build_item, make_context
from llava_train.data.images import mean_color, processor_output_size
from llava_train.data.scan import process_record
from llava_train.data.validate import locate_sample, render_labelled
from llava_train.llava_format import normalize_conversation, preference_conversations, record_id, record_video
from llava_train.remote_code import refuse_remote_code
from llava_train.stages import get_stage
from llava_train.utils.modules import IGNORE_INDEX

HEAD = 4  # values shown per tensor


def _head(t: torch.Tensor, k: int = HEAD) -> list[float]:
    return [round(float(v), 4) for v in t.detach().flatten()[:k]]


def _runs(values: list[int], names: dict[int, str]) -> str:
    """Ids with runs collapsed: `1 319 <image>x16 29871 -100x37`; named ids print their name."""
    out, i = [], 0
    while i < len(values):
        j = i
        while j < len(values) and values[j] == values[i]:
            j += 1
        name = names.get(values[i], str(values[i]))
        collapse = j - i > 2 or (values[i] in names and j - i > 1)
        out.append(f"{name}x{j - i}" if collapse else " ".join([name] * (j - i)))
        i = j
    return " ".join(out)


def _spans(mask: torch.Tensor) -> list[list[int]]:
    """[start, end) of each run of True in a 1-D bool mask."""
    spans, start = [], None
    for i, v in enumerate(mask.tolist() + [False]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            spans.append([start, i])
            start = None
    return spans


def _jsonable(record: Any) -> Any:
    """A record for printing: embedded image bytes summarised, everything else as is."""
    if isinstance(record, dict):
        return {k: _jsonable(v) for k, v in record.items()}
    if isinstance(record, list):
        return [_jsonable(v) for v in record]
    if isinstance(record, bytes | bytearray):
        return f"<{len(record)} bytes>"
    if isinstance(record, str | int | float | bool) or record is None:
        return record
    return f"<{type(record).__name__}>"


def data_steps(cfg: RunConfig, parts: Any, index: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The data half of a trace: (steps as data, the dataset item the model gets)."""

    src, store, row = locate_sample(cfg, index)
    record = store.get(row)
    sample_id = record_id(record, row)
    template = parts.template
    video_token = template.video_token if record_video(record) is not None else None
    pairs = get_stage(cfg.stage).preference  # stage dpo: the trace follows the chosen side of the pair
    chosen = preference_conversations(record)[0] if pairs else None
    turns = normalize_conversation(chosen or record.get("conversations"), template.image_token, video_token)
    done = process_record(record, make_context(cfg.data, src, parts, pairs), row, io="load")
    sample = done.sample
    item = build_item(done, src.name, row, sample_id, parts.image_processor, parts.geometry)
    names = {parts.image_token_id: "<image>", IGNORE_INDEX: "-100"}
    if parts.video_token_id is not None:
        names[parts.video_token_id] = "<video>"
    media = [parts.image_token_id] + ([parts.video_token_id] if parts.video_token_id is not None else [])
    ids = item["input_ids"]
    steps: dict[str, Any] = {
        "sample": {"index": index, "source": src.name, "row": row, "id": sample_id},
        "raw_row": _jsonable(record),
        "conversation": [{"role": t.role, "text": t.text} for t in turns],
        "rendered": {
            "template": template.name,
            "segments": [{"text": s.text, "trained": s.trained} for s in template.render(turns, parts.tokenizer)],
            "labelled": render_labelled(record, parts, False, done.media_tokens, chosen),
        },
        "tokens": {
            "input_ids": sample.input_ids,
            "labels": sample.labels,
            "input_ids_collapsed": _runs(sample.input_ids, names),
            "labels_collapsed": _runs(sample.labels, names),
            "length": len(sample.input_ids),
            "image_token_id": parts.image_token_id,
            "image_tokens": int(torch.isin(ids, torch.tensor(media)).sum()),
            "trained_tokens": sum(1 for v in sample.labels if v != IGNORE_INDEX),
            "tokens_per_image": done.media_tokens,
            "truncated": bool(sample.truncated),
        },
    }
    images = []
    for k, img in enumerate(done.images):
        entry: dict[str, Any] = {"image": str(done.paths[k]), "size_wh": list(img.size), "mode": img.mode}
        if parts.geometry.arch == "llava":
            entry["aspect_ratio"] = parts.geometry.aspect_ratio
            if parts.geometry.aspect_ratio == "pad":
                entry["pad_fill_rgb"] = list(mean_color(parts.image_processor))
                entry["padded_side"] = max(img.size)
            entry["resized_hw"] = list(processor_output_size(parts.image_processor))
        else:
            entry["grid_rows_cols"] = list(parts.geometry.grid(img.height, img.width))
            entry["crops"] = parts.geometry.crops(img.height, img.width, len(done.images))
        images.append(entry)
    if "pixel_values" in item:
        pv = item["pixel_values"]
        steps["images"] = {
            "per_image": images,
            "pixel_values_shape": list(pv.shape),
            "image_mean": list(parts.image_processor.image_mean),
            "image_std": list(parts.image_processor.image_std),
            "pixel_values_channel_mean": [round(float(v), 4) for v in pv.mean(dim=(0, 2, 3))],
            "pixel_values_head": _head(pv),
        }
        if "image_sizes" in item:
            steps["images"]["image_sizes"] = item["image_sizes"].tolist()
    if "pixel_values_videos" in item:
        steps["video"] = {"pixel_values_videos_shape": list(item["pixel_values_videos"].shape)}
    return steps, item


def collate_one(parts: Any, items: list[dict[str, Any]], arch: str) -> dict[str, Any]:
    """The model inputs of dataset items, collated as training collates them (padding, no packing)."""

    batch = PaddingCollator(parts.tokenizer.pad_token_id, batch_num_images=arch == "llava_onevision")(items)
    return {k: v for k, v in batch.items() if k not in BATCH_ONLY_KEYS}


def capture_forward(model: Any, inputs: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """One no-grad forward of `inputs`, keeping the vision tower's output ("tower"), the projector's input and
    output ("projector"), the image features the model merged ("features": get_image_features' output) and the
    LM's `inputs_embeds` ("embeds"); the model is left as it was (hooks removed, train/eval mode restored)."""
    inner = model.model
    got: dict[str, Any] = {}

    def keep(key: str, value: Any) -> None:  # a hook returning a value would replace the module's output
        got.setdefault(key, value)

    hooks = [
        inner.vision_tower.register_forward_hook(lambda m, a, o: keep("tower", o)),
        inner.multi_modal_projector.register_forward_hook(lambda m, a, o: keep("projector", (a[0], o))),
        inner.language_model.register_forward_pre_hook(
            lambda m, a, kw: keep("embeds", kw.get("inputs_embeds")), with_kwargs=True
        ),
    ]
    original = inner.get_image_features

    def features(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        keep("features", out)
        return out

    inner.get_image_features = features
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(**inputs)
    finally:
        del inner.get_image_features  # the class's method again
        for h in hooks:
            h.remove()
        model.train(was_training)
    return got, out


def model_steps(model: Any, parts: Any, item: dict[str, Any], arch: str) -> dict[str, Any]:
    """The model half: one forward of the collated sample, read through `capture_forward`."""
    inputs = collate_one(parts, [item], arch)
    got, out = capture_forward(model, inputs)
    config = model.config
    ids, labels = inputs["input_ids"][0], inputs["labels"][0]
    steps: dict[str, Any] = {}
    if "tower" in got:
        layer = config.vision_feature_layer
        hidden = got["tower"].hidden_states
        at_layer = hidden[layer] if isinstance(layer, int) else torch.cat([hidden[k] for k in layer], dim=-1)
        selected, projected = got["projector"]
        steps["vision_tower"] = {
            "hidden_states": len(hidden),
            "feature_layer": layer,
            "feature_layer_shape": list(at_layer.shape),
            "select_strategy": config.vision_feature_select_strategy,
            "selected_shape": list(selected.shape),
            "dropped_per_crop": at_layer.shape[1] - selected.shape[1],
            "selection_checked": bool(torch.equal(selected, at_layer[:, at_layer.shape[1] - selected.shape[1] :])),
            "selected_head": _head(selected),
        }
        feats = got["features"].pooler_output
        flat = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats]) if isinstance(feats, list | tuple) else feats
        flat = flat.reshape(-1, flat.shape[-1])
        steps["projector"] = {
            "output_shape": list(projected.shape),
            "output_head": _head(projected),
            "image_features_shape": list(flat.shape),
            # llava: the features ARE the projector output; anyres: unpadded, tiled, + image_newline per row
            "features_are_projector_output": bool(
                flat.shape[0] == projected.shape[0] * projected.shape[1]
                and torch.equal(flat, projected.reshape(-1, projected.shape[-1]))
            ),
        }
        embeds = got["embeds"][0]
        mask = ids == config.image_token_id
        text = model.get_input_embeddings()(torch.where(mask, 0, ids))
        steps["merge"] = {
            "inputs_embeds_shape": list(embeds.shape),
            "image_positions": _spans(mask),
            "replaced": int(mask.sum()),
            "image_positions_equal_features": bool(mask.sum() == flat.shape[0] and torch.equal(embeds[mask], flat)),
            "text_positions_equal_token_embeddings": bool(torch.equal(embeds[~mask], text[~mask])),
            "first_image_position_head": _head(embeds[mask][0]) if mask.any() else [],
        }
    logits = out.logits[0]
    trained = labels[1:] != IGNORE_INDEX
    targets = labels[1:][trained]
    at = logits[:-1][trained].float()
    loss = torch.nn.functional.cross_entropy(at, targets)
    probs = at.softmax(-1)
    predicted = at.argmax(-1)
    positions = torch.nonzero(trained).flatten() + 1
    tok = parts.tokenizer.convert_ids_to_tokens
    steps["loss"] = {
        "logits_shape": list(out.logits.shape),
        "trained_positions": int(trained.sum()),
        "loss_trained_positions": round(float(loss), 6),
        "hf_loss": round(float(out.loss), 6),
        "losses_equal": bool(torch.allclose(loss, out.loss.float(), rtol=1e-5, atol=1e-6)),
        "next_token_accuracy": round(float((predicted == targets).float().mean()), 4),
        "per_position": [
            {
                "position": int(p),
                "target": tok(int(t)),
                "predicted": tok(int(q)),
                "p_target": round(float(probs[k, t]), 4),
            }
            for k, (p, t, q) in enumerate(zip(positions, targets, predicted))
        ],
    }
    return steps


def trace(cfg: RunConfig, index: int = 0, model_dir: str | None = None) -> dict[str, Any]:
    """Trace sample `index` (numbered as `data inspect` numbers them) through the config's model, as built for
    training (from its local parts / `init_from`), or through a trained HF-native folder `model_dir`."""

    parts = load_components(cfg, weights=model_dir is None)
    if model_dir is not None:
        from transformers import AutoModelForImageTextToText

        refuse_remote_code(model_dir)
        parts.model = AutoModelForImageTextToText.from_pretrained(model_dir, trust_remote_code=False)
        if int(parts.model.config.image_token_id) != parts.image_token_id:
            raise ValueError(
                f"{model_dir} has image token id {parts.model.config.image_token_id}, the config's tokenizer "
                f"{parts.image_token_id}: it was not trained with this config's tokenizer"
            )
    steps, item = data_steps(cfg, parts, index)
    steps.update(model_steps(parts.model, parts, item, cfg.model.arch))
    steps["model"] = model_dir or "built from the config"
    return steps


def format_trace(steps: dict[str, Any], per_position: int = 8) -> str:
    """The trace as text, one numbered section per step."""
    lines: list[str] = []

    def section(title: str, body: dict[str, Any], skip: tuple[str, ...] = ()) -> None:
        lines.append(f"\n== {title}")
        for key, value in body.items():
            if key not in skip:
                lines.append(f"   {key}: {value}")

    s = steps["sample"]
    where = f"{s['source']} row {s['row']}, id {s['id']!r}"
    lines.append(f"trace of sample {s['index']} ({where}); model: {steps['model']}")
    lines.append("\n== 1. raw row\n   " + json.dumps(steps["raw_row"], ensure_ascii=False)[:2000])
    lines.append("\n== 2. normalised conversation")
    lines.extend(f"   {t['role']}: {t['text']!r}" for t in steps["conversation"])
    r = steps["rendered"]
    lines.append(f"\n== 3. rendered prompt (template {r['template']}; trained segments in [[...]])")
    lines.append("   " + r["labelled"].replace("\n", "\n   "))
    t = steps["tokens"]
    lines.append("\n== 4. input_ids / labels (runs collapsed)")
    lines.append(f"   input_ids: {t['input_ids_collapsed']}")
    lines.append(f"   labels:    {t['labels_collapsed']}")
    lines.append(
        f"   {t['length']} tokens, {t['image_tokens']} image tokens ({t['tokens_per_image']} per image), "
        f"{t['trained_tokens']} trained{', truncated' if t['truncated'] else ''}"
    )
    if "images" in steps:
        im = steps["images"]
        per_image = {f"image {k}": v for k, v in enumerate(im["per_image"])}
        section("5. image preprocessing", {**per_image, **im}, ("per_image",))
    else:
        lines.append("\n== 5. image preprocessing: no image (text-only sample; the LM alone)")
    if "video" in steps:
        section("5b. video", steps["video"])
    if "vision_tower" in steps:
        section("6. vision tower at the feature layer, selection", steps["vision_tower"])
        section("7. projector", steps["projector"])
        section("8. merge into inputs_embeds", steps["merge"])
    section("9. logits and loss on trained positions only", steps["loss"], skip=("per_position",))
    for p in steps["loss"]["per_position"][:per_position]:
        lines.append(
            f"   pos {p['position']:>4}  target {p['target']!r:<12} predicted {p['predicted']!r:<12} "
            f"p(target) {p['p_target']}"
        )
    return "\n".join(lines) + "\n"


def run_trace(cfg: RunConfig, index: int, model_dir: str | None, json_out: str | None, out: TextIO) -> dict:
    """`llava-train trace`: print the trace; `json_out` writes the same steps as JSON."""
    steps = trace(cfg, index, model_dir)
    out.write(format_trace(steps))
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(steps, indent=2, ensure_ascii=False))
        out.write(f"trace written to {json_out}\n")
    return steps
