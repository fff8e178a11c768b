"""The OpenAI API's shapes: request bodies checked into plain values, replies built from generated text.

No HTTP here. Requests are validated strictly (a wrong type or an unknown field is a 400 naming it;
an OpenAI field we do not implement is accepted only at its neutral value), conversations go through
the data pipeline's own converter, so a request renders exactly as a training row with the same
messages and tools did.
"""
from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..data.errors import DataError
from ..data.images import DATA_URL, URL_PREFIXES
from ..data.formats import Message, to_messages
from ..data.templates import Template
from ..generation import GenerationConfig, visible_end
from ..metrics import ToolCall, parse_call_payload

# OpenAI fields this server does not implement, and the values that mean "off".
NEUTRAL = {"n": 1, "best_of": 1, "presence_penalty": 0, "frequency_penalty": 0, "logprobs": False, "top_logprobs": 0,
           "echo": False, "suffix": ""}
STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error"}


class RequestError(Exception):
    """A request the server refuses, with its HTTP status and the OpenAI error fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": STATUS_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


# --- request bodies ------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    """No type coercion and no unknown fields; an unknown field sent as null is the same as not sent."""

    model_config = ConfigDict(strict=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _drop_unknown_nulls(cls, data):
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None or key in cls.model_fields}
        return data


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted; the processor decides the resolution

    @field_validator("url")
    @classmethod
    def _sent_not_local(cls, url: str) -> str:
        """A data URL or an http(s) URL: a client must not make the server open its own files."""
        if not (DATA_URL.match(url) or url.startswith(URL_PREFIXES)):
            raise ValueError("an image is sent as a data URL (data:image/png;base64,...) or an http(s) URL")
        return url


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class FunctionCall(_Strict):
    name: str
    arguments: str


class ToolCallParam(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    """One message; `name` and `tool_call_id` are accepted, but templates have no place for them (a tool
    result answers the call before it)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallParam] | None = None
    tool_call_id: str | None = None


class FunctionSpec(BaseModel):
    """A tool's function; its description and JSON schema go to the model as sent, so extra keys are kept."""

    model_config = ConfigDict(strict=True, extra="allow")
    name: str
    description: str | None = None
    parameters: dict | None = None


