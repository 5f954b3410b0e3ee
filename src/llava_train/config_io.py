"""Config I/O without any schema: nested dicts -> documented dataclasses (typed coercion, errors listing the valid
keys), `key=value` overrides, YAML files, and the generated key reference. Imports only `llava_train.errors`
(ConfigError lives there with every user-facing error; importing it from here keeps working).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from llava_train.errors import ConfigError


class _NoAliasLoader(yaml.SafeLoader):
    """safe_load without aliases: a 1 KB "billion laughs" file of nested `*refs` expands to gigabytes once the
    resolved config copies it out, and no recipe needs an alias."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(
                f"YAML alias *{event.anchor} at line {event.start_mark.line + 1} of {self.name}: aliases are not "
                "allowed in configs; write the value out"
            )
        return super().compose_node(parent, index)


def safe_load_no_alias(text: str, name: str = "<override>") -> Any:
    """`yaml.safe_load` refusing aliases (ConfigError)."""
    loader = _NoAliasLoader(text)
    loader.name = name
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def check_choice(name: str, value: Any, choices: tuple) -> None:
    """ConfigError naming the key and the valid values unless `value` is one of `choices`."""
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of: {', '.join(map(str, choices))}")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _list_item(tp: Any) -> Any:
    """The item type of `list[X]` (None for any other type)."""
    tp = _strip_optional(tp)
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp) or (Any,)
        return item
    return None


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Coerce YAML scalars to the annotated type (ints given for floats, etc.)."""
    if value is None:
        return None
    tp = _strip_optional(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return build(tp, value, where)
    item_tp = _list_item(tp)
    if item_tp is not None:
        if not isinstance(value, list):
            value = [value]
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError as e:
            raise ConfigError(f"{where} must be a number, got {value!r}") from e
    if tp is int and isinstance(value, str):
        try:
            return int(value)
        except ValueError as e:
            raise ConfigError(f"{where} must be an integer, got {value!r}") from e
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp is str and not isinstance(value, str):
        return str(value)
    return value


def build(cls: type, data: dict[str, Any], where: str) -> Any:
    """The dataclass `cls` from a nested dict (values coerced to the annotations); unknown keys list the valid ones."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {data!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; valid keys in "
            f"{where or 'the top level'}: {', '.join(sorted(names))}"
        )
    hints = _field_types(cls)
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where or 'config'}: {e}") from e


# -- overrides: `a.b=c` and the `--a.b=c` form a wandb sweep agent passes --------------------------------


def split_override(text: str) -> tuple[str, str]:
    """`data.model_max_length=1024` or `--data.model_max_length=1024` -> ("data.model_max_length", "1024"): the one
    reader of the `key=value` form (run overrides, sweep agent flags, sweep trial arguments)."""
    body = text[2:] if text.startswith("--") else text
    if "=" not in body:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. data.model_max_length=1024)")
    key, raw = body.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    return key, raw


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse `data.model_max_length=1024` or `--data.model_max_length=1024` into (path, value).

    The value is parsed as YAML, so `1e-3`, `true`, `null`, `[a, b]` get their natural types.
    """
    key, raw = split_override(text)
    value = safe_load_no_alias(raw) if raw.strip() else ""
    if value == "None":  # a wandb sweep agent writes a null sweep value as Python's None
        value = None
    # YAML 1.1 reads 1e-3 as a string; sweeps pass exactly such values.
    if isinstance(value, str) and any(c in value for c in ".eE"):
        with contextlib.suppress(ValueError):
            value = float(value)
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted overrides to a nested config dict (returns the same dict)."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a mapping")
            node = nxt
        node[path[-1]] = value
    return data


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML config file into a dict, with a clear error for a missing or malformed file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = safe_load_no_alias(p.read_text(), str(p)) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level")
    return data


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, type, documentation) for every key of a config dataclass: the generated config reference.

    Nested dataclasses are listed under their dotted prefix, items of dataclass lists under `key[].`.
    """
    doc = (cls.__doc__ or "").strip()
    docs = _parse_field_docs(doc)
    rows: list[tuple[str, str, str]] = []
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        tp = _strip_optional(hints[f.name])
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, key + "."))
            continue
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        )
        rows.append((key, f"{_type_name(hints[f.name])} = {default!r}", docs.get(f.name, "")))
        item = _list_item(hints[f.name])
        if item is not None and dataclasses.is_dataclass(item):
            rows.extend(describe(item, f"{key}[]."))
    return rows


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _parse_field_docs(doc: str) -> dict[str, str]:
    """Read `name: text` paragraphs (continuation lines indented) from a dataclass docstring."""
    out: dict[str, str] = {}
    current: list[str] = []
    for line in doc.splitlines():
        stripped = line.strip()
        head = stripped.split(":", 1)[0]
        if (
            ":" in stripped
            and head
            and all(part.isidentifier() for part in head.split(", "))
            and line.startswith("    ")
            and not line.startswith("        ")
        ):
            current = [n.strip() for n in head.split(",")]
            for n in current:
                out[n] = stripped.split(":", 1)[1].strip()
        elif current and stripped:
            for n in current:
                out[n] += " " + stripped
        elif not stripped:
            current = []
    return out


def sweep_run_output_dir(output_dir: str, environ: Mapping[str, str] | None = None) -> str:
    """The run folder to use under a wandb agent: `<output_dir>/<WANDB_RUN_ID>` when WANDB_SWEEP_ID is set.

    Every agent trial runs the same command, so without this all trials would share one folder
    (wandb's `${envvar:...}` macros are expanded once per agent, not per run).
    """
    env = os.environ if environ is None else environ
    if env.get("WANDB_SWEEP_ID") and env.get("WANDB_RUN_ID"):
        return str(Path(output_dir) / env["WANDB_RUN_ID"])
    return output_dir
