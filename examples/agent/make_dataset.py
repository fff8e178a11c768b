"""Write train.jsonl and test.jsonl: a six-tool agent task in MSAgent-Bench `conversations` format.

Built to be learnable by SmolLM2-135M-Instruct with LoRA on a CPU: one fixed short system prompt, arguments
copied verbatim from the request, tool results computed from the arguments and answers in one fixed
template per tool and language. Same flags, same bytes; no user text appears in both splits.
"""
from __future__ import annotations

import argparse
import json
import random
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

URL = "http://tools/{}"
# Bare signatures keep the prompt near 80 tokens, which matters on CPU where every prompt token is paid
# for in every step; types, defaults and the call format are learnt from the data.
SYSTEM = (
    "You are sftkit agent. Tools:\n"
    "weather(city, unit=C|F)\n"
    "currency_convert(amount, from, to)\n"
    "translate(text, target_lang)\n"
    "calculator(expression)\n"
    "calendar_add(title, date=YYYY-MM-DD, time=HH:MM)\n"
    "stock_price(symbol)"
)

CHITCHAT_SHARE, TWO_CALL_SHARE, ZH_SHARE = 0.10, 0.20, 0.35

CITIES = {
    "en": ["Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Sydney", "Toronto", "Chicago", "Boston",
           "Seattle", "Dubai", "Singapore", "Seoul", "Mumbai", "Cairo", "Lima", "Oslo", "Vienna", "Prague",
           "Lisbon", "Dublin", "Nairobi", "Bangkok", "Istanbul", "Mexico City", "New York", "San Francisco",
           "Cape Town", "Buenos Aires", "Helsinki", "Zurich", "Amsterdam", "Athens", "Warsaw"],
    "zh": ["北京", "上海", "广州", "深圳", "杭州", "成都", "南京", "武汉", "西安", "重庆", "苏州", "天津", "长沙",
           "青岛", "厦门", "昆明", "哈尔滨", "大连", "香港", "台北", "Paris", "Tokyo", "London", "Seoul"],
}
CONDITIONS = {"sunny": "晴", "cloudy": "多云", "rainy": "有雨", "windy": "有风", "foggy": "有雾", "snowy": "有雪"}
USD_PER_UNIT = {
    "USD": Decimal("1"), "EUR": Decimal("1.08"), "GBP": Decimal("1.27"), "JPY": Decimal("0.0067"),
    "CNY": Decimal("0.138"), "CAD": Decimal("0.73"), "AUD": Decimal("0.66"), "CHF": Decimal("1.13"),
    "HKD": Decimal("0.128"), "SGD": Decimal("0.74"), "KRW": Decimal("0.00074"), "INR": Decimal("0.012"),
}
SMALL_UNIT_CURRENCIES = {"JPY", "KRW", "INR"}  # amounts below 1000 of these round to nothing useful
LANGUAGES = {
    "en": {"fr": "French", "es": "Spanish", "de": "German", "ja": "Japanese", "zh": "Chinese"},
    "zh": {"en": "英语", "fr": "法语", "es": "西班牙语", "de": "德语", "ja": "日语"},
}
PHRASES = [
    {"en": "good morning", "zh": "早上好", "fr": "bonjour", "es": "buenos días", "de": "guten Morgen",
     "ja": "おはようございます"},
    {"en": "thank you", "zh": "谢谢", "fr": "merci", "es": "gracias", "de": "danke", "ja": "ありがとう"},
    {"en": "see you tomorrow", "zh": "明天见", "fr": "à demain", "es": "hasta mañana", "de": "bis morgen",
     "ja": "また明日"},
    {"en": "where is the station", "zh": "车站在哪里", "fr": "où est la gare", "es": "dónde está la estación",
     "de": "wo ist der Bahnhof", "ja": "駅はどこですか"},
    {"en": "good night", "zh": "晚安", "fr": "bonne nuit", "es": "buenas noches", "de": "gute Nacht",
     "ja": "おやすみなさい"},
    {"en": "how much is this", "zh": "这个多少钱", "fr": "combien ça coûte", "es": "cuánto cuesta esto",
     "de": "wie viel kostet das", "ja": "これはいくらですか"},
    {"en": "happy birthday", "zh": "生日快乐", "fr": "joyeux anniversaire", "es": "feliz cumpleaños",
     "de": "alles Gute zum Geburtstag", "ja": "お誕生日おめでとう"},
    {"en": "excuse me", "zh": "打扰一下", "fr": "excusez-moi", "es": "disculpe", "de": "entschuldigung",
     "ja": "すみません"},
    {"en": "the weather is nice today", "zh": "今天天气很好", "fr": "il fait beau aujourd'hui",
     "es": "hoy hace buen tiempo", "de": "heute ist schönes Wetter", "ja": "今日はいい天気です"},
    {"en": "I am hungry", "zh": "我饿了", "fr": "j'ai faim", "es": "tengo hambre", "de": "ich habe Hunger",
     "ja": "お腹が空きました"},
    {"en": "welcome", "zh": "欢迎", "fr": "bienvenue", "es": "bienvenido", "de": "willkommen", "ja": "ようこそ"},
    {"en": "nice to meet you", "zh": "很高兴认识你", "fr": "enchanté", "es": "encantado de conocerte",
     "de": "freut mich", "ja": "はじめまして"},
    {"en": "good luck", "zh": "祝你好运", "fr": "bonne chance", "es": "buena suerte", "de": "viel Glück",
     "ja": "幸運を祈ります"},
    {"en": "what time is it", "zh": "现在几点", "fr": "quelle heure est-il", "es": "qué hora es",
     "de": "wie spät ist es", "ja": "今何時ですか"},
    {"en": "I don't understand", "zh": "我不明白", "fr": "je ne comprends pas", "es": "no entiendo",
     "de": "ich verstehe nicht", "ja": "わかりません"},
    {"en": "the bill, please", "zh": "请结账", "fr": "l'addition, s'il vous plaît", "es": "la cuenta, por favor",
     "de": "die Rechnung, bitte", "ja": "お会計をお願いします"},
]
TITLES = {
    "en": ["Dentist", "Team meeting", "Lunch with Anna", "Gym", "Project review", "Call Mom", "Flight to Berlin",
           "Doctor appointment", "Yoga class", "Book club", "Haircut", "Code review", "Birthday party",
           "Piano lesson", "Quarterly planning"],
    "zh": ["牙医", "团队周会", "和小王吃午饭", "健身", "项目评审", "给妈妈打电话", "飞往上海", "看医生", "瑜伽课",
           "读书会", "理发", "家长会", "钢琴课"],
}
SYMBOLS = ["AAPL", "MSFT", "GOOGL", "AMZN", "NVDA", "TSLA", "META", "NFLX", "IBM", "INTC", "AMD", "ORCL", "BABA",
           "TSM", "JD", "BIDU", "DIS", "KO", "PEP", "NKE", "JPM", "WMT"]

