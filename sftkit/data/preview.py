"""What `sftkit preview` shows: encoded examples with the trainable tokens marked, and length statistics."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .pipeline import IGNORE_INDEX, trainable_tokens, truncate

GREEN, RESET = "\033[32m", "\033[0m"


def trainable_runs(tokenizer, example: dict) -> list[tuple[str, bool]]:
    """The example's text as (text, trainable) runs of consecutive tokens that do or do not train."""
    runs, run, trainable = [], [], None
    for token, label in zip(example["input_ids"], example["labels"]):
        is_trainable = label != IGNORE_INDEX
        if run and is_trainable != trainable:
            runs.append((tokenizer.decode(run), trainable))
            run = []
        run.append(token)
        trainable = is_trainable
    if run:
        runs.append((tokenizer.decode(run), trainable))
    return runs


def mark_trainable(tokenizer, example: dict, color: bool = False) -> str:
    """The example's text with each run of trainable tokens shown green, or wrapped in [[ ]] without color."""
    return "".join(_wrap(text, trainable, color) for text, trainable in trainable_runs(tokenizer, example))


def _cut(example: dict | None, max_length: int | None, side: str) -> dict | None:
    kept = truncate(example["input_ids"], example["labels"], max_length, side) if example is not None else None
    return None if kept is None else {"input_ids": kept[0], "labels": kept[1]}


def _wrap(text: str, trainable: bool, color: bool) -> str:
    if not trainable:
        return text
    return f"{GREEN}{text}{RESET}" if color else f"[[{text}]]"


def length_stats(lengths: list[int]) -> dict:
    """min / median / p95 / max of token counts (nearest-rank percentiles)."""
    if not lengths:
        return {"count": 0}
    ordered = sorted(lengths)

    def rank(q: float) -> int:
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    return {"count": len(ordered), "min": ordered[0], "median": rank(0.5), "p95": rank(0.95), "max": ordered[-1]}


@dataclass(frozen=True)
class Preview:
    """What preview shows: the first examples as training sees them, every length, and the statistics."""

    examples: list[dict]
    lengths: list[int]
    stats: dict
    summary: str


def build_preview(config, tokenizer=None, processor=None) -> Preview:
    """Load and encode a PreviewConfig's data: `config.num_examples` truncated examples, all full lengths, statistics.
    A vision-language model's `processor` (loaded with the tokenizer when not given) expands the images."""
    from .loading import load_conversations
    from .pipeline import build_example

    if tokenizer is None:
        tokenizer, processor = load_tokenizer_and_processor(config.tokenizer)
    conversations, report = load_conversations(list(config.datasets()), strategy=config.check_dataset_strategy)
    options = dict(tokenizer=tokenizer, template=config.template or default_template(config.tokenizer),
                   train_on=config.train_on, system=config.system, processor=processor)
    # Encode once at full length (for the statistics), then truncate as training would.
    full = [build_example(conversation, **options) for conversation in conversations]
    lengths = [len(example["input_ids"]) for example in full if example is not None]
    kept = [_cut(example, config.max_length, config.truncation_side) for example in full]
    stats = {
        "tokens": length_stats(lengths),
        "truncated": sum(config.max_length is not None and n > config.max_length for n in lengths),
        "dropped_no_trainable_token": sum(example is None for example in kept),
        "rows": report.rows,
        "skipped_rows": sum(report.skipped.values()),
    }
    shown = [example for example in kept if example is not None][: config.num_examples]
    return Preview(shown, lengths, stats, report.summary())


def preview(config, tokenizer=None, echo=print, processor=None) -> dict:
    """Load, encode and show `config.num_examples` examples of a PreviewConfig; returns the statistics."""
    if tokenizer is None:
        tokenizer, processor = load_tokenizer_and_processor(config.tokenizer)
    result = build_preview(config, tokenizer, processor)
    for index, example in enumerate(result.examples):
        trainable = trainable_tokens(example)
        echo(f"--- example {index}: {len(example['input_ids'])} tokens, {trainable} trainable ---")
        echo(mark_trainable(tokenizer, example, bool(config.color)))
    stats = result.stats
    echo("--- statistics ---")
    echo(result.summary)
    echo("tokens per example: " + ", ".join(f"{key} {value}" for key, value in stats["tokens"].items()))
    echo(f"truncated to {config.max_length}: {stats['truncated']}; dropped with no trainable token left: {stats['dropped_no_trainable_token']}")
    return stats


def load_tokenizer_and_processor(name: str | None):
    """The tokenizer preview encodes with (a tokenizer-only folder will do) and, for a vision-language model, the
    processor that expands its images."""
    from ..model import load_processor, load_tokenizer, resolve_tokenizer_dir

    folder = resolve_tokenizer_dir(name)
    tokenizer = load_tokenizer(folder)
    return tokenizer, load_processor(folder, tokenizer)


def default_template(tokenizer: str | None) -> str:
    """What training would use without --template: the model type's template, else the tokenizer's own (auto)."""
    from ..registry import EMBEDDED_MODEL_TYPE, get_model_info, infer_model_type

    model_type = infer_model_type(tokenizer) if tokenizer else EMBEDDED_MODEL_TYPE
    return get_model_info(model_type).template if model_type else "auto"
