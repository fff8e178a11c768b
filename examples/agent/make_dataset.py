"""Write train.jsonl, test.jsonl and test_general.jsonl: tool-calling conversations in MSAgent-Bench format.

    train.jsonl         seen tools, phrasings and entities, plus augmentation that teaches reading the tool list
                        and copying arguments from the request: invented entity names, renamed tools and
                        parameters, shuffled tool lists
    test.jsonl          in distribution: the training pools, in user texts that training never has
    test_general.jsonl  generalisation: every row uses phrasings and entities that training never saw, and
                        about 45% of rows call one of six tools that never appear in training

Every system prompt says what day it is and lists 3 or 4 tools as MSAgent-Bench does (numbered JSON specs with
typed parameters): the right tool, its similar-named distractor and another, shuffled. Requests give dates
relative to today, write tickers, currency codes and flight numbers in lower case where the tool wants upper
case, and some conversations go on with a follow-up ("And in Oslo?"). Same flags, same bytes.
"""
from __future__ import annotations

import argparse
import datetime
import json
import random
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

SEEN, HELD_OUT = "seen", "held_out"
POOL_OF_SPLIT = {"train": SEEN, "test": SEEN, "general": HELD_OUT}
FILES = {"train": "train.jsonl", "test": "test.jsonl", "general": "test_general.jsonl"}
# Shares of row kinds; the rest are single-call requests.
CHITCHAT_SHARE, FOLLOW_UP_SHARE, TWO_CALL_SHARE = 0.08, 0.15, 0.12
TRAIN_CHITCHAT_SHARE = 0.12  # training asks more small talk, so that more tools do not mean calling one for "Hi!"
HELD_OUT_TOOL_SHARE = 0.45  # of the tool rows of test_general
# Training augmentation: invented entities, renamed tools (each tool of a row), renamed parameters.
SYNTHETIC_SHARE, TOOL_RENAME_SHARE, PARAM_RENAME_SHARE = 0.3, 0.3, 0.3
LOWER_CASE_SHARE = {"symbol": 0.4, "code": 0.25, "flight": 0.4, "tracking": 0.4, "ferry": 0.4}


def param(name: str, kind: str | None = None, required: bool = True, **extra) -> dict:
    """One parameter as MSAgent-Bench lists it. Strings (the default) name no type and only required parameters say
    so: each prompt token is paid for in every training step on a CPU."""
    return {"name": name, **({"type": kind} if kind else {}), **extra, **({"required": True} if required else {})}


CODE = {"pattern": "^[A-Z]{3}$"}
DATE = {"format": "date"}
# name -> (description, parameters, [(parameter, kind of value)]), the kinds drawn by `draw_value`.
TOOLS = {
    "weather": ("Current weather in a city.", [param("city"), param("unit", enum=["C", "F"], required=False)],
                [("city", "city"), ("unit", "unit")]),
    "weather_forecast": ("Weather forecast for the next days.", [param("city"), param("days", "integer")],
                         [("city", "city"), ("days", "days")]),
    "currency_convert": ("Convert an amount between currencies.", [param("amount", "number"), param("from", **CODE), param("to", **CODE)],
                         [("amount", "amount"), ("from", "code"), ("to", "code")]),
    "currency_rates": ("Exchange rates of one currency.", [param("base", **CODE)], [("base", "code")]),
    "translate": ("Translate text into a language.", [param("text"), param("target_lang")], [("text", "phrase"), ("target_lang", "language")]),
    "detect_language": ("Name the language a text is in.", [param("text")], [("text", "foreign")]),
    "calculator": ("Evaluate an arithmetic expression.", [param("expression")], [("expression", "expression")]),
    "calculate_tip": ("Tip on a bill at a percentage.", [param("bill", "number"), param("percent", "integer")],
                      [("bill", "bill"), ("percent", "percent")]),
    "calendar_add": ("Add an event to the calendar.", [param("title"), param("date", **DATE), param("time", pattern="^[0-2][0-9]:[0-5][0-9]$")],
                     [("title", "title"), ("date", "date"), ("time", "time")]),
    "calendar_list": ("List the calendar events of a day.", [param("date", **DATE)], [("date", "date")]),
    "stock_price": ("Latest price of a stock.", [param("symbol", pattern="^[A-Z]{1,5}$")], [("symbol", "symbol")]),
    "stock_history": ("Price change of a stock over past days.", [param("symbol", pattern="^[A-Z]{1,5}$"), param("days", "integer")],
                      [("symbol", "symbol"), ("days", "days")]),
    # Held out: these six tools appear in test_general only.
    "book_table": ("Reserve a restaurant table.", [param("restaurant"), param("people", "integer"), param("date", **DATE)],
                   [("restaurant", "restaurant"), ("people", "people"), ("date", "date")]),
    "cancel_booking": ("Cancel a restaurant reservation.", [param("restaurant"), param("date", **DATE)], [("restaurant", "restaurant"), ("date", "date")]),
    "flight_status": ("Status of a flight.", [param("flight", pattern="^[A-Z]{2}[0-9]{1,4}$")], [("flight", "flight")]),
    "flight_search": ("Search flights between two cities.", [param("origin"), param("destination"), param("date", **DATE)],
                      [("origin", "city"), ("destination", "city"), ("date", "date")]),
    "local_time": ("Current local time in a city.", [param("city")], [("city", "city")]),
    "local_events": ("Events in a city on a day.", [param("city"), param("date", **DATE)], [("city", "city"), ("date", "date")]),
    # Invented: these six tools appear in train only, so that reading an unknown tool's spec (and working out its
    # dates, counts and codes) is what training teaches, not recalling twelve tools.
    "movie_times": ("Showtimes at a cinema on a day.", [param("cinema"), param("date", **DATE)], [("cinema", "cinema"), ("date", "date")]),
    "buy_tickets": ("Buy cinema tickets for a day.", [param("cinema"), param("tickets", "integer"), param("date", **DATE)],
                    [("cinema", "cinema"), ("tickets", "people"), ("date", "date")]),
    "parcel_status": ("Where a parcel is now.", [param("tracking", pattern="^[A-Z]{2}[0-9]{6}$")], [("tracking", "tracking")]),
    "parcel_pickup": ("Send a courier to collect a parcel.", [param("city"), param("date", **DATE)], [("city", "city"), ("date", "date")]),
    "ferry_schedule": ("Ferries between two ports on a day.", [param("origin"), param("destination"), param("date", **DATE)],
                       [("origin", "city"), ("destination", "city"), ("date", "date")]),
    "ferry_status": ("Status of a ferry.", [param("ferry", pattern="^[A-Z]{3}[0-9]{1,3}$")], [("ferry", "ferry")]),
}
PAIRS = [("weather", "weather_forecast"), ("currency_convert", "currency_rates"), ("translate", "detect_language"),
         ("calculator", "calculate_tip"), ("calendar_add", "calendar_list"), ("stock_price", "stock_history"),
         ("book_table", "cancel_booking"), ("flight_status", "flight_search"), ("local_time", "local_events"),
         ("movie_times", "buy_tickets"), ("parcel_status", "parcel_pickup"), ("ferry_schedule", "ferry_status")]
