"""Exact batch statistics (padded and packed rows) and the throughput tracker's arithmetic with a fake clock."""

from __future__ import annotations

import pytest
import torch

from llava_train.training.flops import Block, FlopModel
from llava_train.training.metrics import ThroughputTracker, batch_stats

IMG = 9
I = -100  # noqa: E741


def padded_batch() -> dict[str, torch.Tensor]:
    # Row 0: 6 real tokens (2 image tokens), right-padded by 2. Row 1: 4 real tokens, left-padded by 4.
    return {
        "input_ids": torch.tensor([[1, IMG, IMG, 5, 6, 2, 0, 0], [0, 0, 0, 0, 1, 7, 8, 2]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1]]),
        "labels": torch.tensor([[I, I, I, I, 6, 2, I, I], [I, I, I, I, I, 7, 8, 2]]),
        "pixel_values": torch.zeros(1, 3, 4, 4),
    }


def packed_batch() -> dict[str, torch.Tensor]:
    # One row, three samples of lengths 3, 4, 1; no attention_mask.
    return {
        "input_ids": torch.tensor([[1, IMG, 5, 1, 6, 7, 2, 1]]),
        "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0]]),
        "labels": torch.tensor([[5, I, 5, I, 6, 7, 2, I]]),
        "pixel_values": torch.zeros(2, 3, 4, 4),
    }


def as_ints(stats: dict[str, torch.Tensor]) -> dict[str, int]:
    assert all(v.dim() == 0 for v in stats.values())
    return {k: int(v) for k, v in stats.items()}


def test_batch_stats_padded_rows_exact() -> None:
    assert as_ints(batch_stats(padded_batch(), IMG)) == {
        "real_tokens": 10,
        "padded_tokens": 16,
        "trained_tokens": 5,
        "samples": 2,
        "images": 1,
        "image_tokens": 2,
        "sum_sq_lengths": 6**2 + 4**2,
    }


def test_batch_stats_packed_rows_count_sample_starts() -> None:
    # labels[:, 0] never enters the shifted loss, so the leading 5 is not a trained token.
    assert as_ints(batch_stats(packed_batch(), IMG)) == {
        "real_tokens": 8,
        "padded_tokens": 8,
        "trained_tokens": 4,
        "samples": 3,
        "images": 2,
        "image_tokens": 1,
        "sum_sq_lengths": 3**2 + 4**2 + 1**2,
    }


def test_packed_rows_pad_tail_is_neither_tokens_nor_a_sample() -> None:
    """Rows [5 + 3 tokens] and [6 tokens (4 image + 2 text)] packed to a fixed length of 10: 14 of 20 positions
    are sample tokens (padding efficiency 0.7, not 1.0), 3 samples (the two pad tails are not samples)."""
    from llava_train.data.packing import PackingCollator
    from tiny_models import IMAGE_TOKEN, sample

    rows = [[sample(5, 0, seed=1, sid="a"), sample(3, 0, seed=2, sid="b")], [sample(2, 1, seed=3, sid="c")]]
    batch = PackingCollator(pad_token_id=0, pad_to_multiple_of=10)(rows)
    assert batch["real_mask"].sum(dim=1).tolist() == [8, 6]
    assert as_ints(batch_stats(batch, IMAGE_TOKEN)) == {
        "real_tokens": 14,
        "padded_tokens": 20,
        "trained_tokens": 4,
        "samples": 3,
        "images": 1,
        "image_tokens": 4,
        "sum_sq_lengths": 5**2 + 3**2 + 6**2,
    }
    clock = FakeClock()
    tracker = ThroughputTracker(None, None, image_token_id=IMAGE_TOKEN, clock=clock)
    tracker.start()
    tracker.observe(batch)
    clock.now += 2.0
    out = tracker.flush()
    assert (out["padding_efficiency"], out["samples_per_s"], out["tokens_per_s"]) == (0.7, 1.5, 7.0)


