"""Checkpoints that a crash can never leave half-written, and that run nothing when read back.

A checkpoint-<step> folder holds the weights (peft adapter, or safetensors for full fine-tuning), the
tokenizer, trainer_state.json and, to resume, the backend's optimizer state plus training_state.json
(schedule, scaler) and the RNG states of every rank (rng.json + rng.safetensors); last, manifest.json lists
every file with its size and sha256, signed with this user's key (manifest.py). sftkit reads everything as
data: JSON, safetensors, or torch.load with weights_only=True; only DeepSpeed's own state is unpickled, by
DeepSpeed, and only from a checkpoint this user's runs signed (or with --trust_checkpoint).

Saving writes `checkpoint-<step>.tmp/`, renames it, then moves the `latest` pointer (run.py): until the
rename, resume sees the previous checkpoint. A save that fails (a full disk) removes its .tmp folder. With several
nodes the run folder must be on a filesystem every node shares: rank 0 writes the shared files, every rank its own
backend state, and any node can resume.
"""
from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import distributed, manifest
from .errors import CheckpointError
from .jsonfile import read_object
from .lora import CONFIG_NAME, WEIGHTS_NAME, load_lora_weights, save_adapter
from .model import copy_processor_files, model_class
from .run import BEST, LATEST, pointer, set_pointer

_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
STATE_FILE = "trainer_state.json"
TRAINING_STATE_FILE = "training_state.json"
RNG_FILE, RNG_TENSORS = "rng.json", "rng.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
DEEPSPEED_FOLDER = "deepspeed"
FSDP_FOLDER = "fsdp"
# What only resume reads: chat, infer, eval and merge neither check nor need them (they may be deleted to save space).
RESUME_ONLY = (OPTIMIZER_FILE, TRAINING_STATE_FILE, RNG_FILE, RNG_TENSORS, DEEPSPEED_FOLDER + "/")


class NoCheckpoint(CheckpointError, FileNotFoundError):
    """No finished checkpoint where one was expected."""


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


# --- folders --------------------------------------------------------------------------------------------------


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
    set_pointer(run_dir, LATEST, final)
    return final


def mark_best(run_dir: str, checkpoint: str) -> None:
    set_pointer(run_dir, BEST, checkpoint)


def checkpoints(run_dir: str) -> list[str]:
    """Finished checkpoint folders, oldest step first (a leftover .tmp folder is never one)."""
    found = []
    for name in os.listdir(run_dir):
        match = _CHECKPOINT.fullmatch(name)
        if match and os.path.isdir(os.path.join(run_dir, name)):
            found.append((int(match.group(1)), os.path.join(run_dir, name)))
    return [path for _, path in sorted(found)]


def require_shared(folder: str, world: distributed.World) -> None:
    """Every rank must see the folder rank 0 made or named (one gather, so a rank that cannot see it stops
    every rank with this error instead of leaving the others waiting)."""
    blind = [rank for rank, seen in enumerate(distributed.gather(os.path.isdir(folder), world)) if not seen]
    if blind:
        raise CheckpointError(f"{folder} is not visible from rank {', '.join(map(str, blind))} of {world.size}: with "
                              "several nodes, --output_dir and --resume_from_checkpoint must be on a filesystem every "
                              "node shares")


def resolve_shared_checkpoint(path: str, world: distributed.World) -> str:
    """The checkpoint folder that `path` names as rank 0 resolves it, which every rank must see too."""
    try:
        found, error = resolve_checkpoint(path), None
    except CheckpointError as problem:
        found, error = None, problem
    chosen = distributed.broadcast(found, world)
    if chosen is None:
        raise error or NoCheckpoint(f"rank 0 finds no checkpoint at '{path}'")
    require_shared(chosen, world)
    return chosen


def resolve_checkpoint(path: str, which: str = LATEST) -> str:
    """A checkpoint folder from a checkpoint path or a run folder (its `which` pointer, else its newest)."""
    if _CHECKPOINT.fullmatch(os.path.basename(os.path.normpath(path))) and os.path.isdir(path):
        return path
    if os.path.isdir(path):
        found = pointer(path, which) or (checkpoints(path) or [None])[-1]
        if found:
            return found
    raise NoCheckpoint(f"no checkpoint at '{path}': expected a checkpoint-<step> folder or a run folder holding one")


