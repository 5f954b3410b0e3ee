"""Tests for the tiny tokenizers and load_tokenizer."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from llava_train.data.tiny_tokenizer import build_tiny_tokenizer


def test_llama_tokenizer_loads_and_encodes(llama_tokenizer_dir: str) -> None:
    tok = AutoTokenizer.from_pretrained(llama_tokenizer_dir)
    assert type(tok).__name__ == "LlamaTokenizer"
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == ("<unk>", "<s>", "</s>", None)
    ids = tok("The cat sits.</s>")["input_ids"]
    assert ids[0] == 1 and ids[-1] == 2 and 0 not in ids
    # split_digits + byte_fallback: digits are single pieces, unseen characters become bytes.
    assert tok.convert_ids_to_tokens(tok("42", add_special_tokens=False)["input_ids"]) == ["▁", "4", "2"]
    assert tok.convert_ids_to_tokens(tok("é", add_special_tokens=False)["input_ids"])[1:] == ["<0xC3>", "<0xA9>"]
    assert tok.decode(tok("The cat sits.", add_special_tokens=False)["input_ids"]) == "The cat sits."


def test_chatml_tokenizer_loads_and_encodes(chatml_tokenizer_dir: str) -> None:
    tok = AutoTokenizer.from_pretrained(chatml_tokenizer_dir)
    assert tok.bos_token is None
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert (
        text == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok("<|im_start|>user\nThe cat<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == "<|im_start|>user\nThe cat<|im_end|>"


def test_build_is_deterministic_and_takes_a_corpus(tmp_path) -> None:
    a = build_tiny_tokenizer(tmp_path / "a", style="llama")
    b = build_tiny_tokenizer(tmp_path / "b", style="llama")
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()
    captions = [f"a photo of {n} red apples on a wooden table" for n in range(30)]
    for style in ("llama", "chatml"):
        tok = AutoTokenizer.from_pretrained(build_tiny_tokenizer(tmp_path / f"c_{style}", captions, style=style))
        assert (
            tok.decode(tok("a photo of red apples", add_special_tokens=False)["input_ids"]) == "a photo of red apples"
        )
    assert a != b
    with pytest.raises(KeyError, match="valid styles: llama, chatml"):
        build_tiny_tokenizer(tmp_path / "x", style="gpt2")


def test_load_tokenizer_adds_image_and_pad(llama_tokenizer, chatml_tokenizer) -> None:
    assert llama_tokenizer.convert_tokens_to_ids("<image>") == 512
    assert llama_tokenizer.pad_token == "<unk>" and llama_tokenizer.pad_token_id == 0
    assert llama_tokenizer.padding_side == "right"
    assert chatml_tokenizer.convert_tokens_to_ids("<image>") == 512
    assert chatml_tokenizer.pad_token == "<|endoftext|>"
    ids = llama_tokenizer("<image>\nHi", add_special_tokens=False)["input_ids"]
    assert ids[0] == 512 and ids.count(512) == 1