# Full requests, with {u} the optional unit phrase for weather.
REQUESTS = {
    ("weather", "en"): [
        "What's the weather in {city}{u}?", "How is the weather in {city} today{u}?",
        "Tell me the weather for {city}{u}.", "Is it cold in {city} right now{u}?", "Weather in {city}{u}, please.",
        "Check the current weather in {city}{u}.", "Can you look up the weather in {city}{u}?",
        "I'm going to {city}. What's the weather like there{u}?", "How hot is it in {city}{u}?",
    ],
    ("weather", "zh"): [
        "{city}今天天气怎么样？{u}", "查一下{city}的天气。{u}", "{city}现在冷不冷？{u}", "{city}的天气如何？{u}",
        "我要去{city}，那边天气怎么样？{u}", "帮我看看{city}现在的气温。{u}",
    ],
    ("currency_convert", "en"): [
        "Convert {amount} {src} to {dst}.", "How much is {amount} {src} in {dst}?",
        "What is {amount} {src} worth in {dst}?", "I have {amount} {src}. How many {dst} is that?",
        "Change {amount} {src} into {dst}, please.", "{amount} {src} to {dst}?", "Exchange {amount} {src} for {dst}.",
    ],
    ("currency_convert", "zh"): [
        "把 {amount} {src} 换成 {dst}。", "{amount} {src} 等于多少 {dst}？", "{amount} {src} 能换多少 {dst}？",
        "帮我把 {amount} {src} 兑换成 {dst}。", "我有 {amount} {src}，折合多少 {dst}？",
    ],
    ("translate", "en"): [
        'Translate "{text}" into {lang}.', 'How do you say "{text}" in {lang}?', 'What is "{text}" in {lang}?',
        'Please translate "{text}" to {lang}.', 'Can you put "{text}" into {lang}?', '{lang} for "{text}"?',
    ],
    ("translate", "zh"): [
        "把“{text}”翻译成{lang}。", "“{text}”用{lang}怎么说？", "请将“{text}”译为{lang}。", "{lang}里“{text}”怎么说？",
    ],
    ("calculator", "en"): [
        "What is {expr}?", "Calculate {expr}.", "Compute {expr} for me.", "Use the calculator: {expr}",
        "How much is {expr}?", "Evaluate {expr}, please.",
    ],
    ("calculator", "zh"): ["计算 {expr}。", "{expr} 等于多少？", "帮我算一下 {expr}。", "请计算 {expr} 的值。"],
    ("calendar_add", "en"): [
        'Add "{title}" to my calendar on {date} at {time}.', 'Put "{title}" in my calendar for {date} at {time}.',
        'Create an event "{title}" on {date} at {time}.', 'Schedule "{title}" on {date} at {time}.',
        'Remind me of "{title}" on {date} at {time}.', 'Book {date} at {time} for "{title}".',
    ],
    ("calendar_add", "zh"): [
        "在 {date} {time} 添加日程“{title}”。", "帮我把“{title}”加到日历，时间 {date} {time}。",
        "{date} {time} 有“{title}”，帮我记到日历里。", "新建日程“{title}”，{date} {time}。",
    ],
    ("stock_price", "en"): [
        "What's the stock price of {symbol}?", "How much is {symbol} trading at?",
        "Get me the current price of {symbol}.", "Quote {symbol}, please.", "What is {symbol} at right now?",
        "Check {symbol} stock.",
    ],
    ("stock_price", "zh"): [
        "{symbol} 现在股价多少？", "查一下 {symbol} 的股价。", "{symbol} 的最新价格是多少？",
        "帮我看看 {symbol} 现在多少钱一股。",
    ],
}
# Short clauses for requests that need two calls; joined by TWO_CALL_REQUESTS.
CLAUSES = {
    ("weather", "en"): "check the weather in {city}{u}", ("weather", "zh"): "查一下{city}的天气{u}",
    ("currency_convert", "en"): "convert {amount} {src} to {dst}",
    ("currency_convert", "zh"): "把 {amount} {src} 换成 {dst}",
    ("translate", "en"): 'translate "{text}" into {lang}', ("translate", "zh"): "把“{text}”翻译成{lang}",
    ("calculator", "en"): "calculate {expr}", ("calculator", "zh"): "算一下 {expr}",
    ("calendar_add", "en"): 'add "{title}" to my calendar on {date} at {time}',
    ("calendar_add", "zh"): "在 {date} {time} 添加日程“{title}”",
    ("stock_price", "en"): "get the price of {symbol}", ("stock_price", "zh"): "查 {symbol} 的股价",
}
# Pairs that would push a row past ~400 tokens are left out: calendar_add has the longest arguments, and
# Chinese (and Japanese) text costs two to three tokens a character.
TWO_CALL_TOOLS = {
    "en": ["calculator", "currency_convert", "stock_price", "translate", "weather"],
    "zh": ["calculator", "currency_convert", "stock_price", "weather"],
}
TWO_CALL_REQUESTS = {
    "en": ["Please {a} and {b}.", "Can you {a}, then {b}?", "Two things: {a}, and {b}.", "First {a}, then {b}.",
           "I need you to {a} and also {b}."],
    "zh": ["请{a}，然后{b}。", "帮我{a}，再{b}。", "先{a}，接着{b}。", "麻烦{a}，另外{b}。"],
}
UNIT_PHRASES = {
    ("request", "en", "C"): ["", "", " in Celsius", " in °C"], ("request", "en", "F"): [" in Fahrenheit", " in °F"],
    ("request", "zh", "C"): ["", "", "请用摄氏度。", "温度用摄氏度表示。"],
    ("request", "zh", "F"): ["请用华氏度。", "温度用华氏度表示。"],
    ("clause", "en", "C"): ["", "", " in Celsius"], ("clause", "en", "F"): [" in Fahrenheit"],
    ("clause", "zh", "C"): ["", "", "（摄氏度）"], ("clause", "zh", "F"): ["（华氏度）"],
}
ANSWERS = {
    ("weather", "en"): "It is {temperature}°{unit} and {condition} in {city}.",
    ("weather", "zh"): "{city}现在{temperature}°{unit}，{condition_zh}。",
    ("currency_convert", "en"): "{amount} {src} = {result} {dst}.",
    ("currency_convert", "zh"): "{amount} {src} 约合 {result} {dst}。",
    ("translate", "en"): 'In {lang}, "{text}" is "{translation}".',
    ("translate", "zh"): "用{lang}说是“{translation}”。",
    ("calculator", "en"): "{expression} = {result}.", ("calculator", "zh"): "{expression} 的结果是 {result}。",
    ("calendar_add", "en"): 'Added "{title}" on {date} at {time}.',
    ("calendar_add", "zh"): "已添加日程“{title}”：{date} {time}。",
    ("stock_price", "en"): "{symbol} is trading at {price} USD.",
    ("stock_price", "zh"): "{symbol} 当前股价为 {price} USD。",
}
CHITCHAT = {
    "en": {
        "greeting": (["Hi!", "Hello there.", "Good morning!", "Hey, how are you?", "Hello!", "Good evening."],
                     "Hello! I can check the weather, convert currency, translate, calculate, add calendar events "
                     "and look up stock prices."),
        "abilities": (["What can you do?", "Which tools do you have?", "How can you help me?", "What are you for?"],
                      "I can check the weather, convert currency, translate, calculate, add calendar events and "
                      "look up stock prices."),
        "thanks": (["Thanks!", "Thank you so much.", "Great, thanks for the help.", "Perfect, thank you."],
                   "You're welcome! Anything else?"),
        "bye": (["Bye!", "See you later.", "Goodbye.", "That's all for now, bye."], "Goodbye! Have a nice day."),
        "identity": (["Who are you?", "What are you?", "Are you a bot?", "What's your name?"],
                     "I am sftkit agent, an assistant that uses tools to answer."),
    },
    "zh": {
        "greeting": (["你好！", "嗨，你好吗？", "早上好！", "晚上好。", "哈喽！"],
                     "你好！我可以查天气、换算货币、翻译、计算、添加日程和查询股价。"),
        "abilities": (["你能做什么？", "你有哪些工具？", "你可以帮我什么？", "你有什么功能？"],
                      "我可以查天气、换算货币、翻译、计算、添加日程和查询股价。"),
        "thanks": (["谢谢！", "非常感谢。", "好的，谢谢你的帮助。", "太好了，谢谢。"], "不客气！还有什么需要帮忙的吗？"),
        "bye": (["再见！", "回头见。", "先这样，拜拜。", "没事了，再见。"], "再见，祝你愉快！"),
        "identity": (["你是谁？", "你是机器人吗？", "你叫什么名字？", "你是什么？"], "我是 sftkit agent，一个会使用工具的助手。"),
    },
}
# Openers and closers multiply the small-talk phrasings so both splits can hold distinct ones.
CHITCHAT_OPENERS = {"en": ["", "", "Ok. ", "Hmm, ", "Well, ", "So, "], "zh": ["", "", "嗯，", "那个，", "好的，"]}
CHITCHAT_CLOSERS = {"en": ["", "", " :)", " Just curious."], "zh": ["", "", "😊", "随便问问。"]}


