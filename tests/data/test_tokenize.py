"""Exact prompts, exact labels, the labelling rule, normalisation and bad conversations."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from llava_train.data.errors import BadSample
from llava_train.data.templates import TEMPLATES, Segment, Template, get_template
from llava_train.data.tokenize import (
    IGNORE_INDEX,
    check_template_consistency,
    check_trained_text,
    label_tokens,
    tokenize_conversation,
    trained_spans,
)
from llava_train.llava_format import normalize_conversation

IMG = 512  # `<image>` id in both tiny tokenizers (vocab 512 + 1 added token)
X = None  # an untrained position in the expected label token lists

TWO_ROUNDS = [
    {"from": "human", "value": "<image>\nWhat is it?"},
    {"from": "gpt", "value": "A cat."},
    {"from": "human", "value": "And the dog?"},
    {"from": "gpt", "value": "It runs."},
]

VICUNA_SYS = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)
LLAMA_2_SYS = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)
EXPECTED_PROMPTS = {
    "plain": "<image>A cat.\nIt runs.\n",
    "vicuna_v1": VICUNA_SYS
    + " USER: <image>\nWhat is it? ASSISTANT: A cat.</s>USER: And the dog? ASSISTANT: It runs.</s>",
    "llava_v1": VICUNA_SYS.replace("user", "human")
    + " USER: <image>\nWhat is it? ASSISTANT: A cat.</s>USER: And the dog? ASSISTANT: It runs.</s>",
    "llama_2": f"[INST] <<SYS>>\n{LLAMA_2_SYS}\n<</SYS>>\n\n<image>\nWhat is it? [/INST] A cat. </s>"
    "<s>[INST] And the dog? [/INST] It runs. </s>",
    "mistral": "[INST] <image>\nWhat is it? [/INST] A cat. </s>[INST] And the dog? [/INST] It runs. </s>",
    "chatml": "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is it?<|im_end|>"
    "<|im_start|>assistant\nA cat.<|im_end|><|im_start|>user\nAnd the dog?<|im_end|><|im_start|>assistant\n"
    "It runs.<|im_end|>",
    "tokenizer": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nWhat is it?"
    "<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n<|im_start|>user\nAnd the dog?<|im_end|>\n"
    "<|im_start|>assistant\nIt runs.<|im_end|>\n",
}


def _tokens(tok: Any, ids: list[int]) -> list[str | None]:
    return [tok.convert_ids_to_tokens(i) if i != IGNORE_INDEX else X for i in ids]


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_rendered_prompt_per_template(name: str, llama_tokenizer: Any, chatml_tokenizer: Any) -> None:
    tok = chatml_tokenizer if name == "tokenizer" else llama_tokenizer
    turns = normalize_conversation(TWO_ROUNDS)
    assert get_template(name).prompt(turns, tok) == EXPECTED_PROMPTS[name]


def test_exact_labels_multi_turn_vicuna(llama_tokenizer: Any) -> None:
    tok = llama_tokenizer
    turns = normalize_conversation(TWO_ROUNDS)
    s = tokenize_conversation(turns, get_template("vicuna_v1", "Hi."), tok, IMG, 2, num_images=1)
    user = ["U", "S", "E", "R", ":"]
    asst = ["▁A", "S", "S", "I", "ST", "A", "N", "T", ":"]
    prompt1 = ["<s>", "▁", "H", "i", ".", "▁", *user, "▁", "<image>", "<image>", "<0x0A>", "W", "hat", "▁is", "▁it"]
    prompt1 += ["?", *asst]
    reply1 = ["▁A", "▁cat", ".", "</s>"]
    prompt2 = [*user, "▁An", "d", "▁the", "▁dog", "?", *asst]
    reply2 = ["▁", "I", "t", "▁runs", ".", "</s>"]
    assert _tokens(tok, s.input_ids) == prompt1 + reply1 + prompt2 + reply2
    assert _tokens(tok, s.labels) == [X] * len(prompt1) + reply1 + [X] * len(prompt2) + reply2
    # The same as raw ids (hand-checked once against the token strings above).
    assert s.labels[29:33] == [285, 368, 468, 2] and s.labels[52:] == [454, 496, 456, 377, 468, 2]
    assert s.input_ids[:4] == [1, 454, 499, 464] and s.input_ids[12:14] == [IMG, IMG]
    assert s.num_images == 1 and not s.truncated and len(s.input_ids) == len(s.labels) == 58


def test_exact_labels_text_only_chatml(chatml_tokenizer: Any) -> None:
    tok = chatml_tokenizer
    turns = normalize_conversation([{"from": "human", "value": "Hello there"}, {"from": "gpt", "value": "Yes."}])
    s = tokenize_conversation(turns, get_template("chatml", "Be nice."), tok, IMG, 2, num_images=0)
    prompt = ["<|im_start|>", "s", "y", "st", "e", "m", "Ċ", "B", "e", "Ġn", "ic", "e", ".", "<|im_end|>"]
    prompt += ["<|im_start|>", "us", "er", "Ċ", "H", "ell", "o", "Ġthere", "<|im_end|>"]
    prompt += ["<|im_start|>", "a", "ssi", "stant", "Ċ"]
    reply = ["Y", "es", ".", "<|im_end|>"]
    assert _tokens(tok, s.input_ids) == prompt + reply
    assert _tokens(tok, s.labels) == [X] * len(prompt) + reply
    assert s.labels[-4:] == [59, 406, 16, 2] and s.num_images == 0


def test_exact_labels_multi_image_llama_2(llama_tokenizer: Any) -> None:
    tok = llama_tokenizer
    conv = [{"from": "human", "value": "<image> <image>\nSame?"}, {"from": "gpt", "value": "No."}]
    turns = normalize_conversation(conv)
    assert turns[0].text == "<image>\n<image>\nSame?"
    s = tokenize_conversation(turns, get_template("llama_2", "Sys."), tok, IMG, 2, num_images=2)
    inst = ["▁", "[", "I", "N", "ST", "]", "▁"]
    sys_ = ["<<", "S", "Y", "S", ">", ">", "<0x0A>", "S", "y", "s", ".", "<0x0A>", "<<", "/", "S", "Y", "S", ">", ">"]
    prompt = ["<s>", *inst, *sys_, "<0x0A>", "<0x0A>", "<image>", "<image>", "<0x0A>", "<image>", "<image>", "<0x0A>"]
    prompt += ["S", "a", "m", "e", "?", "▁", "[", "/", "I", "N", "ST", "]"]
    reply = ["▁", "N", "o", ".", "▁", "</s>"]
    assert _tokens(tok, s.input_ids) == prompt + reply
    assert _tokens(tok, s.labels) == [X] * len(prompt) + reply
    assert s.num_images == 2 and s.input_ids.count(IMG) == 4


def test_exact_labels_image_at_end_of_turn_plain(llama_tokenizer: Any) -> None:
    tok = llama_tokenizer
    conv = [{"from": "human", "value": "Describe it. <image>"}, {"from": "gpt", "value": "A red car."}]
    s = tokenize_conversation(normalize_conversation(conv), get_template("plain"), tok, IMG, 3, num_images=1)
    assert s.input_ids == [1, IMG, IMG, IMG, 478, 371, 314, 468, 13]
    assert s.labels == [IGNORE_INDEX] * 4 + [478, 371, 314, 468, 13]
    assert _tokens(tok, s.labels[4:]) == ["A", "▁red", "▁car", ".", "<0x0A>"]


def test_exact_labels_tokenizer_template(chatml_tokenizer: Any) -> None:
    tok = chatml_tokenizer
    conv = [{"from": "human", "value": "What is it? <image>"}, {"from": "gpt", "value": "A dog."}]
    s = tokenize_conversation(normalize_conversation(conv), get_template("tokenizer"), tok, IMG, 2, num_images=1)
    # add_special_tokens=False: no BOS; the trailing "\n" after <|im_end|> is layout (untrained).
    assert _tokens(tok, s.input_ids)[-6:] == ["Ċ", "A", "Ġdog", ".", "<|im_end|>", "Ċ"]
    assert _tokens(tok, s.labels) == [X] * 38 + ["A", "Ġdog", ".", "<|im_end|>", X]
    assert s.input_ids[24:27] == [IMG, IMG, 201]


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_trained_spans_decode_to_replies(name: str, llama_tokenizer: Any, chatml_tokenizer: Any) -> None:
    tok = chatml_tokenizer if name == "tokenizer" else llama_tokenizer
    template = get_template(name)
    turns = normalize_conversation(TWO_ROUNDS)
    s = tokenize_conversation(turns, template, tok, IMG, 4, num_images=1)
    segments = template.render(turns, tok)
    check_trained_text(s, segments, tok)
    decoded = [tok.decode(span).strip() for span in trained_spans(s.labels)]
    end = {"plain": "", "chatml": "<|im_end|>", "tokenizer": "<|im_end|>"}.get(name, "</s>")
    sep = " " if name in ("llama_2", "mistral") else ""
    if name == "plain":
        # plain has no user text between rounds: the two captions (+ "\n" each) form one trained span.
        assert decoded == ["A cat.\nIt runs."]
    else:
        assert decoded == [f"A cat.{sep}{end}", f"It runs.{sep}{end}"]


def test_whole_string_rule_and_straddling_token(llama_tokenizer: Any) -> None:
    tok = llama_tokenizer
    # "▁the" spans both segments: the error names template, row and character position.
    segments = [Segment("Where is t", False), Segment("he dog.", True)]
    prompt = "Where is the dog."
    enc = tok(prompt, return_offsets_mapping=True, add_special_tokens=False)
    assert "▁the" in tok.convert_ids_to_tokens(enc["input_ids"])
    pattern = (
        r"straddling_token: template 'probe', row 7: token \d+ covers characters 8\.\.12 .* \(boundary at char 10\)"
    )
    with pytest.raises(BadSample, match=pattern):
        label_tokens(prompt, segments, enc["offset_mapping"], "probe", 7)
    # Whitespace-only and zero-width tokens take the segment of their first character.
    segments = [Segment("Hi", False), Segment(" 12", True)]
    enc = tok("Hi 12", return_offsets_mapping=True)
    assert tok.convert_ids_to_tokens(enc["input_ids"]) == ["<s>", "▁", "H", "i", "▁", "1", "2"]
    assert label_tokens("Hi 12", segments, enc["offset_mapping"]) == [False, False, False, False, True, True, True]


def test_consistency_check_warns_and_reports_position(llama_tokenizer: Any, chatml_tokenizer: Any, caplog) -> None:
    report = check_template_consistency(get_template("chatml"), chatml_tokenizer)
    assert report.consistent and report.first_diff is None
    with caplog.at_level(logging.WARNING, logger="llava_train"):
        report = check_template_consistency(get_template("plain"), llama_tokenizer)
    # SentencePiece's dummy prefix: the caption tokenized alone starts with "▁A", in the whole string with "A".
    assert not report.consistent and report.first_diff == 2
    assert "template 'plain'" in report.detail and "at token 2" in report.detail and "'▁A'" in report.detail


def test_consistency_check_errors_when_labels_would_change(llama_tokenizer: Any) -> None:
    class Straddling(Template):
        def render(self, turns: Any, tokenizer: Any = None, add_generation_prompt: bool = False) -> list[Segment]:
            return [Segment("Where is t", False), Segment("he dog.", True)]

    with pytest.raises(ValueError, match="template 'bad' cannot label the probe conversation exactly: straddling"):
        check_template_consistency(Straddling("bad", "plain"), llama_tokenizer)


def test_normalisation_conventions() -> None:
    turns = normalize_conversation(
        [
            {"from": "gpt", "value": "dropped leading reply"},
            {"from": "user", "value": "  look <image> here  "},
            {"role": "assistant", "content": "ok"},
        ]
    )
    assert [(t.role, t.text) for t in turns] == [("user", "<image>\nlook  here"), ("assistant", "ok")]
    assert normalize_conversation([{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}])[0].text == (
        "<image>"
    )


@pytest.mark.parametrize(
    ("conv", "reason"),
    [
        ([], "empty_conversation"),
        ([{"from": "gpt", "value": "only a reply"}], "empty_conversation"),
        ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], "bad_roles"),
        ([{"from": "robot", "value": "a"}, {"from": "gpt", "value": "b"}], "bad_roles"),
        ([{"from": "human", "value": "a"}], "bad_roles"),
        ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "  "}], "empty_reply"),
        ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "<image> b"}], "image_in_assistant_turn"),
        ([{"from": "human", "value": 3}, {"from": "gpt", "value": "b"}], "malformed_json"),
        ("not a list", "malformed_json"),
    ],
)
def test_bad_conversations(conv: Any, reason: str) -> None:
    with pytest.raises(BadSample) as e:
        normalize_conversation(conv)
    assert e.value.reason == reason


def test_image_count_mismatch_too_long_and_truncation(llama_tokenizer: Any) -> None:
    tok = llama_tokenizer
    template = get_template("plain")
    one_image = normalize_conversation([{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A red car."}])
    with pytest.raises(BadSample, match="image_count_mismatch: 1 <image> tag"):
        tokenize_conversation(one_image, template, tok, IMG, 3, num_images=2)
    # 9 tokens: <s> + 3 image + 5 text. Cutting at 6 keeps the image block and 2 trained tokens.
    s = tokenize_conversation(one_image, template, tok, IMG, 3, num_images=1, max_length=6)
    assert s.truncated and s.input_ids == [1, IMG, IMG, IMG, 478, 371] and s.labels[-2:] == [478, 371]
    with pytest.raises(BadSample, match="too_long: 9 tokens > 4 and the cut leaves no trained token"):
        tokenize_conversation(one_image, template, tok, IMG, 3, num_images=1, max_length=4)
    with pytest.raises(BadSample, match="too_long: 9 tokens > 3 and the cut would fall in an image"):
        tokenize_conversation(one_image, template, tok, IMG, 3, num_images=1, max_length=3)


def test_no_trained_tokens(llama_tokenizer: Any) -> None:
    class Untrained(Template):
        def render(self, turns: Any, tokenizer: Any = None, add_generation_prompt: bool = False) -> list[Segment]:
            return [Segment("nothing trained", False)]

    turns = normalize_conversation([{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}])
    with pytest.raises(BadSample, match="no_trained_tokens"):
        tokenize_conversation(turns, Untrained("u", "plain"), llama_tokenizer, IMG, 3, num_images=0)