def prune(run_dir: str, keep: int, protect: tuple[str | None, ...] = ()) -> list[str]:
    """Delete the oldest checkpoints beyond `keep`, never one in `protect` (best, latest); returns the deleted."""
    protected = {os.path.abspath(p) for p in protect if p}
    candidates = [path for path in checkpoints(run_dir) if os.path.abspath(path) not in protected]
    removable = candidates[: max(0, len(candidates) - keep)]
    for path in removable:
        shutil.rmtree(path)
    return removable


# --- what a checkpoint holds ----------------------------------------------------------------------------------


def save(run_dir: str, step: int, *, world: distributed.World, backend, write_weights: Callable[..., None],
         resumable: bool) -> str:
    """One checkpoint from every rank: each joins (RNG gather, the backend's partitioned state, the gather of
    whole weights); rank 0 writes weights and files, then renames. Returns the checkpoint folder.

    write_weights(folder, weights=...) gets what the backend's full_weights() yields: None when the model's own
    parameters are whole, else the gathered trained tensors (see write_weights)."""
    rngs = distributed.gather(rng_states(), world)
    folder = os.path.join(run_dir, f"checkpoint-{step}.tmp")
    try:
        distributed.broadcast(begin_checkpoint(run_dir, step) if world.is_main else None, world)
        require_shared(folder, world)
        if resumable:
            backend.save(folder)
        with backend.full_weights() as weights:
            if world.is_main:
                write_weights(folder, weights=weights)
                if resumable:
                    save_rng_states(folder, rngs)
        distributed.barrier(world)
        checkpoint = os.path.join(run_dir, f"checkpoint-{step}")
        if world.is_main:
            manifest.write(folder)
            checkpoint = finish_checkpoint(run_dir, step)
    except OSError as error:
        shutil.rmtree(folder, ignore_errors=True)  # frees what the failed save took
        raise CheckpointError(f"could not save checkpoint-{step}: {_why(error)}. The latest checkpoint is still "
                              f"{pointer(run_dir, LATEST) or 'none (nothing was saved yet)'}") from error
    distributed.barrier(world)
    return checkpoint


def _why(error: OSError) -> str:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk is full ({error.strerror}{', ' + error.filename if error.filename else ''})"
    return f"{error.strerror or error} ({error.filename or 'while writing'})"


def check_files(checkpoint: str, *, resume: bool, trust: bool = False, say=None) -> manifest.Verified:
    """Check a checkpoint against its manifest before anything is loaded from it: every file that this use
    reads (all for resume) must match. DeepSpeed state, which DeepSpeed unpickles, is read only from a
    checkpoint this user's sftkit signed, with every one of its files listed, unless `trust`."""
    say = say or (lambda text: print(text, file=sys.stderr))
    verified = manifest.verify(checkpoint, skip=() if resume else RESUME_ONLY)
    if not verified.listed:
        say(f"[sftkit] note: {checkpoint} has no {manifest.MANIFEST} (saved by another program or an older sftkit): "
            "its files cannot be checked for truncation or edits")
    deepspeed_files = os.path.isdir(os.path.join(checkpoint, DEEPSPEED_FOLDER))
    unlisted = [name for name in verified.unlisted if name.startswith(DEEPSPEED_FOLDER + "/")]
    if resume and deepspeed_files and not trust and (not verified.signed or unlisted):
        why = f"{unlisted[0]} is not in its signed manifest" if verified.signed else \
            f"it was not signed by this user's sftkit (key {manifest.key_path()})"
        raise CheckpointError(
            f"{checkpoint} holds DeepSpeed state, which DeepSpeed loads with pickle (a file can run code when read), "
            f"and {why}. Resume it only if you trust where it came from: --trust_checkpoint true")
    return verified


def write_weights(folder: str, model, tokenizer, lora_config, model_dir: str, state: TrainState,
                  weights: dict | None = None) -> None:
    """Weights (peft adapter or safetensors), tokenizer and trainer_state.json: what chat, merge and eval read.

    `weights`, when a sharding backend gathered them, are the trained tensors whole (the model's own are shards).
    """
    if lora_config is not None:
        save_adapter(model, lora_config, folder, base_model_name_or_path=os.path.abspath(model_dir), tensors=weights)
    else:
        model.save_pretrained(folder, state_dict=weights)
        copy_processor_files(model_dir, folder)
    tokenizer.save_pretrained(folder)
    with open(os.path.join(folder, STATE_FILE), "w", encoding="utf-8") as handle:
        handle.write(state.to_json())


