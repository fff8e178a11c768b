"""to_messages(): every supported raw row schema -> one canonical conversation (a list of Message).

Canonical roles: system, user, assistant, tool_call (the assistant calling a tool: trains) and
tool (the tool's result: never trains). A response is the run of assistant/tool_call/tool messages
between two user messages.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace

from .errors import DataError

SCHEMAS = ("alpaca", "query_response", "sharegpt", "messages")
RESPONSE_ROLES = ("assistant", "tool_call", "tool")
IMAGE_TAG = "<image>"  # where an image goes in a message's text (ms-swift's tag)

# Raw role spellings of each schema -> canonical role.
_ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "tool_call": "tool_call",
    "function_call": "tool_call",
    "tool": "tool",
    "tool_response": "tool",
    "observation": "tool",
    "function": "tool",
}

_AGENT_SPANS = re.compile(r"<\|startofthink\|>(.*?)<\|endofthink\|>|<\|startofexec\|>(.*?)<\|endofexec\|>", re.S)
_AGENT_MARKERS = ("<|startofthink|>", "<|endofthink|>", "<|startofexec|>", "<|endofexec|>")


@dataclass(frozen=True)
class Message:
    """One turn; `images` are the references (path, URL or base64) of the <image> tags in `content`, in order."""

    role: str
    content: str
    images: tuple[str, ...] = ()


def detect_schema(record: dict) -> str:
    """Name the schema of a raw row from its keys; DataError when none fits."""
    if not isinstance(record, dict):
        raise DataError(f"a row must be a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record:
        return "alpaca"
    if "query" in record or "response" in record:
        return "query_response"
    keys = ", ".join(sorted(map(str, record))) or "none"
    raise DataError(
        f"no known schema: expected 'messages', 'conversations', 'instruction'/'output' or 'query'/'response'; got keys: {keys}"
    )


def to_messages(record: dict, schema: str | None = None, *, require_response: bool = True) -> list[Message]:
    """Convert one raw row into a validated canonical conversation.

    `schema` forces one of SCHEMAS instead of detecting it; `require_response=False` accepts a
    conversation that ends with the user's turn (for inference).
    """
    schema = schema or detect_schema(record)
    if schema not in _CONVERTERS:
        raise DataError(f"unknown schema '{schema}', expected one of {', '.join(SCHEMAS)}")
    located = _with_images(_CONVERTERS[schema](record), record)
    validate(located, require_response=require_response)
    return [message for message, _ in located]


def validate(located: list[tuple[Message, str]], *, require_response: bool = True) -> None:
    """Check the conversation shape: [system] then user / response rounds, no empty answers."""
    if not located:
        raise DataError("the conversation is empty")
    previous = None
    for index, (message, field) in enumerate(located):
        role = message.role
        if role == "system" and index != 0:
            raise DataError("a system message may only come first", field=field)
        if role == "user" and previous == "user":
            raise DataError("two user messages in a row: the conversation does not alternate", field=field)
        if role in RESPONSE_ROLES and previous in (None, "system"):
            raise DataError(f"a '{role}' message where a user message was expected", field=field)
        if role == "assistant" and previous == "assistant":
            raise DataError("two assistant messages in a row: the conversation does not alternate", field=field)
        if role == "tool" and previous not in ("tool_call", "tool"):
            raise DataError("a tool result that follows no tool call", field=field)
        if role in ("assistant", "tool_call") and not message.content.strip():
            raise DataError("empty response", field=field)
        previous = role
    if require_response and previous in ("system", "user"):
        raise DataError("the conversation has no response to learn from", field=located[-1][1])


def split_agent_text(text: str) -> list[Message]:
    """Split an MSAgent assistant value into assistant text, tool calls (think) and results (exec).

    Whitespace between markers is template glue, not content: the template re-inserts it.
    """
    parts: list[Message] = []
    position = 0
    for match in _AGENT_SPANS.finditer(text):
        _append_text(parts, text[position:match.start()])
        if match.group(1) is not None:
            parts.append(Message("tool_call", match.group(1)))
        else:
            parts.append(Message("tool", match.group(2)))
        position = match.end()
    _append_text(parts, text[position:])
    leftover = [m for m in _AGENT_MARKERS if any(p.role == "assistant" and m in p.content for p in parts)]
    if leftover:
        raise ValueError(f"unbalanced agent marker {leftover[0]}")
    return parts


def _append_text(parts: list[Message], text: str) -> None:
    if parts and parts[-1].role == "tool":
        text = text.lstrip()
    if text.strip():
        parts.append(Message("assistant", text))


def _response(text, field: str) -> list[tuple[Message, str]]:
    content = _text(text, field)
    try:
        return [(message, field) for message in split_agent_text(content)] or [(Message("assistant", ""), field)]
    except ValueError as error:
        raise DataError(str(error), field=field) from None


def _text(value, field: str) -> str:
    if value is None:
        raise DataError("missing value", field=field)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, list) and all(isinstance(part, dict) for part in value):
        if any(part.get("type") != "text" for part in value):
            raise DataError("only text content parts are allowed here (images go in user messages)", field=field)
        return "".join(part.get("text", "") for part in value)
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__}", field=field)
    return value


def _required(record: dict, key: str):
    if key not in record:
        raise DataError("missing field", field=key)
    return record[key]


def _history(record: dict) -> list[tuple[Message, str]]:
    history = record.get("history") or []
    if isinstance(history, str):
        try:
            history = json.loads(history)
        except json.JSONDecodeError as error:
            raise DataError(f"history is not valid JSON: {error.msg}", field="history") from None
    if not isinstance(history, list):
        raise DataError("history must be a list of [query, response] pairs", field="history")
    located = []
    for index, pair in enumerate(history):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise DataError("each history item must be a [query, response] pair", field=f"history[{index}]")
        located.append((Message("user", _text(pair[0], f"history[{index}][0]")), f"history[{index}][0]"))
        located += _response(pair[1], f"history[{index}][1]")
    return located


def _system(record: dict) -> list[tuple[Message, str]]:
    system = record.get("system")
    return [(Message("system", _text(system, "system")), "system")] if system else []


def _from_alpaca(record: dict) -> list[tuple[Message, str]]:
    instruction = _text(_required(record, "instruction"), "instruction")
    extra = _text(record.get("input") or "", "input")
    query = f"{instruction}\n{extra}" if extra.strip() else instruction
    return _system(record) + _history(record) + [(Message("user", query), "instruction")] + _response(_required(record, "output"), "output")


def _from_query_response(record: dict) -> list[tuple[Message, str]]:
    query = _text(_required(record, "query"), "query")
    return _system(record) + _history(record) + [(Message("user", query), "query")] + _response(_required(record, "response"), "response")


def _from_sharegpt(record: dict) -> list[tuple[Message, str]]:
    turns = record["conversations"]
    if not isinstance(turns, list):
        raise DataError("must be a list of {from, value} objects", field="conversations")
    located = _system(record)
    for index, turn in enumerate(turns):
        field = f"conversations[{index}]"
        if not isinstance(turn, dict):
            raise DataError("must be a {from, value} object", field=field)
        role = _role(turn.get("from", turn.get("role")), f"{field}.from")
        value = turn.get("value", turn.get("content"))
        located += _located_message(role, value, f"{field}.value")
    return located


def _from_messages(record: dict) -> list[tuple[Message, str]]:
    turns = record["messages"]
    if not isinstance(turns, list):
        raise DataError("must be a list of {role, content} objects", field="messages")
    located = []
    for index, turn in enumerate(turns):
        field = f"messages[{index}]"
        if not isinstance(turn, dict):
            raise DataError("must be a {role, content} object", field=field)
        role = _role(turn.get("role"), f"{field}.role")
        calls = turn.get("tool_calls") or []
        if role == "assistant" and calls:
            if turn.get("content"):
                located += _located_message("assistant", turn["content"], f"{field}.content")
            located += [(Message("tool_call", _openai_call(call, f"{field}.tool_calls[{k}]")), f"{field}.tool_calls[{k}]") for k, call in enumerate(calls)]
            continue
        located += _located_message(role, turn.get("content"), f"{field}.content")
    tools = record.get("tools")
    if tools:
        located = _with_tools(located, tools)
    return located


def _located_message(role: str, value, field: str) -> list[tuple[Message, str]]:
    if role == "assistant":
        return _response(value, field)
    if role == "tool_call" and isinstance(value, (dict, list)):
        return [(Message(role, json.dumps(value, ensure_ascii=False)), field)]
    if role == "user":
        return [(Message(role, *_content(value, field)), field)]
    return [(Message(role, _text(value, field)), field)]


def _content(value, field: str) -> tuple[str, tuple[str, ...]]:
    """A user message's text and images: a string, or OpenAI content parts whose images become <image> tags."""
    if not isinstance(value, list):
        return _text(value, field), ()
    text, images = "", []
    for index, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text += _text(part.get("text", ""), f"{field}[{index}].text")
        elif kind in ("image_url", "image"):
            reference = part.get(kind)
            reference = reference.get("url") if isinstance(reference, dict) else reference
            if not isinstance(reference, str) or not reference:
                raise DataError("an image part needs a URL, path or data URL", field=f"{field}[{index}].{kind}")
            text += IMAGE_TAG
            images.append(reference)
        else:
            raise DataError(f"unsupported content part type {kind!r}: expected text or image_url", field=f"{field}[{index}]")
    return text, tuple(images)


