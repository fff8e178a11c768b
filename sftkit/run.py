"""The run folder contract: which files a training run writes where, read back by chat, infer, eval and merge.

    <output_dir>/<model_type>/v<N>-<timestamp>/     (or output_dir itself without the suffix)
        sft_args.json          the resolved config (+ model_dir), read to load a checkpoint for inference
        val_dataset.jsonl      the validation split, the default data of infer and eval
        metrics.jsonl          one JSON record per log line (training steps and evaluations)
        checkpoint-<step>/     see checkpoint.py
        latest, best           pointer files holding a checkpoint folder name

Every other module asks this one for these names; a resumed run writes on into the folder of its checkpoint.
"""
from __future__ import annotations

import json
import os
import re
import time

from .errors import CheckpointError

ARGS_FILE = "sft_args.json"
VAL_FILE = "val_dataset.jsonl"
METRICS_FILE = "metrics.jsonl"
LATEST, BEST = "latest", "best"


def new_run_dir(output_dir: str, name: str, suffix: bool = True) -> str:
    """<output_dir>/<name>/v<N>-<timestamp>/ as ms-swift lays it out (N one past the highest), or output_dir itself."""
    if not suffix:
        os.makedirs(output_dir, exist_ok=True)
        return os.path.abspath(output_dir)
    parent = os.path.join(output_dir, name)
    os.makedirs(parent, exist_ok=True)
    versions = [int(m.group(1)) for entry in os.listdir(parent) if (m := re.match(r"v(\d+)-", entry))]
    run_dir = os.path.join(parent, f"v{max(versions, default=-1) + 1}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(run_dir)
    return os.path.abspath(run_dir)


def run_dir_of(checkpoint: str) -> str:
    """The run folder a checkpoint-<step> folder belongs to: where a resumed run writes on."""
    return os.path.dirname(os.path.abspath(checkpoint))


def write_run_files(run_dir: str, arguments: dict, conversations: list[list]) -> None:
    """sft_args.json (the resolved config, read back by chat/infer/merge) and the validation split as messages rows
    (with ms-swift's `images` list where a conversation has images: the <image> tags stay in the content)."""
    with open(os.path.join(run_dir, ARGS_FILE), "w", encoding="utf-8") as handle:
        json.dump(arguments, handle, indent=2, ensure_ascii=False)
    with open(os.path.join(run_dir, VAL_FILE), "w", encoding="utf-8") as handle:
        for conversation in conversations:
            row = {"messages": [{"role": m.role, "content": m.content} for m in conversation]}
            images = [image for m in conversation for image in m.images]
            handle.write(json.dumps(row | ({"images": images} if images else {}), ensure_ascii=False) + "\n")


def read_run_args(checkpoint: str) -> dict:
    """The sft_args.json of the run a checkpoint-<step> folder belongs to."""
    run_dir = run_dir_of(checkpoint)
    path = os.path.join(run_dir, ARGS_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"no {ARGS_FILE} in {run_dir}: --ckpt_dir must be a checkpoint-<step> folder inside a training run "
            "(or the run folder itself); for a plain model folder use --model"
        )
    try:
        with open(path, encoding="utf-8") as handle:
            arguments = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}): the run's settings cannot be read") from None
    if not isinstance(arguments, dict):
        raise CheckpointError(f"{path} must hold a JSON object of the run's options")
    return arguments


def val_file(checkpoint: str) -> str | None:
    """The validation split the run saved beside its checkpoints, if any."""
    path = os.path.join(run_dir_of(checkpoint), VAL_FILE)
    return path if os.path.isfile(path) else None


def metrics_file(run_dir: str) -> str:
    return os.path.join(run_dir, METRICS_FILE)


def write_atomically(path: str, text: str) -> None:
    """Replace a small file so that readers see the old or the new content, never a mix."""
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def set_pointer(run_dir: str, which: str, checkpoint: str) -> None:
    """Point `latest` or `best` at a checkpoint folder (by name, so the run folder can move)."""
    write_atomically(os.path.join(run_dir, which), os.path.basename(os.path.normpath(checkpoint)))


def pointer(run_dir: str, which: str) -> str | None:
    """The checkpoint that `latest` or `best` names, if it exists."""
    path = os.path.join(run_dir, which)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        target = os.path.join(run_dir, handle.read().strip())
    return target if os.path.isdir(target) else None
