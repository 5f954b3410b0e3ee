"""`components.load_components` resolves a run's model sources once and builds everything from what it resolved."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from llava_train.config import from_dict
from llava_train.train import run
from tiny_models import tiny_config, write_tiny_data


def count_calls(monkeypatch: pytest.MonkeyPatch, calls: Counter, name: str, original: Callable[..., Any]) -> None:
    """Wrap `original` wherever a loaded llava_train module holds it (however it was imported) and count calls."""

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[name] += 1
        return original(*args, **kwargs)

    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("llava_train") and getattr(module, name, None) is original:
            monkeypatch.setattr(module, name, counted)


def test_a_run_resolves_init_from_and_the_geometry_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoConfig

    import llava_train.model.init_source as init_source_module
    import llava_train.model.sources as sources_module
    import llava_train.model.vision as vision_module

    ws = write_tiny_data(tmp_path / "data")
    ws["lm"], ws["vision"] = str(tmp_path / "models" / "lm"), str(tmp_path / "models" / "vision")
    stage1 = tmp_path / "stage1"
    run(from_dict(tiny_config(ws, "pretrain", str(stage1), max_steps=1, save_strategy="no")))

    calls: Counter = Counter()
    count_calls(monkeypatch, calls, "init_source", init_source_module.init_source)
    count_calls(monkeypatch, calls, "resolve_sources", sources_module.resolve_sources)
    count_calls(monkeypatch, calls, "run_geometry", vision_module.run_geometry)
    reads: Counter = Counter()
    real = AutoConfig.from_pretrained.__func__

    def read(cls: Any, name: Any, *args: Any, **kwargs: Any) -> Any:
        if sys._getframe(1).f_globals.get("__name__", "").startswith("llava_train"):  # ours, not transformers'
            reads[str(name)] += 1
        return real(cls, name, *args, **kwargs)

    monkeypatch.setattr(AutoConfig, "from_pretrained", classmethod(read))
    config = tiny_config(ws, "finetune", str(tmp_path / "finetune"), max_steps=1, save_strategy="no")
    config["model"]["init_from"] = str(stage1)
    run(from_dict(config))
    assert calls == Counter({"init_source": 1, "resolve_sources": 1, "run_geometry": 1})
    # The init_from folder's config is read by llava-train once (resolve_sources: its vision config).
    assert reads == Counter({str(stage1): 1})
