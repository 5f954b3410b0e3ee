"""Collators: right padding with attention mask and -100 labels, images concatenated (none for text-only)."""

from __future__ import annotations

from typing import Any

import torch

from llava_train.utils.modules import IGNORE_INDEX

# Keys our collators add for bookkeeping (sample ids, image counts, which positions are real tokens of a
# packed row): read by the trainer's statistics and error messages, never given to the model.
BATCH_ONLY_KEYS = ("ids", "sources", "num_images", "num_videos", "real_mask", "indices")


class PaddingCollator:
    """Pad a list of dataset items into a batch.

    Output: input_ids LongTensor [B, L] (right-padded with `pad_token_id`), attention_mask [B, L],
    labels [B, L] (padding = -100), pixel_values [N, 3, H, W] = the batch's images in order (key
    absent when the batch has none: text-only samples never add a zero image; anyres archs: every
    image's crops, [sum of crops, 3, S, S], with image_sizes LongTensor [N, 2]), pixel_values_videos
    [V, F, 3, S, S] (OneVision videos), num_images / num_videos LongTensor [B], ids list, and with
    `batch_num_images` (OneVision) the model input `batch_num_images` = images per sample (it
    tells one-image samples, which get anyres grids, from multi-image ones, which get one crop per
    image). L is the longest sample, rounded up to `pad_to_multiple_of`.
    A batch with no trained token raises ValueError naming the sample ids.

    Subclasses (the packing collator) build their own token tensors and share `finish` (the images,
    bookkeeping keys and the no-trained-token check).
    """

    def __init__(
        self, pad_token_id: int, pad_to_multiple_of: int | None = None, batch_num_images: bool = False
    ) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.batch_num_images = batch_num_images

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        if not items:
            raise ValueError("empty batch")
        return self.finish(self.collate_tokens(items), items)

    def finish(self, batch: dict[str, Any], items: list[dict[str, Any]]) -> dict[str, Any]:
        """Add the items' images (in order), `num_images` and `ids` to token tensors; check something trains."""
        if not bool((batch["labels"] != IGNORE_INDEX).any()):
            ids = [it.get("id") for it in items]
            raise ValueError(f"batch has no trained token (every label is {IGNORE_INDEX}); sample ids: {ids}")
        images = [it["pixel_values"] for it in items if it.get("pixel_values") is not None]
        if images:
            batch["pixel_values"] = torch.cat(images, dim=0)  # [N or sum of crops, 3, H, W]
            sizes = [it["image_sizes"] for it in items if it.get("image_sizes") is not None]
            if sizes:
                batch["image_sizes"] = torch.cat(sizes, dim=0)  # [N, 2]
        videos = [it["pixel_values_videos"] for it in items if it.get("pixel_values_videos") is not None]
        if videos:
            batch["pixel_values_videos"] = torch.cat(videos, dim=0)  # [V, F, 3, S, S]
        num_images = [int(it.get("num_images", 0)) for it in items]
        batch["num_images"] = torch.tensor(num_images, dtype=torch.long)
        batch["num_videos"] = torch.tensor([int(it.get("num_videos", 0)) for it in items], dtype=torch.long)
        if self.batch_num_images and images:
            # Per sample, not per packed row: transformers only reads it as "1 image -> anyres grid".
            batch["batch_num_images"] = torch.tensor(num_images, dtype=torch.long)
        batch["ids"] = [it.get("id") for it in items]
        batch["sources"] = [f"{it['source']} row {it['row']}" if "source" in it else None for it in items]
        return batch

    def padded_length(self, longest: int) -> int:
        """`longest` rounded up to a multiple of `pad_to_multiple_of`."""
        m = self.pad_to_multiple_of
        return longest if not m else -(-longest // m) * m

    def collate_tokens(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """input_ids / attention_mask / labels, right-padded to a common length."""
        length = self.padded_length(max(len(it["input_ids"]) for it in items))
        input_ids = torch.full((len(items), length), self.pad_token_id, dtype=torch.long)  # [B, L]
        labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)  # [B, L]
        attention_mask = torch.zeros((len(items), length), dtype=torch.long)  # [B, L]
        for b, it in enumerate(items):
            n = len(it["input_ids"])
            input_ids[b, :n] = torch.as_tensor(it["input_ids"], dtype=torch.long)
            labels[b, :n] = torch.as_tensor(it["labels"], dtype=torch.long)
            attention_mask[b, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
