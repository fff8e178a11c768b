"""A cache of tokenized datasets, so a second run with the same data, template and tokenizer skips preprocessing.

The key hashes everything that decides the examples: each local file's path, size and modification
time, the resolved template's strings, the tokenizer's full definition and the preprocessing options.
Only runs whose data are all local files are cached: a hub dataset can change under the same name.

An entry is data only, never a pickle: a folder datasets/<key>/ (0700) holding tokens.safetensors (each
token field of every example, concatenated, with offsets), conversations.jsonl (each example's messages with their
image references, and its images' token counts) and
entry.json (format version, counts, each file's size and sha256), all 0600. An entry is checked before use;
one that does not match (edited, truncated, planted) is rebuilt.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile

import torch
from safetensors.torch import load_file, save_file

from ..errors import SftkitError
from ..manifest import describe
from ..paths import cache_dir, private_file, private_folder
from .formats import Message
from .templates import get_template

VERSION = 3  # bump when the pipeline's output for the same inputs, or the entry's layout, changes
FORMAT = "sftkit-dataset-cache"
ENTRY, TOKENS, CONVERSATIONS = "entry.json", "tokens.safetensors", "conversations.jsonl"
SPLITS = ("train", "val")
FIELDS = {"input_ids": torch.int32, "labels": torch.int32, "loss_weights": torch.float64}
# Per-example values kept as JSON beside the messages: an example's image references and their token counts.
JSON_FIELDS = ("images", "image_tokens")


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
    return os.path.join(cache_dir(), "datasets", key)


def check_writable() -> None:
    """Fail before any work when the cache cannot be written (the CLI then prints one line)."""
    folder = os.path.join(cache_dir(), "datasets")
    try:
        private_folder(folder)
        with tempfile.TemporaryDirectory(dir=folder):
            pass
    except OSError as error:
        raise SftkitError(f"the sftkit cache folder {folder} is not writable ({error.strerror}): set SFTKIT_CACHE "
                          "to a folder you can write, or pass --dataset_cache false") from None


def load(key: str, say=print) -> tuple[list[dict], list[dict]] | None:
    """(training, validation examples) from the cache, or None when absent or not exactly as stored (rebuilt)."""
    folder = cache_path(key)
    if not os.path.isdir(folder):
        return None
    try:
        return _read(folder)
    except Exception as error:  # any damage (safetensors, JSON, shapes) means the same: rebuild, never use
        say(f"[sftkit] the cached tokenized data in {folder} does not check out ({error}): rebuilding it")
        return None


def store(key: str, value: tuple[list[dict], list[dict]]) -> str:
    """Write the entry into a private staging folder, then rename it into place: a crash leaves the old entry or
    none, never half of one. Returns the entry's folder."""
    folder = cache_path(key)
    parent = private_folder(os.path.dirname(folder))
    staging = tempfile.mkdtemp(prefix=f"{key}.", suffix=".tmp", dir=parent)  # 0700
    try:
        counts = _write(staging, value)
        with os.fdopen(private_file(os.path.join(staging, ENTRY)), "w", encoding="utf-8") as handle:
            json.dump({"format": FORMAT, "version": VERSION, "counts": counts,
                       "files": {name: describe(os.path.join(staging, name)) for name in (TOKENS, CONVERSATIONS)}}, handle)
        shutil.rmtree(folder, ignore_errors=True)  # an entry that did not check out
        try:
            os.replace(staging, folder)
        except OSError:
            if not os.path.isdir(folder):  # else another process stored the same entry first: keep theirs
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _write(folder: str, value: tuple[list[dict], list[dict]]) -> dict:
    tensors, counts = {}, {}
    with os.fdopen(private_file(os.path.join(folder, CONVERSATIONS)), "w", encoding="utf-8") as handle:
        for split, examples in zip(SPLITS, value):
            fields = [name for name in FIELDS if examples and name in examples[0]]
            counts[split] = {"examples": len(examples), "fields": fields}
            lengths = [len(example["input_ids"]) for example in examples]
            tensors[f"{split}.offsets"] = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0)
            for name in fields:
                tensors[f"{split}.{name}"] = torch.tensor([v for e in examples for v in e[name]], dtype=FIELDS[name])
            for example in examples:
                row = {"messages": [[m.role, m.content, list(m.images)] for m in example["conversation"]]}
                row.update({name: example[name] for name in JSON_FIELDS if name in example})
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    path = os.path.join(folder, TOKENS)
    save_file(tensors, path)
    os.chmod(path, 0o600)
    return counts


def _read(folder: str) -> tuple[list[dict], list[dict]]:
    with open(os.path.join(folder, ENTRY), encoding="utf-8") as handle:
        entry = json.load(handle)
    if entry.get("format") != FORMAT or entry.get("version") != VERSION:
        raise ValueError(f"written by another sftkit version ({entry.get('version')})")
    for name in (TOKENS, CONVERSATIONS):
        if describe(os.path.join(folder, name)) != entry["files"][name]:
            raise ValueError(f"{name} differs from the size and sha256 it was stored with")
    tensors = load_file(os.path.join(folder, TOKENS))
    with open(os.path.join(folder, CONVERSATIONS), encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    conversations = [[Message(role, content, tuple(images)) for role, content, images in row["messages"]] for row in rows]
    splits, start = [], 0
    for split in SPLITS:
        count, fields = entry["counts"][split]["examples"], entry["counts"][split]["fields"]
        offsets = tensors[f"{split}.offsets"].tolist()
        columns = {name: tensors[f"{split}.{name}"].tolist() for name in fields}
        if len(offsets) != count + 1 or any(len(column) != offsets[-1] for column in columns.values()):
            raise ValueError(f"the {split} tensors do not match their offsets")
        splits.append([{**{name: column[offsets[i]:offsets[i + 1]] for name, column in columns.items()},
                        **{name: rows[start + i][name] for name in JSON_FIELDS if name in rows[start + i]},
                        "conversation": conversations[start + i]} for i in range(count)])
        start += count
    if start != len(conversations):
        raise ValueError(f"{CONVERSATIONS} holds {len(conversations)} conversations, not {start}")
    return splits[0], splits[1]
