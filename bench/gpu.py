"""One training step on a GPU: sftkit's step against transformers + peft's, same model, LoRA, data, batch and seed.

Each model is built here with random bf16 weights from its config (Qwen2-0.5B/1.5B/7B shapes, Llama-3-8B shape;
nothing is downloaded, no tokenizer is needed: the data is random token ids). Both sides share the frozen base
weights (one copy in memory) and add their own LoRA r 8 / alpha 16 / dropout 0 on every linear layer but the
head, float32 adapters under bf16 autocast, AdamW (fused, Trainer's default on CUDA), gradient clipping at 1.0.
The data is packed rows of --row-tokens tokens, two documents each, the first quarter of each document a
prompt (not trained), the same rows for both sides.

  sftkit     the training loop's own step (window.accumulate + settle + backend.step, speed levers, varlen
             attention, the batch collated ahead in a thread), with the lever set of each --variants entry
  reference  what Trainer + peft run per step: peft's LoRA, model(input_ids, position_ids, labels, use_cache=False)
             .loss under autocast (transformers builds the packed rows' block mask; with its default cache it would
             attend across documents), backward, clip, fused AdamW, with no
             read from the device inside the step (Trainer reads only when it logs): a lower bound on Trainer's time

Per model and tokens per step the sides alternate (A B, then B A), each timed over --steps steps after --warmup
(the first warmup pays compilation). Reported: ms/step, tokens/s and trainable tokens/s, MFU (6N convention of
bench/train_throughput.py, on real tokens), peak GPU memory of the timed steps, the first step's loss on both
sides (equal weights then: a check that both compute the same thing), and per side the fixed per-step overhead
(ms/step extrapolated to zero tokens by a least-squares line over the token counts).

    python bench/gpu.py                          # one H100: at most about 6 minutes (--budget-s)
    python bench/gpu.py --variants eager,fused,compiled --models 1.5b     # which levers pay
    python bench/gpu.py --quick                  # tiny model on CPU, seconds (the tests run it)
"""
from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # the benchmarks and the sftkit of this checkout (nothing installed needed)
from common import machine_state, write_json  # noqa: E402
from train_throughput import FLOPS_FORMULA, MODEL_CONFIGS, QWEN2_VOCAB, shape_of  # noqa: E402

