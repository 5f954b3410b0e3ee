"""`python -m lmms_eval --model llava_hf --model_args pretrained=DIR,... --tasks T1,T2 --output_path OUT ...`.

Writes `OUT/<model>/<date>_results.json` in lmms-eval 0.7.3's layout (`results[task]["exact_match,none"]`, stderr,
alias) with exact_match = the step of the evaluated `checkpoint-N/hf` / 100 (step-0: 0.0, another folder: 1.0),
and `OUT/fake_call.json` (argv and the launcher variables it saw). FAKE_LMMS_SLEEP: seconds to sleep first;
FAKE_LMMS_EXIT: exit with this code; FAKE_LMMS_DROP: a task left out of the results (lmms-eval exits 0 then).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path


def score(pretrained: str) -> float:
    match = re.search(r"(?:checkpoint|step)-(\d+)/hf/?$", pretrained)
    return int(match.group(1)) / 100 if match else 1.0


def main() -> int:
    parser = argparse.ArgumentParser()
    for flag in ("--model", "--model_args", "--tasks", "--batch_size", "--output_path", "--include_path", "--limit"):
        parser.add_argument(flag)
    parser.add_argument("--log_samples", action="store_true")
    args = parser.parse_args()
    Path(args.output_path).mkdir(parents=True, exist_ok=True)
    (Path(args.output_path) / "fake_pid").write_text(str(os.getpid()))  # a test may have to end it
    time.sleep(float(os.environ.get("FAKE_LMMS_SLEEP", "0")))
    if os.environ.get("FAKE_LMMS_EXIT"):
        print("fake lmms-eval: failing as asked", file=sys.stderr)
        return int(os.environ["FAKE_LMMS_EXIT"])
    model_args = dict(kv.split("=", 1) for kv in args.model_args.split(","))
    value = score(model_args["pretrained"])
    tasks = [t for t in args.tasks.split(",") if t != os.environ.get("FAKE_LMMS_DROP")]
    results = {
        t: {
            "alias": t,
            "exact_match,none": value,
            "exact_match_stderr,none": 0.0,
            "exact_match_stderr_clustered,none": "N/A",
        }
        for t in tasks
    }
    out = Path(args.output_path)
    folder = out / re.sub(r"[^\w]+", "__", model_args["pretrained"].strip("/"))
    folder.mkdir(parents=True, exist_ok=True)
    layout = {
        "results": results,
        "group_subtasks": {t: [] for t in tasks},
        "configs": {t: {"task": t} for t in tasks},
        "versions": {t: 0.0 for t in tasks},
        "n-samples": {t: {"original": 4, "effective": 4} for t in tasks},
        "higher_is_better": {t: {"exact_match": True} for t in tasks},
        "config": {"model": args.model, "model_args": args.model_args, "limit": args.limit},
        "lmms_eval_version": "0.7.3",
    }
    (folder / f"{time.strftime('%Y%m%d_%H%M%S')}_results.json").write_text(json.dumps(layout, indent=2))
    seen = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "CUDA_VISIBLE_DEVICES")}
    (out / "fake_call.json").write_text(json.dumps({"argv": sys.argv[1:], "env": seen}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
