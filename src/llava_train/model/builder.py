"""The LLaVA model and its processor from a run config: the arch's config, build (pretrained parts or init_from).

The model is always one of transformers' native classes (`ARCH_CLASSES`: LLaVA-1.5, LLaVA-NeXT,
LLaVA-OneVision) built with `_from_config` (ZeRO-3's `zero.Init` wraps it) and filled with the
sub-models' pretrained weights (`model.weights`), or loaded from a previous stage's folder. This
module never freezes parameters and knows nothing about stages;
tiny test/demo parts are written by `components.load_components`, never here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llava_train.config import RunConfig
from llava_train.errors import InitFromError
from llava_train.model.construct import construct, init_new_parts, resize_embeddings
from llava_train.model.init_source import init_source
from llava_train.model.known_configs import resolve_config
from llava_train.model.original import (
    check_projector_shapes,
    check_run,
    load_full,
    load_projector_tensors,
    read_projector,
    text_config,
)
from llava_train.model.projector import load_projector
from llava_train.model.sources import ModelSources
from llava_train.model.vision import (
    ImageGeometry,
    feature_select_strategy,
    image_geometry,
    image_tokens,
    run_geometry,
    vision_config_of,
)
from llava_train.model.weights import (
    checkpoint_names,
    llava_state_dict_from_parts,
    load_pretrained_parts,
    load_vision_tower,
    resolve_folder,
    weight_files,
)
from llava_train.utils.logging import get_logger

log = get_logger(__name__)


# -- configs --------------------------------------------------------------------------------------


def torch_dtype(name: str) -> Any:
    """`bfloat16` -> torch.bfloat16 (the names `model.dtype` accepts)."""
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


# model.arch -> (config class, model class, processor class, image processor class, model_type).
ARCH_CLASSES: dict[str, tuple[str, str, str, str | None, str]] = {
    "llava": ("LlavaConfig", "LlavaForConditionalGeneration", "LlavaProcessor", None, "llava"),
    "llava_next": (
        "LlavaNextConfig",
        "LlavaNextForConditionalGeneration",
        "LlavaNextProcessor",
        "LlavaNextImageProcessorPil",
        "llava_next",
    ),
    "llava_onevision": (
        "LlavaOnevisionConfig",
        "LlavaOnevisionForConditionalGeneration",
        "LlavaOnevisionProcessor",
        "LlavaOnevisionImageProcessorPil",
        "llava_onevision",
    ),
}
MODEL_TYPE_ARCH = {v[4]: arch for arch, v in ARCH_CLASSES.items()}


def model_class(arch: str) -> Any:
    """transformers' model class of `model.arch`."""
    import transformers

    return getattr(transformers, ARCH_CLASSES[arch][1])


def llava_config(
    cfg: RunConfig,
    text_config: Any,
    vision_config: Any,
    image_token_id: int,
    video_token_id: int | None = None,
    geometry: ImageGeometry | None = None,
) -> Any:
    """The arch's config joining the two sub-configs as `cfg.model` says (projector mlp2x_gelu).

    llava_next / llava_onevision also carry the anyres pinpoints (and OneVision its
    `vision_aspect_ratio` = data.image_aspect_ratio and the video token); the geometry is the same
    object the data side counts tokens with.
    """
    import transformers

    vision_config = vision_config_of(vision_config)
    geometry = geometry or run_geometry(cfg, vision_config)  # the run's own (components) when given
    arch = cfg.model.arch
    fields: dict[str, Any] = {
        "vision_config": vision_config,
        "text_config": text_config,
        "image_token_id": image_token_id,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": cfg.model.vision_feature_layer,
        "vision_feature_select_strategy": feature_select_strategy(vision_config, cfg.model.vision_feature_select),
        "tie_word_embeddings": bool(getattr(text_config, "tie_word_embeddings", False)),
    }
    if arch == "llava":
        fields["image_seq_length"] = image_tokens(vision_config, cfg.model.vision_feature_select)
    else:
        fields["image_grid_pinpoints"] = [list(p) for p in geometry.pinpoints]
    if arch == "llava_next":
        fields["image_seq_length"] = geometry.base_tokens
    if arch == "llava_onevision":
        fields["vision_aspect_ratio"] = geometry.aspect_ratio
        if video_token_id is not None:
            fields["video_token_id"] = video_token_id
    config = getattr(transformers, ARCH_CLASSES[arch][0])(**fields)
    # Some config classes rename the token fields (image_token_index); read them back the same way.
    if int(config.image_token_id) != image_token_id:
        raise ValueError(f"{ARCH_CLASSES[arch][0]} did not take image_token_id={image_token_id}")
    return config


