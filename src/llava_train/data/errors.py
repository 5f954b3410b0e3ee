"""Bad-sample types: the reason codes a row can be rejected for and the row-level `BadSample`. The user-facing data
errors (`BadSampleError`, `DataFileError`) live in `llava_train.errors` and stay importable from here."""

from __future__ import annotations

from llava_train.errors import BadSampleError as BadSampleError
from llava_train.errors import DataFileError as DataFileError

BAD_REASONS: dict[str, str] = {
    "missing_image": "an image file does not exist",
    "corrupt_image": "an image file cannot be decoded",
    "image_count_mismatch": "number of <image> tags differs from the number of images",
    "image_in_assistant_turn": "an assistant turn holds an <image> tag",
    "bad_roles": "roles are unknown or do not alternate user/assistant",
    "empty_conversation": "the conversation has no turns",
    "empty_reply": "an assistant reply is empty",
    "too_long": "longer than model_max_length and truncation would cut an image or leave no trained token",
    "no_trained_tokens": "no token of the sample is trained",
    "malformed_json": "the row is not valid JSON or not a LLaVA record",
    "image_path_escapes": "an image path is absolute or leaves image_folder",
    "straddling_token": "a token spans a trained and an untrained part of the prompt",
    "bad_video": "a video is not a folder of frame images or a list of frame files, or the arch has no video input",
    # New reasons go last: scan caches store a reason as its index here (and SCAN_VERSION is bumped).
    "image_symlink_escapes": "an image path resolves (through a symbolic link) to a file outside image_folder",
    "image_too_large": "an image side exceeds data.max_image_side or its aspect ratio data.max_image_aspect_ratio",
    "image_format": "an image is not JPEG, PNG, WebP, BMP, GIF or TIFF (other PIL formats are never opened)",
    "row_error": "reading or processing the row raised an unexpected error (the detail names its type)",
    "tar_member": "a tar sample repeats a member or holds two members whose names differ only by case",
    "missing_side": "a preference row (stage dpo) lacks its prompt, chosen or rejected reply",
    "identical_pair": "a preference row's chosen and rejected replies are the same text",
}


class BadSample(ValueError):
    """A row that cannot become a training sample; `reason` is a key of BAD_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in BAD_REASONS:
            raise KeyError(f"unknown bad-sample reason {reason!r}; valid reasons: {', '.join(BAD_REASONS)}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
