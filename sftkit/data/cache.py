"""A cache of tokenized datasets, so a second run with the same data, template and tokenizer skips preprocessing.

The key hashes everything that decides the examples: each local file's path, size and modification
time, the resolved template's strings, the tokenizer's full definition and the preprocessing options.
Only runs whose data are all local files are cached: a hub dataset can change under the same name.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle

from ..paths import cache_dir
from .templates import get_template

VERSION = 2  # bump when the pipeline's output for the same inputs changes


def dataset_key(specs: list[str], template: str, tokenizer, options: dict) -> str | None:
    """A hex key for these inputs, or None when some dataset is not a local file (not cacheable)."""
    files = []
    for spec in specs:
        if not os.path.isfile(spec):
            return None
        stat = os.stat(spec)
        files.append([os.path.abspath(spec), stat.st_size, stat.st_mtime_ns])
    definition = getattr(tokenizer, "backend_tokenizer", None)
    parts = {
        "version": VERSION,
        "files": files,
        "template": dataclasses.asdict(get_template(template)),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "tokenizer": hashlib.sha256(definition.to_str().encode()).hexdigest() if definition else repr(tokenizer),
        "special": [tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token],
        "options": options,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def cache_path(key: str) -> str:
    return os.path.join(cache_dir(), "datasets", f"{key}.pkl")


def load(key: str):
    """The cached value, or None when absent or unreadable (then it is rebuilt)."""
    try:
        with open(cache_path(key), "rb") as handle:
            return pickle.load(handle)
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError):
        return None


def store(key: str, value) -> str:
    """Write atomically: a crash leaves the old entry or none, never half of one."""
    path = cache_path(key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "wb") as handle:
        pickle.dump(value, handle, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(temporary, path)
    return path