DISTRACTOR = {a: b for pair in PAIRS for a, b in (pair, pair[::-1])}
HELD_OUT_TOOLS = ["book_table", "cancel_booking", "flight_status", "flight_search", "local_time", "local_events"]
INVENTED_TOOLS = ["movie_times", "buy_tickets", "parcel_status", "parcel_pickup", "ferry_schedule", "ferry_status"]
SEEN_TOOLS = [name for name in TOOLS if name not in HELD_OUT_TOOLS + INVENTED_TOOLS]
# Training only: the same tools under other names, so the model reads names from the list instead of recalling them.
TOOL_RENAMES = {
    "weather": ["get_weather", "current_weather"], "weather_forecast": ["get_forecast", "forecast"],
    "currency_convert": ["convert_currency", "fx_convert"], "currency_rates": ["exchange_rates", "fx_rates"],
    "translate": ["translate_text", "translator"], "detect_language": ["identify_language", "language_detect"],
    "calculator": ["calc", "evaluate_math"], "calculate_tip": ["tip_calculator", "compute_tip"],
    "calendar_add": ["add_event", "create_event"], "calendar_list": ["list_events", "get_events"],
    "stock_price": ["get_quote", "share_price"], "stock_history": ["price_history", "stock_chart"],
}
PARAM_RENAMES = {"city": ["location", "place"], "symbol": ["ticker"], "expression": ["expr"], "target_lang": ["language"],
                 "title": ["name", "summary"], "from": ["source"], "to": ["target"], "text": ["content"]}

CITIES = {
    SEEN: ["Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Sydney", "Toronto", "Chicago", "Boston", "Seattle",
           "Dubai", "Singapore", "Seoul", "Mumbai", "Cairo", "Lima", "Oslo", "Vienna", "Prague", "Lisbon", "Dublin",
           "Bangkok", "Istanbul", "Mexico City", "New York", "San Francisco", "Cape Town", "Buenos Aires", "Helsinki",
           "Zurich", "Amsterdam", "Athens", "Warsaw", "Beijing", "Shanghai"],
    HELD_OUT: ["Reykjavik", "Montevideo", "Hanoi", "Porto", "Seville", "Tbilisi", "Quito", "Perth", "Auckland",
               "Marrakesh", "Valletta", "Tallinn", "Ljubljana", "Kyoto", "Nairobi", "Bogota"],
}
SYMBOLS = {
    SEEN: ["AAPL", "MSFT", "GOOGL", "AMZN", "NVDA", "TSLA", "META", "NFLX", "IBM", "INTC", "AMD", "BABA", "TSM",
           "JD", "BIDU", "DIS", "KO", "PEP", "NKE", "JPM", "WMT"],
    HELD_OUT: ["ORCL", "ADBE", "CRM", "SHOP", "UBER", "SNOW", "PYPL", "SBUX", "COST", "QCOM"],
}
USD_PER_UNIT = {
    "USD": Decimal("1"), "EUR": Decimal("1.08"), "GBP": Decimal("1.27"), "JPY": Decimal("0.0067"), "CNY": Decimal("0.138"),
    "CAD": Decimal("0.73"), "AUD": Decimal("0.66"), "CHF": Decimal("1.13"), "HKD": Decimal("0.128"),
    "SGD": Decimal("0.74"), "KRW": Decimal("0.00074"), "INR": Decimal("0.012"),
    "SEK": Decimal("0.095"), "NOK": Decimal("0.093"), "MXN": Decimal("0.058"),
}
CURRENCIES = {SEEN: ["USD", "EUR", "GBP", "JPY", "CNY", "CAD", "AUD", "CHF", "HKD", "SGD", "KRW", "INR"],
              HELD_OUT: ["SEK", "NOK", "MXN"]}
