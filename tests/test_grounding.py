"""Grounded tool values: the days and words a conversation names, and calls kept to them."""
import datetime
import json
import re

import pytest

import tiny
from steered import Steered
from sftkit.data.formats import Message
from sftkit.evaluate import evaluate_generation
from sftkit.generation import GenerationConfig
from sftkit.grounding import ground_tools, named_dates, text_dates, word_spans
from sftkit.tools import offered_tools

TODAY = datetime.date(2026, 3, 4)  # a Wednesday
OPENER, CLOSER = "<|startofthink|>", "<|endofthink|>"


def day(offset):
    return TODAY + datetime.timedelta(days=offset)


@pytest.mark.parametrize("text, offsets", [
    ("What's happening in Valletta the day after tomorrow?", [2]),  # not also "tomorrow"
    ("Book it for tomorrow.", [1]),
    ("Reserve a table today.", [0]),
    ("Any events in Montevideo in 8 days?", [8]),
    ("in three days, or two weeks from now", [3, 14]),
    ("I was there 5 days ago.", [-5]),
    ("next Friday", [2, 9]),  # this coming Friday or the one after it
    ("on Monday", [5]),
    ("on Wednesday", [7]),  # today's weekday means next week's
    ("sometime next week", [7]),
    ("Flights on 2026-06-06, please.", [94]),
    ("on March 10th", [6]), ("on the 2nd of March", [363]),  # the next such day from today
    ("Call me at 9, when it suits you.", []),
])
def test_days_a_text_names(text, offsets):
    assert text_dates(text, TODAY) == {day(offset) for offset in offsets}


def test_without_today_only_written_dates_count():
    assert text_dates("tomorrow or 2026-02-30 or 2026-02-28", None) == {datetime.date(2026, 2, 28)}


def test_named_dates_read_today_from_the_system_prompt_and_days_from_user_turns():
    conversation = [Message("system", "You are an agent. Today is 2026-03-04.\nTools: ..."),
                    Message("user", "Book Nopa tomorrow."), Message("tool", '{"date": "2030-01-01"}'),
                    Message("user", "And 2026-05-01?")]
    assert named_dates(conversation) == {"2026-03-05", "2026-05-01"}  # a tool result's date is not the user's


def test_a_json_tool_result_gives_its_strings_whole():
    spans = word_spans([Message("tool", '```JSON\n{"results": [{"id": "fl-2291 b", "seats": 3}]}\n```')])
    assert "fl-2291 b" in spans and "fl-2291" in spans  # the whole string, and its words as any text gives them
    assert word_spans([Message("tool", "not json {")]) == ["not", "not json", "not json {", "json", "json {", "{"]


def test_word_spans_strip_edge_punctuation_and_quotes():
    spans = word_spans([Message("user", 'Block 14:30 today for "Vet visit".'), Message("assistant", "Berlin")])
    assert {"Vet visit", "Block 14:30", "14:30", "today"} <= set(spans)
    assert '"Vet' not in spans and "Berlin" not in spans and "visit\"." not in spans


SYSTEM = ("Today is 2026-03-04.\nTools:\n"
          '1. {"name": "local_events", "parameters": [{"name": "city", "required": true}, '
          '{"name": "date", "format": "date", "required": true}]}\n'
          '2. {"name": "stock_quote", "parameters": [{"name": "symbol", "pattern": "^[A-Z]{2,4}$", "required": true}, '
          '{"name": "days", "type": "integer"}, {"name": "unit", "enum": ["C", "F"]}]}')


def grounded(user: str) -> dict:
    tools = ground_tools(offered_tools(SYSTEM), [Message("system", SYSTEM), Message("user", user)])
    return {tool.name: tool.parameters["properties"] for tool in tools}


def test_dates_and_words_become_enums_other_values_stay():
    properties = grounded("Any events in Kyoto the day after tomorrow? Also quote orcl.")
    assert properties["local_events"]["date"]["enum"] == ["2026-03-06"]
    assert "Kyoto" in properties["local_events"]["city"]["enum"] and "Kyre" not in properties["local_events"]["city"]["enum"]
    symbols = properties["stock_quote"]["symbol"]["enum"]
    assert "ORCL" in symbols and "orcl" not in symbols and all(re.fullmatch("[A-Z]{2,4}", s) for s in symbols)
    assert properties["stock_quote"]["days"] == {"type": "integer"} and properties["stock_quote"]["unit"] == {"enum": ["C", "F"]}


def test_a_conversation_naming_no_day_leaves_dates_free():
    assert "enum" not in grounded("Any events in Kyoto?")["local_events"]["date"]


def test_a_pattern_no_span_matches_leaves_the_value_free():
    assert "enum" not in grounded("12, 345 + 6.")["stock_quote"]["symbol"]


def call(name, parameters):
    return json.dumps({"api_name": name, "parameters": parameters})


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny.make_model(tokenizer, seed=3).eval()


def test_eval_keeps_a_model_pushed_to_wrong_values_to_the_named_ones(model, tokenizer):
    """Pushed to tomorrow for "the day after tomorrow" and to a ticker the request never names: grounded, the
    call takes the named day and a named ticker; ungrounded, it keeps the push."""
    user = "Any events in Kyoto the day after tomorrow?"
    reference = call("local_events", {"city": "Kyoto", "date": "2026-03-06"})
    conversations = [[Message("system", SYSTEM), Message("user", user), Message("tool_call", reference),
                      Message("tool", '{"event": "a fair"}'), Message("assistant", "A fair.")],
                     [Message("system", SYSTEM), Message("user", "Quote orcl for me."),
                      Message("tool_call", call("stock_quote", {"symbol": "ORCL"})), Message("tool", '{"price": 1}'),
                      Message("assistant", "1.")]]
    pushes = [OPENER + call("local_events", {"city": "Kyoto", "date": "2026-03-05"}) + CLOSER,
              OPENER + call("stock_quote", {"symbol": "ORCA"}) + CLOSER]
    steer = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in pushes]
    reports = {grounding: evaluate_generation(Steered(model, steer), tokenizer, "chatml", conversations, mode="agent",
                                              gen_config=GenerationConfig(max_new_tokens=60), batch_size=2,
                                              score_tool_calls=False, ground_tool_values=grounding)
               for grounding in (False, True)}
    free, kept = ([re.search(r'\{"api_name.*?\}\}', e["prediction"]).group(0) for e in reports[g]["examples"]]
                  for g in (False, True))
    assert '"2026-03-05"' in free[0] and '"ORCA"' in free[1]
    assert '"2026-03-06"' in kept[0] and json.loads(kept[1])["parameters"]["symbol"] in ("ORCL", "FOR")
    assert reports[True]["ground_tool_values"] is True and reports[False]["ground_tool_values"] is False


def test_a_guide_grounds_only_when_asked_and_reads_today_from_the_system_it_is_given(tokenizer):
    from sftkit.constrained import ToolCallGuide

    conversation = [Message("user", "Any events in Kyoto tomorrow?")]
    grounded_guide, free_guide = (ToolCallGuide(tokenizer, "chatml", grounded=grounded) for grounded in (True, False))
    dates = {tool.name: tool.parameters["properties"].get("date") for tool in grounded_guide.tools_for(conversation, SYSTEM)}
    assert dates["local_events"]["enum"] == ["2026-03-05"]
    assert free_guide.tools_for(conversation, SYSTEM) == offered_tools(SYSTEM)
