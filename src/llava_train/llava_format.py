"""The one LLaVA-record parser: conversations and images of a row, as training, `predict` and `eval` read them.

A record is `{"image": path | [paths] (optional), "conversations": [{"from": "human", "value": ...}, ...]}`.
Also accepted, everywhere: `role`/`content` instead of `from`/`value`, the roles `user`/`assistant`
besides `human`/`gpt`, HF-style typed content (`[{"type": "image", "index": 0}, {"type": "text", "text": ...}]`),
embedded images (HF `Image` structs `{"bytes", "path"}`), and, through `canonical_record`, other column names
(`images`, `messages`, `texts`) and the_cauldron's `[{"user": ..., "assistant": ...}]` pairs.
Images are marked in the text with LLaVA's `<image>` tag (or the model's own image token when it is
another string); each user turn is normalised the way the original LLaVA does it: its image
placeholders move to the front, one `<image_token>\\n` each, then the rest of the text, stripped.
Imports only the bad-sample types.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llava_train.data.errors import BadSample

DATA_IMAGE_TAG = "<image>"  # the placeholder LLaVA-format data uses, whatever the model's image token is
DATA_VIDEO_TAG = "<video>"  # a video row's placeholder (LLaVA-Video data writes <image> for it: both are read)
USER, ASSISTANT = "user", "assistant"
ROLES = {"human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT}


@dataclass(frozen=True)
class Turn:
    """One message: role is `user` or `assistant`; text holds image tokens (user turns only, at the front)."""

    role: str
    text: str


def image_markers(image_token: str) -> tuple[str, ...]:
    """Strings that mark an image in data text: LLaVA's `<image>` tag and the model's image token."""
    return (DATA_IMAGE_TAG,) if image_token == DATA_IMAGE_TAG else (image_token, DATA_IMAGE_TAG)


def video_markers(video_token: str | None) -> tuple[str, ...]:
    """Strings that mark a video in data text: `<video>` and the model's video token (none without video)."""
    if video_token is None:
        return ()
    return (DATA_VIDEO_TAG,) if video_token == DATA_VIDEO_TAG else (video_token, DATA_VIDEO_TAG)


def split_images(
    text: str, image_token: str = DATA_IMAGE_TAG, markers: tuple[str, ...] | None = None
) -> tuple[int, str]:
    """(number of image markers in `text`, the text without them, stripped when there was any marker).

    `markers` replaces the image markers (e.g. a video row's, where every placeholder is the video)."""
    count = 0
    for marker in image_markers(image_token) if markers is None else markers:  # the model's token first
        count += text.count(marker)
        text = text.replace(marker, "")
    return count, text.strip() if count else text


def user_text(n_images: int, text: str, image_token: str = DATA_IMAGE_TAG) -> str:
    """A normalised user turn: `image_token + "\\n"` per image, then the stripped text, all stripped.

    With no image the text is kept as it is. An image-only turn is just the token (no newline).
    """
    return ((image_token + "\n") * n_images + text.strip()).strip() if n_images else text


def message_text(content: Any, where: str) -> tuple[int, str]:
    """(images, text) of a message's content: a string with image markers, or typed items (`image` / `video` /
    `text`; a video row counts its one `video` item here)."""
    if isinstance(content, str):
        return 0, content
    if not isinstance(content, list):
        raise BadSample("malformed_json", f"{where} text must be a string or a list of typed items")
    images, texts = 0, []
    for item in content:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind in ("image", "video"):
            index = item.get("index")
            # Images are matched to placeholders in text order; an `index` saying otherwise would pair a
            # reply with the wrong picture, so it is rejected rather than silently reordered.
            if index is not None and index != images:
                raise BadSample(
                    "image_count_mismatch", f"{where} image item {images} has index {index}: images must be in order"
                )
            images += 1
        elif kind == "text" and isinstance(item.get("text"), str):
            texts.append(item["text"])
        else:
            raise BadSample("malformed_json", f"{where} has a content item that is neither an image nor a text")
    return images, "".join(texts)


