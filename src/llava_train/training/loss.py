"""Loss only where it trains: lm_head + fp32 cross entropy on the positions whose shifted label is not -100.

The standard path projects every position (image tokens, prompts, padding) through lm_head and
builds a fp32 [B, L, V] logits tensor; in LLaVA data most positions never train. Here the forward
runs through the (possibly DDP/DeepSpeed/peft-wrapped) model as usual, and the one lm_head call of
that forward computes the loss itself: a forward pre-hook hands it the trained positions [T, D]
only, and for the duration of the call its `forward` is the loss on those positions: in chunks
(each chunk recomputed in backward, so only one chunk's [chunk, V] logits are alive), or with
Liger's fused linear cross entropy when it is installed and the model runs on CUDA. The model's
output `logits` is then that loss sum. The objective is exactly HF's: sum of token losses /
num_items_in_batch (trained tokens across gradient accumulation and ranks), or the mean over this
batch's trained tokens when num_items_in_batch is None.

THE RANK RULE. Every rank makes the same sequence of module calls and collectives in every step,
whatever its data. Under ZeRO-3 each module call all-gathers the module's weights for its forward
(and again for its backward), so the loss must not call lm_head once per chunk of this rank's
trained tokens: two ranks on either side of a multiple of `chunk` would issue different numbers of
all-gathers (gloo aborts with mismatched sizes, NCCL hangs), and the chunks' recomputation in
backward would find the weight partitioned again. Here lm_head is called exactly once per forward
on every rank, whatever T is; the chunks inside use its weight directly (`F.linear`), while ZeRO-3
holds it gathered for that one call and for that call's backward, where the recomputation runs.
Tested with 2 CPU ranks whose trained-token counts straddle a small `perf.loss_chunk_size`, under
ZeRO-2 and ZeRO-3 (tests/distributed/test_deepspeed_cpu.py), and by counting lm_head calls
(tests/training/test_loss.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llava_train.data.collator import BATCH_ONLY_KEYS
from llava_train.utils.modules import IGNORE_INDEX, unwrap

DEFAULT_CHUNK = 4096
# Batch keys the model's forward must not get (the loss is computed here, labels included).
NON_MODEL_KEYS = ("labels", "num_items_in_batch", *BATCH_ONLY_KEYS)


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
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Sum over positions of fp32 cross entropy of `hidden @ weight.T + bias`. hidden [T, D], targets [T].

    With more than one chunk, each chunk runs under activation checkpointing so the backward keeps
    only one chunk's [chunk, V] logits alive instead of [T, V]. Calls no module (THE RANK RULE).
    """

    def piece(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(F.linear(h, weight, bias).float(), t, reduction="sum")

    if hidden.shape[0] <= chunk:
        return piece(hidden, targets)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        part = slice(start, start + chunk)
        total = total + checkpoint(piece, hidden[part], targets[part], use_reentrant=False)
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
    """HF's causal-LM loss, computing lm_head only on trained positions, inside lm_head's one call.

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
    target = targets[keep]  # [T]
    head = unwrap(model).get_output_embeddings()
    weight = getattr(head, "weight", None)
    if not isinstance(head, nn.Linear) or weight is None:
        raise TypeError(f"perf.loss_on_trained_only needs an nn.Linear lm_head, got {type(head).__name__}")
    if use_liger is None:
        use_liger = not hasattr(weight, "ds_id") and liger_available(weight.device)
    calls: list[int] = []

    def take_trained(module: nn.Module, args: tuple[Any, ...]) -> tuple[torch.Tensor]:
        calls.append(1)
        return (args[0][keep],)  # [B, L, D] -> [T, D]

    def loss_forward(hidden: torch.Tensor) -> torch.Tensor:
        # Runs as lm_head's forward: under ZeRO-3 its weight is gathered here and again in its backward.
        if use_liger:
            return _liger_cross_entropy_sum(head, hidden, target).float()
        return chunked_cross_entropy_sum(head.weight, head.bias, hidden, target, chunk)

    own_forward = head.__dict__.get("forward")  # e.g. an accelerate hook wrapper: put it back afterwards
    handle = head.register_forward_pre_hook(take_trained)
    head.forward = loss_forward
    try:
        out = model(**{k: v for k, v in inputs.items() if k not in NON_MODEL_KEYS})
    finally:
        handle.remove()
        if own_forward is None:
            del head.forward
        else:
            head.forward = own_forward
    if len(calls) != 1:
        raise RuntimeError(f"lm_head ran {len(calls)} times in one forward; expected exactly once")
    total = out.logits  # the loss sum lm_head returned
    if num_items_in_batch is None:
        return total / keep.sum().clamp(min=1)
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
