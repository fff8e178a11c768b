"""The run folder contract: which files a training run writes where, read back by chat, infer, eval and merge.

    <output_dir>/<model_type>/v<N>-<timestamp>/     (or output_dir itself without the suffix)
        sft_args.json          the resolved config (+ model_dir), read to load a checkpoint for inference; never
                               rewritten: each resume appends its options to resume_args.jsonl beside it
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
import shutil
import tempfile
import time

from .errors import CheckpointError, OptionError, TrainingError
from .jsonfile import read_object

ARGS_FILE = "sft_args.json"
RESUME_FILE = "resume_args.jsonl"
VAL_FILE = "val_dataset.jsonl"
METRICS_FILE = "metrics.jsonl"
LATEST, BEST = "latest", "best"
_LEFTOVER = re.compile(r"checkpoint-\d+\.tmp|(latest|best)\.tmp")
# The options that decide what a run computes: resuming with another value would silently make another run.
RUN_DEFINING = ("model_dir", "dataset", "val_dataset", "dataset_test_ratio", "train_dataset_sample", "template", "system",
                "max_length", "truncation_side", "train_on", "loss_scale", "sft_type", "lora_rank", "lora_alpha",
                "lora_dropout", "lora_target_modules", "use_rslora", "quantization_bit", "optim", "packing",
                "group_by_length", "seed", "batch_size", "gradient_accumulation_steps", "num_train_epochs", "max_steps",
                "learning_rate", "lr_scheduler_type", "warmup_ratio", "weight_decay", "adam_beta1", "adam_beta2",
                "max_grad_norm")


def check_output_dir(output_dir: str, suffix: bool) -> None:
    """Before anything expensive: output_dir is a folder this user can write, and (without the v<N> suffix) does
    not already hold another run whose files a new run would mix with."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=output_dir, prefix=".sftkit-write-test-")
        os.close(handle)
        os.unlink(probe)
    except FileExistsError:
        raise OptionError("output_dir", f"{output_dir} is a file, not a folder") from None
    except OSError as error:
        raise OptionError("output_dir", f"cannot write into {output_dir} ({error.strerror})") from None
    if not suffix and os.path.isfile(os.path.join(output_dir, ARGS_FILE)):
        raise OptionError("output_dir", f"{output_dir} already holds a run ({ARGS_FILE}): continue it with "
                          f"--resume_from_checkpoint {output_dir}, or pick another folder (or add_output_dir_suffix true)")


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
    """The options a checkpoint-<step> folder was trained with: its run's sft_args.json, updated by the last
    resume (resume_args.jsonl) that started before its step."""
    arguments = read_first_args(checkpoint)
    step = re.fullmatch(r"checkpoint-(\d+)", os.path.basename(os.path.normpath(checkpoint)))
    for record in read_resumes(run_dir_of(checkpoint)):
        if step and record.get("step", 0) < int(step.group(1)):
            arguments = {**arguments, **record.get("arguments", {})}
    return arguments


def read_first_args(checkpoint: str) -> dict:
    """The sft_args.json of the run a checkpoint-<step> folder belongs to."""
    run_dir = run_dir_of(checkpoint)
    path = os.path.join(run_dir, ARGS_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"no {ARGS_FILE} in {run_dir}: --ckpt_dir must be a checkpoint-<step> folder inside a training run "
            "(or the run folder itself); for a plain model folder use --model"
        )
    return read_object(path, CheckpointError, "the run's settings cannot be read")


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


def read_resumes(run_dir: str) -> list[dict]:
    """The records of every resume of a run, oldest first (a line cut short by a crash is skipped)."""
    path = os.path.join(run_dir, RESUME_FILE)
    if not os.path.isfile(path):
        return []
    records = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return [record for record in records if isinstance(record, dict)]


def resume_differences(saved: dict, now: dict) -> list[str]:
    """'name: was X, now Y' for every run-defining option a resume would change (same paths spelled differently
    are the same)."""
    def same(old, new) -> bool:
        if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
            return all(same(a, b) for a, b in zip(old, new))
        if isinstance(old, str) and isinstance(new, str):
            return old == new or os.path.abspath(old) == os.path.abspath(new)
        return old == new

    return [f"{name}: was {saved.get(name)!r}, now {now.get(name)!r}" for name in RUN_DEFINING
            if name in saved and not same(saved.get(name), now.get(name))]


def check_resume_args(checkpoint: str, now: dict, ignore: bool) -> list[str]:
    """The differences between a checkpoint's options and this resume's; an error listing them unless `ignore`."""
    differences = resume_differences(read_run_args(checkpoint), now)
    if differences and not ignore:
        raise TrainingError(f"resuming {checkpoint} with other options would silently make another run: "
                            + "; ".join(differences) + ". Use the run's options, or --ignore_args_mismatch true "
                            "to go on with these (recorded in " + RESUME_FILE + ")")
    return differences


def record_resume(run_dir: str, checkpoint: str, step: int, arguments: dict, differences: list[str]) -> None:
    """Append this resume's options beside sft_args.json, which stays as the run first wrote it."""
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "checkpoint": os.path.basename(os.path.normpath(checkpoint)),
              "step": step, "differences": differences, "arguments": arguments}
    with open(os.path.join(run_dir, RESUME_FILE), "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def remove_leftovers(run_dir: str) -> list[str]:
    """Delete what a killed save left (checkpoint-N.tmp folders, latest.tmp / best.tmp); returns their names."""
    removed = sorted(name for name in os.listdir(run_dir) if _LEFTOVER.fullmatch(name))
    for name in removed:
        path = os.path.join(run_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return removed


def trim_metrics(run_dir: str, step: int) -> int:
    """Drop metrics.jsonl records after `step` (logged past the checkpoint a resume starts from, so they would be
    logged twice) and any line a crash cut short; returns how many were dropped."""
    path = metrics_file(run_dir)
    if not os.path.isfile(path):
        return 0
    with open(path, encoding="utf-8") as handle:
        lines = handle.readlines()
    kept = [line if line.endswith("\n") else line + "\n" for line in lines
            if _step_of(line) is not None and _step_of(line) <= step]
    if kept != lines:
        write_atomically(path, "".join(kept))
    return len(lines) - len(kept)


def _step_of(line: str) -> int | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record.get("step") if isinstance(record, dict) and isinstance(record.get("step"), int) else None
