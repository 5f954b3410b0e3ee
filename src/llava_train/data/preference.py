"""Preference pairs (stage dpo): a row's chosen and rejected samples, labelled on the final reply only, and the
collator that keeps a pair in one micro-batch.

Each side is tokenized by `data.tokenize` exactly as a finetune sample (one whole-string tokenization with
offsets); DPO then trains only the final reply (+ its end marker): the trained span of every earlier reply of a
multi-turn prompt is set back to -100. Pairs are never truncated: a side over `model_max_length` makes the row
`too_long` (a cut response would change its log-probability; a cut image would break the sample).
"""

from __future__ import annotations

from typing import Any

import torch

from llava_train.data.collator import PaddingCollator
from llava_train.data.errors import BadSample
from llava_train.data.tokenize import TokenizedSample
from llava_train.utils.modules import IGNORE_INDEX

SIDES = ("chosen", "rejected")


def final_reply_only(sample: TokenizedSample) -> TokenizedSample:
    """The sample with only its last trained span (the final reply and its end marker) left trained."""
    labels = list(sample.labels)
    end = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX) + 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    labels[:start] = [IGNORE_INDEX] * start
    return TokenizedSample(sample.input_ids, labels, sample.num_images, False, sample.num_videos)


def check_pair(samples: list[TokenizedSample], max_length: int | None) -> None:
    """BadSample(too_long) when a side exceeds `max_length` (pairs are never truncated), naming the side."""
    if max_length is None:
        return
    for side, sample in zip(SIDES, samples):
        if len(sample.input_ids) > max_length:
            raise BadSample(
                "too_long",
                f"{side}: {len(sample.input_ids)} tokens > model_max_length {max_length} (preference pairs are never "
                "truncated: raise data.model_max_length or drop the row)",
            )


class PairCollator(PaddingCollator):
    """Pad preference items into one batch of 2B sequences: [chosen_0 .. chosen_B-1, rejected_0 .. rejected_B-1].

    A dataset item is a whole pair (`rejected_input_ids` / `rejected_labels` beside the chosen `input_ids` /
    `labels`), so a pair is never split across micro-batches or ranks. Each image is given to both of its
    sequences (pixel_values [2N, 3, H, W]: the chosen images, then the same images for the rejected side), as
    TRL's DPOTrainer lays them out. `indices` [B]: the dataset index of each pair (the precomputed reference).
    """

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        if not items:
            raise ValueError("empty batch")
        rejected = [{**it, "input_ids": it["rejected_input_ids"], "labels": it["rejected_labels"]} for it in items]
        sequences = list(items) + rejected
        batch = self.finish(self.collate_tokens(sequences), sequences)
        batch["indices"] = torch.tensor([int(it.get("index", -1)) for it in items], dtype=torch.long)  # [B]
        return batch