class ToolSpec(_Strict):
    type: Literal["function"]
    function: FunctionSpec


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """The fields both endpoints share. top_k and repetition_penalty are extensions (send them in extra_body)."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    user: str | None = None
    # OpenAI fields this server does not implement: accepted at their neutral value only.
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | int | None = None

    @model_validator(mode="after")
    def _neutral(self):
        unsupported = [f"{name}={value!r}" for name, value in self._neutral_values().items()
                       if value is not None and value != NEUTRAL[name]]
        if unsupported:
            raise ValueError(f"not supported by this server: {', '.join(unsupported)} (n and best_of must be 1, "
                             "logprobs and echo off; for repetition use repetition_penalty)")
        return self

    def _neutral_values(self) -> dict:
        return {"n": self.n, "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
                "logprobs": self.logprobs}


class ChatRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["none", "auto"] | None = None
    parallel_tool_calls: bool | None = None
    top_logprobs: int | None = None
    response_format: dict | None = None

    @model_validator(mode="after")
    def _checks(self):
        if not self.messages:
            raise ValueError("messages must not be empty")
        if self.response_format not in (None, {"type": "text"}):
            raise ValueError("response_format: only {'type': 'text'} is supported")
        return self

    def _neutral_values(self) -> dict:
        return {**super()._neutral_values(), "top_logprobs": self.top_logprobs}

    @property
    def calls_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None

    def _neutral_values(self) -> dict:
        return {**super()._neutral_values(), "echo": self.echo, "best_of": self.best_of, "suffix": self.suffix}


def parse_request(model: type[_Strict], body: bytes) -> tuple[Any, dict]:
    """(the validated request, the JSON object as sent); RequestError 400 naming every bad field."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RequestError(400, f"the body is not valid JSON: {error}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise RequestError(400, f"the body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    try:
        return model.model_validate(data), data
    except ValidationError as error:
        problems = [(".".join(map(str, item["loc"])) + ": " if item["loc"] else "") + item["msg"].removeprefix("Value error, ")
                    for item in error.errors()]
        first = ".".join(map(str, error.errors()[0]["loc"])) or None
        raise RequestError(400, "; ".join(problems), param=first, code="invalid_request") from None


# --- conversations and generation options -------------------------------------------------------------------


def conversation(messages: list[ChatMessage], tools: list | None, known_calls: Mapping[str, str]) -> list[Message]:
    """The request's messages as the canonical conversation training used, ending where the model answers.

    A tool call this server generated comes back under its id and is rendered as the model wrote it
    (known_calls: id -> payload); any other is rendered from its name and arguments, as training rows
    with tool_calls are.
    """
    rows = []
    for message in messages:
        role = "system" if message.role == "developer" else message.role
        content = _content(message.content)
        if role != "assistant" or not message.tool_calls:
            rows.append({"role": role, "content": content})
            continue
        if content:
            rows.append({"role": "assistant", "content": content})
        for call in message.tool_calls:
            known = known_calls.get(call.id)
            rows.append({"role": "tool_call", "content": known} if known is not None
                        else {"role": "assistant", "tool_calls": [call.model_dump()]})
    record = {"messages": rows, **({"tools": tools} if tools else {})}
    try:
        canonical = to_messages(record, "messages", require_response=False)
    except DataError as error:
        raise RequestError(400, str(error), param="messages") from None
    if canonical[-1].role not in ("user", "tool"):
        raise RequestError(400, f"the last message is from the {messages[-1].role}: the model answers a user or tool "
                                "message", param="messages")
    return canonical


def _content(content: str | list[ContentPart] | None) -> str | list[dict]:
    """A message's text, or its parts in the OpenAI shape when it has images (to_messages reads those)."""
    if content is None or isinstance(content, str):
        return content or ""
    if any(part.type == "image_url" for part in content):
        return [part.model_dump(exclude_none=True) for part in content]
    return "".join(part.text for part in content)


def stop_list(stop: str | list[str] | None) -> tuple[str, ...]:
    words = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if any(not word for word in words):
        raise RequestError(400, "stop sequences must not be empty", param="stop")
    return words


def generation_options(request: _Sampling, defaults: GenerationConfig, prompt_tokens: int, context: int,
                       max_tokens: int | None) -> GenerationConfig:
    """The request's sampling over the server's defaults; temperature 0 is greedy. RequestError when it cannot run.

    Without max_tokens the reply may use the server's default or what is left of the context.
    """
    if prompt_tokens >= context:
        raise RequestError(413, f"the prompt has {prompt_tokens} tokens; this model's context is {context} tokens",
                           param="messages", code="context_length_exceeded")
    if max_tokens is not None and prompt_tokens + max_tokens > context:
        raise RequestError(413, f"the prompt has {prompt_tokens} tokens and max_tokens asks for {max_tokens} more; "
                                f"this model's context is {context} tokens", param="max_tokens",
                           code="context_length_exceeded")
    temperature = request.temperature
    if temperature is not None and temperature < 0:
        raise RequestError(400, f"temperature must be >= 0, got {temperature}", param="temperature")
    choices = {
        "max_new_tokens": max_tokens if max_tokens is not None else min(defaults.max_new_tokens, context - prompt_tokens),
        "do_sample": defaults.do_sample if temperature is None else temperature > 0,
        "temperature": temperature if temperature else defaults.temperature,
        "top_k": defaults.top_k if request.top_k is None else request.top_k,
        "top_p": defaults.top_p if request.top_p is None else request.top_p,
        "repetition_penalty": defaults.repetition_penalty if request.repetition_penalty is None else request.repetition_penalty,
        "seed": defaults.seed if request.seed is None else request.seed,
    }
    try:
        return GenerationConfig(**choices)
    except ValueError as error:
        raise RequestError(400, str(error).replace("max_new_tokens", "max_tokens")) from None


# --- replies -------------------------------------------------------------------------------------------------


def tool_call_markers(template: Template) -> tuple[str, str]:
    """(opener, closer) of a tool call in this template's text; empty for a tokenizer (Jinja) template,
    where a call is the whole reply."""
    if template.use_tokenizer_template:
        return "", ""
    opener, _, closer = template.tool_call.partition("{{CONTENT}}")
    return opener, closer


def split_reply(text: str, template: Template) -> tuple[str | None, ToolCall | None, str]:
    """(content, tool call, its payload as written) of a reply to a request with tools.

    A call that does not parse stays in the content as the model wrote it, so nothing is lost.
    """
    opener, closer = tool_call_markers(template)
    if not opener:
        call = parse_call_payload(text)
        return (None, call, text.strip()) if call else (text, None, "")
    start = text.find(opener)
    if start < 0:
        return text, None, ""
    payload, closed, _ = text[start + len(opener):].partition(closer)
    call = parse_call_payload(payload) if closed else None
    if call is None:
        return text, None, ""
    return text[:start].strip() or None, call, payload


def streamable_end(text: str, template: Template) -> int:
    """How much of a reply to a request with tools can be streamed as content: not what may become a call."""
    opener, _ = tool_call_markers(template)
    if not opener:
        stripped = text.lstrip()
        return 0 if not stripped or stripped.startswith(("{", "`")) else len(text)
    return visible_end(text, (opener,))[0]


def tool_call_json(call_id: str, call: ToolCall, index: int | None = None) -> dict:
    entry = {"id": call_id, "type": "function",
             "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}}
    return entry if index is None else {"index": index, **entry}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(request_id: str, model: str, content: str | None, tool_calls: list[dict], finish_reason: str,
                    usage_counts: dict) -> dict:
    message = {"role": "assistant", "content": content, **({"tool_calls": tool_calls} if tool_calls else {})}
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage_counts}


def chat_chunk(request_id: str, model: str, delta: dict, finish_reason: str | None = None,
               usage_counts: dict | None = None) -> dict:
    chunk = {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
    return {**chunk, "usage": usage_counts} if usage_counts else chunk


def completion(request_id: str, model: str, choices: list[tuple[str, str | None]], usage_counts: dict | None) -> dict:
    """A text_completion body (or streamed chunk): (text, finish_reason) per prompt."""
    body = {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "text": text, "finish_reason": reason, "logprobs": None}
                        for index, (text, reason) in enumerate(choices)]}
    return {**body, "usage": usage_counts} if usage_counts else body
