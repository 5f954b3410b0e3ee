"""Conversation templates: a conversation renders into ordered text segments, each trained or not. No I/O.

The strings reproduce the original LLaVA-1.5 code (haotian-liu/LLaVA v1.2.2) exactly; see
`shared/reference/llava-1.5.md`. The image token (`<image>` unless `model.image_token` says otherwise)
stays in the text as the image placeholder; tokenization expands it to the vision tower's number of
feature tokens.

What you train is what you serve: `Template.chat_template` exports each template as the Jinja chat
template saved with the processor, which renders HF messages (string or typed-list content) to
exactly the text `Template.prompt` renders for training. The `tokenizer` template trains through that
exported template itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llava_train.data.chat_template import jinja_template, jinja_tokenizer
from llava_train.data.special_tokens import bos_text, eos_text
from llava_train.llava_format import (
    ASSISTANT,
    DATA_IMAGE_TAG,
    USER,
    Turn,
    to_messages,
)

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language."
)
CHATML_SYSTEM = "Answer the questions."


@dataclass(frozen=True)
class Segment:
    """A span of the rendered prompt; `trained` spans get their token ids as labels."""

    text: str
    trained: bool


@dataclass(frozen=True)
class Template:
    """A conversation format.

    kind: rendering style (`plain`, `vicuna`, `llama_2`, `chatml`, `tokenizer`).
    system: default system prompt ("" for none; for `tokenizer` "" leaves the LM template's default).
    add_special_tokens: whether the tokenizer's own BOS/EOS insertion applies when encoding the
        rendered prompt. True for every template: it is what the processor does with a prompt at
        inference (`processor(text=prompt)`). The `tokenizer` template therefore drops a leading BOS
        that the LM's chat template writes when the tokenizer adds one itself (BOS once, not twice).
    image_token: the model's image placeholder token (`model.image_token`).
    video_token: the model's video placeholder token (OneVision's `model.video_token`), None without video.
    """

    name: str
    kind: str
    system: str = ""
    add_special_tokens: bool = True
    options: dict[str, Any] = field(default_factory=dict)
    image_token: str = DATA_IMAGE_TAG
    video_token: str | None = None

    def configured(
        self, system: str | None = None, image_token: str | None = None, video_token: str | None = None
    ) -> Template:
        """The same template with another system prompt, image and/or video token (None keeps the current one)."""
        return Template(
            self.name,
            self.kind,
            self.system if system is None else system,
            self.add_special_tokens,
            dict(self.options),
            self.image_token if image_token is None else image_token,
            self.video_token if video_token is None else video_token,
        )

    @property
    def placeholders(self) -> tuple[str, ...]:
        """The placeholder tokens a user turn may start with (image, and video when the model has one)."""
        return (self.image_token,) if self.video_token is None else (self.image_token, self.video_token)

    # -- rendering ---------------------------------------------------------------------------

    def render(self, turns: list[Turn], tokenizer: Any = None, add_generation_prompt: bool = False) -> list[Segment]:
        """Render alternating user/assistant turns into segments.

        With `add_generation_prompt`, `turns` ends with a user turn and the result ends where the
        assistant's reply would start (the inference prompt). `tokenizer` supplies the BOS/EOS
        strings (and the chat template for the `tokenizer` kind).
        """
        _check_turns(turns, add_generation_prompt)
        render = _RENDERERS[self.kind]
        segments = render(self, turns, tokenizer, add_generation_prompt)
        return _merge(segments)

    def prompt(self, turns: list[Turn], tokenizer: Any = None, add_generation_prompt: bool = False) -> str:
        """The rendered prompt as one string."""
        return "".join(s.text for s in self.render(turns, tokenizer, add_generation_prompt))

    def chat_template(self, tokenizer: Any = None) -> str:
        """A Jinja chat template that renders HF-style messages exactly as `prompt()` does.

        Saved with the processor so `processor.apply_chat_template(messages,
        add_generation_prompt=True)` gives the prompt the model was trained on. Message content
        may be a string (with image placeholders) or a list of `{"type": "image"}` /
        `{"type": "text", "text": ...}` items; each user turn is normalised as in training (images
        at the front, one `<image>\\n` each, the text stripped). Without a system message the
        configured system prompt is used. For `tokenizer` the LM's own template runs on the
        normalised messages, minus a leading BOS the tokenizer adds itself.
        """
        if self.kind == "tokenizer":
            return jinja_tokenizer(self, tokenizer)
        return jinja_template(self, tokenizer)


def _check_turns(turns: list[Turn], add_generation_prompt: bool) -> None:
    if not turns:
        raise ValueError("empty conversation")
    for i, t in enumerate(turns):
        expected = USER if i % 2 == 0 else ASSISTANT
        if t.role != expected:
            raise ValueError(f"turn {i} has role {t.role!r}; roles must alternate user/assistant starting with user")
    if add_generation_prompt and turns[-1].role != USER:
        raise ValueError("add_generation_prompt needs the conversation to end with a user turn")
    if not add_generation_prompt and turns[-1].role != ASSISTANT:
        raise ValueError("a training conversation must end with an assistant turn")


def _merge(segments: list[Segment]) -> list[Segment]:
    out: list[Segment] = []
    for s in segments:
        if not s.text:
            continue
        if out and out[-1].trained == s.trained:
            out[-1] = Segment(out[-1].text + s.text, s.trained)
        else:
            out.append(s)
    return out


# -- renderers ---------------------------------------------------------------------------------


def _render_plain(t: Template, turns: list[Turn], tok: Any, gen: bool) -> list[Segment]:
    # Stage-1 alignment: the human turn is reduced to its image placeholder(s); the caption and
    # a newline are trained. No system prompt, no roles, no EOS.
    segs: list[Segment] = []
    for i in range(0, len(turns), 2):
        # Placeholders sit at the front of a normalised user turn, in order.
        text = turns[i].text
        segs.append(Segment("".join(p * text.count(p) for p in t.placeholders), False))
        if i + 1 < len(turns):
            segs.append(Segment(turns[i + 1].text + "\n", True))
    return segs


def _render_vicuna(t: Template, turns: list[Turn], tok: Any, gen: bool) -> list[Segment]:
    # "{sys} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>"
    # The space before each reply belongs to the reply's first token (SentencePiece "▁word",
    # byte-level "Ġword"), so it sits in the trained segment.
    segs = [Segment((t.system + " ") if t.system else "", False)]
    eos = eos_text(tok)
    for i in range(0, len(turns), 2):
        segs.append(Segment(f"USER: {turns[i].text} ASSISTANT:", False))
        if i + 1 < len(turns):
            segs.append(Segment(f" {turns[i + 1].text}{eos}", True))
    return segs


def _render_llama_2(t: Template, turns: list[Turn], tok: Any, gen: bool) -> list[Segment]:
    # "[INST] <<SYS>>\n{sys}\n<</SYS>>\n\n{q1} [/INST] {a1} </s><s>[INST] {q2} [/INST] {a2} </s>"
    # The leading <s> comes from the tokenizer (add_special_tokens); later rounds start with the
    # separator (`<s>` for llama_2, "" for mistral).
    sep = t.options.get("round_sep", "bos")
    sep_text = bos_text(tok) if sep == "bos" else sep
    eos = eos_text(tok)
    segs: list[Segment] = []
    for i in range(0, len(turns), 2):
        q = turns[i].text
        if i == 0 and t.system:
            q = f"<<SYS>>\n{t.system}\n<</SYS>>\n\n{q}"
        segs.append(Segment((sep_text if i > 0 else "") + f"[INST] {q} [/INST]", False))
        if i + 1 < len(turns):
            segs.append(Segment(f" {turns[i + 1].text} {eos}", True))
    return segs


def _render_chatml(t: Template, turns: list[Turn], tok: Any, gen: bool) -> list[Segment]:
    # LLaVA's chatml_direct: no newline after <|im_end|>.
    segs = [Segment(f"<|im_start|>system\n{t.system}<|im_end|>" if t.system else "", False)]
    for i in range(0, len(turns), 2):
        segs.append(Segment(f"<|im_start|>user\n{turns[i].text}<|im_end|><|im_start|>assistant\n", False))
        if i + 1 < len(turns):
            segs.append(Segment(f"{turns[i + 1].text}<|im_end|>", True))
    return segs


def _render_tokenizer(t: Template, turns: list[Turn], tok: Any, gen: bool) -> list[Segment]:
    # The LM's chat template, wrapped as it is exported (`chat_template.jinja_tokenizer`), so training renders
    # exactly what the saved processor renders. Each assistant reply is located by rendering growing
    # prefixes of the conversation: prompt_k (history + generation prompt) must be a prefix of full_k
    # (history + reply). A template that rewrites earlier turns is rejected, not guessed.
    if tok is None or not getattr(tok, "chat_template", None):
        raise ValueError("template 'tokenizer' needs a tokenizer with a chat_template")
    template = jinja_tokenizer(t, tok)
    messages = to_messages(turns, t.image_token, t.video_token)

    def apply(upto: int, generation: bool) -> str:
        return tok.apply_chat_template(
            messages[:upto], chat_template=template, tokenize=False, add_generation_prompt=generation
        )

    segs: list[Segment] = []
    done = ""
    for i in range(0, len(turns), 2):
        prompt = apply(i + 1, True)
        if not prompt.startswith(done):
            raise ValueError(f"template 'tokenizer': the chat template rewrites earlier turns at turn {i}")
        segs.append(Segment(prompt[len(done) :], False))
        done = prompt
        if i + 1 < len(turns):
            full = apply(i + 2, False)
            if not full.startswith(done):
                raise ValueError(f"template 'tokenizer': the chat template rewrites the prompt at turn {i + 1}")
            reply = full[len(done) :]
            # Whitespace after the end marker (e.g. "<|im_end|>\n") is layout, not the reply.
            stripped = reply.rstrip()
            segs.append(Segment(stripped, True))
            segs.append(Segment(reply[len(stripped) :], False))
            done = full
    return segs


_RENDERERS = {
    "plain": _render_plain,
    "vicuna": _render_vicuna,
    "llama_2": _render_llama_2,
    "chatml": _render_chatml,
    "tokenizer": _render_tokenizer,
}

TEMPLATES: dict[str, Template] = {
    "plain": Template("plain", "plain"),
    "vicuna_v1": Template("vicuna_v1", "vicuna", VICUNA_SYSTEM),
    "llava_v1": Template("llava_v1", "vicuna", LLAVA_V1_SYSTEM),
    "llama_2": Template("llama_2", "llama_2", LLAMA_2_SYSTEM, options={"round_sep": "bos"}),
    "mistral": Template("mistral", "llama_2", "", options={"round_sep": ""}),
    "chatml": Template("chatml", "chatml", CHATML_SYSTEM),
    "tokenizer": Template("tokenizer", "tokenizer", ""),
}


def get_template(name: str, system_prompt: str | None = None, image_token: str = DATA_IMAGE_TAG) -> Template:
    """Look up a template by exact name (unknown names list the valid ones), with the run's system prompt
    (None keeps the template's) and image token."""
    if name not in TEMPLATES:
        raise KeyError(f"unknown template {name!r}; valid templates: {', '.join(TEMPLATES)}")
    return TEMPLATES[name].configured(system_prompt, image_token)


def run_template(cfg: Any) -> Template:
    """The template of a RunConfig: `data.template` with `data.system_prompt` and `model.image_token`."""
    template = get_template(cfg.data.template, cfg.data.system_prompt, cfg.model.image_token)
    if cfg.model.arch == "llava_onevision":
        template = template.configured(video_token=cfg.model.video_token)
    return template
