"""Training throughput: sftkit.train against transformers Trainer + peft on the same data and trainable tokens.

Both sides fine-tune the same model with LoRA (r 8, alpha 16, dropout 0, every linear layer but the output
head) on the same seeded chat rows, with the same schedule (AdamW, warmup, cosine), batch size 4, max
length 1024 and seed, for one pass over the same examples, so each learns the same tokens once; packing
changes sftkit's step count, not its tokens. The reference's labels come from sftkit's own build_example,
so both mask exactly the same tokens, and it batches the HF way: random order, right padding to the
longest example of the batch (DataCollatorForSeq2Seq).

Three comparisons, each against the same reference run (batch 4, right padding):
  equal tokens   sftkit:packed   packed rows, as many per step as hold the reference's real tokens per step
  user defaults  sftkit:defaults sftkit's default flags (padding-free batches) at the reference's batch size and max length
  user packing   sftkit:packing  --packing true at the reference's batch size (4 packed rows per step)
The user's view is what someone comparing the two tools with the same batch size gets; the equal-tokens view
holds the activations per step equal. Only the hyperparameters are set on the sftkit side (LoRA, schedule,
seed, dtype); memory and attention options keep their defaults (SDPA on both sides).

Every run is its own child process, so peak RSS (the child's ru_maxrss) belongs to that run alone, and
runs alternate A B B A ... so that slow drift of the machine cancels in the medians.

    python bench/train_throughput.py                       # embedded SmolLM2-135M-Instruct, CPU sized
    python bench/train_throughput.py --model-config 0.5b   # random Qwen2-0.5B-shaped model; MFU on a GPU
    python bench/train_throughput.py --quick               # tiny random model, seconds (used by the tests)
    python bench/train_throughput.py --examples 64 --sftkit-modes defaults,packing   # issue 21's user view only
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import chat_rows, machine_state, save_tiny_model, token_stats, write_json  # noqa: E402

IGNORE_INDEX = -100
REFERENCE = "reference"
MODES = ("packed", "defaults", "packing")
PACKED = ("sftkit:packed", "sftkit:packing")
COMPARISONS = {"equal tokens per step": "sftkit:packed", "user view, default flags, same batch": "sftkit:defaults",
               "user view, --packing true, same batch": "sftkit:packing"}
# Qwen2.5-0.5B / -1.5B shapes; weights random, so nothing is downloaded.
MODEL_CONFIGS = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2),
}
QWEN2_VOCAB = 151936
FLOPS_FORMULA = ("model FLOPs of one example of S tokens = 6 * N * S + 12 * L * H * S^2 (forward + backward, the "
                 "PaLM-paper estimate, no causal halving; counted on real tokens only, so padding is waste), "
                 "N = parameters of every weight matrix a token passes through (attention, MLP, output head; "
                 "input embedding excluded), L = layers, H = attention width (heads * head_dim). "
                 "MFU = model FLOPs of the run / training-loop seconds / peak FLOP/s. With LoRA the frozen weights "
                 "need no weight gradients, so the hardware does less than 6N; the standard 6N is kept for comparability.")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=None, help="training examples each run learns once (default 48; 8 with --quick)")
    parser.add_argument("--eval-examples", type=int, default=None,
                        help="held-out examples whose loss both sides compute after training (default 16; 4 with --quick)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each trainer, alternated A B B A ...")
    parser.add_argument("--sftkit-modes", default="packed,defaults,packing",
                        help="sftkit runs: packed (equal tokens per step), defaults (default flags, same batch), "
                             "packing (--packing true, same batch); comma-separated")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=None, help="default 1024; 256 with --quick")
    parser.add_argument("--median-tokens", type=int, default=None, help="median example length (default 200; 48 with --quick)")
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--model-config", choices=sorted(MODEL_CONFIGS), default=None,
                        help="a random Qwen2-shaped model of this size instead of the embedded SmolLM2 (meant for a GPU)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak dense TFLOP/s for MFU (default on CUDA: 989, H100 SXM bf16; no MFU on CPU unless given)")
    parser.add_argument("--quick", action="store_true", help="tiny random model and 8 examples: a smoke run of seconds")
    parser.add_argument("--out", default="bench/results/train_throughput.json", help="where the JSON goes")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one, removed at the end)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.examples = args.examples or (8 if args.quick else 48)
    args.eval_examples = args.eval_examples if args.eval_examples is not None else (4 if args.quick else 16)
    args.max_length = args.max_length or (256 if args.quick else 1024)
    args.median_tokens = args.median_tokens or (48 if args.quick else 200)
    modes = [mode.strip() for mode in args.sftkit_modes.split(",") if mode.strip()]
    if not modes or any(mode not in MODES for mode in modes):
        parser.error(f"--sftkit-modes takes a comma-separated subset of {','.join(MODES)}, got {args.sftkit_modes!r}")
    args.modes = modes
    if args.quick and args.model_config:
        parser.error("--quick and --model-config exclude each other")
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.child:
        run_child(args.child)
        return None
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    peak_tflops = args.peak_tflops or (989.0 if device.startswith("cuda") else None)
    workdir = args.workdir or tempfile.mkdtemp(prefix="sftkit-bench-")
    os.makedirs(workdir, exist_ok=True)
    try:
        model_name, model_dir, sftkit_model, template = prepare_model(args, workdir, device)
        data_path, eval_path, lengths, data = make_dataset(args, model_dir, template, workdir)
        shape = model_shape(model_dir)
        model_flops = sum(6 * shape["matmul_params"] * n + 12 * shape["layers"] * shape["attention_width"] * n * n for n in lengths)
        print(f"[bench] {model_name} on {device}: {data['examples']} examples, {data['all_tokens']} tokens "
              f"({data['trainable_tokens']} trainable), lengths {data['tokens_per_example']}", flush=True)
        machine_before = machine_state()

        runs = []
        names = [f"sftkit:{mode}" for mode in args.modes] + [REFERENCE]
        for repeat in range(args.repeats):
            for name in (names if repeat % 2 == 0 else names[::-1]):
                spec = {"name": name, "model": sftkit_model, "model_dir": model_dir, "template": template, "data": data_path,
                        "eval_data": eval_path,
                        "device": device, "run_dir": os.path.join(workdir, f"run-{len(runs)}-{name.replace(':', '-')}"),
                        "batch_size": packed_batch_size(args, data) if name == "sftkit:packed" else args.batch_size,
                        "max_length": args.max_length, "learning_rate": args.learning_rate,
                        "warmup_ratio": args.warmup_ratio, "seed": args.seed}
                run = run_in_child(spec)
                run.update(repeat=repeat, order=len(runs))
                finish_run(run, model_flops, peak_tflops, args.max_length, data["examples"])
                print(describe(run), flush=True)
                runs.append(run)
        summary = summarise(runs, names)
        result = {"benchmark": "train_throughput",
                  "comparisons": {label: f"{name}/{REFERENCE}" for label, name in COMPARISONS.items() if name in names},
                  "machine": {**machine_before, "load_average_after": machine_state()["load_average"]},
                  "settings": settings_of(args, model_name, model_dir, template, device), "data": data,
                  "flops": {"formula": FLOPS_FORMULA, **shape, "model_flops_per_pass": model_flops, "peak_tflops": peak_tflops},
                  "runs": runs, "summary": summary, "ratios": ratios(summary, names)}
        print_summary(result)
        write_json(args.out, result)
        return result
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def make_dataset(args, model_dir: str, template: str, workdir: str) -> tuple[str, str, list[int], dict]:
    """Write the seeded training and held-out chat rows as jsonl; (their paths, each training example's token
    count, a description of the data)."""
    from sftkit.data.pipeline import build_example
    from sftkit.model import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    rows = chat_rows(tokenizer, args.examples, seed=args.seed, median=args.median_tokens, max_tokens=args.max_length)
    held_out = chat_rows(tokenizer, args.eval_examples, seed=args.seed + 1, median=args.median_tokens, max_tokens=args.max_length)
    path, eval_path = os.path.join(workdir, "train.jsonl"), os.path.join(workdir, "eval.jsonl")
    for file_path, file_rows in ((path, rows), (eval_path, held_out)):
        with open(file_path, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in file_rows)
    examples = [e for e in (build_example(row, tokenizer=tokenizer, template=template, max_length=args.max_length)
                            for row in rows) if e is not None]
    lengths = [len(e["input_ids"]) for e in examples]
    trainable = sum(sum(label != IGNORE_INDEX for label in e["labels"][1:]) for e in examples)
    return path, eval_path, lengths, {
        "rows": len(rows), "examples": len(examples), "eval_examples": len(held_out), "tokens_per_example": token_stats(lengths),
        "trainable_tokens": trainable, "all_tokens": sum(lengths), "trainable_share": round(trainable / max(sum(lengths), 1), 4),
        "length_distribution": f"lognormal, median {args.median_tokens} tokens, sigma 0.8, clipped to [32, {args.max_length}]"}


def settings_of(args, model_name: str, model_dir: str, template: str, device: str) -> dict:
    return {
        "model": model_name, "model_dir": model_dir, "template": template, "device": device,
        "dtype": "bf16 base + fp32 LoRA, bf16 autocast" if device.startswith("cuda") else "fp32", "attention": "sdpa",
        "examples": args.examples, "repeats": args.repeats, "sftkit_modes": args.modes, "batch_size": args.batch_size,
        "max_length": args.max_length, "learning_rate": args.learning_rate, "warmup_ratio": args.warmup_ratio,
        "lr_scheduler": "cosine", "epochs": 1, "gradient_accumulation_steps": 1, "max_grad_norm": 1.0, "weight_decay": 0.0,
        "seed": args.seed, "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targets": "all-linear (every Linear but the output head)"},
        "optimizer": {"sftkit": "torch AdamW", "reference": "transformers' default (adamw_torch_fused on torch >= 2.8)"},
        "timing": "loop_seconds: training loop start to the end of its last optimizer step (the tokens/s figures); "
                  "total_seconds: model load, tokenization, training, held-out loss and the final save, after imports",
        "eval_loss": "token-mean loss on eval_examples held-out rows after training (same rows and masks on both sides)",
        "quick": args.quick}


def prepare_model(args, workdir: str, device: str) -> tuple[str, str, str | None, str]:
    """(name, model folder, what sftkit's --model gets (None: the embedded default), template)."""
    if args.quick:
        folder = save_tiny_model(os.path.join(workdir, "bench-tiny"))
        return "tiny-llama (random, 2 layers, hidden 64)", folder, folder, "chatml"
    from sftkit.model import resolve_model_dir

    embedded = resolve_model_dir(None)
    if not args.model_config:
        return "SmolLM2-135M-Instruct (embedded)", embedded, None, "smollm2"
    if not device.startswith("cuda"):
        print(f"[bench] warning: --model-config {args.model_config} on {device} is slow; it is meant for a GPU", flush=True)
    folder = os.path.join(workdir, f"bench-qwen2-{args.model_config}")
    save_random_qwen2(MODEL_CONFIGS[args.model_config], embedded, folder)
    return f"Qwen2-{args.model_config} shape (random weights)", folder, folder, "smollm2"


def save_random_qwen2(sizes: dict, tokenizer_dir: str, folder: str) -> None:
    """A Qwen2-shaped model with random bf16 weights and the SmolLM2 tokenizer (its ids fit the larger vocabulary)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = AutoConfig.for_model("qwen2", vocab_size=QWEN2_VOCAB, max_position_embeddings=32768, tie_word_embeddings=True,
                                  rms_norm_eps=1e-6, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id, **sizes)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def model_shape(model_dir: str) -> dict:
    """Layer count, attention width and matmul parameters of a llama/qwen2-style config (see FLOPS_FORMULA)."""
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as handle:
        return shape_of(json.load(handle))


def shape_of(config: dict) -> dict:
    """model_shape from a config's fields."""
    hidden, layers, heads = config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv_heads = config.get("num_key_value_heads") or heads
    per_layer = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + 3 * hidden * config["intermediate_size"]
    return {"layers": layers, "attention_width": heads * head_dim,
            "matmul_params": layers * per_layer + config["vocab_size"] * hidden}



def packed_batch_size(args, data) -> int:
    """Packed rows per step holding about as many real tokens as one reference batch, so both runs take about
    as many optimizer steps and hold about as many activations (packing 4 full rows would quadruple both)."""
    mean_tokens = data["all_tokens"] / data["examples"]
    return max(1, round(args.batch_size * mean_tokens / args.max_length))


def run_in_child(spec: dict) -> dict:
    """Run one trainer in a fresh Python process; its peak RSS comes from the kernel's accounting of that child."""
    os.makedirs(spec["run_dir"], exist_ok=True)
    spec_path = os.path.join(spec["run_dir"], "spec.json")
    with open(spec_path, "w", encoding="utf-8") as handle:
        json.dump(spec, handle)
    print(f"[bench] {spec['name']} ...", flush=True)
    process = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", spec_path])
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{spec['name']} failed with exit code {process.returncode} (its output is above)")
    with open(os.path.join(spec["run_dir"], "result.json"), encoding="utf-8") as handle:
        run = json.load(handle)
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    run["peak_rss_mb"] = round(usage.ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)
    return {"name": spec["name"], **run}


def finish_run(run: dict, model_flops: int, peak_tflops: float | None, max_length: int, examples: int) -> None:
    """Turn what a child recorded (per-batch token counts, step times, losses) into the reported figures."""
    batches, loop = run.pop("batches"), run["loop_seconds"]
    trained = sum(b["trainable"] for b in batches)
    real = sum(b["real"] for b in batches)
    padded = sum(b["total"] - b["real"] for b in batches)
    run.update(
        steps=len(batches), trainable_tokens=trained, all_tokens=real, padded_tokens=padded,
        examples_seen=sum(b["examples"] for b in batches),
        trainable_tokens_per_s=round(trained / loop, 2), all_tokens_per_s=round(real / loop, 2),
        seconds_per_step=round(loop / max(len(batches), 1), 4),
        median_step_seconds=round(statistics.median(run["step_seconds"]), 4) if run["step_seconds"] else None,
        padding_share=round(padded / max(real + padded, 1), 4),
        # Without the first step, which pays one-off costs (allocator growth, kernel selection, lazy imports).
        trainable_tokens_per_s_after_first_step=(
            round((trained - batches[0]["trainable"]) / (loop - run["step_seconds"][0]), 2) if len(batches) > 1 else None),
        final_loss=run["losses"][-1] if run["losses"] else None,
        achieved_tflops=round(model_flops / loop / 1e12, 4),
        mfu=round(model_flops / loop / (peak_tflops * 1e12), 4) if peak_tflops else None,
    )
    if run["name"] in PACKED:
        rows = sum(b["rows"] for b in batches)
        run["packed_rows"] = rows
        run["fill_ratio"] = round(real / max(rows * max_length, 1), 4)
    run["loss_last_20pct"], run["loss_last_20pct_examples"] = tail_loss(run["losses"], batches, examples)
    if run["examples_seen"] != examples:
        print(f"[bench] warning: {run['name']} saw {run['examples_seen']} examples, expected {examples}", flush=True)


def tail_loss(losses: list[float], batches: list[dict], examples: int) -> tuple[float | None, int]:
    """Token-weighted mean loss of the last steps that together hold at least 20% of the examples."""
    if not losses or len(losses) != len(batches):
        return None, 0
    total = weight = covered = 0
    for loss, batch in zip(reversed(losses), reversed(batches)):
        total, weight, covered = total + loss * batch["trainable"], weight + batch["trainable"], covered + batch["examples"]
        if covered >= 0.2 * examples:
            break
    return round(total / max(weight, 1), 6), covered


COMPARED = ("trainable_tokens_per_s", "trainable_tokens_per_s_after_first_step", "all_tokens_per_s", "seconds_per_step",
            "peak_rss_mb", "peak_gpu_mem_mb", "eval_loss", "loss_last_20pct", "final_loss", "loop_seconds", "total_seconds")
FIGURES = COMPARED + ("achieved_tflops", "mfu", "steps", "padding_share", "fill_ratio", "rss_after_imports_mb", "trainable_params",
                      "estimated_peak_mb")


def summarise(runs: list[dict], names: list[str]) -> dict:
    """Median of each figure over the repeats, per trainer."""
    summary = {}
    for name in names:
        mine = [run for run in runs if run["name"] == name]
        summary[name] = {figure: _median([run.get(figure) for run in mine]) for figure in FIGURES}
        summary[name]["runs"] = len(mine)
    return summary


def _median(values):
    values = [value for value in values if value is not None]
    return round(statistics.median(values), 6) if values else None


def ratios(summary: dict, names: list[str]) -> dict:
    """sftkit / reference for each figure where both have one (above 1 is better for throughput, worse for the rest)."""
    reference = summary[REFERENCE]
    out = {}
    for name in names:
        if name == REFERENCE:
            continue
        out[f"{name}/{REFERENCE}"] = {
            figure: round(summary[name][figure] / reference[figure], 4)
            for figure in COMPARED if summary[name][figure] is not None and reference[figure]}
    return out


def describe(run: dict) -> str:
    extra = f", fill {run['fill_ratio']:.1%}" if "fill_ratio" in run else ""
    gpu = f", GPU peak {run['peak_gpu_mem_mb']:.0f} MB" if run.get("peak_gpu_mem_mb") is not None else ""
    mfu = f", MFU {run['mfu']:.1%}" if run.get("mfu") is not None else ""
    estimated = f" (sftkit's estimate {run['estimated_peak_mb']:.0f} MB)" if run.get("estimated_peak_mb") else ""
    return (f"[bench] {run['name']}: {run['trainable_tokens_per_s']:.1f} trainable tok/s, {run['all_tokens_per_s']:.1f} tok/s, "
            f"{run['seconds_per_step']:.2f} s/step x {run['steps']} steps (loop {run['loop_seconds']:.1f} s, total "
            f"{run['total_seconds']:.1f} s), peak RSS {run['peak_rss_mb']:.0f} MB{estimated}{gpu}, padding {run['padding_share']:.1%}"
            f"{extra}, loss last 20% {run['loss_last_20pct']}, final {run['final_loss']}, held-out {run['eval_loss']}{mfu}")


def print_summary(result: dict) -> None:
    print("\n[bench] medians over repeats:")
    for name, figures in result["summary"].items():
        print(f"  {name:16s} " + ", ".join(f"{key} {value}" for key, value in figures.items() if value is not None))
    labels = {pair: label for label, pair in result["comparisons"].items()}
    for pair, figures in result["ratios"].items():
        print(f"  {labels.get(pair, pair)} ({pair}): " + ", ".join(f"{key} {value}" for key, value in figures.items()))
    print(f"  load average before {result['machine']['load_average']}, after {result['machine']['load_average_after']}")


# ---- child side: one trainer per process ------------------------------------------------------------------------


def run_child(spec_path: str) -> None:
    with open(spec_path, encoding="utf-8") as handle:
        spec = json.load(handle)
    record = run_sftkit(spec) if spec["name"].startswith("sftkit") else run_reference(spec)
    with open(os.path.join(spec["run_dir"], "result.json"), "w", encoding="utf-8") as handle:
        json.dump(record, handle)


class BatchLog:
    """Token counts of every batch a trainer collates, in training order (no DataLoader workers: order is kept)."""

    def __init__(self):
        self.batches: list[dict] = []

    def add(self, input_rows: list[list[int]], label_rows: list[list[int]], width: int, examples: int) -> None:
        self.batches.append({
            "rows": len(input_rows), "examples": examples, "real": sum(len(row) for row in input_rows),
            "total": width * len(input_rows),
            # Position t predicts t+1: the first label of a row is never a target.
            "trainable": sum(sum(label != IGNORE_INDEX for label in row[1:]) for row in label_rows)})


class StepClock:
    """Wall-clock marks: the loop's start, then the end of every optimizer step (after the device finishes)."""

    def __init__(self, device: str):
        self.marks: list[float] = []
        self.cuda = device.startswith("cuda")

    def mark(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        self.marks.append(time.perf_counter())

    def figures(self) -> dict:
        steps = [b - a for a, b in zip(self.marks, self.marks[1:])]
        return {"loop_seconds": round(self.marks[-1] - self.marks[0], 4), "step_seconds": [round(s, 4) for s in steps]}


def peak_rss_so_far_mb() -> float:
    """Taken once the libraries are imported: the floor under peak_rss_mb that neither model nor data cause."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def gpu_figures(device: str) -> dict:
    if not device.startswith("cuda"):
        return {"peak_gpu_mem_mb": None}
    import torch

    return {"peak_gpu_mem_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
            "peak_gpu_reserved_mb": round(torch.cuda.max_memory_reserved() / 2**20, 1)}


def run_sftkit(spec: dict) -> dict:
    """sftkit.train as a user calls it, observed through its on_record hook: each step's record carries the
    window's token counts, and the clock is read as the record arrives (after the optimizer step)."""
    from safetensors import safe_open

    from sftkit import TrainConfig, train
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401  imported before the clock, as the reference's are

    imported_rss = peak_rss_so_far_mb()
    started = time.perf_counter()
    log, clock, estimated = BatchLog(), StepClock(spec["device"]), {}
    cuda = spec["device"].startswith("cuda")

    def observe(record: dict) -> None:
        if "run_dir" in record:  # the loop starts
            clock.mark()
            estimated["peak_mb"] = record["estimated_peak_mb"]
        if "loss" not in record:  # the start, or an evaluation
            return
        clock.mark()
        log.batches.append({"rows": record["rows"], "examples": record["examples"], "real": record["tokens"],
                            "total": record["batch_positions"], "trainable": record["trainable_tokens"]})

    config = TrainConfig(
        model=spec["model"], dataset=(spec["data"],), val_dataset=(spec["eval_data"],), eval_batch_size=1, template=spec["template"],
        max_length=spec["max_length"], packing=spec["name"] in PACKED, batch_size=spec["batch_size"],
        gradient_accumulation_steps=1, num_train_epochs=1, learning_rate=spec["learning_rate"],
        warmup_ratio=spec["warmup_ratio"], lr_scheduler_type="cosine", weight_decay=0.0, max_grad_norm=1.0,
        sft_type="lora", lora_rank=8, lora_alpha=16, lora_dropout=0.0, lora_target_modules=("all-linear",),
        dtype="bf16" if cuda else "fp32", device=spec["device"], use_flash_attn=False, seed=spec["seed"], logging_steps=1,
        eval_steps=10**9, save_steps=10**9, save_total_limit=1, output_dir=spec["run_dir"], add_output_dir_suffix=False,
        dataset_cache=False)  # tokenize in every run, as the reference does
    best = train(config, on_record=observe)
    total = time.perf_counter() - started
    with open(os.path.join(spec["run_dir"], "metrics.jsonl"), encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    losses = [record["loss"] for record in records if "loss" in record]
    eval_loss = [record["eval_loss"] for record in records if "eval_loss" in record][-1]
    with safe_open(os.path.join(best, "adapter_model.safetensors"), "pt") as adapter:
        trainable = sum(math.prod(adapter.get_slice(key).get_shape()) for key in adapter.keys())
    flags = {name: getattr(config, name) for name in ("packing", "padding_free", "batch_size", "max_length", "max_memory",
                                                      "varlen_attention", "gradient_checkpointing")}
    return {**clock.figures(), "total_seconds": round(total, 3), "losses": losses, "eval_loss": eval_loss, "batches": log.batches,
            "trainable_params": trainable, "rss_after_imports_mb": imported_rss, "sftkit_flags": flags,
            "estimated_peak_mb": estimated.get("peak_mb"), **gpu_figures(spec["device"])}


def run_reference(spec: dict) -> dict:
    """transformers Trainer + peft, the usual way: labels from sftkit's build_example (the same masked tokens),
    random batches right-padded by DataCollatorForSeq2Seq."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from sftkit.data.pipeline import build_example

    imported_rss = peak_rss_so_far_mb()
    started = time.perf_counter()
    cuda = spec["device"].startswith("cuda")
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"

    def examples(path: str) -> list[dict]:
        with open(path, encoding="utf-8") as handle:
            rows = [json.loads(line) for line in handle if line.strip()]
        built = (build_example(row, tokenizer=tokenizer, template=spec["template"], max_length=spec["max_length"]) for row in rows)
        return [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in built if e is not None]

    dataset, held_out = examples(spec["data"]), examples(spec["eval_data"])

    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.bfloat16 if cuda else torch.float32,
                                                 attn_implementation="sdpa").to(spec["device"])
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    log, clock = BatchLog(), StepClock(spec["device"])
    pad = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, padding=True)

    def collate(features):
        batch = pad(features)
        log.add([f["input_ids"] for f in features], [f["labels"] for f in features], batch["input_ids"].shape[1], len(features))
        return batch

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.mark()

        def on_step_end(self, args, state, control, **kwargs):
            clock.mark()

    warmup = ({"warmup_ratio": spec["warmup_ratio"]} if "warmup_ratio" in TrainingArguments.__dataclass_fields__
              else {"warmup_steps": spec["warmup_ratio"]})  # transformers 5 takes a ratio as a float warmup_steps
    arguments = TrainingArguments(
        output_dir=spec["run_dir"], per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=1,
        num_train_epochs=1, learning_rate=spec["learning_rate"], lr_scheduler_type="cosine", weight_decay=0.0,
        max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to="none", seed=spec["seed"], bf16=cuda,
        use_cpu=not cuda, dataloader_num_workers=0, remove_unused_columns=False, **warmup)
    trainer = Trainer(model=model, args=arguments, train_dataset=dataset, data_collator=collate, callbacks=[Clock()])
    trainer.train()
    eval_loss = held_out_loss(model, held_out, spec["device"])
    trainer.save_model(os.path.join(spec["run_dir"], "adapter"))
    total = time.perf_counter() - started
    losses = [round(entry["loss"], 6) for entry in trainer.state.log_history if "loss" in entry]
    return {**clock.figures(), "total_seconds": round(total, 3), "losses": losses, "eval_loss": eval_loss, "batches": log.batches,
            "trainable_params": model.get_nb_trainable_parameters()[0], "rss_after_imports_mb": imported_rss,
            **gpu_figures(spec["device"])}


def held_out_loss(model, examples: list[dict], device: str) -> float:
    """Token-mean loss over held-out examples, as sftkit's evaluation computes it: one example per forward, so
    weighting HF's per-example mean by its target count gives the exact token mean."""
    import torch

    model.eval()
    total = targets = 0.0
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
        for example in examples:
            count = sum(label != IGNORE_INDEX for label in example["labels"][1:])
            loss = model(input_ids=torch.tensor([example["input_ids"]], device=device),
                         labels=torch.tensor([example["labels"]], device=device)).loss
            total, targets = total + loss.item() * count, targets + count
    return round(total / max(targets, 1), 6)


if __name__ == "__main__":
    main()