def normalize_conversation(
    conversations: Any, image_token: str = DATA_IMAGE_TAG, video_token: str | None = None
) -> list[Turn]:
    """A record's `conversations` -> alternating user/assistant turns, ending with a reply.

    One leading assistant turn is dropped (LLaVA data has rows that start with gpt); roles must then
    alternate starting with the user; replies must be non-empty and hold no image. Each user turn
    becomes `user_text(k, text)`: for one image the original's `"<image>\\n" + text`, and one
    `<image>\\n` per image as llava-hf's chat template writes them. A video row (`video_token` given)
    reads every placeholder (`<image>`, `<video>`, the model's tokens) as its video and writes
    `video_token` instead. Raises BadSample (bad_roles, empty_conversation, empty_reply,
    image_in_assistant_turn, malformed_json).
    """
    placeholder = image_token if video_token is None else video_token
    markers = None if video_token is None else (*video_markers(video_token), *image_markers(image_token))
    if not isinstance(conversations, list):
        raise BadSample("malformed_json", f"`conversations` must be a list, got {type(conversations).__name__}")
    raw: list[tuple[str, int, str]] = []
    for i, msg in enumerate(conversations):
        if not isinstance(msg, dict):
            raise BadSample("malformed_json", f"turn {i} is not an object")
        role = msg.get("from", msg.get("role"))
        if role not in ROLES:
            raise BadSample("bad_roles", f"turn {i} has unknown role {role!r}; valid roles: {', '.join(ROLES)}")
        typed, text = message_text(msg.get("value", msg.get("content")), f"turn {i}")
        tagged, text = split_images(text, image_token, markers)
        raw.append((ROLES[role], typed + tagged, text))
    if raw and raw[0][0] == ASSISTANT:
        raw = raw[1:]
    if not raw:
        raise BadSample("empty_conversation", "the conversation has no user/assistant turns")
    turns: list[Turn] = []
    for i, (role, images, text) in enumerate(raw):
        expected = USER if i % 2 == 0 else ASSISTANT
        if role != expected:
            raise BadSample("bad_roles", f"turn {i} is {role}, expected {expected} (roles must alternate)")
        if role == ASSISTANT:
            if images:
                raise BadSample("image_in_assistant_turn", f"assistant turn {i} holds {DATA_IMAGE_TAG}")
            if not text.strip():
                raise BadSample("empty_reply", f"assistant turn {i} is empty")
            turns.append(Turn(role, text))
        else:
            turns.append(Turn(role, user_text(images, text, placeholder)))
    if turns[-1].role != ASSISTANT:
        raise BadSample("bad_roles", "the conversation ends with a user turn (no reply to train on)")
    return turns


def record_images(record: dict[str, Any]) -> list[Any]:
    """The record's images in order, as given (`image` missing, one path or HF `Image` struct, or a list);
    not resolved or opened (`data.images.image_ref` does that)."""
    image = record.get("image")
    if image is None:
        return []
    return list(image) if isinstance(image, (list, tuple)) else [image]


# Usual column names of each record field, in the order they are looked for (LLaVA, OneVision, TRL/H4,
# the_cauldron / FineVision, TIGER-Lab's llava-data).
FIELD_COLUMNS: dict[str, tuple[str, ...]] = {
    "id": ("id",),
    "image": ("image", "images"),
    "conversations": ("conversations", "messages", "texts", "conversation"),
    "video": ("video",),
    # Preference rows (stage dpo): TRL's prompt/chosen/rejected, RLAIF-V's question/chosen/rejected, LLaVA-RLHF's
    # conversations (the prompt) + output_1/output_2 + preference.
    "prompt": ("prompt", "question"),
    "chosen": ("chosen",),
    "rejected": ("rejected",),
    "output_1": ("output_1",),
    "output_2": ("output_2",),
    "preference": ("preference",),
}


def canonical_record(raw: Mapping[str, Any], columns: Mapping[str, str | None] | None = None) -> dict[str, Any]:
    """A row of any supported layout as a LLaVA record (`id`, `image`, `conversations`, `video` keys, each only
    when the row has it).

    columns: field -> the column holding it (`config.ColumnsConfig`); a missing or None entry takes the first
    of FIELD_COLUMNS present in the row. A conversation stored as a JSON string is decoded, and the_cauldron's
    `[{"user", "assistant"}]` pairs become turns, with one `<image>` per image before the first user text
    when the text holds no image tag (the_cauldron's convention). Raises BadSample(malformed_json).
    """
    out: dict[str, Any] = {}
    for key, usual in FIELD_COLUMNS.items():
        name = (columns or {}).get(key)
        for column in (name,) if name else usual:
            if column in raw:
                out[key] = raw[column]
                break
    conv = out.get("conversations")
    if isinstance(conv, str):
        try:
            conv = json.loads(conv)
        except json.JSONDecodeError as e:
            raise BadSample("malformed_json", f"the conversation is a string but not JSON: {e}") from e
    if isinstance(conv, list) and conv and all(isinstance(t, dict) and set(t) <= {"user", "assistant"} for t in conv):
        conv = pair_turns(conv, len(record_images(out)))
    if conv is not None:
        out["conversations"] = conv
    return out


def pair_turns(pairs: list[dict[str, Any]], num_images: int) -> list[dict[str, Any]]:
    """the_cauldron's `[{"user": q, "assistant": a}, ...]` as `from`/`value` turns; the row's images go before the
    first question (one `<image>` each) unless the text already places them with tags."""
    turns: list[dict[str, Any]] = []
    for pair in pairs:
        turns.append({"from": "human", "value": pair.get("user")})
        turns.append({"from": "gpt", "value": pair.get("assistant")})
    tagged = any(isinstance(t["value"], str) and DATA_IMAGE_TAG in t["value"] for t in turns)
    if num_images and not tagged and isinstance(turns[0]["value"], str):
        turns[0]["value"] = DATA_IMAGE_TAG * num_images + "\n" + turns[0]["value"]
    return turns


