"""The projector artifact: find the projector module (peft-wrapped too), save and load `projector.safetensors`.

Stage 1's product is its projector (and, for LLaVA-NeXT / OneVision, the learned `image_newline`
embedding that ends every grid row: saved as the key `image_newline`); stage 2 starts from it with
`model.init_from`. Every checkpoint and final folder carries the file, so a stage-1 run can hand
over from any of its checkpoints, and LoRA checkpoints (whose peft adapter cannot hold a bare
parameter like the newline) keep it there too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from llava_train.model.weights import assign, full_shape
from llava_train.utils.distributed import full_tensor, gathered, rank
from llava_train.utils.logging import get_logger

log = get_logger(__name__)

NEWLINE_KEY = "image_newline"


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


def image_newline(model: Any) -> Any:
    """The `image_newline` parameter of a (possibly wrapped) LLaVA-NeXT / OneVision model, None for LLaVA-1.5."""
    for name, param in model.named_parameters():
        if name.endswith(NEWLINE_KEY):
            return param
    return None


def _artifact_params(model: Any) -> dict[str, Any]:
    params = dict(projector_module(model).named_parameters())
    newline = image_newline(model)
    if newline is not None:
        params[NEWLINE_KEY] = newline
    return params


def save_projector(model: Any, path: str | os.PathLike) -> Path:
    """Write the projector's weights (+ `image_newline`) to `path` (safetensors; names like `linear_1.weight`;
    ZeRO-3 gathered).

    Every rank must call it under ZeRO-3 (the gather is collective); only rank 0 writes.
    """
    from safetensors.torch import save_file

    path = Path(path)
    params = _artifact_params(model)
    with gathered(list(params.values()), modifier_rank=None):
        whole = {k: full_tensor(p.detach()) for k, p in params.items()}  # FSDP2: collective, every rank
        if rank() == 0:
            state = {k: t.to("cpu").clone().contiguous() for k, t in whole.items()}
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(state, str(path), metadata={"format": "pt", "content": "llava multi_modal_projector"})
    return path


def load_projector(model: Any, path: str | os.PathLike) -> None:
    """Load `projector.safetensors` into the model's projector (+ image newline; ZeRO-3 safe, names and shapes
    checked).

    A file without `image_newline` (a LLaVA-1.5 stage 1) into a NeXT / OneVision model keeps the
    newline's initialisation, with a warning; a file with one into a LLaVA-1.5 model is an error.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"projector file not found: {path}")
    targets = projector_module(model).state_dict(keep_vars=True)
    newline = image_newline(model)
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        keys = set(handle.keys())
        if NEWLINE_KEY in keys:
            if newline is None:
                raise ValueError(
                    f"{path} holds an {NEWLINE_KEY} (a LLaVA-NeXT / OneVision projector) but the model has none "
                    "(model.arch=llava); set model.arch to the arch it was trained with"
                )
            assign(newline, handle.get_tensor(NEWLINE_KEY), NEWLINE_KEY, str(path))
            keys.discard(NEWLINE_KEY)
        elif newline is not None:
            log.warning(
                "%s has no %s (a LLaVA-1.5 projector): the image newline keeps its initialisation", path, NEWLINE_KEY
            )
        if keys != set(targets):
            raise ValueError(
                f"{path} holds projector weights {sorted(keys)}, the model's projector has {sorted(targets)}"
            )
        for key in sorted(keys):
            tensor = handle.get_tensor(key)
            if tuple(tensor.shape) != full_shape(targets[key]):
                raise ValueError(
                    f"projector shape mismatch for {key}: {path} has {tuple(tensor.shape)}, the model expects "
                    f"{full_shape(targets[key])} (was it trained for another vision tower / language model?)"
                )
            assign(targets[key], tensor, f"multi_modal_projector.{key}", str(path))
