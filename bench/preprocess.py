"""Preprocessing throughput: rows -> input_ids + labels (format, encode, mask), sftkit against the usual HF way.

sftkit: `build_example` (to_messages -> render -> encode -> mask -> truncate) per row. Reference: what people
write with transformers alone: turn the row into chat messages, `apply_chat_template(tokenize=True)`, then find
each assistant turn by rendering the conversation up to it with the generation prompt and up to its end
(SmolLM2's template has no `{% generation %}` marks, so `return_assistant_tokens_mask` cannot be used) and
unmask those tokens, the end-of-turn token included, the newline after it not. Same rows for both: a seeded
mix of single-turn chat, multi-turn chat and alpaca rows. A sample of rows is checked to give the same
input_ids and the same trainable tokens on both sides.

    python bench/preprocess.py                  # 100k rows on the embedded SmolLM2 tokenizer
    python bench/preprocess.py --rows 200 --quick   # tiny tokenizer, seconds (used by the tests)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_state, mixed_rows, tiny_tokenizer, token_stats, write_json  # noqa: E402

IGNORE_INDEX = -100
REFERENCE = "reference"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000, help="rows to preprocess per run")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each side, alternated A B B A ...")
    parser.add_argument("--templates", default=None,
                        help="sftkit templates to time, comma-separated (default: smollm2,auto; chatml,auto with --quick); "
                             "'auto' renders through the tokenizer's own chat_template, as the reference does")
    parser.add_argument("--verify", type=int, default=2000, help="rows (spread over the data) checked for identical output")
    parser.add_argument("--median-tokens", type=int, default=200, help="median row length in tokens (lognormal, sigma 0.8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a tiny tokenizer trained on the fly instead of SmolLM2's")
    parser.add_argument("--out", default="bench/results/preprocess.json", help="where the JSON goes")
    args = parser.parse_args(argv)
    args.templates = [name.strip() for name in (args.templates or ("chatml,auto" if args.quick else "smollm2,auto")).split(",")
                      if name.strip()]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    from sftkit.data.formats import to_messages
    from sftkit.data.pipeline import build_example, build_examples

    if args.quick:
        tokenizer, tokenizer_name = tiny_tokenizer(), "tiny byte-level BPE (800 tokens, ChatML template)"
    else:
        from sftkit.model import load_tokenizer, resolve_model_dir

        tokenizer, tokenizer_name = load_tokenizer(resolve_model_dir(None)), "SmolLM2-135M-Instruct (embedded)"
    rows = mixed_rows(tokenizer, args.rows, seed=args.seed, median=args.median_tokens)
    glue = whitespace_token_ids(tokenizer)

    def sftkit_side(template: str):
        return lambda row: build_example(row, tokenizer=tokenizer, template=template)

    def sftkit_batched(template: str):
        """The dataset path training takes: build_examples tokenizes 1024 conversations per tokenizer call."""
        return lambda many: build_examples([to_messages(row) for row in many], tokenizer=tokenizer, template=template)[0]

    sides = {f"sftkit:{template}": sftkit_side(template) for template in args.templates}
    sides[REFERENCE] = lambda row: reference_example(row, tokenizer, glue)
    # Timed: every side over all rows; the per-row sides one row at a time, plus sftkit's batched path.
    timed_sides = {name: (lambda many, convert=convert: (convert(row) for row in many)) for name, convert in sides.items()}
    timed_sides.update({f"sftkit:{template}:batched": sftkit_batched(template) for template in args.templates})
    for convert in timed_sides.values():  # warm-up: template compilation, tokenizer caches
        list(convert(rows[:50]))

    machine = machine_state()
    print(f"[bench] {len(rows)} rows ({dict(Counter(schema(row) for row in rows))}), tokenizer {tokenizer_name}", flush=True)
    names, runs = list(timed_sides), []
    for repeat in range(args.repeats):
        for name in (names if repeat % 2 == 0 else names[::-1]):
            run = {"name": name, "repeat": repeat, **timed(timed_sides[name], rows)}
            print(f"[bench] {name}: {run['rows_per_s']:.0f} rows/s, {run['tokens_per_s']:.0f} tokens/s "
                  f"({run['seconds']:.1f} s for {run['rows']} rows)", flush=True)
            runs.append(run)
    summary = {name: {figure: statistics.median(run[figure] for run in runs if run["name"] == name)
                      for figure in ("rows_per_s", "tokens_per_s", "trainable_tokens_per_s", "seconds")} for name in names}
    ratios = {f"{name}/{REFERENCE}": {figure: round(summary[name][figure] / summary[REFERENCE][figure], 3)
                                      for figure in ("rows_per_s", "tokens_per_s")} for name in names if name != REFERENCE}
    verification = verify(rows, sides, args.verify, tokenizer)
    reference_run = next(run for run in runs if run["name"] == REFERENCE)
    result = {
        "benchmark": "preprocess",
        "machine": {**machine, "load_average_after": machine_state()["load_average"]},
        "settings": {"rows": len(rows), "repeats": args.repeats, "seed": args.seed, "tokenizer": tokenizer_name,
                     "sftkit_templates": args.templates, "max_length": None, "train_on": "assistant",
                     "reference": "apply_chat_template(tokenize=True) + assistant spans from rendered prefixes",
                     "quick": args.quick},
        "data": {"schemas": dict(Counter(schema(row) for row in rows)), "tokens": reference_run["tokens"],
                 "trainable_tokens": reference_run["trainable_tokens"], "tokens_per_row": token_stats(reference_run["lengths"]),
                 "length_distribution": f"lognormal, median {args.median_tokens} tokens, sigma 0.8, clipped to [32, 1024]"},
        "runs": [{key: value for key, value in run.items() if key != "lengths"} for run in runs],
        "summary": summary, "ratios": ratios, "verification": verification,
    }
    for pair, figures in ratios.items():
        print(f"[bench] {pair}: rows/s x{figures['rows_per_s']}")
    for name, check in verification["by_side"].items():
        print(f"[bench] check {name} vs {REFERENCE} on {verification['rows_checked']} rows: {check['input_ids_mismatches']} "
              f"input_ids and {check['trainable_mismatches']} trainable-token mismatches")
    print(f"[bench] load average before {machine['load_average']}, after {result['machine']['load_average_after']}")
    write_json(args.out, result)
    return result


def schema(row: dict) -> str:
    if "messages" in row:
        return "chat" if sum(m["role"] == "assistant" for m in row["messages"]) == 1 else "multi-turn"
    return "alpaca"


def timed(convert_many, rows: list[dict]) -> dict:
    """Convert every row; outputs are counted and dropped (keeping 100k of them would measure memory, not work)."""
    tokens = trainable = 0
    lengths = []
    started = time.perf_counter()
    for example in convert_many(rows):
        tokens += len(example["input_ids"])
        trainable += sum(label != IGNORE_INDEX for label in example["labels"])
        lengths.append(len(example["input_ids"]))
    seconds = time.perf_counter() - started
    return {"rows": len(rows), "seconds": round(seconds, 3), "rows_per_s": round(len(rows) / seconds, 1),
            "tokens_per_s": round(tokens / seconds, 1), "trainable_tokens_per_s": round(trainable / seconds, 1),
            "tokens": tokens, "trainable_tokens": trainable, "lengths": lengths}


# ---- the reference: transformers alone ------------------------------------------------------------------------


def reference_messages(row: dict) -> list[dict]:
    """A raw row as chat messages; alpaca joins instruction and input with a newline, as ms-swift (and sftkit) do."""
    if "messages" in row:
        return [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    query = row["instruction"] + ("\n" + row["input"] if (row.get("input") or "").strip() else "")
    system = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    return system + [{"role": "user", "content": query}, {"role": "assistant", "content": row["output"]}]


def reference_example(row: dict, tokenizer, glue: frozenset) -> dict:
    """apply_chat_template, then train on each assistant turn: the tokens between the render of the conversation
    before it (with the generation prompt) and the render through it, less the whitespace after its end-of-turn."""
    chat = reference_messages(row)
    input_ids = _ids(tokenizer.apply_chat_template(chat, tokenize=True))
    labels = [IGNORE_INDEX] * len(input_ids)
    for index, message in enumerate(chat):
        if message["role"] != "assistant":
            continue
        start = len(_ids(tokenizer.apply_chat_template(chat[:index], tokenize=True, add_generation_prompt=True)))
        end = len(_ids(tokenizer.apply_chat_template(chat[:index + 1], tokenize=True)))
        while end > start and input_ids[end - 1] in glue:
            end -= 1
        labels[start:end] = input_ids[start:end]
    return {"input_ids": input_ids, "labels": labels}


def _ids(encoded) -> list[int]:
    """apply_chat_template(tokenize=True) gives a BatchEncoding in transformers 5, a list before."""
    return list(encoded["input_ids"]) if hasattr(encoded, "keys") else list(encoded)


def whitespace_token_ids(tokenizer) -> frozenset:
    special = set(tokenizer.all_special_ids)
    return frozenset(index for token, index in tokenizer.get_vocab().items()
                     if index not in special and not tokenizer.convert_tokens_to_string([token]).strip())


# ---- the check -------------------------------------------------------------------------------------------------


def verify(rows: list[dict], sides: dict, count: int, tokenizer) -> dict:
    """Both sides on `count` rows spread over the data: same input_ids, same trainable positions and labels?"""
    step = max(1, len(rows) // max(count, 1))
    sample = list(range(0, len(rows), step))[:count]
    reference = {index: sides[REFERENCE](rows[index]) for index in sample}
    by_side = {}
    for name, convert in sides.items():
        if name == REFERENCE:
            continue
        ids_bad, labels_bad, shown = 0, 0, []
        for index in sample:
            mine, theirs = convert(rows[index]), reference[index]
            same_ids = mine["input_ids"] == theirs["input_ids"]
            same_labels = mine["labels"] == theirs["labels"]
            ids_bad += not same_ids
            labels_bad += not same_labels
            if (not same_ids or not same_labels) and len(shown) < 5:
                shown.append(_difference(index, rows[index], mine, theirs, tokenizer))
        by_side[name] = {"input_ids_mismatches": ids_bad, "trainable_mismatches": labels_bad, "examples": shown}
    return {"rows_checked": len(sample), "by_side": by_side}


def _difference(index: int, row: dict, mine: dict, theirs: dict, tokenizer) -> dict:
    key = "input_ids" if mine["input_ids"] != theirs["input_ids"] else "labels"
    first = next((i for i, (a, b) in enumerate(zip(mine[key], theirs[key])) if a != b), min(len(mine[key]), len(theirs[key])))
    window = slice(max(0, first - 3), first + 3)
    return {"row": index, "schema": schema(row), "field": key, "position": first,
            "sftkit_len": len(mine["input_ids"]), "reference_len": len(theirs["input_ids"]),
            "sftkit_text": tokenizer.decode(mine["input_ids"][window]),
            "reference_text": tokenizer.decode(theirs["input_ids"][window]),
            "sftkit_labels": mine["labels"][window], "reference_labels": theirs["labels"][window]}


if __name__ == "__main__":
    main()
