"""DPO in our own trainer: the preference loss, the three references and the reward metrics (stage dpo).

Engine: the loss lives in `LLaVATrainer` (this subclass), not in TRL's `DPOTrainer`. TRL tokenizes prompt and
completion itself (its own prompt/completion split and truncation) and brings its own collator, sampler and
saving; ours already give exact labels, whole pairs per micro-batch, the rank-safe vision keepalive, fp32 masters,
run safety and HF-native checkpoints, so DPO is one `compute_loss` on top of them. TRL's formulas are followed
term for term (sigmoid / hinge / ipo / sft as in TRL 1.16's `_compute_loss`), and a differential test checks the
per-pair log-probs and loss against TRL's own code on the same model and pairs (tests/training/test_dpo.py).

A batch (`data.preference.PairCollator`) is [chosen_0..B-1, rejected_0..B-1]; a sequence's log-prob is the sum of
its trained tokens' log-probs (the final reply + end marker: the labels `data.tokenize` made), with lm_head run on
those positions only. The reference
(`dpo.reference`): `frozen` = a frozen copy of the model as prepared (so at step 0 it equals the policy bit for bit);
`adapter` = the same model with its LoRA adapters disabled; `precomputed` = every pair's reference log-probs
computed by the starting model at the first step (all ranks in step, same module calls) and stored in the run
folder, which a resumed run reads back.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llava_train.config import DpoConfig, RunConfig
from llava_train.config_io import ConfigError
from llava_train.run_files import REFERENCE_LOGPS_FILENAME
from llava_train.training.trainer import LLaVATrainer, model_inputs
from llava_train.utils.logging import get_logger
from llava_train.utils.modules import IGNORE_INDEX, unwrap

log = get_logger(__name__)

LN2 = math.log(2.0)


def response_logps(
    model: nn.Module, kwargs: dict[str, Any], labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the trained tokens' log-probs [N], trained tokens [N]) of each sequence, in fp32.

    labels [N, L] are -100 where untrained. lm_head runs only on the positions that predict a trained token
    (transformers' boolean `logits_to_keep`: logits [T, V], T = trained tokens of the batch), never on the image
    and prompt positions; it is still one lm_head call per forward on every rank, whatever T (ZeRO-3 safe).
    """
    n, length = labels.shape
    trained = labels[:, 1:] != IGNORE_INDEX  # [N, L-1]: position t predicts label t + 1
    keep = torch.zeros_like(labels, dtype=torch.bool)  # [N, L]
    keep[:, :-1] = trained
    logits = model(**kwargs, use_cache=False, logits_to_keep=keep).logits  # [T, V]
    targets = labels[:, 1:][trained]  # [T], row-major as the kept logits
    token_logps = logits.float().log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [T]
    rows = torch.arange(n, device=labels.device).unsqueeze(1).expand(n, length - 1)[trained]  # [T]
    logps = torch.zeros(n, dtype=torch.float32, device=labels.device).index_add(0, rows, token_logps)
    return logps, trained.sum(-1)


