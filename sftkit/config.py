"""One frozen dataclass per command, and the loading that fills it: defaults < config file < flags.

Each field carries its help text and its ms-swift spellings in metadata; unknown keys are errors
with a close-match hint, and validation reports every problem at once.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
from dataclasses import dataclass, field

from .paths import bundled

TRUE = ("true", "1", "yes", "on")
FALSE = ("false", "0", "no", "off")


class ConfigError(ValueError):
    """Every problem with a config, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


def option(default, help: str, *, aliases: tuple[str, ...] = (), choices: tuple | None = None):
    """A config field with its help text, extra CLI spellings and allowed values."""
    factory = {"default_factory": lambda: default} if isinstance(default, (list, dict)) else {"default": default}
    return field(metadata={"help": help, "aliases": aliases, "choices": choices}, **factory)


@dataclass(frozen=True)
class PreviewConfig:
    """sftkit preview: show how rows become tokens and which of them train."""

    dataset: tuple[str, ...] = option((), "dataset files, registered names, hf::ID or ms::ID (default: the bundled example)",
                                      aliases=("custom_train_dataset_path",))
    template: str = option("auto", "chat template name (sftkit list templates) or 'auto' for the tokenizer's own",
                           aliases=("template_type",))
    tokenizer: str | None = option(None, "tokenizer directory or hub id (default: the embedded SmolLM2-135M-Instruct)",
                                   aliases=("model", "model_id_or_path"))
    system: str | None = option(None, "system prompt for rows that have none")
    max_length: int | None = option(2048, "truncate examples to this many tokens (None: no limit)")
    truncation_side: str = option("right", "which end truncation cuts", choices=("right", "left"))
    train_on: str = option("assistant", "which tokens train", choices=("assistant", "last", "all"))
    check_dataset_strategy: str = option("error", "what a bad row does", choices=("error", "warning", "skip"))
    num_examples: int = option(2, "how many examples to print", aliases=("show_dataset_sample",))
    color: bool | None = option(None, "mark trainable tokens with color (default: when printing to a terminal)")

    def problems(self) -> list[str]:
        return [p for p in [_positive("num_examples", self.num_examples, zero_ok=True),
                            _positive("max_length", self.max_length)] if p]

    def datasets(self) -> tuple[str, ...]:
        return self.dataset or (bundled("data/chat.jsonl"),)


def _positive(name: str, value, zero_ok: bool = False) -> str | None:
    if value is None or value > 0 or (zero_ok and value == 0):
        return None
    return f"{name} must be {'>= 0' if zero_ok else '> 0'}, got {value}"


def config_fields(cls) -> list[dataclasses.Field]:
    return list(dataclasses.fields(cls))


def spellings(cls) -> dict[str, str]:
    """Every accepted key spelling (underscores, dashes, ms-swift aliases) -> field name."""
    names = {}
    for item in config_fields(cls):
        for spelling in (item.name,) + tuple(item.metadata.get("aliases", ())):
            names[spelling] = item.name
            names[spelling.replace("_", "-")] = item.name
    return names


def read_config_file(path: str) -> dict:
    """A flat mapping from a .yaml/.yml/.json file."""
    if not os.path.isfile(path):
        raise ConfigError([f"config file '{path}' does not exist"])
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
    except Exception as error:  # yaml and json raise different types; both mean a broken file
        raise ConfigError([f"config file '{path}' does not parse: {error}"]) from None
    if not isinstance(values, dict):
        raise ConfigError([f"config file '{path}' must hold a mapping of option names to values"])
    return values


def build_config(cls, file: str | None = None, overrides: dict | None = None):
    """defaults < file < overrides; every unknown key and bad value reported together."""
    names, problems, values = spellings(cls), [], {}
    sources = ([(read_config_file(file), f"config file '{file}'")] if file else []) + [(overrides or {}, "flags")]
    for mapping, origin in sources:
        for key, value in mapping.items():
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                problems.append(f"unknown option '{key}' in {origin}" + (f"; did you mean '{close[0]}'?" if close else ""))
                continue
            values[names[key]] = value
    hints = typing.get_type_hints(cls)
    by_name = {item.name: item for item in config_fields(cls)}
    converted = {}
    for name, value in values.items():
        try:
            converted[name] = coerce(value, hints[name])
        except ValueError as error:
            problems.append(f"{name}: {error}")
            continue
        choices = by_name[name].metadata.get("choices")
        if choices and converted[name] not in choices and converted[name] is not None:
            problems.append(f"{name} must be one of {', '.join(map(str, choices))}, got '{converted.pop(name)}'")
    # Build with the values that did convert, so semantic problems are reported alongside the rest.
    config = cls(**converted)
    problems += config.problems()
    if problems:
        raise ConfigError(problems)
    return config


def coerce(value, kind):
    """Turn a file or command-line value into the field's type (strings from the CLI, anything from files)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return coerce(value, next(arg for arg in args if arg is not type(None)))
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in TRUE + FALSE:
            return str(value).lower() in TRUE
        raise ValueError(f"expected true or false, got '{value}'")
    if kind in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got '{value}'") from None
        if kind is int:
            if not number.is_integer():
                raise ValueError(f"expected an integer, got '{value}'")
            return int(number)
        return number
    if origin is tuple:
        items = [value] if isinstance(value, str) else list(value)
        parts = [part.strip() for item in items for part in str(item).split(",") if part.strip()]
        return tuple(coerce(part, args[0]) for part in parts)
    if origin is dict or kind is dict:
        if isinstance(value, dict):
            return value
        try:
            parsed = json.loads(value)
        except (TypeError, json.JSONDecodeError):
            raise ValueError(f"expected a JSON object, got '{value}'") from None
        if not isinstance(parsed, dict):
            raise ValueError(f"expected a JSON object, got '{value}'")
        return parsed
    return value if isinstance(value, str) else str(value)


def config_dict(config) -> dict:
    """The resolved config as plain JSON-able data (written into the run directory)."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in dataclasses.asdict(config).items()}