def record_id(record: dict[str, Any], row: int) -> Any:
    """A row's id for reports (`id` key, else its row index)."""
    return record.get("id", row)


def record_video(record: dict[str, Any]) -> Any:
    """The record's `video` as given (a folder of frames or a list of frame files), None without one."""
    return record.get("video")


def count_images(turns: list[Turn], image_token: str = DATA_IMAGE_TAG) -> int:
    """Image placeholders in normalised turns."""
    return sum(t.text.count(image_token) for t in turns)


def to_messages(
    turns: list[Turn], image_token: str = DATA_IMAGE_TAG, video_token: str | None = None
) -> list[dict[str, Any]]:
    """Normalised turns as HF chat messages with typed content (videos, then images first), what
    `apply_chat_template` takes."""
    messages = []
    for t in turns:
        v, text = split_images(t.text, image_token, (video_token,)) if video_token else (0, t.text)
        n, text = split_images(text, image_token)
        content: list[dict[str, Any]] = [{"type": "video"} for _ in range(v)]
        content += [{"type": "image"} for _ in range(n)]
        n += v
        if text or not n:
            content.append({"type": "text", "text": text})
        messages.append({"role": t.role, "content": content})
    return messages


# -- preference rows (stage dpo) -------------------------------------------------------------------


def preference_conversations(record: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(chosen, rejected) conversations of a preference row: its prompt turns + one reply each.

    Read forms (after `canonical_record`): TRL's `prompt` (messages or a string) / `chosen` / `rejected` (a string
    or a one-message assistant list), RLAIF-V's `question` / `chosen` / `rejected`, LLaVA-RLHF's `conversations`
    (the prompt) + `output_1` / `output_2` (`{"from", "value"}`) + `preference` (1 or 2: the chosen output).
    A string prompt without an image tag gets one `<image>` per image in front (RLAIF-V's convention); a
    multi-turn prompt keeps its earlier replies as context (untrained). Raises BadSample(missing_side) when a
    part is missing, (identical_pair) when both replies are the same text.
    """
    prompt = record.get("prompt", record.get("conversations"))
    if "output_1" in record or "output_2" in record:
        choice = record.get("preference")
        if choice not in (1, 2, "1", "2"):
            raise BadSample("missing_side", f"LLaVA-RLHF row with preference {choice!r} (expected 1 or 2)")
        outputs = [record.get("output_1"), record.get("output_2")]
        chosen, rejected = outputs[int(choice) - 1], outputs[2 - int(choice)]
    else:
        chosen, rejected = record.get("chosen"), record.get("rejected")
    if prompt is None or (isinstance(prompt, (str, list)) and not prompt):
        raise BadSample("missing_side", "the preference row has no prompt (prompt, question or conversations)")
    if isinstance(prompt, str):
        tagged = DATA_IMAGE_TAG in prompt
        images = len(record_images(record))
        prompt = [{"from": "human", "value": (DATA_IMAGE_TAG + "\n") * (0 if tagged else images) + prompt}]
    if not isinstance(prompt, list):
        raise BadSample("malformed_json", f"the prompt must be a string or a list of messages, got {type(prompt)}")
    replies = [reply_text(chosen, "chosen"), reply_text(rejected, "rejected")]
    if replies[0].strip() == replies[1].strip():
        raise BadSample("identical_pair", f"chosen and rejected are the same reply: {replies[0][:80]!r}")
    chosen_conv, rejected_conv = ([*prompt, {"from": "gpt", "value": r}] for r in replies)
    return chosen_conv, rejected_conv


def reply_text(side: Any, name: str) -> str:
    """The text of one preference reply: a string, a `{"from"/"role", "value"/"content"}` message or a list of one
    assistant message (TRL's conversational form). BadSample(missing_side) when absent or empty."""
    if isinstance(side, list):
        if len(side) != 1 or not isinstance(side[0], dict):
            raise BadSample("missing_side", f"{name} must be one assistant message, got {len(side)} item(s)")
        side = side[0]
    if isinstance(side, dict):
        role = side.get("from", side.get("role", "assistant"))
        if ROLES.get(role, ASSISTANT) != ASSISTANT:
            raise BadSample("bad_roles", f"{name} is a {role} message, expected an assistant reply")
        images, side = message_text(side.get("value", side.get("content")), name)
        if images:
            raise BadSample("image_in_assistant_turn", f"{name} holds an image")
    if side is None or not isinstance(side, str) or not side.strip():
        raise BadSample("missing_side", f"the preference row has no {name} reply")
    return side