def preference_loss(
    logps: torch.Tensor, ref_logps: torch.Tensor, tokens: torch.Tensor, cfg: DpoConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, per-pair metrics) of a [chosen; rejected] batch: logps / ref_logps / tokens (trained tokens) [2B].

    sigmoid: -log sigmoid(beta * delta) with delta = (pi_c - ref_c) - (pi_r - ref_r); hinge: relu(1 - beta * delta);
    ipo: (delta per reply token - 1 / (2 beta))^2; sigmoid_sft adds `sft_weight` x the chosen tokens' mean NLL.
    Metrics (detached, [B]): rewards chosen / rejected (beta x log-ratio), margins, accuracies, logps.
    """
    chosen, rejected = logps.chunk(2)
    ref_chosen, ref_rejected = ref_logps.chunk(2)
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected  # [B]
    delta = chosen_ratio - rejected_ratio
    if cfg.loss in ("sigmoid", "sigmoid_sft"):
        losses = -F.logsigmoid(cfg.beta * delta)
    elif cfg.loss == "hinge":
        losses = torch.relu(1 - cfg.beta * delta)
    elif cfg.loss == "ipo":
        chosen_tokens, rejected_tokens = tokens.chunk(2)
        per_token_delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (per_token_delta - 1 / (2 * cfg.beta)) ** 2
    else:
        raise KeyError(f"unknown dpo.loss {cfg.loss!r}")
    loss = losses.mean()
    if cfg.loss == "sigmoid_sft":  # the mean NLL over every chosen token of the batch (TRL's `sft` term)
        loss = loss + cfg.sft_weight * (-chosen.sum() / tokens.chunk(2)[0].sum().clamp(min=1))
    rewards_chosen, rewards_rejected = (cfg.beta * chosen_ratio).detach(), (cfg.beta * rejected_ratio).detach()
    metrics = {
        "rewards/chosen": rewards_chosen,
        "rewards/rejected": rewards_rejected,
        "rewards/margins": rewards_chosen - rewards_rejected,
        "rewards/accuracies": (rewards_chosen > rewards_rejected).float(),
        "logps/chosen": chosen.detach(),
        "logps/rejected": rejected.detach(),
    }
    return loss, metrics


class PreferenceTrainer(LLaVATrainer):
    """LLaVATrainer whose loss is DPO's on pair batches; `dpo` is the run's DpoConfig, `ref_model` the frozen copy
    (reference `frozen`), `reference_file` where precomputed reference log-probs are kept."""

    def __init__(
        self, *args: Any, dpo: DpoConfig, ref_model: nn.Module | None = None, reference_file: str = "", **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.dpo = dpo
        self.ref_model = ref_model
        self.reference_file = reference_file
        self.reference_table: dict[str, torch.Tensor] = {}
        self._indices: torch.Tensor | None = None
        self._dpo_metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        # The loss is the mean over this micro-batch's pairs: HF divides it by the accumulation steps itself.
        self.loss_is_scaled_for_ga = False

    # -- steps -------------------------------------------------------------------------------

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        self._indices = inputs.get("indices")
        return super().training_step(model, inputs, num_items_in_batch)

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys=None):
        self._indices = inputs.get("indices")
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """DPO's loss on a [chosen; rejected] batch; per-pair metrics are gathered from every rank."""
        labels = inputs["labels"]  # [2B, L]
        kwargs = {k: v for k, v in model_inputs(inputs).items() if k != "labels"}
        logps, tokens = response_logps(model, kwargs, labels)  # [2B]
        ref_logps = self.reference_logps(model, kwargs, labels)  # [2B]
        loss, metrics = preference_loss(logps, ref_logps.to(logps), tokens, self.dpo)
        mode = "train" if model.training else "eval"
        self.record(mode, metrics)
        if self.guard is not None and not return_outputs and model.training:
            self.guard.observe_loss(loss)
        return (loss, {"margins": metrics["rewards/margins"]}) if return_outputs else loss

    # -- reference ---------------------------------------------------------------------------

    def reference_logps(self, model: nn.Module, kwargs: dict[str, Any], labels: torch.Tensor) -> torch.Tensor:
        """The reference log-prob of each sequence of the batch [2B] (no gradient)."""
        mode = self.dpo.reference
        if mode == "precomputed":
            split = "train" if model.training else "eval"
            if not self.reference_table:
                self.reference_table = self.load_or_precompute(model)
            table = self.reference_table[split]  # [items, 2]
            idx = self._indices
            if idx is None or bool((idx < 0).any()):
                raise RuntimeError("dpo.reference: precomputed needs the items' dataset indices in the batch")
            pairs = table[idx.cpu()]  # [B, 2]
            return torch.cat([pairs[:, 0], pairs[:, 1]]).to(labels.device)
        with torch.no_grad():
            if mode == "adapter":
                with self.accelerator.unwrap_model(model).disable_adapter():  # the PeftModel under any engine
                    return response_logps(model, kwargs, labels)[0]
            ref = self.ref_model
            if next(ref.parameters()).device != labels.device:
                ref.to(labels.device)
            # The frozen copy is outside DeepSpeed/DDP (no collectives: it runs exactly its batch) and outside
            # accelerate's prepared forward, so it gets the policy's autocast here.
            with self.accelerator.autocast():
                return response_logps(ref, kwargs, labels)[0]

    def load_or_precompute(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The reference log-probs of every train (and eval) item: read from the run folder, or, at step 0,
        computed now by the starting model on every rank in step and written there (rank 0)."""
        path = Path(self.reference_file)
        if path.exists():
            from safetensors.torch import load_file

            table = load_file(str(path))
            if len(table["train"]) != len(self.train_dataset):
                raise RuntimeError(f"{path} holds {len(table['train'])} pairs, the data {len(self.train_dataset)}")
            log.info("reference log-probs read from %s", path)
            return table
        if self.state.global_step > 0:
            raise RuntimeError(
                f"dpo.reference: precomputed, resuming at step {self.state.global_step} without {path}: the "
                "reference of the starting model is lost (start the run again)"
            )
        table = {"train": self.precompute(model, self.train_dataset)}
        if self.eval_dataset is not None:
            table["eval"] = self.precompute(model, self.eval_dataset)
        if self.args.should_save:
            from safetensors.torch import save_file

            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in table.items()}, str(path))
        log.info("reference log-probs of %d pairs precomputed (%s)", len(table["train"]), path)
        return table

    def precompute(self, model: nn.Module, dataset: Any) -> torch.Tensor:
        """[items, 2] (chosen, rejected) reference log-probs; each rank takes every world-th item, padded so every
        rank makes the same number of forwards (the collective rule), then the ranks' rows are gathered."""
        world, rank = self.args.world_size, self.args.process_index
        per_rank = -(-len(dataset) // world)
        mine = [(rank + world * k) % len(dataset) for k in range(per_rank)]
        size = self.args.per_device_train_batch_size
        was_training = model.training
        model.eval()
        rows = []
        try:
            with torch.no_grad():
                for start in range(0, len(mine), size):
                    batch = self.data_collator([dataset[i] for i in mine[start : start + size]])
                    batch = self._prepare_inputs(batch)
                    self._missing_vision_calls = self.missing_vision_calls(batch)
                    kwargs = {k: v for k, v in model_inputs(batch).items() if k != "labels"}
                    with self.compute_loss_context_manager():
                        pair = response_logps(model, kwargs, batch["labels"])[0].chunk(2)
                    rows.append(torch.stack(pair, dim=1))  # [b, 2]
        finally:
            self._missing_vision_calls = 0
            model.train(was_training)
        local = torch.cat(rows)  # [per_rank, 2]
        index = torch.tensor(mine, dtype=torch.long, device=local.device)
        if world > 1:
            local, index = self.accelerator.gather(local), self.accelerator.gather(index)
        table = torch.zeros(len(dataset), 2, dtype=torch.float32)
        table[index.cpu()] = local.cpu()
        return table

    # -- metrics -----------------------------------------------------------------------------

    def record(self, mode: str, metrics: dict[str, torch.Tensor]) -> None:
        """Gather this micro-batch's per-pair metrics from every rank (every rank runs it: same collectives)."""
        keys = sorted(metrics)
        stacked = torch.stack([metrics[k].float() for k in keys])  # [M, B]
        # Sums and the pair count: the same shape on every rank whatever its pairs (all_gather needs it).
        sums = torch.cat([stacked.sum(-1), stacked.new_tensor([stacked.shape[-1]])])  # [M + 1]
        if self.args.world_size > 1:
            sums = self.accelerator.gather(sums).view(-1, len(keys) + 1).sum(0)
        for k, value in zip(keys, (sums[:-1] / sums[-1]).tolist()):
            self._dpo_metrics[mode][k].append(value)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the mean of each DPO metric since the last log (`eval_` prefixed for evaluations)."""
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        for key, values in self._dpo_metrics[mode].items():
            if values:
                logs[prefix + key] = sum(values) / len(values)
        self._dpo_metrics[mode].clear()
        super().log(logs, start_time)


def frozen_reference(model: nn.Module) -> nn.Module:
    """A frozen copy of the prepared model (same dtypes: at step 0 its log-probs are the policy's, bit for bit).
    Taken before the trainer exists: the copy must not carry the trainer's hooks."""
    ref = copy.deepcopy(unwrap(model)).eval()
    ref.requires_grad_(False)
    return ref


def preference_trainer_kwargs(cfg: RunConfig, model: nn.Module) -> dict[str, Any]:
    """PreferenceTrainer's own arguments for a dpo run: the config, the frozen copy (reference `frozen`), the file
    of precomputed reference log-probs. ConfigError for a frozen copy under ZeRO-3 (its parameters are partitioned:
    use `precomputed`, or `adapter` with LoRA)."""
    ref_model = None
    if cfg.dpo.reference == "frozen":
        from transformers.integrations import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            raise ConfigError(
                "dpo.reference: frozen cannot copy a ZeRO-3 partitioned model: use dpo.reference=precomputed "
                "(or adapter with LoRA)"
            )
        ref_model = frozen_reference(model)
    reference_file = str(Path(cfg.output_dir) / REFERENCE_LOGPS_FILENAME)
    log.info("DPO: loss %s, beta %g, reference %s", cfg.dpo.loss, cfg.dpo.beta, cfg.dpo.reference)
    return {"dpo": cfg.dpo, "ref_model": ref_model, "reference_file": reference_file}
