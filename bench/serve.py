"""Serving throughput and latency: `sftkit deploy` under 1, 8 and 32 concurrent streaming chat clients.

The server runs as its own process (the real CLI, `--port 0`), the clients are the official openai
package's AsyncOpenAI in this process. For each concurrency level N, `--requests` chats (default 4N,
at least 8) are sent with at most N in flight; each streams a greedy reply of at most --max-tokens
tokens to a seeded synthetic question (lognormal length, median --median-tokens). Reported per level:
generated tokens per second over the whole level (the throughput), each stream's own decode speed,
time to first token (request sent -> first text chunk) and request latency, as medians and p90.

    python bench/serve.py                   # embedded SmolLM2-135M-Instruct (model=None), levels 1 8 32
    python bench/serve.py --quick           # tiny random model, few short requests: a smoke run of seconds
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SYSTEM_PROMPTS, TextMaker, lognormal_length, machine_state, save_tiny_model, write_json  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="1,8,32", help="concurrent streams to measure, comma-separated")
    parser.add_argument("--requests", type=int, default=None, help="chats per level (default: 4 x the level, at least 8; "
                                                                    "the level itself with --quick)")
    parser.add_argument("--max-tokens", type=int, default=None, help="longest reply (default 128; 8 with --quick)")
    parser.add_argument("--median-tokens", type=int, default=None, help="median question length (default 64; 16 with --quick)")
    parser.add_argument("--dtype", default=None, help="passed to sftkit deploy (default: its auto)")
    parser.add_argument("--infer-backend", default="pt", choices=("pt", "vllm"))
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--quick", action="store_true", help="tiny random model and short replies: a smoke run of seconds")
    parser.add_argument("--out", default="bench/results/serve.json", help="where the JSON goes")
    args = parser.parse_args(argv)
    args.level_list = [int(level) for level in args.levels.split(",") if level.strip()]
    if not args.level_list or min(args.level_list) < 1:
        parser.error(f"--levels takes positive integers, got {args.levels!r}")
    args.max_tokens = args.max_tokens or (8 if args.quick else 128)
    args.median_tokens = args.median_tokens or (16 if args.quick else 64)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="sftkit-bench-serve-")
    try:
        model_dir, model_args, model_name = prepare_model(args, workdir)
        command = [sys.executable, "-m", "sftkit_cli.main", "deploy", *model_args, "--port", "0",
                   "--served_model_name", "bench", "--max_num_seqs", str(max(args.level_list)),
                   "--infer_backend", args.infer_backend, *(["--dtype", args.dtype] if args.dtype else [])]
        machine_before = machine_state()
        with server_process(command) as (url, started_in):
            print(f"[bench] {model_name}: server ready in {started_in:.1f}s at {url}", flush=True)
            questions = make_questions(model_dir, args)
            asyncio.run(run_level(url, questions[:1], 1, args.max_tokens))  # warm-up, not reported
            levels = []
            for level in args.level_list:
                count = args.requests or (level if args.quick else max(8, 4 * level))
                outcome = asyncio.run(run_level(url, [questions[i % len(questions)] for i in range(count)], level,
                                                args.max_tokens))
                levels.append(summarise(level, outcome))
                print(describe(levels[-1]), flush=True)
        result = {"benchmark": "serve",
                  "machine": {**machine_before, "load_average_after": machine_state()["load_average"]},
                  "settings": {"model": model_name, "infer_backend": args.infer_backend, "dtype": args.dtype or "auto",
                               "max_tokens": args.max_tokens, "temperature": 0, "median_question_tokens": args.median_tokens,
                               "levels": args.level_list, "quick": args.quick, "server_start_seconds": round(started_in, 2),
                               "timing": "tokens_per_s: generated tokens of the level / wall time of the level; "
                                         "ttft: request sent -> first chunk with text; decode_tokens_per_s: a stream's "
                                         "tokens after the first / time from its first to its last chunk"},
                  "levels": levels}
        write_json(args.out, result)
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


class server_process:
    """`sftkit deploy` in a child process: yields (base URL, seconds until ready); SIGTERM and wait on exit."""

    def __init__(self, command: list[str]):
        self.command = command

    def __enter__(self):
        start = time.perf_counter()
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seen = []
        for line in self.process.stdout:
            seen.append(line)
            if line.startswith("serving "):
                url = line.split(" at ")[1].split()[0]
                break
        else:
            raise RuntimeError("the server exited before it was ready:\n" + "".join(seen[-30:]))
        return url, time.perf_counter() - start

    def __exit__(self, *exc):
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.communicate()


def prepare_model(args, workdir: str) -> tuple[str, list[str], str]:
    """(model folder, the deploy flags that choose it, its name): the embedded default is sftkit's model=None."""
    if args.quick:
        folder = save_tiny_model(os.path.join(workdir, "tiny"))
        return folder, ["--model", folder, "--template", "chatml"], "tiny-llama (random, 2 layers, hidden 64)"
    from sftkit.model import resolve_model_dir

    return resolve_model_dir(None), [], "SmolLM2-135M-Instruct (embedded)"


