"""What a run leaves for a person: metrics.jsonl, TensorBoard events and a PNG of the loss curves."""
from __future__ import annotations

import json
import os
import warnings

from .run import metrics_file


class RunLog:
    """Appends one JSON line per record; mirrors numbers to TensorBoard when it is installed."""

    def __init__(self, run_dir: str, logging_dir: str | None = None, enabled: bool = True):
        self.path = metrics_file(run_dir)
        self.enabled = enabled
        self.writer = _tensorboard(logging_dir or os.path.join(run_dir, "runs")) if enabled else None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _tensorboard(folder: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warnings.warn("tensorboard is not installed: no event files (pip install tensorboard)")
        return None
    return SummaryWriter(folder)


def read_metrics(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def loss_figure(records: list[dict]):
    """Train and eval loss against steps as a matplotlib Figure (built without pyplot, so any thread may draw it)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4))
    axes = figure.subplots()
    for key, label in (("loss", "train loss"), ("eval_loss", "eval loss")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            axes.plot(*zip(*points), marker="." if key == "eval_loss" else None, label=label)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    if axes.lines:
        axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def plot_losses(run_dir: str) -> str | None:
    """Draw train and eval loss against steps into <run_dir>/loss.png; None without matplotlib or data."""
    path = metrics_file(run_dir)
    if not os.path.isfile(path):
        return None
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        warnings.warn("matplotlib is not installed: no loss.png (pip install matplotlib)")
        return None
    output = os.path.join(run_dir, "loss.png")
    loss_figure(read_metrics(path)).savefig(output, dpi=100)
    return output
