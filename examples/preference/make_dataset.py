"""Write train.jsonl and test.jsonl: questions with a computed answer, chosen in the taught format, rejected in another.

The taught format is one JSON object, {"answer": <number>}; the rejected answer holds the same number in one
of the forms a chat model writes by itself (a sentence, a chatty reply, bold markdown, a bare number, JSON
under another key). Both answers are right, so only the format decides the preference, and the prompt never
names the format: it is learnt from the preferences alone. Same flags, same bytes; no question is in both
splits.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

TAUGHT = '{{"answer": {value}}}'
WRONG_FORMATS = [
    "The answer is {value}.",
    "Sure! {question_text} The result is {value}. Let me know if you need anything else.",
    "**{value}**",
    "{value}",
    '{{"result": {value}}}',
    "Answer: {value}",
]
CONVERSIONS = [("km", "m", 1000), ("hours", "minutes", 60), ("minutes", "seconds", 60), ("kg", "g", 1000),
               ("days", "hours", 24), ("m", "cm", 100), ("weeks", "days", 7), ("liters", "ml", 1000)]


def question(rng: random.Random) -> tuple[str, int]:
    """A question and its integer answer: arithmetic in words, or a unit conversion."""
    kind = rng.choice(["plus", "minus", "times", "divided", "convert"])
    a, b = rng.randint(2, 99), rng.randint(2, 20)
    if kind == "plus":
        return rng.choice(["What is {a} plus {b}?", "Add {a} and {b}.", "How much is {a} + {b}?"]).format(a=a, b=b), a + b
    if kind == "minus":
        a = a + b
        return rng.choice(["What is {a} minus {b}?", "Subtract {b} from {a}.", "How much is {a} - {b}?"]).format(a=a, b=b), a - b
    if kind == "times":
        return rng.choice(["What is {a} times {b}?", "Multiply {a} by {b}.", "How much is {a} * {b}?"]).format(a=a, b=b), a * b
    if kind == "divided":
        return rng.choice(["What is {p} divided by {b}?", "Divide {p} by {b}.", "How much is {p} / {b}?"]).format(p=a * b, b=b), a
    big, small, factor = rng.choice(CONVERSIONS)
    amount = rng.randint(2, 12)
    text = rng.choice(["How many {small} are in {n} {big}?", "Convert {n} {big} to {small}.", "{n} {big} is how many {small}?"])
    return text.format(n=amount, big=big, small=small), amount * factor


def pair(rng: random.Random, text: str, value: int) -> dict:
    wrong = rng.choice(WRONG_FORMATS).format(value=value, question_text=text.rstrip("?.") + ":")
    return {"prompt": text, "chosen": TAUGHT.format(value=value), "rejected": wrong}


def build(seed: int, train_size: int, test_size: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    seen, rows = set(), []
    while len(rows) < train_size + test_size:
        text, value = question(rng)
        if text not in seen:
            seen.add(text)
            rows.append(pair(rng, text, value))
    return rows[:train_size], rows[train_size:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent))
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--test", type=int, default=100)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, test = build(args.seed, args.train, args.test)
    for name, rows in (("train.jsonl", train), ("test.jsonl", test)):
        (out / name).write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


if __name__ == "__main__":
    main()