SMALL_UNIT_CURRENCIES = {"JPY", "KRW", "INR"}
LANGUAGES = ["French", "Spanish", "German", "Japanese", "Chinese"]
# English phrase -> its translations, in LANGUAGES order.
PHRASES = {
    SEEN: {
        "good morning": ["bonjour", "buenos días", "guten Morgen", "おはようございます", "早上好"],
        "thank you": ["merci", "gracias", "danke", "ありがとう", "谢谢"],
        "see you tomorrow": ["à demain", "hasta mañana", "bis morgen", "また明日", "明天见"],
        "where is the station": ["où est la gare", "dónde está la estación", "wo ist der Bahnhof", "駅はどこですか", "车站在哪里"],
        "good night": ["bonne nuit", "buenas noches", "gute Nacht", "おやすみなさい", "晚安"],
        "how much is this": ["combien ça coûte", "cuánto cuesta esto", "wie viel kostet das", "これはいくらですか", "这个多少钱"],
        "happy birthday": ["joyeux anniversaire", "feliz cumpleaños", "alles Gute zum Geburtstag", "お誕生日おめでとう", "生日快乐"],
        "excuse me": ["excusez-moi", "disculpe", "entschuldigung", "すみません", "打扰一下"],
        "I am hungry": ["j'ai faim", "tengo hambre", "ich habe Hunger", "お腹が空きました", "我饿了"],
        "welcome": ["bienvenue", "bienvenido", "willkommen", "ようこそ", "欢迎"],
        "good luck": ["bonne chance", "buena suerte", "viel Glück", "幸運を祈ります", "祝你好运"],
        "the bill, please": ["l'addition, s'il vous plaît", "la cuenta, por favor", "die Rechnung, bitte", "お会計をお願いします", "请结账"],
    },
    HELD_OUT: {
        "see you soon": ["à bientôt", "hasta pronto", "bis bald", "またね", "回头见"],
        "how is your day": ["comment se passe ta journée", "cómo va tu día", "wie läuft dein Tag", "今日はどうですか", "你今天过得怎么样"],
        "I love this city": ["j'adore cette ville", "me encanta esta ciudad", "ich liebe diese Stadt", "この街が大好きです", "我爱这座城市"],
        "where is the hotel": ["où est l'hôtel", "dónde está el hotel", "wo ist das Hotel", "ホテルはどこですか", "酒店在哪里"],
        "nice to meet you": ["enchanté", "encantado de conocerte", "freut mich", "はじめまして", "很高兴认识你"],
    },
}
TITLES = {
    SEEN: ["Dentist", "Team meeting", "Lunch with Anna", "Gym", "Project review", "Call Mom", "Flight to Berlin",
           "Doctor appointment", "Yoga class", "Book club", "Haircut", "Code review", "Birthday party", "Piano lesson"],
    HELD_OUT: ["Parent-teacher meeting", "Tax advisor", "Dinner with Leo", "Car service", "Vet visit", "Swim lesson"],
}
RESTAURANTS = {SEEN: [], HELD_OUT: ["Nopa", "Chez Marie", "Blue Lotus", "Osteria Roma", "The Green Fig", "Sakura House"]}
AIRLINES = {SEEN: [], HELD_OUT: ["BA", "LH", "AF", "UA", "QF", "KL"]}
SYLLABLES = ["ka", "lo", "ver", "mi", "tan", "do", "rel", "su", "bra", "ny", "qu", "zen", "or", "val", "mar", "ti"]

UNIT_PHRASES = {"C": ["", "", " in Celsius"], "F": [" in Fahrenheit", " in °F"]}
WHEN = ["today", "tomorrow", "the day after tomorrow", "in {n} days", "on {iso}", "on {iso}"]
# Training says a day relative to today more often: an explicit date is only copied, the others are worked out.
TRAIN_WHEN = ["today", "tomorrow", "the day after tomorrow", "in {n} days", "in {n} days", "on {iso}"]
OFFSETS = {"today": 0, "tomorrow": 1, "the day after tomorrow": 2}

