"""Packing: best-fit rows, deterministic sampler, exact collated rows, and packed forward == per-sample forward."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader

from llava_train.data.collator import BATCH_ONLY_KEYS, PaddingCollator
from llava_train.data.packing import (
    PackedRows,
    PackedRowSampler,
    PackingCollator,
    best_fit_decreasing,
    packed_rows,
)
from tiny_models import sample, tiny_llava


def test_best_fit_decreasing_exact_rows() -> None:
    lengths = [5, 3, 8, 2, 6, 4]
    # longest first: 8 -> r0, 6 -> r1, 5 -> r2, 4 -> r1 (free 4, best fit), 3 -> r2 (free 5 -> 2), 2 -> r0 (free 2)
    assert best_fit_decreasing(range(6), lengths, 10) == [[2, 3], [4, 5], [0, 1]]


def test_best_fit_rejects_too_long_sample() -> None:
    with pytest.raises(ValueError, match="sample 1 has 12 tokens, more than packing_length=10"):
        best_fit_decreasing([0, 1], [3, -12], 10)


def test_packed_rows_deterministic_complete_and_within_capacity() -> None:
    g = torch.Generator().manual_seed(1)
    lengths = [int(x) for x in torch.randint(1, 300, (500,), generator=g)]
    lengths = [n if i % 7 else -n for i, n in enumerate(lengths)]  # signed modality lengths work too
    rows = packed_rows(lengths, 512, seed=3, epoch=0, buffer_size=128)
    assert rows == packed_rows(lengths, 512, seed=3, epoch=0, buffer_size=128)
    assert rows != packed_rows(lengths, 512, seed=3, epoch=1, buffer_size=128)
    flat = [i for r in rows for i in r]
    assert sorted(flat) == list(range(500))
    assert all(sum(abs(lengths[i]) for i in r) <= 512 for r in rows)
    # best fit keeps rows full: fewer than 3% more rows than the tokens strictly need
    assert len(rows) <= 1.03 * sum(abs(n) for n in lengths) / 512 + 4


def test_sampler_epochs_and_rank_dealing() -> None:
    lengths = [100, 200, 300, 400, 50, 60, 70, 500, 20, 10]
    sampler = PackedRowSampler(lengths, capacity=512, seed=0)
    rows0 = list(sampler)
    assert len(sampler) == len(rows0) and all(isinstance(r, tuple) for r in rows0)
    sampler.set_epoch(1)
    rows1 = list(sampler)
    assert sorted(i for r in rows1 for i in r) == list(range(10))
    sampler.set_epoch(0)
    assert list(sampler) == rows0  # resume replays the epoch's order
    # accelerate deals micro-batch k (of whole rows) to rank k % world_size
    batches = list(BatchSampler(rows0, batch_size=1, drop_last=False))
    rank0 = [r for k, b in enumerate(batches) if k % 2 == 0 for r in b]
    rank1 = [r for k, b in enumerate(batches) if k % 2 == 1 for r in b]
    assert sorted(i for r in rank0 + rank1 for i in r) == list(range(10))


def test_collator_exact_row() -> None:
    a = {"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7]), "num_images": 0, "id": "a"}
    b = {"input_ids": torch.tensor([8, 9]), "labels": torch.tensor([8, 9]), "num_images": 0, "id": "b"}
    c = {"input_ids": torch.tensor([4]), "labels": torch.tensor([4]), "num_images": 0, "id": "c"}
    batch = PackingCollator(pad_token_id=0, pad_to_multiple_of=4)([[a, b], [c]])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0], [4, 0, 0, 0, 0, 0, 0, 0]]
    # b's first label (8) would be predicted from a's last token: it is dropped
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, -100, -100], [-100] * 8]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], [0, 0, 1, 2, 3, 4, 5, 6]]
    assert "attention_mask" not in batch and batch["use_cache"] is False
    assert batch["ids"] == ["a", "b", "c"] and batch["num_images"].tolist() == [0, 0, 0]


def test_dataloader_with_packed_rows() -> None:
    items = [sample(6 + i, i % 3, seed=i, sid=str(i)) for i in range(6)]
    lengths = [len(it["input_ids"]) for it in items]
    sampler = PackedRowSampler(lengths, capacity=24, seed=0)
    loader = DataLoader(PackedRows(items), batch_size=1, sampler=sampler, collate_fn=PackingCollator(0))
    seen, images = [], 0
    for batch in loader:
        seen += batch["ids"]
        assert batch["input_ids"].shape[1] <= 24
        images += batch["pixel_values"].shape[0] if "pixel_values" in batch else 0
    assert sorted(seen) == [str(i) for i in range(6)]
    assert images == sum(i % 3 for i in range(6))


CASES = {
    "text_only": [(9, 0), (5, 0), (12, 0)],
    "single_image": [(7, 1), (5, 1), (6, 0)],
    "multi_image": [(6, 2), (5, 1), (8, 3)],
}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_packed_logits_equal_per_sample_logits(attn: str, case: str) -> None:
    """Tolerance: 1e-5 absolute on fp32 logits (differences are summation order only)."""
    model = tiny_llava(attn)
    items = [sample(n, k, seed=10 * i + k, sid=str(i)) for i, (n, k) in enumerate(CASES[case])]
    batch = PackingCollator(pad_token_id=0)([items])
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k not in ("labels", *BATCH_ONLY_KEYS)}).logits
        start = 0
        for it in items:
            n = len(it["input_ids"])
            alone = model(input_ids=it["input_ids"][None], pixel_values=it.get("pixel_values")).logits
            torch.testing.assert_close(packed[0, start : start + n], alone[0], atol=1e-5, rtol=0)
            start += n


def test_packed_loss_equals_unpacked_loss() -> None:
    model = tiny_llava("sdpa")
    items = [sample(n, k, seed=i, sid=str(i)) for i, (n, k) in enumerate(CASES["multi_image"])]
    packed = PackingCollator(pad_token_id=0)([items])
    padded = PaddingCollator(pad_token_id=0)(items)
    n_items = (padded["labels"][:, 1:] != -100).sum()
    assert int((packed["labels"][:, 1:] != -100).sum()) == int(n_items)

    def loss(batch: dict[str, Any]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k not in BATCH_ONLY_KEYS}
        return model(**inputs, num_items_in_batch=n_items).loss

    torch.testing.assert_close(loss(packed), loss(padded), atol=1e-6, rtol=1e-6)


def test_single_items_are_padded_not_packed() -> None:
    """The eval loader hands the collator single items: one padded row each, as PaddingCollator does."""
    items = [sample(n, k, seed=i, sid=str(i)) for i, (n, k) in enumerate([(7, 1), (3, 0), (5, 0)])]
    got = PackingCollator(pad_token_id=0, pad_to_multiple_of=8)(items)
    want = PaddingCollator(pad_token_id=0, pad_to_multiple_of=8)(items)
    assert sorted(got) == sorted(want) and "position_ids" not in got
    for key in ("input_ids", "attention_mask", "labels", "pixel_values", "num_images"):
        assert torch.equal(got[key], want[key]), key
    assert got["input_ids"].shape == (3, 16)


@pytest.mark.slow
def test_flex_attention_packed_logits_equal_per_sample_logits() -> None:
    """`model.attn_implementation: flex_attention`: transformers builds a document block mask from the packed
    position_ids, so masked-out blocks are skipped; on CPU flex runs forward only (no backward), compiled
    once. Tolerance: 1e-5 absolute on fp32 logits."""
    model = tiny_llava("flex_attention").eval()
    items = [sample(n, k, seed=10 * i + k, sid=str(i)) for i, (n, k) in enumerate(CASES["multi_image"])]
    batch = PackingCollator(pad_token_id=0)([items])
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k not in ("labels", *BATCH_ONLY_KEYS)}).logits
        start = 0
        for it in items:
            n = len(it["input_ids"])
            alone = model(input_ids=it["input_ids"][None], pixel_values=it.get("pixel_values")).logits
            torch.testing.assert_close(packed[0, start : start + n], alone[0], atol=1e-5, rtol=0)
            start += n


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_gradients_equal_per_sample_gradients(attn: str) -> None:
    """The summed loss of a packed row and of its samples run one by one give the same gradient on every
    parameter (the isolation holds backward too). Tolerance: 1e-5 absolute, fp32."""
    items = [sample(n, k, seed=10 * i + k, sid=str(i)) for i, (n, k) in enumerate(CASES["multi_image"])]
    batch = PackingCollator(pad_token_id=0)([items])
    packed_model, alone_model = tiny_llava(attn), tiny_llava(attn)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", *BATCH_ONLY_KEYS)}
    logits = packed_model(**inputs).logits
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum", ignore_index=-100)
    loss_fn(logits[0, :-1], batch["labels"][0, 1:]).backward()
    for it in items:
        out = alone_model(input_ids=it["input_ids"][None], pixel_values=it.get("pixel_values")).logits
        loss_fn(out[0, :-1], it["labels"][1:]).backward()
    for (name, a), (_, b) in zip(packed_model.named_parameters(), alone_model.named_parameters(), strict=True):
        if a.grad is None and b.grad is None:
            continue
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=0, msg=name)
