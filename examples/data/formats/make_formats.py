"""Write one small sample per raw schema, plus deliberately broken rows, for previews and parser tests.

The rows are written out literally so each file shows its schema at a glance; MSAgent and tool-call
strings are built by helpers because their exact bytes (markers, newlines, JSON spacing) are the contract.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

WEATHER_URL = "http://tools.example.com/weather"
CURRENCY_URL = "http://tools.example.com/currency"


def msagent_call(api_name: str, url: str, parameters: dict, result: dict) -> str:
    """One tool call and its result, byte for byte as MSAgent-Bench writes them inside an assistant value."""
    call = json.dumps({"api_name": api_name, "url": url, "parameters": parameters}, ensure_ascii=False)
    output = json.dumps(result, ensure_ascii=False)
    return (
        f"<|startofthink|>```JSON\n{call}\n```<|endofthink|>\n\n"
        f"<|startofexec|>```JSON\n{output}\n```<|endofexec|>\n"
    )


def msagent_system(intro: str, tools: list[dict]) -> str:
    listing = "\n".join(f"{i}. {json.dumps(tool, ensure_ascii=False)}" for i, tool in enumerate(tools, 1))
    return f"{intro}\n\n{listing}"


MSAGENT_TOOLS = [
    {"name": "weather", "description": "Current weather for a city.", "url": WEATHER_URL,
     "paras": [{"name": "city", "type": "string", "required": True},
               {"name": "unit", "type": "string", "enum": ["C", "F"], "required": False}]},
    {"name": "currency_convert", "description": "Convert an amount between currencies.", "url": CURRENCY_URL,
     "paras": [{"name": "amount", "type": "number", "required": True},
               {"name": "from", "type": "string", "required": True},
               {"name": "to", "type": "string", "required": True}]},
]
MSAGENT_SYSTEM_EN = msagent_system(
    "You are a helpful agent. You may call the tools below. To call one, write the request as JSON with "
    "api_name and parameters between <|startofthink|> and <|endofthink|>; the result comes back between "
    "<|startofexec|> and <|endofexec|>. Then answer the user.",
    MSAGENT_TOOLS,
)
MSAGENT_SYSTEM_ZH = msagent_system(
    "你是一个乐于助人的智能体，可以调用下列工具。调用时在<|startofthink|>和<|endofthink|>之间用JSON写出"
    "api_name和parameters，结果会出现在<|startofexec|>和<|endofexec|>之间，然后回答用户。",
    MSAGENT_TOOLS,
)


def msagent_rows() -> list[dict]:
    paris = msagent_call("weather", WEATHER_URL, {"city": "Paris", "unit": "C"},
                         {"city": "Paris", "temperature": 18, "unit": "C", "condition": "cloudy"})
    tokyo = msagent_call("weather", WEATHER_URL, {"city": "Tokyo", "unit": "C"},
                         {"city": "Tokyo", "temperature": 24, "unit": "C", "condition": "sunny"})
    usd_eur = msagent_call("currency_convert", CURRENCY_URL, {"amount": 120, "from": "USD", "to": "EUR"},
                           {"amount": 120, "from": "USD", "to": "EUR", "result": 110.4})
    beijing = msagent_call("weather", WEATHER_URL, {"city": "北京", "unit": "C"},
                           {"city": "北京", "temperature": 9, "unit": "C", "condition": "windy"})
    cny_jpy = msagent_call("currency_convert", CURRENCY_URL, {"amount": 500, "from": "CNY", "to": "JPY"},
                           {"amount": 500, "from": "CNY", "to": "JPY", "result": 10350.0})

    def conversation(system: str, *turns: str) -> dict:
        roles = ["user", "assistant"] * len(turns)
        return {"conversations": [{"from": "system", "value": system}]
                + [{"from": role, "value": value} for role, value in zip(roles, turns)]}

    return [
        conversation(MSAGENT_SYSTEM_EN, "What's the weather in Paris?",
                     paris + "It is 18°C and cloudy in Paris."),
        conversation(MSAGENT_SYSTEM_EN, "Compare the weather in Paris and Tokyo.",
                     paris + tokyo + "Paris is 18°C and cloudy; Tokyo is 24°C and sunny."),
        conversation(MSAGENT_SYSTEM_EN,
                     "How warm is it in Tokyo?", tokyo + "It is 24°C and sunny in Tokyo.",
                     "Thanks. How much is 120 USD in EUR?", usd_eur + "120 USD = 110.4 EUR.",
                     "Great, that's all.", "You're welcome!"),
        conversation(MSAGENT_SYSTEM_ZH, "北京今天天气怎么样？", beijing + "北京现在9°C，有风。"),
        conversation(MSAGENT_SYSTEM_ZH, "500 CNY 能换多少 JPY？", cny_jpy + "500 CNY = 10350.0 JPY。"),
        conversation(MSAGENT_SYSTEM_EN, "Hi, what can you do?",
                     "I can look up the weather and convert currencies. What do you need?"),
    ]


TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather for a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name"},
            "unit": {"type": "string", "enum": ["C", "F"]}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "convert_currency", "description": "Convert an amount between currencies.",
        "parameters": {"type": "object", "properties": {
            "amount": {"type": "number"}, "from": {"type": "string"}, "to": {"type": "string"}},
            "required": ["amount", "from", "to"]}}},
]


def tool_call_message(name: str, arguments: dict) -> dict:
    """The role-based style: content is a JSON string holding name and an arguments object."""
    return {"role": "tool_call", "content": json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)}


def openai_call(name: str, arguments: dict) -> dict:
    """The OpenAI style: arguments is itself a JSON-encoded string."""
    return {"type": "function", "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def messages_tools_rows() -> list[dict]:
    oslo = {"city": "Oslo", "temperature": 3, "unit": "C", "condition": "snow"}
    lima = {"city": "Lima", "temperature": 22, "unit": "C", "condition": "sunny"}
    return [
        {"tools": TOOLS, "messages": [
            {"role": "system", "content": "You are a helpful assistant with tools."},
            {"role": "user", "content": "Is it snowing in Oslo?"},
            tool_call_message("get_weather", {"city": "Oslo", "unit": "C"}),
            {"role": "tool_response", "content": json.dumps(oslo)},
            {"role": "assistant", "content": "Yes, it is snowing in Oslo at 3°C."}]},
        {"tools": TOOLS, "messages": [
            {"role": "user", "content": "Convert 80 GBP to USD."},
            tool_call_message("convert_currency", {"amount": 80, "from": "GBP", "to": "USD"}),
            {"role": "tool_response", "content": json.dumps({"result": 101.6, "to": "USD"})},
            {"role": "assistant", "content": "80 GBP = 101.6 USD."},
            {"role": "user", "content": "And the weather in Lima?"},
            tool_call_message("get_weather", {"city": "Lima"}),
            {"role": "tool_response", "content": json.dumps(lima)},
            {"role": "assistant", "content": "It is 22°C and sunny in Lima."}]},
        {"tools": TOOLS, "messages": [
            {"role": "user", "content": "What's the weather in Lima?"},
            {"role": "assistant", "content": None, "tool_calls": [openai_call("get_weather", {"city": "Lima"})]},
            {"role": "tool", "content": json.dumps(lima)},
            {"role": "assistant", "content": "It is 22°C and sunny in Lima."}]},
        {"tools": TOOLS, "messages": [
            {"role": "user", "content": "Weather in Oslo and Lima, please."},
            {"role": "assistant", "content": "", "tool_calls": [
                openai_call("get_weather", {"city": "Oslo"}), openai_call("get_weather", {"city": "Lima"})]},
            {"role": "tool", "content": json.dumps(oslo)},
            {"role": "tool", "content": json.dumps(lima)},
            {"role": "assistant", "content": "Oslo: 3°C with snow. Lima: 22°C and sunny."}]},
        {"tools": TOOLS, "messages": [
            {"role": "system", "content": "你是一个会使用工具的助手。"},
            {"role": "user", "content": "把 300 CNY 换成 EUR。"},
            {"role": "assistant", "content": None,
             "tool_calls": [openai_call("convert_currency", {"amount": 300, "from": "CNY", "to": "EUR"})]},
            {"role": "tool", "content": json.dumps({"result": 38.4, "to": "EUR"})},
            {"role": "assistant", "content": "300 CNY 约合 38.4 EUR。"}]},
        {"tools": TOOLS, "messages": [
            {"role": "user", "content": "Thanks for the help!"},
            {"role": "assistant", "content": "You're welcome!"}]},
    ]


ALPACA = [
    {"instruction": "Give three tips for staying healthy.", "input": "",
     "output": "Eat vegetables, sleep eight hours and walk every day."},
    {"instruction": "Translate the sentence into French.", "input": "The cat sleeps on the sofa.",
     "output": "Le chat dort sur le canapé."},
    {"system": "You are a terse math tutor.", "instruction": "Solve for x.", "input": "2x + 6 = 10",
     "output": "x = 2."},
    {"instruction": "And in Fahrenheit?", "input": "", "output": "That is 77 °F.",
     "history": [["What is room temperature in Celsius?", "About 25 °C."]]},
    {"instruction": "把下面的句子翻译成英文。", "input": "今天天气很好。", "output": "The weather is nice today."},
    {"system": "You are sftkit assistant.", "instruction": "What about 3 km?", "input": "",
     "output": "3 km = 1.86 miles.",
     "history": [["Who are you?", "I am sftkit assistant."], ["Convert 2 km to miles.", "2 km = 1.24 miles."]]},
    {"instruction": "List two primary colours, one per line.", "input": "", "output": "Red\nBlue"},
]

ALPACA_CSV = [
    {"instruction": "Summarise the text in one sentence.",
     "input": "Cats sleep a lot, often 15 hours a day.\nKittens sleep even more.",
     "output": "Cats, especially kittens, sleep most of the day."},
    {"instruction": "Say hello.", "input": "", "output": "Hello!"},
    {"instruction": "Write a haiku about autumn.", "input": "",
     "output": "Leaves drift, slow and red,\ncool wind hums through empty boughs,\nthe year exhales."},
    {"instruction": "Repeat the quote exactly.", "input": 'He said "hi, there".', "output": 'He said "hi, there".'},
    {"instruction": "把句子翻译成英文。", "input": "我喜欢苹果，也喜欢香蕉。", "output": "I like apples, and bananas too."},
]

QUERY_RESPONSE = [
    {"query": "What is the capital of Japan?", "response": "Tokyo."},
    {"query": "Spell 'cat' backwards.", "response": "tac"},
    {"system": "You answer in one word.", "query": "Opposite of hot?", "response": "Cold."},
    {"query": "And of up?", "response": "Down.", "history": [["Opposite of hot?", "Cold."]]},
    {"query": "一周有几天？", "response": "七天。"},
    {"system": "你是一个简洁的助手。", "query": "那一年呢？", "response": "一年有 365 天，闰年 366 天。",
     "history": [["一周有几天？", "七天。"]]},
]

SHAREGPT = [
    {"conversations": [{"from": "human", "value": "Name a prime number above 10."},
                       {"from": "gpt", "value": "11."}]},
    {"conversations": [{"from": "system", "value": "You are a pirate."},
                       {"from": "human", "value": "Hello!"},
                       {"from": "gpt", "value": "Ahoy, matey!"},
                       {"from": "human", "value": "Where is the treasure?"},
                       {"from": "gpt", "value": "Buried under the old palm, arr."}]},
    {"conversations": [{"from": "user", "value": "What is 2 + 2?"},
                       {"from": "assistant", "value": "2 + 2 = 4."}]},
    {"conversations": [{"from": "system", "value": "Answer briefly."},
                       {"from": "user", "value": "Largest ocean?"},
                       {"from": "assistant", "value": "The Pacific."}]},
    {"conversations": [{"from": "human", "value": "你好！"},
                       {"from": "gpt", "value": "你好，有什么可以帮你？"},
                       {"from": "human", "value": "讲个笑话。"},
                       {"from": "gpt", "value": "程序员最怕什么？怕 bug 也怕没有 bug。"}]},
]

# (problem, line): one problem per line; bad.README.md is written from the same list so numbers never drift.
BAD_LINES = [
    ("malformed JSON (closing brace missing)", '{"instruction": "Say hi", "output": "Hi"'),
    ("alpaca row without an `output` field", json.dumps({"instruction": "Name a colour.", "input": ""})),
    ("unknown role `wizard`",
     json.dumps({"messages": [{"role": "user", "content": "Hello"}, {"role": "wizard", "content": "Abracadabra"}]})),
    ("roles do not alternate: two user messages in a row",
     json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Anyone there?"},
                              {"role": "assistant", "content": "Yes."}]})),
    ("empty assistant response",
     json.dumps({"messages": [{"role": "user", "content": "Say something."}, {"role": "assistant", "content": ""}]})),
    ("no recognisable schema (keys `text_a`, `label`)", json.dumps({"text_a": "good movie", "label": 1})),
]


def bad_readme() -> str:
    lines = [f"| {number} | {problem} |" for number, (problem, _) in enumerate(BAD_LINES, 1)]
    return (
        "# bad.jsonl\n\nDeliberately broken rows for error tests, one problem per line "
        "(written by `make_formats.py`).\n\n| line | problem |\n|---|---|\n" + "\n".join(lines) + "\n"
    )


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output directory")
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "alpaca.jsonl", ALPACA)
    write_jsonl(out / "query_response.jsonl", QUERY_RESPONSE)
    write_jsonl(out / "sharegpt.jsonl", SHAREGPT)
    write_jsonl(out / "msagent.jsonl", msagent_rows())
    write_jsonl(out / "messages_tools.jsonl", messages_tools_rows())
    with open(out / "alpaca.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["instruction", "input", "output"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(ALPACA_CSV)
    with open(out / "bad.jsonl", "w", encoding="utf-8", newline="\n") as f:
        f.write("".join(line + "\n" for _, line in BAD_LINES))
    (out / "bad.README.md").write_text(bad_readme(), encoding="utf-8", newline="\n")
    print(f"wrote samples to {out}")


if __name__ == "__main__":
    main()
