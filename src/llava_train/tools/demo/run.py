"""`llava-train demo`: generate shapes data, build tiny models, validate, train both stages, evaluate, report.

Every step uses the same library code and config format as a real recipe (`configs/demo/*.yaml`);
only the paths are moved under the work dir and the step counts may be overridden.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from llava_train.archs import DEFAULT_ASPECT_RATIO
from llava_train.components import load_components
from llava_train.config import RunConfig, from_dict
from llava_train.config_io import apply_overrides, load_yaml
from llava_train.data.templates import run_template
from llava_train.data.validate import validate
from llava_train.model.serving import save_serving_files
from llava_train.tools.demo import parts, shapes, splits
from llava_train.tools.demo.lmms_task import TASK_NAME, TASKS_DIR, write_lmms_task
from llava_train.tools.demo.report import build_table, evaluate_model, format_table, sample_chat
from llava_train.train import run as train_run
from llava_train.training.callbacks import optional_artifact, write_loss_plot
from llava_train.utils.logging import get_logger

log = get_logger(__name__)
T = TypeVar("T")

# The demo's stage YAMLs are package data (configs/demo/ in the repository links here), so `llava-train demo`
# works from a plain `pip install .` too.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
TABLE_MD, TABLE_JSON, LOSS_PNG, SUMMARY_JSON = (
    "eval_table.md",
    "eval_table.json",
    "loss_curve.png",
    "demo_summary.json",
)
# The eval rows the demo reports on, in table order (the OneVision demo adds shapes.MULTI_TYPES).
EVAL_TYPES = shapes.QUESTION_TYPES
# Stage-2 steps of the OneVision demo (the YAML's 800 for the others).
ONEVISION_FINETUNE_STEPS = 1600


@dataclass
class DemoSize:
    """Sizes of the demo's data and tiny models (defaults: tuned to finish in minutes on 2 CPU cores).

    n_pretrain, n_finetune, n_eval: rows of each generated split.
    image_size, patch_size: vision input (64 px / 8 = 64 image tokens per image). Measured: with
        patch 16 (16 tokens, shapes straddling patches) a colour-only run stayed at chance for
        1000 steps; with patch 8 it reached 100% on held-out pairs in ~200 steps.
    lm_hidden, lm_layers, lm_heads: tiny Llama-style language model.
    vision_hidden, vision_layers: tiny CLIP vision tower.
    vision_pretrain_steps, lm_pretrain_steps: pretraining of the parts on the synthetic world before the
        LLaVA stages (`demo.parts`; 0 leaves that part random-init, as the demo was before).
    tower_views: what the tower is pretrained on: `model` the views the arch's model encodes (llava: the
        padded square; anyres archs: the base view and the grid crops), `pad` padded squares for every arch
        (what the anyres demo did first: shape probe 44%, docs/demo.md).
    """

    n_pretrain: int = 2000
    n_finetune: int = 3000
    n_eval: int = 200
    image_size: int = 64
    patch_size: int = 8
    lm_hidden: int = 128
    lm_layers: int = 2
    lm_heads: int = 4
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_pretrain_steps: int = 1200
    lm_pretrain_steps: int = 200
    tower_views: str = "model"


@dataclass
class DemoResult:
    """What a demo run produced: the final model folder, the eval table and where the artifacts are."""

    workdir: Path
    model_dir: Path
    table: dict[str, Any]
    loss_png: Path
    timings: dict[str, float] = field(default_factory=dict)


def stage_config(
    stage: str, workdir: Path, steps: int | None = None, init_from: str | None = "stage1", overrides: list[str] = ()
) -> RunConfig:
    """The demo YAML for `stage` (`pretrain` / `finetune`) with every path moved under `workdir`.

    `init_from` names the work-dir folder stage 2 starts from (None: straight from the base models).
    """
    data = load_yaml(CONFIG_DIR / f"{stage}.yaml")
    w = workdir
    split = "pretrain" if stage == "pretrain" else "finetune"
    data["model"]["language_model"] = str(w / "models" / "lm")
    data["model"]["vision_tower"] = str(w / "models" / "vision")
    data["data"]["train"] = [{"path": str(w / "data" / f"{split}.json"), "image_folder": str(w / "data" / "images")}]
    data["train"]["output_dir"] = str(w / ("stage1" if stage == "pretrain" else "model"))
    if stage == "finetune":
        data["model"]["init_from"] = str(w / init_from) if init_from else None
    if steps is not None:
        data["train"]["max_steps"] = steps
    apply_overrides(data, list(overrides))
    return from_dict(data)


def tower_views(cfg: RunConfig, views: str) -> tuple[Any, Any] | None:
    """`parts.pretrain_vision_tower`'s `anyres` argument: None (padded squares) for llava or `views="pad"`, else
    (the run's own anyres image processor, its pinpoints): the base view and grid crops the model encodes."""
    if views not in ("model", "pad"):
        raise KeyError(f"unknown tower_views {views!r}; valid: model, pad")
    if cfg.model.arch == "llava" or views == "pad":
        return None

    parts = load_components(cfg, weights=False)
    return parts.processor.image_processor, parts.geometry.pinpoints


def _timed(timings: dict[str, float], name: str, fn: Callable[[], T]) -> T:
    t0 = time.perf_counter()
    out = fn()
    timings[name] = round(time.perf_counter() - t0, 1)
    log.info("demo: %s done in %.1f s", name, timings[name])
    return out


def validate_data(cfg: RunConfig, report_path: Path) -> dict[str, Any]:
    """`data validate` (the library function) on the stage's sources; writes the report, raises if any row is bad."""

    # One worker: the demo's files are small and worker start-up would cost more than the scan.
    report = validate(cfg, load_components(cfg, weights=False), num_workers=1)
    report_path.write_text(json.dumps(report, indent=1))
    if report["total_bad"]:
        raise RuntimeError(f"demo data has {report['total_bad']} bad rows; see {report_path}")
    return report


def save_before_stage1(cfg: RunConfig, out: Path) -> Path:
    """The stage-2 model as built before any LLaVA training (pretrained parts, new projector), saved HF-native
    (the first column of the table)."""

    parts = load_components(cfg)
    parts.model.save_pretrained(str(out))
    save_serving_files(out, parts.processor, parts.model.generation_config)
    return out


def run_demo(
    workdir: str | Path = "runs/demo",
    pretrain_steps: int | None = None,
    finetune_steps: int | None = None,
    size: DemoSize | None = None,
    seed: int = 0,
    eval_limit: int | None = None,
    without_stage1: bool = False,
    overrides: Sequence[str] = (),
    torch_threads: int | None = 1,
    arch: str = "llava",
) -> DemoResult:
    """Run the whole demo in `workdir` and return the final model folder, eval table and artifact paths.

    Steps: generate data -> tiny tokenizer + models -> pretrain the tower and the LM (`demo.parts`) -> data
    validate -> eval (pretrained parts, new projector) -> stage 1 -> eval -> stage 2 -> eval -> table, loss
    curves, a sample chat. `pretrain_steps` /
    `finetune_steps` override the YAML's `max_steps`; `without_stage1` also trains stage 2 straight
    from the base models (same steps) to measure what stage 1 buys; `overrides` (`key=value`) apply
    to both stages' configs (e.g. `train.learning_rate=1e-3`). `torch_threads` sets torch's
    intra-op threads for the run (None: leave torch's default). `arch` `llava_next` (or
    `llava_onevision`) trains that arch on images of mixed sizes (square, wide, tall): anyres grids
    with their exact per-image token counts; its tower is pretrained on the views the model encodes, for
    3600 steps (`size` None); OneVision's LM pretraining takes 400 steps and its stage 2 1600
    (`finetune_steps` None). `llava_onevision` adds two-image questions (`two images`) and three-frame
    video questions (`motion`) to stage 2 and the held-out table.
    """

    if arch != "llava":
        # Anyres images are up to 2-3 crops of 64 px: 64 base tokens + up to ~200 grid tokens.
        arch_overrides = [f"model.arch={arch}", f"data.image_aspect_ratio={DEFAULT_ASPECT_RATIO[arch]}"]
        if arch == "llava_onevision":
            arch_overrides.append(f"data.video_frames={shapes.VIDEO_FRAMES}")
        overrides = [*arch_overrides, "data.model_max_length=1024", *overrides]
    import torch

    previous = torch.get_num_threads()
    if torch_threads is not None:
        # The demo's matrices are tiny: a second OpenMP thread buys nothing, and on a shared or busy
        # machine its spin-waiting made a training step ~15x slower (measured: 0.46 s vs 6.9 s).
        torch.set_num_threads(torch_threads)
    if size is None:
        # The anyres tower sees harder views (wide and tall images squashed into the base view, shapes of the
        # middle column or row cut in half by the grid crops): at 1200 steps its held-out shape probe was 62%,
        # at 2400 steps 95% and the NeXT demo's held-out shape 94%; 3600 steps gave shape 100% (docs/demo.md).
        size = DemoSize() if arch == "llava" else DemoSize(vision_pretrain_steps=3600)
        if arch == "llava_onevision":
            # Its LM pretraining text is half as long again (two-image and video rows): twice the steps.
            size.lm_pretrain_steps = 400
    if finetune_steps is None and arch == "llava_onevision":
        # Half as many stage-2 rows again and two more skills (naming an image by its place, motion): at 800
        # steps one of them was missing in each of three runs; at 1600 none was (docs/demo.md).
        finetune_steps = ONEVISION_FINETUNE_STEPS
    try:
        return _run_demo(
            Path(workdir),
            pretrain_steps,
            finetune_steps,
            size,
            seed,
            eval_limit,
            without_stage1,
            overrides,
            arch != "llava",
            arch == "llava_onevision",
        )
    finally:
        torch.set_num_threads(previous)


def _run_demo(
    workdir: Path,
    pretrain_steps: int | None,
    finetune_steps: int | None,
    size: DemoSize,
    seed: int,
    eval_limit: int | None,
    without_stage1: bool,
    overrides: Sequence[str],
    mixed_sizes: bool = False,
    multi: bool = False,
) -> DemoResult:

    w = workdir.resolve()
    w.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = time.perf_counter()

    data = _timed(
        timings,
        "generate data",
        lambda: splits.generate(
            w / "data", size.n_pretrain, size.n_finetune, size.n_eval, size.image_size, seed, mixed_sizes, multi
        ),
    )
    # lmms-eval's view of the same held-out split (README "Benchmark curves during training").
    lmms_tasks = write_lmms_task(data.eval, data.image_folder, w / TASKS_DIR)
    cfg1 = stage_config("pretrain", w, pretrain_steps, overrides=overrides)
    cfg2 = stage_config("finetune", w, finetune_steps, overrides=overrides)
    lm, vision = _timed(timings, "tiny tokenizer + models", lambda: parts.write_parts(w, data, size, seed))
    pretraining: dict[str, Any] = {}
    if size.vision_pretrain_steps:
        # The probe on the held-out images is a measurement only (what the tower's features hold).
        views = tower_views(stage_config("finetune", w, init_from=None, overrides=overrides), size.tower_views)
        h = _timed(
            timings,
            "vision tower pretraining",
            lambda: parts.pretrain_vision_tower(
                vision,
                data,
                size.vision_pretrain_steps,
                cfg2.model.vision_feature_layer,
                seed=seed,
                probe=data.eval,
                anyres=views,
            ),
        )
        pretraining["vision"] = {"loss": [round(h["loss"][0], 4), round(h["loss"][-1], 4)], "probe": h["probe"]}
    if size.lm_pretrain_steps:
        sources = [(data.pretrain, run_template(cfg1)), (data.finetune, run_template(cfg2))]
        h = _timed(
            timings,
            "LM pretraining",
            lambda: parts.pretrain_language_model(lm, sources, size.lm_pretrain_steps, seed=seed),
        )
        pretraining["lm"] = {"loss": [round(h["loss"][0], 4), round(h["loss"][-1], 4)]}
    # Stage 2 is validated against the base models: its init_from folder is written by stage 1.
    to_check = (cfg1, stage_config("finetune", w, init_from=None, overrides=overrides))
    _timed(timings, "data validate", lambda: [validate_data(c, w / f"data_report_{c.stage}.json") for c in to_check])

    reports: dict[str, dict[str, Any]] = {}
    before = _timed(
        timings,
        "build before stage 1",
        lambda: save_before_stage1(
            stage_config("finetune", w, init_from=None, overrides=overrides), w / "before_stage1"
        ),
    )
    reports["before stage 1"] = _timed(
        timings,
        "eval before stage 1",
        lambda: evaluate_model(before, data, w / "eval" / "before_stage1", eval_limit, False),
    )
    stage1 = _timed(timings, "stage 1", lambda: train_run(cfg1))
    reports["after stage 1"] = _timed(
        timings, "eval stage 1", lambda: evaluate_model(w / "stage1", data, w / "eval" / "stage1", eval_limit, True)
    )
    stage2 = _timed(timings, "stage 2", lambda: train_run(cfg2))
    reports["after stage 2"] = _timed(
        timings, "eval stage 2", lambda: evaluate_model(w / "model", data, w / "eval" / "stage2", eval_limit, False)
    )
    histories = {"stage 1 (pretrain, projector only)": stage1.log_history, "stage 2 (finetune)": stage2.log_history}
    if without_stage1:
        cfg_ablation = stage_config("finetune", w, finetune_steps, init_from=None, overrides=overrides)
        cfg_ablation.train["output_dir"] = str(w / "model_without_stage1")
        ablation = _timed(timings, "stage 2 without stage 1", lambda: train_run(cfg_ablation))
        reports["stage 2 without stage 1"] = _timed(
            timings,
            "eval without stage 1",
            lambda: evaluate_model(w / "model_without_stage1", data, w / "eval" / "without_stage1", eval_limit, False),
        )
        histories["stage 2 without stage 1"] = ablation.log_history

    chance = json.loads(data.meta.read_text())["chance"]
    table = build_table(reports, chance)
    text = format_table(table)
    (w / TABLE_MD).write_text(text + "\n")
    (w / TABLE_JSON).write_text(json.dumps(table, indent=2))
    for name, history in histories.items():
        slug = name.split(" (")[0].replace(" ", "_")
        (w / f"log_history_{slug}.json").write_text(json.dumps(history, indent=1))
    loss_png = w / LOSS_PNG
    with optional_artifact(f"loss curves {loss_png} (needs the `plot` extra: matplotlib)"):
        write_loss_plot(histories, loss_png)
    chat = sample_chat(w / "model", size.image_size, seed, w)
    timings["total"] = round(time.perf_counter() - start, 1)
    summary = {
        "timings_s": timings,
        "pretraining": pretraining,
        "table": table,
        "chat": chat,
        "model_dir": str(w / "model"),
    }
    (w / SUMMARY_JSON).write_text(json.dumps(summary, indent=2))

    if "vision" in pretraining:
        probe = pretraining["vision"]["probe"]
        print(
            "vision tower after pretraining, linear probe on the held-out images: "
            + ", ".join(f"{k} {v:.0%}" for k, v in probe.items())
        )
    print(text)
    print(f"\nchat about a newly drawn held-out image, {chat['image']}:")
    for t in chat["turns"]:
        print(f"  {t['question'].splitlines()[0]!r} -> {t['answer']!r} (truth: {t['truth']})")
    print(f"loss curves: {loss_png}\nfinal model: {w / 'model'}\ntotal: {timings['total']:.0f} s")
    print(
        f"lmms-eval's score of the same held-out split (task {TASK_NAME}, environment from `make lmms-eval-env`):\n"
        f"  llava-train lmms-eval {w / 'model'} --tasks {TASK_NAME} --include-path {lmms_tasks} "
        "--python .venv-lmms/bin/python"
    )
    return DemoResult(w, w / "model", table, loss_png, timings)
