"""Checkpoints that a crash can never leave half-written: write `<name>.tmp/`, rename, then move pointers.

A run folder holds `checkpoint-<step>/` folders and two pointer files, `latest` and `best`, each
holding a folder name. Resume reads `latest`; chat and merge read `best`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from typing import Callable

_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


@dataclass
class TrainState:
    """Everything about progress that a restart needs besides weights, optimizer, scheduler and RNG."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    trainable_tokens: int = 0
    best_metric: float | None = None
    best_checkpoint: str | None = None
    log_history: list = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "TrainState":
        return cls(**json.loads(text))


def write_atomically(path: str, text: str) -> None:
    """Replace a small file so that readers see the old or the new content, never a mix."""
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def save_checkpoint(run_dir: str, step: int, write: Callable[[str], None]) -> str:
    """Call write(folder) on a temporary folder, rename it to checkpoint-<step>, then point `latest` at it."""
    write(begin_checkpoint(run_dir, step))
    return finish_checkpoint(run_dir, step)


def begin_checkpoint(run_dir: str, step: int) -> str:
    """A fresh, empty checkpoint-<step>.tmp folder to write into."""
    temporary = os.path.join(run_dir, f"checkpoint-{step}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    os.makedirs(temporary)
    return temporary


def finish_checkpoint(run_dir: str, step: int) -> str:
    """Rename the written .tmp folder into place, then move `latest`: until then resume sees the previous one."""
    name = f"checkpoint-{step}"
    final = os.path.join(run_dir, name)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(os.path.join(run_dir, f"{name}.tmp"), final)
    write_atomically(os.path.join(run_dir, "latest"), name)
    return final


def mark_best(run_dir: str, checkpoint: str) -> None:
    write_atomically(os.path.join(run_dir, "best"), os.path.basename(checkpoint))


def checkpoints(run_dir: str) -> list[str]:
    """Finished checkpoint folders, oldest step first (a leftover .tmp folder is never one)."""
    found = []
    for name in os.listdir(run_dir):
        match = _CHECKPOINT.fullmatch(name)
        if match and os.path.isdir(os.path.join(run_dir, name)):
            found.append((int(match.group(1)), os.path.join(run_dir, name)))
    return [path for _, path in sorted(found)]


def pointer(run_dir: str, which: str) -> str | None:
    """The checkpoint that `latest` or `best` names, if it exists."""
    path = os.path.join(run_dir, which)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        target = os.path.join(run_dir, handle.read().strip())
    return target if os.path.isdir(target) else None


def resolve_checkpoint(path: str, which: str = "latest") -> str:
    """A checkpoint folder from a checkpoint path or a run folder (its `which` pointer, else its newest)."""
    if _CHECKPOINT.fullmatch(os.path.basename(os.path.normpath(path))) and os.path.isdir(path):
        return path
    if os.path.isdir(path):
        found = pointer(path, which) or (checkpoints(path) or [None])[-1]
        if found:
            return found
    raise FileNotFoundError(f"no checkpoint at '{path}': expected a checkpoint-<step> folder or a run folder holding one")


def prune(run_dir: str, keep: int, protect: tuple[str | None, ...] = ()) -> list[str]:
    """Delete the oldest checkpoints beyond `keep`, never one in `protect` (best, latest); returns the deleted."""
    protected = {os.path.abspath(p) for p in protect if p}
    candidates = [path for path in checkpoints(run_dir) if os.path.abspath(path) not in protected]
    removable = candidates[: max(0, len(candidates) - keep)]
    for path in removable:
        shutil.rmtree(path)
    return removable
