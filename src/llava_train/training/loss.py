"""Loss only where it trains: lm_head + fp32 cross entropy on the positions whose shifted label is not -100.

The standard path projects every position (image tokens, prompts, padding) through lm_head and
builds a fp32 [B, L, V] logits tensor; in LLaVA data most positions never train. Here the forward
runs through the (possibly DDP/DeepSpeed/peft-wrapped) model as usual, but a forward pre-hook on
lm_head takes the hidden states, keeps the trained positions [T, D] aside and hands lm_head an
empty input. The loss is then computed on those T positions only: in chunks (each chunk is
recomputed in backward so only one chunk's logits are alive), or with Liger's fused linear cross
entropy when it is installed and the model runs on CUDA. The objective is exactly HF's:
sum of token losses / num_items_in_batch (trained tokens across gradient accumulation and ranks),
or the mean over this batch's trained tokens when num_items_in_batch is None.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llava_train.data.tokenize import IGNORE_INDEX

DEFAULT_CHUNK = 4096
# Keys our collators add that the model must not see (they would travel down to attention kwargs).
NON_MODEL_KEYS = ("labels", "ids", "num_images", "num_items_in_batch")


def unwrap(model: nn.Module) -> nn.Module:
    """The LlavaForConditionalGeneration under DDP/DeepSpeed (`.module`) and peft (`get_base_model()`)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """targets[b, t] = labels[b, t + 1]; -100 at the last position (what HF's causal-LM loss predicts). [B, L]"""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def liger_available(device: torch.device) -> bool:
    """Liger's fused linear cross entropy is importable and the model is on CUDA."""
    if device.type != "cuda":
        return False
    try:
        import liger_kernel.transformers.fused_linear_cross_entropy  # noqa: F401
    except ImportError:
        return False
    return True


def chunked_cross_entropy_sum(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """Sum over positions of fp32 cross entropy of head(hidden) against targets. hidden [T, D], targets [T].

    With more than one chunk, each chunk runs under activation checkpointing so the backward keeps
    only one chunk's [chunk, V] logits alive instead of [T, V].
    """

    def piece(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(h).float(), t, reduction="sum")

    if hidden.shape[0] <= chunk:
        return piece(hidden, targets)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        total = total + checkpoint(
            piece, hidden[start : start + chunk], targets[start : start + chunk], use_reentrant=False
        )
    return total


def _liger_cross_entropy_sum(head: nn.Linear, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="sum")
    return loss_fn(head.weight, hidden, targets, head.bias)


def trained_positions_loss(
    model: nn.Module,
    inputs: dict[str, Any],
    num_items_in_batch: Any = None,
    chunk: int = DEFAULT_CHUNK,
    use_liger: bool | None = None,
) -> torch.Tensor:
    """HF's causal-LM loss, computing lm_head only on trained positions.

    model: LlavaForConditionalGeneration, possibly wrapped (DDP, DeepSpeed engine, peft); the
        forward goes through the wrapper so gradient sync and ZeRO hooks behave as usual.
    inputs: a collated batch with `labels` [B, L] (padded or packed).
    num_items_in_batch: trained tokens across gradient accumulation and ranks (HF passes it); the
        loss is sum / num_items_in_batch, or the mean over this batch's trained tokens when None.
    use_liger: None = Liger when available on CUDA (and the weights are not ZeRO-3 partitioned).
    Returns a 0-d fp32 tensor. One host sync: the number of trained positions.
    """
    labels = inputs["labels"]
    targets = shifted_targets(labels)  # [B, L]
    keep = targets != IGNORE_INDEX  # [B, L]
    head = unwrap(model).get_output_embeddings()
    kept: list[torch.Tensor] = []

    def take_trained(module: nn.Module, args: tuple[Any, ...]) -> tuple[torch.Tensor]:
        hidden = args[0]  # [B, L, D]
        kept.append(hidden[keep])  # [T, D]
        return (hidden[:, :0],)  # lm_head projects nothing inside the forward

    handle = head.register_forward_pre_hook(take_trained)
    try:
        model(**{k: v for k, v in inputs.items() if k not in NON_MODEL_KEYS})
    finally:
        handle.remove()
    if len(kept) != 1:
        raise RuntimeError(f"lm_head ran {len(kept)} times in one forward; expected exactly once")
    hidden = kept[0]
    target = targets[keep]  # [T]
    weight = getattr(head, "weight", None)
    if use_liger is None:
        use_liger = (
            isinstance(head, nn.Linear)
            and weight is not None
            and not hasattr(weight, "ds_id")
            and liger_available(hidden.device)
        )
    if use_liger:
        total = _liger_cross_entropy_sum(head, hidden, target).float()
    else:
        total = chunked_cross_entropy_sum(head, hidden, target, chunk)
    if num_items_in_batch is None:
        return total / keep.sum().clamp(min=1)
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
