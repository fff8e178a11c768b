"""Reproduce the README's agent table: regenerate the data, score the base model, fine-tune, score again.

    python examples/agent/reproduce.py [--device cpu|cuda] [--out output/agent-report]

Writes <out>/before.json, <out>/after.json and <out>/table.md (the README's table).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
ROWS = [("tool-name accuracy", "tool_name_acc"), ("argument exact match", "args_exact_match"),
        ("argument F1", "args_f1"), ("answer ROUGE-L", "answer_rouge_l"), ("no-call accuracy (chit-chat)", "no_call_acc")]


def run(command: list[str]) -> None:
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def evaluate(out: Path, name: str, extra: list[str]) -> dict:
    report = out / f"{name}.json"
    run(["sftkit", "eval", "--dataset", "examples/agent/test.jsonl", "--metrics", "agent", "--max_new_tokens", "160",
         "--batch_size", "20", "--output", str(report), *extra])
    return json.loads(report.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--out", default="output/agent-report")
    args = parser.parse_args()
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    run([sys.executable, str(HERE / "make_dataset.py"), "--out", str(HERE)])
    before = evaluate(out, "before", [])
    started = time.time()
    device = ["--device", args.device] if args.device else []
    run(["sftkit", "train", "--config", str(HERE / "recipe.yaml"), "--output_dir", str(out / "run"), *device])
    wall = time.time() - started
    run_dir = max((p for p in (out / "run").glob("*/v*") if p.is_dir()), key=os.path.getmtime)
    best = run_dir / (run_dir / "best").read_text().strip()
    after = evaluate(out, "after", ["--ckpt_dir", str(best)])
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    throughput = [m["trainable_tokens_per_s"] for m in metrics if "trainable_tokens_per_s" in m]
    lines = ["| metric (100 test conversations) | before | after |", "| --- | --- | --- |"]
    for label, key in ROWS:
        lines.append(f"| {label} | {_fmt(before['metrics'].get(key))} | {_fmt(after['metrics'].get(key))} |")
    lines += ["", f"Training: {wall / 60:.1f} min wall time (model load, tokenization, evaluation and saves included), "
              f"median {sorted(throughput)[len(throughput) // 2]:.0f} trainable tokens/s, best checkpoint `{best.relative_to(ROOT)}`."]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    main()
