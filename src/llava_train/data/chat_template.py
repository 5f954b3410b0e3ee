"""The Jinja export of `data.templates`: each template as the chat template saved with the processor.

It renders HF messages (string or typed-list content, image / video items or markers) to exactly the
text the training renderer produces (tests/data/test_serving.py checks every template turn by turn).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llava_train.data.special_tokens import bos_text, eos_text, tokenizer_adds_bos
from llava_train.llava_format import image_markers, video_markers

if TYPE_CHECKING:
    from llava_train.data.templates import Template


def _jinja_str(s: str) -> str:
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _jinja_content(image_token: str, video_token: str | None = None) -> str:
    """A Jinja macro rendering a message's content as training normalises it (`llava_format.normalize_conversation`).

    Images are the typed `image` items plus the image markers in the text; with any image the turn is
    `image_token + "\\n"` per image, then the text without markers, all stripped; without one the text
    is kept as it is. With a video token, typed `video` items and video markers come first the same
    way (`video_token + "\\n"` each).
    """
    markers = "[" + ", ".join(_jinja_str(m) for m in image_markers(image_token)) + "]"
    vmarkers = "[" + ", ".join(_jinja_str(m) for m in video_markers(video_token)) + "]" if video_token else "[]"
    video = _jinja_str(video_token + "\n") if video_token else "''"
    return (
        "{%- macro content(m) -%}"
        "{%- if m['content'] is string -%}{%- set ns = namespace(k=0, v=0, t=m['content']) -%}"
        "{%- else -%}{%- set ns = namespace("
        "k=m['content'] | selectattr('type', 'equalto', 'image') | list | length, "
        "v=m['content'] | selectattr('type', 'equalto', 'video') | list | length, "
        "t=m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('')) -%}"
        "{%- endif -%}"
        "{%- set ns.tags = 0 -%}{%- set ns.vtags = 0 -%}"
        "{%- for marker in " + vmarkers + " -%}"
        "{%- set ns.vtags = ns.vtags + ns.t.count(marker) -%}{%- set ns.t = ns.t.replace(marker, '') -%}"
        "{%- endfor -%}"
        "{%- for marker in " + markers + " -%}"
        "{%- set ns.tags = ns.tags + ns.t.count(marker) -%}{%- set ns.t = ns.t.replace(marker, '') -%}"
        "{%- endfor -%}"
        "{%- if ns.k + ns.tags + ns.v + ns.vtags -%}"
        "{{ ((" + video + " * (ns.v + ns.vtags)) ~ (" + _jinja_str(image_token + "\n") + " * (ns.k + ns.tags))"
        " ~ (ns.t | trim)) | trim }}"
        "{%- else -%}{{ ns.t }}{%- endif -%}"
        "{%- endmacro -%}"
    )


def jinja_template(t: Template, tok: Any) -> str:
    """The chat template of one of our templates (every kind but `tokenizer`)."""
    eos, bos = eos_text(tok), bos_text(tok)
    img = _jinja_str(t.image_token)
    head = (
        _jinja_content(t.image_token, t.video_token)
        + "{%- if messages and messages[0]['role'] == 'system' -%}"
        + "{%- set sys = content(messages[0]) -%}{%- set msgs = messages[1:] -%}"
        + "{%- else -%}{%- set sys = "
        + _jinja_str(t.system)
        + " -%}{%- set msgs = messages -%}{%- endif -%}"
    )
    if t.kind == "plain":
        vid = _jinja_str(t.video_token) if t.video_token else None
        head_tokens = "{{ content(m).count(" + img + ") * " + img + " }}"
        if vid:
            head_tokens += "{{ content(m).count(" + vid + ") * " + vid + " }}"
        body = (
            "{%- for m in msgs -%}"
            "{%- if m['role'] == 'user' -%}" + head_tokens + ""
            "{%- else -%}{{ content(m) }}{{ '\\n' }}{%- endif -%}"
            "{%- endfor -%}"
        )
    elif t.kind == "vicuna":
        body = (
            "{%- if sys -%}{{ sys }}{{ ' ' }}{%- endif -%}"
            "{%- for m in msgs -%}"
            "{%- if m['role'] == 'user' -%}USER: {{ content(m) }} ASSISTANT:"
            "{%- else -%}{{ ' ' }}{{ content(m) }}" + "{{ " + _jinja_str(eos) + " }}{%- endif -%}"
            "{%- endfor -%}"
        )
    elif t.kind == "llama_2":
        sep = _jinja_str(bos if t.options.get("round_sep") == "bos" else t.options.get("round_sep", ""))
        body = (
            "{%- for m in msgs -%}"
            "{%- if m['role'] == 'user' -%}"
            "{%- if not loop.first -%}{{ " + sep + " }}{%- endif -%}"
            "[INST] {% if loop.first and sys %}<<SYS>>\n{{ sys }}\n<</SYS>>\n\n{% endif %}{{ content(m) }} [/INST]"
            "{%- else -%}{{ ' ' }}{{ content(m) }}{{ ' ' }}{{ " + _jinja_str(eos) + " }}{%- endif -%}"
            "{%- endfor -%}"
        )
    elif t.kind == "chatml":
        body = (
            "{%- if sys -%}<|im_start|>system{{ '\\n' }}{{ sys }}<|im_end|>{%- endif -%}"
            "{%- for m in msgs -%}"
            "{%- if m['role'] == 'user' -%}<|im_start|>user{{ '\\n' }}{{ content(m) }}<|im_end|>"
            "<|im_start|>assistant{{ '\\n' }}"
            "{%- else -%}{{ content(m) }}<|im_end|>{%- endif -%}"
            "{%- endfor -%}"
        )
    else:  # pragma: no cover - guarded by the registry
        raise KeyError(t.kind)
    # The generation prompt is already part of each user turn's rendering in these formats, so
    # add_generation_prompt needs no extra text.
    return head + body


def jinja_tokenizer(t: Template, tok: Any) -> str:
    """The LM's own chat template behind a prelude that gives it what training gives it.

    The prelude normalises every message to string content (typed items included: LM templates take
    strings only) and inserts the configured system prompt when the conversation has no system
    message; the LM's template then renders as usual, and a leading BOS it writes is dropped when the
    tokenizer adds BOS itself, so the processor's tokenization puts BOS in exactly once.
    """
    inner = getattr(tok, "chat_template", None) if tok is not None else None
    if not inner or not isinstance(inner, str):
        raise ValueError("template 'tokenizer' needs a tokenizer that has a (single) chat_template")
    system = (
        "{%- if not (messages and messages[0]['role'] == 'system') -%}"
        "{%- set ns_msgs.items = [{'role': 'system', 'content': " + _jinja_str(t.system) + "}] -%}"
        "{%- endif -%}"
        if t.system
        else ""
    )
    strip_bos = tokenizer_adds_bos(tok) and bool(getattr(tok, "bos_token", None))
    tail = (
        "{%- if rendered.startswith(" + _jinja_str(tok.bos_token) + ") -%}"
        "{{ rendered[" + str(len(tok.bos_token)) + ":] }}{%- else -%}{{ rendered }}{%- endif -%}"
        if strip_bos
        else "{{ rendered }}"
    )
    return (
        _jinja_content(t.image_token, t.video_token)
        + "{%- set ns_msgs = namespace(items=[]) -%}"
        + system
        + "{%- for m in messages -%}"
        + "{%- set ns_msgs.items = ns_msgs.items + [{'role': m['role'], 'content': content(m)}] -%}"
        + "{%- endfor -%}"
        + "{%- set messages = ns_msgs.items -%}"
        + "{%- set rendered -%}"
        + inner
        + "{%- endset -%}"
        + tail
    )
