"""Conversation + template + tokenizer -> input_ids and exact labels (one whole-string tokenization)."""

from __future__ import annotations

from typing import Any

IGNORE_INDEX = -100


def load_tokenizer(path: str, image_token: str = "<image>") -> Any:
    """Load a tokenizer as LLaVA does: right padding, `image_token` added as a special token when missing.

    Tokenizers without a pad token get pad = unk (the Llama/Vicuna convention), or pad = eos when
    there is no unk token either. The image token id is `tokenizer.convert_tokens_to_ids(image_token)`.
    """
    from transformers import AutoTokenizer

    # use_fast is ignored by transformers 5 (every tokenizer is Rust-backed); kept as the original's call.
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="right", use_fast=False)
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([image_token], special_tokens=True)
    if tokenizer.pad_token is None:
        if tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        elif tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            raise ValueError(f"tokenizer {path} has no pad, unk or eos token to pad with")
    return tokenizer
