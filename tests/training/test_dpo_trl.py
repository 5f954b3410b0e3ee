"""Differential test: our DPO per-pair log-probs and losses equal TRL's `DPOTrainer` on the same model and pairs.

TRL (requirements-lock: trl==1.16.0) computes its own per-token log-probs through its fused LM head
(`model(..., labels=, fused_lm_head=True)`) and its loss in `DPOTrainer._compute_loss`; ours run lm_head on the
trained positions only (`training.dpo.response_logps`) and `training.dpo.preference_loss`. Both run fp32 on CPU
on one batch laid out as `data.preference.PairCollator` makes it ([chosen; rejected], an image per sequence,
prompt tokens -100), which is TRL's own layout (its `completion_mask` = our trained labels). Tolerance: 1e-4
absolute on sequence log-probs (sums of ~10 fp32 token log-probs computed in tiles vs. whole; measured ~2e-6)
and 1e-5 relative on the losses.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from llava_train.config import DpoConfig
from llava_train.data.preference import PairCollator
from llava_train.training.dpo import preference_loss, response_logps
from tiny_models import sample, tiny_llava

trl = pytest.importorskip("trl")


def pair_batch() -> dict[str, Any]:
    """Three pairs (one image, text-only, two images); each rejected reply shares its chosen's prompt."""
    items = []
    for k, n_images in enumerate([1, 0, 2]):
        chosen = sample(12, n_images, seed=10 + k, sid=f"r{k}")
        other = sample(10, n_images, seed=20 + k, sid=f"r{k}")
        prompt = int((chosen["labels"] == -100).sum())
        reply = other["input_ids"][-4:]
        chosen["rejected_input_ids"] = torch.cat([chosen["input_ids"][:prompt], reply])
        chosen["rejected_labels"] = torch.cat([torch.full((prompt,), -100), reply])
        chosen["index"] = k
        items.append(chosen)
    return PairCollator(0)(items)


@pytest.mark.parametrize("loss", ["sigmoid", "hinge", "ipo", "sigmoid_sft"])
def test_logps_and_loss_equal_trl(loss: str, llama_tokenizer: Any, tmp_path: Any) -> None:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    policy, ref = tiny_llava("eager", seed=0), tiny_llava("eager", seed=1)  # a reference unlike the policy
    batch = pair_batch()
    labels = batch["labels"]
    kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    types = ["sigmoid", "sft"] if loss == "sigmoid_sft" else [loss]
    args = DPOConfig(
        output_dir=str(tmp_path),
        beta=0.1,
        loss_type=types,
        loss_weights=[1.0, 1.0] if len(types) == 2 else None,
        report_to=[],
        use_cpu=True,
        bf16=False,  # TRL's default autocasts the reference to bf16 on CPU
    )
    dummy = Dataset.from_list([{"prompt": "hello", "chosen": " yes", "rejected": " no"}])
    theirs = DPOTrainer(
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(ref),
        args=args,
        train_dataset=dummy,
        processing_class=llama_tokenizer,
    )
    trl_inputs = {**kwargs, "completion_mask": (labels != -100).long()}
    trl_loss = theirs._compute_loss(theirs.model, trl_inputs, False)
    with torch.no_grad():
        trl_logps = theirs.model(**kwargs, labels=labels, fused_lm_head=True).log_probs.sum(1)  # [2B]
        trl_ref = theirs.ref_model(**kwargs, labels=labels, fused_lm_head=True).log_probs.sum(1)
        logps, tokens = response_logps(policy, kwargs, labels)
        ref_logps = response_logps(ref, kwargs, labels)[0]
        # The same sums from the full logits (every position through lm_head): the kept positions are exact.
        full = policy(**kwargs).logits[:, :-1].float().log_softmax(-1)  # [2B, L-1, V]
        targets = labels[:, 1:]
        per_token = full.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (targets != -100)
        assert torch.allclose(per_token.sum(-1), logps, atol=1e-5, rtol=0)
    ours, metrics = preference_loss(logps, ref_logps, tokens, DpoConfig(beta=0.1, loss=loss))
    assert torch.allclose(logps, trl_logps, atol=1e-4, rtol=0), (logps, trl_logps)
    assert torch.allclose(ref_logps, trl_ref, atol=1e-4, rtol=0), (ref_logps, trl_ref)
    assert float(ours) == pytest.approx(float(trl_loss), rel=1e-5)
    margins = theirs._metrics["train"]["rewards/margins"][-1]
    assert metrics["rewards/margins"].mean().item() == pytest.approx(margins, abs=1e-5)
    accuracy = theirs._metrics["train"]["rewards/accuracies"][-1]
    assert metrics["rewards/accuracies"].mean().item() == pytest.approx(accuracy)
