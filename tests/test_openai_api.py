"""The OpenAI request/reply shapes: requests render as training rows did, replies split into content and calls."""
import json

import pytest

pytest.importorskip("pydantic", reason="the deploy extra is not installed")

from sftkit.data.formats import Message, to_messages  # noqa: E402
from sftkit.data.templates import get_template  # noqa: E402
from sftkit.generation import GenerationConfig  # noqa: E402
from sftkit.metrics import ToolCall  # noqa: E402
from sftkit.serve.openai_api import (  # noqa: E402
    ChatRequest,
    CompletionRequest,
    RequestError,
    conversation,
    generation_options,
    parse_request,
    split_reply,
    streamable_end,
)

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
OPENAI_CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
CHATML = get_template("chatml")


def chat(body: dict) -> ChatRequest:
    return parse_request(ChatRequest, json.dumps({"model": "m", **body}).encode())[0]


def test_a_request_renders_as_the_training_row_with_the_same_messages():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Snow in Oslo?"},
                {"role": "assistant", "content": None, "tool_calls": [OPENAI_CALL]},
                {"role": "tool", "tool_call_id": "call_1", "content": "snow, -3 C"}]
    request = chat({"messages": messages, "tools": TOOLS})
    row = to_messages({"messages": messages + [{"role": "assistant", "content": "Yes."}], "tools": TOOLS}, "messages")
    assert conversation(request.messages, TOOLS, {}) == row[:-1]
    assert row[0] == Message("system", "Be brief.\n\nYou have access to the following tools:\n" + json.dumps(TOOLS[0]))


def test_a_call_this_server_made_comes_back_as_the_model_wrote_it():
    written = '```JSON\n{"api_name": "get_weather", "parameters": {"city": "Oslo"}}\n```'
    request = chat({"messages": [{"role": "user", "content": "Snow?"},
                                 {"role": "assistant", "content": "Checking.", "tool_calls": [OPENAI_CALL]},
                                 {"role": "tool", "content": "snow"}]})
    assert conversation(request.messages, None, {"call_1": written})[1:] == [
        Message("assistant", "Checking."), Message("tool_call", written), Message("tool", "snow")]


@pytest.mark.parametrize("messages, error", [
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "the last message is from the assistant"),
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], "tool result that follows no tool call"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "two user messages in a row"),
])
def test_conversations_that_cannot_be_rendered_are_refused(messages, error):
    with pytest.raises(RequestError, match=error) as refused:
        conversation(chat({"messages": messages}).messages, None, {})
    assert refused.value.status == 400


def test_replies_split_into_content_and_a_call():
    msagent = '```JSON\n{"api_name": "get_weather", "parameters": {"city": "Paris"}}\n```'
    weather = ToolCall("get_weather", {"city": "Paris"})
    assert split_reply(f"<|startofthink|>{msagent}<|endofthink|>", CHATML) == (None, weather, msagent)
    role_style = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert split_reply(f"Let me look.<|startofthink|>{role_style}<|endofthink|>", CHATML) == (
        "Let me look.", weather, role_style)
    broken = "<|startofthink|>{not json}<|endofthink|>"
    assert split_reply(broken, CHATML) == (broken, None, "")  # kept as written, never dropped
    assert split_reply("Just text.", CHATML) == ("Just text.", None, "")
    auto = get_template("auto")  # a tokenizer's Jinja template: a call is the whole reply
    assert split_reply(f" {role_style}\n", auto) == (None, weather, role_style)
    assert split_reply("Just text.", auto) == ("Just text.", None, "")


def test_stream_holds_back_what_may_become_a_call():
    assert streamable_end("Sure, <|startof", CHATML) == len("Sure, ")
    assert streamable_end("Sure, <|startofthink|>{", CHATML) == len("Sure, ")
    assert streamable_end("a < b", CHATML) == len("a < b")
    auto = get_template("auto")
    assert streamable_end("  ", auto) == 0 and streamable_end(' {"name"', auto) == 0
    assert streamable_end("Hello", auto) == 5


def test_sampling_options_fall_back_to_the_server_defaults():
    defaults = GenerationConfig(max_new_tokens=100, do_sample=True, temperature=0.5, top_k=7, seed=3)
    request = chat({"messages": [{"role": "user", "content": "x"}]})
    assert generation_options(request, defaults, 10, 1024, None) == defaults
    assert generation_options(request, defaults, 1000, 1024, None).max_new_tokens == 24  # what the context leaves
    greedy = generation_options(chat({"messages": [{"role": "user", "content": "x"}], "temperature": 0}), defaults, 10,
                                1024, 5)
    assert (greedy.do_sample, greedy.max_new_tokens) == (False, 5)
    custom = chat({"messages": [{"role": "user", "content": "x"}], "temperature": 1.2, "top_p": 0.5, "top_k": 0,
                   "repetition_penalty": 1.1, "seed": 9})
    assert generation_options(custom, defaults, 10, 1024, None) == GenerationConfig(
        max_new_tokens=100, do_sample=True, temperature=1.2, top_k=0, top_p=0.5, repetition_penalty=1.1, seed=9)


@pytest.mark.parametrize("prompt_tokens, max_tokens, status", [(1024, None, 413), (1000, 100, 413), (10, 0, 400)])
def test_requests_beyond_the_context_or_with_bad_values_are_refused(prompt_tokens, max_tokens, status):
    request = chat({"messages": [{"role": "user", "content": "x"}]})
    with pytest.raises(RequestError) as refused:
        generation_options(request, GenerationConfig(), prompt_tokens, 1024, max_tokens)
    assert refused.value.status == status


def test_bad_bodies_name_every_bad_field():
    with pytest.raises(RequestError) as refused:
        parse_request(ChatRequest, b'{"model": 3, "messages": "hi", "max_tokens": "10", "colour": "red"}')
    assert refused.value.status == 400
    for field in ("model", "messages", "max_tokens", "colour"):
        assert field in refused.value.message
    with pytest.raises(RequestError, match="not valid JSON"):
        parse_request(ChatRequest, b"{")
    with pytest.raises(RequestError, match="JSON object"):
        parse_request(ChatRequest, b"[]")


def test_openai_fields_are_accepted_only_where_they_change_nothing():
    neutral = {"n": 1, "presence_penalty": 0.0, "frequency_penalty": 0, "logprobs": False, "user": "me",
               "refusal": None, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}], "audio": None}]}
    assert chat(neutral).messages[0].content[0].text == "hi"
    for field, value in (("n", 2), ("presence_penalty", 0.5), ("logprobs", True), ("response_format", {"type": "json_object"})):
        with pytest.raises(RequestError, match=field):
            chat({**neutral, field: value})
    with pytest.raises(RequestError, match="echo"):
        parse_request(CompletionRequest, b'{"model": "m", "prompt": "x", "echo": true}')
