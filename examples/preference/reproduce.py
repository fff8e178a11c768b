"""Reproduce the README's preference table: regenerate the data, score the base model, run DPO, score again.

    python examples/preference/reproduce.py [--device cpu|cuda] [--out output/preference-report]

On the 100 held-out pairs of test.jsonl it measures, before and after training:
  - DPO reward accuracy: the share of pairs whose implied reward beta*log(pi/pi_ref) is higher for the chosen
    answer (the run's final eval_rewards/accuracies; before training pi = pi_ref, so every reward is 0);
  - likelihood preference: the share of pairs whose chosen answer the model finds more likely per token than
    the rejected one (SimPO's reference-free reward), for the base model and the trained one;
  - the share of answers generated for the held-out prompts that are in the taught format (the numbers are
    not scored: both answers of every pair hold the right one, so the preferences teach the format only).
Writes <out>/before.json, <out>/after.json and <out>/table.md (the README's table).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
TEST = HERE / "test.jsonl"
TAUGHT = re.compile(r'\{"answer": (-?\d+)\}')


def run(command: list[str]) -> None:
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def likelihood_preference(ckpt: str | None, template: str, device: str | None) -> dict:
    """Share of held-out pairs whose chosen answer has the higher mean log-probability per token, and the mean
    per-token margin."""
    import torch

    from sftkit import load_for_inference
    from sftkit.data.pipeline import build_preference_examples, collate_preference
    from sftkit.data.preference_formats import to_preference
    from sftkit.loss import sequence_log_probs

    model, tokenizer, settings = load_for_inference(ckpt, None, template=template)
    if device:
        model.to(device)
    rows = [to_preference(json.loads(line)) for line in TEST.read_text(encoding="utf-8").splitlines()]
    examples, _ = build_preference_examples(rows, tokenizer=tokenizer, template=settings.template, system=settings.system)
    margins = []
    with torch.no_grad():
        for start in range(0, len(examples), 20):
            batch = collate_preference(examples[start:start + 20], tokenizer.pad_token_id)
            sums, counts = sequence_log_probs(model, {key: value.to(model.device) for key, value in batch.items()})
            means = (sums / counts).tolist()
            half = len(means) // 2
            margins += [chosen - rejected for chosen, rejected in zip(means[:half], means[half:])]
    return {"likelihood_preference": sum(m > 0 for m in margins) / len(margins),
            "mean_log_prob_margin": sum(margins) / len(margins)}


def generated_format(out: Path, name: str, extra: list[str]) -> dict:
    """Generate an answer for every held-out prompt; the share in the taught format."""
    prompts = out / "prompts.jsonl"
    with prompts.open("w", encoding="utf-8") as handle:
        for line in TEST.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["chosen"]}]
            handle.write(json.dumps({"messages": messages}) + "\n")
    result = out / f"{name}_answers.jsonl"
    run(["sftkit", "infer", "--dataset", str(prompts), "--max_new_tokens", "24", "--batch_size", "25",
         "--show_dataset_sample", "3", "--output", str(result), *extra])
    rows = [json.loads(line) for line in result.read_text(encoding="utf-8").splitlines()]
    return {"taught_format": sum(bool(TAUGHT.fullmatch(row["prediction"].strip())) for row in rows) / len(rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--out", default="output/preference-report")
    args = parser.parse_args()
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    from sftkit.registry import EMBEDDED_MODEL_TYPE, MODELS

    template = MODELS[EMBEDDED_MODEL_TYPE].template  # what training uses with no --template
    device = ["--device", args.device] if args.device else []
    run([sys.executable, str(HERE / "make_dataset.py"), "--out", str(HERE)])
    before = {"dpo_reward_accuracy": 0.0, **likelihood_preference(None, template, args.device),
              **generated_format(out, "before", ["--template", template])}
    (out / "before.json").write_text(json.dumps(before, indent=2))
    started = time.time()
    run(["sftkit", "rlhf", "--config", str(HERE / "recipe.yaml"), "--output_dir", str(out / "run"), *device])
    wall = time.time() - started
    run_dir = max((p for p in (out / "run").glob("*/v*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    best = run_dir / (run_dir / "best").read_text().strip()
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [m for m in metrics if "eval_rewards/accuracies" in m][-1]
    after = {"dpo_reward_accuracy": final["eval_rewards/accuracies"], "dpo_reward_margin": final["eval_rewards/margins"],
             **likelihood_preference(str(best), template, args.device),
             **generated_format(out, "after", ["--ckpt_dir", str(best)])}
    (out / "after.json").write_text(json.dumps(after, indent=2))
    lines = ["| 100 held-out pairs | before | after |", "| --- | --- | --- |"]
    for label, key in (("DPO reward accuracy (eval_rewards/accuracies)", "dpo_reward_accuracy"),
                       ("chosen more likely per token than rejected", "likelihood_preference"),
                       ("generated answers in the taught format", "taught_format")):
        lines.append(f"| {label} | {before[key]:.2f} | {after[key]:.2f} |")
    steps = max(m["step"] for m in metrics)
    lines += ["", f"Training: {steps} steps in {wall / 60:.1f} min wall time (model load, tokenization, evaluation and "
              f"saves included), final eval_rewards/margins {after['dpo_reward_margin']:.2f}, best checkpoint "
              f"`{best.relative_to(ROOT)}`."]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
