"""What `sftkit preview` shows: encoded examples with the trainable tokens marked, and length statistics."""
from __future__ import annotations

import math

from .pipeline import IGNORE_INDEX, trainable_tokens, truncate

GREEN, RESET = "\033[32m", "\033[0m"


def mark_trainable(tokenizer, example: dict, color: bool = False) -> str:
    """The example's text with each run of trainable tokens shown green, or wrapped in [[ ]] without color."""
    pieces, run, trainable = [], [], None
    for token, label in zip(example["input_ids"], example["labels"]):
        is_trainable = label != IGNORE_INDEX
        if run and is_trainable != trainable:
            pieces.append(_wrap(tokenizer.decode(run), trainable, color))
            run = []
        run.append(token)
        trainable = is_trainable
    if run:
        pieces.append(_wrap(tokenizer.decode(run), trainable, color))
    return "".join(pieces)


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


def preview(config, tokenizer=None, echo=print, processor=None) -> dict:
    """Load, encode and show `config.num_examples` examples of a PreviewConfig; returns the statistics.
    A vision-language model's `processor` (loaded with the tokenizer when not given) expands the images."""
    from .loading import load_conversations
    from .pipeline import build_example

    if tokenizer is None:
        from ..model import load_processor, load_tokenizer, resolve_model_dir

        model_dir = resolve_model_dir(config.tokenizer)
        tokenizer = load_tokenizer(model_dir)
        processor = load_processor(model_dir, tokenizer)
    conversations, report = load_conversations(list(config.datasets()), strategy=config.check_dataset_strategy)
    options = dict(tokenizer=tokenizer, template=config.template, train_on=config.train_on, system=config.system,
                   processor=processor)
    # Encode once at full length (for the statistics), then truncate as training would.
    full = [build_example(conversation, **options) for conversation in conversations]
    lengths = [len(example["input_ids"]) for example in full if example is not None]
    kept = [_cut(example, config.max_length, config.truncation_side) for example in full]
    shown = [example for example in kept if example is not None][: config.num_examples]
    for index, example in enumerate(shown):
        trainable = trainable_tokens(example)
        echo(f"--- example {index}: {len(example['input_ids'])} tokens, {trainable} trainable ---")
        echo(mark_trainable(tokenizer, example, bool(config.color)))
    stats = {
        "tokens": length_stats(lengths),
        "truncated": sum(config.max_length is not None and n > config.max_length for n in lengths),
        "dropped_no_trainable_token": sum(example is None for example in kept),
        "rows": report.rows,
        "skipped_rows": sum(report.skipped.values()),
    }
    echo("--- statistics ---")
    echo(report.summary())
    echo("tokens per example: " + ", ".join(f"{key} {value}" for key, value in stats["tokens"].items()))
    echo(f"truncated to {config.max_length}: {stats['truncated']}; dropped with no trainable token left: {stats['dropped_no_trainable_token']}")
    return stats
