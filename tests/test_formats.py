"""to_messages: every raw schema -> canonical messages; bad rows -> DataError naming the field."""
import json
from pathlib import Path

import pytest

from sftkit.data.errors import DataError
from sftkit.data.formats import Message, detect_schema, split_agent_text, to_messages
from sftkit.data.loading import read_file

FORMATS = Path(__file__).resolve().parent.parent / "examples" / "data" / "formats"
THINK = '<|startofthink|>```JSON\n{"api_name": "weather", "parameters": {"city": "Paris"}}\n```<|endofthink|>'
EXEC = '<|startofexec|>```JSON\n{"temp": 18}\n```<|endofexec|>'


def roles(messages):
    return [m.role for m in messages]


def test_alpaca_with_input_system_and_history():
    row = {"system": "S", "history": [["q1", "r1"]], "instruction": "Do", "input": "this", "output": "done"}
    assert to_messages(row) == [Message("system", "S"), Message("user", "q1"), Message("assistant", "r1"),
                                Message("user", "Do\nthis"), Message("assistant", "done")]


def test_alpaca_empty_input_is_just_the_instruction():
    assert to_messages({"instruction": "Do", "input": "", "output": "ok"})[0] == Message("user", "Do")


def test_query_response_history_as_json_string():
    row = {"query": "q2", "response": "r2", "history": json.dumps([["q1", "r1"]])}
    assert roles(to_messages(row)) == ["user", "assistant", "user", "assistant"]


def test_sharegpt_role_spellings():
    row = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "hi"},
                             {"from": "gpt", "value": "yo"}, {"from": "user", "value": "again"},
                             {"from": "assistant", "value": "sure"}]}
    assert roles(to_messages(row)) == ["system", "user", "assistant", "user", "assistant"]


def test_msagent_value_splits_into_call_result_and_answer():
    value = f"Let me check.{THINK}\n\n{EXEC}\nIt is 18 degrees."
    messages = to_messages({"conversations": [{"from": "user", "value": "weather?"}, {"from": "assistant", "value": value}]})
    assert roles(messages) == ["user", "assistant", "tool_call", "tool", "assistant"]
    assert messages[2].content.startswith("```JSON") and messages[3].content.endswith("```")
    assert messages[4].content == "It is 18 degrees."


def test_msagent_two_calls_in_one_turn():
    parts = split_agent_text(f"{THINK}\n\n{EXEC}\n{THINK}\n\n{EXEC}\nDone.")
    assert roles(parts) == ["tool_call", "tool", "tool_call", "tool", "assistant"]


def test_unbalanced_marker_is_an_error():
    with pytest.raises(DataError, match="startofthink"):
        to_messages({"query": "q", "response": "<|startofthink|>{}"})


def test_messages_with_tool_roles_and_tools_list():
    row = {
        "tools": [{"name": "weather", "parameters": {"city": "string"}}],
        "messages": [{"role": "user", "content": "weather?"}, {"role": "tool_call", "content": {"name": "weather", "arguments": {"city": "Paris"}}},
                     {"role": "tool_response", "content": "18C"}, {"role": "assistant", "content": "18C in Paris."}],
    }
    messages = to_messages(row)
    assert roles(messages) == ["system", "user", "tool_call", "tool", "assistant"]
    assert '"name": "weather"' in messages[0].content
    assert json.loads(messages[2].content) == {"name": "weather", "arguments": {"city": "Paris"}}


def test_openai_tool_calls():
    row = {"messages": [
        {"role": "system", "content": "S"}, {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": "18C"}, {"role": "assistant", "content": "18C."}],
        "tools": [{"type": "function", "function": {"name": "weather"}}]}
    messages = to_messages(row)
    assert roles(messages) == ["system", "user", "tool_call", "tool", "assistant"]
    assert messages[0].content.startswith("S\n\nYou have access to the following tools:")
    assert json.loads(messages[2].content) == {"name": "weather", "arguments": {"city": "Paris"}}


def test_forced_schema_and_detection():
    assert detect_schema({"instruction": "i", "output": "o"}) == "alpaca"
    assert detect_schema({"query": "q", "response": "r"}) == "query_response"
    with pytest.raises(DataError, match="unknown schema"):
        to_messages({"query": "q", "response": "r"}, schema="nope")


def test_inference_conversation_may_end_with_user():
    assert roles(to_messages({"messages": [{"role": "user", "content": "hi"}]}, require_response=False)) == ["user"]


@pytest.mark.parametrize("name", ["alpaca.jsonl", "alpaca.csv", "query_response.jsonl", "sharegpt.jsonl", "msagent.jsonl", "messages_tools.jsonl"])
def test_every_bundled_format_sample_converts(name):
    rows = list(read_file(str(FORMATS / name)))
    assert rows and all(row.error is None for row in rows)
    for row in rows:
        messages = to_messages(row.data)
        assert messages[-1].role in ("assistant", "tool")


BAD = [
    (1, None, "malformed JSON"),
    (2, "output", "missing field"),
    (3, "messages[1].role", "unknown role 'wizard'"),
    (4, "messages[1].content", "does not alternate"),
    (5, "messages[1].content", "empty response"),
    (6, None, "no known schema"),
]


@pytest.mark.parametrize("line,field,message", BAD)
def test_bad_rows_name_file_line_and_field(line, field, message):
    path = str(FORMATS / "bad.jsonl")
    row = next(row for row in read_file(path) if row.line == line)
    with pytest.raises(DataError) as caught:
        if row.error is not None:
            raise row.error
        try:
            to_messages(row.data)
        except DataError as error:
            raise error.at(row.source, row.line)
    error = caught.value
    assert (error.source, error.line, error.field) == (path, line, field)
    assert message in str(error) and f"bad.jsonl:{line}" in str(error)
    if field:
        assert f"field '{field}'" in str(error)