# Requests: "{slot}" fields come from draw_value; {u} is the unit phrase, {when} a date relative to today.
REQUESTS = {
    "weather": {SEEN: ["What's the weather in {city}{u}?", "How is the weather in {city} today{u}?", "Tell me the weather for {city}{u}.",
                       "Is it cold in {city} right now{u}?", "Weather in {city}{u}, please.", "Check the current weather in {city}{u}.",
                       "I'm going to {city}. What's the weather like there{u}?"],
                HELD_OUT: ["Any idea what it's like outside in {city} at the moment{u}?", "Could you find out the current conditions in {city}{u}?"]},
    "weather_forecast": {SEEN: ["What's the forecast for {city} for the next {days} days?", "Give me a {days}-day forecast for {city}.",
                                "Will it rain in {city} over the next {days} days?", "Forecast {city}, {days} days."],
                         HELD_OUT: ["What will the weather do in {city} during the coming {days} days?"]},
    "currency_convert": {SEEN: ["Convert {amount} {from} to {to}.", "How much is {amount} {from} in {to}?", "What is {amount} {from} worth in {to}?",
                                "I have {amount} {from}. How many {to} is that?", "Change {amount} {from} into {to}, please.", "{amount} {from} to {to}?"],
                         HELD_OUT: ["If I swap {amount} {from}, how much {to} do I get back?", "Work out the {to} value of {amount} {from}."]},
    "currency_rates": {SEEN: ["Show me the exchange rates for {base}.", "What are today's rates against {base}?", "List {base} exchange rates."],
                       HELD_OUT: ["I'd like the current rate table with {base} as the base."]},
    "translate": {SEEN: ['Translate "{text}" into {target_lang}.', 'How do you say "{text}" in {target_lang}?', 'What is "{text}" in {target_lang}?',
                         'Please translate "{text}" to {target_lang}.', '{target_lang} for "{text}"?'],
                  HELD_OUT: ['Render "{text}" in {target_lang} for me.', 'I need "{text}" written in {target_lang}.']},
    "detect_language": {SEEN: ['Which language is "{text}"?', 'Detect the language of "{text}".', 'What language is this: "{text}"?'],
                        HELD_OUT: ['Can you tell what language "{text}" is written in?']},
    "calculator": {SEEN: ["What is {expression}?", "Calculate {expression}.", "Compute {expression} for me.", "Use the calculator: {expression}",
                          "How much is {expression}?", "Evaluate {expression}, please."],
                   HELD_OUT: ["Crunch the numbers: {expression}", "What do you get from {expression}?"]},
    "calculate_tip": {SEEN: ["What's a {percent}% tip on {bill}?", "Calculate the tip for a bill of {bill} at {percent}%.", "Tip {percent} percent on {bill}?"],
                      HELD_OUT: ["Our check came to {bill}; how much is {percent}% on top?"]},
    "calendar_add": {SEEN: ['Add "{title}" to my calendar {when} at {time}.', 'Put "{title}" in my calendar {when} at {time}.',
                            'Create an event "{title}" {when} at {time}.', 'Schedule "{title}" {when} at {time}.', 'Remind me of "{title}" {when} at {time}.'],
                     HELD_OUT: ['Block {time} {when} for "{title}".', 'Pencil in "{title}" {when}, {time}.']},
    "calendar_list": {SEEN: ["What's on my calendar {when}?", "List my events {when}.", "Do I have anything scheduled {when}?"],
                      HELD_OUT: ["Read me my schedule {when}."]},
    "stock_price": {SEEN: ["What's the stock price of {symbol}?", "How much is {symbol} trading at?", "Get me the current price of {symbol}.",
                           "Quote {symbol}, please.", "What is {symbol} at right now?", "Check {symbol} stock."],
                    HELD_OUT: ["Quote for {symbol}, please.", "Where is {symbol} trading today?", "Latest share price for {symbol}?"]},
    "stock_history": {SEEN: ["Show {symbol} prices for the last {days} days.", "How has {symbol} done over the past {days} days?",
                             "{days}-day price history of {symbol}."],
                      HELD_OUT: ["Chart {symbol} across the previous {days} days."]},
    "book_table": {HELD_OUT: ["Book a table for {people} at {restaurant} {when}.", "Reserve {restaurant} for {people} people {when}.",
                              "Can you get us a table at {restaurant} {when}? We are {people}."]},
    "cancel_booking": {HELD_OUT: ["Cancel my reservation at {restaurant} {when}.", "Please call off the booking at {restaurant} {when}."]},
    "flight_status": {HELD_OUT: ["Is flight {flight} on time?", "What's the status of {flight}?", "Has {flight} landed yet?"]},
    "flight_search": {HELD_OUT: ["Find flights from {origin} to {destination} {when}.", "Any flights {origin} to {destination} {when}?"]},
    "local_time": {HELD_OUT: ["What time is it in {city}?", "Tell me the local time in {city}.", "Current time in {city}?"]},
    "local_events": {HELD_OUT: ["What's happening in {city} {when}?", "Any events in {city} {when}?"]},
    "movie_times": {SEEN: ["What's showing at {cinema} {when}?", "Showtimes for {cinema} {when}, please.", "Which films play at {cinema} {when}?"]},
    "buy_tickets": {SEEN: ["Get me {tickets} tickets at {cinema} {when}.", "Buy {tickets} tickets for {cinema} {when}.",
                           "We are {tickets}; book seats at {cinema} {when}."]},
    "parcel_status": {SEEN: ["Where is my parcel {tracking}?", "Track parcel {tracking}.", "Any news on shipment {tracking}?"]},
    "parcel_pickup": {SEEN: ["Have a courier collect a parcel in {city} {when}.", "Schedule a parcel pickup in {city} {when}.",
                             "Pick up my package in {city} {when}."]},
    "ferry_schedule": {SEEN: ["Ferries from {origin} to {destination} {when}?", "When do boats go from {origin} to {destination} {when}?",
                              "Find a ferry {origin} to {destination} {when}."]},
    "ferry_status": {SEEN: ["Is ferry {ferry} running on time?", "Status of ferry {ferry}?", "Has ferry {ferry} left yet?"]},
}
# A second request in the same conversation that changes one argument of the first call.
FOLLOW_UPS = {
    "weather": ("city", {SEEN: ["And in {city}?", "What about {city}?"], HELD_OUT: ["How about {city}?", "Same for {city}, please."]}),
    "stock_price": ("symbol", {SEEN: ["And {symbol}?", "What about {symbol}?"], HELD_OUT: ["How about {symbol}?", "Now {symbol}."]}),
    "currency_convert": ("to", {SEEN: ["And in {to}?", "What about {to}?"], HELD_OUT: ["How much in {to}?"]}),
    "translate": ("target_lang", {SEEN: ["And in {target_lang}?", "What about {target_lang}?"], HELD_OUT: ["Now in {target_lang}, please."]}),
    "local_time": ("city", {HELD_OUT: ["How about {city}?", "Same for {city}, please."]}),
    "flight_status": ("flight", {HELD_OUT: ["How about {flight}?", "Now {flight}."]}),
}
CLAUSES = {
    "weather": {SEEN: "check the weather in {city}{u}", HELD_OUT: "look up the conditions in {city}{u}"},
    "stock_price": {SEEN: "get the price of {symbol}", HELD_OUT: "find where {symbol} is trading"},
    "currency_convert": {SEEN: "convert {amount} {from} to {to}", HELD_OUT: "work out {amount} {from} in {to}"},
    "translate": {SEEN: 'translate "{text}" into {target_lang}', HELD_OUT: 'render "{text}" in {target_lang}'},
    "calculator": {SEEN: "calculate {expression}", HELD_OUT: "crunch {expression}"},
    "local_time": {HELD_OUT: "tell me the time in {city}"},
    "flight_status": {HELD_OUT: "check whether {flight} is on time"},
}
TWO_CALL_REQUESTS = {SEEN: ["Please {a} and {b}.", "Can you {a}, then {b}?", "First {a}, then {b}."],
                     HELD_OUT: ["Two things: {a}, and {b}.", "Could you {a}? Also {b}."]}