def number_text(value: int | float) -> str:
    """The number exactly as the JSON payloads spell it, so answers copy the tool result digit for digit."""
    return json.dumps(value)


def to_number(value: Decimal) -> int | float:
    return int(value) if value == value.to_integral_value() else float(value)


def weather_slots(rng: random.Random, lang: str, style: str) -> tuple[dict, dict]:
    unit = "F" if rng.random() < 0.25 else "C"
    city = rng.choice(CITIES[lang])
    return {"city": city, "unit": unit}, {"city": city, "u": rng.choice(UNIT_PHRASES[style, lang, unit])}


def currency_slots(rng: random.Random, lang: str, style: str) -> tuple[dict, dict]:
    src, dst = rng.sample(sorted(USD_PER_UNIT), 2)
    if src in SMALL_UNIT_CURRENCIES:
        amount = Decimal(rng.randrange(1000, 100000, 50))
    elif rng.random() < 0.2:
        amount = Decimal(rng.randint(11, 999)) / 10
    else:
        amount = Decimal(rng.choice([rng.randint(1, 100), rng.randint(1, 100) * 10, rng.randint(1, 50) * 100]))
    amount = to_number(amount)
    return {"amount": amount, "from": src, "to": dst}, {"amount": number_text(amount), "src": src, "dst": dst}


