"""Build or load the LLaVA model and processor: pretrained LM + vision tower + projector, image token, projector file.

The model is always transformers' `LlavaForConditionalGeneration` built with `_from_config` (ZeRO-3's
`zero.Init` wraps it) and filled with the sub-models' pretrained weights read directly from their
safetensors files into the right submodules, gathering partitioned parameters one at a time under
ZeRO-3. This module never freezes parameters and knows nothing about stages.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_train.config import RunConfig
from llava_train.utils.distributed import gathered, rank
from llava_train.utils.logging import get_logger

log = get_logger(__name__)

PROJECTOR_FILE = "projector.safetensors"
# Vision towers whose encoder output starts with a CLS token: the processor adds it to its count.
_CLS_TOWERS = ("clip_vision_model",)
# Buffers that older checkpoints stored but current models recompute (never an error when left over).
_IGNORED_SUFFIXES = (".inv_freq", ".position_ids")
# Files fetched for a hub id; `*.bin` only when a repo has no safetensors (then read weights_only).
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


# -- locating and reading pretrained folders ------------------------------------------------------


def resolve_folder(name_or_path: str | os.PathLike, weights: bool = True) -> Path:
    """A local folder for a hub id or path: the path itself, else a snapshot in the HF cache (downloaded if allowed).

    Only safetensors are fetched, unless a repo has none (then `*.bin`, read with weights_only).
    `weights=False` fetches configs, tokenizer and processor files only (data commands need no weights).
    """
    path = Path(name_or_path)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    if not weights:
        return Path(snapshot_download(str(name_or_path), allow_patterns=[p for p in _HUB_PATTERNS if "safe" not in p]))
    folder = Path(snapshot_download(str(name_or_path), allow_patterns=_HUB_PATTERNS))
    if not list(folder.glob("*.safetensors")):
        folder = Path(snapshot_download(str(name_or_path), allow_patterns=_HUB_PATTERNS + ["*.bin"]))
    return folder


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The weight files of a pretrained folder: safetensors (single or sharded), else pytorch `.bin` files."""
    folder = Path(folder)
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = folder / index_name
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [folder / n for n in names]
        if (folder / single).is_file():
            return [folder / single]
    raise FileNotFoundError(
        f"no weights in {folder}: expected model.safetensors, model.safetensors.index.json, "
        "pytorch_model.bin or pytorch_model.bin.index.json"
    )


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, Any]]:
    """(name, tensor) pairs from weight files, one tensor in memory at a time for safetensors.

    `.bin` files are read with `torch.load(weights_only=True)`: loading never unpickles arbitrary objects.
    """
    import torch
    from safetensors import safe_open

    for file in files:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                    yield key, handle.get_tensor(key)
        else:
            try:
                state = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:
                # Files from before torch's zip format cannot be memory-mapped.
                state = torch.load(str(file), map_location="cpu", weights_only=True)
            yield from state.items()


def _tensor_names(files: list[Path]) -> list[str]:
    from safetensors import safe_open

    names: list[str] = []
    for file in files:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                names.extend(handle.keys())
        else:
            names.extend(k for k, _ in iter_tensors([file]))
    return names


# -- ZeRO-3 safe parameter access ---------------------------------------------------------------


def _shape(param: Any) -> tuple[int, ...]:
    # Under ZeRO-3 `param.shape` is the empty local shard; ds_shape is the full one.
    return tuple(getattr(param, "ds_shape", param.shape))


def _assign(target: Any, tensor: Any, name: str, source: str) -> None:
    import torch

    if tuple(tensor.shape) != _shape(target):
        raise ValueError(
            f"shape mismatch for {name}: {source} has {tuple(tensor.shape)}, the model expects {_shape(target)}"
        )
    with gathered([target]), torch.no_grad():
        target.data.copy_(tensor.to(dtype=target.dtype, device=target.device))


# -- copying a sub-model's checkpoint into a LLaVA submodule -------------------------------------