ANSWERS = {
    "weather": "It is {temperature}°{unit} and {condition} in {city}.",
    "weather_forecast": "{city} over the next {days} days: {summary}.",
    "currency_convert": "{amount} {from} = {result} {to}.",
    "currency_rates": "1 {base} buys {USD} USD or {EUR} EUR.",
    "translate": 'In {target_lang}, "{text}" is "{translation}".',
    "detect_language": '"{text}" is {language}.',
    "calculator": "{expression} = {result}.",
    "calculate_tip": "A {percent}% tip on {bill} is {tip}.",
    "calendar_add": 'Added "{title}" on {date} at {time}.',
    "calendar_list": "On {date} you have: {events}.",
    "stock_price": "{symbol} is trading at {price} USD.",
    "stock_history": "{symbol} moved {change}% over the last {days} days.",
    "book_table": "Booked a table for {people} at {restaurant} on {date}.",
    "cancel_booking": "Cancelled your booking at {restaurant} on {date}.",
    "flight_status": "Flight {flight} is {status}.",
    "flight_search": "The cheapest flight from {origin} to {destination} on {date} costs {price} USD.",
    "local_time": "It is {time} in {city}.",
    "local_events": "In {city} on {date}: {event}.",
    "movie_times": "At {cinema} on {date}: {film}.",
    "buy_tickets": "Bought {tickets} tickets at {cinema} for {date}.",
    "parcel_status": "Parcel {tracking} is {status}.",
    "parcel_pickup": "A courier will collect your parcel in {city} on {date}.",
    "ferry_schedule": "The first ferry from {origin} to {destination} on {date} leaves at {departure}.",
    "ferry_status": "Ferry {ferry} is {status}.",
}
CHITCHAT = {
    SEEN: {"greeting": (["Hi!", "Hello there.", "Good morning!", "Hey, how are you?", "Hello!", "Good evening."],
                        "Hello! I can help with the tools listed above."),
           "abilities": (["What can you do?", "Which tools do you have?", "How can you help me?"],
                         "I can use the tools listed above: ask me something they can answer."),
           "thanks": (["Thanks!", "Thank you so much.", "Great, thanks for the help.", "Perfect, thank you."],
                      "You're welcome! Anything else?"),
           "bye": (["Bye!", "See you later.", "Goodbye.", "That's all for now, bye."], "Goodbye! Have a nice day."),
           "identity": (["Who are you?", "What are you?", "Are you a bot?", "What's your name?"],
                        "I am sftkit agent, an assistant that uses tools to answer.")},
    HELD_OUT: {"greeting": (["Howdy!", "Yo, good day."], "Hello! I can help with the tools listed above."),
               "thanks": (["Cheers, that helped.", "Much appreciated!"], "You're welcome! Anything else?"),
               "bye": (["Catch you later!", "I'm off, bye."], "Goodbye! Have a nice day.")},
}
CHITCHAT_OPENERS = ["", "", "Ok. ", "Well, ", "So, "]
CHITCHAT_CLOSERS = {SEEN: ["", "", " :)", " Just curious."], HELD_OUT: [""]}  # more distinct small talk to train on


def number_text(value) -> str:
    """A number exactly as the JSON payloads spell it, so answers copy the tool result digit for digit."""
    return json.dumps(value)


def to_number(value: Decimal):
    return int(value) if value == value.to_integral_value() else float(value)


def synthetic_name(rng: random.Random, avoid: set[str]) -> str:
    """An invented proper name (two or three syllables) that no real pool holds."""
    while True:
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
        if name not in avoid:
            return name


REAL_NAMES = {name for pool in (CITIES, TITLES, RESTAURANTS) for names in pool.values() for name in names}


def when_text(rng: random.Random, today: datetime.date, forms: list[str] = WHEN) -> tuple[str, str]:
    """(how the request says the day, the YYYY-MM-DD it means)."""
    form = rng.choice(forms)
    if form == "in {n} days":
        offset = rng.randint(3, 9)
        return form.format(n=offset), (today + datetime.timedelta(days=offset)).isoformat()
    if form == "on {iso}":
        day = today + datetime.timedelta(days=rng.randint(3, 60))
        return form.format(iso=day.isoformat()), day.isoformat()
    return form, (today + datetime.timedelta(days=OFFSETS[form])).isoformat()


def maybe_lower(rng: random.Random, text: str, kind: str) -> str:
    return text.lower() if rng.random() < LOWER_CASE_SHARE[kind] else text


def expression(rng: random.Random) -> str:
    """A small integer expression; divisions are exact so every result is an integer."""
    shape = rng.choice(["a+b", "a-b", "a*b", "a/b", "a*b+c", "(a+b)*c", "a-b*c"])
    a, b, c = rng.randint(2, 999), rng.randint(2, 999), rng.randint(2, 20)
    small_a, small_b = rng.randint(2, 99), rng.randint(2, 99)
    return {"a+b": f"{a} + {b}", "a-b": f"{a} - {b}", "a*b": f"{small_a} * {small_b}", "a/b": f"{small_b * c} / {small_b}",
            "a*b+c": f"{small_a} * {c} + {small_b}", "(a+b)*c": f"({small_a} + {small_b}) * {c}",
            "a-b*c": f"{a} - {small_b} * {c}"}[shape]


