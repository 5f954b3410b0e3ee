"""`llava-train demo-dpo`: a third demo stage, DPO, on preference pairs drawn from the demo's own world.

Each pair asks one of a training row's one-word questions (colour, shape, size, position, count), after the
row's earlier turns (a multi-turn prompt), and prefers the row's true answer to a wrong one: another answer of the
same kind that other training rows give. Run after `llava-train demo` in the same work dir: it trains
`configs/demo/dpo.yaml` from the demo's finetuned model, evaluates both models on the held-out split and reports
the reward figures of the run beside the held-out accuracies.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from llava_train.config import RunConfig, from_dict
from llava_train.config_io import apply_overrides, load_yaml
from llava_train.tools.demo import shapes
from llava_train.tools.demo.report import evaluate_model
from llava_train.train import run as train_run
from llava_train.utils.logging import get_logger

log = get_logger(__name__)

CONFIG = Path(__file__).resolve().parent / "configs" / "dpo.yaml"
ONE_WORD = ("colour", "shape", "size", "position", "count")  # question kinds answered by a word or phrase
PAIRS_FILE, TABLE_FILE = "preference.json", "dpo_table.json"


def preference_rows(rows: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """One pair per training row with a one-word question: the prompt is the row's turns up to a (seeded) such
    question, `chosen` its true answer, `rejected` a different answer to the same kind of question."""
    answers: dict[str, set[str]] = {kind: set() for kind in ONE_WORD}
    for row in rows:
        for k, kind in enumerate(row.get("types", [])):
            if kind in answers:
                answers[kind].add(row["conversations"][2 * k + 1]["value"])
    pools = {kind: sorted(values) for kind, values in answers.items()}
    rng = random.Random(seed)
    pairs = []
    for row in rows:
        turns = [k for k, kind in enumerate(row.get("types", [])) if kind in pools and len(pools[kind]) > 1]
        if not turns:
            continue
        k = rng.choice(turns)
        conv = row["conversations"]
        right = conv[2 * k + 1]["value"]
        wrong = rng.choice([a for a in pools[row["types"][k]] if a != right])
        pairs.append(
            {
                "id": f"pref-{row['id']}",
                "image": row["image"],
                "type": row["types"][k],
                "prompt": conv[: 2 * k + 1],
                "chosen": right,
                "rejected": wrong,
            }
        )
    return pairs


def dpo_config(workdir: Path, steps: int | None = None, overrides: list[str] = ()) -> RunConfig:
    """`configs/demo/dpo.yaml` with its paths moved under `workdir`."""
    data = load_yaml(CONFIG)
    w = workdir
    data["model"]["language_model"] = str(w / "models" / "lm")
    data["model"]["vision_tower"] = str(w / "models" / "vision")
    data["model"]["init_from"] = str(w / "model")
    data["data"]["train"] = [{"path": str(w / "data" / PAIRS_FILE), "image_folder": str(w / "data" / "images")}]
    data["train"]["output_dir"] = str(w / "model_dpo")
    if steps is not None:
        data["train"]["max_steps"] = steps
    apply_overrides(data, list(overrides))
    return from_dict(data)


def run_dpo_demo(
    workdir: str | Path = "runs/demo",
    steps: int | None = None,
    overrides: list[str] = (),
    eval_limit: int | None = None,
) -> dict[str, Any]:
    """Pairs from the demo's training rows -> stage dpo from its model -> held-out eval of both models; returns
    (and writes `<workdir>/dpo_table.json`) the reward figures and the per-type held-out exact match."""
    import torch

    w = Path(workdir).resolve()
    rows = json.loads((w / "data" / "finetune.json").read_text())
    pairs = preference_rows(rows)
    (w / "data" / PAIRS_FILE).write_text(json.dumps(pairs))
    log.info("demo-dpo: %d preference pairs from %d training rows", len(pairs), len(rows))
    d = w / "data"
    data = shapes.DemoData(d, d / "images", d / "pretrain.json", d / "finetune.json", d / "eval.json", d / "meta.json")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # as the demo: tiny matrices, a second thread only spins
    try:
        before = evaluate_model(w / "model", data, w / "eval" / "before_dpo", eval_limit, False)
        result = train_run(dpo_config(w, steps, overrides))
        after = evaluate_model(w / "model_dpo", data, w / "eval" / "after_dpo", eval_limit, False)
    finally:
        torch.set_num_threads(previous)
    logs = [h for h in result.log_history if "rewards/margins" in h]
    keys = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
    table = {
        "pairs": len(pairs),
        "steps": result.global_step,
        "first_log": {k: round(logs[0][k], 4) for k in keys},
        "last_log": {k: round(logs[-1][k], 4) for k in keys},
        "held_out_exact_match": {
            name: {t: round(s["exact_match"], 4) for t, s in [*r["per_type"].items(), ("overall", r["overall"])]}
            for name, r in (("before dpo", before), ("after dpo", after))
        },
    }
    (w / TABLE_FILE).write_text(json.dumps(table, indent=2))
    print(json.dumps(table, indent=2))
    return table