def _key_map(source: list[str], target: set[str], rules: list[tuple[str, str]]) -> dict[str, str]:
    """The (strip prefix, add prefix) rule that maps the most checkpoint names onto module names."""
    best: dict[str, str] = {}
    for strip, add in rules:
        mapping = {k: add + k[len(strip) :] for k in source if k.startswith(strip)}
        mapping = {k: v for k, v in mapping.items() if v in target}
        if len(mapping) > len(best):
            best = mapping
    return best


def load_submodule_weights(
    module: Any,
    folder: str | os.PathLike,
    rules: list[tuple[str, str]],
    where: str,
    allow_missing: tuple[str, ...] = (),
    allow_unexpected: bool = False,
) -> int:
    """Copy a pretrained folder's weights into `module` (ZeRO-3 safe); returns the number of tensors copied.

    Checkpoint names are mapped to module names by the best of `rules` (prefix renames, so both
    `vision_model.`-prefixed and flat CLIP checkpoints work). Every module tensor must be covered
    (except `allow_missing`); checkpoint tensors left over are an error unless `allow_unexpected`
    (a full CLIP/SigLIP model whose text half is not used).
    """
    files = weight_files(folder)
    targets = module.state_dict(keep_vars=True)
    names = _tensor_names(files)
    mapping = _key_map(names, set(targets), rules)
    missing = sorted(set(targets) - set(mapping.values()) - set(allow_missing))
    if missing:
        raise ValueError(
            f"{folder} does not provide {len(missing)} weight(s) of the {where}: {', '.join(missing[:8])}"
            + (" ..." if len(missing) > 8 else "")
        )
    unexpected = sorted(k for k in names if k not in mapping and not k.endswith(_IGNORED_SUFFIXES))
    if unexpected and not allow_unexpected:
        raise ValueError(
            f"{folder} holds {len(unexpected)} weight(s) the {where} does not have: {', '.join(unexpected[:8])}"
            + (" ..." if len(unexpected) > 8 else "")
        )
    copied = 0
    for key, tensor in iter_tensors(files):
        name = mapping.get(key)
        if name is not None:
            _assign(targets[name], tensor, f"{where}.{name}", str(folder))
            copied += 1
    return copied


# -- configs --------------------------------------------------------------------------------------


def vision_config_of(config: Any) -> Any:
    """The vision config of a CLIP/SigLIP config (a full CLIPConfig/SiglipConfig holds it as `vision_config`)."""
    inner = getattr(config, "vision_config", None)
    return inner if inner is not None else config


