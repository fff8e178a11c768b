"""The HTTP side of `sftkit deploy`: OpenAI routes over a generation backend, the API key, JSON errors, SSE.

A backend is anything with listen(EngineRequest) -> async events, stats(), start() and stop(): the
built-in engine (engine.Engine) or vLLM (vllm_backend.VllmBackend). Every refusal is an OpenAI-style
JSON error; an unexpected failure is a JSON 500 whose traceback goes to the server's log only.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..prompts import prompt_inputs
from ..data.templates import Template
from ..generation import GenerationConfig, stop_criteria
from .engine import EngineRequest, Event, QueueFull
from .openai_api import (
    ChatRequest,
    CompletionRequest,
    RequestError,
    chat_chunk,
    chat_completion,
    completion,
    conversation,
    error_body,
    generation_options,
    parse_request,
    split_reply,
    stop_list,
    streamable_end,
    tool_call_json,
    tool_call_markers,
    usage,
)

log = logging.getLogger("sftkit.serve")
REMEMBERED_CALLS = 10_000
CLIENT_GONE = 499  # nginx's status for a client that closed the connection first; nobody reads it


@dataclass(frozen=True)
class ServedModel:
    """A name clients ask for: the adapter it runs (None: the base), how its prompts are rendered, and the guide that
    constrains its tool calls (constrained.ToolCallGuide; None: calls are free)."""

    name: str
    adapter: str | None
    template: Template
    system: str | None
    guide: object = None


class CallMemory:
    """The payloads of recent tool calls by id, so a call sent back in the history renders as the model wrote it."""

    def __init__(self, size: int = REMEMBERED_CALLS):
        self.size, self._payloads = size, OrderedDict()

    def remember(self, call_id: str, payload: str) -> None:
        self._payloads[call_id] = payload
        while len(self._payloads) > self.size:
            self._payloads.popitem(last=False)

    def get(self, call_id: str, default=None):
        return self._payloads.get(call_id, default)


@dataclass
class Service:
    """Everything the routes need: the backend, the tokenizer, the served names and the request defaults."""

    backend: Any
    tokenizer: Any
    models: dict[str, ServedModel]
    context: int
    defaults: GenerationConfig
    vocab_size: int
    api_key: str | None = None
    tools_prompt: str = "sftkit"
    processor: Any = None  # a vision-language model's (vlm processor), which makes a prompt's image inputs
    calls: CallMemory = field(default_factory=CallMemory)
    renderer: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="sftkit-prompts"))
    created: int = field(default_factory=lambda: int(time.time()))


def create_app(service: Service) -> Starlette:
    """The ASGI app; its lifespan starts the backend and stops it after the last request has finished."""

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        service.backend.start()
        try:
            yield
        finally:
            service.backend.stop()

    async def health(_request: Request) -> Response:
        return JSONResponse({"status": "ok", "models": list(service.models), **service.backend.stats()})

    async def models(request: Request) -> Response:
        _authorize(service, request)
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": service.created, "owned_by": "sftkit"} for name in service.models]})

    async def chat(request: Request) -> Response:
        return await chat_completions(service, request)

    async def complete(request: Request) -> Response:
        return await completions(service, request)

    async def refused(_request: Request, error: RequestError) -> Response:
        return JSONResponse(error_body(error.status, error.message, error.param, error.code), status_code=error.status)

    async def http_error(request: Request, error: HTTPException) -> Response:
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return JSONResponse(error_body(error.status_code, message.get(error.status_code, str(error.detail))),
                            status_code=error.status_code)

    async def failed(_request: Request, error: Exception) -> Response:
        log.error("request failed", exc_info=error)
        return JSONResponse(error_body(500, f"internal error: {type(error).__name__}: {error}"), status_code=500)

    return Starlette(
        routes=[Route("/health", health, methods=["GET"]), Route("/v1/models", models, methods=["GET"]),
                Route("/v1/chat/completions", chat, methods=["POST"]),
                Route("/v1/completions", complete, methods=["POST"])],
        exception_handlers={RequestError: refused, HTTPException: http_error, Exception: failed},
        lifespan=lifespan,
    )


async def chat_completions(service: Service, request: Request) -> Response:
    """POST /v1/chat/completions: one conversation, its reply whole or streamed."""
    _authorize(service, request)
    body, data = parse_request(ChatRequest, await request.body())
    served = _served(service, body.model)
    # Off the event loop (images are downloaded and made into pixels here), one prompt at a time as before.
    engine_request = await asyncio.get_running_loop().run_in_executor(service.renderer, _chat_request, service, served,
                                                                       body, data)
    [listener] = _listen(service, [engine_request])
    reply = ChatReply(service, served, body, len(engine_request.prompt_ids))
    if body.stream:
        return StreamingResponse(reply.stream(listener), media_type="text/event-stream")
    results = await _collect([listener], request)
    if results is None:
        return Response(status_code=CLIENT_GONE)
    [(text, final)] = results
    return JSONResponse(reply.whole(text, final))

async def completions(service: Service, request: Request) -> Response:
    """POST /v1/completions: one or more prompts (text or token ids) continued."""
    _authorize(service, request)
    body, _ = parse_request(CompletionRequest, await request.body())
    served = _served(service, body.model)
    prompts = _completion_prompts(service, body.prompt)
    if body.stream and len(prompts) != 1:
        raise RequestError(400, "a streamed completion takes one prompt", param="prompt")
    stops = stop_list(body.stop)
    engine_requests = [EngineRequest(tuple(prompt), generation_options(body, service.defaults, len(prompt),
                                                                       service.context, body.max_tokens),
                                     stops, adapter=served.adapter) for prompt in prompts]
    listeners = _listen(service, engine_requests)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    prompt_tokens = sum(map(len, prompts))
    if body.stream:
        return StreamingResponse(_completion_stream(listeners[0], request_id, body, prompt_tokens),
                                 media_type="text/event-stream")
    results = await _collect(listeners, request)
    if results is None:
        return Response(status_code=CLIENT_GONE)
    return JSONResponse(completion(request_id, body.model, [(text, final.finish_reason) for text, final in results],
                                   usage(prompt_tokens, sum(final.completion_tokens for _, final in results))))


class ChatReply:
    """Turns one chat request's events into a chat.completion, or into its stream of chunks."""

    def __init__(self, service: Service, served: ServedModel, body: ChatRequest, prompt_tokens: int):
        self.service, self.served, self.body, self.prompt_tokens = service, served, body, prompt_tokens
        self.id = f"chatcmpl-{uuid.uuid4().hex}"

    def parts(self, text: str, final: Event) -> tuple[str | None, list[dict], str]:
        """(content, tool_calls, finish_reason); a parsed call is remembered for when it comes back."""
        if not self.body.calls_tools:
            return text, [], final.finish_reason
        content, call, payload = split_reply(text, self.served.template)
        if call is None:
            return content, [], final.finish_reason
        call_id = f"call_{uuid.uuid4().hex[:24]}"
        self.service.calls.remember(call_id, payload)
        return content, [tool_call_json(call_id, call)], "tool_calls"

    def whole(self, text: str, final: Event) -> dict:
        content, calls, finish_reason = self.parts(text, final)
        return chat_completion(self.id, self.body.model, content, calls, finish_reason,
                               usage(self.prompt_tokens, final.completion_tokens))

    async def stream(self, listener):
        """Content as it becomes safe to show (held back while it may still turn into a tool call), then the call."""
        model, sent, text = self.body.model, 0, ""
        try:
            yield _sse(chat_chunk(self.id, model, {"role": "assistant", "content": ""}))
            async for event in listener:
                if event.error:
                    yield _sse(error_body(500, event.error))
                    return
                text += event.text
                if event.final:
                    break
                end = streamable_end(text, self.served.template) if self.body.calls_tools else len(text)
                if end > sent:
                    yield _sse(chat_chunk(self.id, model, {"content": text[sent:end]}))
                    sent = end
            content, calls, finish_reason = self.parts(text, event)
            if content and len(content) > sent:
                yield _sse(chat_chunk(self.id, model, {"content": content[sent:]}))
            if calls:
                yield _sse(chat_chunk(self.id, model, {"tool_calls": [{"index": 0, **calls[0]}]}))
            counts = usage(self.prompt_tokens, event.completion_tokens)
            yield _sse(chat_chunk(self.id, model, {}, finish_reason, counts))
            if self.body.stream_options and self.body.stream_options.include_usage:
                yield _sse({**chat_chunk(self.id, model, {}), "choices": [], "usage": counts})
            yield "data: [DONE]\n\n"
        finally:
            listener.close()


