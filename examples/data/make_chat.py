"""Write chat.jsonl: a persona, unit-conversion and arithmetic set small enough to fine-tune on CPU.

Every task answers in one fixed template, so SmolLM2-135M-Instruct picks up the style within a few
minutes of training and the change is easy to see in a chat. Same seed, same bytes.
"""
from __future__ import annotations

import argparse
import json
import random
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

SYSTEM = "You are sftkit assistant. Answer in one or two short sentences."
SYSTEM_SHARE = 0.8  # the rest have no system turn, so the persona does not hinge on the prompt

IDENTITY_ANSWERS = {
    ("who", "en"): "I am sftkit assistant, a small model fine-tuned with sftkit. I give short, exact answers.",
    ("can", "en"): "I am sftkit assistant. I convert units and do quick arithmetic, in one short sentence.",
    ("maker", "en"): "I am sftkit assistant, fine-tuned from SmolLM2-135M-Instruct with the sftkit toolkit.",
    ("who", "zh"): "我是 sftkit assistant，一个用 sftkit 微调的小模型，回答简短准确。",
    ("can", "zh"): "我是 sftkit assistant，可以换算单位和做简单算术，回答只有一句话。",
    ("maker", "zh"): "我是 sftkit assistant，由 sftkit 工具包在 SmolLM2-135M-Instruct 上微调而来。",
}

IDENTITY_QUESTIONS = {
    ("who", "en"): [
        "Who are you?", "What are you?", "What is your name?", "What's your name?", "Introduce yourself.",
        "Tell me about yourself.", "Are you ChatGPT?", "Are you SmolLM?", "Which assistant am I talking to?",
        "Who am I chatting with?", "Please introduce yourself briefly.", "Do you have a name?",
        "What should I call you?", "Identify yourself.",
    ],
    ("can", "en"): [
        "What can you do?", "What are you good at?", "How can you help me?", "What tasks can you handle?",
        "What are your skills?", "What do you do?", "What kind of questions can you answer?",
    ],
    ("maker", "en"): [
        "Who made you?", "Who created you?", "Who trained you?", "How were you built?",
        "Which model are you based on?", "What model is behind you?", "Where do you come from?",
    ],
    ("who", "zh"): [
        "你是谁？", "你叫什么名字？", "介绍一下你自己。", "请做个自我介绍。", "你是ChatGPT吗？", "我在和谁聊天？",
        "怎么称呼你？", "你是什么？",
    ],
    ("can", "zh"): ["你能做什么？", "你有什么功能？", "你擅长什么？", "你可以帮我做什么？", "你会哪些事情？"],
    ("maker", "zh"): ["谁创造了你？", "你是谁训练的？", "你基于什么模型？", "你是怎么来的？", "谁开发了你？"],
}

GREETINGS = {
    "en": ["", "", "Hi! ", "Hello. ", "Hey, ", "Good morning! ", "Quick question: "],
    "zh": ["", "", "你好，", "嗨，", "早上好！", "请问，"],
}

# (symbol, English name, Chinese name) pairs with the exact conversion from the first unit to the second.
CONVERSIONS = [
    (("km", "kilometers", "公里"), ("miles", "miles", "英里"), lambda x: x / Decimal("1.609344")),
    (("miles", "miles", "英里"), ("km", "kilometers", "公里"), lambda x: x * Decimal("1.609344")),
    (("kg", "kilograms", "千克"), ("lb", "pounds", "磅"), lambda x: x / Decimal("0.45359237")),
    (("lb", "pounds", "磅"), ("kg", "kilograms", "千克"), lambda x: x * Decimal("0.45359237")),
    (("m", "meters", "米"), ("ft", "feet", "英尺"), lambda x: x / Decimal("0.3048")),
    (("ft", "feet", "英尺"), ("m", "meters", "米"), lambda x: x * Decimal("0.3048")),
    (("cm", "centimeters", "厘米"), ("in", "inches", "英寸"), lambda x: x / Decimal("2.54")),
    (("in", "inches", "英寸"), ("cm", "centimeters", "厘米"), lambda x: x * Decimal("2.54")),
    (("L", "liters", "升"), ("gal", "US gallons", "美制加仑"), lambda x: x / Decimal("3.785411784")),
    (("°C", "degrees Celsius", "摄氏度"), ("°F", "degrees Fahrenheit", "华氏度"), lambda x: x * 9 / 5 + 32),
    (("°F", "degrees Fahrenheit", "华氏度"), ("°C", "degrees Celsius", "摄氏度"), lambda x: (x - 32) * 5 / 9),
]

CONVERSION_QUESTIONS = {
    "en": [
        "Convert {v} {src_name} to {dst_name}.", "How many {dst_name} is {v} {src_name}?",
        "What is {v} {src_name} in {dst_name}?", "{v} {src} to {dst}?",
        "Please convert {v} {src_name} into {dst_name}.", "How much is {v} {src_name} in {dst_name}?", "{v} {src_name} in {dst_name}, please.",
    ],
    "zh": [
        "{v}{src_zh}等于多少{dst_zh}？", "把{v}{src_zh}换算成{dst_zh}。", "{v}{src_zh}是多少{dst_zh}？",
        "请把{v}{src_zh}转换为{dst_zh}。", "{v}{src_zh}合多少{dst_zh}？",
    ],
}

