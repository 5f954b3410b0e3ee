"""Modality- and length-grouped training sampler (LLaVA's group_by_modality_length), with exact lengths.

The sampler yields one global order of sample indices. HF Trainer/accelerate then cut it into
per-device micro-batches and deal them to ranks in turn (batch k goes to rank k % world_size), so
a "megabatch" of `per_device_batch * world_size * grad_accum` consecutive indices is exactly one
optimizer step across all ranks. Keeping each megabatch single-modality therefore makes every
optimizer step single-modality, as in LLaVA.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


def _split_even(indices: list[int], lengths: Sequence[int], num_chunks: int) -> list[list[int]]:
    """Deal indices (longest first) into `num_chunks` chunks of equal count, balancing total length."""
    if len(indices) % num_chunks != 0:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    totals = [0] * num_chunks
    for idx in indices:
        open_chunks = [c for c in range(num_chunks) if len(chunks[c]) < per_chunk]
        best = min(open_chunks, key=lambda c: totals[c])
        chunks[best].append(idx)
        totals[best] += abs(lengths[idx])
    return chunks


def _grouped(
    indices: list[int], lengths: Sequence[int], megabatch: int, num_chunks: int, generator: torch.Generator
) -> list[list[int]]:
    """Shuffle, cut into megabatches, sort each by length (longest first), balance across chunks."""
    perm = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
    out = []
    for start in range(0, len(perm), megabatch):
        mb = sorted(perm[start : start + megabatch], key=lambda i: abs(lengths[i]), reverse=True)
        out.append([i for chunk in _split_even(mb, lengths, num_chunks) for i in chunk])
    return out


def modality_length_grouped_indices(
    lengths: Sequence[int],
    per_device_batch: int,
    world_size: int,
    grad_accum: int,
    generator: torch.Generator,
    group_by_modality: bool = True,
) -> list[int]:
    """One epoch's order. `lengths` are signed exact token counts: > 0 with image(s), < 0 text-only.

    Image and text-only samples form separate megabatches (one optimizer step each); megabatches
    are shuffled; the two partial leftovers are combined into the final step.
    """
    num_chunks = world_size * grad_accum
    megabatch = per_device_batch * num_chunks
    if not group_by_modality or all(n > 0 for n in lengths) or all(n < 0 for n in lengths):
        groups = _grouped(list(range(len(lengths))), lengths, megabatch, num_chunks, generator)
        order = torch.randperm(len(groups), generator=generator).tolist()
        return [i for g in order for i in groups[g]]
    mm = [i for i, n in enumerate(lengths) if n > 0]
    lang = [i for i, n in enumerate(lengths) if n < 0]
    mm_groups = _grouped(mm, lengths, megabatch, num_chunks, generator)
    lang_groups = _grouped(lang, lengths, megabatch, num_chunks, generator)
    leftover: list[int] = []
    if mm_groups and len(mm_groups[-1]) < megabatch:
        leftover += mm_groups.pop()
    if lang_groups and len(lang_groups[-1]) < megabatch:
        leftover += lang_groups.pop()
    full = mm_groups + lang_groups
    order = torch.randperm(len(full), generator=generator).tolist()
    result = [i for g in order for i in full[g]]
    if leftover:
        result += sorted(leftover, key=lambda i: abs(lengths[i]), reverse=True)
    return result


class ModalityLengthGroupedSampler(Sampler[int]):
    """Deterministic (seed, epoch) sampler whose optimizer steps each hold one modality.

    Resumable: the order depends only on the seed and the epoch HF sets through `set_epoch`, so
    Trainer's batch skipping on resume replays the same order.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        per_device_batch: int,
        world_size: int = 1,
        grad_accum: int = 1,
        seed: int = 0,
        group_by_modality: bool = True,
    ) -> None:
        if any(n == 0 for n in lengths):
            raise ValueError("sample lengths must be non-zero (signed: > 0 image, < 0 text-only)")
        self.lengths = list(lengths)
        self.per_device_batch = per_device_batch
        self.world_size = world_size
        self.grad_accum = grad_accum
        self.seed = seed
        self.group_by_modality = group_by_modality
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by HF/accelerate at each epoch so every epoch has its own (reproducible) order."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        yield from modality_length_grouped_indices(
            self.lengths, self.per_device_batch, self.world_size, self.grad_accum, g, self.group_by_modality
        )
