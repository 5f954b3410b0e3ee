"""What every saved model folder serves with: a processor that pads on the left and stops at the end of turn.

Training pads on the right (labels follow the prompt), but a client that batches prompts with the processor
as loaded (`processor(text=[...], padding=True)` + `generate`, lmms-eval's `huggingface` model, the
`image-text-to-text` pipeline) appends new tokens after the padding of its shorter rows unless the saved
tokenizer pads on the left. Clients also stop at `tokenizer.eos_token_id` (lmms-eval passes it explicitly,
overriding the generation config), so where a template ends a reply with another special token (ChatML's
`<|im_end|>` on a base tokenizer whose eos is `<|endoftext|>`) the saved tokenizer's eos becomes that token
and the generation config lists both. Every save of a processor (the final folder, checkpoints and their
`hf/` export, `convert`, `merge-lora`, the demo) goes through `save_serving_files`; the training objects are
never changed (training keeps right padding and the LM's own eos).
"""

from __future__ import annotations

import copy
import os
from typing import Any

from llava_train.utils.logging import get_logger

log = get_logger(__name__)

# A reply no chat template rewrites; what the template writes after it closes the turn.
_PROBE_REPLY = "ok"


def _tokenizer(processor: Any) -> Any:
    """The tokenizer of a processor (a bare tokenizer is its own: HF Trainer's processing_class may be one)."""
    return getattr(processor, "tokenizer", processor)


def end_of_turn_id(processor: Any) -> int | None:
    """The token the processor's chat template closes an assistant reply with, when that is one special token.

    Vicuna / Llama-2 / Mistral: the tokenizer's eos (`</s>`); ChatML and Qwen-style LM templates:
    `<|im_end|>`. None when the reply ends with ordinary text (`plain` ends it with a newline) or the
    processor has no chat template.
    """
    tok = _tokenizer(processor)
    if not getattr(processor, "chat_template", None):
        return None
    user = [{"role": "user", "content": "Hi."}]
    try:
        prompt = processor.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        full = processor.apply_chat_template([*user, {"role": "assistant", "content": _PROBE_REPLY}], tokenize=False)
    except Exception as e:  # noqa: BLE001 - a template that refuses the probe must not stop a save
        log.warning("no end-of-turn token found (the chat template refused a one-turn probe: %s)", e)
        return None
    if not full.startswith(prompt) or _PROBE_REPLY not in full[len(prompt) :]:
        return None
    rest = full[len(prompt) :]
    marker = rest[rest.index(_PROBE_REPLY) + len(_PROBE_REPLY) :].lstrip()
    ids = tok(marker, add_special_tokens=False)["input_ids"] if marker else []
    if not ids:
        return None
    added = tok.added_tokens_decoder.get(ids[0])
    special = ids[0] in set(tok.all_special_ids) or (added is not None and added.special)
    return ids[0] if special else None


def _probe_text(processor: Any) -> str:
    conversation = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": _PROBE_REPLY}]
    return processor.apply_chat_template(conversation, tokenize=False)


def serving_processor(processor: Any) -> Any:
    """A copy of `processor` as saved for clients: left padding, eos = the template's end-of-turn token.

    The eos stays the tokenizer's own when the chat template writes `eos_token` itself (changing it would
    change the served prompts); the generation config still lists the end-of-turn token then.
    """
    eot = end_of_turn_id(processor)
    served = copy.deepcopy(processor)
    tok = _tokenizer(served)
    tok.padding_side = "left"
    if eot is not None and eot != tok.eos_token_id:
        before, eos = _probe_text(served), tok.eos_token
        tok.eos_token = tok.convert_ids_to_tokens(eot)
        if _probe_text(served) != before:
            tok.eos_token = eos
            log.warning("the chat template writes eos_token: the saved tokenizer keeps eos %s; stop at %s", eos, eot)
    return served


def serving_generation_config(generation_config: Any, processor: Any) -> Any:
    """A copy of `generation_config` whose eos lists the end-of-turn token first, then the model's eos id(s)."""
    gen = copy.deepcopy(generation_config)
    tok = _tokenizer(processor)
    eos = gen.eos_token_id if gen.eos_token_id is not None else tok.eos_token_id
    ids = list(eos) if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos])
    eot = end_of_turn_id(processor)
    if eot is not None and eot not in ids:
        ids.insert(0, eot)
    gen.eos_token_id = ids[0] if len(ids) == 1 else ids
    if gen.pad_token_id is None:
        gen.pad_token_id = tok.pad_token_id
    return gen


def save_serving_files(out: str | os.PathLike, processor: Any, generation_config: Any = None) -> None:
    """Write the processor (left padding, end-of-turn eos) and, when given, the generation config into `out`."""
    serving_processor(processor).save_pretrained(str(out))
    if generation_config is not None:
        serving_generation_config(generation_config, processor).save_pretrained(str(out))
