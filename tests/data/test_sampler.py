"""LLaVA's modality/length-grouped sampler: single-modality optimizer steps, deterministic, complete."""

from __future__ import annotations

import random

import pytest

from llava_train.data.sampler import ModalityLengthGroupedSampler


def _lengths(n_img: int, n_txt: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    lengths = [rng.randint(600, 900) for _ in range(n_img)] + [-rng.randint(50, 700) for _ in range(n_txt)]
    rng.shuffle(lengths)
    return lengths


@pytest.mark.parametrize(("world", "accum", "bs"), [(1, 1, 4), (2, 1, 4), (2, 3, 2), (4, 2, 3)])
def test_every_optimizer_step_is_single_modality(world: int, accum: int, bs: int) -> None:
    lengths = _lengths(200, 37)
    sampler = ModalityLengthGroupedSampler(lengths, per_device_batch=bs, world_size=world, grad_accum=accum, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(len(lengths))), "every sample exactly once"
    step = bs * world * accum
    full_steps = [order[i : i + step] for i in range(0, len(order), step)]
    mixed = [s for s in full_steps if len({lengths[i] > 0 for i in s}) > 1]
    # Only the final step (the two partial leftovers combined) may mix modalities.
    assert len(mixed) <= 1 and (not mixed or mixed[0] == full_steps[-1])
    assert sum(len(s) == step for s in full_steps) >= len(lengths) // step - 1


def test_micro_batches_of_a_step_are_length_sorted_and_balanced() -> None:
    lengths = [700 + i for i in range(64)]
    sampler = ModalityLengthGroupedSampler(lengths, per_device_batch=4, world_size=2, grad_accum=1, seed=0)
    order = list(sampler)
    for start in range(0, 64, 8):
        step = order[start : start + 8]
        rank0, rank1 = step[:4], step[4:]
        totals = sum(lengths[i] for i in rank0), sum(lengths[i] for i in rank1)
        assert abs(totals[0] - totals[1]) <= max(lengths) - min(lengths)


def test_deterministic_per_seed_and_epoch() -> None:
    lengths = _lengths(100, 20)
    a = ModalityLengthGroupedSampler(lengths, 4, 2, 1, seed=7)
    b = ModalityLengthGroupedSampler(lengths, 4, 2, 1, seed=7)
    assert list(a) == list(b)
    assert list(a) != list(ModalityLengthGroupedSampler(lengths, 4, 2, 1, seed=8))
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == sorted(first)
    b.set_epoch(1)
    assert list(a) == list(b)


def test_rejects_zero_length() -> None:
    with pytest.raises(ValueError, match="non-zero"):
        ModalityLengthGroupedSampler([5, 0, -3], 1)