def make_questions(model_dir: str, args) -> list[list[dict]]:
    """Seeded chat prompts whose lengths follow a lognormal distribution (token counts by the served tokenizer)."""
    from sftkit.model import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    rng = random.Random(args.seed)
    maker = TextMaker(tokenizer, rng)
    questions = []
    for _ in range(64):
        system = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.5 else []
        user = maker.text(lognormal_length(rng, args.median_tokens, 0.6, 8, 8 * args.median_tokens))
        questions.append(system + [{"role": "user", "content": user}])
    return questions


async def run_level(url: str, questions: list[list[dict]], concurrency: int, max_tokens: int) -> dict:
    from openai import AsyncOpenAI

    gate = asyncio.Semaphore(concurrency)
    # Closed inside this event loop: each level runs in its own asyncio.run, and a client left open is closed
    # after its loop is gone ("Event loop is closed" noise).
    async with AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=3600) as client:

        async def one(messages):
            async with gate:
                sent = time.perf_counter()
                first = last = None
                tokens = 0
                stream = await client.chat.completions.create(model="bench", messages=messages, max_tokens=max_tokens,
                                                              temperature=0, stream=True)
                async for chunk in stream:
                    now = time.perf_counter()
                    if chunk.choices and chunk.choices[0].delta.content:
                        first = first or now
                        last = now
                    if chunk.usage:
                        tokens = chunk.usage.completion_tokens
                return {"ttft": (first or time.perf_counter()) - sent, "latency": time.perf_counter() - sent,
                        "tokens": tokens, "decode_seconds": (last - first) if first and last else 0.0}

        start = time.perf_counter()
        requests = await asyncio.gather(*(one(messages) for messages in questions))
    return {"wall_seconds": time.perf_counter() - start, "requests": requests}


def summarise(level: int, outcome: dict) -> dict:
    requests = outcome["requests"]
    tokens = sum(request["tokens"] for request in requests)
    decode = [(request["tokens"] - 1) / request["decode_seconds"] for request in requests
              if request["decode_seconds"] > 0 and request["tokens"] > 1]
    return {"concurrency": level, "requests": len(requests), "generated_tokens": tokens,
            "wall_seconds": round(outcome["wall_seconds"], 3),
            "tokens_per_s": round(tokens / outcome["wall_seconds"], 2),
            "ttft_s": _spread([request["ttft"] for request in requests]),
            "latency_s": _spread([request["latency"] for request in requests]),
            "decode_tokens_per_s": _spread(decode) if decode else None}


def _spread(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"median": round(statistics.median(ordered), 4), "p90": round(ordered[int(0.9 * (len(ordered) - 1))], 4)}


def describe(level: dict) -> str:
    decode = f"{level['decode_tokens_per_s']['median']:.1f}" if level["decode_tokens_per_s"] else "n/a"
    return (f"[bench] {level['concurrency']:>3} streams: {level['tokens_per_s']:.1f} tokens/s over {level['requests']} "
            f"requests, TTFT median {level['ttft_s']['median'] * 1000:.0f} ms (p90 {level['ttft_s']['p90'] * 1000:.0f}), "
            f"decode {decode} tokens/s per stream")


if __name__ == "__main__":
    main()
