"""The original LLaVA checkpoint format (haotian-liu/LLaVA, LLaVA-NeXT's repo): config fields, key map, loading.

The one home of what the original code names things. Its `LlavaLlamaForCausalLM` (and the Mistral /
Qwen2 variants) is a plain causal LM whose `model` also holds `mm_projector` (and, in self-trained
folders only, `vision_tower`; releases were stripped of it), so a checkpoint maps onto transformers'
`LlavaForConditionalGeneration` (in-memory names) as:

    model.embed_tokens.*, model.layers.*, model.norm.*   -> model.language_model.*
    lm_head.*                                            -> lm_head.*  (absent for tied LMs)
    model.mm_projector.0.*  / model.mm_projector.2.*     -> model.multi_modal_projector.linear_1.* / linear_2.*
    model.vision_tower.vision_tower.[vision_model.]*     -> model.vision_tower.*  (when present)
    *.rotary_emb.inv_freq, *.position_ids                -> dropped (buffers transformers recomputes)

A stage-1 `mm_projector.bin` holds the same `model.mm_projector.*` names (`--pretrain_mm_mlp_adapter`).
Sources: llava/model/llava_arch.py (`LlavaMetaModel`, `initialize_vision_modules`),
llava/model/multimodal_projector/builder.py (`mlp2x_gelu` = Sequential(Linear, GELU, Linear)),
llava/model/multimodal_encoder/clip_encoder.py (`CLIPVisionTower.vision_tower`, `feature_select`),
llava/train/train.py (`--version`, the config fields it writes), and transformers'
models/llava/convert_llava_weights_to_hf.py (the same map, for on-disk llava-hf names).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llava_train.data.templates import run_template
from llava_train.errors import InitFromError
from llava_train.model.projector import projector_module
from llava_train.model.weights import IGNORED_SUFFIXES, assign, copy_mapped, iter_tensors, key_map, vision_rules
from llava_train.utils.logging import get_logger

log = get_logger(__name__)

MM_PROJECTOR_FILE = "mm_projector.bin"
# `architectures` of the original causal-LM classes -> the transformers model_type of their language model.
ARCHITECTURES = {
    "LlavaLlamaForCausalLM": "llama",
    "LlavaMistralForCausalLM": "mistral",
    "LlavaQwenForCausalLM": "qwen2",
}
# Original `--version` (conversation template; llava/conversation.py `conv_templates`) -> our template.
# Our llama_2 is the original's llava_llama_2 (its LLaVA system prompt), not its text-only llama_2.
VERSION_TEMPLATES = {
    "v1": "vicuna_v1",
    "vicuna_v1": "vicuna_v1",
    "llava_v1": "llava_v1",
    "plain": "plain",
    "v0_plain": "plain",
    "llava_llama_2": "llama_2",
    "mistral_instruct": "mistral",
    "chatml_direct": "chatml",
    "mistral_direct": "chatml",
}
# Projector Sequential indices (mlp2x_gelu: Linear, GELU, Linear) -> LlavaMultiModalProjector's names.
PROJECTOR_INDEX = {"0": "linear_1", "2": "linear_2"}
PROJECTOR_PREFIX = "model.mm_projector."
TOWER_PREFIX = "model.vision_tower.vision_tower."
# Config fields of the original LLaVA classes that are not the language model's (train.py writes them).
_LLAVA_FIELDS = {
    "architectures",
    "model_type",
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "use_mm_proj",
    "tune_mm_mlp_adapter",
    "freeze_mm_mlp_adapter",
    "tune_mm_vision_resampler",
    "freeze_mm_vision_resampler",
    "unfreeze_mm_vision_tower",
    "image_aspect_ratio",
    "image_grid_pinpoints",
    "image_crop_resolution",
    "image_split_resolution",
    "tokenizer_padding_side",
    "tokenizer_model_max_length",
    "version",
}


@dataclass(frozen=True)
class OriginalConfig:
    """The fields of an original-format config.json that decide whether its weights fit a run.

    Defaults are the original code's when a field is absent (`mm_projector_type` 'linear',
    `mm_vision_select_feature` 'patch', `mm_patch_merge_type` 'flat'). `version` is not written by the
    original trainer; it is read when a checkpoint's config carries it.
    """

    vision_tower: str | None
    select_layer: int | None
    select_feature: str
    projector_type: str
    mm_hidden_size: int | None
    patch_merge_type: str
    image_aspect_ratio: str | None
    use_im_start_end: bool
    use_im_patch_token: bool
    version: str | None
    lm_type: str | None
    dtype: str | None
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def template(self) -> str | None:
        """Our template for the recorded `version` (None when none is recorded or it has no equivalent)."""
        return VERSION_TEMPLATES.get(self.version) if self.version else None


def is_original_config(raw: dict[str, Any]) -> bool:
    """Whether a raw config.json is the original format (flat LM fields plus `mm_*`; no llava-hf text_config).

    Read raw, never with AutoConfig: `model_type: llava` would silently become a default llava-hf LlavaConfig.
    """
    if "text_config" in raw:
        return False
    return any(a in ARCHITECTURES for a in raw.get("architectures") or []) or any(k.startswith("mm_") for k in raw)


def read_config(raw: dict[str, Any]) -> OriginalConfig:
    """The OriginalConfig of a raw original-format config.json."""
    lm_type = next((ARCHITECTURES[a] for a in raw.get("architectures") or [] if a in ARCHITECTURES), None)
    return OriginalConfig(
        vision_tower=raw.get("mm_vision_tower"),
        select_layer=raw.get("mm_vision_select_layer"),
        select_feature=raw.get("mm_vision_select_feature") or "patch",
        projector_type=raw.get("mm_projector_type") or "linear",
        mm_hidden_size=raw.get("mm_hidden_size"),
        patch_merge_type=raw.get("mm_patch_merge_type") or "flat",
        image_aspect_ratio=raw.get("image_aspect_ratio"),
        use_im_start_end=bool(raw.get("mm_use_im_start_end", False)),
        use_im_patch_token=bool(raw.get("mm_use_im_patch_token", False)),
        version=raw.get("version"),
        lm_type=lm_type,
        dtype=raw.get("torch_dtype"),
        raw=raw,
    )


def text_config(original: OriginalConfig, where: str) -> Any:
    """The language model's transformers config, built from the checkpoint's flat fields (LLaVA's own dropped)."""
    from transformers import AutoConfig

    if original.lm_type is None:
        raise InitFromError(
            f"{where}: config.json architectures {original.raw.get('architectures')} is none of "
            f"{', '.join(ARCHITECTURES)}"
        )
    fields = {k: v for k, v in original.raw.items() if k not in _LLAVA_FIELDS and not k.startswith("mm_")}
    if fields.get("rope_scaling", 0) is None:
        del fields["rope_scaling"]  # 4.31-era configs write null; transformers 5 warns about the old field
    return AutoConfig.for_model(original.lm_type, **fields)


def _same_model(a: str, b: str) -> bool:
    # The original stores whatever --vision_tower was (a hub id or a local copy of it): the same model is
    # the same last path component (`openai/clip-vit-large-patch14-336` = `/data/clip-vit-large-patch14-336`).
    return Path(str(a).rstrip("/")).name == Path(str(b).rstrip("/")).name


def check_run(cfg: Any, original: OriginalConfig, vision_config: Any, where: str, full: bool) -> None:
    """Raise a one-line ValueError naming both values when the original checkpoint does not fit `cfg`.

    Checked: LLaVA-1.5 only (no anyres / image newline / start-end tokens), projector type, vision
    tower, its hidden size, select layer and feature; for full checkpoints also the template of a
    recorded `version` (a stage-1 projector was trained with `plain`, whatever the next stage uses).
    """
    m = cfg.model
    if m.arch != "llava":
        raise InitFromError(
            f"{where} is an original-format LLaVA-1.5 checkpoint; it needs model.arch=llava, not {m.arch}"
        )
    if "unpad" in original.patch_merge_type or str(original.image_aspect_ratio or "").startswith("anyres"):
        raise InitFromError(
            f"{where} is a LLaVA-1.6 (anyres) original checkpoint (mm_patch_merge_type={original.patch_merge_type}, "
            f"image_aspect_ratio={original.image_aspect_ratio}); only LLaVA-1.5 original checkpoints are supported "
            "(use its llava-hf conversion with model.arch=llava_next)"
        )
    if original.use_im_start_end or original.use_im_patch_token:
        raise InitFromError(
            f"{where} was trained with mm_use_im_start_end={original.use_im_start_end}, mm_use_im_patch_token="
            f"{original.use_im_patch_token}; only LLaVA-1.5's plain <image> token (both false) is supported"
        )
    # (their field, their value, our field, our value, whether they agree)
    checks = [
        ("mm_projector_type", original.projector_type, "model.projector", m.projector, None),
        (
            "mm_vision_select_feature",
            original.select_feature,
            "model.vision_feature_select",
            m.vision_feature_select,
            None,
        ),
    ]
    if original.vision_tower is not None:
        same = _same_model(original.vision_tower, m.vision_tower)
        checks.append(("mm_vision_tower", original.vision_tower, "model.vision_tower", m.vision_tower, same))
    if original.select_layer is not None:
        layer = m.vision_feature_layer
        checks.append(("mm_vision_select_layer", original.select_layer, "model.vision_feature_layer", layer, None))
    if original.mm_hidden_size is not None and vision_config is not None:
        hidden = int(vision_config.hidden_size)
        checks.append(
            ("mm_hidden_size", original.mm_hidden_size, f"the hidden_size of {m.vision_tower}", hidden, None)
        )
    if full and original.version is not None:
        if original.template is None:
            raise InitFromError(
                f"{where} was trained with version={original.version}, which has no llava-train template "
                f"(known versions: {', '.join(VERSION_TEMPLATES)})"
            )
        ours = _run_template(cfg)
        value = f"{original.version} (template {original.template})"
        checks.append(("version", value, "data.template", ours, original.template == ours))
    for theirs, value, our_field, expected, same in checks:
        if not (value == expected if same is None else same):
            raise InitFromError(f"{where} was trained with {theirs}={value} but {our_field}={expected}")


def _run_template(cfg: Any) -> str:

    return run_template(cfg).name


# -- the key map ---------------------------------------------------------------------------------------


def _projector_name(key: str, where: str) -> str:
    """`model.mm_projector.0.weight` -> `linear_1.weight` (a `linear` projector has no index: not LLaVA-1.5's)."""
    index, _, rest = key[len(PROJECTOR_PREFIX) :].partition(".")
    if index not in PROJECTOR_INDEX or not rest:
        raise InitFromError(
            f"{where} holds {key}: not an mlp2x_gelu projector (model.mm_projector.0/2.*), which is the only one "
            "transformers' LlavaMultiModalProjector has"
        )
    return f"{PROJECTOR_INDEX[index]}.{rest}"


def key_mapping(names: list[str], model: Any, where: str) -> tuple[dict[str, str], list[str]]:
    """Checkpoint name -> the model's in-memory parameter name, and the names nothing maps to.

    The vision tower's names are matched by the best prefix rule (CLIP/SigLIP checkpoints differ in
    their `vision_model.` prefix across transformers versions).
    """
    targets = set(model.state_dict(keep_vars=True))
    tower_targets = {n[len("model.vision_tower.") :] for n in targets if n.startswith("model.vision_tower.")}
    tower = [k[len(TOWER_PREFIX) :] for k in names if k.startswith(TOWER_PREFIX)]
    tower_map = key_map(tower, tower_targets, vision_rules())
    mapping: dict[str, str] = {}
    for key in names:
        if key.endswith(IGNORED_SUFFIXES):
            continue
        if key.startswith(TOWER_PREFIX):
            name = tower_map.get(key[len(TOWER_PREFIX) :])
            name = f"model.vision_tower.{name}" if name is not None else None
        elif key.startswith(PROJECTOR_PREFIX):
            name = f"model.multi_modal_projector.{_projector_name(key, where)}"
        elif key.startswith("lm_head."):
            name = key
        elif key.startswith("model."):
            name = "model.language_model." + key[len("model.") :]
        else:
            name = None
        if name is not None and name in targets:
            mapping[key] = name
    leftover = [k for k in names if k not in mapping and not k.endswith(IGNORED_SUFFIXES)]
    return mapping, leftover


def _listed(names: list[str]) -> str:
    return ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")


def load_full(model: Any, files: list[Path], names: list[str], where: str) -> bool:
    """Copy an original full checkpoint into a freshly built model (strict, ZeRO-3 safe, one tensor at a time).

    Every language-model, lm_head (untied LMs) and projector parameter must come from the checkpoint,
    and the vision tower's too when it holds any (self-trained folders); nothing may be left over.
    Returns whether the vision tower came from the checkpoint (else the caller loads `model.vision_tower`).
    """
    mapping, leftover = key_mapping(names, model, where)
    if leftover:
        raise InitFromError(
            f"{where} holds {len(leftover)} weight(s) a LLaVA-1.5 model does not have: {_listed(leftover)}"
        )
    targets = model.state_dict(keep_vars=True)
    has_tower = any(v.startswith("model.vision_tower.") for v in mapping.values())
    tied = bool(model.config.tie_word_embeddings)
    if tied and any(v.startswith("lm_head.") for v in mapping.values()):
        # The tied lm_head *is* the embedding: copying both would keep whichever came last.
        raise InitFromError(f"{where}: tie_word_embeddings is true but the checkpoint has its own lm_head")
    expected = {
        n
        for n in targets
        if n.startswith(("model.language_model.", "model.multi_modal_projector."))
        or (n.startswith("lm_head.") and not tied)
        or (has_tower and n.startswith("model.vision_tower."))
    }
    missing = sorted(expected - set(mapping.values()))
    if missing:
        raise InitFromError(f"{where} does not provide {len(missing)} weight(s) of the model: {_listed(missing)}")
    n = copy_mapped(files, mapping, targets, "llava", where)
    log.info(
        "original checkpoint loaded: %d tensors from %s (vision tower %s)",
        n,
        where,
        "too" if has_tower else "not in it",
    )
    return has_tower


def read_projector(path: Path) -> dict[str, Any]:
    """An original `mm_projector.bin` as LlavaMultiModalProjector names (`linear_1.weight`, ...), read weights_only.

    Keys are filtered on `mm_projector` as the original loader does (a file saved with start/end
    tokens also holds `model.embed_tokens.weight`); any prefix before `mm_projector.` is accepted
    (`base_model.model.` from LoRA runs).
    """
    out: dict[str, Any] = {}
    for key, tensor in iter_tensors([path]):
        if "mm_projector." not in key:
            continue
        out[_projector_name(PROJECTOR_PREFIX + key.split("mm_projector.", 1)[1], str(path))] = tensor
    if not out:
        raise InitFromError(f"{path} holds no mm_projector weights")
    return out


def check_projector_shapes(
    tensors: dict[str, Any], path: Path, lm_hidden: int, vision_hidden: int, lm: str, tower: str
) -> None:
    """A projector for another language model / vision tower is a one-line error naming the shapes and parts."""
    shape = tuple(tensors["linear_1.weight"].shape) if "linear_1.weight" in tensors else None
    if shape != (lm_hidden, vision_hidden):
        raise InitFromError(
            f"{path} maps vision features to the LM with linear_1.weight {shape}, but model.vision_tower={tower} "
            f"(hidden_size {vision_hidden}) and model.language_model={lm} (hidden_size {lm_hidden}) need "
            f"{(lm_hidden, vision_hidden)}"
        )


def load_projector_tensors(model: Any, tensors: dict[str, Any], path: Path) -> None:
    """Copy projector tensors (LlavaMultiModalProjector names) into the model (strict, ZeRO-3 safe)."""

    targets = projector_module(model).state_dict(keep_vars=True)
    if set(tensors) != set(targets):
        raise InitFromError(
            f"{path} holds projector weights {sorted(tensors)}, the model's projector has {sorted(targets)}"
        )
    for key in sorted(tensors):
        assign(targets[key], tensors[key], f"multi_modal_projector.{key}", str(path))


def raw_config(folder: Path) -> dict[str, Any] | None:
    """A folder's config.json as a dict (None when there is none)."""
    path = folder / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None
