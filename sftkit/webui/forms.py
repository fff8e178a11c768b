"""Forms generated from the command config dataclasses, so the page, the CLI and the config never disagree.

Pure functions: which widget each field gets, how the Train form is grouped, how form values become
the config (through build_config, as flags do), the equivalent command line, and which typed paths
do not exist or cannot be read.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shlex
import typing
from dataclasses import dataclass

from ..config import ConfigError, build_config
from ..data.loading import FILE_SUFFIXES

# The Train form's sections, in page order. A TrainConfig field missing here lands in "other" (tested to stay empty).
TRAIN_GROUPS = {
    "model": ("model", "model_type", "template", "system", "dtype", "trust_remote_code", "use_flash_attn", "hub",
              "model_revision", "model_cache_dir"),
    "data": ("dataset", "val_dataset", "dataset_test_ratio", "train_dataset_sample", "dataset_seed", "max_length",
             "truncation_side", "check_dataset_strategy", "train_on", "loss_scale", "packing", "padding_free",
             "group_by_length", "varlen_attention", "dataset_cache"),
    "LoRA / quantization": ("sft_type", "tuner_backend", "freeze_vit", "lora_rank", "lora_alpha", "lora_dropout",
                            "lora_target_modules", "use_rslora", "quantization_bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant",
                            "bnb_4bit_comp_dtype"),
    "schedule": ("num_train_epochs", "max_steps", "batch_size", "gradient_accumulation_steps", "learning_rate",
                 "lr_scheduler_type", "warmup_ratio", "weight_decay", "adam_beta1", "adam_beta2", "max_grad_norm", "optim",
                 "gradient_checkpointing", "max_memory", "max_forward_tokens", "fused_lora", "lora_update_dtype",
                 "fused_loss", "torch_compile", "cuda_graphs", "seed"),
    "evaluation / saving": ("eval_steps", "eval_batch_size", "metric_for_best_model", "metric_rule_for_best_model",
                            "predict_with_generate", "eval_generation_mode", "constrained_tool_calls", "score_tool_calls",
                            "ground_tool_values",
                            "eval_generation_limit", "eval_max_new_tokens", "save_steps", "save_total_limit",
                            "only_save_model", "logging_steps", "output_dir",
                            "add_output_dir_suffix", "resume_from_checkpoint", "ignore_args_mismatch", "trust_checkpoint",
                            "logging_dir", "push_to_hub", "hub_model_id", "hub_private_repo", "push_hub_strategy", "hub_token"),
    "distributed": ("device", "devices", "deepspeed", "fsdp", "ddp_backend", "dataloader_num_workers"),
}
OPEN_GROUPS = ("model", "data", "schedule")

# Fields that name files or folders, by what must be there. Values that are not paths (hub ids, registered
# dataset names, hf::/ms:: ids, named DeepSpeed configs) are left to the loaders.
PATH_FIELDS = {
    "model": "model", "tokenizer": "model", "dataset": "data", "val_dataset": "data",
    "resume_from_checkpoint": "folder", "ckpt_dir": "folder", "deepspeed": "deepspeed",
    "output_dir": "writable", "logging_dir": "writable", "model_cache_dir": "writable", "output": "writable file",
}
_PATH_START = ("/", "./", "../", "~")


@dataclass(frozen=True)
class FieldSpec:
    """One config field as a widget: kind is choice, bool, int, float or text; value is what the widget shows."""

    name: str
    kind: str
    value: object
    help: str
    choices: tuple = ()
    optional: bool = False


def field_specs(cls, initial: dict | None = None) -> list[FieldSpec]:
    """Every field of a config dataclass as a FieldSpec, showing `initial` values where given, else the defaults."""
    hints = typing.get_type_hints(cls)
    specs = []
    for item in dataclasses.fields(cls):
        kind, optional = _kind(hints[item.name])
        default = (initial or {}).get(item.name, _default(item))
        choices = tuple(str(choice) for choice in item.metadata.get("choices") or ())
        if choices or (kind == "bool" and optional):
            # An unset optional choice means "let sftkit decide": shown as the empty entry.
            choices = (("",) if optional else ()) + (choices or ("true", "false"))
            kind = "choice"
        specs.append(FieldSpec(item.name, kind, shown(default, kind), item.metadata.get("help", ""), choices, optional))
    return specs


def _kind(hint) -> tuple[str, bool]:
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((arg for arg in args if arg is not type(None)), hint) if optional else hint
    if base is bool:
        return "bool", optional
    if base in (int, float) and not optional:
        return base.__name__, False
    return "text", optional


def _default(item: dataclasses.Field):
    return item.default if item.default is not dataclasses.MISSING else item.default_factory()


def shown(value, kind: str):
    """A config value as its widget holds it: text for text and choices, the value itself for numbers and checkboxes."""
    if kind in ("bool", "int", "float"):
        return value
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def default_hint(spec: FieldSpec) -> str:
    """What a blank field means, from its help text ('... (default: the embedded SmolLM2)' -> that), else 'default'."""
    match = re.search(r"\(default: ([^()]*(?:\([^()]*\)[^()]*)*)\)", spec.help)
    return f"default: {match.group(1)}" if match else "default"


def group_specs(specs: list[FieldSpec], groups: dict[str, tuple[str, ...]]) -> dict[str, list[FieldSpec]]:
    """Specs by section in `groups` order; fields no section names go to "other", so none is ever hidden."""
    by_name = {spec.name: spec for spec in specs}
    grouped = {title: [by_name[name] for name in names if name in by_name] for title, names in groups.items()}
    listed = {name for names in groups.values() for name in names}
    grouped["other"] = [spec for spec in specs if spec.name not in listed]
    return {title: items for title, items in grouped.items() if items}


def overrides(cls, values: dict) -> dict:
    """The form values that differ from the config's defaults, as the strings or numbers a flag would carry.

    Blank text means "the default"; paths have ~ expanded, since no shell does it for a browser form.
    """
    defaults = {spec.name: spec.value for spec in field_specs(cls)}
    changed = {}
    for name, value in values.items():
        if isinstance(value, str):
            value = value.strip()
            if name in PATH_FIELDS:
                value = ",".join(os.path.expanduser(part.strip()) for part in value.split(",")) if value else value
        if value is None or value == "" or value == defaults[name]:
            continue
        if isinstance(value, float) and value.is_integer() and isinstance(defaults[name], int):
            value = int(value)
        changed[name] = value
    return changed


def parse_form(cls, values: dict):
    """(config, overrides) from form values, or ConfigError listing every bad value and every missing path."""
    changed = overrides(cls, values)
    problems = path_problems(changed)
    try:
        config = build_config(cls, None, changed)
    except ConfigError as error:
        problems = error.problems + problems
    if problems:
        raise ConfigError(problems)
    return config, changed


def cli_args(changed: dict) -> list[str]:
    """The flags that reproduce `changed` on the command line (tuples as comma lists, as the CLI accepts)."""
    args = []
    for name, value in changed.items():
        args += [f"--{name}", str(value).lower() if isinstance(value, bool) else str(value)]
    return args


def cli_command(command: str, changed: dict) -> str:
    """The shell command a user can copy to run the same thing without the page (tokens shown as ***)."""
    return shlex.join(["sftkit", command, *cli_args({name: "***" if is_secret(name) else value
                                                      for name, value in changed.items()})])


def is_secret(name: str) -> bool:
    """A credential (hub_token): hidden as typed, and never shown back."""
    return name.endswith("_token")


def path_problems(changed: dict) -> list[str]:
    """A line for every typed path that does not exist, is the wrong kind, or cannot be read (or written)."""
    problems = []
    for name, value in changed.items():
        kind = PATH_FIELDS.get(name)
        if kind is None or not isinstance(value, str):
            continue
        parts = [part.strip() for part in value.split(",") if part.strip()] if kind == "data" else [value]
        for part in parts:
            problem = _path_problem(kind, part)
            if problem:
                problems.append(f"{name}: {problem}")
    return problems


def _path_problem(kind: str, path: str) -> str | None:
    exists = os.path.exists(path)
    if kind.startswith("writable"):
        wants_folder = kind == "writable"
        if exists and os.path.isdir(path) != wants_folder:
            found, wanted = ("file", "folder") if wants_folder else ("folder", "file")
            return f"'{path}' is a {found}; a {wanted} is expected"
        # The nearest folder that exists must let us create what is missing below it.
        parent = path if wants_folder else os.path.dirname(path)
        while parent and not os.path.exists(parent):
            parent = os.path.dirname(parent.rstrip(os.sep))
        parent = parent or "."
        return None if os.access(parent, os.W_OK) else f"'{parent}' is not writable"
    looks_like_path = path.startswith(_PATH_START) or (kind == "data" and path.lower().endswith(FILE_SUFFIXES)) or \
        (kind == "deepspeed" and path.lower().endswith(".json")) or kind == "folder"
    if not exists:
        return f"'{path}' does not exist" if looks_like_path else None
    if kind in ("model", "folder") and not os.path.isdir(path):
        return f"'{path}' is a file; a folder is expected"
    if not os.access(path, os.R_OK) or (os.path.isdir(path) and not os.access(path, os.X_OK)):
        return f"'{path}' is not readable"
    if kind == "model" and os.path.isdir(path) and not any(
            os.path.isfile(os.path.join(path, name)) for name in ("config.json", "tokenizer_config.json")):
        return f"'{path}' holds neither config.json nor tokenizer_config.json: not a transformers model folder"
    return None
