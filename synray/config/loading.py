"""Loading a run configuration: built-in configs, YAML files, `key.path=value` overrides and validation."""

from __future__ import annotations

import copy
import json
from collections.abc import Collection, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from synray.config.base import ConfigError
from synray.config.sections import RunConfig


# ------------------------------------------------------------------------------------- loading
def builtin_names() -> list[str]:
    root = resources.files("synray") / "configs"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def builtin_configs() -> list[tuple[str, str]]:
    """(name, one-line description) of every built-in config."""
    out = []
    for name in builtin_names():
        raw = _read_yaml(resources.files("synray") / "configs" / f"{name}.yaml", name)
        out.append((name, str(raw.get("description", "")).strip().splitlines()[0] if raw.get("description") else ""))
    return out


def _read_yaml(path: Any, label: str) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {label}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config {label}: {e}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"malformed YAML in {label}: {e}") from None
    if raw is None:   # all defaults would be a 512-px, 50-step diffusion run on the CPU: surely not what was meant
        raise ConfigError(f"config {label} is empty; start from a built-in one: "
                          f"`synray config show local > {label}`")
    if not isinstance(raw, dict):
        raise ConfigError(f"config {label} must be a mapping of sections, got {type(raw).__name__}")
    return raw


def load_raw(name_or_path: str | None) -> dict[str, Any]:
    """The YAML mapping of a built-in config name or a file path (no validation yet)."""
    if name_or_path is None:
        name_or_path = "local"
    p = Path(name_or_path)
    if p.is_file() or p.suffix in (".yaml", ".yml") or "/" in name_or_path:
        if p.is_dir():
            raise ConfigError(f"config {p} is a folder; give a YAML file or a built-in name")
        return _read_yaml(p, str(p))
    if name_or_path in builtin_names():   # before a folder of the same name (`shapes/`, a run's outputs)
        return _read_yaml(resources.files("synray") / "configs" / f"{name_or_path}.yaml", name_or_path)
    raise ConfigError(f"unknown config {name_or_path!r}: not a file, and not a built-in config "
                      f"(built-in: {', '.join(builtin_names())})")


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], typed value); the value is read as YAML (1, 0.5, true, [1,2])."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value")
    key, _, text = item.partition("=")
    path = [k for k in key.strip().split(".")]
    if not key.strip() or any(not k for k in path):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return path, value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    for item in overrides or []:
        path, value = parse_override(item)
        node = out
        for i, k in enumerate(path[:-1]):
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(path[:i + 1])} is a value, not a section")
            node = nxt
        node[path[-1]] = value
    return out


def _format_errors(err: ValidationError, raw: dict[str, Any]) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        kind = e["type"]
        if kind == "extra_forbidden":
            parent = _section_at(e["loc"][:-1])
            allowed = ", ".join(parent.model_fields) if parent else ""
            lines.append(f"  {loc}: unknown key" + (f" (allowed here: {allowed})" if allowed else ""))
            continue
        value = e.get("input")
        shown = json.dumps(value, default=str) if not isinstance(value, dict) else "{...}"
        section = _section_at(e["loc"])
        if kind == "model_type" and section is not None:   # pydantic's "valid dictionary or instance of ..."
            lines.append(f"  {loc}: {shown} is not allowed: it is a section; set its keys ("
                         f"{', '.join(section.model_fields)}), e.g. {loc}.{next(iter(section.model_fields))}=...")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        if kind == "literal_error":
            msg = "must be one of " + msg.removeprefix("Input should be ")
        lines.append(f"  {loc}: {shown} is not allowed: {msg}")
    return "invalid configuration:\n" + "\n".join(lines)


def _section_at(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = RunConfig
    for key in loc:
        field = model.model_fields.get(str(key))
        if field is None:
            return None
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            return None
    return model


Choices = Mapping[str, Collection[str]]


def validate(raw: dict[str, Any], choices: Choices | None = None) -> RunConfig:
    """The typed config; `choices` ({"train.loss": names, ...}: synray.plan.registry_choices) are checked too."""
    try:
        return RunConfig.model_validate(raw, context={"choices": dict(choices or {})})
    except ValidationError as e:
        raise ConfigError(_format_errors(e, raw)) from None


def load_config(name_or_path: str | None = None, overrides: list[str] | None = None,
                choices: Choices | None = None) -> RunConfig:
    """Load a built-in config or YAML file, apply `key.path=value` overrides, and validate it."""
    return validate(apply_overrides(load_raw(name_or_path), overrides), choices)


def with_overrides(cfg: RunConfig, overrides: dict[str, Any], choices: Choices | None = None) -> RunConfig:
    """A copy of cfg with {"a.b": value} applied and validated (derived configs, sweep trials)."""
    raw = cfg.to_dict()
    items = [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    return validate(apply_overrides(raw, items), choices)
