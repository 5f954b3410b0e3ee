"""One build of the model side of a run: tokenizer, template, processor, image geometry, placeholder ids, model.

Training, the data commands (`data validate` / `inspect`, with no weights), the demo and merge-lora all
take this object instead of asking the builder, the template registry and the vision geometry each
on their own. The tiny test/demo parts (`model.preset`) are written here, at the one seam where a
run's components are assembled, never inside the production build path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llava_train.config import RunConfig
from llava_train.data.templates import Template, run_template
from llava_train.data.tokenize import load_tokenizer
from llava_train.model.builder import build_model, check_init_from, config_geometry, image_token_id, video_token_id
from llava_train.model.processor import build_processor
from llava_train.model.sources import resolve_sources
from llava_train.model.tiny import ensure_tiny_components
from llava_train.model.vision import ImageGeometry, run_geometry
from llava_train.utils.logging import get_logger

log = get_logger(__name__)


@dataclass
class Components:
    """What a run needs from the model side.

    tokenizer: the LM's tokenizer with the image token added (right padding, pad = unk or eos).
    template: `data.template` with the run's system prompt and image token.
    processor: the arch's processor (image processor + tokenizer + the template as its chat template).
    geometry: how many tokens (and tower crops) each image / video becomes (`model.vision.ImageGeometry`).
    image_token_id: the image token's id.
    video_token_id: the video token's id (llava_onevision), else None.
    model: the arch's model (None when built with `weights=False`).
    """

    tokenizer: Any
    template: Template
    processor: Any
    geometry: ImageGeometry
    image_token_id: int
    video_token_id: int | None = None
    model: Any = None

    @property
    def image_processor(self) -> Any:
        """The image processor training preprocesses with: the one saved with the model."""
        return self.processor.image_processor


def load_components(cfg: RunConfig, weights: bool = True) -> Components:
    """Build a run's components once; `weights=False` reads configs, tokenizer and processor files only.

    Validating 665K rows must not need (or download) 14 GB of weights, so the data commands pass
    `weights=False`. The model sources are resolved once (`model.sources`) and every builder takes them, the
    geometry and the token ids from here. With weights, the model's config is checked against the data-side
    facts (the image token id and the tokens per image the model will produce).
    """
    ensure_tiny_components(cfg.model)
    sources = resolve_sources(cfg, weights=weights)
    if sources.init is not None:
        log.info("model.init_from=%s: %s", cfg.model.init_from, sources.init.describe())
    # Before anything is built or trained: a checkpoint made for another arch, tower, layer, projector or template.
    check_init_from(cfg, sources)
    extra = (cfg.model.video_token,) if cfg.model.arch == "llava_onevision" else ()
    tokenizer = load_tokenizer(str(sources.tokenizer_folder), image_token=cfg.model.image_token, extra_tokens=extra)
    template = run_template(cfg)
    geometry = run_geometry(cfg, sources.vision_config)
    parts = Components(
        tokenizer=tokenizer,
        template=template,
        processor=build_processor(cfg, tokenizer, template, sources, geometry),
        geometry=geometry,
        image_token_id=image_token_id(tokenizer, cfg.model.image_token),
        video_token_id=video_token_id(tokenizer, cfg),
    )
    if weights:
        parts.model = build_model(cfg, tokenizer, sources, geometry, parts.image_token_id, parts.video_token_id)
        config = parts.model.config
        built = (int(config.image_token_id), getattr(config, "video_token_id", None), config_geometry(cfg, config))
        if built != (parts.image_token_id, parts.video_token_id, parts.geometry):
            raise ValueError(
                f"the model has image/video token ids {built[:2]} and image geometry {built[2]}, the data side "
                f"{(parts.image_token_id, parts.video_token_id)} and {parts.geometry}"
            )
    return parts
