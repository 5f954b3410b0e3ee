"""wandb: the run metadata HF's WandbCallback does not log (nested config, name/tags, data report, predictions)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from llava_train.training.callbacks import PredictionsFn, optional_artifact, scalar, wandb_enabled


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "/"))
        else:
            out[name] = value
    return out


class WandbExtrasCallback(TrainerCallback):
    """What HF's WandbCallback does not log: the nested resolved config, name/tags, data report, predictions.

    Install it AFTER HF's WandbCallback (plain `trainer.add_callback` / `callbacks=`), which creates
    the run in its own `on_train_begin`. All wandb calls happen on rank 0 and only while a run is
    active. `predictions_fn` runs on EVERY rank (under ZeRO-3 generation needs all ranks; it must
    then generate with `synced_gpus=True`) and only rank 0 logs its rows.

    config_dict: the resolved RunConfig as a nested dict (`RunConfig.to_dict()`); logged as
        `wandb.config["llava_train"]`; its `wandb` section supplies the run name and tags.
    data_report: the data validation summary (logged to the run summary under `data_report/...`
        and as a `data_report` table).
    predictions_fn: model -> rows {image (PIL or None), prompt, prediction, reference}; logged as
        the `eval/predictions` table after each evaluation and at the end of training.
    """

    def __init__(
        self,
        config_dict: dict[str, Any],
        data_report: dict[str, Any] | None = None,
        predictions_fn: PredictionsFn | None = None,
    ) -> None:
        self.config_dict = config_dict
        self.data_report = data_report
        self.predictions_fn = predictions_fn
        self._done_setup = False

    @staticmethod
    def _run() -> Any:
        try:
            import wandb
        except ImportError:
            return None
        return wandb.run

    def _setup(self, state: TrainerState) -> None:
        run = self._run() if state.is_world_process_zero else None
        if self._done_setup or run is None:
            return
        run.config.update({"llava_train": self.config_dict}, allow_val_change=True)
        wb = self.config_dict.get("wandb") or {}
        if wb.get("name"):
            run.name = wb["name"]
        if wb.get("tags"):
            run.tags = tuple(dict.fromkeys([*(run.tags or ()), *wb["tags"]]))
        if self.data_report:
            import wandb

            flat = _flatten(self.data_report)
            run.summary.update({f"data_report/{k}": v for k, v in flat.items() if scalar(v) is not None})
            rows = [[k, json.dumps(v, default=str)] for k, v in flat.items()]
            table = wandb.Table(columns=["key", "value"], data=rows)
            run.log({"data_report": table}, commit=False)
        self._done_setup = True

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Log the nested config, name/tags and data report once HF's WandbCallback has started the run."""
        with optional_artifact("wandb run set-up (config, data report)"):
            self._setup(state)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Retry the set-up if the run started after on_train_begin (e.g. callback order)."""
        with optional_artifact("wandb run set-up (config, data report)"):
            self._setup(state)

    def _log_predictions(self, args: TrainingArguments, state: TrainerState, model: Any) -> None:
        if self.predictions_fn is None or not wandb_enabled(args.report_to) or model is None:
            return
        rows = self.predictions_fn(model)
        run = self._run() if state.is_world_process_zero else None
        if run is None or not rows:
            return
        import wandb

        columns = ["step", "image", "prompt", "prediction", "reference"]
        data = [
            [
                state.global_step,
                wandb.Image(r["image"]) if r.get("image") is not None else None,
                r.get("prompt"),
                r.get("prediction"),
                r.get("reference"),
            ]
            for r in rows
        ]
        run.log({"eval/predictions": wandb.Table(columns=columns, data=data), "train/global_step": state.global_step})

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kwargs: Any
    ) -> None:
        """Log the sample-predictions table after each evaluation."""
        with optional_artifact("wandb prediction table"):
            self._log_predictions(args, state, model)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kwargs: Any
    ) -> None:
        """Log the final sample-predictions table."""
        with optional_artifact("wandb run set-up (config, data report)"):
            self._setup(state)
        with optional_artifact("wandb prediction table"):
            self._log_predictions(args, state, model)


def wandb_env(cfg: Any) -> dict[str, str]:
    """Set WANDB_PROJECT / ENTITY / NAME / RUN_GROUP / TAGS from `cfg.wandb` before TrainingArguments exist.

    HF's WandbCallback calls `wandb.init` itself and wandb reads these variables. Variables already
    set in the environment win (a wandb sweep agent sets its own project). Does nothing unless
    `train.report_to` includes wandb. Returns the variables it set.
    """
    if not wandb_enabled(cfg.train.get("report_to")):
        return {}
    wb = cfg.wandb
    wanted = {
        "WANDB_PROJECT": wb.project,
        "WANDB_ENTITY": wb.entity,
        "WANDB_NAME": wb.name or Path(cfg.output_dir).name,
        "WANDB_RUN_GROUP": wb.group,
        "WANDB_TAGS": ",".join(wb.tags) if wb.tags else None,
    }
    set_now = {}
    for key, value in wanted.items():
        if value and key not in os.environ:
            os.environ[key] = str(value)
            set_now[key] = str(value)
    return set_now
