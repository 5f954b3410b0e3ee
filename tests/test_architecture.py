"""The package's structure as the README states it: imports flow one way through named layers, with no cycle, and
no module is over the size limit. Every import counts, at the top of a module or inside a function (a lazy import
is still a dependency); annotation-only imports under `if TYPE_CHECKING:` do not (they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "llava_train"
MAX_LINES = 400

# Bottom to top. A module may import modules of its own layer or of a layer below, never one above. The first
# match (longest prefix) names a module's layer; prefixes are dotted module names under `llava_train.`.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "leaves",
        (
            "errors",
            "run_files",
            "remote_code",
            "utils",
            "data.errors",
            "data.special_tokens",
            "data.tiny_tokenizer",
        ),
    ),
    (
        "config",
        ("config_io", "config_data", "config_eval", "config_fsdp", "config", "archs", "stages", "llava_format"),
    ),
    ("data", ("data",)),
    ("model", ("model",)),
    ("assembled parts", ("components", "preflight", "infer", "lmms")),
    ("training", ("training",)),
    ("entry points", ("train", "commands")),
    ("tools", ("tools",)),
    ("cli", ("cli",)),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


def layer_of(module: str) -> int:
    """Index in LAYERS of the longest prefix naming `module` (package `__init__`s sit with their package)."""
    best: tuple[int, int] | None = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            named = module == prefix or module.startswith(prefix + ".")
            if named and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    if best is None:
        return 0 if module == "" else -1
    return best[0]


def runtime_imports(source: str, own: str) -> set[str]:
    """Project modules the module `own` with this `source` imports at run time (function bodies included,
    `if TYPE_CHECKING:` excluded)."""
    found: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            test = node.test
            if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
            ):
                for child in node.orelse:
                    self.visit(child)
                return
            self.generic_visit(node)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.level == 0 and node.module and node.module.split(".")[0] == "llava_train":
                base = node.module.removeprefix("llava_train").lstrip(".")
                for alias in node.names:
                    sub = f"{base}.{alias.name}" if base else alias.name
                    found.add(sub if sub in MODULES else base)

        def visit_Import(self, node: ast.Import) -> None:
            for alias in node.names:
                if alias.name.split(".")[0] == "llava_train":
                    found.add(alias.name.removeprefix("llava_train").lstrip("."))

    Visitor().visit(ast.parse(source))
    return {m for m in found if m in MODULES and m != own}


GRAPH = {name: runtime_imports(path.read_text(), name) for name, path in MODULES.items()}


def test_every_module_has_a_layer() -> None:
    assert [m for m in MODULES if m and layer_of(m) < 0] == []


def test_no_import_points_up_a_layer() -> None:
    upward = [
        f"{m} ({LAYERS[layer_of(m)][0]}) -> {d} ({LAYERS[layer_of(d)][0]})"
        for m, deps in GRAPH.items()
        for d in deps
        if m and layer_of(d) > layer_of(m)
    ]
    assert upward == []


def test_no_import_cycle() -> None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(GRAPH[m]):
            if state.get(d) == 1:
                cycles.append(path[path.index(d) :] + [d])
            elif d not in state:
                visit(d, [*path, d])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_the_checker_sees_lazy_imports_and_ignores_annotation_only_ones() -> None:
    """The rule has teeth: a function-level import counts, a TYPE_CHECKING one does not."""
    code = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from llava_train.train import run\n"
        "def f():\n    from llava_train.cli import main\n"
    )
    assert runtime_imports(code, "utils.modules") == {"cli"}
    assert layer_of("cli") > layer_of("utils.modules")


def test_no_module_over_the_size_limit() -> None:
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
