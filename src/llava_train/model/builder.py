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
from llava_train.model.projector import PROJECTOR_FILE, load_projector
from llava_train.model.vision import (
    ImageGeometry,
    feature_select_strategy,
    image_tokens,
    run_geometry,
    vision_config_of,
)
from llava_train.model.weights import (
    llava_state_dict_from_parts,
    load_pretrained_parts,
    resolve_folder,
    tensor_names,
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
    cfg: RunConfig, text_config: Any, vision_config: Any, image_token_id: int, video_token_id: int | None = None
) -> Any:
    """The arch's config joining the two sub-configs as `cfg.model` says (projector mlp2x_gelu).

    llava_next / llava_onevision also carry the anyres pinpoints (and OneVision its
    `vision_aspect_ratio` = data.image_aspect_ratio and the video token); the geometry is the same
    object the data side counts tokens with.
    """
    import transformers

    vision_config = vision_config_of(vision_config)
    geometry = run_geometry(cfg, vision_config)
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
    from llava_train.model.vision import image_geometry

    arch = MODEL_TYPE_ARCH.get(getattr(config, "model_type", ""), cfg.model.arch)
    return image_geometry(
        arch,
        config.vision_config,
        cfg.model.vision_feature_select,
        getattr(config, "vision_aspect_ratio", None) if arch == "llava_onevision" else cfg.data.image_aspect_ratio,
        getattr(config, "image_grid_pinpoints", None) if arch != "llava" else None,
    )


def init_from_kind(init_from: str | None) -> str | None:
    """What `model.init_from` points at: None, `full` (a HF-native LLaVA with weights) or `projector`.

    A folder with a LLaVA config.json whose weights include the language model is `full` (a finished
    stage's output; it may also hold projector.safetensors); otherwise a folder holding
    projector.safetensors is `projector`. Anything else is an error saying what was expected.
    """
    if init_from is None:
        return None
    folder = Path(init_from)
    config = folder / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("model_type") in MODEL_TYPE_ARCH:
        try:
            names = tensor_names(weight_files(folder))
        except FileNotFoundError:
            names = []
        if any(".language_model." in n or n.startswith("language_model.") for n in names):
            return "full"
    if (folder / PROJECTOR_FILE).is_file():
        return "projector"
    raise ValueError(
        f"model.init_from={init_from}: expected a HF-native LLaVA folder (config.json with model_type "
        f"{' / '.join(MODEL_TYPE_ARCH)} and its weights) or a stage-1 folder holding {PROJECTOR_FILE}"
    )


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

    from llava_train.model.known_configs import resolve_config

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


def _resize_embeddings(model: Any, tokenizer: Any) -> None:
    """Grow the embeddings (and an untied lm_head) to the tokenizer; the new rows are the old rows' mean.

    That is LLaVA's own rule (`smart_tokenizer_and_embedding_resize`): deterministic, so a rebuilt base
    model is identical (LoRA merging relies on it: the new rows are not in the adapter), and cheap,
    where transformers' default samples from the old rows' covariance (seconds for a 7B vocabulary).
    """
    vocab = model.config.text_config.vocab_size
    if len(tokenizer) <= vocab:
        return
    import torch

    from llava_train.utils.distributed import gathered

    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    tables = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not tables[0]:
        tables.append(output.weight)
    with gathered(tables, modifier_rank=0), torch.no_grad():
        for weight in tables:
            if weight.numel():  # ZeRO-3: only the modifier rank holds the gathered table
                weight[vocab:] = weight[:vocab].mean(dim=0, dtype=torch.float32).to(weight.dtype)
    log.info("token embeddings resized %d -> %d (new rows: the mean of the old ones)", vocab, len(tokenizer))


def _construct(cls: Any, config: Any, dtype: Any, attn: str) -> Any:
    """The arch's model with random init skipped for every part the pretrained files overwrite.

    Outside ZeRO-3 the modules are built without running their initialisers (transformers'
    `no_init_weights`: the LM's and tower's random init was ~75% of the build time for 1.1B), and only
    what no checkpoint provides (the projector, NeXT / OneVision's image newline) is initialised
    afterwards by `init_new_parts`. Under ZeRO-3, `zero.Init` partitions at construction and transformers
    initialises module by module, gathered, as before.
    """
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        return cls._from_config(config, dtype=dtype, attn_implementation=attn)
    with no_init_weights():
        model = cls._from_config(config, dtype=dtype, attn_implementation=attn)
    model._llava_train_uninitialised = True
    return model