def translate_slots(rng: random.Random, lang: str, style: str) -> tuple[dict, dict]:
    phrase = rng.choice(PHRASES)
    target = rng.choice(sorted(LANGUAGES[lang]))
    text, lang_name = phrase[lang], LANGUAGES[lang][target]
    return {"text": text, "target_lang": lang_name}, {"text": text, "lang": lang_name}


def expression(rng: random.Random) -> str:
    """A small integer expression; divisions are exact so every result is an integer."""
    shape = rng.choice(["a+b", "a-b", "a*b", "a/b", "a*b+c", "(a+b)*c", "a-b*c"])
    a, b, c = rng.randint(2, 999), rng.randint(2, 999), rng.randint(2, 20)
    small_a, small_b = rng.randint(2, 99), rng.randint(2, 99)
    return {
        "a+b": f"{a} + {b}", "a-b": f"{a} - {b}", "a*b": f"{small_a} * {small_b}",
        "a/b": f"{small_b * c} / {small_b}", "a*b+c": f"{small_a} * {c} + {small_b}",
        "(a+b)*c": f"({small_a} + {small_b}) * {c}", "a-b*c": f"{a} - {small_b} * {c}",
    }[shape]


def calculator_slots(rng: random.Random, lang: str, style: str) -> tuple[dict, dict]:
    expr = expression(rng)
    return {"expression": expr}, {"expr": expr}