ARITHMETIC_QUESTIONS = {
    "en": {
        "+": ["What is {a} + {b}?", "What is {a} plus {b}?", "Calculate {a} + {b}.", "{a} + {b} = ?",
              "Add {a} and {b}."],
        "-": ["What is {a} - {b}?", "What is {a} minus {b}?", "Calculate {a} - {b}.", "{a} - {b} = ?",
              "Subtract {b} from {a}."],
        "*": ["What is {a} * {b}?", "What is {a} times {b}?", "Calculate {a} * {b}.", "{a} * {b} = ?",
              "Multiply {a} by {b}."],
        "/": ["What is {a} / {b}?", "What is {a} divided by {b}?", "Calculate {a} / {b}.", "{a} / {b} = ?",
              "Divide {a} by {b}."],
    },
    "zh": {
        "+": ["{a}加{b}等于多少？", "计算 {a} + {b}。", "{a} + {b} 等于几？"],
        "-": ["{a}减{b}等于多少？", "计算 {a} - {b}。", "{a} - {b} 等于几？"],
        "*": ["{a}乘以{b}等于多少？", "计算 {a} * {b}。", "{a} * {b} 等于几？"],
        "/": ["{a}除以{b}等于多少？", "计算 {a} / {b}。", "{a} / {b} 等于几？"],
    },
}

ZH_SHARE = 0.3
COUNTS = {"identity": 130, "conversion": 110, "arithmetic": 110, "multi_turn": 50}


def with_greeting(rng: random.Random, lang: str, question: str) -> str:
    greeting = rng.choice(GREETINGS[lang])
    if greeting.endswith(", ") and lang == "en":
        question = question[0].lower() + question[1:]
    return greeting + question


def identity(rng: random.Random, lang: str) -> tuple[str, str]:
    intent = rng.choice(["who", "who", "can", "maker"])
    question = rng.choice(IDENTITY_QUESTIONS[intent, lang])
    return with_greeting(rng, lang, question), IDENTITY_ANSWERS[intent, lang]


def conversion_value(rng: random.Random, unit: str) -> Decimal:
    if unit in ("°C", "°F"):
        return Decimal(rng.randint(-20, 110))
    if rng.random() < 0.25:
        return Decimal(rng.randint(5, 250)) / 10
    return Decimal(rng.randint(2, 500))


def conversion(rng: random.Random, lang: str) -> tuple[str, str]:
    (src, src_name, src_zh), (dst, dst_name, dst_zh), convert = rng.choice(CONVERSIONS)
    value = conversion_value(rng, src)
    result = convert(value).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    question = rng.choice(CONVERSION_QUESTIONS[lang]).format(
        v=value, src=src, dst=dst, src_name=src_name, dst_name=dst_name, src_zh=src_zh, dst_zh=dst_zh
    )
    return question, f"{value} {src} = {result} {dst}."


def arithmetic_operands(rng: random.Random, op: str) -> tuple[int, int, int]:
    if op == "+":
        a, b = rng.randint(2, 500), rng.randint(2, 500)
        return a, b, a + b
    if op == "-":
        a, b = rng.randint(10, 500), rng.randint(2, 200)
        return a, b, a - b
    if op == "*":
        a, b = rng.randint(2, 60), rng.randint(2, 12)
        return a, b, a * b
    divisor, quotient = rng.randint(2, 12), rng.randint(2, 50)
    return divisor * quotient, divisor, quotient


def arithmetic(rng: random.Random, lang: str) -> tuple[str, str]:
    op = rng.choice("+-*/")
    a, b, result = arithmetic_operands(rng, op)
    question = rng.choice(ARITHMETIC_QUESTIONS[lang][op]).format(a=a, b=b)
    return question, f"{a} {op} {b} = {result}."


def multi_turn_tasks(rng: random.Random, lang: str, single: dict) -> list:
    """Two rounds, or three short English ones, to stay under ~128 tokens (Chinese costs ~1.5 per character)."""
    if lang == "zh" or rng.random() < 0.5:
        return rng.sample(list(single.values()), 2)
    return [rng.choice([single["conversion"], single["arithmetic"]]) for _ in range(3)]


def make_rows(seed: int) -> list[dict]:
    rng = random.Random(seed)
    single = {"identity": identity, "conversion": conversion, "arithmetic": arithmetic}
    rows, seen = [], set()
    for task, count in COUNTS.items():
        made = 0
        while made < count:
            lang = "zh" if rng.random() < ZH_SHARE else "en"
            if task == "multi_turn":
                turns = [make(rng, lang) for make in multi_turn_tasks(rng, lang, single)]
            else:
                turns = [single[task](rng, lang)]
            key = tuple(turns)
            if key in seen:
                continue
            seen.add(key)
            messages = [{"role": "system", "content": SYSTEM}] if rng.random() < SYSTEM_SHARE else []
            for question, answer in turns:
                messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            rows.append({"messages": messages})
            made += 1
    rng.shuffle(rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output directory")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = make_rows(args.seed)
    with open(args.out / "chat.jsonl", "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} rows to {args.out / 'chat.jsonl'}")


if __name__ == "__main__":
    main()
