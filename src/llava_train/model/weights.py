"""Reading pretrained weights and copying them into a built model: files, names, shapes, ZeRO-3 safe assignment.

Folders are resolved once (a local path, else a hub snapshot); tensors are read one at a time from
safetensors (or `.bin` with `weights_only=True`), mapped to module names by prefix rules, and copied
into parameters that ZeRO-3 may have partitioned (gathered one at a time, modifier rank 0).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llava_train.remote_code import refuse_remote_code
from llava_train.utils.distributed import gathered
from llava_train.utils.logging import get_logger

log = get_logger(__name__)

# Buffers that older checkpoints stored but current models recompute (never an error when left over).
IGNORED_SUFFIXES = (".inv_freq", ".position_ids")
# Files fetched for a hub id; `*.bin` only when a repo has no safetensors (then read weights_only).
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def resolve_folder(name_or_path: str | os.PathLike, weights: bool = True, also: tuple[str, ...] = ()) -> Path:
    """A local folder for a hub id or path: the path itself, else a snapshot in the HF cache (downloaded if allowed).

    Only safetensors are fetched, unless a repo has none (then `*.bin`, read with weights_only).
    `weights=False` fetches configs, tokenizer and processor files only (data commands need no weights);
    `also` adds file patterns fetched either way (an original LLaVA stage 1's small `mm_projector.bin`).
    """

    path = Path(name_or_path)
    if path.is_dir():
        refuse_remote_code(path)
        return path
    from huggingface_hub import snapshot_download

    if not weights:
        small = [p for p in _HUB_PATTERNS if "safe" not in p] + list(also)
        folder = Path(snapshot_download(str(name_or_path), allow_patterns=small))
    else:
        folder = Path(snapshot_download(str(name_or_path), allow_patterns=_HUB_PATTERNS + list(also)))
        if not list(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(str(name_or_path), allow_patterns=_HUB_PATTERNS + ["*.bin"]))
    refuse_remote_code(folder)
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
            try:
                yield from _read_safetensors(file)
            except _UnknownDtype:
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


class _UnknownDtype(Exception):
    """A safetensors dtype `_read_safetensors` does not map (safetensors' own reader takes the file)."""


_SAFETENSORS_DTYPES = {
    "BF16": "bfloat16",
    "F16": "float16",
    "F32": "float32",
    "F64": "float64",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def _safetensors_header(handle: Any, file: Path) -> tuple[int, list[tuple[str, dict[str, Any]]]]:
    """(offset of the data, [(name, {dtype, shape, data_offsets})] in file order) of an open safetensors file."""
    import json
    import struct

    (size,) = struct.unpack("<Q", handle.read(8))
    header = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    if any(v["dtype"] not in _SAFETENSORS_DTYPES for v in header.values()):
        raise _UnknownDtype(file)
    return 8 + size, sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])


def _read_into(handle: Any, start: int, info: dict[str, Any], out: Any, file: Path, key: str) -> Any:
    """Read one tensor's bytes from an open safetensors file into `out` (contiguous, its dtype and shape)."""
    import torch

    begin, end = info["data_offsets"]
    if end > begin:
        handle.seek(start + begin)
        if handle.readinto(out.view(-1).view(torch.uint8).numpy()) != end - begin:
            raise ValueError(f"{file}: truncated tensor {key}")
    return out


def _new_tensor(info: dict[str, Any]) -> Any:
    import torch

    return torch.empty(info["shape"], dtype=getattr(torch, _SAFETENSORS_DTYPES[info["dtype"]]))


def _read_safetensors(file: Path) -> Iterator[tuple[str, Any]]:
    """(name, tensor) of a safetensors file, each read with plain file reads into a fresh tensor.

    Not memory-mapped on purpose: the pages of a mapped checkpoint that a copy touches count in the
    process's RSS until the file is closed (measured: peak RSS 1.8x the weights' bytes for a 1.1B LM +
    CLIP-L build, every rank of a node at once); read-and-copy keeps at most one tensor beyond the model.
    """
    with open(file, "rb") as handle:
        start, entries = _safetensors_header(handle, file)
        for key, info in entries:
            yield key, _read_into(handle, start, info, _new_tensor(info), file, key)


def _direct_target(param: Any, info: dict[str, Any]) -> bool:
    """Whether a checkpoint tensor can be read straight into `param`'s memory (same dtype and shape, a plain
    contiguous CPU tensor: not ZeRO-3 partitioned)."""
    import torch

    return (
        not hasattr(param, "ds_id")
        and param.device.type == "cpu"
        and param.is_contiguous()
        and param.dtype == getattr(torch, _SAFETENSORS_DTYPES[info["dtype"]])
        and list(param.shape) == list(info["shape"])
    )


def tensor_names(files: list[Path]) -> list[str]:
    """Tensor names of weight files, in file order (safetensors headers only; `.bin` files are loaded)."""
    from safetensors import safe_open

    names: list[str] = []
    for file in files:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                names.extend(handle.keys())
        else:
            names.extend(k for k, _ in iter_tensors([file]))
    return names


def checkpoint_names(folder: str | os.PathLike) -> list[str]:
    """Tensor names of a pretrained folder without reading tensors where an index json lists them."""
    folder = Path(folder)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            return list(json.loads(index.read_text())["weight_map"])
    return tensor_names(weight_files(folder))


def full_shape(param: Any) -> tuple[int, ...]:
    """The full shape of a parameter (under ZeRO-3 `param.shape` is the empty local shard; ds_shape is whole)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def assign(target: Any, tensor: Any, name: str, source: str) -> None:
    """Copy `tensor` into parameter `target` (ZeRO-3 gathered, cast to its dtype); a shape mismatch names both."""
    import torch

    if tuple(tensor.shape) != full_shape(target):
        raise ValueError(
            f"shape mismatch for {name}: {source} has {tuple(tensor.shape)}, the model expects {full_shape(target)}"
        )
    with gathered([target]), torch.no_grad():
        target.data.copy_(tensor.to(dtype=target.dtype, device=target.device))


def key_map(source: list[str], target: set[str], rules: list[tuple[str, str]]) -> dict[str, str]:
    """The (strip prefix, add prefix) rule that maps the most checkpoint names onto module names."""
    best: dict[str, str] = {}
    for strip, add in rules:
        mapping = {k: add + k[len(strip) :] for k in source if k.startswith(strip)}
        mapping = {k: v for k, v in mapping.items() if v in target}
        if len(mapping) > len(best):
            best = mapping
    return best


def copy_mapped(
    files: list[Path], mapping: dict[str, str], targets: dict[str, Any], where: str, folder: str | os.PathLike
) -> int:
    """Copy each checkpoint tensor that `mapping` names into its target parameter, one tensor in memory at a time."""
    import torch

    copied = 0
    for file in files:
        if file.suffix == ".safetensors":
            try:
                with open(file, "rb") as handle:
                    start, entries = _safetensors_header(handle, file)
                    for key, info in entries:
                        name = mapping.get(key)
                        if name is None:
                            continue  # never read what is not loaded (a CLIP checkpoint's text half)
                        target = targets[name]
                        if _direct_target(target, info):
                            # One write into the model's own memory: no second copy, no extra RSS.
                            with torch.no_grad():
                                _read_into(handle, start, info, target.data, file, key)
                        else:
                            tensor = _read_into(handle, start, info, _new_tensor(info), file, key)
                            assign(target, tensor, f"{where}.{name}", str(folder))
                        copied += 1
                continue
            except _UnknownDtype:
                pass
        for key, tensor in iter_tensors([file]):
            name = mapping.get(key)
            if name is not None:
                assign(targets[name], tensor, f"{where}.{name}", str(folder))
                copied += 1
    return copied


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
    names = tensor_names(files)
    mapping = key_map(names, set(targets), rules)
    missing = sorted(set(targets) - set(mapping.values()) - set(allow_missing))
    if missing:
        raise ValueError(
            f"{folder} does not provide {len(missing)} weight(s) of the {where}: {', '.join(missing[:8])}"
            + (" ..." if len(missing) > 8 else "")
        )
    unexpected = sorted(k for k in names if k not in mapping and not k.endswith(IGNORED_SUFFIXES))
    if unexpected and not allow_unexpected:
        raise ValueError(
            f"{folder} holds {len(unexpected)} weight(s) the {where} does not have: {', '.join(unexpected[:8])}"
            + (" ..." if len(unexpected) > 8 else "")
        )
    return copy_mapped(files, mapping, targets, where, folder)


# -- a LLaVA model from its two pretrained parts ------------------------------------------------


def vision_rules() -> list[tuple[str, str]]:
    """(strip, add) prefix rules from a CLIP/SigLIP checkpoint's names to the vision tower module's."""
    # CLIP/SigLIP checkpoints name the tower's weights with or without a `vision_model.` prefix
    # depending on the class and the transformers version that saved them.
    return [("", ""), ("vision_model.", ""), ("", "vision_model.")]


def load_pretrained_parts(model: Any, lm_folder: Path, vt_folder: Path, vision_full_config: Any) -> None:
    """Copy the LM's and the vision tower's pretrained weights into a freshly built LLaVA model (ZeRO-3 safe)."""
    inner = model.model
    tied = bool(model.config.tie_word_embeddings)
    n_vt = load_vision_tower(model, vt_folder, vision_full_config)
    lm_files = weight_files(lm_folder)
    names = tensor_names(lm_files)
    body = {k for k in names if not k.startswith("lm_head.")}
    head = [k for k in names if k.startswith("lm_head.")]
    if head and tied:
        raise ValueError(f"{lm_folder}: tie_word_embeddings is true but the checkpoint has its own lm_head")
    n_lm = _load_lm_body(inner.language_model, lm_folder, lm_files, sorted(body))
    if not tied:
        n_lm += load_submodule_weights(model.lm_head, lm_folder, [("lm_head.", "")], "lm_head", allow_unexpected=True)
    log.info("pretrained weights loaded: vision tower %d tensors (%s), LM %d (%s)", n_vt, vt_folder, n_lm, lm_folder)


def load_vision_tower(model: Any, vt_folder: Path, vision_full_config: Any) -> int:
    """Copy a CLIP/SigLIP folder's weights into a LLaVA model's vision tower (strict, ZeRO-3 safe); returns the count.

    A full CLIP/SigLIP model folder (vision + text) may hold weights the tower does not use.
    """
    return load_submodule_weights(
        model.model.vision_tower,
        vt_folder,
        vision_rules(),
        "vision tower",
        allow_unexpected=getattr(vision_full_config, "vision_config", None) is not None,
    )


def _load_lm_body(module: Any, folder: Path, files: list[Path], body: list[str]) -> int:
    targets = module.state_dict(keep_vars=True)
    mapping = key_map(body, set(targets), [("model.", ""), ("", "")])
    missing = sorted(set(targets) - set(mapping.values()))
    unexpected = sorted(k for k in body if k not in mapping and not k.endswith(IGNORED_SUFFIXES))
    if missing or unexpected:
        raise ValueError(
            f"{folder} does not match the language model: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    return copy_mapped(files, mapping, targets, "language_model", folder)


def llava_state_dict_from_parts(model: Any, lm_folder: Path, vt_folder: Path, vision_full: Any) -> dict[str, Any]:
    """A LLaVA state dict (without the projector) assembled from the LM's and vision tower's checkpoints."""
    load_pretrained_parts(model, lm_folder, vt_folder, vision_full)
    return {k: v for k, v in model.state_dict().items() if ".multi_modal_projector." not in f".{k}"}
