"""Repository text files carry no unresolved merge: a conflict marker once shipped in the README's command table."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = {".git", ".venv", ".venv-lmms", "runs", "build", "dist", "node_modules", "__pycache__"}
SUFFIXES = {".md", ".py", ".yaml", ".yml", ".toml", ".txt", ".sh", ".cfg", ".json", ".jinja"}
MARKER = re.compile(r"^(<{7}|>{7})( |$)|^={7}$", re.MULTILINE)


def _text_files() -> list[Path]:
    out = []
    stack = [ROOT]
    while stack:
        d = stack.pop()
        for p in d.iterdir():
            if p.is_dir():
                if p.name not in SKIP and not p.name.startswith(".venv") and not p.is_symlink():
                    stack.append(p)
            elif p.suffix in SUFFIXES or p.name in ("Makefile", "run"):
                out.append(p)
    return out


def test_no_merge_conflict_markers() -> None:
    files = _text_files()
    assert any(p.name == "README.md" for p in files)
    bad = [str(p.relative_to(ROOT)) for p in files if MARKER.search(p.read_text(errors="replace"))]
    assert bad == []


def test_the_marker_pattern_finds_a_conflict() -> None:
    assert MARKER.search("a\n<<<<<<< HEAD\nb\n=======\nc\n>>>>>>> branch\n")
    assert not MARKER.search("| --- | === |\n<<<<<<<< no\n")