IGNORE_INDEX = -100
PAD_ID = 0
MODELS = {
    "0.5b": ("qwen2", dict(MODEL_CONFIGS["0.5b"], vocab_size=QWEN2_VOCAB, tie_word_embeddings=True)),
    "1.5b": ("qwen2", dict(MODEL_CONFIGS["1.5b"], vocab_size=QWEN2_VOCAB, tie_word_embeddings=True)),
    "7b": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)),
    "8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0)),
    "tiny": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False)),
}
# Each variant is a lever set of sftkit.speed (the training loop's own options).
VARIANTS = {
    "eager": dict(),
    "fused": dict(fused_lora="compute", fused_loss=True),
    "fused-fp32": dict(fused_lora="fp32", fused_loss=True),
    "compiled": dict(fused_lora="compute", fused_loss=True, compile=True),
    "compiled-fp32": dict(fused_lora="fp32", fused_loss=True, compile=True),
}
DEFAULT_TOKENS = {"0.5b": "2048,8192,16384", "1.5b": "2048,8192,16384", "7b": "2048,8192", "8b": "2048,8192",
                  "7b-qlora": "2048,8192", "tiny": "128,256"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None, help="comma-separated of 0.5b, 1.5b, 7b, 8b, 7b-qlora, tiny "
                                                      "(default: 1.5b,7b,0.5b,7b-qlora; tiny with --quick)")
    parser.add_argument("--tokens", default=None, help="tokens per step, comma-separated, multiples of --row-tokens "
                                                      "(default per model: 2048,8192,16384; 2048,8192 for 7B/8B)")
    parser.add_argument("--row-tokens", type=int, default=None, help="packed row width (default 1024; 64 with --quick)")
    parser.add_argument("--variants", default=None, help=f"sftkit lever sets, comma-separated of {', '.join(VARIANTS)} "
                                                        "(default: compiled on CUDA, eager,fused with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default 4; 2 with --quick)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first ones compile)")
    parser.add_argument("--budget-s", type=float, default=270.0, help="start no new model after this many seconds, and no "
                                                                      "new measurement 60 s later (the run then prints its table)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak dense TFLOP/s for MFU (default on CUDA: 989, "
                                                                        "H100/H200 SXM bf16)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--quick", action="store_true", help="tiny random model on CPU: a smoke run of seconds")
    parser.add_argument("--out", default="bench/results/gpu.json")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in (args.models or ("tiny" if args.quick else "1.5b,7b,0.5b,7b-qlora")).split(",") if m.strip()]
    unknown = [m for m in args.models if m.removesuffix("-qlora") not in MODELS]
    if unknown:
        parser.error(f"unknown model {', '.join(unknown)}: choose from {', '.join(MODELS)} (and 7b-qlora)")
    args.row_tokens = args.row_tokens or (64 if args.quick else 1024)
    args.steps = args.steps or (2 if args.quick else 4)
    args.warmup = 1 if args.quick else args.warmup
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    variants = [v.strip() for v in (args.variants or ("eager,fused" if args.quick or not cuda else "compiled")).split(",")]
    if any(v not in VARIANTS for v in variants):
        raise SystemExit(f"--variants takes {', '.join(VARIANTS)}, got {args.variants}")
    peak_tflops = args.peak_tflops or (989.0 if cuda else None)
    started = time.perf_counter()
    results, skipped = [], {}
    print(f"[gpu bench] {device} ({torch.cuda.get_device_name(device) if cuda else 'no GPU'}), torch {torch.__version__}, "
          f"variants {variants}", flush=True)
    for name in args.models:
        if time.perf_counter() - started > args.budget_s:
            skipped[name] = f"time budget of {args.budget_s:.0f} s spent"
            continue
        try:
            results.append(bench_model(name, args, device, variants, peak_tflops, deadline=started + args.budget_s + 60))
        except Unavailable as why:
            skipped[name] = str(why)
        except Exception as error:  # e.g. the base does not fit: the next model still runs
            skipped[name] = failure(name, error)
            release(device)
        print(f"[gpu bench] {name} done at {time.perf_counter() - started:.0f} s", flush=True)
    for name, why in skipped.items():
        print(f"[gpu bench] {name} skipped: {why}", flush=True)
    result = {"benchmark": "gpu", "machine": machine_state(), "device": str(device),
              "settings": {"models": args.models, "variants": {v: VARIANTS[v] for v in variants}, "row_tokens": args.row_tokens,
                           "steps": args.steps, "warmup": args.warmup, "seed": args.seed, "peak_tflops": peak_tflops,
                           "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targets": "all-linear"},
                           "dtype": "bf16 base, fp32 adapters, bf16 autocast" if cuda else "fp32"},
              "flops_formula": FLOPS_FORMULA, "models": results, "skipped": skipped,
              "seconds": round(time.perf_counter() - started, 1)}
    print_table(result)
    write_json(args.out, result)
    return result


class Unavailable(Exception):
    """A model the device cannot run here (QLoRA without bitsandbytes' CUDA kernels)."""


def bench_model(name: str, args, device, variants: list[str], peak_tflops: float | None, deadline: float) -> dict:
    """Both sides on one model: every tokens-per-step count (none started after `deadline`), sides alternating."""
    qlora = name.endswith("-qlora")
    arch, sizes = MODELS[name.removesuffix("-qlora")]
    tokens = [int(t) for t in (args.tokens or DEFAULT_TOKENS[name]).split(",")]
    base, shape = build_base(arch, sizes, device, qlora)
    sides, failed = {}, {}
    for side_name in [f"sftkit:{variant}" for variant in variants] + ["reference"]:
        try:
            sides[side_name] = ReferenceSide(base, device, qlora) if side_name == "reference" else \
                SftkitSide(base, device, VARIANTS[side_name.split(":")[1]], qlora)
        except Exception as error:  # one side that cannot run must not cost the others' figures
            failed[side_name] = failure(side_name, error)
    rows = {count: step_rows(count, args.row_tokens, sizes["vocab_size"], args.seed + count, args.steps + args.warmup)
            for count in tokens}
    measurements = [{"side": side_name, "tokens_per_step": count, "failed": why} for side_name, why in failed.items()
                    for count in tokens]
    for order, count in enumerate(tokens):
        if time.perf_counter() > deadline:
            print(f"[gpu bench] {name}: {count} tokens/step and after skipped (time budget)", flush=True)
            break
        names = list(sides) if order % 2 == 0 else list(sides)[::-1]
        for side_name in names:
            measured = measure(sides[side_name], rows[count], args, device)
            measured.update(side=side_name, tokens_per_step=count, **throughput(measured, rows[count], shape, peak_tflops))
            print(describe(name, measured), flush=True)
            measurements.append(measured)
    for side in sides.values():
        side.close()
    del sides, base
    release(device)
    return {"model": name, "shape": {**shape, **sizes}, "measurements": measurements, "summary": summarise(measurements)}


