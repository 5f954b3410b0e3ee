"""Scan progress bars: drawn with rows/s and bad rows on a terminal, silent otherwise and on other local ranks."""

from __future__ import annotations

import io

import pytest

from llava_train.utils.progress import scan_progress, show_progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_counts_and_draws_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    with scan_progress("scanning x", 10, enabled=True) as p:
        p.update(4, 1)
        p.update(6, 0)
    assert (p.rows, p.bad) == (10, 1)
    err = capsys.readouterr().err
    assert "scanning x" in err and "10/10" in err and "bad=1" in err and "rows/s" in err
    with scan_progress("quiet", 10, enabled=False) as p:
        p.update(10, 2)
    assert capsys.readouterr().err == "" and (p.rows, p.bad) == (10, 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert show_progress(_Tty()) and not show_progress(io.StringIO())
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not show_progress(_Tty())