def test_batch_stats_text_only_without_labels() -> None:
    stats = as_ints(batch_stats({"input_ids": torch.tensor([[1, 2, 3]])}, IMG))
    assert stats["images"] == 0 and stats["trained_tokens"] == 0 and stats["real_tokens"] == 3


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_tracker_flush_arithmetic_and_interval_reset() -> None:
    clock = FakeClock()
    # FLOPs = 10 per real token, so MFU is easy to compute by hand.
    flops = FlopModel(blocks=(Block("lm", "text", 0, 5, False),), vision_tokens_per_image=1)
    tracker = ThroughputTracker(flops, peak_flops=100.0, image_token_id=IMG, clock=clock)
    assert tracker.flush() == {}
    tracker.start()
    tracker.observe(padded_batch())
    tracker.observe(packed_batch())
    clock.now += 4.0
    tracker.exclude(2.0)  # e.g. an evaluation pass: 2 s of wall time left out
    out = tracker.flush()
    assert out == {
        "tokens_per_s": 18 / 2.0,
        "trained_tokens_per_s": 9 / 2.0,
        "samples_per_s": 5 / 2.0,
        "images_per_s": 3 / 2.0,
        "padding_efficiency": 18 / 24,
        "image_token_fraction": 3 / 18,
        "mfu": 18 * 10 / (2.0 * 100.0),
    }
    clock.now += 1.0
    tracker.observe(packed_batch())
    clock.now += 1.0
    second = tracker.flush()
    assert second["tokens_per_s"] == 8 / 2.0 and second["padding_efficiency"] == 1.0


def test_tracker_without_peak_flops_has_no_mfu() -> None:
    clock = FakeClock()
    tracker = ThroughputTracker(None, None, image_token_id=IMG, clock=clock)
    tracker.observe(padded_batch())
    clock.now += 0.5
    out = tracker.flush()
    assert "mfu" not in out and "gpu_mem_peak_gb" not in out
    assert out["tokens_per_s"] == pytest.approx(20.0)


def test_tracker_requires_the_image_token_id() -> None:
    with pytest.raises(TypeError, match="image_token_id"):
        ThroughputTracker(None, None)  # type: ignore[call-arg]


def test_for_model_reads_image_token_flops_and_no_peak_on_cpu() -> None:
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        TrainingArguments,
    )

    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        ),
        text_config=LlamaConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        ),
        image_token_index=63,
    )
    model = LlavaForConditionalGeneration(cfg)
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    tracker = ThroughputTracker.for_model(model, TrainingArguments(output_dir="unused", use_cpu=True, report_to=[]))
    assert tracker.image_token_id == 63 and tracker.peak_flops is None
    assert tracker.flops == FlopModel.from_config(cfg, {"multi_modal_projector"})


def _flush_on_rank(rank: int, init_file: str, out_dir: str) -> None:
    import json

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        clock = FakeClock()
        tracker = ThroughputTracker(None, None, image_token_id=IMG, clock=clock)
        tracker.start()
        tracker.observe(padded_batch() if rank == 0 else packed_batch())
        clock.now += 2.0
        first = tracker.flush()
        if rank == 0:  # rank 1 observes nothing in the second interval: it must still join the all-reduce
            tracker.observe(padded_batch())
        clock.now += 2.0
        second = tracker.flush()
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump([first, second], f)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_tracker_counts_are_global_over_ranks(tmp_path) -> None:
    import json

    torch.multiprocessing.spawn(_flush_on_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    # Interval 1: 10 + 8 real tokens over 16 + 8 padded, in 2 s, on both ranks.
    assert rank0[0]["tokens_per_s"] == rank1[0]["tokens_per_s"] == 9.0
    assert rank0[0]["padding_efficiency"] == 18 / 24 and rank0[0]["samples_per_s"] == 5 / 2
    # Interval 2: only rank 0 had a batch; it reports the global count, rank 1 reports nothing.
    assert rank0[1]["tokens_per_s"] == 10 / 2 and rank1[1] == {}
