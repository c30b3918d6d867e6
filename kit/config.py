"""Typed experiment configs: loading, checking and saving them; YAML files in `kit/configs/` hold overrides only.

One config file per experiment; its file stem is the run name, so `runs/<name>/fold<k>/` holds what the run
made (`config.yaml`, `model.pt`, `last.pt`, `log.csv`, `oof.csv`). Every call builds fresh objects from the
defaults, so changing one config never changes another.

    cfg = load_config("demo_seg", **{"train.epochs": 2, "data.fold": 1})
    cfg = load_config("runs/demo_seg/fold0/config.yaml")       # a saved, resolved config
    cfg = load_config("demo_seg", train={"epochs": 2})          # nested dicts merge, they do not replace

Which dataclass a file builds is chosen by its `task` key (`"seg"` when absent): the stage's config class
(`kit.stages.STAGES`). The shared sections are in `kit.sections`, each stage's own in its folder
(`kit/stage1/config.py`, `kit/stage2/config.py`); the class gives `model_spec()` (model name and kwargs) and
`recipe()` (its input recipe).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .sections import ConfigError
from .stages import STAGES

CONFIG_DIR = Path(__file__).parent / "configs"

log = logging.getLogger("kit.config")



# ---------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------
# Top-level configs, one class per task
# ---------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------
# Building, loading, saving
# ---------------------------------------------------------------------------------------------------------


def _field_names(obj: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(obj)]


def _check_value(path: str, value: Any, hint: Any) -> Any:
    """Coerce `value` to the annotated type `hint` or raise ConfigError naming the key."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{path} may not be null")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_value(path, value, option)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} fits none of {hint}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a list; got {value!r}")
        args = typing.get_args(hint)
        item = args[0] if args else Any
        return [_check_value(f"{path}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping; got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true/false; got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} must be an integer; got {value!r}")
        return value
    if hint is float:
        number = NUMBER.fullmatch(value.strip()) if isinstance(value, str) else None
        if number and number.group(2):
            return float(value)  # PyYAML (YAML 1.1) reads `lr: 5e-3` (an exponent, no dot) as the string '5e-3'
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} must be a number; got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string; got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported annotation {hint}")


NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")  # a decimal number, group 2 its exponent if any


def _nest(overrides: dict[str, Any]) -> dict[str, Any]:
    """{"train.epochs": 2, "data": {"fold": 1}} -> {"train": {"epochs": 2}, "data": {"fold": 1}}."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        parts = str(key).split(".")
        node = out
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key!r} conflicts with {part}={child!r}")
            node = child
        leaf = parts[-1]
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            node[leaf] = _merge(node[leaf], _nest(value))
        else:
            node[leaf] = _nest(value) if isinstance(value, dict) else value
    return out


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: nested dicts merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# Keys that older configs used, with what replaced them: such a YAML fails with this message.
RENAMED = {
    f"data.{old}": "data.slice_offsets_mm (the input slices as offsets in mm, e.g. [-2, -1, 0, 1, 2] for five "
                   "adjacent 1 mm slices, or [-40, -30, -20, -10, 0, 10, 20, 30, 40] for context: 4, context_mm: 10)"
    for old in ("context", "context_stride", "context_mm", "context_offsets_mm")
}


def _apply(obj: Any, updates: dict[str, Any], prefix: str = "") -> None:
    """Set nested dataclass fields from a nested dict, checking names and types."""
    hints = typing.get_type_hints(type(obj))
    names = _field_names(obj)
    for key, value in updates.items():
        path = f"{prefix}{key}"
        if path in RENAMED:
            raise ConfigError(f"config key {path!r} was replaced by {RENAMED[path]}")
        if key not in names:
            where = prefix[:-1] or type(obj).__name__
            raise ConfigError(f"unknown config key {path!r}; valid keys in {where}: {', '.join(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{path} is a section ({', '.join(_field_names(current))}); got {value!r}")
            _apply(current, value, prefix=f"{path}.")
        else:
            setattr(obj, key, _check_value(path, value, hints[key]))


def config_from_dict(values: dict[str, Any] | None = None, **overrides: Any) -> Any:
    """Build a fresh config from (possibly partial, possibly dotted) values on top of the defaults.

    Args:
        values: nested dict, e.g. a loaded YAML file; `task` picks the class (default "seg").
        **overrides: applied after `values`; dotted keys (`**{"train.epochs": 2}`) or nested dicts.

    Returns:
        A new config object (e.g. `SegConfig`), checked.

    Raises:
        ConfigError: an unknown key (the valid keys are listed), a value of the wrong type, or an unusable value.
    """
    merged = _merge(_nest(values or {}), _nest(overrides))
    task = merged.get("task", "seg")
    if task not in STAGES:
        raise ConfigError(f"unknown task {task!r}; valid: {', '.join(STAGES)}")
    cfg = STAGES[task].config()
    _apply(cfg, merged)
    cfg.check()
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as a plain nested dict (what `save_config` writes and checkpoints keep)."""
    return dataclasses.asdict(cfg)


def list_configs() -> list[str]:
    """Names of the packaged configs in `kit/configs/`."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def config_path(name_or_path: str | os.PathLike) -> Path:
    """Resolve a packaged config name or a YAML path.

    Raises:
        FileNotFoundError: neither a file nor a packaged name; the packaged names are listed.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    packaged = CONFIG_DIR / f"{path.name}.yaml"
    if path.suffix not in (".yaml", ".yml") and len(path.parts) == 1 and packaged.is_file():
        return packaged
    raise FileNotFoundError(f"config {str(name_or_path)!r} is neither a YAML file nor a packaged config; "
                            f"packaged: {', '.join(list_configs())}")


def load_config(name_or_path: str | os.PathLike, **overrides: Any) -> Any:
    """Load a packaged config by name or a YAML file, apply overrides, return a fresh object.

    The run name is the YAML's `name` key if it has one (a saved `config.yaml` keeps it), else the file stem;
    an override `name=...` wins over both.

    Args:
        name_or_path: e.g. "demo_seg" or "path/to/exp.yaml".
        **overrides: dotted keys (`**{"train.epochs": 2}`) or nested dicts (`train={"epochs": 2}`).

    Raises:
        FileNotFoundError: unknown config name (the packaged ones are listed).
        ConfigError: unknown keys (the valid ones are listed) or wrong value types.
    """
    path = config_path(name_or_path)
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping; got {type(values).__name__}")
    values.setdefault("name", path.stem)
    try:
        return config_from_dict(values, **overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write the resolved config (every field, not only overrides) as YAML; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path
