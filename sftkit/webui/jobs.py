"""Training as a child process the page watches: `sftkit train` with its log file, read back from the run folder.

The server owns the process, so a page reload re-attaches to it; everything shown (progress, curves,
checkpoints) is read from the log and the run folder's metrics.jsonl, as a user would read them.
"""
from __future__ import annotations

import glob
import os
import re
import signal
import subprocess
import sys
import time

from ..errors import STOPPED_EXIT_CODES
from ..logs import read_metrics
from ..run import ARGS_FILE, BEST, LATEST, metrics_file, pointer

# The line train() prints once the data is ready; it ends with the run folder.
_RUN_LINE = re.compile(r"^\[sftkit\] .*?, run folder (.+?)\s*$", re.M)
LOG_LINES = 40


class TrainJob:
    """One `sftkit train` child process writing its output to a log file."""

    def __init__(self, args: list[str], log_dir: str, command: str):
        os.makedirs(log_dir, exist_ok=True)
        self.command, self.args = command, args
        self.log_path = os.path.join(log_dir, f"train-{time.strftime('%Y%m%d-%H%M%S')}.log")
        self.started = time.time()
        self.stop_requested = False
        environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "wb") as log:
            # A session of its own: Ctrl-C on the server's terminal must not reach the child directly;
            # the server stops it with SIGTERM on the way out, so it saves.
            self.process = subprocess.Popen([sys.executable, "-m", "sftkit_cli.main", "train", *args], stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=environment,
                                            start_new_session=True)

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM: the loop finishes its step, saves a checkpoint and exits."""
        if self.running:
            self.stop_requested = True
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def log_text(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def status(self) -> str:
        code = self.process.poll()
        if code is None:
            return "stopping (saving a checkpoint)" if self.stop_requested else "running"
        if self.stop_requested:
            # A stopped run saves and exits 130/143; before the loop starts SIGTERM ends it with nothing saved.
            return "stopped (checkpoint saved)" if code in STOPPED_EXIT_CODES else "stopped before training began (nothing saved)"
        return "finished" if code == 0 else f"failed (exit code {code})"


def run_folder(log: str) -> str | None:
    """The run folder a train log names, or None before the data is ready."""
    match = _RUN_LINE.search(log)
    return match.group(1) if match else None


def log_tail(log: str, lines: int = LOG_LINES) -> str:
    """The last lines as a terminal shows them: a carriage return (tqdm's redraw) keeps only what follows it."""
    shown = [line.rsplit("\r", 1)[-1] for line in log.replace("\r\n", "\n").split("\n")]
    return "\n".join([line for line in shown if line.strip()][-lines:])


def error_line(log: str) -> str | None:
    """The one-line error `sftkit train` ends with on a mistake the user can fix (click prints 'Error: ...')."""
    found = [line for line in log_tail(log, 10**6).splitlines() if line.startswith("Error:")]
    return found[-1] if found else None


def read_records(run_dir: str | None) -> list[dict]:
    path = metrics_file(run_dir) if run_dir else None
    if not path or not os.path.isfile(path):
        return []
    try:
        return read_metrics(path)
    except ValueError:  # a line half written as we read: the next poll sees it whole
        return []


def progress(records: list[dict]) -> dict | None:
    """step, total_steps, trainable tokens/s, loss and ETA in seconds from the training records, or None before any.

    elapsed_s restarts when a run is resumed, so the pace is taken from the records of the current process.
    """
    steps = [record for record in records if "loss" in record and "elapsed_s" in record]
    if not steps:
        return None
    first_step = 0  # the step the current process started from: 0, or the last one logged before a resume
    for before, after in zip(steps, steps[1:]):
        if after["elapsed_s"] < before["elapsed_s"]:
            first_step = before["step"]
    last = steps[-1]
    done_here = last["step"] - first_step
    seconds_per_step = last["elapsed_s"] / done_here if done_here > 0 else None
    remaining = max(last["total_steps"] - last["step"], 0)
    return {"step": last["step"], "total_steps": last["total_steps"], "loss": last["loss"],
            "tokens_per_s": last["trainable_tokens_per_s"],
            "eta_s": remaining * seconds_per_step if seconds_per_step is not None else None}


def progress_text(state: dict | None) -> str:
    if state is None:
        return "waiting for the first step (loading the model and data)"
    eta = "n/a" if state["eta_s"] is None else time.strftime("%H:%M:%S", time.gmtime(round(state["eta_s"])))
    return (f"step {state['step']}/{state['total_steps']} · loss {state['loss']:.4f} · "
            f"{state['tokens_per_s']:.0f} trainable tokens/s · ETA {eta}")


def last_evaluation(records: list[dict]) -> str | None:
    """The newest evaluation record as one line, e.g. 'step 3: eval_loss 6.0208 · eval_ppl 411.9'."""
    evaluations = [record for record in records if "eval_loss" in record]
    if not evaluations:
        return None
    last = evaluations[-1]
    values = [f"{key} {value:.4f}" for key, value in last.items()
              if key.startswith("eval_") and isinstance(value, (int, float))]
    return f"step {last['step']}: " + " · ".join(values)


def find_runs(output_dir: str) -> list[str]:
    """Run folders under output_dir (itself, <output_dir>/<name>/v<N>-*), newest first."""
    found = [*glob.glob(os.path.join(output_dir, ARGS_FILE)), *glob.glob(os.path.join(output_dir, "*", "*", ARGS_FILE))]
    runs = [os.path.dirname(os.path.abspath(path)) for path in found]
    return sorted(runs, key=os.path.getmtime, reverse=True)


def checkpoint_choices(output_dir: str) -> list[tuple[str, str]]:
    """(label, checkpoint folder) for every run's best and latest checkpoint, newest run first."""
    choices = []
    for run_dir in find_runs(output_dir):
        inside = run_dir != os.path.abspath(output_dir)
        shown = os.path.relpath(run_dir, output_dir) if inside else os.path.basename(run_dir)
        seen = set()
        for which in (BEST, LATEST):
            checkpoint = pointer(run_dir, which)
            if checkpoint and checkpoint not in seen:
                seen.add(checkpoint)
                choices.append((f"{shown} · {which} ({os.path.basename(checkpoint)})", checkpoint))
    return choices
