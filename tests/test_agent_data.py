"""The agent example data: the generalisation split really holds out phrasings, entities and tools; every call
fits the tools its system prompt offers; arguments come from the request (relative dates from the Today line);
tool results replay."""
from __future__ import annotations

import datetime
import json
import re
import sys
from pathlib import Path

import pytest

from sftkit.data.formats import split_agent_text
from sftkit.tools import offered_tools

AGENT = Path(__file__).resolve().parent.parent / "examples" / "agent"
sys.path.insert(0, str(AGENT))
try:
    import make_dataset as generator
finally:
    sys.path.pop(0)

SPLITS = {"train": 1600, "test": 100, "general": 100}
# How each request field can look, so that a template matches the texts made from it and no others.
FIELD_PATTERNS = {
    "amount": r"[0-9.]+", "bill": r"[0-9.]+", "days": r"[0-9]+", "people": r"[0-9]+", "percent": r"[0-9]+",
    "from": r"[A-Za-z]{3}", "to": r"[A-Za-z]{3}", "base": r"[A-Za-z]{3}", "symbol": r"[A-Za-z]{1,5}",
    "flight": r"[A-Za-z]{2}[0-9]+", "time": r"[0-9]{2}:[0-9]{2}", "expression": r"[0-9 ()+*/-]+",
    "when": r"(?:today|tomorrow|the day after tomorrow|in [0-9]+ days|on [0-9]{4}-[0-9]{2}-[0-9]{2})",
    "u": "(?:" + "|".join(re.escape(p) for phrases in generator.UNIT_PHRASES.values() for p in phrases) + ")",
}


def rows(split: str) -> list[dict]:
    text = (AGENT / generator.FILES[split]).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


def turns(row: dict) -> list[tuple[str, str]]:
    values = [turn["value"] for turn in row["conversations"][1:]]
    return list(zip(values[::2], values[1::2]))


def calls(reply: str) -> list[dict]:
    return [json.loads(m.content.strip().removeprefix("```JSON").removesuffix("```")) for m in split_agent_text(reply)
            if m.role == "tool_call"]


def template_regex(template: str) -> str:
    pieces = re.split(r"(\{[a-z_]+\})", template)
    return "".join(FIELD_PATTERNS.get(piece[1:-1], ".+?") if piece.startswith("{") else re.escape(piece) for piece in pieces)


def phrasing_patterns(pool: str) -> re.Pattern:
    """Every user text a pool's templates can produce: requests, follow-ups, two-call requests, small talk."""
    templates = [t for phrasings in generator.REQUESTS.values() for t in phrasings.get(pool, [])]
    templates += [t for _, phrasings in generator.FOLLOW_UPS.values() for t in phrasings.get(pool, [])]
    patterns = [template_regex(t) for t in templates]
    clause = "(?:" + "|".join(template_regex(c[pool]) for c in generator.CLAUSES.values() if pool in c) + ")"
    for connector in generator.TWO_CALL_REQUESTS[pool]:
        pattern = re.escape(connector).replace(r"\{a\}", clause).replace(r"\{b\}", clause)
        patterns.append("(?i:" + pattern[:2] + ")" + pattern[2:] if pattern[0] == "(" else pattern)
    openers = "(?:" + "|".join(re.escape(o) for o in generator.CHITCHAT_OPENERS if o) + ")?"
    closers = "(?:" + "|".join(re.escape(c) for c in generator.CHITCHAT_CLOSERS[pool]) + ")"
    for questions, _ in generator.CHITCHAT[pool].values():
        patterns += [openers + f"[{q[0]}{q[0].lower()}]" + re.escape(q[1:]) + closers for q in questions]
    return re.compile("|".join(f"(?:{p})" for p in patterns))


def user_texts(split: str) -> list[str]:
    return [request for row in rows(split) for request, _ in turns(row)]


def test_splits_are_sized_and_share_no_user_text():
    texts = {split: ["\n".join(request for request, _ in turns(row)) for row in rows(split)] for split in SPLITS}
    assert {split: len(found) for split, found in texts.items()} == SPLITS
    for split, found in texts.items():
        assert len(set(found)) == len(found), split
    assert not set(texts["train"]) & set(texts["test"]) and not set(texts["train"]) & set(texts["general"])


def test_general_phrasings_are_held_out():
    seen, held_out = phrasing_patterns(generator.SEEN), phrasing_patterns(generator.HELD_OUT)
    for text in user_texts("train") + user_texts("test"):
        assert seen.fullmatch(text) and not held_out.fullmatch(text), text
    for text in user_texts("general"):
        assert held_out.fullmatch(text) and not seen.fullmatch(text), text