def build_base(arch: str, sizes: dict, device, qlora: bool):
    """The frozen base with random weights (bf16 on CUDA, float32 on CPU); 4-bit linears for QLoRA."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if qlora and (device.type != "cuda" or importlib.util.find_spec("bitsandbytes") is None):
        raise Unavailable("QLoRA needs bitsandbytes with its CUDA kernels")
    config = AutoConfig.for_model(arch, max_position_embeddings=32768, rms_norm_eps=1e-6, pad_token_id=PAD_ID,
                                  bos_token_id=1, eos_token_id=2, **sizes)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    model.requires_grad_(False)
    if qlora:
        quantize_linears(model)
    return model, shape_of(config.to_dict())


def quantize_linears(model) -> None:
    """Every linear but the head as bitsandbytes 4-bit NF4 (double quantization, bf16 compute), as QLoRA loads it."""
    import bitsandbytes as bnb
    import torch

    head = model.get_output_embeddings()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]
    for name in names:
        parent, _, child = name.rpartition(".")
        linear = model.get_submodule(name)
        quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                      compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
        quantized.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True).to(linear.weight.device)
        setattr(model.get_submodule(parent), child, quantized)
    model.is_loaded_in_4bit = True  # what peft reads to pick its 4-bit LoRA layer


def shared_copy(model):
    """A copy of the module tree that shares every parameter and buffer (the frozen base is held once)."""
    memo = {id(tensor): tensor for tensor in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def step_rows(tokens: int, width: int, vocab: int, seed: int, steps: int) -> list[list[dict]]:
    """`steps` lists of packed rows, tokens / width rows each, two documents per row (their lengths drawn around
    half the row), the first quarter of each document a prompt whose labels are ignored."""
    from sftkit.data.pipeline import pack

    rng = random.Random(seed)
    per_step = max(1, tokens // width)
    made = []
    for _ in range(steps):
        documents = []
        for _ in range(per_step):
            first = rng.randint(width * 3 // 8, width * 5 // 8)
            for length in (first, width - first - rng.randint(0, width // 32)):
                ids = [rng.randrange(3, vocab) for _ in range(length)]
                prompt = length // 4
                documents.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
        made.append(pack(documents, width))
    return made


class SftkitSide:
    """sftkit's step exactly as train() runs it on this device, with one lever set."""

    def __init__(self, base, device, levers: dict, qlora: bool):
        import torch

        from sftkit import distributed, speed, window
        from sftkit.attention import use_varlen_attention
        from sftkit.backend import build_backend
        from sftkit.config import TrainConfig
        from sftkit.data.pipeline import collate_packed
        from sftkit.lora import LoRAConfig, inject_lora, lora_state_dict
        from sftkit.loss import SFT_LOSS

        self.window, self.world, self.device = window, distributed.World(), device
        self.model = shared_copy(base)
        torch.manual_seed(1)
        inject_lora(self.model, LoRAConfig(r=8, alpha=16, dropout=0.0, target_modules="all-linear"))
        for parameter in lora_state_dict(self.model).values():
            parameter.data = parameter.data.float()
        use_varlen_attention(self.model)
        cuda = device.type == "cuda"
        self.levers = speed.Levers(**{**levers, "fused_lora": None if qlora else levers.get("fused_lora")},
                                   asynchronous=cuda, width_multiple=speed.WIDTH_MULTIPLE if levers.get("compile") else None)
        speed.apply_levers(self.model, self.levers)
        config = TrainConfig(learning_rate=2e-4, max_grad_norm=1.0, lr_scheduler_type="constant", warmup_ratio=0.0)
        self.backend = build_backend(config, self.model, world=self.world, devices=[str(device)],
                                     compute_dtype=torch.bfloat16 if cuda else torch.float32, total_steps=10**6,
                                     loss_fn=speed.training_loss(SFT_LOSS, self.levers), fused_optimizer=self.levers.asynchronous)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
        self.collate = speed.training_collate(collate_packed, self.levers, self.model)
        self.source = None

    def start(self, steps: list[list[dict]]) -> None:
        remaining = iter(steps)

        def produce():
            rows = next(remaining)
            return rows, self.collate(rows, PAD_ID)

        self.source = self.window.Prefetcher(produce) if self.levers.asynchronous else self.window.Inline(produce)

    def step(self) -> float:
        rows, batch = self.source()
        trainable = sum(sum(label != IGNORE_INDEX for label in row["labels"][1:]) for row in rows)
        self.model.train()
        loss, _ = self.window.accumulate(self.backend, [(rows, 1.0)], [batch], self.device, self.autocast, trainable, self.world,
                                      non_blocking=self.levers.asynchronous)
        mean, _, _ = self.window.settle(loss, self.backend.clip_gradients(), {}, trainable, self.world)
        self.backend.step()
        return mean

    def stop(self) -> None:
        self.source.close()

    def reset(self) -> None:
        self.backend.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        import torch._dynamo

        torch._dynamo.reset()


