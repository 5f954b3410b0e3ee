"""Tiny tokenizers trained in-process (Llama-style SentencePiece BPE or chatml byte-level BPE) for tests and demos.

Nothing is downloaded: the tokenizer is trained on a built-in corpus (or the caller's text) and saved
as a folder that `AutoTokenizer.from_pretrained` loads. Training is deterministic (one thread).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

STYLES = ("llama", "chatml")

# A Qwen2-like chat template (no tools): default system prompt when none is given, every message
# framed by <|im_start|>role\n ... <|im_end|>\n, and the assistant header as generation prompt.
CHATML_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_SUBJECTS = (
    "the cat",
    "a dog",
    "the red car",
    "two birds",
    "an old man",
    "the little girl",
    "a tall tree",
    "my friend",
)
_VERBS = ("sits on", "looks at", "runs past", "stands near", "jumps over", "holds", "points to", "waits by")
_OBJECTS = ("the table", "a blue house", "the green field", "a white wall", "the river", "an open door", "the road")
_QUESTIONS = (
    "What is in the image?",
    "Describe the picture in detail.",
    "How many people are there?",
    "What color is the car?",
    "Where is the dog?",
    "Is it day or night?",
)
_EXTRA = (
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "A chat between a curious human and an artificial intelligence assistant.",
    "You are a helpful language and vision assistant.",
    "USER: ASSISTANT: [INST] [/INST] <<SYS>> <</SYS>> system user assistant",
    "Answer the questions. Yes. No. Maybe.",
)


def default_corpus() -> list[str]:
    """A few hundred varied English sentences (deterministic), enough for a 512-piece vocabulary."""
    lines: list[str] = list(_EXTRA)
    i = 0
    for s in _SUBJECTS:
        for v in _VERBS:
            for k in range(3):
                o = _OBJECTS[(i + k) % len(_OBJECTS)]
                lines.append(f"{s.capitalize()} {v} {o}, and there are {(i * 7 + k) % 100} of them.")
            i += 1
    for q in _QUESTIONS:
        for k in range(8):
            lines.append(f"{q} The answer is {k + 1}: {_SUBJECTS[k % len(_SUBJECTS)]} {_VERBS[k]} {_OBJECTS[k % 7]}.")
    return lines


def build_tiny_tokenizer(
    out_dir: str | Path, corpus: list[str] | None = None, style: str = "llama", vocab_size: int = 512
) -> str:
    """Train a tiny tokenizer and save it to `out_dir`; returns the folder path.

    style `llama`: SentencePiece BPE as Llama/Vicuna (byte_fallback, split_digits, add_dummy_prefix,
    `<unk>`/`<s>`/`</s>` = 0/1/2, no pad token), loaded by transformers as `LlamaTokenizer`.
    style `chatml`: byte-level BPE with `<|endoftext|>` (pad), `<|im_start|>`, `<|im_end|>` (eos),
    no bos, and a Qwen2-like chat template.
    """
    if style not in STYLES:
        raise KeyError(f"unknown tokenizer style {style!r}; valid styles: {', '.join(STYLES)}")
    text = [line for line in (corpus if corpus is not None else default_corpus()) if line and line.strip()]
    if not text:
        raise ValueError("build_tiny_tokenizer: the corpus has no non-empty line")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if style == "llama":
        _build_llama(out, text, vocab_size)
    else:
        _build_chatml(out, text, vocab_size)
    return str(out)


def _build_llama(out: Path, text: list[str], vocab_size: int) -> None:
    import sentencepiece as spm
    from transformers import AutoTokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        # hard_vocab_limit=False: a small corpus (e.g. a demo's captions) yields fewer pieces
        # instead of failing.
        hard_vocab_limit=False,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        # Llama's own settings: no NFKC, keep repeated spaces.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        num_threads=1,
        minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "model_max_length": 4096,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    # Load the SentencePiece model through transformers' converter and save again so the folder
    # also holds tokenizer.json; then check that it really encodes (an empty tokenizer would give []).
    tok = AutoTokenizer.from_pretrained(str(out), trust_remote_code=False)
    ids = tok("hello world", add_special_tokens=False)["input_ids"]
    if not ids or tok.unk_token_id in ids or len(tok) < 259:
        raise RuntimeError(f"tiny llama tokenizer in {out} does not encode text (ids {ids}, vocab {len(tok)})")
    tok.save_pretrained(str(out))


def _build_chatml(out: Path, text: list[str], vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(text, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_CHAT_TEMPLATE,
        model_max_length=4096,
    )
    tok.save_pretrained(str(out))
    loaded = AutoTokenizer.from_pretrained(str(out), trust_remote_code=False)
    ids = loaded("hello world", add_special_tokens=False)["input_ids"]
    if not ids or loaded.eos_token_id != backend.token_to_id("<|im_end|>"):
        raise RuntimeError(f"tiny chatml tokenizer in {out} does not encode text (ids {ids})")
