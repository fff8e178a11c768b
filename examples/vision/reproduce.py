"""Reproduce the README's vision table: make the shapes data and a small Qwen2-VL, caption the test pictures,
fine-tune, caption them again.

    python examples/vision/reproduce.py [--device cpu|cuda] [--out output/vision-report] [--quick]
    python examples/vision/reproduce.py --model_type qwen2-vl-2b-instruct --config examples/vision/recipe-qwen2-vl.yaml

Writes <out>/before.jsonl and <out>/after.jsonl (sftkit infer's rows), <out>/table.md (the README's table) and
<out>/loss.png (the run's curves). --quick trains 30 steps on 200 rows, as a smoke test.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
from make_dataset import COLOURS, SHAPES, SIZES  # noqa: E402


def run(command: list[str]) -> None:
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def accuracy(rows: list[dict]) -> dict:
    """Exact caption match, and how often each attribute of the reference is the one the prediction names."""
    def named(words: list[str], vocabulary) -> set:
        return {word for word in words if word in vocabulary}

    scores = {"caption": 0, "size": 0, "colour": 0, "shape": 0}
    for row in rows:
        predicted, reference = row["prediction"].strip().lower().split(), row["reference"].split()
        scores["caption"] += predicted == reference
        for key, vocabulary in (("size", SIZES), ("colour", COLOURS), ("shape", SHAPES)):
            scores[key] += named(predicted, vocabulary) == named(reference, vocabulary)
    return {key: value / max(len(rows), 1) for key, value in scores.items()}


def caption(out: Path, name: str, test: Path, model: list[str]) -> dict:
    result = out / f"{name}.jsonl"
    run(["sftkit", "infer", "--dataset", str(test), "--max_new_tokens", "12", "--batch_size", "30",
         "--show_dataset_sample", "3", "--output", str(result), *model])
    return accuracy([json.loads(line) for line in result.read_text().splitlines()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--out", default="output/vision-report")
    parser.add_argument("--config", default=str(HERE / "recipe.yaml"), help="training options (a sftkit train --config file)")
    parser.add_argument("--model_type", default=None, help="a registered model type to fine-tune instead of the small model")
    parser.add_argument("--quick", action="store_true", help="30 steps on 200 rows: a smoke test, not the table")
    args = parser.parse_args()
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    run([sys.executable, str(HERE / "make_dataset.py"), "--out", str(data)] + (["--train", "200", "--test", "30"] * args.quick))
    if args.model_type:
        from sftkit.registry import MODELS

        model, base = ["--model_type", args.model_type], ["--model", MODELS[args.model_type].model_id_or_path]
    else:
        run([sys.executable, str(HERE / "make_model.py"), "--out", str(out / "model")])
        model = base = ["--model", str(out / "model")]
    before = caption(out, "before", data / "test.jsonl", base + ["--template", "qwen"])
    device = ["--device", args.device] if args.device else []
    quick = ["--max_steps", "30", "--eval_steps", "15"] if args.quick else []
    started = time.time()
    run(["sftkit", "train", "--config", args.config, *model, "--dataset", str(data / "train.jsonl"),
         "--output_dir", str(out / "run"), *device, *quick])
    wall = time.time() - started
    run_dir = max((p for p in (out / "run").glob("*/v*") if p.is_dir()), key=os.path.getmtime)
    best = run_dir / (run_dir / "best").read_text().strip()
    after = caption(out, "after", data / "test.jsonl", ["--ckpt_dir", str(best)])
    if (run_dir / "loss.png").is_file():
        shutil.copyfile(run_dir / "loss.png", out / "loss.png")
    tested = len((data / "test.jsonl").read_text().splitlines())
    lines = [f"| accuracy on {tested} test pictures | before | after |", "| --- | --- | --- |"]
    lines += [f"| {label} | {before[key]:.3f} | {after[key]:.3f} |"
              for label, key in (("whole caption", "caption"), ("size", "size"), ("colour", "colour"), ("shape", "shape"))]
    lines += ["", f"Training: {wall / 60:.1f} min wall time (model load, tokenization, evaluation and saves included), "
              f"best checkpoint `{best.relative_to(ROOT) if best.is_relative_to(ROOT) else best}`."]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
