"""The examples a run trains and validates on: load, split, sample and tokenize, or read all that from the cache."""
from __future__ import annotations

from collections import Counter

from .. import distributed
from ..config import loss_scale_weights
from ..errors import SftkitError
from . import cache as dataset_cache
from .errors import DataError
from .loading import load_conversations, split_and_sample
from .pipeline import NOTHING_TO_LEARN, build_examples, build_preference_examples
from .preference_formats import to_preference

# The options that decide which examples a run gets, so they are part of the cache key.
KEY_FIELDS = ("dataset_test_ratio", "train_dataset_sample", "system", "max_length", "truncation_side",
              "check_dataset_strategy", "train_on", "loss_scale", "data_seed")


def prepare_data(config, tokenizer, say=print, world: distributed.World = distributed.World(), processor=None,
                 tokenize=None) -> tuple[list[dict], list[dict]]:
    """(training examples, validation examples) of a TrainConfig; prints what was skipped or dropped, and why.
    `processor` (a VisionProcessor) encodes the images of a vision-language model's data; `tokenize(config,
    tokenizer, say, processor)` builds the examples: tokenize_data (SFT, cached) unless given.

    With the cache and several ranks, the first rank of each node reads or builds the entry while the node's
    other ranks wait, then read it: one tokenization per node. An entry appears whole or not at all (the
    cache publishes atomically), so nodes sharing one cache folder cannot corrupt it either.
    """
    if tokenize is not None:  # preference pairs are tokenized each run: the cache holds SFT examples
        return tokenize(config, tokenizer, say, processor)
    options = {name: getattr(config, name) for name in KEY_FIELDS} | {"val": list(config.val_dataset)}
    if processor is not None:
        options["processor"] = processor.key()
    key = dataset_cache.dataset_key(list(config.datasets()) + list(config.val_dataset), config.template, tokenizer,
                                    options) if config.dataset_cache else None
    if key is None:
        return tokenize_data(config, tokenizer, say, processor)
    examples, failure = None, None
    if world.local_rank == 0:
        try:
            examples = cached_or_built(key, config, tokenizer, say, processor)
        except Exception as error:  # re-raised below, once every rank has heard of it (nobody waits forever)
            failure = error
    reports = distributed.gather(f"{type(failure).__name__}: {failure}" if failure else None, world)
    if failure is not None:
        raise failure
    if any(reports):
        rank = next(rank for rank, report in enumerate(reports) if report)
        raise SftkitError(f"rank {rank} could not prepare the data ({reports[rank]})")
    return examples or dataset_cache.load(key, say) or tokenize_data(config, tokenizer, say, processor)


def cached_or_built(key: str, config, tokenizer, say=print, processor=None) -> tuple[list[dict], list[dict]]:
    """The cache entry of `key`, or the examples tokenized now and stored under it."""
    cached = dataset_cache.load(key, say)
    if cached is not None:
        say(f"[sftkit] tokenized data from the cache: {dataset_cache.cache_path(key)}")
        return cached
    examples = tokenize_data(config, tokenizer, say, processor)
    say(f"[sftkit] tokenized data cached in {dataset_cache.store(key, examples)}")
    return examples


def tokenize_data(config, tokenizer, say=print, processor=None) -> tuple[list[dict], list[dict]]:
    """Read, split, sample and build the examples (no cache)."""
    train_rows, validation = load_and_split(config, say)
    options = dict(tokenizer=tokenizer, template=config.template, max_length=config.max_length,
                   truncation_side=config.truncation_side, train_on=config.train_on, system=config.system,
                   loss_scale=loss_scale_weights(config.loss_scale), processor=processor)
    train_examples, dropped = build_examples(train_rows, **options)
    val_examples, val_dropped = build_examples(validation, **options)
    report_drops(config, dropped, val_dropped, say)
    if not train_examples:
        raise no_examples(config, train_rows, options)
    return train_examples, val_examples


def tokenize_preference_data(config, tokenizer, say=print, processor=None) -> tuple[list[dict], list[dict]]:
    """The same for preference rows (an RLHFConfig): pairs, or for KTO labelled single completions."""
    if processor is not None:
        raise SftkitError("preference training takes text rows: image pairs are not supported yet")
    unpaired = config.rlhf_type == "kto"
    train_rows, validation = load_and_split(config, say, convert=lambda row: to_preference(row, paired=not unpaired))
    options = dict(tokenizer=tokenizer, template=config.template, max_length=config.max_length,
                   truncation_side=config.truncation_side, system=config.system, unpaired=unpaired)
    train_examples, dropped = build_preference_examples(train_rows, **options)
    val_examples, val_dropped = build_preference_examples(validation, **options)
    report_drops(config, Counter({NOTHING_TO_LEARN: dropped}), Counter({NOTHING_TO_LEARN: val_dropped}), say)
    if not train_examples:
        raise DataError(f"no training pairs left of {len(train_rows)}: truncation to max_length {config.max_length} "
                        "cut off every answer to compare", source=", ".join(config.datasets()))
    return train_examples, val_examples


def load_and_split(config, say=print, convert=None) -> tuple[list, list]:
    """(training rows, validation rows): --val_dataset, or dataset_test_ratio held out of the training data."""
    conversations, report = load_conversations(list(config.datasets()), strategy=config.check_dataset_strategy,
                                               convert=convert)
    if config.val_dataset:
        validation, val_report = load_conversations(list(config.val_dataset), strategy=config.check_dataset_strategy,
                                                    convert=convert)
        train_rows, _ = split_and_sample(conversations, test_ratio=0.0, sample=config.train_dataset_sample, seed=config.data_seed)
        say(f"[sftkit] validation data: {val_report.summary()}")
    else:
        train_rows, validation = split_and_sample(conversations, test_ratio=config.dataset_test_ratio,
                                                  sample=config.train_dataset_sample, seed=config.data_seed)
        if validation and len(validation) != round(len(conversations) * config.dataset_test_ratio):
            say(f"[sftkit] validation split: {len(validation)} of {len(conversations)} rows (dataset_test_ratio "
                f"{config.dataset_test_ratio} raised to at least min(20 rows, 10%) to choose the best checkpoint on)")
        elif validation:
            say(f"[sftkit] validation split: {len(validation)} of {len(conversations)} rows")
    say(f"[sftkit] training data: {report.summary()}")
    return train_rows, validation


def report_drops(config, dropped: Counter, val_dropped: Counter, say=print) -> None:
    """Every example dropped after tokenization, counted by reason."""
    for reason in (dropped + val_dropped):
        say(f"[sftkit] dropped {dropped[reason]} training and {val_dropped[reason]} validation examples: "
            f"{reason} (max_length {config.max_length})")


def no_examples(config, rows: list, options: dict) -> DataError:
    """Why no training example is left: no rows at all, rows without a trainable token, or truncation."""
    source = ", ".join(config.datasets())
    if not rows:
        return DataError("no training rows left (check --check_dataset_strategy and --train_dataset_sample)", source=source)
    untruncated, _ = build_examples(rows[:100], **{**options, "max_length": None})
    if untruncated:
        return DataError(f"all {len(rows)} training rows were dropped: truncation to max_length {config.max_length} "
                         f"({config.truncation_side} side) cut off every trainable token; raise --max_length or use "
                         "--truncation_side left", source=source)
    return DataError(f"all {len(rows)} training rows were dropped: none has a token to learn (every label is masked: "
                     f"with --train_on {config.train_on} only assistant answers and tool calls train, never tool "
                     "results)", source=source)
