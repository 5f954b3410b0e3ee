"""The `data:` section of the run config: sources (paths, image folders, weights, columns) and how conversations
become tokens. Split from `config.py` (which re-exports these names) along the section boundary; same rules:
no torch, typed documented dataclasses, errors that list valid values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from llava_train.config_io import ConfigError, build, check_choice

TEMPLATES = ("plain", "vicuna_v1", "llava_v1", "llama_2", "mistral", "chatml", "tokenizer")
ON_BAD_SAMPLE = ("error", "skip")


@dataclass
class ColumnsConfig:
    """Which column (or JSON key) of a source holds each field of a LLaVA record; null = the first of the
    usual names that the row has.

    image: the image(s): a path or a list of paths (relative to `image_folder`), an HF `Image` column or a
        list of them (embedded bytes). Usual names: image, images. Tar shards take their image members.
    conversations: the conversation: `from`/`value` or `role`/`content` turns (string or typed content), or
        the_cauldron's `[{user, assistant}]` pairs (its images go before the first turn); a JSON string
        of those is decoded. Usual names: conversations, messages, texts, conversation.
    id: the row id shown in reports (usual name: id; tar shards: the sample key).
    video: OneVision's video (usual name: video).
    prompt, chosen, rejected: a preference row's (stage `dpo`) prompt (messages or a string; usual names: prompt,
        question; LLaVA-RLHF's prompt is its `conversations`) and its two replies (usual names: chosen, rejected;
        LLaVA-RLHF's `output_1` / `output_2` with `preference` are read too).
    """

    image: str | None = None
    conversations: str | None = None
    id: str | None = None
    video: str | None = None
    prompt: str | None = None
    chosen: str | None = None
    rejected: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        """field -> column name (None = the usual names)."""
        return dataclasses.asdict(self)


@dataclass
class SourceConfig:
    """One training/eval data source.

    path: a LLaVA JSON list or JSONL file, a parquet / arrow file, a webdataset `.tar` shard, a local HF
        dataset folder (save_to_disk), a folder of shards (every .json/.jsonl/.parquet/.arrow/.tar file
        below it, sorted by path) or a glob of shards (`data/train-*.parquet`). Each shard is scanned
        and cached on its own: adding a shard scans only the new one.
    image_folder: folder that `image` paths are relative to (paths may not escape it); embedded images
        need none.
    weight: mixture weight relative to the other sources (1.0 = use every row once per epoch;
        0.5 = half of this source's rows per epoch, 2.0 = every row twice).
    name: short name used in reports (default: the file name).
    split: split to read from a save_to_disk DatasetDict.
    columns: which columns hold the image(s), conversation, id and video (see ColumnsConfig).
    """

    path: str
    image_folder: str | None = None
    weight: float = 1.0
    name: str | None = None
    split: str = "train"
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("data source needs a non-empty `path`")
        if self.weight <= 0:
            raise ConfigError(f"data source {self.path}: weight must be > 0, got {self.weight}")
        if isinstance(self.columns, dict):
            self.columns = build(ColumnsConfig, self.columns, "columns")
        for key, column in self.columns.as_dict().items():
            if column is not None and (not isinstance(column, str) or not column):
                raise ConfigError(f"data source {self.path}: columns.{key} must be a column name, got {column!r}")
        if self.name is None:
            self.name = Path(self.path).name


@dataclass
class DataConfig:
    """Training data and how conversations become tokens.

    train: one or more sources, mixed by weight.
    eval: optional held-out sources (same format).
    template: conversation template (see `llava_train.data.templates`); null = the stage's own
        (`plain` for pretrain, `vicuna_v1` for finetune, as LLaVA-1.5).
    system_prompt: override the template's system prompt (null = the template's own).
    image_aspect_ratio: model.arch llava: `pad` to a square with the processor mean colour (LLaVA-1.5), `resize`
        (squash), or `crop` (the processor's own resize + centre crop); llava_next: `anyres` (base crop + the best
        pinpoint grid, unpadded, one newline per row); llava_onevision: `anyres_max_N` (anyres, then the grid
        downsampled to about N crops' worth of tokens). null = the arch's own (pad / anyres / anyres_max_9).
    video_frames: frames sampled uniformly from every video (OneVision `video` rows: a folder of frame
        images or a list of frame files); each video is exactly this many frames (shorter ones repeat
        frames), since transformers encodes a batch's videos as one [B, F, 3, S, S] tensor.
    model_max_length: longest sample in tokens, image tokens included.
    on_bad_sample: `error` stops at the first bad row (with its source and row); `skip` counts and logs each
        skipped row by reason, and replaces a row failing at load time (the run stops past 100 per process).
    group_by_modality_length: LLaVA's sampler: every optimizer step holds one modality, samples of
        similar exact length grouped together.
    packing: pack several samples into each row (block-diagonal attention, exact labels).
    packing_length: tokens per packed row (default: model_max_length).
    cache_dir: where the scan (exact per-sample lengths, bad rows) and JSON row buffers are cached; `auto` =
        `<output_dir>/../.cache` (./.cache without an output folder), shared by `data validate`, training and every
        rank (on a multi-GPU launch one process per node scans, the others read its cache); null disables the cache.
    num_workers: processes used to scan data in `data validate` (default: all cores).
    max_image_side, max_image_aspect_ratio: an image with a longer side or a larger long/short side ratio is a
        bad row (`image_too_large`), found from its header before decoding (`pad` makes a canvas of its side).
    """

    train: list[SourceConfig] = field(default_factory=list)
    eval: list[SourceConfig] = field(default_factory=list)
    template: str | None = None
    system_prompt: str | None = None
    image_aspect_ratio: str | None = None
    video_frames: int = 32
    model_max_length: int = 2048
    on_bad_sample: str = "error"
    group_by_modality_length: bool = False
    packing: bool = False
    packing_length: int | None = None
    cache_dir: str | None = "auto"
    num_workers: int | None = None
    max_image_side: int = 10000
    max_image_aspect_ratio: float = 50.0

    def __post_init__(self) -> None:
        self.train = [s if isinstance(s, SourceConfig) else build(SourceConfig, s, "data.train[]") for s in self.train]
        self.eval = [s if isinstance(s, SourceConfig) else build(SourceConfig, s, "data.eval[]") for s in self.eval]
        if self.template is not None:
            check_choice("data.template", self.template, TEMPLATES)
        if self.video_frames <= 0:
            raise ConfigError(f"data.video_frames must be > 0, got {self.video_frames}")
        check_choice("data.on_bad_sample", self.on_bad_sample, ON_BAD_SAMPLE)
        if self.model_max_length <= 0:
            raise ConfigError(f"data.model_max_length must be > 0, got {self.model_max_length}")
        if self.packing_length is not None and self.packing_length <= 0:
            raise ConfigError(f"data.packing_length must be > 0, got {self.packing_length}")
        if self.max_image_side <= 0 or self.max_image_aspect_ratio < 1:
            raise ConfigError("data.max_image_side must be > 0 and data.max_image_aspect_ratio >= 1")