def init_new_parts(model: Any) -> None:
    """Initialise (transformers' own `_init_weights`) the parts no pretrained file holds: the projector and the
    image newline. A no-op for models built by `_from_config` with init (ZeRO-3)."""
    import torch

    if not getattr(model, "_llava_train_uninitialised", False):
        return
    with torch.no_grad():
        for module in model.model.multi_modal_projector.modules():
            model._init_weights(module)
        if hasattr(model.model, "image_newline"):
            model._init_weights(model.model)  # NeXT / OneVision: normal(0, 1 / sqrt(hidden))
    del model._llava_train_uninitialised


def build_model(cfg: RunConfig, tokenizer: Any) -> Any:
    """LlavaForConditionalGeneration for `cfg.model` (pretrained LM + vision tower, or `model.init_from`).

    `tokenizer` must already hold the image token (see `data.tokenize.load_tokenizer`). Embeddings are
    resized when the tokenizer outgrew the LM's vocabulary. QLoRA (`lora.enabled` with `lora.bits`)
    loads the LM quantized through bitsandbytes (CUDA only).
    """
    from transformers import AutoConfig

    dtype = torch_dtype(cfg.model.dtype)
    kind = init_from_kind(cfg.model.init_from)
    cls = model_class(cfg.model.arch)
    if kind == "full":
        if cfg.lora.enabled and cfg.lora.bits:
            raise ValueError("QLoRA from a full model.init_from folder is not supported; use a projector folder")
        _check_init_from_arch(cfg)
        model = cls.from_pretrained(
            cfg.model.init_from, dtype=dtype, attn_implementation=cfg.model.attn_implementation
        )
        _check_init_from_config(cfg, model.config)
        _resize_embeddings(model, tokenizer)
        model.generation_config = _generation_config(tokenizer, Path(cfg.model.init_from))
        log.info("model loaded from %s", cfg.model.init_from)
        return model

    lm_folder = resolve_folder(cfg.model.language_model)
    vt_folder = resolve_folder(cfg.model.vision_tower)
    text_config = AutoConfig.from_pretrained(str(lm_folder))
    vision_full = AutoConfig.from_pretrained(str(vt_folder))
    config = llava_config(
        cfg, text_config, vision_full, image_token_id(tokenizer, cfg.model.image_token), video_token_id(tokenizer, cfg)
    )
    if cfg.lora.enabled and cfg.lora.bits:
        model = _build_quantized(cfg, config, lm_folder, vt_folder, vision_full)
    else:
        model = _construct(cls, config, dtype, cfg.model.attn_implementation)
        load_pretrained_parts(model, lm_folder, vt_folder, vision_full)
        init_new_parts(model)
    _resize_embeddings(model, tokenizer)
    if kind == "projector":
        load_projector(model, Path(cfg.model.init_from) / PROJECTOR_FILE)
        log.info("projector loaded from %s", Path(cfg.model.init_from) / PROJECTOR_FILE)
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


def _check_init_from_arch(cfg: RunConfig) -> None:
    model_type = json.loads((Path(cfg.model.init_from) / "config.json").read_text()).get("model_type")
    if MODEL_TYPE_ARCH.get(model_type) != cfg.model.arch:
        raise ValueError(
            f"model.init_from={cfg.model.init_from} is a {model_type} model but model.arch={cfg.model.arch}; "
            f"set model.arch={MODEL_TYPE_ARCH.get(model_type)}"
        )


def _check_init_from_config(cfg: RunConfig, config: Any) -> None:
    expected = feature_select_strategy(config.vision_config, cfg.model.vision_feature_select)
    if config.vision_feature_layer != cfg.model.vision_feature_layer or config.vision_feature_select_strategy != (
        expected
    ):
        raise ValueError(
            f"model.init_from={cfg.model.init_from} was built with vision_feature_layer="
            f"{config.vision_feature_layer}, vision_feature_select_strategy={config.vision_feature_select_strategy}; "
            f"the config asks for {cfg.model.vision_feature_layer}, {expected}"
        )


def tokenizer_source(cfg: RunConfig) -> str:
    """Where the tokenizer comes from: a full init_from folder, else `model.tokenizer` or the language model."""
    if init_from_kind(cfg.model.init_from) == "full":
        return str(cfg.model.init_from)
    return str(resolve_folder(cfg.model.tokenizer or cfg.model.language_model, weights=False))