def _with_images(located: list[tuple[Message, str]], record: dict) -> list[tuple[Message, str]]:
    """Give the user messages the row's `images` (ms-swift's list) in the order of their <image> tags.

    A row with images but no tags gets them before its first query, as ms-swift does; in a row without
    images a tag is plain text.
    """
    listed = _listed_images(record)
    if not listed and not any(message.images for message, _ in located):
        return located
    for message, field in located:
        if message.role != "user" and IMAGE_TAG in message.content:
            raise DataError(f"an {IMAGE_TAG} tag in a {message.role} message: images go in user messages", field=field)
    free = [message.content.count(IMAGE_TAG) - len(message.images) for message, _ in located]
    users = [index for index, (message, _) in enumerate(located) if message.role == "user"]
    if listed and not any(free) and users:
        message, field = located[users[0]]
        first = replace(message, content=IMAGE_TAG * len(listed) + message.content, images=tuple(listed) + message.images)
        return located[:users[0]] + [(first, field)] + located[users[0] + 1:]
    if sum(free) != len(listed):
        raise DataError(f"{sum(free)} {IMAGE_TAG} tag(s) for {len(listed)} image(s): give one image per tag", field="images")
    result, rest = [], listed
    for (message, field), count in zip(located, free):
        if count and message.images:
            raise DataError(f"{IMAGE_TAG} tags in the text of a message that also has image parts", field=field)
        if count:
            message, rest = replace(message, images=tuple(rest[:count])), rest[count:]
        result.append((message, field))
    return result


