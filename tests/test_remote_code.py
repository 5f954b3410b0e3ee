"""Model folders never run their own code: an `auto_map` folder is one line and exit 2, with no prompt."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from llava_train.cli import main
from llava_train.data.tokenize import load_tokenizer
from llava_train.errors import RemoteCodeError
from llava_train.model.weights import resolve_folder
from llava_train.remote_code import refuse_remote_code


def _code_folder(root: Path, config_file: str = "config.json") -> Path:
    """A folder whose `auto_map` points at its own module; importing that module writes `ran.txt`."""
    folder = root / "custom"
    folder.mkdir()
    marker = root / "ran.txt"
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = {"model_type": "llava", "auto_map": {"AutoModelForImageTextToText": "modeling_evil.Evil"}}
    (folder / config_file).write_text(json.dumps(config))
    return folder


def test_predict_refuses_an_auto_map_folder_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _code_folder(tmp_path)

    class NoInput(io.StringIO):
        def readline(self, *args: object) -> str:
            raise AssertionError("prompted on stdin")

    monkeypatch.setattr(sys, "stdin", NoInput())
    assert main(["predict", str(folder), "--prompt", "hi"]) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("llava-train: error: ") and "config.json has an `auto_map`" in line
    assert captured.out == "" and not (tmp_path / "ran.txt").exists()


@pytest.mark.parametrize("config_file", ["config.json", "tokenizer_config.json", "preprocessor_config.json"])
def test_every_model_side_load_refuses_auto_map(tmp_path: Path, config_file: str) -> None:
    folder = _code_folder(tmp_path, config_file)
    for load in (refuse_remote_code, resolve_folder, load_tokenizer):
        with pytest.raises(RemoteCodeError, match=f"{config_file} has an `auto_map`"):
            load(str(folder))
    assert not (tmp_path / "ran.txt").exists()


def test_every_auto_class_load_in_src_passes_trust_remote_code_false() -> None:
    src = Path(__file__).parents[1] / "src" / "llava_train"
    missing = []
    for path in src.rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if (
                "Auto" in code
                and ".from_pretrained(" in code
                and "`" not in code
                and "trust_remote_code=False" not in code
            ):
                missing.append(f"{path.relative_to(src)}:{n}")
    assert missing == []
