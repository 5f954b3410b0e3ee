"""Model-wrapper helpers shared by every layer: the one `unwrap`, and the label value that is never trained."""

from __future__ import annotations

from typing import Any

# Labels with this value take no part in the loss (PyTorch's cross-entropy default ignore_index).
IGNORE_INDEX = -100


def unwrap(model: Any) -> Any:
    """The LlavaForConditionalGeneration under DDP / DeepSpeed engines (`.module`) and peft (`get_base_model()`)."""
    from torch import nn

    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model