def draw_value(rng: random.Random, kind: str, pool: str, today: datetime.date, synthetic: bool, taken: dict,
               when: list[str] = WHEN) -> tuple:
    """(the argument value, {request field: how the request writes it}) for one kind of value.

    `taken` holds the values already drawn for this call, so that from/to and origin/destination differ.
    """
    if kind == "city":
        city = synthetic_name(rng, REAL_NAMES) if synthetic else rng.choice([c for c in CITIES[pool] if c not in taken.values()])
        return city, city
    if kind == "unit":
        unit = "F" if rng.random() < 0.25 else "C"
        return unit, rng.choice(UNIT_PHRASES[unit])
    if kind in ("days", "people"):
        count = rng.randint(2, 7 if kind == "days" else 8)
        return count, str(count)
    if kind == "amount":
        amount = Decimal(rng.choice([rng.randint(1, 100), rng.randint(1, 100) * 10, rng.randint(1, 50) * 100]))
        if rng.random() < 0.2:
            amount = Decimal(rng.randint(11, 999)) / 10
        return to_number(amount), number_text(to_number(amount))
    if kind == "code":
        # The first code of a call comes from the pool; a second one may be any other (a held-out call has one new code).
        first = not any(value in USD_PER_UNIT for value in taken.values() if isinstance(value, str))
        codes = CURRENCIES[pool] if first else CURRENCIES[SEEN] + CURRENCIES[pool]
        code = rng.choice(sorted({c for c in codes if c not in taken.values()}))
        return code, maybe_lower(rng, code, "code")
    if kind == "phrase":
        phrase = rng.choice(sorted(PHRASES[pool]))
        return phrase, phrase
    if kind == "language":
        language = rng.choice(LANGUAGES)
        return language, language
    if kind == "foreign":
        translations = PHRASES[pool][rng.choice(sorted(PHRASES[pool]))]
        text = translations[rng.randrange(len(LANGUAGES))]
        return text, text
    if kind == "expression":
        expr = expression(rng)
        return expr, expr
    if kind == "bill":
        bill = to_number(Decimal(rng.randint(800, 25000)) / 100)
        return bill, number_text(bill)
    if kind == "percent":
        percent = rng.choice([10, 12, 15, 18, 20, 25])
        return percent, str(percent)
    if kind == "title":
        title = "Meet " + synthetic_name(rng, REAL_NAMES) if synthetic else rng.choice(TITLES[pool])
        return title, title
    if kind == "date":
        text, iso = when_text(rng, today, when)
        return iso, text
    if kind == "time":
        time = f"{rng.randint(7, 21):02d}:{rng.choice([0, 15, 30, 45]):02d}"
        return time, time
    if kind == "symbol":
        if synthetic:
            symbol = "".join(rng.choice("ABCDEFGHKLMNPRSTVWXZ") for _ in range(rng.randint(3, 4)))
            symbol = symbol if symbol not in SYMBOLS[HELD_OUT] else symbol + "X"
        else:
            symbol = rng.choice(SYMBOLS[pool])
        return symbol, maybe_lower(rng, symbol, "symbol")
    if kind == "restaurant":
        restaurant = rng.choice(RESTAURANTS[pool])
        return restaurant, restaurant
    if kind == "flight":
        flight = rng.choice(AIRLINES[pool]) + str(rng.randint(10, 2999))
        return flight, maybe_lower(rng, flight, "flight")
    if kind == "cinema":
        cinema = synthetic_name(rng, REAL_NAMES) + " " + rng.choice(["Cinema", "Plaza", "Odeon"])
        return cinema, cinema
    if kind == "tracking":
        tracking = "".join(rng.choice("ABCDEFGHKLMNPRSTUVWXZ") for _ in range(2)) + f"{rng.randint(0, 999999):06d}"
        return tracking, maybe_lower(rng, tracking, "tracking")
    if kind == "ferry":
        ferry = "".join(rng.choice("ABCDEFGHKLMNPRSTUVWXZ") for _ in range(3)) + str(rng.randint(1, 999))
        return ferry, maybe_lower(rng, ferry, "ferry")
    raise ValueError(f"unknown kind of value {kind!r}")


def draw_call(rng: random.Random, tool: str, pool: str, today: datetime.date, synthetic: bool,
              augment: bool = False) -> tuple[dict, dict]:
    """(arguments, request fields) of one call; a date's field is `when`, a unit's is `u`."""
    arguments, fields = {}, {}
    for name, kind in TOOLS[tool][2]:
        value, text = draw_value(rng, kind, pool, today, synthetic and kind in ("city", "title", "symbol"), arguments,
                                 TRAIN_WHEN if augment else WHEN)
        arguments[name] = value
        fields[{"date": "when", "unit": "u"}.get(kind, name)] = text
    return arguments, fields


