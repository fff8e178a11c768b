"""The examples a run trains and validates on: load, split, sample and tokenize, or read all that from the cache."""
from __future__ import annotations

from ..config import loss_scale_weights
from ..errors import SftkitError
from . import cache as dataset_cache
from .loading import load_conversations, split_and_sample
from .pipeline import build_examples

# The options that decide which examples a run gets, so they are part of the cache key.
KEY_FIELDS = ("dataset_test_ratio", "train_dataset_sample", "system", "max_length", "truncation_side",
              "check_dataset_strategy", "train_on", "loss_scale", "seed")


def prepare_data(config, tokenizer, say=print, processor=None) -> tuple[list[dict], list[dict]]:
    """(training examples, validation examples) of a TrainConfig; prints what was skipped or dropped, and why.
    `processor` (a VisionProcessor) encodes the images of a vision-language model's data."""
    options = {name: getattr(config, name) for name in KEY_FIELDS} | {"val": list(config.val_dataset)}
    if processor is not None:
        options["processor"] = processor.key()
    key = dataset_cache.dataset_key(list(config.datasets()) + list(config.val_dataset), config.template, tokenizer,
                                    options) if config.dataset_cache else None
    cached = dataset_cache.load(key) if key else None
    if cached is not None:
        say(f"[sftkit] tokenized data from the cache: {dataset_cache.cache_path(key)}")
        return cached
    examples = tokenize_data(config, tokenizer, say, processor)
    if key:
        say(f"[sftkit] tokenized data cached in {dataset_cache.store(key, examples)}")
    return examples


def tokenize_data(config, tokenizer, say=print, processor=None) -> tuple[list[dict], list[dict]]:
    """Read, split, sample and build the examples (no cache)."""
    conversations, report = load_conversations(list(config.datasets()), strategy=config.check_dataset_strategy)
    if config.val_dataset:
        validation, val_report = load_conversations(list(config.val_dataset), strategy=config.check_dataset_strategy)
        train_rows, _ = split_and_sample(conversations, test_ratio=0.0, sample=config.train_dataset_sample, seed=config.seed)
        say(f"[sftkit] validation data: {val_report.summary()}")
    else:
        train_rows, validation = split_and_sample(conversations, test_ratio=config.dataset_test_ratio,
                                                  sample=config.train_dataset_sample, seed=config.seed)
    say(f"[sftkit] training data: {report.summary()}")
    options = dict(tokenizer=tokenizer, template=config.template, max_length=config.max_length,
                   truncation_side=config.truncation_side, train_on=config.train_on, system=config.system,
                   loss_scale=loss_scale_weights(config.loss_scale), processor=processor)
    train_examples, dropped = build_examples(train_rows, **options)
    val_examples, val_dropped = build_examples(validation, **options)
    for reason, count in (dropped + val_dropped).items():
        say(f"[sftkit] dropped {dropped[reason]} training and {val_dropped[reason]} validation examples: "
            f"{reason} (max_length {config.max_length})")
    if not train_examples:
        raise SftkitError("no training examples left: check the dataset, max_length and check_dataset_strategy")
    return train_examples, val_examples
