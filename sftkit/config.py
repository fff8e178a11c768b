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


@dataclass(frozen=True)
class TrainConfig:
    """sftkit train: fine-tune a causal LM with LoRA or full parameters (ms-swift sft spellings accepted)."""

    # model and data
    model: str | None = option(None, "local model dir or hub id (default: the embedded SmolLM2-135M-Instruct)",
                               aliases=("model_id_or_path",))
    hub: str = option("modelscope", "where hub ids download from", choices=("modelscope", "hf"))
    model_revision: str | None = option(None, "hub revision of the model")
    model_cache_dir: str | None = option(None, "where hub downloads go")
    dataset: tuple[str, ...] = option((), "training data: files, registered names, hf::ID or ms::ID (default: the bundled example)",
                                      aliases=("custom_train_dataset_path",))
    val_dataset: tuple[str, ...] = option((), "validation data (default: dataset_test_ratio of the training data)",
                                          aliases=("custom_val_dataset_path",))
    dataset_test_ratio: float = option(0.01, "share of the training data held out for validation when no val_dataset")
    train_dataset_sample: int = option(-1, "use this many training rows after the split (-1: all)")
    template: str = option("auto", "chat template name or 'auto' (the tokenizer's own chat_template)", aliases=("template_type",))
    system: str | None = option(None, "system prompt for rows that have none (default: the template's)")
    max_length: int | None = option(2048, "truncate examples to this many tokens")
    truncation_side: str = option("right", "which end truncation cuts", choices=("right", "left"))
    check_dataset_strategy: str = option("error", "what a bad row does", choices=("error", "warning", "skip"))
    train_on: str = option("assistant", "which tokens train", choices=("assistant", "last", "all"))
    # method
    sft_type: str = option("lora", "LoRA adapters or all parameters", choices=("lora", "full"))
    lora_rank: int = option(8, "LoRA rank r")
    lora_alpha: float = option(32, "LoRA alpha (scaling = alpha / r)")
    lora_dropout: float = option(0.05, "dropout on the LoRA input", aliases=("lora_dropout_p",))
    lora_target_modules: tuple[str, ...] = option(("all-linear",), "module names, a regex, or all-linear")
    use_rslora: bool = option(False, "scale by alpha / sqrt(r)")
    # optimisation
    batch_size: int = option(1, "examples per micro-batch", aliases=("per_device_train_batch_size",))
    eval_batch_size: int = option(1, "examples per evaluation batch", aliases=("per_device_eval_batch_size",))
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step")
    num_train_epochs: float = option(1, "passes over the training data")
    max_steps: int = option(-1, "stop after this many optimizer steps (-1: from the epochs)")
    learning_rate: float | None = option(None, "peak learning rate (default: 1e-4 for lora, 2e-5 for full)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    max_grad_norm: float = option(1.0, "clip the global gradient norm to this (0: no clipping)")
    lr_scheduler_type: str = option("cosine", "learning-rate schedule after warmup", choices=("cosine", "linear", "constant"))
    warmup_ratio: float = option(0.05, "share of the steps spent warming up linearly")
    dtype: str = option("auto", "auto (fp32 on CPU, bf16 on capable GPUs), bf16, fp16 or fp32", aliases=("torch_dtype",),
                        choices=("auto", "bf16", "fp16", "fp32"))
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    seed: int = option(42, "seed for data order, splits and initialisation")
    device: str | None = option(None, "cpu, cuda or cuda:N (default: cuda when available)")
    # evaluation, checkpoints, logs
    eval_steps: int = option(50, "evaluate every this many optimizer steps")
    save_steps: int | None = option(None, "save every this many steps (default: eval_steps)")
    save_total_limit: int = option(2, "keep at most this many checkpoints besides the best")
    only_save_model: bool = option(False, "checkpoints hold only weights (no optimizer state: cannot resume)")
    logging_steps: int = option(5, "log every this many steps")
    dataloader_num_workers: int = option(0, "worker processes that collate batches")
    output_dir: str = option("output", "where runs are written")
    add_output_dir_suffix: bool = option(True, "write into <output_dir>/<model_type>/v<N>-<timestamp>/")
    resume_from_checkpoint: str | None = option(None, "a checkpoint-<step> folder (or run folder) to continue from")
    logging_dir: str | None = option(None, "TensorBoard folder (default: <run dir>/runs)")

    def problems(self) -> list[str]:
        checks = [_positive(name, getattr(self, name)) for name in
                  ("lora_rank", "batch_size", "eval_batch_size", "gradient_accumulation_steps", "eval_steps",
                   "logging_steps", "max_length", "save_steps")]
        checks += [_positive("num_train_epochs", self.num_train_epochs),
                   _positive("save_total_limit", self.save_total_limit, zero_ok=True),
                   _positive("dataloader_num_workers", self.dataloader_num_workers, zero_ok=True)]
        if not 0 <= self.dataset_test_ratio < 1:
            checks.append(f"dataset_test_ratio must be in [0, 1), got {self.dataset_test_ratio}")
        if not 0 <= self.warmup_ratio < 1:
            checks.append(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.lora_dropout < 1:
            checks.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.learning_rate is not None and self.learning_rate <= 0:
            checks.append(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.max_steps == 0 or self.max_steps < -1:
            checks.append(f"max_steps must be > 0 or -1, got {self.max_steps}")
        return [check for check in checks if check]

    @property
    def lr(self) -> float:
        return self.learning_rate or (1e-4 if self.sft_type == "lora" else 2e-5)

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