def execute(tool: str, arguments: dict) -> dict:
    """The fake tool: a pure function of its name and arguments (renamed ones are read as the originals)."""
    tool, arguments = canonical_call(tool, arguments)
    fixed = random.Random(json.dumps([tool, arguments], ensure_ascii=False, sort_keys=True))
    if tool == "weather":
        celsius = fixed.randint(-10, 35)
        condition = fixed.choice(["snowy", "cloudy", "foggy"] if celsius <= 0 else ["sunny", "cloudy", "rainy", "windy", "foggy"])
        return {"temperature": celsius if arguments["unit"] == "C" else round(celsius * 9 / 5 + 32), "condition": condition}
    if tool == "weather_forecast":
        return {"summary": ", then ".join(fixed.sample(["sunny", "cloudy", "rain", "wind", "showers", "clear skies"], 2))}
    if tool == "currency_convert":
        rate = USD_PER_UNIT[arguments["from"]] / USD_PER_UNIT[arguments["to"]]
        return {"result": to_number((Decimal(str(arguments["amount"])) * rate).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))}
    if tool == "currency_rates":
        base = USD_PER_UNIT[arguments["base"]]
        return {"USD": to_number(base.quantize(Decimal("0.0001"))),
                "EUR": to_number((base / USD_PER_UNIT["EUR"]).quantize(Decimal("0.0001"), rounding=ROUND_HALF_UP))}
    if tool == "translate":
        translations = {**PHRASES[SEEN], **PHRASES[HELD_OUT]}[arguments["text"]]
        return {"translation": translations[LANGUAGES.index(arguments["target_lang"])]}
    if tool == "detect_language":
        return {"language": next(LANGUAGES[translations.index(arguments["text"])] for pool in PHRASES.values()
                                 for translations in pool.values() if arguments["text"] in translations)}
    if tool == "calculator":
        return {"result": evaluate(arguments["expression"])}
    if tool == "calculate_tip":
        tip = (Decimal(str(arguments["bill"])) * arguments["percent"] / 100).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
        return {"tip": to_number(tip)}
    if tool == "calendar_list":
        return {"events": fixed.choice(["nothing", "Gym at 07:00", "Team meeting at 10:00", "Lunch at 12:30"])}
    if tool in ("stock_price", "flight_search"):
        return {"price": to_number(Decimal(fixed.randint(1000, 90000)) / 100)}
    if tool == "stock_history":
        return {"change": to_number(Decimal(fixed.randint(-1500, 1500)) / 100)}
    if tool == "flight_status":
        return {"status": fixed.choice(["on time", "delayed by 20 minutes", "boarding", "landed"])}
    if tool == "local_time":
        return {"time": f"{fixed.randint(0, 23):02d}:{fixed.randint(0, 59):02d}"}
    if tool == "local_events":
        return {"event": fixed.choice(["a jazz concert", "a food market", "a football match", "a night run"])}
    if tool == "movie_times":
        return {"film": fixed.choice(["Dune at 18:00", "Heat at 20:30", "Up at 16:15", "Alien at 21:45"])}
    if tool in ("parcel_status", "ferry_status"):
        return {"status": fixed.choice(["in transit", "delayed", "on time", "at the depot"])}
    if tool == "ferry_schedule":
        return {"departure": f"{fixed.randint(5, 22):02d}:{fixed.choice([0, 15, 30, 45]):02d}"}
    return {"status": "ok"}  # calendar_add, book_table, cancel_booking, buy_tickets, parcel_pickup


def canonical_call(tool: str, arguments: dict) -> tuple[str, dict]:
    """A renamed tool and its renamed parameters as the original names."""
    original = next((name for name, renames in TOOL_RENAMES.items() if tool in renames), tool)
    names = {rename: name for name, renames in PARAM_RENAMES.items() for rename in renames}
    declared = {name for name, _ in TOOLS[original][2]}
    return original, {key if key in declared else names[key]: value for key, value in arguments.items()}


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