class ReferenceSide:
    """transformers + peft: the step Trainer runs (see the module docstring)."""

    def __init__(self, base, device, qlora: bool):
        import torch
        from peft import LoraConfig, get_peft_model

        from sftkit.data.pipeline import collate_packed

        torch.manual_seed(1)
        self.model = get_peft_model(shared_copy(base), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                                                  task_type="CAUSAL_LM"))
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=2e-4, fused=device.type == "cuda" or None)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        self.device, self.collate, self.pin = device, collate_packed, device.type == "cuda"
        self.first_loss, self.steps = None, None

    def start(self, steps: list[list[dict]]) -> None:
        self.steps = iter(steps)

    def step(self):
        import torch

        batch = self.collate(next(self.steps), PAD_ID)
        inputs = {key: batch[key].pin_memory() if self.pin else batch[key] for key in ("input_ids", "position_ids", "labels")}
        inputs = {key: value.to(self.device, non_blocking=True) for key, value in inputs.items()}
        self.model.train()
        with self.autocast:
            # use_cache=False: with a cache transformers ignores the packed positions and attends across documents.
            loss = self.model(**inputs, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.parameters, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def stop(self) -> None:
        pass

    def reset(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        pass


def measure(side, steps: list[list[dict]], args, device) -> dict:
    """Warm-up steps, then --steps timed ones ended by one device synchronisation; out of memory is a result."""
    import torch

    cuda = device.type == "cuda"
    side.start(steps)
    try:
        first = float(side.step())  # the first step's loss: both sides still have the base model's outputs
        for _ in range(args.warmup - 1):
            side.step()
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        for _ in range(args.steps):
            last = side.step()
        if cuda:
            torch.cuda.synchronize(device)
        seconds = (time.perf_counter() - started) / args.steps
    except torch.OutOfMemoryError as error:
        side.reset()
        release(device)
        return {"out_of_memory": str(error).splitlines()[0][:160]}
    except Exception as error:  # a lever that breaks on this device: reported, and the other sides still run
        side.reset()
        release(device)
        return {"failed": failure(type(side).__name__, error)}
    finally:
        side.stop()
    return {"ms_per_step": round(1000 * seconds, 2), "first_loss": round(first, 5), "last_loss": round(float(last), 5),
            "peak_gpu_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None}


def failure(what: str, error: Exception) -> str:
    import traceback

    traceback.print_exception(error, file=sys.stderr)
    print(f"[gpu bench] {what} failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200] if str(error).strip() else ''}"


def throughput(measured: dict, steps: list[list[dict]], shape: dict, peak_tflops: float | None) -> dict:
    """Tokens, trainable tokens and model FLOPs of one step (every step holds as many), per second."""
    rows = steps[0]
    documents = [length for row in rows for length in document_lengths(row["position_ids"])]
    real = sum(documents)
    trainable = sum(sum(label != IGNORE_INDEX for label in row["labels"][1:]) for row in rows)
    flops = sum(6 * shape["matmul_params"] * n + 12 * shape["layers"] * shape["attention_width"] * n * n for n in documents)
    if "ms_per_step" not in measured:  # out of memory, or failed
        return {"tokens": real, "trainable_tokens": trainable}
    seconds = measured["ms_per_step"] / 1000
    return {"tokens": real, "trainable_tokens": trainable, "tokens_per_s": round(real / seconds, 1),
            "trainable_tokens_per_s": round(trainable / seconds, 1), "achieved_tflops": round(flops / seconds / 1e12, 2),
            "mfu": round(flops / seconds / (peak_tflops * 1e12), 4) if peak_tflops else None}


def document_lengths(positions: list[int]) -> list[int]:
    starts = [i for i, position in enumerate(positions) if position == 0] + [len(positions)]
    return [b - a for a, b in zip(starts, starts[1:])]


def summarise(measurements: list[dict]) -> dict:
    """Per side: the fixed per-step overhead (least-squares intercept of ms/step over tokens per step) and the best
    throughput; per sftkit side: its ratios to the reference at equal batch and best against best."""
    by_side = {}
    for m in measurements:
        by_side.setdefault(m["side"], []).append(m)
    summary = {}
    for side, rows in by_side.items():
        timed = [(m["tokens"], m["ms_per_step"]) for m in rows if "ms_per_step" in m]
        best = max(timed and [m for m in rows if "ms_per_step" in m], key=lambda m: m["trainable_tokens_per_s"], default=None)
        summary[side] = {"fixed_overhead_ms": round(intercept(timed), 2) if len({t for t, _ in timed}) > 1 else None,
                         "best_trainable_tokens_per_s": best["trainable_tokens_per_s"] if best else None,
                         "best_tokens_per_step": best["tokens_per_step"] if best else None,
                         "best_mfu": best.get("mfu") if best else None}
    reference = {m["tokens_per_step"]: m for m in by_side.get("reference", [])}
    for side, rows in by_side.items():
        if side == "reference":
            continue
        equal = {}
        for m in rows:
            other = reference.get(m["tokens_per_step"], {})
            if "ms_per_step" in m and "ms_per_step" in other:
                equal[m["tokens_per_step"]] = {"speed": round(other["ms_per_step"] / m["ms_per_step"], 3),
                                               "memory": round(m["peak_gpu_gb"] / other["peak_gpu_gb"], 3)
                                               if m.get("peak_gpu_gb") and other.get("peak_gpu_gb") else None}
        ours, theirs = summary[side]["best_trainable_tokens_per_s"], summary.get("reference", {}).get("best_trainable_tokens_per_s")
        summary[side]["ratio_at_equal_batch"] = equal
        summary[side]["ratio_best_vs_reference_best"] = round(ours / theirs, 3) if ours and theirs else None
    return summary


def intercept(points: list[tuple[float, float]]) -> float:
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
    return mean_y - slope * mean_x


def release(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def describe(model: str, m: dict) -> str:
    if "ms_per_step" not in m:
        what = "out of memory" if "out_of_memory" in m else f"failed ({m['failed']})"
        return f"[gpu bench] {model} {m['side']} {m['tokens_per_step']} tokens/step: {what}"
    mfu = f", MFU {m['mfu']:.1%}" if m.get("mfu") is not None else ""
    memory = f", peak {m['peak_gpu_gb']} GB" if m.get("peak_gpu_gb") is not None else ""
    return (f"[gpu bench] {model} {m['side']} {m['tokens_per_step']} tokens/step: {m['ms_per_step']} ms/step, "
            f"{m['tokens_per_s']:.0f} tok/s{mfu}{memory}, first loss {m['first_loss']}")


def print_table(result: dict) -> None:
    """One table: a line per model, side and tokens per step; ratio = the reference's ms/step over this side's."""
    header = ("model", "side", "tokens/step", "ms/step", "tokens/s", "trainable/s", "MFU", "peak GB", "fixed ms", "first loss", "ratio")
    lines = [header]
    for model in result["models"]:
        summary = model["summary"]
        for m in model["measurements"]:
            ratio = summary.get(m["side"], {}).get("ratio_at_equal_batch", {}).get(m["tokens_per_step"], {}).get("speed")
            fixed = summary.get(m["side"], {}).get("fixed_overhead_ms")
            if "ms_per_step" not in m:
                lines.append((model["model"], m["side"], str(m["tokens_per_step"]),
                              "OOM" if "out_of_memory" in m else "failed") + ("",) * 7)
                continue
            lines.append((model["model"], m["side"], str(m["tokens_per_step"]), f"{m['ms_per_step']:.1f}",
                          f"{m['tokens_per_s']:.0f}", f"{m['trainable_tokens_per_s']:.0f}",
                          f"{m['mfu']:.1%}" if m.get("mfu") is not None else "-",
                          f"{m['peak_gpu_gb']:.2f}" if m.get("peak_gpu_gb") is not None else "-",
                          f"{fixed:.1f}" if fixed is not None else "-", f"{m['first_loss']:.4f}",
                          f"{ratio:.2f}x" if ratio else ""))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    print()
    for line in lines:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)))
    for model in result["models"]:
        for side, figures in model["summary"].items():
            if side != "reference":
                print(f"{model['model']} {side}: best trainable tokens/s {figures['ratio_best_vs_reference_best']}x the "
                      f"reference's best; memory at equal batch " +
                      ", ".join(f"{t}: {r['memory']}x" for t, r in figures["ratio_at_equal_batch"].items() if r["memory"]))
    print(f"total {result['seconds']} s", flush=True)


if __name__ == "__main__":
    main()
