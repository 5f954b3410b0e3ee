"""Loss on trained positions only: same value and gradients as HF's standard loss, padded and packed, with peft."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from llava_train.data.collator import BATCH_ONLY_KEYS, PaddingCollator
from llava_train.data.packing import PackingCollator
from llava_train.training.loss import chunked_cross_entropy_sum, shifted_targets, trained_positions_loss
from tiny_models import sample, tiny_llava


def _items() -> list[dict[str, Any]]:
    return [sample(n, k, seed=i, sid=str(i)) for i, (n, k) in enumerate([(9, 1), (5, 0), (12, 2), (7, 1)])]


def _hf_loss(model: Any, batch: dict[str, Any], n_items: Any) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k not in BATCH_ONLY_KEYS}
    if n_items is not None:
        inputs["num_items_in_batch"] = n_items
    return model(**inputs).loss


def _grads(model: Any) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def test_shifted_targets() -> None:
    labels = torch.tensor([[-100, 5, 6, -100], [7, -100, 8, 9]])
    assert shifted_targets(labels).tolist() == [[5, 6, -100, -100], [-100, 8, 9, -100]]


@pytest.mark.parametrize("collator", ["padded", "packed"])
@pytest.mark.parametrize("n_items", [None, 37])
def test_equals_hf_loss_and_gradients(collator: str, n_items: int | None) -> None:
    model = tiny_llava("sdpa")
    coll = PaddingCollator(pad_token_id=0) if collator == "padded" else PackingCollator(pad_token_id=0)
    batch = coll(_items() if collator == "padded" else [_items()[:2], _items()[2:]])
    ref = _hf_loss(model, batch, n_items)
    ref.backward()
    ref_grads = _grads(model)
    ours = trained_positions_loss(model, batch, n_items)
    ours.backward()
    grads = _grads(model)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    assert sorted(grads) == sorted(ref_grads)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("bias", [False, True])
def test_chunks_match_one_shot(bias: bool) -> None:
    head = torch.nn.Linear(8, 50, bias=bias)
    hidden = torch.randn(11, 8, requires_grad=True)
    targets = torch.randint(0, 50, (11,))
    params = (hidden, head.weight, *([head.bias] if bias else []))
    one = chunked_cross_entropy_sum(head.weight, head.bias, hidden, targets, chunk=100)
    g_one = torch.autograd.grad(one, params)
    many = chunked_cross_entropy_sum(head.weight, head.bias, hidden, targets, chunk=3)
    g_many = torch.autograd.grad(many, params)
    torch.testing.assert_close(many, one)
    torch.testing.assert_close(one, torch.nn.functional.cross_entropy(head(hidden), targets, reduction="sum"))
    for a, b in zip(g_many, g_one):
        torch.testing.assert_close(a, b)


def test_peft_wrapped_model() -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_llava("sdpa"), LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)")
    )
    batch = PaddingCollator(pad_token_id=0)(_items())
    ref = _hf_loss(model, batch, 20)
    ours = trained_positions_loss(model, batch, 20)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    ours.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_lm_head_sees_only_trained_positions() -> None:
    model = tiny_llava("sdpa")
    batch = PaddingCollator(pad_token_id=0)(_items())
    rows: list[int] = []
    model.lm_head.register_forward_hook(lambda m, a, out: rows.append(a[0].reshape(-1, a[0].shape[-1]).shape[0]))
    trained_positions_loss(model, batch, None)
    assert rows == [int((batch["labels"][:, 1:] != -100).sum())]
    assert "forward" not in model.lm_head.__dict__  # the module is itself again afterwards


def test_lm_head_is_called_once_whatever_the_data() -> None:
    """THE RANK RULE: micro-batches with 7 and 15 trained tokens (1 vs several chunks of 5) both make exactly one
    lm_head module call forward and one module backward; the chunks and their recomputation run inside them."""
    model = tiny_llava("sdpa")
    forward: list[int] = []
    backward: list[int] = []
    model.lm_head.register_forward_hook(lambda m, a, out: forward.append(a[0].shape[0]))
    model.lm_head.register_full_backward_hook(lambda m, gi, go: backward.append(1))
    seen = []
    for items in ([sample(9, 1, seed=1, sid="a"), sample(6, 0, seed=2, sid="b")], _items()):
        forward.clear()
        backward.clear()
        batch = PaddingCollator(pad_token_id=0)(items)
        trained_positions_loss(model, batch, None, chunk=5).backward()
        seen.append((forward[:], len(backward)))
    assert seen == [([7], 1), ([15], 1)]