def answer(tool: str, arguments: dict, result: dict) -> str:
    values = {key: number_text(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
              for key, value in {**arguments, **result}.items()}
    return ANSWERS[tool].format(**values)


def call_text(name: str, arguments: dict, result: dict) -> str:
    """One think/exec pair as MSAgent-Bench writes it inside the assistant value (api_name and parameters)."""
    call = json.dumps({"api_name": name, "parameters": arguments}, ensure_ascii=False)
    return (f"<|startofthink|>```JSON\n{call}\n```<|endofthink|>\n\n"
            f"<|startofexec|>```JSON\n{json.dumps(result, ensure_ascii=False)}\n```<|endofexec|>\n")


class Offer:
    """The tools one conversation lists, each under the name (and parameter names) this row gives it."""

    def __init__(self, rng: random.Random, tools: list[str], augment: bool):
        self.names = {tool: rng.choice(TOOL_RENAMES[tool]) if augment and tool in TOOL_RENAMES and rng.random() < TOOL_RENAME_SHARE
                      else tool for tool in tools}
        self.params = {tool: {name: rng.choice(PARAM_RENAMES[name]) if augment and name in PARAM_RENAMES and rng.random() < PARAM_RENAME_SHARE
                              else name for name, _ in TOOLS[tool][2]} for tool in tools}
        self.order = list(tools)
        rng.shuffle(self.order)

    def system(self, today: datetime.date) -> str:
        lines = [f"You are sftkit agent. Today is {today.isoformat()}.", "Tools:"]
        for index, tool in enumerate(self.order, 1):
            description, parameters, _ = TOOLS[tool]
            renamed = [{**spec, "name": self.params[tool][spec["name"]]} for spec in parameters]
            spec = {"name": self.names[tool], "description": description, "parameters": renamed}
            lines.append(f"{index}. {json.dumps(spec, ensure_ascii=False)}")
        return "\n".join(lines)

    def call(self, tool: str, arguments: dict) -> str:
        """The think/exec text of a call as this row names it; results and answers use the original names."""
        return call_text(self.names[tool], {self.params[tool][key]: value for key, value in arguments.items()},
                         execute(tool, arguments))


def offered(rng: random.Random, targets: list[str], pool: str) -> list[str]:
    """The targets and each one's distractor, then one other tool when that makes fewer than four."""
    tools = list(dict.fromkeys(tool for target in targets for tool in (target, DISTRACTOR[target])))
    others = [tool for tool in (SEEN_TOOLS + (HELD_OUT_TOOLS if pool == HELD_OUT else [])) if tool not in tools]
    return tools + (rng.sample(others, 1) if len(tools) < 4 else [])


def pick_tool(rng: random.Random, split: str, choices=None) -> str:
    """A target tool: a held-out one for HELD_OUT_TOOL_SHARE of test_general's tool rows, a seen or invented one in
    train, else a seen one."""
    held_out = split == "general" and rng.random() < HELD_OUT_TOOL_SHARE
    tools = HELD_OUT_TOOLS if held_out else SEEN_TOOLS + (INVENTED_TOOLS if split == "train" else [])
    pool = [tool for tool in tools if choices is None or tool in choices]
    return rng.choice(pool or [tool for tool in SEEN_TOOLS if tool in choices])


def single_turn(rng, split, today, augment):
    pool = POOL_OF_SPLIT[split]
    tool = pick_tool(rng, split)
    arguments, fields = draw_call(rng, tool, pool, today, augment and rng.random() < SYNTHETIC_SHARE, augment)
    offer = Offer(rng, offered(rng, [tool], pool), augment)
    request = rng.choice(REQUESTS[tool][pool]).format(**fields)
    return offer, [(request, offer.call(tool, arguments) + answer(tool, arguments, execute(tool, arguments)))]


def follow_up(rng, split, today, augment):
    pool = POOL_OF_SPLIT[split]
    tool = pick_tool(rng, split, [name for name, (_, phrasings) in FOLLOW_UPS.items() if pool in phrasings])
    synthetic = augment and rng.random() < SYNTHETIC_SHARE
    arguments, fields = draw_call(rng, tool, pool, today, synthetic, augment)
    name, phrasings = FOLLOW_UPS[tool]
    kind = dict(TOOLS[tool][2])[name]
    changed, changed_text = arguments[name], fields[name]
    while changed == arguments[name]:
        changed, changed_text = draw_value(rng, kind, pool, today, synthetic and kind in ("city", "symbol"),
                                           {key: value for key, value in arguments.items() if key != name})
    second = {**arguments, name: changed}
    offer = Offer(rng, offered(rng, [tool], pool), augment)
    turns = [(rng.choice(REQUESTS[tool][pool]).format(**fields), offer.call(tool, arguments) + answer(tool, arguments, execute(tool, arguments))),
             (rng.choice(phrasings[pool]).format(**{name: changed_text}), offer.call(tool, second) + answer(tool, second, execute(tool, second)))]
    return offer, turns


def two_calls(rng, split, today, augment):
    pool = POOL_OF_SPLIT[split]
    choices = [tool for tool, clauses in CLAUSES.items() if pool in clauses]
    first = pick_tool(rng, split, choices)
    second = rng.choice([tool for tool in choices if tool != first and tool not in HELD_OUT_TOOLS])
    synthetic = augment and rng.random() < SYNTHETIC_SHARE
    drawn = [draw_call(rng, tool, pool, today, synthetic, augment) for tool in (first, second)]
    if rng.random() < 0.5:
        drawn, tools = drawn[::-1], [second, first]
    else:
        tools = [first, second]
    offer = Offer(rng, offered(rng, tools, pool), augment)
    clauses = [CLAUSES[tool][pool].format(**fields) for tool, (_, fields) in zip(tools, drawn)]
    request = rng.choice(TWO_CALL_REQUESTS[pool]).format(a=clauses[0], b=clauses[1])
    calls = "".join(offer.call(tool, arguments) for tool, (arguments, _) in zip(tools, drawn))
    answers = " ".join(answer(tool, arguments, execute(tool, arguments)) for tool, (arguments, _) in zip(tools, drawn))
    return offer, [(request[0].upper() + request[1:], calls + answers)]


def chitchat(rng, split, today, augment):
    pool = POOL_OF_SPLIT[split]
    questions, reply = CHITCHAT[pool][rng.choice(sorted(CHITCHAT[pool]))]
    opener, question = rng.choice(CHITCHAT_OPENERS), rng.choice(questions)
    if opener.endswith(", "):
        question = question[0].lower() + question[1:]
    tools = rng.sample(SEEN_TOOLS + (HELD_OUT_TOOLS if pool == HELD_OUT else []), 3)
    return Offer(rng, tools, augment), [(opener + question + rng.choice(CHITCHAT_CLOSERS[pool]), reply)]


def make_split(rng: random.Random, size: int, split: str, taken: set[str]) -> list[dict]:
    """`size` conversations whose user texts are new to `taken` (which grows), so no two splits share one."""
    rows, misses = [], 0
    augment = split == "train"
    while len(rows) < size:
        if misses > 10_000:
            raise SystemExit(f"only {len(rows)} distinct {split} conversations found; ask for fewer rows")
        today = datetime.date(2025, 1, 1) + datetime.timedelta(days=rng.randrange(3 * 365))
        kind = rng.random()
        small_talk = TRAIN_CHITCHAT_SHARE if augment else CHITCHAT_SHARE
        build = (chitchat if kind < small_talk else follow_up if kind < small_talk + FOLLOW_UP_SHARE
                 else two_calls if kind < small_talk + FOLLOW_UP_SHARE + TWO_CALL_SHARE else single_turn)
        offer, turns = build(rng, split, today, augment)
        key = "\n".join(request for request, _ in turns)
        if key in taken:
            misses += 1
            continue
        misses = 0
        taken.add(key)
        conversation = [{"from": "system", "value": offer.system(today)}]
        for request, reply in turns:
            conversation += [{"from": "user", "value": request}, {"from": "assistant", "value": reply}]
        rows.append({"conversations": conversation})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=1600, help="rows in train.jsonl")
    parser.add_argument("--test", type=int, default=100, help="rows in test.jsonl (in distribution)")
    parser.add_argument("--general", type=int, default=100, help="rows in test_general.jsonl (held-out phrasings, entities, tools)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output directory")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    # The test splits are drawn first, each from its own stream, so --train never changes them.
    splits = {split: make_split(random.Random(f"{split}-{args.seed}"), getattr(args, split), split, taken)
              for split in ("general", "test", "train")}
    for split, rows in splits.items():
        write_jsonl(args.out / FILES[split], rows)
    print(f"wrote {len(splits['train'])} train, {len(splits['test'])} test and {len(splits['general'])} "
          f"test_general rows to {args.out}")


if __name__ == "__main__":
    main()