def calendar_slots(rng: random.Random, lang: str, style: str) -> tuple[dict, dict]:
    title = rng.choice(TITLES[lang])
    date = f"{rng.choice([2025, 2026])}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    time = f"{rng.randint(7, 21):02d}:{rng.choice([0, 15, 30, 45]):02d}"
    return {"title": title, "date": date, "time": time}, {"title": title, "date": date, "time": time}


def stock_slots(rng: random.Random, lang: str, style: str) -> tuple[dict, dict]:
    symbol = rng.choice(SYMBOLS)
    return {"symbol": symbol}, {"symbol": symbol}


# Each draws (tool arguments, template fields); `style` is "request" or "clause" (part of a two-call
# request), and only the weather unit phrase depends on it.
SLOTS = {
    "weather": weather_slots, "currency_convert": currency_slots, "translate": translate_slots,
    "calculator": calculator_slots, "calendar_add": calendar_slots, "stock_price": stock_slots,
}


def execute(tool: str, arguments: dict) -> dict:
    """The fake tool: a pure function of the arguments, returning only what the answer needs."""
    fixed = random.Random(json.dumps([tool, arguments], ensure_ascii=False, sort_keys=True))
    if tool == "weather":
        celsius = fixed.randint(-10, 35)
        condition = fixed.choice(["snowy", "cloudy", "foggy"] if celsius <= 0 else
                                 ["sunny", "cloudy", "rainy", "windy", "foggy"])
        temperature = celsius if arguments["unit"] == "C" else round(celsius * 9 / 5 + 32)
        return {"temperature": temperature, "condition": condition}
    if tool == "currency_convert":
        rate = USD_PER_UNIT[arguments["from"]] / USD_PER_UNIT[arguments["to"]]
        result = (Decimal(str(arguments["amount"])) * rate).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
        return {"result": to_number(result)}
    if tool == "translate":
        source = next(phrase for phrase in PHRASES if arguments["text"] in phrase.values())
        code = next(code for names in LANGUAGES.values() for code, name in names.items()
                    if name == arguments["target_lang"])
        return {"translation": source[code]}
    if tool == "calculator":
        return {"result": evaluate(arguments["expression"])}
    if tool == "calendar_add":
        return {"status": "ok"}
    return {"price": to_number(Decimal(fixed.randint(1000, 90000)) / 100)}


def evaluate(expr: str) -> int:
    """Evaluate the integer expressions `expression` writes: + - * /, one optional leading parenthesis pair."""
    tokens = expr.replace("(", "( ").replace(")", " )").split()
    if tokens[0] == "(":
        close = tokens.index(")")
        tokens = [str(evaluate(" ".join(tokens[1:close])))] + tokens[close + 1:]
    terms, ops = [int(tokens[0])], []
    for op, operand in zip(tokens[1::2], tokens[2::2]):
        if op in "*/":
            terms[-1] = terms[-1] * int(operand) if op == "*" else terms[-1] // int(operand)
        else:
            terms.append(int(operand))
            ops.append(op)
    total = terms[0]
    for op, term in zip(ops, terms[1:]):
        total = total + term if op == "+" else total - term
    return total


