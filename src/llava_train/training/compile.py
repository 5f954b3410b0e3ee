"""`perf.compile`: regional `torch.compile` of the model's repeated blocks (each vision-tower encoder layer and
each language-model decoder layer), the rest eager.

Compiling the layers one by one (`nn.Module.compile`, in place) instead of the whole model compiles one
graph per distinct layer (all layers share it, so compile time does not grow with depth), keeps the
image merge, the loss and the keepalive eager (their shapes depend on the data), and leaves the module
tree, parameter names and state dicts untouched: checkpoints, LoRA and `save_pretrained` see the same
model. Fixed shapes compile once: use it with packed rows (`data.packing`), where every micro-batch is
one shape; padded batches of varying length recompile per new length (torch marks the length dynamic
after the second). Same numbers as eager up to float reassociation (tests/training/test_compile.py).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from llava_train.config_io import ConfigError
from llava_train.model.freeze import MODULE_GROUPS, strip_wrappers
from llava_train.utils.logging import get_logger

log = get_logger(__name__)
REGION_GROUPS = ("vision_tower", "language_model")


def compile_regions_of(model: nn.Module) -> list[str]:
    """Names of the `layers` ModuleLists whose layers `compile_regions` compiles (vision tower, then LM)."""
    names = []
    for group in REGION_GROUPS:
        prefix = MODULE_GROUPS[group].prefix
        for name, module in model.named_modules():
            if (
                isinstance(module, nn.ModuleList)
                and name.endswith("layers")
                and strip_wrappers(name).startswith(prefix)
            ):
                names.append(name)
    return names


def compile_regions(model: nn.Module, options: dict[str, Any] | None = None) -> int:
    """Compile every layer of `compile_regions_of(model)` in place; returns how many were compiled.

    options: `torch.compile` keyword arguments (mode, dynamic, fullgraph, backend). Refused under ZeRO-3:
    DeepSpeed gathers each layer's partitioned parameters in module hooks that a compiled layer does not run
    the way its hooks expect."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        raise ConfigError("perf.compile is not supported under DeepSpeed ZeRO-3 (use ZeRO-2, or perf.compile=false)")
    regions = compile_regions_of(model)
    count = 0
    for name in regions:
        for layer in model.get_submodule(name):
            layer.compile(**(options or {}))
            count += 1
    log.info("perf.compile: %d layers compiled (%s)", count, ", ".join(regions))
    return count
