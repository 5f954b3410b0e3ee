"""The builder under DeepSpeed ZeRO-3 with 2 CPU processes: partitioned build, weight loading, projector I/O."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("zero3_build_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.distributed
def test_build_and_projector_io_under_zero3(tiny_parts, tmp_path) -> None:
    pytest.importorskip("deepspeed")
    env = {
        **os.environ,
        # The shm comm extension compiles once (~40 s) and is reused from this folder.
        "TORCH_EXTENSIONS_DIR": os.environ.get(
            "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "llava_train_ext")
        ),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("RANK", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
    cmd += [str(WORKER), str(tmp_path), str(ROOT / "configs" / "deepspeed" / "zero3.json")]
    cmd += [tiny_parts["llama"], tiny_parts["clip"]]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, report in enumerate(reports):
        assert report == {
            "rank": r,
            "partitioned": True,
            "embedding_rows": 513,
            "lm_loaded": True,
            "vision_loaded": True,
            "projector_round_trip": True,
            "init_from_projector": True,
            "zero3": True,
        }