def torch_dtype(name: str) -> Any:
    """`bfloat16` -> torch.bfloat16 (the names `model.dtype` accepts)."""
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def llava_config(cfg: RunConfig, text_config: Any, vision_config: Any, image_token_id: int) -> Any:
    """The LlavaConfig joining the two sub-configs as `cfg.model` says (projector mlp2x_gelu)."""
    from transformers import LlavaConfig

    from llava_train.data.images import feature_select_strategy, num_image_tokens

    vision_config = vision_config_of(vision_config)
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=image_token_id,
        image_seq_length=num_image_tokens(vision_config, cfg.model.vision_feature_select),
        projector_hidden_act="gelu",
        vision_feature_layer=cfg.model.vision_feature_layer,
        vision_feature_select_strategy=feature_select_strategy(vision_config, cfg.model.vision_feature_select),
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
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
    if config.is_file() and json.loads(config.read_text()).get("model_type") == "llava":
        try:
            names = _tensor_names(weight_files(folder))
        except FileNotFoundError:
            names = []
        if any(".language_model." in n or n.startswith("language_model.") for n in names):
            return "full"
    if (folder / PROJECTOR_FILE).is_file():
        return "projector"
    raise ValueError(
        f"model.init_from={init_from}: expected a HF-native LLaVA folder (config.json with model_type llava "
        f"and its weights) or a stage-1 folder holding {PROJECTOR_FILE}"
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


# -- the model --------------------------------------------------------------------------------------


def _image_token_id(tokenizer: Any, image_token: str) -> int:
    if image_token not in tokenizer.get_vocab():
        raise ValueError(f"the tokenizer has no {image_token!r} token; load it with data.tokenize.load_tokenizer")
    return int(tokenizer.convert_tokens_to_ids(image_token))


def _resize_embeddings(model: Any, tokenizer: Any) -> None:
    vocab = model.config.text_config.vocab_size
    if len(tokenizer) > vocab:
        import torch

        # transformers samples the new rows around the old embeddings' mean (and keeps
        # text_config.vocab_size in step). A fixed seed makes a rebuilt base model identical, which
        # LoRA merging relies on: the new rows are not in the adapter.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model.resize_token_embeddings(len(tokenizer))
        log.info("token embeddings resized %d -> %d", vocab, len(tokenizer))


def build_model(cfg: RunConfig, tokenizer: Any) -> Any:
    """LlavaForConditionalGeneration for `cfg.model` (pretrained LM + vision tower, or `model.init_from`).

    `tokenizer` must already hold the image token (see `data.tokenize.load_tokenizer`). Embeddings are
    resized when the tokenizer outgrew the LM's vocabulary. QLoRA (`lora.enabled` with `lora.bits`)
    loads the LM quantized through bitsandbytes (CUDA only).
    """
    from transformers import AutoConfig, LlavaForConditionalGeneration

    from llava_train.model.tiny import ensure_tiny_components

    ensure_tiny_components(cfg.model)
    dtype = torch_dtype(cfg.model.dtype)
    kind = init_from_kind(cfg.model.init_from)
    if kind == "full":
        if cfg.lora.enabled and cfg.lora.bits:
            raise ValueError("QLoRA from a full model.init_from folder is not supported; use a projector folder")
        model = LlavaForConditionalGeneration.from_pretrained(
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
    config = llava_config(cfg, text_config, vision_full, _image_token_id(tokenizer, cfg.model.image_token))
    if cfg.lora.enabled and cfg.lora.bits:
        model = _build_quantized(cfg, config, lm_folder, vt_folder, vision_full)
    else:
        model = LlavaForConditionalGeneration._from_config(
            config, dtype=dtype, attn_implementation=cfg.model.attn_implementation
        )
        load_pretrained_parts(model, lm_folder, vt_folder, vision_full)
    _resize_embeddings(model, tokenizer)
    if kind == "projector":
        load_projector(model, Path(cfg.model.init_from) / PROJECTOR_FILE)
        log.info("projector loaded from %s", Path(cfg.model.init_from) / PROJECTOR_FILE)
    model.generation_config = _generation_config(tokenizer, lm_folder)
    return model


def _vision_rules() -> list[tuple[str, str]]:
    # CLIP/SigLIP checkpoints name the tower's weights with or without a `vision_model.` prefix
    # depending on the class and the transformers version that saved them.
    return [("", ""), ("vision_model.", ""), ("", "vision_model.")]


def load_pretrained_parts(model: Any, lm_folder: Path, vt_folder: Path, vision_full_config: Any) -> None:
    """Copy the LM's and the vision tower's pretrained weights into a freshly built LLaVA model (ZeRO-3 safe)."""
    inner = model.model
    tied = bool(model.config.tie_word_embeddings)
    n_vt = load_submodule_weights(
        inner.vision_tower,
        vt_folder,
        _vision_rules(),
        "vision tower",
        allow_unexpected=getattr(vision_full_config, "vision_config", None) is not None,
    )
    lm_files = weight_files(lm_folder)
    names = _tensor_names(lm_files)
    body = {k for k in names if not k.startswith("lm_head.")}
    head = [k for k in names if k.startswith("lm_head.")]
    if head and tied:
        raise ValueError(f"{lm_folder}: tie_word_embeddings is true but the checkpoint has its own lm_head")
    n_lm = _load_lm_body(inner.language_model, lm_folder, lm_files, sorted(body))
    if not tied:
        n_lm += load_submodule_weights(model.lm_head, lm_folder, [("lm_head.", "")], "lm_head", allow_unexpected=True)
    log.info("pretrained weights loaded: vision tower %d tensors (%s), LM %d (%s)", n_vt, vt_folder, n_lm, lm_folder)


def _load_lm_body(module: Any, folder: Path, files: list[Path], body: list[str]) -> int:
    targets = module.state_dict(keep_vars=True)
    mapping = _key_map(body, set(targets), [("model.", ""), ("", "")])
    missing = sorted(set(targets) - set(mapping.values()))
    unexpected = sorted(k for k in body if k not in mapping and not k.endswith(_IGNORED_SUFFIXES))
    if missing or unexpected:
        raise ValueError(
            f"{folder} does not match the language model: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    copied = 0
    for key, tensor in iter_tensors(files):
        name = mapping.get(key)
        if name is not None:
            _assign(targets[name], tensor, f"language_model.{name}", str(folder))
            copied += 1
    return copied


def _build_quantized(cfg: RunConfig, config: Any, lm_folder: Path, vt_folder: Path, vision_full: Any) -> Any:
    """QLoRA: load the LM quantized (bitsandbytes 4/8-bit) with the vision tower, projector and lm_head unquantized."""
    import torch
    from transformers import BitsAndBytesConfig, LlavaForConditionalGeneration

    if not torch.cuda.is_available():
        raise RuntimeError(f"lora.bits={cfg.lora.bits} (QLoRA) needs CUDA and bitsandbytes; this machine has no GPU")
    dtype = torch_dtype(cfg.model.dtype)
    skip = ["vision_tower", "multi_modal_projector", "lm_head"]
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
    probe = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    state = llava_state_dict_from_parts(probe, lm_folder, vt_folder, vision_full)
    del probe
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return LlavaForConditionalGeneration.from_pretrained(
        None,
        config=config,
        state_dict=state,
        quantization_config=quant,
        dtype=dtype,
        attn_implementation=cfg.model.attn_implementation,
        device_map={"": local_rank},
    )


def llava_state_dict_from_parts(model: Any, lm_folder: Path, vt_folder: Path, vision_full: Any) -> dict[str, Any]:
    """A LLaVA state dict (without the projector) assembled from the LM's and vision tower's checkpoints."""
    load_pretrained_parts(model, lm_folder, vt_folder, vision_full)
    return {k: v for k, v in model.state_dict().items() if ".multi_modal_projector." not in f".{k}"}


def _check_init_from_config(cfg: RunConfig, config: Any) -> None:
    from llava_train.data.images import feature_select_strategy

    expected = feature_select_strategy(config.vision_config, cfg.model.vision_feature_select)
    if config.vision_feature_layer != cfg.model.vision_feature_layer or config.vision_feature_select_strategy != (
        expected
    ):
        raise ValueError(
            f"model.init_from={cfg.model.init_from} was built with vision_feature_layer="
            f"{config.vision_feature_layer}, vision_feature_select_strategy={config.vision_feature_select_strategy}; "
            f"the config asks for {cfg.model.vision_feature_layer}, {expected}"
        )


# -- the projector artifact ----------------------------------------------------------------------


def projector_module(model: Any) -> Any:
    """The multimodal projector of a (possibly peft-wrapped) LLaVA model: the copy that runs in forward."""
    for name, module in model.named_modules():
        if name.endswith("multi_modal_projector"):
            # peft's modules_to_save wraps the projector; the trained copy is the active adapter's.
            copies = getattr(module, "modules_to_save", None)
            if copies is not None:
                return copies[module.active_adapters[0]]
            return module
    raise ValueError("the model has no multi_modal_projector module")


def save_projector(model: Any, path: str | os.PathLike) -> Path:
    """Write the projector's weights to `path` (safetensors; names like `linear_1.weight`; ZeRO-3 gathered).

    Every rank must call it under ZeRO-3 (the gather is collective); only rank 0 writes.
    """
    from safetensors.torch import save_file

    path = Path(path)
    params = dict(projector_module(model).named_parameters())
    with gathered(list(params.values()), modifier_rank=None):
        if rank() == 0:
            state = {k: p.detach().to("cpu").clone().contiguous() for k, p in params.items()}
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(state, str(path), metadata={"format": "pt", "content": "llava multi_modal_projector"})
    return path


def load_projector(model: Any, path: str | os.PathLike) -> None:
    """Load `projector.safetensors` into the model's projector (ZeRO-3 safe, names and shapes checked)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"projector file not found: {path}")
    targets = projector_module(model).state_dict(keep_vars=True)
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        keys = set(handle.keys())
        if keys != set(targets):
            raise ValueError(
                f"{path} holds projector weights {sorted(keys)}, the model's projector has {sorted(targets)}"
            )
        for key in sorted(keys):
            tensor = handle.get_tensor(key)
            if tuple(tensor.shape) != _shape(targets[key]):
                raise ValueError(
                    f"projector shape mismatch for {key}: {path} has {tuple(tensor.shape)}, the model expects "
                    f"{_shape(targets[key])} (was it trained for another vision tower / language model?)"
                )
            _assign(targets[key], tensor, f"multi_modal_projector.{key}", str(path))


# -- processor and everything together -------------------------------------------------------------


def vision_source(cfg: RunConfig) -> tuple[Path, Any]:
    """The folder holding the image processor and the vision config (a full init_from folder, else the tower)."""
    from transformers import AutoConfig

    if init_from_kind(cfg.model.init_from) == "full":
        source = Path(cfg.model.init_from)
        return source, AutoConfig.from_pretrained(str(source)).vision_config
    source = resolve_folder(cfg.model.vision_tower, weights=False)
    return source, vision_config_of(AutoConfig.from_pretrained(str(source)))


def build_processor(cfg: RunConfig, tokenizer: Any, template: Any) -> Any:
    """LlavaProcessor: the vision tower's image processor, the tokenizer and the template as chat_template.

    `<image>` expands to exactly `num_image_tokens` ids: CLIP counts its CLS token
    (num_additional_image_tokens=1) which `default` then drops; SigLIP has none.
    """
    from transformers import AutoImageProcessor, LlavaProcessor

    from llava_train.data.images import feature_select_strategy

    source, vision = vision_source(cfg)
    image_processor = AutoImageProcessor.from_pretrained(str(source))
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=int(vision.patch_size),
        vision_feature_select_strategy=feature_select_strategy(vision, cfg.model.vision_feature_select),
        num_additional_image_tokens=1 if vision.model_type in _CLS_TOWERS else 0,
        image_token=cfg.model.image_token,
        chat_template=template.chat_template(tokenizer),
    )


def tokenizer_source(cfg: RunConfig) -> str:
    """Where the tokenizer comes from: a full init_from folder, else `model.tokenizer` or the language model."""
    if init_from_kind(cfg.model.init_from) == "full":
        return str(cfg.model.init_from)
    return str(resolve_folder(cfg.model.tokenizer or cfg.model.language_model, weights=False))


def load_components(cfg: RunConfig) -> tuple[Any, Any, Any]:
    """(model, processor, tokenizer) for a run: tiny preset, tokenizer with `<image>`, model, processor."""
    from llava_train.data.templates import run_template
    from llava_train.data.tokenize import load_tokenizer
    from llava_train.model.tiny import ensure_tiny_components

    ensure_tiny_components(cfg.model)
    tokenizer = load_tokenizer(tokenizer_source(cfg), image_token=cfg.model.image_token)
    model = build_model(cfg, tokenizer)
    processor = build_processor(cfg, tokenizer, run_template(cfg))
    return model, processor, tokenizer


@dataclass(frozen=True)
class DataComponents:
    """What the data pipeline needs from the model side, loaded without any weights."""

    tokenizer: Any
    processor: Any
    num_image_tokens: int
    image_token_id: int


def load_data_components(cfg: RunConfig) -> DataComponents:
    """Tokenizer (with `<image>`), processor and image-token facts for `data validate` / `data inspect`.

    Reads configs, tokenizer and image-processor files only: validating 665K rows must not need
    (or download) 14 GB of weights.
    """
    from llava_train.data.images import num_image_tokens
    from llava_train.data.templates import run_template
    from llava_train.data.tokenize import load_tokenizer
    from llava_train.model.tiny import ensure_tiny_components

    ensure_tiny_components(cfg.model)
    tokenizer = load_tokenizer(tokenizer_source(cfg), image_token=cfg.model.image_token)
    processor = build_processor(cfg, tokenizer, run_template(cfg))
    _, vision = vision_source(cfg)
    return DataComponents(
        tokenizer=tokenizer,
        processor=processor,
        num_image_tokens=num_image_tokens(vision, cfg.model.vision_feature_select),
        image_token_id=_image_token_id(tokenizer, cfg.model.image_token),
    )
