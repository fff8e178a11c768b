"""Reproduce the README's agent tables: regenerate the data, score the base model, fine-tune, score again on the
in-distribution split (test.jsonl) and the generalisation split (test_general.jsonl), with calls constrained to
the offered tools (grounded: the likeliest whole call, with dates and strings kept to what the conversation
names; scored: the likeliest whole call; token: picked token by token) and free.

    python examples/agent/reproduce.py [--device cpu|cuda] [--out output/agent-report]
                                       [--splits test,general] [--modes grounded,scored,token,free]
                                       [--train_dataset_sample N] [--skip_before] [--skip_train RUN_DIR] [--limit N]

Writes <out>/<when>-<split>-<mode>.json (sftkit eval reports) and <out>/table.md.
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
SPLIT_FILES = {"test": "test.jsonl", "general": "test_general.jsonl"}
ROWS = [("tool-name accuracy", "tool_name_acc"), ("argument exact match", "args_exact_match"),
        ("argument F1", "args_f1"), ("answer ROUGE-L", "answer_rouge_l"), ("no-call accuracy (chit-chat)", "no_call_acc")]


def run(command: list[str]) -> None:
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


MODES = {"grounded": ["--constrained_tool_calls", "true", "--score_tool_calls", "true", "--ground_tool_values", "true"],
         "scored": ["--constrained_tool_calls", "true", "--score_tool_calls", "true"],
         "token": ["--constrained_tool_calls", "true", "--score_tool_calls", "false"],
         "free": ["--constrained_tool_calls", "false"]}


def evaluate(out: Path, name: str, split: str, mode: str, extra: list[str], limit: int | None) -> dict:
    report = out / f"{name}-{split}-{mode}.json"
    started = time.time()
    run(["sftkit", "eval", "--dataset", str(HERE / SPLIT_FILES[split]), "--metrics", "agent", "--max_new_tokens", "160",
         "--batch_size", "20", *MODES[mode], "--output", str(report), *(["--limit", str(limit)] if limit else []), *extra])
    print(f"[reproduce] {name}, {split}, {mode}: {time.time() - started:.0f} s", flush=True)
    return json.loads(report.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--out", default="output/agent-report")
    parser.add_argument("--splits", default="test,general", help="test (in distribution) and/or general (held out)")
    parser.add_argument("--modes", default="grounded,scored,free",
                        help="how the tuned model's calls are made: grounded (scored, values kept to what the "
                             "conversation names), scored (constrained, the likeliest whole call), token (constrained, "
                             "token by token), free")
    parser.add_argument("--train_dataset_sample", type=int, default=None, help="override the recipe's training rows")
    parser.add_argument("--skip_before", action="store_true", help="do not score the base model")
    parser.add_argument("--skip_train", type=Path, default=None, help="score this finished run folder instead of training")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N rows of each split")
    args = parser.parse_args()
    splits = [split.strip() for split in args.splits.split(",") if split.strip()]
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    if not modes or set(modes) - set(MODES):
        parser.error(f"--modes takes a comma list of {', '.join(MODES)}, got '{args.modes}'")
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    run([sys.executable, str(HERE / "make_dataset.py"), "--out", str(HERE)])
    columns: list[tuple[str, dict]] = []
    if not args.skip_before:
        columns += [(f"before, {split}", evaluate(out, "before", split, "scored", [], args.limit)) for split in splits]
    started = time.time()
    if args.skip_train is None:
        train = ["sftkit", "train", "--config", str(HERE / "recipe.yaml"), "--output_dir", str(out / "run")]
        train += ["--device", args.device] if args.device else []
        train += ["--train_dataset_sample", str(args.train_dataset_sample)] if args.train_dataset_sample else []
        run(train)
    wall = time.time() - started
    run_dir = args.skip_train.resolve() if args.skip_train else max((p for p in (out / "run").glob("*/v*") if p.is_dir()), key=os.path.getmtime)
    best = run_dir / (run_dir / "best").read_text().strip()
    after = [(f"after, {split}, {mode}", evaluate(out, "after", split, mode, ["--ckpt_dir", str(best)], args.limit))
             for split in splits for mode in modes]
    columns += after
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    throughput = [m["trainable_tokens_per_s"] for m in metrics if "trainable_tokens_per_s" in m]
    lines = table(["metric"] + [name for name, _ in columns],
                  [[label] + [_fmt(report["metrics"].get(key)) for _, report in columns] for label, key in ROWS])
    kinds = list(after[0][1]["errors"]["counts"])
    lines += [""] + table(["call errors (tuned model)"] + [name for name, _ in after],
                          [[kind] + [str(report["errors"]["counts"][kind]) for _, report in after] for kind in kinds])
    trained = f"{wall / 60:.1f} min wall time (model load, tokenization, evaluation and saves included)" \
        if args.skip_train is None else "an earlier run"
    lines += ["", f"Training: {trained}, median {sorted(throughput)[len(throughput) // 2]:.0f} trainable tokens/s, "
              f"best checkpoint `{best.relative_to(ROOT) if best.is_relative_to(ROOT) else best}`."]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] + ["| " + " | ".join(row) + " |" for row in rows]


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    main()
