"""Typed run configuration: dataclasses loaded from YAML, overridable from the command line.

One place for every option a run has. `load_config(path, overrides)` builds a `Config` from an
optional YAML file, a model preset and `section.field=value` overrides, then `validate()` checks
every cross-field rule once, at start-up, raising `ConfigError` with a message that names the
option and says what to change. The resolved config is saved next to every run and checkpoint.
The schema is megamor/config/schema.py, the rules megamor/config/validation.py; this module
loads and saves.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, Optional

import yaml

from megamor.config.schema import (CheckpointConfig, Config, DataConfig, ModelConfig,
                                   ParallelConfig, RoutingConfig, RunConfig, TrackingConfig,
                                   TrainConfig)
from megamor.config.validation import ARCHS, ROUTERS, SHARING, ConfigError, validate
from megamor.presets import MODEL_PRESETS, PRESET_TRAIN

__all__ = ["ARCHS", "ROUTERS", "SHARING", "CheckpointConfig", "Config", "ConfigError",
           "DataConfig", "ModelConfig", "ParallelConfig", "RoutingConfig", "RunConfig",
           "TrackingConfig", "TrainConfig", "check_override", "config_from_dict", "load_config",
           "parse_override", "save_config", "validate"]

def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if f != int(f):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if tp is list or origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return list(value)
    return value


def _section_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _apply(section_obj: Any, values: dict, where: str) -> None:
    hints = _section_types(type(section_obj))
    for key, value in values.items():
        if key not in hints:
            known = ", ".join(sorted(hints))
            raise ConfigError(f"{where}: unknown option '{key}' (known: {known})")
        setattr(section_obj, key, _coerce(value, hints[key], f"{where}.{key}"))


def config_from_dict(data: dict, source: str = "<dict>") -> Config:
    cfg = Config()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections")
    sections = _section_types(Config)
    # A model preset fills the model section first; explicit keys then override it.
    model_values = dict(data.get("model") or {})
    preset = model_values.get("preset")
    if preset is not None:
        if preset not in MODEL_PRESETS:
            raise ConfigError(
                f"{source}: model.preset={preset!r} is unknown; choose one of "
                f"{', '.join(MODEL_PRESETS)}"
            )
        _apply(cfg.model, MODEL_PRESETS[preset], f"{source}: preset {preset}")
        _apply(cfg.train, PRESET_TRAIN.get(preset, {}), f"{source}: preset {preset}")
    for name, values in data.items():
        if name not in sections:
            raise ConfigError(
                f"{source}: unknown section '{name}' (known: {', '.join(sections)})"
            )
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{name}' must be a mapping")
        _apply(getattr(cfg, name), values, f"{source}: {name}")
    return cfg


def parse_override(text: str) -> tuple[str, str, Any]:
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(
            f"override {text!r} must look like section.option=value, e.g. model.hidden_size=128"
        )
    key, raw = text.split("=", 1)
    section, option = key.strip().split(".", 1)
    return section, option, yaml.safe_load(raw) if raw != "" else ""


def check_override(text: str) -> tuple[str, str, Any]:
    """One `section.option=value` from the command line: its section, option and (coerced)
    value, or a ConfigError that names the override itself."""
    section, option, value = parse_override(text)
    sections = _section_types(Config)
    if section not in sections:
        raise ConfigError(f"{text}: unknown section '{section}' (known: {', '.join(sections)})")
    hints = _section_types(sections[section])
    if option not in hints:
        raise ConfigError(f"{text}: unknown option '{option}' in section {section} (known: "
                          f"{', '.join(sorted(hints))})")
    value = _coerce(value, hints[option], f"{section}.{option}")
    if (section, option) == ("model", "preset") and value is not None \
            and value not in MODEL_PRESETS:
        raise ConfigError(f"model.preset={value!r} is unknown; choose one of "
                          f"{', '.join(MODEL_PRESETS)}")
    return section, option, value


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    """YAML file (optional) -> preset -> overrides, in that order of precedence (last wins).
    Errors name the file, or the override they come from."""
    data: dict = {}
    source = "command line"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
    for text in overrides or []:
        section, option, value = check_override(text)
        data.setdefault(section, {})
        if data[section] is None:
            data[section] = {}
        data[section][option] = value
    return config_from_dict(data, source)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
