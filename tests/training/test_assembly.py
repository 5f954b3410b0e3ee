"""The one trainer assembly (training/assembly.py): what train.py and the bench both build."""

from __future__ import annotations

from pathlib import Path

import pytest

from llava_train.config import from_dict
from tiny_models import tiny_config, write_tiny_data


@pytest.fixture(scope="module")
def trainer(tmp_path_factory: pytest.TempPathFactory):
    from llava_train import train

    root = tmp_path_factory.mktemp("assembly")
    ws = write_tiny_data(root / "data")
    ws["lm"], ws["vision"] = str(root / "models" / "lm"), str(root / "models" / "vision")
    cfg = from_dict(tiny_config(ws, "finetune", str(root / "run"), max_steps=1, disable_tqdm=False))
    train.prepare_run_dir(cfg)
    args = train.build_training_arguments(cfg)
    parts = train.build_components(cfg)
    from llava_train.training.assembly import prepare_model

    model = prepare_model(parts.model, cfg, train.precision_policy(cfg, args))
    train_ds, eval_ds = train.build_data(cfg, parts, args)
    return train.build_trainer(cfg, args, model, parts, train_ds, eval_ds)


def test_callbacks_run_in_the_one_order(trainer) -> None:
    """Throughput keys and skipped_steps reach the logs before HF's reporters; ours follow HF's defaults; HF's raw
    log dict is not printed beside our console line (the progress bar stays, quiet on logs)."""
    names = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    assert names == [
        "ThroughputCallback",
        "SafetyCallback",
        "DefaultFlowCallback",
        "QuietProgressCallback",
        "LrCheckCallback",
        "CheckpointArtifactsCallback",
        "MetricsJsonlCallback",
        "LossPlotCallback",
    ]


def test_trainer_gets_the_runs_collator_sampler_and_tracker(trainer) -> None:
    from llava_train.data.collator import PaddingCollator
    from llava_train.data.sampler import ModalityLengthGroupedSampler
    from llava_train.training.metrics import ThroughputTracker

    assert isinstance(trainer.data_collator, PaddingCollator)
    assert isinstance(trainer._get_train_sampler(), ModalityLengthGroupedSampler)  # data.group_by_modality_length
    assert isinstance(trainer.tracker, ThroughputTracker)
    assert Path(trainer.args.output_dir).name == "run"