async def _completion_stream(listener, request_id: str, body: CompletionRequest, prompt_tokens: int):
    try:
        async for event in listener:
            if event.error:
                yield _sse(error_body(500, event.error))
                return
            counts = usage(prompt_tokens, event.completion_tokens) if event.final else None
            if event.text or event.final:
                yield _sse(completion(request_id, body.model, [(event.text, event.finish_reason)], counts))
        if body.stream_options and body.stream_options.include_usage:
            yield _sse({**completion(request_id, body.model, [], None), "usage": counts})
        yield "data: [DONE]\n\n"
    finally:
        listener.close()


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _authorize(service: Service, request: Request) -> None:
    if service.api_key is None:
        return
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key:
        raise RequestError(401, "missing API key: send the header 'Authorization: Bearer <key>'", code="invalid_api_key")
    if not hmac.compare_digest(key.strip().encode(), service.api_key.encode()):
        raise RequestError(401, "invalid API key", code="invalid_api_key")


def _served(service: Service, name: str) -> ServedModel:
    if name not in service.models:
        raise RequestError(404, f"model {name!r} is not served here; served: {', '.join(service.models)}",
                           param="model", code="model_not_found")
    return service.models[name]


def _chat_request(service: Service, served: ServedModel, body: ChatRequest, data: dict) -> EngineRequest:
    """The chat as the engine takes it: rendered as training rendered it, ending at the template's end of turn
    (or, when tools may be called, at the end of a call) or at the request's own stops."""
    tools = data.get("tools") if body.calls_tools and service.tools_prompt == "sftkit" else None
    messages = conversation(body.messages, tools, service.calls)
    try:
        prompt, images = prompt_inputs(messages, service.tokenizer, served.template, served.system, service.processor)
    except ValueError as error:  # DataError too: an image that does not open, or images for a text model
        raise RequestError(400, f"cannot render the conversation: {error}", param="messages") from None
    stop_strings, stop_ids = stop_criteria(service.tokenizer, served.template)
    closer = tool_call_markers(served.template)[1] if body.calls_tools else ""
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    config = generation_options(body, service.defaults, len(prompt), service.context, max_tokens)
    constraint = served.guide.for_conversations([messages], served.system) if served.guide and body.calls_tools else None
    return EngineRequest(tuple(prompt), config, stop_strings + stop_list(body.stop), stop_ids,
                         (closer,) if closer else (), served.adapter, constraint, images)


