"""Tests of predict/evaluate: scoring arithmetic with an injected predictor, and a real tiny HF-native LLaVA folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from llava_train import infer
from llava_train.data.errors import BadSampleError
from llava_train.infer import GenerationOptions, Request
from llava_train.run_files import EVAL_PREDICTIONS_FILENAME, EVAL_REPORT_FILENAME

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def _image(path: Path, color: tuple[int, int, int]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 40), color).save(path)
    return path.name


def _record(rid: str, question: str, answer: str, image: str | None = "a.png", rtype: str | None = None) -> dict:
    row: dict[str, Any] = {
        "id": rid,
        "conversations": [
            {"from": "human", "value": f"<image>\n{question}" if image else question},
            {"from": "gpt", "value": answer},
        ],
    }
    if image:
        row["image"] = image
    if rtype:
        row["type"] = rtype
    return row


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    _image(folder / "a.png", (255, 0, 0))
    _image(folder / "b.png", (0, 0, 255))
    return folder


# -- normalisation and matching ----------------------------------------------------------------


def test_normalize_and_matches() -> None:
    assert infer.normalize("  Top-Left. ") == "top left"
    assert infer.normalize("RED!\n") == "red"
    assert infer.exact_match("Red.", "red")
    assert not infer.exact_match("a red one", "red")
    assert infer.contains_match("It is red.", "red")
    assert infer.contains_match("the TOP left corner", "top-left")
    assert not infer.contains_match("12", "2")
    assert not infer.contains_match("anything", "")


def test_unknown_generation_option() -> None:
    with pytest.raises(TypeError, match=r"unknown generation option\(s\) beams; valid options: max_new_tokens, "):
        infer._options(None, {"beams": 2})
    assert infer._options(GenerationOptions(batch_size=3), {"max_new_tokens": 5}) == GenerationOptions(
        max_new_tokens=5, batch_size=3
    )
    with pytest.raises(ValueError, match="top_p must be in"):
        GenerationOptions(top_p=0)


# -- records -> requests -------------------------------------------------------------------------


def test_record_request_multi_turn(image_folder: Path) -> None:
    record = {
        "id": "m1",
        "image": "a.png",
        "conversations": [
            {"from": "human", "value": "What color?\n<image>"},
            {"from": "gpt", "value": "red"},
            {"from": "human", "value": "Shape?"},
            {"from": "gpt", "value": "square"},
        ],
    }
    req, ref = infer.record_request(record, image_folder)
    assert ref == "square"
    assert req.messages == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        {"role": "user", "content": [{"type": "text", "text": "Shape?"}]},
    ]
    assert len(req.images) == 1
    assert req.images[0].getpixel((0, 0)) == (255, 0, 0)


def test_record_request_errors(image_folder: Path) -> None:
    with pytest.raises(ValueError, match=r"record 'x': bad_roles: the conversation ends with a user turn"):
        infer.record_request({"id": "x", "conversations": [{"from": "human", "value": "hi"}]}, image_folder)
    two_tags = _record("y", "<image> twice", "no")
    with pytest.raises(ValueError, match=r"record 'y': image_count_mismatch: 2 <image> tags but 1 image paths"):
        infer.record_request(two_tags, image_folder)
    # Image paths are resolved as in training: no escaping the image folder.
    for bad in ("../a.png", "/etc/passwd"):
        with pytest.raises(ValueError, match=r"record 'e': image_path_escapes"):
            infer.record_request({**_record("e", "Q", "A"), "image": bad}, image_folder)
    with pytest.raises(ValueError, match=r"record 'm': missing_image: image file not found"):
        infer.record_request({**_record("m", "Q", "A"), "image": "nope.png"}, image_folder)
    # A link leading out of the image folder is refused as a one-line user error (exit 2), never opened.
    outside = image_folder.parent / f"{image_folder.name}_private.png"
    outside.write_bytes((image_folder / "b.png").read_bytes())
    (image_folder / "link.png").symlink_to(outside)
    with pytest.raises(BadSampleError, match=r"^record 'l': image_symlink_escapes: image path 'link.png' is a link"):
        infer.record_request({**_record("l", "Q", "A"), "image": "link.png"}, image_folder)
    (image_folder / "link.png").unlink()
    # A tagless image row gets its image in front of the first turn (as the original LLaVA does).
    req, _ = infer.record_request({"id": "z", "image": "b.png", **_record("z", "Q", "A", image=None)}, image_folder)
    assert req.messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "Q"}]


@pytest.mark.parametrize(
    "conversations",
    [
        [{"role": "user", "content": "<image>\nWhat color?"}, {"role": "assistant", "content": "red"}],
        [{"from": "user", "value": "What color? <image>"}, {"from": "assistant", "value": "red"}],
        [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        ],
        [
            {"from": "gpt", "value": "Hello."},
            {"from": "human", "value": "<image>What color?"},
            {"from": "gpt", "value": "red"},
        ],
    ],
)
def test_record_request_takes_every_form_the_trainer_takes(conversations: list, image_folder: Path) -> None:
    from llava_train.llava_format import normalize_conversation

    normalize_conversation(conversations)  # the trainer's parser accepts it
    req, ref = infer.record_request({"id": "f", "image": "a.png", "conversations": conversations}, image_folder)
    assert ref == "red"
    assert req.messages == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]}]


# -- evaluate with an injected predictor ----------------------------------------------------------


def test_evaluate_arithmetic_with_fake_predictor(tmp_path: Path, image_folder: Path) -> None:
    rows = [
        _record("c1", "Color?", "red", rtype="colour"),
        _record("c2", "Color?", "blue", image="b.png", rtype="colour"),
        _record("c3", "Color?", "red", rtype="colour"),
        _record("n1", "How many?", "2", rtype="count"),
        _record("n2", "How many?", "3", rtype="count"),
        _record("t1", "Say hi.", "Hello there", image=None),
    ]
    data = tmp_path / "eval.json"
    data.write_text(json.dumps(rows))
    answers = iter(["Red.", "it is blue", "green", "2", "13", "hello, there!"])
    seen: list[list[Request]] = []

    def fake(requests: list[Request]) -> list[str]:
        seen.append(requests)
        return [next(answers) for _ in requests]

    report = infer.evaluate(None, data, image_folder, tmp_path / "out", predictor=fake, batch_size=4)
    assert [len(b) for b in seen] == [4, 2]
    assert [len(r.images) for b in seen for r in b] == [1, 1, 1, 1, 1, 0]
    assert report["n"] == 6
    assert report["per_type"] == {
        "all": {"n": 1, "exact_match": 1.0, "contains_match": 1.0, "majority": 1.0},
        "colour": {"n": 3, "exact_match": 1 / 3, "contains_match": 2 / 3, "majority": 2 / 3},
        "count": {"n": 2, "exact_match": 0.5, "contains_match": 0.5, "majority": 0.5},
    }
    assert report["overall"] == {"n": 6, "exact_match": 0.5, "contains_match": 4 / 6, "majority": 2 / 6}
    assert report["summary"]["colour"] == "33.3% exact, 66.7% contains (n=3)"
    assert report["model"] is None and report["options"]["batch_size"] == 4
    saved = json.loads((tmp_path / "out" / EVAL_REPORT_FILENAME).read_text())
    assert saved["per_type"]["count"] == report["per_type"]["count"]
    lines = [json.loads(x) for x in (tmp_path / "out" / EVAL_PREDICTIONS_FILENAME).read_text().splitlines()]
    assert [(x["id"], x["type"], x["prediction"], x["exact"], x["contains"]) for x in lines] == [
        ("c1", "colour", "Red.", True, True),
        ("c2", "colour", "it is blue", False, True),
        ("c3", "colour", "green", False, False),
        ("n1", "count", "2", True, True),
        ("n2", "count", "13", False, False),
        ("t1", "all", "hello, there!", True, True),
    ]
    assert lines[0]["question"] == "Color?" and lines[0]["reference"] == "red"
    table = infer.format_report(report)
    assert "| colour | 3 | 33.3% | 66.7% | 66.7% |" in table.splitlines()


def test_predictor_answer_count_is_checked(tmp_path: Path, image_folder: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(_record("a", "Q", "A")) + "\n")
    with pytest.raises(RuntimeError, match="predictor returned 0 answers for 1 requests"):
        infer.predict_file(None, data, image_folder, tmp_path / "p.jsonl", predictor=lambda reqs: [])


# -- a real tiny HF-native folder ------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, llama_tokenizer_dir: str) -> str:
    """A random-init LlavaForConditionalGeneration + LlavaProcessor with a vicuna chat template, saved plainly."""
    import torch
    import transformers
    from transformers import (
        AutoTokenizer,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from llava_train.data.templates import get_template

    tok = AutoTokenizer.from_pretrained(llama_tokenizer_dir)
    tok.add_tokens(["<image>"], special_tokens=True)
    tok.pad_token = tok.unk_token
    image_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    processor = LlavaProcessor(
        image_processor=image_cls(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=get_template("vicuna_v1").chat_template(tok),
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        text_config=LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=len(tok),
            pad_token_id=tok.pad_token_id,
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_llava")
    LlavaForConditionalGeneration(config).save_pretrained(out)
    processor.save_pretrained(out)
    return str(out)


def test_load_uses_saved_chat_template_and_left_padding(model_dir: str) -> None:
    model, processor = infer.load(model_dir, device="cpu")
    assert processor.tokenizer.padding_side == "left"
    assert processor.tokenizer.pad_token == "<unk>"
    messages = [{"role": "user", "content": infer.user_content("What color?", 1)}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == f"{VICUNA_SYSTEM} USER: <image>\nWhat color? ASSISTANT:"
    assert not model.training


def test_batched_greedy_equals_single(model_dir: str, image_folder: Path) -> None:
    model, processor = infer.load(model_dir, device="cpu")
    predictor = infer.make_predictor(model, processor, GenerationOptions(max_new_tokens=6))
    red = Image.open(image_folder / "a.png").convert("RGB")
    requests = [
        Request(
            [{"role": "user", "content": infer.user_content("What color is the shape in this picture?", 1)}], [red]
        ),
        Request([{"role": "user", "content": infer.user_content("Hi", 0)}], []),
    ]
    batched = predictor(requests)
    single = [predictor([r])[0] for r in requests]
    # Left padding must not change what greedy decoding produces for the shorter prompt.
    assert batched == single
    assert all(isinstance(a, str) for a in batched)


def test_predict_and_predict_file(model_dir: str, image_folder: Path, tmp_path: Path) -> None:
    one = infer.predict(model_dir, [image_folder / "a.png"], "What color?", max_new_tokens=4)
    assert isinstance(one, str)
    sampled = [
        infer.predict(model_dir, [image_folder / "a.png"], "What color?", max_new_tokens=4, do_sample=True, seed=5)
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]
    rows = [_record(f"r{i}", "What color?", "red", image="a.png" if i % 2 else "b.png") for i in range(5)]
    data = tmp_path / "d.json"
    data.write_text(json.dumps(rows))
    out = infer.predict_file(model_dir, data, image_folder, tmp_path / "preds.jsonl", max_new_tokens=3, batch_size=2)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["id"] for x in lines] == ["r0", "r1", "r2", "r3", "r4"]
    assert {tuple(sorted(x)) for x in lines} == {("id", "image", "prediction", "question", "reference", "type")}
    report = infer.evaluate(model_dir, data, image_folder, tmp_path / "ev", max_new_tokens=3, limit=3)
    assert report["n"] == 3 and list(report["per_type"]) == ["all"]
    assert (tmp_path / "ev" / "eval_predictions.jsonl").is_file()


# -- predict / eval on the folder of every template ---------------------------------------------------


@pytest.mark.parametrize("template", ["plain", "vicuna_v1", "llava_v1", "llama_2", "mistral", "chatml", "tokenizer"])
def test_predict_and_eval_commands_work_for_every_template(
    template: str, tmp_path_factory: pytest.TempPathFactory, image_folder: Path
) -> None:
    """A model folder as a run of that template saves it (tiny parts, untrained): the CLI serves it."""
    from llava_train.cli import main as cli
    from llava_train.components import load_components
    from llava_train.config import from_dict

    root = tmp_path_factory.mktemp(f"served_{template}")
    chatml = template in ("chatml", "tokenizer")
    cfg = from_dict(
        {
            "stage": "pretrain" if template == "plain" else "finetune",
            "model": {
                "language_model": str(root / "lm"),
                "vision_tower": str(root / "vision"),
                "preset": "tiny_chatml" if chatml else "tiny",
                "dtype": "float32",
            },
            "data": {"template": template},
            "train": {"output_dir": str(root / "run")},
        }
    )
    parts = load_components(cfg)
    model, processor = parts.model, parts.processor
    out = root / "model"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    data = root / "eval.json"
    data.write_text(json.dumps([_record("a", "Color?", "red"), _record("b", "Again?", "blue", image="b.png")]))
    assert (
        cli(
            [
                "predict",
                str(out),
                "--image",
                str(image_folder / "a.png"),
                "--prompt",
                "Color?",
                "--max-new-tokens",
                "2",
            ]
        )
        == 0
    )
    assert (
        cli(
            [
                "eval",
                str(out),
                "--data",
                str(data),
                "--image-folder",
                str(image_folder),
                "--out",
                str(root / "e"),
                "--max-new-tokens",
                "2",
            ]
        )
        == 0
    )
    assert json.loads((root / "e" / "eval_report.json").read_text())["n"] == 2
