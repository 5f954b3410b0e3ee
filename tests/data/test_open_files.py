"""Shards are opened on use and closed: more shards than `ulimit -n` allows open files validate, load and train."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

N_SHARDS = 2000  # of each kind, under a limit of 256 open files

SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    from llava_train.components import load_components
    from llava_train.config import from_dict
    from llava_train.data.dataset import build_dataset
    from llava_train.data.validate import validate
    from llava_train.train import run
    from tiny_models import tiny_config

    root = sys.argv[1]
    ws = {"lm": f"{root}/lm", "vision": f"{root}/vision", "pretrain": "", "images": root}
    raw = tiny_config(ws, "pretrain", f"{root}/run", max_steps=2, save_strategy="no")
    raw["data"]["train"] = [{"path": f"{root}/{kind}", "name": kind} for kind in ("jsonl", "parquet")]
    raw["data"]["cache_dir"] = f"{root}/cache"
    cfg = from_dict(raw)
    parts = load_components(cfg, weights=False)
    reports = [validate(cfg, parts, num_workers=1) for _ in range(2)]  # the second reads every cache
    ds = build_dataset(cfg.data, parts, cache_dir=f"{root}/cache")
    ids = [ds[i]["id"] for i in range(0, len(ds), 97)]
    result = run(cfg)
    rows = [r["total_rows"] for r in reports]
    print(json.dumps({"rows": rows, "bad": reports[0]["total_bad"], "ids": ids, "trained": bool(result)}))
    """
)


def test_more_shards_than_open_files_validate_load_and_train(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "jsonl").mkdir()
    (tmp_path / "parquet").mkdir()
    conv = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]
    for k in range(N_SHARDS):
        row = {"id": f"j{k}", "conversations": conv}
        (tmp_path / "jsonl" / f"{k:05d}.jsonl").write_text(json.dumps(row) + "\n")
        pq.write_table(pa.table({"id": [f"p{k}"], "conversations": [conv]}), tmp_path / "parquet" / f"{k:05d}.parquet")
    tests = Path(__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests.parent / "src"), str(tests)])}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["rows"] == [2 * N_SHARDS, 2 * N_SHARDS] and out["bad"] == 0 and out["trained"]
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert out["ids"] == [f"j{i}" if i < N_SHARDS else f"p{i - N_SHARDS}" for i in range(0, 2 * N_SHARDS, 97)]