def _listed_images(record: dict) -> list[str]:
    images = record.get("images")
    if images is None or images == []:
        return []
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(image, str) and image for image in images):
        raise DataError("must be a list of image paths, URLs or base64 strings", field="images")
    return list(images)


def _role(raw, field: str) -> str:
    if raw is None:
        raise DataError("missing role", field=field)
    role = _ROLE_ALIASES.get(str(raw).lower())
    if role is None:
        known = ", ".join(sorted(_ROLE_ALIASES))
        raise DataError(f"unknown role '{raw}' (known: {known})", field=field)
    return role


def _openai_call(call, field: str) -> str:
    """An OpenAI tool_calls entry -> the JSON text of {"name", "arguments"} that the model learns to write."""
    function = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(function, dict) or "name" not in function:
        raise DataError("a tool call needs function.name", field=field)
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as error:
            raise DataError(f"arguments are not valid JSON: {error.msg}", field=f"{field}.function.arguments") from None
    return json.dumps({"name": function["name"], "arguments": arguments}, ensure_ascii=False)


def tools_text(tools) -> str:
    """The system-prompt text that tells the model which tools exist (one JSON spec per line)."""
    specs = tools if isinstance(tools, list) else [tools]
    lines = [spec if isinstance(spec, str) else json.dumps(spec, ensure_ascii=False) for spec in specs]
    return "You have access to the following tools:\n" + "\n".join(lines)


def _with_tools(located: list[tuple[Message, str]], tools) -> list[tuple[Message, str]]:
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as error:
            raise DataError(f"tools is not valid JSON: {error.msg}", field="tools") from None
    text = tools_text(tools)
    if located and located[0][0].role == "system":
        system, field = located[0]
        return [(Message("system", f"{system.content}\n\n{text}"), field)] + located[1:]
    return [(Message("system", text), "tools")] + located


_CONVERTERS = {
    "alpaca": _from_alpaca,
    "query_response": _from_query_response,
    "sharegpt": _from_sharegpt,
    "messages": _from_messages,
}
