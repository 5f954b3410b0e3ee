"""Shards are opened on use and closed: more shards than `ulimit -n` allows open files validate and load."""

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
    from llava_train.config import DataConfig, ModelConfig, RunConfig, SourceConfig
    from llava_train.data.dataset import build_dataset
    from llava_train.data.tokenize import load_tokenizer
    from llava_train.data.validate import validate
    from tiny_models import make_parts

    root, tok = sys.argv[1], sys.argv[2]
    sources = [SourceConfig(f"{root}/jsonl", name="jsonl"), SourceConfig(f"{root}/parquet", name="parquet")]
    data = DataConfig(train=sources, template="plain", model_max_length=64, cache_dir=f"{root}/cache")
    parts = make_parts(load_tokenizer(tok), 4, 512, "plain")
    cfg = RunConfig(stage="pretrain", model=ModelConfig(), data=data)
    reports = [validate(cfg, parts, num_workers=1) for _ in range(2)]  # the second reads every cache
    ds = build_dataset(data, parts, cache_dir=f"{root}/cache")
    ids = [ds[i]["id"] for i in range(0, len(ds), 97)]
    print(json.dumps({"rows": [r["total_rows"] for r in reports], "bad": reports[0]["total_bad"], "ids": ids}))
    """
)


def test_more_shards_than_open_files_validate_and_load(tmp_path: Path, llama_tokenizer_dir: str) -> None:
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
        [sys.executable, "-c", SCRIPT, str(tmp_path), llama_tokenizer_dir],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["rows"] == [2 * N_SHARDS, 2 * N_SHARDS] and out["bad"] == 0
    assert out["ids"] == [f"j{i}" if i < N_SHARDS else f"p{i - N_SHARDS}" for i in range(0, 2 * N_SHARDS, 97)]