def answer(tool: str, lang: str, arguments: dict, result: dict) -> str:
    fields = {
        "weather": lambda: {**arguments, "temperature": number_text(result["temperature"]),
                            "condition": result["condition"], "condition_zh": CONDITIONS[result["condition"]]},
        "currency_convert": lambda: {"amount": number_text(arguments["amount"]), "src": arguments["from"],
                                     "dst": arguments["to"], "result": number_text(result["result"])},
        "translate": lambda: {"text": arguments["text"], "lang": arguments["target_lang"], **result},
        "calculator": lambda: {"expression": arguments["expression"], "result": number_text(result["result"])},
        "calendar_add": lambda: arguments,
        "stock_price": lambda: {"symbol": arguments["symbol"], "price": number_text(result["price"])},
    }[tool]()
    return ANSWERS[tool, lang].format(**fields)


def call_text(tool: str, arguments: dict, result: dict) -> str:
    """One think/exec pair exactly as MSAgent-Bench writes it inside the assistant value."""
    call = json.dumps({"api_name": tool, "url": URL.format(tool), "parameters": arguments}, ensure_ascii=False)
    return (
        f"<|startofthink|>```JSON\n{call}\n```<|endofthink|>\n\n"
        f"<|startofexec|>```JSON\n{json.dumps(result, ensure_ascii=False)}\n```<|endofexec|>\n"
    )


def tool_turn(rng: random.Random, lang: str, calls: int) -> tuple[str, str]:
    tools = [rng.choice(sorted(SLOTS) if calls == 1 else TWO_CALL_TOOLS[lang]) for _ in range(calls)]
    style = "request" if calls == 1 else "clause"
    drawn = [SLOTS[tool](rng, lang, style) for tool in tools]
    if calls == 1:
        request = rng.choice(REQUESTS[tools[0], lang]).format(**drawn[0][1])
    else:
        clauses = [CLAUSES[tool, lang].format(**slots) for tool, (_, slots) in zip(tools, drawn)]
        request = rng.choice(TWO_CALL_REQUESTS[lang]).format(a=clauses[0], b=clauses[1])
    calls_text, answers = "", []
    for tool, (arguments, _) in zip(tools, drawn):
        result = execute(tool, arguments)
        calls_text += call_text(tool, arguments, result)
        answers.append(answer(tool, lang, arguments, result))
    return request, calls_text + ("" if lang == "zh" else " ").join(answers)


def chitchat_turn(rng: random.Random, lang: str) -> tuple[str, str]:
    questions, reply = CHITCHAT[lang][rng.choice(sorted(CHITCHAT[lang]))]
    opener, question = rng.choice(CHITCHAT_OPENERS[lang]), rng.choice(questions)
    if opener.endswith(", ") and lang == "en":
        question = question[0].lower() + question[1:]
    return opener + question + rng.choice(CHITCHAT_CLOSERS[lang]), reply


def make_split(rng: random.Random, size: int, taken: set[str]) -> list[dict]:
    """`size` rows whose user text is new to `taken` (which grows), so the splits cannot overlap."""
    rows, misses = [], 0
    while len(rows) < size:
        if misses > 10_000:
            raise SystemExit(f"only {len(rows)} distinct requests found; ask for fewer rows")
        lang = "zh" if rng.random() < ZH_SHARE else "en"
        kind = rng.random()
        if kind < CHITCHAT_SHARE:
            request, reply = chitchat_turn(rng, lang)
        else:
            request, reply = tool_turn(rng, lang, calls=2 if kind < CHITCHAT_SHARE + TWO_CALL_SHARE else 1)
        if request in taken:
            misses += 1
            continue
        misses = 0
        taken.add(request)
        rows.append({"conversations": [{"from": "system", "value": SYSTEM}, {"from": "user", "value": request},
                                       {"from": "assistant", "value": reply}]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=1200, help="rows in train.jsonl")
    parser.add_argument("--test", type=int, default=100, help="rows in test.jsonl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output directory")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    # The test split is drawn first from its own stream, so --train never changes it.
    test = make_split(random.Random(f"test-{args.seed}"), args.test, taken)
    train = make_split(random.Random(f"train-{args.seed}"), args.train, taken)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "test.jsonl", test)
    print(f"wrote {len(train)} train and {len(test)} test rows to {args.out}")


if __name__ == "__main__":
    main()