def config_geometry(cfg: RunConfig, config: Any) -> ImageGeometry:
    """The ImageGeometry a built model's config implies, for checking it against the data side's."""

    arch = MODEL_TYPE_ARCH.get(getattr(config, "model_type", ""), cfg.model.arch)
    return image_geometry(
        arch,
        config.vision_config,
        cfg.model.vision_feature_select,
        getattr(config, "vision_aspect_ratio", None) if arch == "llava_onevision" else cfg.data.image_aspect_ratio,
        getattr(config, "image_grid_pinpoints", None) if arch != "llava" else None,
    )


def init_from_kind(init_from: str | None) -> str | None:
    """What `model.init_from` points at: None or one of `model.init_source.KINDS` (see `init_source`)."""
    source = init_source(init_from)
    return None if source is None else source.kind


def check_init_from(cfg: RunConfig, sources: ModelSources) -> None:
    """Before anything is built: the init_from folder's arch (HF-native) or its original config fits the run."""
    source, vision_config = sources.init, sources.vision_config
    if source is None:
        return
    where = f"model.init_from={cfg.model.init_from}"
    if source.kind == "full":
        _check_init_from_arch(cfg, source.folder)
    elif source.original is not None:
        check_run(cfg, source.original, vision_config, where, full=source.kind == "original")


def _generation_config(tokenizer: Any, lm_folder: Path | None) -> Any:
    from transformers import GenerationConfig

    gen = GenerationConfig()
    if lm_folder is not None and (lm_folder / "generation_config.json").is_file():
        gen = GenerationConfig.from_pretrained(str(lm_folder))
    gen.bos_token_id = tokenizer.bos_token_id
    # Keep an LM's list of stop ids (e.g. Qwen's) when it already contains the tokenizer's eos.
    if not (isinstance(gen.eos_token_id, list) and tokenizer.eos_token_id in gen.eos_token_id):
        gen.eos_token_id = tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    return gen


def meta_model(cfg: RunConfig, extra_tokens: int | None = None) -> Any:
    """The run's model (`model.arch`'s class) on the meta device: no weights, no download (`plan`, parameter tables).

    Configs come from `model.known_configs.resolve_config` (built-in copies of the recipes' hub configs,
    or local folders). The image token adds `extra_tokens` embedding rows: default 1 for Llama/Mistral
    vocabularies (which their tokenizers fill exactly), 0 otherwise (Qwen's has spare rows).
    """
    import torch

    text_config = resolve_config(cfg.model.language_model)
    vision_config = resolve_config(cfg.model.vision_tower)
    if extra_tokens is None:
        extra_tokens = 1 if text_config.model_type in ("llama", "mistral") else 0
        if cfg.model.arch == "llava_onevision" and extra_tokens:
            extra_tokens += 1  # and the video token
    config = llava_config(cfg, text_config, vision_config, image_token_id=int(text_config.vocab_size))
    config.text_config.vocab_size = int(text_config.vocab_size) + extra_tokens
    with torch.device("meta"):
        return model_class(cfg.model.arch)._from_config(config)


# -- the model --------------------------------------------------------------------------------------


def image_token_id(tokenizer: Any, image_token: str) -> int:
    """The id of `image_token` in the tokenizer (which must hold it: `data.tokenize.load_tokenizer` adds it)."""
    if image_token not in tokenizer.get_vocab():
        raise ValueError(f"the tokenizer has no {image_token!r} token; load it with data.tokenize.load_tokenizer")
    return int(tokenizer.convert_tokens_to_ids(image_token))


def video_token_id(tokenizer: Any, cfg: RunConfig) -> int | None:
    """The video token's id for llava_onevision runs (None for the image-only archs)."""
    if cfg.model.arch != "llava_onevision":
        return None
    return image_token_id(tokenizer, cfg.model.video_token)


