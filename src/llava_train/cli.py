"""The `llava-train` command: argument parsing only; each subcommand calls one library function."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from llava_train.archs import ARCHS
from llava_train.config import config_reference, load_config
from llava_train.config_io import ConfigError


def _split_overrides(extra: list[str]) -> list[str]:
    """Unknown `--key=value` arguments (the wandb sweep agent form) are config overrides too."""
    bad = [a for a in extra if "=" not in a]
    if bad:
        raise ConfigError(f"unrecognised arguments: {' '.join(bad)} (overrides look like key=value)")
    return extra


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.model_max_length=1024")


def _load(args: argparse.Namespace, extra: list[str]):
    return load_config(args.config, list(args.overrides) + _split_overrides(extra))


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    """The same entry as `python -m llava_train.train` (documented exit codes, launched-rank exit)."""
    from llava_train.train import main as train_main

    argv = ([args.config] if args.config else []) + list(args.overrides) + _split_overrides(extra)
    return train_main(argv)


def cmd_data_validate(args: argparse.Namespace, extra: list[str]) -> int:
    from llava_train.commands import run_validate
    from llava_train.errors import EXIT_BAD_ROWS, EXIT_COULD_NOT_RUN, EXIT_OK, user_errors

    try:
        report = run_validate(_load(args, extra), report_path=args.report, num_workers=args.workers)
    except Exception as e:
        if isinstance(e, user_errors()):
            raise  # one line, exit 2 (main)
        # Scripts must tell "bad rows found" (1) from "could not run": a bug's traceback still exits 2.
        traceback.print_exc()
        return EXIT_COULD_NOT_RUN
    return EXIT_BAD_ROWS if report["total_bad"] else EXIT_OK


def cmd_data_inspect(args: argparse.Namespace, extra: list[str]) -> int:
    from llava_train.commands import run_inspect

    run_inspect(_load(args, extra), indices=args.index, jsonl=args.jsonl, color=args.color, images_dir=args.images)
    return 0


def cmd_config(args: argparse.Namespace, extra: list[str]) -> int:
    if args.config is None:
        width = max(len(k) for k, _, _ in config_reference())
        for key, typ, doc in config_reference():
            print(f"{key:<{width}}  {typ}\n{'':<{width}}  {doc}" if doc else f"{key:<{width}}  {typ}")
        print("\ntrain.*: any transformers.TrainingArguments field, passed through untouched.")
        return 0
    import yaml

    cfg = _load(args, extra)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


def cmd_plan(args: argparse.Namespace, extra: list[str]) -> int:
    from llava_train.tools.plan import plan

    print(plan(_load(args, extra), num_gpus=args.num_gpus, num_nodes=args.num_nodes))
    return 0


def cmd_merge_lora(args: argparse.Namespace, extra: list[str]) -> int:
    from llava_train.training.lora_merge import merge_lora

    out = merge_lora(args.run_dir, args.out)
    print(f"merged model written to {out}")
    return 0


def cmd_convert(args: argparse.Namespace, extra: list[str]) -> int:
    from llava_train.tools.convert import convert, convert_config

    cfg = convert_config(
        args.src,
        args.out,
        config=args.config,
        language_model=args.language_model,
        vision_tower=args.vision_tower,
        tokenizer=args.tokenizer,
        template=args.template,
        dtype=args.dtype,
        overrides=list(args.overrides) + _split_overrides(extra),
    )
    print(f"converted model written to {convert(cfg, args.out)}")
    return 0


def cmd_predict(args: argparse.Namespace, extra: list[str]) -> int:
    from llava_train import infer

    gen = dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.temperature > 0,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
    if args.data:
        if not args.out:
            raise ConfigError("--data needs --out OUT.jsonl")
        infer.predict_file(args.model_dir, args.data, args.image_folder, args.out, batch_size=args.batch_size, **gen)
        print(f"predictions written to {args.out}")
    else:
        if args.prompt is None:
            raise ConfigError("give --prompt (and --image ...) or --data FILE.json")
        print(infer.predict(args.model_dir, args.image or [], args.prompt, **gen))
    return 0


def cmd_eval(args: argparse.Namespace, extra: list[str]) -> int:
    from llava_train import infer

    out = args.out or str(Path(args.model_dir) / "eval")
    report = infer.evaluate(
        args.model_dir,
        args.data,
        args.image_folder,
        out,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
    )
    print(json.dumps(report.get("summary", report), indent=2))
    return 0


def cmd_lmms_eval(args: argparse.Namespace, extra: list[str]) -> int:
    """Exit 0 when every folder was scored, 1 when lmms-eval failed on one (its error is in the table's record)."""
    from llava_train.lmms import LmmsRequest
    from llava_train.tools.lmms_offline import evaluate_path, format_table
    from llava_train.utils.distributed import has_accelerator

    tasks = tuple(t for t in args.tasks.split(",") if t)
    cuda = has_accelerator() and args.devices != ""
    request = LmmsRequest(tasks, args.include_path, args.limit, args.model_args, args.python, args.devices, cuda)
    records, errors = evaluate_path(args.path, request)
    print(format_table(records))
    for error in errors:
        print(f"llava-train: lmms-eval failed: {error}", file=sys.stderr)
    return 1 if errors else 0


def cmd_demo(args: argparse.Namespace, extra: list[str]) -> int:
    from llava_train.tools.demo.run import run_demo

    kwargs = {}
    if args.pretrain_steps is not None:
        kwargs["pretrain_steps"] = args.pretrain_steps
    if args.finetune_steps is not None:
        kwargs["finetune_steps"] = args.finetune_steps
    run_demo(args.workdir, arch=args.arch, without_stage1=args.without_stage1, **kwargs)
    return 0


def cmd_demo_dpo(args: argparse.Namespace, extra: list[str]) -> int:
    from llava_train.tools.demo.preference import run_dpo_demo

    run_dpo_demo(args.workdir, args.steps, _split_overrides(extra))
    return 0


def cmd_trace(args: argparse.Namespace, extra: list[str]) -> int:
    from llava_train.tools.trace import run_trace

    run_trace(_load(args, extra), args.index, args.model, args.json, sys.stdout)
    return 0


def cmd_sweep(args: argparse.Namespace, extra: list[str]) -> int:
    """Exit 0 when every trial finished with its metric, 1 when one did not, 2 for a bad sweep file."""
    import shlex

    from llava_train.tools.sweep.run import run_local_sweep
    from llava_train.tools.sweep.spec import SweepError

    try:
        summary = run_local_sweep(
            args.sweep,
            dry_run=args.dry_run,
            max_runs=args.max_runs,
            launcher=shlex.split(args.launcher) if args.launcher else None,
            sweep_dir=args.sweep_dir,
            seed=args.seed,
            extra_overrides=list(args.overrides) + _split_overrides(extra),
        )
    except SweepError as e:
        raise ConfigError(str(e)) from e
    if args.dry_run:
        for trial in summary.trials:
            print(shlex.join(trial.command))
        return 0
    if summary.md_path:
        print(Path(summary.md_path).read_text())
    return 0 if all(t.status == "ok" for t in summary.trials) else 1


def cmd_bench(args: argparse.Namespace, extra: list[str]) -> int:
    from llava_train.tools.bench import bench

    if extra:
        raise ConfigError(f"llava-train bench: unknown arguments {' '.join(extra)}")
    overrides = {k: getattr(args, k) for k in ("batch_size", "packing_length", "rows", "warmup")}
    bench(args.preset, args.modes, args.steps, args.profile, args.repeat, args.threads, overrides)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The full `llava-train` argument parser."""
    parser = argparse.ArgumentParser(prog="llava-train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run one stage from a YAML config")
    _add_config_args(p)
    p.set_defaults(fn=cmd_train)

    data = sub.add_parser("data", help="check and look at training data").add_subparsers(
        dest="data_cmd", required=True
    )
    p = data.add_parser(
        "validate", help="scan every row of every source; exit 1 if any row is bad, 2 if it could not run"
    )
    _add_config_args(p)
    p.add_argument("--report", help="where to write the JSON report (default: <output_dir>/data_report.json)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.set_defaults(fn=cmd_data_validate)
    p = data.add_parser("inspect", help="show rendered samples with trained spans highlighted")
    _add_config_args(p)
    p.add_argument(
        "--index",
        type=int,
        action="append",
        help="sample index over all sources in order (repeatable); default: the first",
    )
    p.add_argument("--jsonl", help="write input_ids/labels of the samples (all, or --index ones) to this JSONL")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    p.add_argument("--images", metavar="DIR", help="write the shown samples' images into DIR, as stored")
    p.set_defaults(fn=cmd_data_inspect)

    p = sub.add_parser("config", help="print the config reference, or the resolved config of a file")
    p.add_argument("config", nargs="?", help="YAML config (omit for the reference of every key)")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(fn=cmd_config)

    p = sub.add_parser("plan", help="estimate per-GPU memory for a config")
    _add_config_args(p)
    p.add_argument("--num-gpus", type=int, default=None)
    p.add_argument("--num-nodes", type=int, default=1)
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("merge-lora", help="merge a LoRA run into a HF-native model folder")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_merge_lora)

    p = sub.add_parser(
        "convert",
        help="an original-format LLaVA checkpoint or mm_projector.bin (+ base models) to a HF-native folder",
    )
    p.add_argument(
        "src", help="original checkpoint folder, mm_projector.bin (or its folder), stage-1 folder or hub id"
    )
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.add_argument("--out", required=True, help="the HF-native folder to write")
    p.add_argument("--config", help="a run config naming the base models (model.init_from becomes SRC)")
    p.add_argument("--language-model", help="base LM of a projector source (model.language_model)")
    p.add_argument("--vision-tower", help="vision tower (default: the original config's mm_vision_tower)")
    p.add_argument("--tokenizer", help="tokenizer, if not the checkpoint's or the language model's")
    p.add_argument("--template", help="chat template (default: the original's version, else vicuna_v1)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="saved dtype (default: the source's)")
    p.set_defaults(fn=cmd_convert)

    for name, fn, hlp in (
        ("predict", cmd_predict, "generate answers with a trained model folder"),
        ("eval", cmd_eval, "exact/contains-match evaluation on a LLaVA-format file"),
    ):
        p = sub.add_parser(name, help=hlp)
        p.add_argument("model_dir")
        p.add_argument("--data", help="LLaVA-format JSON/JSONL")
        p.add_argument("--image-folder", default=".")
        p.add_argument("--out")
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--max-new-tokens", type=int, default=64)
        if name == "predict":
            p.add_argument("--image", action="append", help="image file (repeatable)")
            p.add_argument("--prompt")
            p.add_argument("--temperature", type=float, default=0.0, help="> 0 samples; 0 is greedy")
            p.add_argument("--top-p", type=float, default=1.0)
            p.add_argument("--seed", type=int, default=0)
        p.set_defaults(fn=fn)

    p = sub.add_parser(
        "lmms-eval", help="lmms-eval on a model folder, a checkpoint-N (its hf/), or a run's unscored checkpoints"
    )
    p.add_argument("path", help="final model folder, checkpoint-N folder, or run folder")
    p.add_argument("--tasks", required=True, help="comma-separated lmms-eval task names")
    p.add_argument("--include-path", help="folder of extra task YAMLs (e.g. the demo's lmms_tasks/)")
    p.add_argument("--limit", type=int, help="documents per task (default: all)")
    p.add_argument("--python", help="interpreter of the environment with lmms-eval (default: this one)")
    p.add_argument("--model-args", default="", help="extra llava_hf model args, key=value,...")
    p.add_argument("--devices", help='CUDA_VISIBLE_DEVICES of the eval process ("" = CPU)')
    p.set_defaults(fn=cmd_lmms_eval)

    p = sub.add_parser("demo", help="synthetic shapes task through both stages on CPU")
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--pretrain-steps", type=int)
    p.add_argument("--finetune-steps", type=int)
    p.add_argument(
        "--without-stage1",
        action="store_true",
        help="also train stage 2 straight from the pretrained parts (same steps) and report it beside",
    )
    p.add_argument(
        "--arch",
        default="llava",
        choices=list(ARCHS),
        help="llava_next / llava_onevision: anyres on mixed image sizes (onevision: + two-image and video questions)",
    )
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("demo-dpo", help="after `demo`: DPO on right/wrong answer pairs from its world, held-out eval")
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--steps", type=int)
    p.set_defaults(fn=cmd_demo_dpo)

    p = sub.add_parser("trace", help="walk one sample through LLaVA: row, labels, pixels, tower, merge, loss")
    _add_config_args(p)
    p.add_argument("--index", type=int, default=0, help="sample index over all sources (as data inspect)")
    p.add_argument("--model", help="a trained HF-native model folder (default: the model the config builds)")
    p.add_argument("--json", metavar="OUT", help="also write every step as JSON")
    p.set_defaults(fn=cmd_trace)

    p = sub.add_parser("sweep", help="run a wandb-format sweep YAML locally (grid/random)")
    p.add_argument("sweep", help="wandb sweep YAML (method grid or random)")
    p.add_argument("overrides", nargs="*", help="key=value overrides added to every trial")
    p.add_argument("--dry-run", action="store_true", help="print the trial commands, run nothing")
    p.add_argument("--max-runs", type=int, help="at most N trials (random: exactly N)")
    p.add_argument("--sweep-dir", help="folder for trial run folders and the summary")
    p.add_argument("--seed", type=int, default=0, help="seed of the random method")
    p.add_argument(
        "--launcher",
        help='run each trial through a launcher, e.g. "deepspeed --num_gpus 2 --module" (default: python -m)',
    )
    p.set_defaults(fn=cmd_sweep)

    p = sub.add_parser("bench", help="throughput benchmark of the real trainer step (one JSON line per mode)")
    p.add_argument("--preset", default="cpu-tiny", help="model + data + batch shape (cpu-tiny, gpu-1b-finetune, ...)")
    p.add_argument("--modes", default=None, help="comma-separated modes (default: hf-padded,grouped,packed,ours)")
    p.add_argument("--steps", type=int, default=None, help="measured optimizer steps (default: the preset's)")
    p.add_argument("--profile", action="store_true", help="add each mode's top-5 ops (torch.profiler)")
    p.add_argument("--repeat", type=int, default=1, help="interleaved rounds of all modes; the fastest round is kept")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 without CUDA)")
    for name in ("batch-size", "packing-length", "rows", "warmup"):
        p.add_argument(f"--{name}", type=int, default=None, help=f"override the preset's {name.replace('-', '_')}")
    p.set_defaults(fn=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `llava-train` console script."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    from llava_train.errors import EXIT_USER_ERROR, user_errors

    try:
        return args.fn(args, extra)
    except Exception as e:
        if not isinstance(e, user_errors()):
            raise
        print(f"llava-train: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
