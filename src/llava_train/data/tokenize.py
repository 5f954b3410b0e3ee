"""Conversation + template + tokenizer -> input_ids and exact labels (one whole-string tokenization).

THE RULE. A conversation is normalised (`normalize_conversation`), rendered by its template into
ordered segments marked trained or not, and the whole rendered prompt is tokenized ONCE with
`return_offsets_mapping=True` and `add_special_tokens=template.add_special_tokens` (the call the
processor makes at inference, so training and inference ids are identical). Each token takes the
trained flag of the segment holding its first non-whitespace character; whitespace-only or
zero-width tokens (an added BOS) take the flag of the segment of their first character. A token
whose non-whitespace characters lie in both a trained and an untrained segment is an error
(`straddling_token`, naming the template, row and character position). Labels are the ids of
trained tokens and -100 elsewhere; then every image (video) token expands to exactly its image's
count from `model.vision.ImageGeometry` (labels -100). No length arithmetic and no re-tokenised substrings.

`check_template_consistency` additionally compares segment-by-segment tokenization with the
whole-string one once per (template, tokenizer): a difference is logged as a warning (labels come
from the whole string); it is an error only when it would change the trained tokens.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from llava_train.data.errors import BadSample
from llava_train.data.templates import Segment, Template
from llava_train.llava_format import ASSISTANT, DATA_IMAGE_TAG, USER, Turn
from llava_train.remote_code import refuse_remote_code
from llava_train.utils.modules import IGNORE_INDEX

_WHITESPACE = re.compile(r"\s+")
logger = logging.getLogger(__name__)


def load_tokenizer(path: str, image_token: str = "<image>", extra_tokens: tuple[str, ...] = ()) -> Any:
    """Load a tokenizer as LLaVA does: right padding, `image_token` added as a special token when missing.

    `extra_tokens` (OneVision's video token) are added the same way.
    Tokenizers without a pad token get pad = unk (the Llama/Vicuna convention), or pad = eos when
    there is no unk token either. The image token id is `tokenizer.convert_tokens_to_ids(image_token)`.
    """
    from transformers import AutoTokenizer

    # use_fast is ignored by transformers 5 (every tokenizer is Rust-backed); kept as the original's call.

    refuse_remote_code(path)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="right", use_fast=False, trust_remote_code=False)
    missing = [t for t in (image_token, *extra_tokens) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    if tokenizer.pad_token is None:
        if tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        elif tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            raise ValueError(f"tokenizer {path} has no pad, unk or eos token to pad with")
    return tokenizer


# -- tokenization ------------------------------------------------------------------------------


@dataclass
class TokenizedSample:
    """A tokenized training sample (image blocks expanded); labels are IGNORE_INDEX where untrained.

    truncated: the sample was cut at model_max_length (only text after the last image was cut).
    """

    input_ids: list[int]
    labels: list[int]
    num_images: int
    truncated: bool = False
    num_videos: int = 0


def label_tokens(
    prompt: str,
    segments: list[Segment],
    offsets: list[tuple[int, int]],
    template_name: str = "",
    row: Any = None,
) -> list[bool]:
    """The trained flag of each token from its character offsets (THE RULE, see the module docstring).

    A token takes the flag of the segment holding its first non-whitespace character; a token with
    no non-whitespace character (or zero width, e.g. an added BOS) takes the flag of the segment of
    its first character (untrained when it lies past the end). A token whose non-whitespace
    characters lie in a trained and an untrained segment raises BadSample(straddling_token).
    """
    # Vectorised with prefix sums over the characters: per token, how many non-whitespace
    # characters are trained / untrained (a per-token Python loop dominated the dataset scan).
    n = len(prompt)
    if n == 0:
        return [False] * len(offsets)
    char_trained = np.repeat([s.trained for s in segments], [len(s.text) for s in segments]).astype(bool)  # [n]
    nonws = np.ones(n, dtype=bool)  # [n]
    for m in _WHITESPACE.finditer(prompt):
        nonws[m.start() : m.end()] = False
    cs_t = np.concatenate([[0], np.cumsum(nonws & char_trained)])  # [n + 1]
    cs_u = np.concatenate([[0], np.cumsum(nonws & ~char_trained)])  # [n + 1]
    offs = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)  # [T, 2]
    starts = np.clip(offs[:, 0], 0, n)
    ends = np.maximum(np.clip(offs[:, 1], 0, n), starts)
    n_trained = cs_t[ends] - cs_t[starts]
    n_untrained = cs_u[ends] - cs_u[starts]
    straddling = np.flatnonzero((n_trained > 0) & (n_untrained > 0))
    if len(straddling):
        t = int(straddling[0])
        start, end = int(starts[t]), int(ends[t])
        chars = [c for c in range(start, end) if nonws[c]]
        boundary = next(c for c in chars if char_trained[c] != char_trained[chars[0]])
        raise BadSample(
            "straddling_token",
            f"template {template_name!r}, row {row}: token {t} covers characters {start}..{end} "
            f"({prompt[start:end]!r}) of a trained and an untrained segment (boundary at char {boundary})",
        )
    fallback = np.where(starts < n, char_trained[np.minimum(starts, n - 1)], False)
    return np.where(n_trained > 0, True, np.where(n_untrained > 0, False, fallback)).tolist()


def tokenize_conversation(
    turns: list[Turn],
    template: Template,
    tokenizer: Any,
    image_token_id: int,
    image_tokens: int | Sequence[int],
    num_images: int | None = None,
    max_length: int | None = None,
    row: Any = None,
    video_token_id: int | None = None,
    video_tokens: Sequence[int] = (),
) -> TokenizedSample:
    """Render, tokenize once as a whole string, label by character offsets, expand image blocks.

    image_tokens: LM tokens per image, one count for every image (LLaVA-1.5) or one per image in
        text order (anyres: each image's own count from its size).
    video_tokens: LM tokens per video in text order (OneVision), with `video_token_id`.
    `num_images` (the record's image count) must equal the number of `<image>` tokens in the ids
    (image_count_mismatch otherwise; None skips the check), and the videos their `<video>` tokens.
    Over `max_length` the sample is cut at the end when that cuts no image or video block and keeps
    a trained token (`truncated=True`), otherwise BadSample(too_long). A sample with no trained token
    is BadSample(no_trained_tokens).
    """
    segments = template.render(turns, tokenizer)
    prompt = "".join(s.text for s in segments)
    enc = tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=template.add_special_tokens)
    ids: list[int] = list(enc["input_ids"])
    flags = label_tokens(prompt, segments, [tuple(o) for o in enc["offset_mapping"]], template.name, row)
    found = ids.count(image_token_id)
    if num_images is not None and found != num_images:
        raise BadSample("image_count_mismatch", f"{found} <image> tag(s) in the text but {num_images} image(s)")
    per_image = [image_tokens] * found if isinstance(image_tokens, int) else list(image_tokens)
    if len(per_image) != found:
        raise BadSample("image_count_mismatch", f"{found} <image> tag(s) in the text but {len(per_image)} image(s)")
    videos = ids.count(video_token_id) if video_token_id is not None else 0
    if videos != len(video_tokens):
        raise BadSample(
            "image_count_mismatch", f"{videos} <video> tag(s) in the text but {len(video_tokens)} video(s)"
        )
    expand = {image_token_id: iter(per_image)}
    if video_token_id is not None:
        expand[video_token_id] = iter(video_tokens)
    input_ids: list[int] = []
    labels: list[int] = []
    media_end = 0  # end of the last image / video block
    for tok_id, trained in zip(ids, flags):
        if tok_id in expand:
            n = next(expand[tok_id])
            input_ids.extend([tok_id] * n)
            labels.extend([IGNORE_INDEX] * n)
            media_end = len(input_ids)
        else:
            input_ids.append(tok_id)
            labels.append(tok_id if trained else IGNORE_INDEX)
    if all(label == IGNORE_INDEX for label in labels):
        raise BadSample("no_trained_tokens", "no token of the rendered prompt is trained")
    truncated = False
    if max_length is not None and len(input_ids) > max_length:
        if media_end > max_length:
            raise BadSample(
                "too_long",
                f"{len(input_ids)} tokens > {max_length} and the cut would fall in an image "
                f"(image tokens: {per_image}{f', video tokens: {list(video_tokens)}' if videos else ''})",
            )
        if all(label == IGNORE_INDEX for label in labels[:max_length]):
            raise BadSample("too_long", f"{len(input_ids)} tokens > {max_length} and the cut leaves no trained token")
        input_ids, labels, truncated = input_ids[:max_length], labels[:max_length], True
    return TokenizedSample(input_ids, labels, found, truncated, videos)


def trained_spans(labels: list[int]) -> list[list[int]]:
    """The ids of each maximal run of trained labels (decode them to check what a sample trains on)."""
    spans: list[list[int]] = []
    current: list[int] = []
    for label in labels:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return spans


def check_trained_text(sample: TokenizedSample, segments: list[Segment], tokenizer: Any) -> None:
    """Assert that the trained spans decode back to the trained segments (replies + end markers).

    Compared modulo surrounding whitespace: SentencePiece decoding drops the leading space of a
    span's first piece. Raises ValueError naming the first span that differs.
    """
    want = [s.text.strip() for s in segments if s.trained]
    got = [tokenizer.decode(span, skip_special_tokens=False).strip() for span in trained_spans(sample.labels)]
    if got != want:
        for k, (g, w) in enumerate(zip(got, want)):
            if g != w:
                raise ValueError(f"trained span {k} decodes to {g!r}, expected {w!r}")
        raise ValueError(f"{len(got)} trained spans decoded, expected {len(want)}: {got!r} vs {want!r}")


# -- template / tokenizer consistency ------------------------------------------------------------

PROBE_CONVERSATION = (
    Turn(USER, DATA_IMAGE_TAG + "\nWhat is in the image?"),
    Turn(ASSISTANT, "A red car near the house."),
    Turn(USER, "How many people are there?"),
    Turn(ASSISTANT, "There are 2 people."),
)


@dataclass
class ConsistencyReport:
    """Result of `check_template_consistency`.

    consistent: segment-by-segment tokenization gave exactly the whole-string ids.
    first_diff: first differing token position (None when consistent).
    detail: human-readable description of the difference.
    """

    template: str
    consistent: bool
    first_diff: int | None
    detail: str


def check_template_consistency(
    template: Template, tokenizer: Any, turns: list[Turn] | None = None
) -> ConsistencyReport:
    """Compare turn-wise (segment by segment) tokenization with the whole-string tokenization.

    Labels always come from the whole-string tokenization (the ids the processor produces at
    inference), so an id difference is only a WARNING (logged, with the first differing position):
    e.g. SentencePiece's dummy prefix makes every separately tokenized segment start with an extra
    piece. It is an ERROR (ValueError naming the template and position) when the difference would
    change what is trained: a token straddles a trained/untrained boundary, or the trained spans of
    the whole-string labels do not decode to the trained segments.
    """
    if turns is None:
        turns = [Turn(t.role, t.text.replace(DATA_IMAGE_TAG, template.image_token)) for t in PROBE_CONVERSATION]
    turns = list(turns)
    segments = template.render(turns, tokenizer)
    prompt = "".join(s.text for s in segments)
    whole = list(tokenizer(prompt, add_special_tokens=template.add_special_tokens)["input_ids"])
    pieces: list[int] = []
    for k, seg in enumerate(segments):
        add = template.add_special_tokens and k == 0
        pieces.extend(tokenizer(seg.text, add_special_tokens=add)["input_ids"])
    image_id = tokenizer.convert_tokens_to_ids(template.image_token)
    try:
        sample = tokenize_conversation(turns, template, tokenizer, image_id, 1, row="probe")
        check_trained_text(sample, segments, tokenizer)
    except (BadSample, ValueError) as e:
        raise ValueError(f"template {template.name!r} cannot label the probe conversation exactly: {e}") from e
    if whole == pieces:
        return ConsistencyReport(template.name, True, None, "turn-wise tokenization equals whole-string tokenization")
    pos = next((i for i, (a, b) in enumerate(zip(whole, pieces)) if a != b), min(len(whole), len(pieces)))

    def near(ids: list[int]) -> list[str]:
        return tokenizer.convert_ids_to_tokens(ids[max(0, pos - 2) : pos + 3])

    detail = (
        f"template {template.name!r}: turn-wise tokenization differs from whole-string tokenization at token "
        f"{pos} (whole: {near(whole)}, turn-wise: {near(pieces)}); labels use the whole-string ids, which match "
        "inference, and the trained spans were verified"
    )
    logger.warning(detail)
    return ConsistencyReport(template.name, False, pos, detail)
