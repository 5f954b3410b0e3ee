"""The tokenizer's special-token strings as templates and the exported chat templates use them (a leaf: no imports).

One home shared by `data.templates` (training's renderers) and `data.chat_template` (the saved Jinja templates),
so both append the same end marker and agree on the BOS.
"""

from __future__ import annotations

from typing import Any


def eos_text(tokenizer: Any) -> str:
    """The end marker string training appends to replies (the tokenizer's EOS, `</s>` without one)."""
    eos = getattr(tokenizer, "eos_token", None) if tokenizer is not None else None
    return eos if eos else "</s>"


def bos_text(tokenizer: Any) -> str:
    """The BOS string (empty when the tokenizer has none; `<s>` without a tokenizer)."""
    if tokenizer is None:
        return "<s>"
    return getattr(tokenizer, "bos_token", None) or ""


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether encoding with `add_special_tokens=True` puts the tokenizer's BOS in front (Llama, Mistral: yes)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos and tokenizer("a", add_special_tokens=False)["input_ids"][:1] != [bos]
