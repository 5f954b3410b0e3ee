"""One build of the model side of a run: tokenizer, template, processor, tokens per image, image-token id, model.

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
from llava_train.utils.logging import get_logger

log = get_logger(__name__)


@dataclass
class Components:
    """What a run needs from the model side.

    tokenizer: the LM's tokenizer with the image token added (right padding, pad = unk or eos).
    template: `data.template` with the run's system prompt and image token.
    processor: LlavaProcessor (image processor + tokenizer + the template as its chat template).
    num_image_tokens: feature tokens one image becomes (`model.vision.image_tokens`).
    image_token_id: the image token's id.
    model: the LlavaForConditionalGeneration (None when built with `weights=False`).
    """

    tokenizer: Any
    template: Template
    processor: Any
    num_image_tokens: int
    image_token_id: int
    model: Any = None


def load_components(cfg: RunConfig, weights: bool = True) -> Components:
    """Build a run's components once; `weights=False` reads configs, tokenizer and processor files only.

    Validating 665K rows must not need (or download) 14 GB of weights, so the data commands pass
    `weights=False`. With weights, the model's config is checked against the data-side facts (the
    image token id and the tokens per image the model will produce).
    """
    from llava_train.data.tokenize import load_tokenizer
    from llava_train.model.builder import build_model, build_processor, image_token_id, tokenizer_source, vision_source
    from llava_train.model.tiny import ensure_tiny_components
    from llava_train.model.vision import image_tokens

    ensure_tiny_components(cfg.model)
    tokenizer = load_tokenizer(tokenizer_source(cfg), image_token=cfg.model.image_token)
    template = run_template(cfg)
    processor = build_processor(cfg, tokenizer, template)
    _, vision = vision_source(cfg)
    parts = Components(
        tokenizer=tokenizer,
        template=template,
        processor=processor,
        num_image_tokens=image_tokens(vision, cfg.model.vision_feature_select),
        image_token_id=image_token_id(tokenizer, cfg.model.image_token),
    )
    if weights:
        parts.model = build_model(cfg, tokenizer)
        built = (
            int(parts.model.config.image_token_id),
            image_tokens(parts.model.config, cfg.model.vision_feature_select),
        )
        if built != (parts.image_token_id, parts.num_image_tokens):
            raise ValueError(
                f"the model has image token id {built[0]} and {built[1]} tokens per image, the data side "
                f"{parts.image_token_id} and {parts.num_image_tokens}"
            )
    return parts
