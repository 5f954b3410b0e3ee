"""Prediction and generation-based evaluation on any HF-native LLaVA folder, using only plain transformers.

The model folder is loaded with `AutoModelForImageTextToText` / `AutoProcessor`, and prompts are
built with the chat template saved beside the model, so what is evaluated here is exactly what a
user of the exported folder gets. Nothing in this module depends on how the folder was trained.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from llava_train.data.errors import BadSample, BadSampleError
from llava_train.data.images import image_ref, load_image
from llava_train.llava_format import (
    DATA_IMAGE_TAG,
    USER,
    Turn,
    count_images,
    normalize_conversation,
    record_images,
    to_messages,
    user_text,
)
from llava_train.model.processor import load_saved_processor
from llava_train.remote_code import refuse_remote_code
from llava_train.run_files import EVAL_PREDICTIONS_FILENAME, EVAL_REPORT_FILENAME

DEFAULT_TYPE = "all"
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


@dataclass
class GenerationOptions:
    """How answers are generated.

    max_new_tokens: longest generated answer in tokens.
    do_sample: sample instead of greedy decoding (greedy is the default and what `eval` reports).
    temperature, top_p: sampling parameters (used only with do_sample).
    seed: torch seed set before each batch when sampling (reproducible samples).
    batch_size: prompts generated together (left-padded).
    stop: strings that end an answer: the text is cut at the first one (e.g. `\\n` for a stage-1
        `plain` model, which writes a caption and a newline but no EOS).
    """

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    batch_size: int = 8
    stop: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {self.batch_size}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Request:
    """One generation request: chat messages (HF format, ending with a user turn) and their images in order."""

    messages: list[dict[str, Any]]
    images: list[Image.Image]


# A predictor turns a batch of requests into answer strings; tests inject a fake one.
Predictor = Callable[[list[Request]], list[str]]


# ---------------------------------------------------------------------------------------------
# Model loading and generation


def load(model_dir: str | Path, device: str | None = None, dtype: str | None = None) -> tuple[Any, Any]:
    """Load (model, processor) from an HF-native LLaVA folder, ready for batched generation.

    `device` defaults to cuda when available; `dtype` defaults to bfloat16 on cuda and float32 on CPU.
    The tokenizer pads on the left (generation appends to the right end of every row).
    """
    import torch
    from transformers import AutoModelForImageTextToText

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    refuse_remote_code(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch_dtype, trust_remote_code=False)
    model = model.to(device).eval()
    processor = load_saved_processor(model_dir, getattr(model.config, "model_type", ""))
    tok = processor.tokenizer
    tok.padding_side = "left"
    if tok.pad_token is None:
        # Llama/Vicuna tokenizers ship without a pad token; LLaVA pads with unk.
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    if not getattr(processor, "chat_template", None):
        raise ValueError(f"{model_dir}: the processor has no chat template; cannot build prompts")
    return model, processor


def make_predictor(model: Any, processor: Any, options: GenerationOptions | None = None) -> Predictor:
    """A predictor that renders each request with the processor's chat template and generates."""
    import torch

    opts = options or GenerationOptions()
    tok = processor.tokenizer

    def predict_batch(requests: list[Request]) -> list[str]:
        prompts = [processor.apply_chat_template(r.messages, add_generation_prompt=True) for r in requests]
        images: Any = [img for r in requests for img in r.images]
        if images and getattr(model.config, "model_type", "") == "llava_onevision":
            # Nested per request: OneVision gives a request with several images one crop + newline per
            # image (as trained) and a one-image request its anyres grid.
            images = [list(r.images) for r in requests if r.images]
        inputs = processor(images=images or None, text=prompts, return_tensors="pt", padding=True)
        inputs = inputs.to(model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        gen: dict[str, Any] = {"max_new_tokens": opts.max_new_tokens, "do_sample": opts.do_sample}
        if opts.do_sample:
            gen.update(temperature=opts.temperature, top_p=opts.top_p)
            if opts.seed is not None:
                torch.manual_seed(opts.seed)
        else:
            # Silence the model's saved sampling defaults so greedy decoding is unambiguous.
            gen.update(temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            out = model.generate(**inputs, **gen, pad_token_id=tok.pad_token_id)
        new = out[:, inputs["input_ids"].shape[1] :]  # (batch, generated) after the left-padded prompt
        texts = tok.batch_decode(new, skip_special_tokens=True)
        return [_cut(t, opts.stop) for t in texts]

    return predict_batch


def _cut(text: str, stop: Sequence[str]) -> str:
    for s in stop:
        if s and s in text:
            text = text[: text.index(s)]
    return text.strip()


def _options(options: GenerationOptions | None, gen: dict[str, Any]) -> GenerationOptions:
    """`options` with keyword overrides (the CLI passes plain keywords such as batch_size=8)."""
    base = asdict(options) if options is not None else {}
    unknown = sorted(set(gen) - set(GenerationOptions.__dataclass_fields__))
    if unknown:
        valid = ", ".join(GenerationOptions.__dataclass_fields__)
        raise TypeError(f"unknown generation option(s) {', '.join(unknown)}; valid options: {valid}")
    return GenerationOptions(**{**base, **gen})


def _predictor(model_dir: str | Path | None, options: GenerationOptions, predictor: Predictor | None) -> Predictor:
    if predictor is not None:
        return predictor
    if model_dir is None:
        raise ValueError("give model_dir or predictor")
    model, processor = load(model_dir)
    return make_predictor(model, processor, options)


# ---------------------------------------------------------------------------------------------
# LLaVA records -> requests


def user_content(text: str, n_images: int = 0) -> list[dict[str, Any]]:
    """HF message content: `n_images` image items, then the text (the chat template moves images to the front)."""
    items: list[dict[str, Any]] = [{"type": "image"} for _ in range(n_images)]
    items.append({"type": "text", "text": text})
    return items


def record_request(
    record: dict[str, Any], image_folder: str | Path | None, image_token: str = DATA_IMAGE_TAG
) -> tuple[Request, str]:
    """(request for everything before the last assistant turn, that turn's text as reference) from a LLaVA record.

    The record is read by the parser training uses (`llava_format.normalize_conversation`: from/value or
    role/content, human/gpt or user/assistant, string or typed content), so eval takes every row the
    trainer takes. Earlier turns become chat history; the images (`image`: a path or a list) are
    resolved inside `image_folder` as in training (no absolute paths, no `..`). One leniency of LLaVA's
    eval scripts is kept: a row with images and no `<image>` tag gets them in front of its first question.
    """
    rid = record.get("id")
    try:
        turns = normalize_conversation(record.get("conversations"), image_token)
        raw = record_images(record)
        if raw and count_images(turns, image_token) == 0:
            turns[0] = Turn(USER, user_text(len(raw), turns[0].text, image_token))
        n_tags = count_images(turns, image_token)
        if n_tags != len(raw):
            raise BadSample("image_count_mismatch", f"{n_tags} <image> tags but {len(raw)} image paths")
        images = [load_image(image_ref(v, str(image_folder or "."), f"image {k}")) for k, v in enumerate(raw)]
    except BadSample as e:  # a user error (one line, exit 2): the data is the user's to fix
        raise BadSampleError(f"record {rid!r}: {e}") from e
    return Request(to_messages(turns[:-1], image_token), images), turns[-1].text


def read_records(data: str | Path) -> list[dict[str, Any]]:
    """Rows of a LLaVA JSON list or JSONL file."""
    p = Path(data)
    text = p.read_text()
    if p.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    rows = json.loads(text)
    if not isinstance(rows, list):
        raise ValueError(f"{p}: expected a JSON list of LLaVA records")
    return rows


# ---------------------------------------------------------------------------------------------
# Public entry points


def predict(
    model_dir: str | Path | None,
    images: Sequence[str | Path | Image.Image],
    prompt: str,
    options: GenerationOptions | None = None,
    predictor: Predictor | None = None,
    **gen: Any,
) -> str:
    """Answer one prompt about zero or more images (paths or PIL images).

    Generation options come from `options` and/or keywords (`max_new_tokens=16, do_sample=True`, ...).
    """
    pil = [im if isinstance(im, Image.Image) else Image.open(im) for im in images]
    pil = [im.convert("RGB") for im in pil]
    request = Request([{"role": "user", "content": user_content(prompt, len(pil))}], pil)
    return _predictor(model_dir, _options(options, gen), predictor)([request])[0]


def _run(
    records: list[dict[str, Any]], image_folder: str | Path | None, predictor: Predictor, batch_size: int, desc: str
) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    results: list[dict[str, Any]] = []
    with tqdm(total=len(records), desc=desc, unit="sample") as bar:
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            pairs = [record_request(r, image_folder) for r in chunk]
            answers = predictor([req for req, _ in pairs])
            if len(answers) != len(chunk):
                raise RuntimeError(f"predictor returned {len(answers)} answers for {len(chunk)} requests")
            for rec, (req, ref), ans in zip(chunk, pairs, answers):
                question = "".join(i["text"] for i in req.messages[-1]["content"] if i["type"] == "text")
                results.append(
                    {
                        "id": rec.get("id"),
                        "type": rec.get("type") or DEFAULT_TYPE,
                        "image": rec.get("image"),
                        "question": question,
                        "reference": ref,
                        "prediction": ans,
                    }
                )
            bar.update(len(chunk))
    return results


def _write_jsonl(rows: list[dict[str, Any]], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def predict_file(
    model_dir: str | Path | None,
    data: str | Path,
    image_folder: str | Path | None,
    out: str | Path,
    options: GenerationOptions | None = None,
    limit: int | None = None,
    predictor: Predictor | None = None,
    **gen: Any,
) -> Path:
    """Answer the last question of every record in a LLaVA JSON/JSONL file; write one JSON line per record.

    Each line holds id, type, image, question, reference (the record's last gpt turn) and prediction.
    """
    opts = _options(options, gen)
    records = read_records(data)[:limit]
    rows = _run(records, image_folder, _predictor(model_dir, opts, predictor), opts.batch_size, "predict")
    out = Path(out)
    _write_jsonl(rows, out)
    return out


def normalize(text: str) -> str:
    """Lowercase, punctuation to spaces, whitespace collapsed: `" Top-Left. "` -> `"top left"`."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def exact_match(prediction: str, reference: str) -> bool:
    """Normalised prediction equals the normalised reference."""
    return normalize(prediction) == normalize(reference)


def contains_match(prediction: str, reference: str) -> bool:
    """The normalised reference occurs in the normalised prediction as whole words (`2` is not in `12`)."""
    ref = normalize(reference)
    return bool(ref) and f" {ref} " in f" {normalize(prediction)} "


def score(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-type and overall exact/contains match of prediction rows (adds `exact`/`contains` to each row).

    `majority` is the accuracy of always answering the type's most frequent reference: the chance
    level a model that ignores the image can reach.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        row["exact"] = exact_match(row["prediction"], row["reference"])
        row["contains"] = contains_match(row["prediction"], row["reference"])
        groups.setdefault(row["type"], []).append(row)

    def summary(group: list[dict[str, Any]]) -> dict[str, Any]:
        n = len(group)
        refs: dict[str, int] = {}
        for r in group:
            refs[normalize(r["reference"])] = refs.get(normalize(r["reference"]), 0) + 1
        return {
            "n": n,
            "exact_match": sum(r["exact"] for r in group) / n if n else math.nan,
            "contains_match": sum(r["contains"] for r in group) / n if n else math.nan,
            "majority": max(refs.values()) / n if n else math.nan,
        }

    per_type = {t: summary(groups[t]) for t in sorted(groups)}
    overall = summary(rows)
    return {
        "n": len(rows),
        # One line per type for printing: exact match (contains match).
        "summary": {
            t: f"{s['exact_match']:.1%} exact, {s['contains_match']:.1%} contains (n={s['n']})"
            for t, s in [*per_type.items(), ("overall", overall)]
        },
        "per_type": per_type,
        "overall": overall,
    }


def evaluate(
    model_dir: str | Path | None,
    data: str | Path,
    image_folder: str | Path | None,
    out_dir: str | Path,
    options: GenerationOptions | None = None,
    limit: int | None = None,
    predictor: Predictor | None = None,
    **gen: Any,
) -> dict[str, Any]:
    """Generate an answer for every record's last question and score it against the last gpt turn.

    Writes `out_dir/eval_predictions.jsonl` (one row per record, with `exact` and `contains`) and
    `out_dir/eval_report.json` (returned): `n`, `per_type` and `overall`, each with `n`,
    `exact_match`, `contains_match` and `majority`; `summary` (one printable line per type); plus
    `model`, `data` and the generation options.
    Records without a `type` are scored under `all`.
    """
    opts = _options(options, gen)
    records = read_records(data)[:limit]
    rows = _run(records, image_folder, _predictor(model_dir, opts, predictor), opts.batch_size, "eval")
    report = score(rows)
    report.update(model=str(model_dir) if model_dir is not None else None, data=str(data), options=asdict(opts))
    out = Path(out_dir)
    _write_jsonl(rows, out / EVAL_PREDICTIONS_FILENAME)
    (out / EVAL_REPORT_FILENAME).write_text(json.dumps(report, indent=2))
    return report


def format_report(report: dict[str, Any]) -> str:
    """A markdown table of a report: type, n, exact match, contains match, majority baseline."""
    lines = ["| type | n | exact match | contains match | majority |", "| --- | --- | --- | --- | --- |"]
    for name, s in [*report["per_type"].items(), ("overall", report["overall"])]:
        lines.append(
            f"| {name} | {s['n']} | {s['exact_match']:.1%} | {s['contains_match']:.1%} | {s['majority']:.1%} |"
        )
    return "\n".join(lines)