def read_train_state(checkpoint: str) -> TrainState:
    path = os.path.join(checkpoint, STATE_FILE)
    try:
        with open(path, encoding="utf-8") as handle:
            return TrainState.from_json(handle.read())
    except (OSError, ValueError, TypeError) as error:
        raise CheckpointError(f"{path} is missing or not a valid training state ({error})") from None


def load_weights(model, checkpoint: str) -> None:
    """Copy a checkpoint's weights into an already built model: its LoRA adapter, else its full weights."""
    if any(os.path.isfile(os.path.join(checkpoint, name)) for name in (WEIGHTS_NAME, CONFIG_NAME)):
        load_lora_weights(model, checkpoint)
        return
    try:  # safetensors only: a planted pytorch_model.bin is never unpickled
        saved = model_class(checkpoint).from_pretrained(checkpoint, dtype=torch.float32, use_safetensors=True)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{checkpoint} holds neither a LoRA adapter nor loadable full weights ({error})") from None
    model.load_state_dict(saved.state_dict())


def save_json(folder: str, name: str, value: dict) -> None:
    with open(os.path.join(folder, name), "w", encoding="utf-8") as handle:
        json.dump(value, handle)


def require_resumable(checkpoint: str) -> None:
    """A checkpoint saved with only_save_model (or by another program) cannot be resumed: say so first."""
    load_json(checkpoint, TRAINING_STATE_FILE)


def load_json(folder: str, name: str) -> dict:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder} holds no {name} (saved with only_save_model, or not by this sftkit): "
                              "it cannot be resumed")
    return read_object(path, CheckpointError, "it cannot be resumed")


def load_tensors(path: str) -> dict:
    """torch.load restricted to tensors and plain containers: a pickle that would run code is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint cannot be resumed") from None
    except Exception as error:  # torch raises UnpicklingError, RuntimeError or EOFError for bad or unsafe files
        raise CheckpointError(f"{path} is damaged or holds more than tensors ({type(error).__name__}): refused") from None


def save_schedule(folder: str, scheduler, scaler) -> None:
    """The learning-rate schedule's position and the fp16 loss scaler, as JSON (the schedule's function is
    rebuilt from the config, never stored)."""
    state = {key: value for key, value in scheduler.state_dict().items() if key != "lr_lambdas"}
    save_json(folder, TRAINING_STATE_FILE, {"scheduler": state, "scaler": scaler.state_dict() if scaler else None})


def load_schedule(folder: str, scheduler, scaler) -> None:
    state = load_json(folder, TRAINING_STATE_FILE)
    scheduler.load_state_dict({**scheduler.state_dict(), **state["scheduler"]})
    if scaler and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])


# --- random number generators -----------------------------------------------------------------------------------


def rng_states() -> dict:
    """This process's RNG states as JSON-able values plus byte tensors."""
    version, keys, gauss = random.getstate()
    kind, array, position, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(keys), gauss], "numpy": [kind, array.tolist(), position, has_gauss, cached],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def save_rng_states(folder: str, states: list[dict]) -> None:
    """Every rank's states: Python and NumPy as JSON, torch's byte tensors as safetensors."""
    save_json(folder, RNG_FILE, {"ranks": [{"python": s["python"], "numpy": s["numpy"], "cuda": len(s["cuda"])}
                                           for s in states]})
    tensors = {f"{rank}.torch": s["torch"] for rank, s in enumerate(states)}
    tensors.update({f"{rank}.cuda.{i}": t for rank, s in enumerate(states) for i, t in enumerate(s["cuda"])})
    save_file(tensors, os.path.join(folder, RNG_TENSORS))


def restore_rng_states(folder: str, rank: int) -> None:
    """Put this rank's generators back where the saving run had them."""
    ranks = load_json(folder, RNG_FILE)["ranks"]
    if rank >= len(ranks):
        raise CheckpointError(f"{folder} was saved by {len(ranks)} ranks; resume it with the same number of processes")
    try:
        tensors = load_file(os.path.join(folder, RNG_TENSORS))
    except Exception as error:  # safetensors raises its own error types for a damaged file
        raise CheckpointError(f"{os.path.join(folder, RNG_TENSORS)} cannot be read ({error})") from None
    saved = ranks[rank]
    version, keys, gauss = saved["python"]
    random.setstate((version, tuple(keys), gauss))
    kind, array, position, has_gauss, cached = saved["numpy"]
    np.random.set_state((kind, np.array(array, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(tensors[f"{rank}.torch"])
    if saved["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[f"{rank}.cuda.{i}"] for i in range(saved["cuda"])])