def test_general_entities_and_tools_never_occur_in_training():
    train = "\n".join(json.dumps(row, ensure_ascii=False) for row in rows("train") + rows("test"))
    pools = [generator.CITIES, generator.SYMBOLS, generator.TITLES, generator.RESTAURANTS, generator.CURRENCIES,
             {pool: list(phrases) + [t for ts in phrases.values() for t in ts] for pool, phrases in generator.PHRASES.items()}]
    held_out = [entity for pool in pools for entity in pool[generator.HELD_OUT]] + generator.HELD_OUT_TOOLS
    for entity in held_out:
        assert not re.search(rf"(?<![\w]){re.escape(entity)}(?![\w])", train, re.I), entity
    general = rows("general")
    called = [call["api_name"] for row in general for _, reply in turns(row) for call in calls(reply)]
    assert sum(name in generator.HELD_OUT_TOOLS for name in called) >= 0.3 * len(called)
    entities = "|".join(re.escape(e) for pool in pools for e in pool[generator.HELD_OUT])
    held_out_words = re.compile(rf"(?<!\w)(?:{entities})(?!\w)", re.I)
    uses = sum(bool(held_out_words.search(request)) for row in general for request, _ in turns(row))
    assert uses >= 0.5 * len(user_texts("general"))


def test_every_call_fits_the_offered_tools_and_a_distractor_is_offered():
    for split in SPLITS:
        for row in rows(split):
            system = row["conversations"][0]["value"]
            assert re.match(r"You are sftkit agent\. Today is \d{4}-\d{2}-\d{2}\.\nTools:\n", system)
            tools = {tool.name: tool for tool in offered_tools(system)}
            assert 3 <= len(tools) <= 4
            for _, reply in turns(row):
                for call in calls(reply):
                    tool = tools[call["api_name"]]
                    assert set(call["parameters"]) <= set(tool.parameters["properties"])
                    assert set(tool.parameters.get("required", [])) <= set(call["parameters"])
                    original, _ = generator.canonical_call(call["api_name"], call["parameters"])
                    distractor = generator.DISTRACTOR[original]
                    assert any(generator.canonical_call(name, {})[0] == distractor for name in tools), (split, original)


def test_arguments_come_from_the_request_and_dates_from_the_today_line():
    lowered = 0
    for split in SPLITS:
        for row in rows(split):
            today = datetime.date.fromisoformat(re.search(r"Today is (\S+)\.", row["conversations"][0]["value"])[1])
            said = ""
            for request, reply in turns(row):
                said += "\n" + request
                for call in calls(reply):
                    for key, value in call["parameters"].items():
                        if key == "unit":
                            assert value == "C" or re.search("Fahrenheit|°F", said)  # a follow-up keeps the unit
                        elif isinstance(value, str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
                            assert value == resolve_date(request, today), (request, value)
                        elif isinstance(value, str):
                            assert value in said or value.lower() in said, (key, value, said)
                            lowered += value not in said
                        else:
                            assert json.dumps(value) in said, (key, value, said)
    assert lowered > 50  # lower-case tickers, codes and flights the tool wants upper case


def resolve_date(request: str, today: datetime.date) -> str:
    found = re.search(r"on (\d{4}-\d{2}-\d{2})", request)
    if found:
        return found[1]
    days = re.search(r"in (\d+) days", request)
    offset = int(days[1]) if days else 2 if "the day after tomorrow" in request else 1 if "tomorrow" in request else 0
    assert offset or "today" in request, request
    return (today + datetime.timedelta(days=offset)).isoformat()


def test_training_augments_and_the_test_splits_do_not():
    renamed_tools = {rename for renames in generator.TOOL_RENAMES.values() for rename in renames}
    renamed_params = {rename for renames in generator.PARAM_RENAMES.values() for rename in renames}

    def names(split):
        found = [(tool.name, set(tool.parameters["properties"])) for row in rows(split)
                 for tool in offered_tools(row["conversations"][0]["value"])]
        return {name for name, _ in found}, set().union(*(params for _, params in found))

    invented = set(generator.INVENTED_TOOLS)
    tools, params = names("train")
    assert tools & renamed_tools and params & renamed_params and tools >= invented
    for split in ("test", "general"):
        tools, params = names(split)
        assert not tools & (renamed_tools | invented) and not params & renamed_params, split
    follow_ups = {split: sum(len(turns(row)) == 2 for row in rows(split)) for split in SPLITS}
    assert all(count >= 0.05 * SPLITS[split] for split, count in follow_ups.items()), follow_ups


@pytest.mark.parametrize("split", sorted(SPLITS))
def test_tool_results_replay(split):
    """The exec blocks are what `execute` returns (renamed tools included), so an evaluation can run the model's calls."""
    for row in rows(split):
        for _, reply in turns(row):
            parts = split_agent_text(reply)
            results = [json.loads(m.content.strip().removeprefix("```JSON").removesuffix("```")) for m in parts if m.role == "tool"]
            assert [generator.execute(c["api_name"], c["parameters"]) for c in calls(reply)] == results
