"""Multimodal sequence packing: best-fit rows by exact length, a row sampler for HF Trainer, and the packing collator.

How it plugs into HF Trainer (one global order, dealt to ranks by accelerate):

- `PackedRowSampler` yields one tuple of sample indices per packed row, in an order that depends
  only on (seed, epoch). HF/accelerate cut the sampler's output into micro-batches of
  `per_device_train_batch_size` ROWS and deal micro-batch k to rank k % world_size, so every rank
  gets whole rows and resume (which skips whole micro-batches of the same order) replays exactly.
- `PackedRows(dataset)` wraps the sample dataset so that `PackedRows[(i, j, k)]` returns the list
  of those samples; the DataLoader then hands the collator a list of rows (lists of items).
- `PackingCollator` concatenates each row's samples: position_ids restart at 0 per sample, the
  label at each sample's first position is -100 (labels are shifted inside the loss, so that
  position would otherwise train "predict sample k+1's first token from sample k's last"), no
  attention_mask (transformers then builds a block-diagonal causal mask from position_ids for
  sdpa/eager/flex, or varlen for flash attention), `use_cache=False` (with a cache transformers
  does NOT look for packed sequences, and `use_cache` defaults to True in training), all the
  row's images in `pixel_values` in order, and `real_mask` marking the samples' tokens (not the pad
  tail) for the throughput statistics only.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from llava_train.data.collator import PaddingCollator
from llava_train.utils.modules import IGNORE_INDEX


def best_fit_decreasing(indices: Sequence[int], lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Pack `indices` into rows of at most `capacity` tokens: longest first, each into the fullest row it fits.

    Ties (equal lengths, equal free space) are broken by position, so the result is a pure function
    of the input order. Raises ValueError for a sample longer than `capacity`.
    """
    order = sorted(indices, key=lambda i: -abs(lengths[i]))  # stable: equal lengths keep the input order
    rows: list[list[int]] = []
    # (free tokens, row number) sorted ascending: the first entry with free >= n is the best fit.
    free: list[tuple[int, int]] = []
    for i in order:
        n = abs(lengths[i])
        if n > capacity:
            raise ValueError(f"sample {i} has {n} tokens, more than packing_length={capacity}")
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            rows.append([i])
            bisect.insort(free, (capacity - n, len(rows) - 1))
            continue
        room, row = free.pop(k)
        rows[row].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, row))
    return rows


def packed_rows(
    lengths: Sequence[int], capacity: int, seed: int, epoch: int = 0, buffer_size: int = 4096
) -> list[tuple[int, ...]]:
    """One epoch's packed rows: shuffle, best-fit-decreasing inside buffers of `buffer_size` samples, shuffle rows.

    Deterministic in (lengths, capacity, seed, epoch, buffer_size); every sample appears in exactly
    one row. The buffer bounds how far packing moves a sample from its shuffled position (and the
    work per buffer); the final row shuffle keeps long-sample rows from clustering at buffer starts.
    """
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    rows: list[list[int]] = []
    for start in range(0, len(perm), buffer_size):
        rows += best_fit_decreasing(perm[start : start + buffer_size], lengths, capacity)
    order = torch.randperm(len(rows), generator=g).tolist()
    return [tuple(rows[r]) for r in order]