def _completion_prompts(service: Service, prompt: str | list) -> list[list[int]]:
    """Token ids of each prompt: text is tokenized as the tokenizer does by default (BOS included if it adds one)."""
    if isinstance(prompt, list) and all(isinstance(item, int) for item in prompt) and prompt:
        outside = [token for token in prompt if not 0 <= token < service.vocab_size]
        if outside:
            raise RequestError(400, f"token ids outside the vocabulary (size {service.vocab_size}): {outside[:5]}",
                               param="prompt")
        return [prompt]
    texts = [prompt] if isinstance(prompt, str) else prompt
    prompts = [service.tokenizer(text)["input_ids"] for text in texts]
    if not prompts or any(not ids for ids in prompts):
        raise RequestError(400, "the prompt is empty", param="prompt")
    return prompts


def _listen(service: Service, requests: list[EngineRequest]) -> list:
    """Submit every request or none: a full queue is a 429 before any reply starts."""
    listeners = []
    try:
        for engine_request in requests:
            listeners.append(service.backend.listen(engine_request))
    except QueueFull as error:
        for listener in listeners:
            listener.close()
        raise RequestError(429, f"too many requests waiting: {error}", code="rate_limit_exceeded") from None
    return listeners


async def _collect(listeners: list, request: Request) -> list[tuple[str, Event]] | None:
    """Each listener's whole text and final event; None when the client left first (its generation is cancelled)."""

    async def read(listener) -> tuple[str, Event]:
        text = ""
        async for event in listener:
            text += event.text
            if event.final:
                return text, event

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    reading = asyncio.ensure_future(asyncio.gather(*(read(listener) for listener in listeners)))
    leaving = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({reading, leaving}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        leaving.cancel()
        for listener in listeners:
            listener.close()
    if not reading.done():
        reading.cancel()
        return None
    results = reading.result()
    failed = [final.error for _, final in results if final.error]
    if failed:
        raise RequestError(500, failed[0], code="generation_failed")
    return results