def build_model(
    cfg: RunConfig,
    tokenizer: Any,
    sources: ModelSources,
    geometry: ImageGeometry,
    image_token_id: int,
    video_token_id: int | None = None,
) -> Any:
    """The arch's model for `cfg.model`: pretrained LM + vision tower, or from `model.init_from` (any of
    `model.init_source.KINDS`: a HF-native folder loads as it is; an original checkpoint fills the LM and
    projector (and the tower when it holds one) through `model.original`'s key map; projector files are
    loaded onto the pretrained parts).

    `tokenizer` must already hold the image token (see `data.tokenize.load_tokenizer`); `sources`, `geometry` and
    the token ids are the run's, resolved once by `components.load_components` (which also checked init_from
    against the run). Embeddings are resized when the tokenizer outgrew the LM's vocabulary. QLoRA
    (`lora.enabled` with `lora.bits`) loads the LM quantized through bitsandbytes (CUDA only).
    """
    from transformers import AutoConfig

    dtype = torch_dtype(cfg.model.dtype)
    source = sources.init
    kind = source.kind if source else None
    where = f"model.init_from={cfg.model.init_from}"
    cls = model_class(cfg.model.arch)
    if kind == "full":
        if cfg.lora.enabled and cfg.lora.bits:
            raise ValueError("QLoRA from a full model.init_from folder is not supported; use a projector folder")
        model = cls.from_pretrained(str(source.folder), dtype=dtype, attn_implementation=cfg.model.attn_implementation)
        _check_init_from_config(cfg, model.config)
        resize_embeddings(model, tokenizer)
        model.generation_config = _generation_config(tokenizer, source.folder)
        log.info("model loaded from %s", source.folder)
        return model

    if kind == "original":
        if cfg.lora.enabled and cfg.lora.bits:
            raise InitFromError("QLoRA from an original-format checkpoint is not supported; convert it first")
        lm_folder, text = source.folder, text_config(source.original, where)
    else:
        lm_folder = resolve_folder(cfg.model.language_model)
        text = AutoConfig.from_pretrained(str(lm_folder), trust_remote_code=False)
    vt_folder, vision_full = sources.vision_folder, sources.tower_config
    config = llava_config(cfg, text, vision_full, image_token_id, video_token_id, geometry)
    if kind == "original_projector":
        # Checked before the (large) model is built: a projector for another LM or tower fails at once.
        projector = read_projector(source.projector_file)
        lm_hidden, vt_hidden = int(config.text_config.hidden_size), int(config.vision_config.hidden_size)
        args = (lm_hidden, vt_hidden, cfg.model.language_model, cfg.model.vision_tower)
        check_projector_shapes(projector, source.projector_file, *args)
    if cfg.lora.enabled and cfg.lora.bits:
        model = _build_quantized(cfg, config, lm_folder, vt_folder, vision_full)
    else:
        model = construct(cls, config, dtype, cfg.model.attn_implementation)
        init_new_parts(model)  # before loading: an original checkpoint then overwrites its projector
        if kind == "original":
            files, names = weight_files(lm_folder), checkpoint_names(lm_folder)
            if not load_full(model, files, names, where):
                load_vision_tower(model, vt_folder, vision_full)
        else:
            load_pretrained_parts(model, lm_folder, vt_folder, vision_full)
    resize_embeddings(model, tokenizer)
    if kind in ("projector", "original_projector"):
        if kind == "projector":
            load_projector(model, source.projector_file)
        else:
            load_projector_tensors(model, projector, source.projector_file)
        log.info("projector loaded from %s", source.projector_file)
    model.generation_config = _generation_config(tokenizer, lm_folder)
    return model


def _build_quantized(cfg: RunConfig, config: Any, lm_folder: Path, vt_folder: Path, vision_full: Any) -> Any:
    """QLoRA: load the LM quantized (bitsandbytes 4/8-bit) with the vision tower, projector and lm_head unquantized."""
    import torch
    from transformers import BitsAndBytesConfig

    if not torch.cuda.is_available():
        raise RuntimeError(f"lora.bits={cfg.lora.bits} (QLoRA) needs CUDA and bitsandbytes; this machine has no GPU")
    dtype = torch_dtype(cfg.model.dtype)
    skip = ["vision_tower", "multi_modal_projector", "lm_head", "image_newline"]
    cls = model_class(cfg.model.arch)
    if cfg.lora.bits == 4:
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            llm_int8_skip_modules=skip,
        )
    else:
        quant = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    # Build the state dict under LLaVA's names from the two sub-models, then let from_pretrained
    # quantize while loading (the projector is missing and gets transformers' init).
    probe = cls._from_config(config, dtype=dtype)
    state = llava_state_dict_from_parts(probe, lm_folder, vt_folder, vision_full)
    del probe
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return cls.from_pretrained(
        None,
        config=config,
        state_dict=state,
        quantization_config=quant,
        dtype=dtype,
        attn_implementation=cfg.model.attn_implementation,
        device_map={"": local_rank},
    )


def _check_init_from_arch(cfg: RunConfig, folder: Path) -> None:
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    if MODEL_TYPE_ARCH.get(model_type) != cfg.model.arch:
        raise InitFromError(
            f"model.init_from={cfg.model.init_from} is a {model_type} model but model.arch={cfg.model.arch}; "
            f"set model.arch={MODEL_TYPE_ARCH.get(model_type)}"
        )


def _check_init_from_config(cfg: RunConfig, config: Any) -> None:
    expected = feature_select_strategy(config.vision_config, cfg.model.vision_feature_select)
    if config.vision_feature_layer != cfg.model.vision_feature_layer or config.vision_feature_select_strategy != (
        expected
    ):
        raise InitFromError(
            f"model.init_from={cfg.model.init_from} was built with vision_feature_layer="
            f"{config.vision_feature_layer}, vision_feature_select_strategy={config.vision_feature_select_strategy}; "
            f"the config asks for {cfg.model.vision_feature_layer}, {expected}"
        )
