"""LLaVATrainer: HF Trainer with per-module learning rates, LLaVA's grouped sampler and rank-safe vision calls."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from llava_train.data.collator import BATCH_ONLY_KEYS
from llava_train.data.packing import PackedRowSampler
from llava_train.data.sampler import ModalityLengthGroupedSampler
from llava_train.model.freeze import LR_GROUPS, MODULE_GROUPS, group_of, is_peft_model
from llava_train.model.serving import save_serving_files
from llava_train.training.checkpoint import is_checkpoint_folder, save_checkpoint_weights
from llava_train.training.loss import trained_positions_loss
from llava_train.utils.logging import get_logger
from llava_train.utils.modules import unwrap

log = get_logger(__name__)


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """A collated batch without our bookkeeping keys (`BATCH_ONLY_KEYS`): what HF's steps give the model."""
    return {k: v for k, v in batch.items() if k not in BATCH_ONLY_KEYS}


class OptimizerGroupError(RuntimeError):
    """The optimizer does not carry the learning rates the config asked for."""


def build_param_groups(
    model: nn.Module, decay_names: set[str], weight_decay: float, base_lr: float, lr_overrides: dict[str, float | None]
) -> list[dict[str, Any]]:
    """{decay, no_decay} x {projector, vision_tower, language_model} groups of trainable parameters.

    Each group carries a `name` ("projector/decay", ...) so logging and the start-up check can
    find it; empty groups are dropped.
    """
    buckets: dict[str, list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr_group = MODULE_GROUPS[group_of(name)].lr_group
        kind = "decay" if name in decay_names else "no_decay"
        buckets.setdefault(f"{lr_group}/{kind}", []).append(param)
    groups = []
    for key in sorted(buckets):
        lr_group, kind = key.split("/")
        lr = lr_overrides.get(lr_group)
        groups.append(
            {
                "name": key,
                "params": buckets[key],
                "weight_decay": weight_decay if kind == "decay" else 0.0,
                "lr": base_lr if lr is None else lr,
            }
        )
    return groups


def expected_group_lrs(base_lr: float, lr_overrides: dict[str, float | None]) -> dict[str, float]:
    """The learning rate each optimizer group must carry, by lr-group name."""
    return {g: (base_lr if lr_overrides.get(g) is None else float(lr_overrides[g])) for g in LR_GROUPS}


def verify_group_lrs(optimizer: Any, expected: dict[str, float]) -> list[tuple[str, float]]:
    """Check every named param group's configured lr; raise OptimizerGroupError on any mismatch.

    Uses `initial_lr` when a scheduler has already scaled `lr` (warmup starts at 0). A DeepSpeed
    JSON with its own `optimizer` block builds groups without our names: that is an error too,
    because the per-module learning rates would be silently lost.
    """
    groups = getattr(optimizer, "param_groups", None)
    if groups is None:
        raise OptimizerGroupError("optimizer has no param_groups; cannot verify per-module learning rates")
    seen = []
    for g in groups:
        name = g.get("name")
        if name is None:
            raise OptimizerGroupError(
                "optimizer param group without a name: the optimizer was not built by LLaVATrainer "
                "(a DeepSpeed JSON `optimizer` block replaces our groups and drops per-module learning rates; "
                "remove the block and set train.optim / learning rates in the config instead)"
            )
        lr = float(g.get("initial_lr", g["lr"]))
        want = expected[name.split("/")[0]]
        if not math.isclose(lr, want, rel_tol=1e-6, abs_tol=0.0):
            raise OptimizerGroupError(f"optimizer group {name} has lr {lr:g}, config asks for {want:g}")
        seen.append((name, lr))
    return seen


class LLaVATrainer(Trainer):
    """HF Trainer for LLaVA stages.

    Extra arguments: `lr_overrides` ({"projector": lr, "vision_tower": lr}, None = main lr),
    `modality_lengths` (signed exact lengths from the dataset) with `group_by_modality_length`,
    `tracker` (throughput statistics fed with every micro-batch), `partial_checkpoints` (checkpoints
    hold only the trainable weights; `frozen_from` records where the frozen rest comes from),
    `packing_length` (train on packed rows of this many tokens: see data/packing.py),
    `loss_on_trained_only` / `loss_chunk_size` (lm_head + loss only on trained positions), `guard`
    (`training.safety.StepGuard`: non-finite steps and preemption, agreed by every rank each step) and
    `video_keepalive` (the run has OneVision videos: every micro-batch runs the tower's video pass too).
    """

    def __init__(
        self,
        *args: Any,
        lr_overrides: dict[str, float | None] | None = None,
        modality_lengths: Sequence[int] | None = None,
        group_by_modality_length: bool = False,
        tracker: Any = None,
        partial_checkpoints: bool = False,
        frozen_from: dict[str, Any] | None = None,
        packing_length: int | None = None,
        loss_on_trained_only: bool = False,
        loss_chunk_size: int = 4096,
        guard: Any = None,
        video_keepalive: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.partial_checkpoints = partial_checkpoints
        self.packing_length = packing_length
        self.loss_on_trained_only = loss_on_trained_only
        self.loss_chunk_size = loss_chunk_size
        self.frozen_from = dict(frozen_from or {})
        self.lr_overrides = dict(lr_overrides or {})
        self.modality_lengths = list(modality_lengths) if modality_lengths is not None else None
        self.group_by_modality_length = group_by_modality_length
        self.tracker = tracker
        self.guard = guard
        self.video_keepalive = video_keepalive
        self._missing_vision_calls: int | None = None  # set inside training/prediction steps only
        # Also with one process: then a text-only step gives the projector a zero gradient, as it must with
        # several (where it is all-reduced), so AdamW moves it the same way (momentum, weight decay) on
        # 1 and on N GPUs; without it one process would skip the projector (grad None) on text-only steps.
        _install_vision_keepalive(self)

    # -- optimizer ---------------------------------------------------------------------------

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Per-module learning rates: projector / vision tower / language model, decay / no decay."""
        opt_model = self.model if model is None else model
        if self.optimizer is None:
            decay = set(self.get_decay_parameter_names(opt_model))
            groups = build_param_groups(
                opt_model, decay, self.args.weight_decay, self.args.learning_rate, self.lr_overrides
            )
            if not groups:
                raise OptimizerGroupError("no trainable parameters: check the stage and LoRA settings")
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            optimizer_kwargs.pop("lr", None)  # each group carries its own lr
            self.optimizer = optimizer_cls(groups, lr=self.args.learning_rate, **optimizer_kwargs)
            if self.guard is not None:
                # Every optimizer step (DeepSpeed's ZeRO optimizers call this one too) asks the guard first.
                self.guard.wrap(self.optimizer)
            for g in groups:
                log.info(
                    "optimizer group %-26s lr %-9g weight_decay %-6g params %d",
                    g["name"],
                    g["lr"],
                    g["weight_decay"],
                    sum(p.numel() for p in g["params"]),
                )
        return self.optimizer

    def expected_lrs(self) -> dict[str, float]:
        """The lr each optimizer group must have."""
        return expected_group_lrs(self.args.learning_rate, self.lr_overrides)

    # -- sampler (the one tolerated private hook) --------------------------------------------

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler | None:
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        if self.packing_length:
            # One item per packed row (a tuple of sample indices); whole rows are dealt to ranks.
            return PackedRowSampler(self.train_dataset.lengths, self.packing_length, seed=seed)
        if self.group_by_modality_length and self.modality_lengths is not None:
            return ModalityLengthGroupedSampler(
                self.modality_lengths,
                per_device_batch=self.args.per_device_train_batch_size,
                world_size=self.args.world_size,
                grad_accum=self.args.gradient_accumulation_steps,
                seed=seed,
            )
        if self.args.train_sampling_strategy == "group_by_length" and self.modality_lengths is not None:
            # HF's own length grouping (megabatches of 50 batches sorted by length), fed our exact lengths: HF
            # would otherwise build every sample (images included) to measure its input_ids.
            return LengthGroupedSampler(
                self.args.train_batch_size * self.args.gradient_accumulation_steps,
                lengths=[abs(n) for n in self.modality_lengths],
                generator=torch.Generator().manual_seed(seed),
            )
        return super()._get_train_sampler(train_dataset)

    # -- saving ---------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Checkpoint folders get runtime-named weights (trainable only for partial stages); other saves are HF-native.

        A save into one of the run's `checkpoint-<step>` folders is a checkpoint (what HF's checkpointing
        writes); transformers saves LLaVA under legacy key names that its own resume does not map back.
        DeepSpeed, FSDP2 and peft runs keep HF's saving (engine states, DCP shards; adapters in runtime names).
        """

        out = output_dir or self.args.output_dir
        if (
            is_checkpoint_folder(out, self.args.output_dir)
            and not self.is_deepspeed_enabled
            and not self.is_fsdp_enabled
            and not is_peft_model(self.model)
        ):
            save_checkpoint_weights(self.model, out, self.partial_checkpoints, self.frozen_from)
        else:
            super().save_model(output_dir, _internal_call)
        if self.args.should_save and self.processing_class is not None:
            # Over HF's own processor save: every saved processor pads on the left (`model.serving`).
            save_serving_files(out, self.processing_class)

    # -- step -------------------------------------------------------------------------------

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        """Record throughput statistics (no host sync), mark text-only micro-batches, drop bookkeeping keys."""
        if self.tracker is not None:
            self.tracker.observe(inputs)
        if self.guard is not None:
            self.guard.observe_batch(inputs)
        self._missing_vision_calls = self.missing_vision_calls(inputs)
        try:
            return super().training_step(model, model_inputs(inputs), num_items_in_batch)
        finally:
            self._missing_vision_calls = None

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> Any:
        """Evaluation batches need the same rank-safe vision call as training ones under ZeRO-3."""
        self._missing_vision_calls = self.missing_vision_calls(inputs)
        try:
            return super().prediction_step(model, model_inputs(inputs), prediction_loss_only, ignore_keys)
        finally:
            self._missing_vision_calls = None

    def missing_vision_calls(self, inputs: dict[str, Any]) -> int:
        """Vision-tower passes this micro-batch lacks to match every other one: the image pass when it has
        no image, and in a run with videos the video pass when it has no video (the keepalive runs them)."""
        missing = 0 if "pixel_values" in inputs else 1
        if self.video_keepalive and "pixel_values_videos" not in inputs:
            missing += 1
        return missing

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """With `loss_on_trained_only` (from `perf.`; also `loss_chunk_size`), lm_head runs only on trained positions.

        Same objective as HF's path, including its rescaling by the number of processes when
        `average_tokens_across_devices` divides by the token count of all ranks.
        """
        if not self.loss_on_trained_only or return_outputs or "labels" not in inputs:
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        else:
            out = trained_positions_loss(model, inputs, num_items_in_batch, self.loss_chunk_size)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                out = out * self.accelerator.num_processes
        if self.guard is not None and not return_outputs and model.training:
            self.guard.observe_loss(out)  # before its backward: a non-finite step is caught before the update
        return out


def _install_vision_keepalive(trainer: LLaVATrainer) -> None:
    """Keep ranks in step when a micro-batch lacks an image (or, in a run with videos, a video).

    Under ZeRO-3 every module's parameters are all-gathered when it runs (forward and backward),
    and under ZeRO-2/DDP the projector's gradients are reduced across ranks; a rank that skipped
    the vision tower would issue a different sequence of collectives and hang the others (or fail
    with mismatched gather sizes). The LLaVA models run, in order: input embeddings -> vision tower +
    projector for the images (when pixel_values is given) -> vision tower + projector for the videos
    (OneVision, when pixel_values_videos is given) -> language model. This pre-hook on the language
    model runs one blank crop through the same vision tower + projector once per missing pass
    (`LLaVATrainer.missing_vision_calls`) and adds 0 x their output (and 0 x the NeXT / OneVision
    image newline) to the LM's input embeddings. Every rank therefore runs embeddings, (vision,
    projector) x the same count, LM in the same order forward, and the reverse order backward,
    whatever its number of images, crops, frames or text-only samples (a hook on the embedding module
    itself would put the embedding's backward before the projector's on text-only ranks only).
    `prepend=True` puts it ahead of DeepSpeed's own pre-hook on the LM. The cost is one crop per
    missing pass per micro-batch. The NeXT / OneVision image newline gets its 0 x term in every step, also
    when the micro-batch has images: an image whose features the model packs without the newline would leave
    it without a gradient on that rank only, and FSDP2 reduce-scatters only the parameters that have one
    (the ranks' reduce-scatter sizes then differ). The count is set only inside training/prediction steps, so
    generation elsewhere is untouched. It runs with any number of processes, so the projector's
    gradient on a text-only step is zero (not None) in every setting and 1-GPU and N-GPU runs
    optimise alike.
    """
    model = trainer.model
    base = unwrap(model)
    llava = base.model
    config = base.config
    vision_cfg = config.vision_config
    size = vision_cfg.image_size
    size = size if isinstance(size, int) else size[0]
    layer = config.vision_feature_layer

    def blank_pass(device: torch.device) -> torch.Tensor:
        """One blank crop through the tower and the projector, selected as the arch selects features."""
        dtype = next(llava.vision_tower.parameters()).dtype  # the tower's own (frozen: model.dtype)
        blank = torch.zeros(1, vision_cfg.num_channels, size, size, device=device, dtype=dtype)
        hidden = llava.vision_tower(blank, output_hidden_states=True, return_dict=True).hidden_states
        feats = hidden[layer] if isinstance(layer, int) else torch.cat([hidden[k] for k in layer], dim=-1)
        if config.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
        return llava.multi_modal_projector(feats).sum()

    def pre_hook(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> Any:
        missing = trainer._missing_vision_calls
        # Looked up at each call: FSDP2 replaces the registered parameter (its shard; the gathered one in forward).
        newline = getattr(llava, "image_newline", None)
        if missing is None or (not missing and newline is None) or kwargs.get("inputs_embeds") is None:
            return None
        embeds = kwargs["inputs_embeds"]
        total = sum((blank_pass(embeds.device) for _ in range(missing)), embeds.new_zeros(()))
        if newline is not None:
            total = total + newline.sum()
        kwargs["inputs_embeds"] = embeds + 0.0 * total.to(embeds.dtype)
        return args, kwargs

    llava.language_model.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=True)


class LrCheckCallback(TrainerCallback):
    """At train start, verify the optimizer carries the configured per-module learning rates."""

    def __init__(self, trainer: LLaVATrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        opt = optimizer if optimizer is not None else self.trainer.optimizer
        seen = verify_group_lrs(opt, self.trainer.expected_lrs())
        log.info("optimizer learning rates verified: %s", ", ".join(f"{n}={lr:g}" for n, lr in seen))
