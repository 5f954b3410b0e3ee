"""`llava-train convert`: an original-format LLaVA checkpoint (or a stage-1 projector + base models) to HF-native.

The conversion is the training build itself: the source becomes a run's `model.init_from`, the
components are loaded exactly as a finetune would load them (same key map, same strict checks, the
image token added to the tokenizer), and the model, processor (chat template of the original
`version`), generation config and projector are saved. The folder loads with plain
`AutoModelForImageTextToText` / `AutoProcessor`, and is itself a valid `model.init_from`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from llava_train.components import load_components
from llava_train.config import DTYPES, RunConfig, dump_config, from_dict, load_config
from llava_train.config_io import apply_overrides
from llava_train.errors import InitFromError
from llava_train.model.init_source import init_source
from llava_train.model.projector import save_projector
from llava_train.model.serving import save_serving_files
from llava_train.run_files import CONFIG_FILENAME, PROJECTOR_FILE
from llava_train.utils.logging import get_logger

log = get_logger(__name__)

# The template of LLaVA-1.5 checkpoints, which record no `version`: its scripts train with `--version v1`.
DEFAULT_TEMPLATE = "vicuna_v1"


def convert_config(
    src: str,
    out: str | os.PathLike,
    config: str | None = None,
    language_model: str | None = None,
    vision_tower: str | None = None,
    tokenizer: str | None = None,
    template: str | None = None,
    dtype: str | None = None,
    overrides: list[str] | None = None,
) -> RunConfig:
    """The RunConfig a conversion loads `src` with: a given run config (init_from = src), else one from the flags
    and the original config's own fields (vision tower, select layer / feature, dtype, version)."""

    source = init_source(src)
    if source.kind == "full":
        raise InitFromError(f"{src} is already a HF-native LLaVA folder; nothing to convert")
    flags = {
        "model.language_model": language_model,
        "model.vision_tower": vision_tower,
        "model.tokenizer": tokenizer,
        "data.template": template,
        "model.dtype": dtype,
    }
    given = [f"{k}={v}" for k, v in flags.items() if v is not None]
    if config is not None:
        return load_config(config, [*(overrides or []), *given, f"model.init_from={src}", f"train.output_dir={out}"])
    orig = source.original
    model: dict[str, Any] = {"init_from": str(src)}
    if orig is not None:
        if orig.vision_tower:
            model["vision_tower"] = orig.vision_tower
        if orig.select_layer is not None:
            model["vision_feature_layer"] = orig.select_layer
        model["vision_feature_select"] = orig.select_feature
        if orig.dtype in DTYPES:
            model["dtype"] = orig.dtype
    recorded = orig.template if orig is not None and source.kind == "original" else None
    data = {"template": recorded or DEFAULT_TEMPLATE}
    cfg = {"stage": "finetune", "model": model, "data": data, "train": {"output_dir": str(out)}}
    return from_dict(apply_overrides(cfg, [*given, *(overrides or [])]))


def convert(cfg: RunConfig, out: str | os.PathLike) -> Path:
    """Load `cfg.model.init_from` as a run would and write the HF-native folder `out`; returns it."""

    parts = load_components(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parts.model.save_pretrained(str(out))
    save_serving_files(out, parts.processor, parts.model.generation_config)
    save_projector(parts.model, out / PROJECTOR_FILE)
    dump_config(cfg, out / CONFIG_FILENAME)
    log.info("converted %s -> %s (template %s)", cfg.model.init_from, out, parts.template.name)
    return out