class PackedRowSampler(Sampler[tuple[int, ...]]):
    """Yields one tuple of sample indices per packed row; order depends only on (seed, epoch).

    lengths: exact token counts per sample (signed modality lengths are accepted; the sign is ignored).
    capacity: `data.packing_length` (tokens per row).
    Use with `PackedRows(dataset)` as the train dataset and `per_device_train_batch_size` = rows per
    micro-batch. HF/accelerate call `set_epoch` each epoch. `len()` is the current epoch's row
    count (it can differ by a few rows between epochs).
    """

    def __init__(self, lengths: Sequence[int], capacity: int, seed: int = 0, buffer_size: int = 4096) -> None:
        if capacity <= 0:
            raise ValueError(f"packing_length must be > 0, got {capacity}")
        self.lengths = [abs(int(n)) for n in lengths]
        self.capacity = capacity
        self.seed = seed
        self.buffer_size = buffer_size
        self.epoch = 0
        self._cache: tuple[int, list[tuple[int, ...]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Called by HF/accelerate at each epoch so every epoch has its own (reproducible) rows."""
        self.epoch = epoch

    def rows(self) -> list[tuple[int, ...]]:
        """The current epoch's rows (computed once per epoch)."""
        if self._cache is None or self._cache[0] != self.epoch:
            self._cache = (
                self.epoch,
                packed_rows(self.lengths, self.capacity, self.seed, self.epoch, self.buffer_size),
            )
        return self._cache[1]

    def __len__(self) -> int:
        return len(self.rows())

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        yield from self.rows()


class PackedRows(Dataset):
    """Wraps a sample dataset: `rows[(i, j)]` is `[dataset[i], dataset[j]]`; `rows[i]` is `dataset[i]`.

    `len()` is the number of samples, so HF's "num examples" stays the sample count; other
    attributes (lengths, modality_lengths, ...) are forwarded to the wrapped dataset.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int | Sequence[int]) -> Any:
        if isinstance(index, (tuple, list)):
            return [self.dataset[int(i)] for i in index]
        return self.dataset[int(index)]

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not yet set (unpickling): avoid infinite recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


class PackingCollator(PaddingCollator):
    """Collate packed rows (each a list of dataset items) into one batch.

    Output: input_ids [R, L] (L = the longest row, rounded up to `pad_to_multiple_of`; shorter rows
    end in a padding block of `pad_token_id` whose position_ids also restart at 0, so it is its own
    isolated block), labels [R, L] (-100 at each sample's first position and on padding),
    position_ids [R, L] restarting at 0 per sample, real_mask [R, L] (True on samples' tokens, False on
    the padding tail; statistics only, never a model input), `use_cache=False`, no attention_mask,
    pixel_values [N, 3, H, W] = every image of every row in row order, num_images [number of samples],
    ids (per sample, in row order), and `row_lengths` is not emitted (lengths follow from position_ids).
    A batch of single items (dicts, not rows) is padded as `PaddingCollator` pads it, one sample per
    row with an attention mask: that is what the evaluation loader hands over (eval is never packed).
    `pad_to_multiple_of=packing_length` makes every row the same shape (the fastest setting on GPU:
    one attention plan for the whole run).
    """

    def __call__(self, rows: list[Any]) -> dict[str, Any]:
        if not rows:
            raise ValueError("empty batch")
        if isinstance(rows[0], dict):
            return super().__call__(rows)
        rows = [list(r) for r in rows]
        batch = self.finish(self.pack_tokens(rows), [it for r in rows for it in r])
        batch["use_cache"] = False
        return batch

    def pack_tokens(self, rows: list[list[dict[str, Any]]]) -> dict[str, Any]:
        """input_ids / labels / position_ids / real_mask of packed rows (each a list of items)."""
        row_lengths = [sum(len(it["input_ids"]) for it in r) for r in rows]
        length = self.padded_length(max(row_lengths))
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)  # [R, L]
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)  # [R, L]
        position_ids = torch.zeros((len(rows), length), dtype=torch.long)  # [R, L]
        real_mask = torch.zeros((len(rows), length), dtype=torch.bool)  # [R, L]
        for b, row in enumerate(rows):
            start = 0
            for it in row:
                n = len(it["input_ids"])
                input_ids[b, start : start + n] = torch.as_tensor(it["input_ids"], dtype=torch.long)
                labels[b, start + 1 : start + n] = torch.as_tensor(it["labels"], dtype=torch.long)[1:]
                position_ids[b, start : start + n] = torch.arange(n)
                start += n
            real_mask[b, :start] = True
            # Padding tail: positions restart at 0 so it forms its own block and no real token attends to it.
            position_ids[b, start:] = torch.arange(length - start)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "real_mask": real_mask}
