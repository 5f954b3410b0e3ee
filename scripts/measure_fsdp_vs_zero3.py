"""FSDP2 vs DeepSpeed ZeRO-3 on 2 CPU ranks (gloo): peak RSS, step time, checkpoint and final-folder sizes.

    python scripts/measure_fsdp_vs_zero3.py [--workdir /tmp/fsdp_vs_zero3] [--hidden 1024] [--layers 8] [--steps 10]

Writes (once) a random-init Llama LM of the given shape (tiny tokenizer) and the tiny CLIP tower, 32 LLaVA rows
(24 with an image, 8 text-only), then trains stage 2 (LM + projector, tower frozen; bf16 frozen weights, bf16
compute, fp32 masters) for `--steps` steps on 2 ranks under each engine, saving one checkpoint at the end. Each
launch runs under `/usr/bin/time -v` (peak RSS of the largest rank). Prints one JSON line per engine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def write_parts(root: Path, hidden: int, layers: int) -> None:
    from PIL import Image

    from llava_train.model.tiny import write_tiny_language_model, write_tiny_vision_tower

    if not (root / "models" / "lm" / "config.json").is_file():
        write_tiny_language_model(root / "models" / "lm", hidden_size=hidden, layers=layers, heads=16)
        write_tiny_vision_tower(root / "models" / "vision")
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(32):
        colour = ("red", "green", "blue", "yellow")[i % 4]
        reply = {"from": "gpt", "value": f"It is {colour}, a solid {colour} picture."}
        if i < 24:
            Image.new("RGB", (40, 32), (40 * (i % 6), 200 - 5 * i, 90)).save(images / f"{i}.png")
            rows.append({"id": str(i), "image": f"{i}.png", "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is it?"}, reply]})  # fmt: skip
        else:
            rows.append({"id": str(i), "conversations": [{"from": "human", "value": f"Say {colour}."}, reply]})
    (root / "finetune.json").write_text(json.dumps(rows))


def config(root: Path, engine: str, steps: int) -> Path:
    out = root / f"run_{engine}"
    train = {
        "output_dir": str(out), "max_steps": steps, "per_device_train_batch_size": 2, "learning_rate": 1e-4,
        "lr_scheduler_type": "constant", "logging_steps": 1, "save_strategy": "steps", "save_steps": steps,
        "seed": 0, "dataloader_num_workers": 0, "report_to": [], "disable_tqdm": True, "bf16": True,
    }  # fmt: skip
    if engine == "fsdp2":
        train["fsdp"] = str(REPO / "configs" / "fsdp" / "fsdp2.yaml")
    else:
        train["deepspeed"] = str(REPO / "configs" / "deepspeed" / "zero3.json")
    data = {
        "stage": "finetune",
        "model": {
            "language_model": str(root / "models" / "lm"),
            "vision_tower": str(root / "models" / "vision"),
            "dtype": "bfloat16",
        },  # fmt: skip
        "data": {
            "train": [{"path": str(root / "finetune.json"), "image_folder": str(root / "images")}],
            "template": "vicuna_v1",
            "model_max_length": 256,
        },  # fmt: skip
        "train": train,
    }
    path = root / f"{engine}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def measure(root: Path, engine: str, steps: int, port: int) -> dict[str, object]:
    cfg = config(root, engine, steps)
    if engine == "fsdp2":
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
        cmd = [*launcher, "-m", "llava_train.train", str(cfg)]
    else:
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(port)]
        cmd += ["--module", "llava_train.train", str(cfg)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "DS_ACCELERATOR": "cpu"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    start = time.monotonic()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], env=env, capture_output=True, text=True, check=False)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"{engine}: exit {proc.returncode}\n{(proc.stdout + proc.stderr)[-4000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    out = root / f"run_{engine}"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = next((r for r in rows if "train_runtime" in r), {})
    losses = [r["loss"] for r in rows if "loss" in r]
    return {
        "engine": engine,
        "wall_s": round(wall, 1),
        "train_runtime_s": summary.get("train_runtime"),
        "s_per_step": round(summary["train_runtime"] / steps, 3) if "train_runtime" in summary else None,
        "peak_rss_largest_rank_mib": rss_kb // 1024,
        "checkpoint_mib": round(size(out / f"checkpoint-{steps}") / 2**20, 1),
        "final_model_mib": round(sum(p.stat().st_size for p in out.glob("*.safetensors")) / 2**20, 1),
        "first_last_loss": [round(losses[0], 4), round(losses[-1], 4)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/fsdp_vs_zero3")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    a = parser.parse_args()
    root = Path(a.workdir)
    root.mkdir(parents=True, exist_ok=True)
    write_parts(root, a.hidden, a.layers)
    for i, engine in enumerate(("fsdp2", "zero3")):
        print(json.dumps(measure(root, engine, a.steps, 24800 + i)), flush=True)


if __name__ == "__main__":
    main()
