"""The examples a run trains and validates on: load, split, sample and tokenize, or read all that from the cache."""
from __future__ import annotations

from functools import partial

from ..config import loss_scale_weights
from ..errors import SftkitError
from . import cache as dataset_cache
from .loading import load_conversations, split_and_sample
from .pipeline import build_examples, build_preference_examples
from .preference_formats import to_preference

# The options that decide which examples a run gets, so they are part of the cache key.
KEY_FIELDS = ("dataset_test_ratio", "train_dataset_sample", "system", "max_length", "truncation_side",
              "check_dataset_strategy", "train_on", "loss_scale", "seed", "rlhf_type")


def prepare_data(config, tokenizer, say=print, tokenize=None) -> tuple[list[dict], list[dict]]:
    """(training examples, validation examples) of a TrainConfig; prints what was skipped or dropped, and why.

    tokenize(config, tokenizer, say) builds them when the cache has none: tokenize_data (SFT) by default,
    tokenize_preference_data for preference training.
    """
    tokenize = tokenize or tokenize_data
    key = dataset_cache.dataset_key(list(config.datasets()) + list(config.val_dataset), config.template, tokenizer,
                                    {name: getattr(config, name, None) for name in KEY_FIELDS} | {"val": list(config.val_dataset)}) \
        if config.dataset_cache else None
    cached = dataset_cache.load(key) if key else None
    if cached is not None:
        say(f"[sftkit] tokenized data from the cache: {dataset_cache.cache_path(key)}")
        return cached
    examples = tokenize(config, tokenizer, say)
    if key:
        say(f"[sftkit] tokenized data cached in {dataset_cache.store(key, examples)}")
    return examples


def tokenize_data(config, tokenizer, say=print) -> tuple[list[dict], list[dict]]:
    """Read, split, sample and build the examples (no cache)."""
    train_rows, validation = load_and_split(config, say)
    options = dict(tokenizer=tokenizer, template=config.template, max_length=config.max_length,
                   truncation_side=config.truncation_side, train_on=config.train_on, system=config.system,
                   loss_scale=loss_scale_weights(config.loss_scale))
    train_examples, dropped = build_examples(train_rows, **options)
    val_examples, val_dropped = build_examples(validation, **options)
    return _checked(config, train_examples, val_examples, dropped, val_dropped, say)


def tokenize_preference_data(config, tokenizer, say=print) -> tuple[list[dict], list[dict]]:
    """The same for preference rows (an RLHFConfig): pairs, or for KTO labelled single completions."""
    unpaired = config.rlhf_type == "kto"
    train_rows, validation = load_and_split(config, say, convert=partial(to_preference, paired=not unpaired))
    options = dict(tokenizer=tokenizer, template=config.template, max_length=config.max_length,
                   truncation_side=config.truncation_side, system=config.system, unpaired=unpaired)
    train_examples, dropped = build_preference_examples(train_rows, **options)
    val_examples, val_dropped = build_preference_examples(validation, **options)
    return _checked(config, train_examples, val_examples, dropped, val_dropped, say)


def load_and_split(config, say=print, convert=None) -> tuple[list, list]:
    """(training rows, validation rows): --val_dataset, or dataset_test_ratio held out of the training data."""
    conversations, report = load_conversations(list(config.datasets()), strategy=config.check_dataset_strategy,
                                               convert=convert)
    if config.val_dataset:
        validation, val_report = load_conversations(list(config.val_dataset), strategy=config.check_dataset_strategy,
                                                    convert=convert)
        train_rows, _ = split_and_sample(conversations, test_ratio=0.0, sample=config.train_dataset_sample, seed=config.seed)
        say(f"[sftkit] validation data: {val_report.summary()}")
    else:
        train_rows, validation = split_and_sample(conversations, test_ratio=config.dataset_test_ratio,
                                                  sample=config.train_dataset_sample, seed=config.seed)
    say(f"[sftkit] training data: {report.summary()}")
    return train_rows, validation


def _checked(config, train_examples, val_examples, dropped: int, val_dropped: int, say) -> tuple[list[dict], list[dict]]:
    if dropped or val_dropped:
        say(f"[sftkit] dropped {dropped} training and {val_dropped} validation examples: "
            f"nothing trainable left after truncation to {config.max_length} tokens")
    if not train_examples:
        raise SftkitError("no training examples left: check the dataset, max_length and check_dataset_strategy")
    return train_examples, val_examples
