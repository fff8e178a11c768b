"""The kill -9 loop of test_resume.py: a seeded series of training processes, each killed with SIGKILL at a chosen
file operation of a save (or of the metrics write just before it), then a clean finish.

    python tests/kill_saves.py MODEL_DIR DATA_FILE OUT_DIR --cycles 50 --seed 13

The parent warms up with one step on one thread, then forks each child (which trains, resuming from `latest`)
and, after every kill, checks what the kill left: `latest` (or the newest checkpoint) verifies against its
manifest and is resumable.
The last line printed is JSON with the figures.
"""
from __future__ import annotations

import argparse
import builtins
import dataclasses
import importlib
import json
import os
import random
import shutil
import signal
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(__file__))
from conftest import run_options  # noqa: E402

import sftkit.checkpoint  # noqa: E402
import sftkit.lora  # noqa: E402
import torch  # noqa: E402
from sftkit import run  # noqa: E402
from sftkit.config import TrainConfig  # noqa: E402
from sftkit.errors import CheckpointError  # noqa: E402
from sftkit.logs import RunLog  # noqa: E402

STEPS = 80
training = importlib.import_module("sftkit.train")  # the module (sftkit.train is the function train)
UNRESUMABLE = 3


def config(model_dir: str, data: str, out: str, resume: bool, save_steps: int = 1) -> TrainConfig:
    return TrainConfig(**run_options(model_dir, data, out, max_steps=STEPS, save_steps=save_steps, eval_steps=10 * STEPS,
                                     dataset_test_ratio=0.0, save_total_limit=2,
                                     resume_from_checkpoint=out if resume else None))


def instrument(kill_at: int | None, after: bool, counter_file: str | None = None) -> None:
    """Count the file operations made while saving (or writing metrics); SIGKILL this process at number kill_at."""
    state = {"count": 0, "active": 0}

    def counted(function):
        def wrapper(*args, **kwargs):
            if not state["active"]:
                return function(*args, **kwargs)
            state["count"] += 1
            if state["count"] == kill_at and not after:
                os.kill(os.getpid(), signal.SIGKILL)
            result = function(*args, **kwargs)
            if state["count"] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return result
        return wrapper

    def during(function):
        def wrapper(*args, **kwargs):
            state["active"] += 1
            try:
                return function(*args, **kwargs)
            finally:
                state["active"] -= 1
                if counter_file:
                    with real_open(counter_file, "w") as handle:
                        handle.write(str(state["count"]))
        return wrapper

    real_open = builtins.open
    counted_open = counted(real_open)
    builtins.open = lambda file, mode="r", *a, **k: (counted_open if any(c in mode for c in "wax") else real_open)(file, mode, *a, **k)
    for module, name in ((os, "replace"), (os, "fsync"), (os, "makedirs"), (os, "link"), (shutil, "rmtree"), (torch, "save"),
                         (sftkit.checkpoint, "save_file"), (sftkit.lora, "save_file")):
        setattr(module, name, counted(getattr(module, name)))
    training.save = during(training.save)
    RunLog.write = during(RunLog.write)


def child(settings: TrainConfig, kill_at: int | None, after: bool = False, counter_file: str | None = None) -> int:
    """Fork a training process; its exit status (negative: killed by that signal)."""
    pid = os.fork()
    if pid == 0:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        code = 0
        try:
            instrument(kill_at, after, counter_file)
            training.train(settings)
        except CheckpointError:
            code = UNRESUMABLE
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def finished_checkpoint(out: str) -> str | None:
    try:
        return sftkit.checkpoint.resolve_checkpoint(out)
    except (CheckpointError, FileNotFoundError):
        return None


def check(out: str) -> bool:
    """What a resume would pick verifies, is resumable and holds the step its name says."""
    latest = finished_checkpoint(out)
    if latest is None:
        return True
    try:
        sftkit.checkpoint.check_files(latest, resume=True, say=lambda text: None)
        sftkit.checkpoint.require_resumable(latest)
        return sftkit.checkpoint.read_train_state(latest).step == int(latest.rsplit("-", 1)[1])
    except CheckpointError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("data")
    parser.add_argument("out")
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--seed", type=int, default=13)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    started = time.time()

    # Warm up here, uninstrumented, so each child starts with transformers' lazy modules imported and the
    # tokenized data cached (one thread: no OpenMP pool exists to be broken by the forks).
    torch.set_num_threads(1)
    training.train(dataclasses.replace(config(args.model_dir, args.data, os.path.join(args.out, "warm-up"), resume=False),
                                       max_steps=1))
    # Calibrate: how many file operations three saves (and their metrics lines) take.
    calibration, counter = os.path.join(args.out, "calibration"), os.path.join(args.out, "operations")
    settings = config(args.model_dir, args.data, calibration, resume=False)
    child(dataclasses.replace(settings, max_steps=3), None, counter_file=counter)
    per_step = max(1, int(open(counter).read()) // 3)

    out = os.path.join(args.out, "killed")
    figures = {"cycles": 0, "killed": 0, "corrupt": 0, "unresumable": 0, "other_errors": 0, "restarted_empty_run": 0,
               "leftovers_seen": 0, "operations_per_step": per_step}
    for _ in range(args.cycles):
        resume = finished_checkpoint(out) is not None
        if not resume and os.path.isdir(out):  # killed before its first checkpoint: nothing to resume, start again
            shutil.rmtree(out)
            figures["restarted_empty_run"] += 1
        status = child(config(args.model_dir, args.data, out, resume), rng.randint(1, 2 * per_step), after=rng.random() < 0.5)
        figures["cycles"] += 1
        figures["killed"] += status == -signal.SIGKILL
        figures["unresumable"] += status == UNRESUMABLE
        figures["other_errors"] += status not in (0, -signal.SIGKILL, UNRESUMABLE)
        figures["corrupt"] += not check(out)
        figures["leftovers_seen"] += any(name.endswith(".tmp") for name in os.listdir(out)) if os.path.isdir(out) else 0
    figures["reached_step"] = sftkit.checkpoint.read_train_state(finished_checkpoint(out)).step if finished_checkpoint(out) else 0

    # The clean finish, and the same run without interruptions.
    figures["final_status"] = child(config(args.model_dir, args.data, out, resume=finished_checkpoint(out) is not None,
                                           save_steps=STEPS), None)
    reference = os.path.join(args.out, "reference")
    figures["reference_status"] = child(config(args.model_dir, args.data, reference, resume=False, save_steps=STEPS), None)
    with open(run.metrics_file(out)) as handle:
        steps = [json.loads(line)["step"] for line in handle if '"loss"' in line]
    figures["duplicate_metrics"] = len(steps) - len(set(steps))
    figures["missing_metrics"] = len(set(range(1, STEPS + 1)) - set(steps))
    figures["final_adapter"] = os.path.join(out, f"checkpoint-{STEPS}", "adapter_model.safetensors")
    figures["reference_adapter"] = os.path.join(reference, f"checkpoint-{STEPS}", "adapter_model.safetensors")
    figures["seconds"] = round(time.time() - started, 1)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
