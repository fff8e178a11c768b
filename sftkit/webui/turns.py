"""One chat turn for the page, streamed: the REPL's loop (sftkit chat) with the page's message box as its input.

Prompts, stops and replies come from the library exactly as `sftkit chat` builds them, so the page and the
terminal answer alike. In agent mode a reply that closes a tool call waits: the next message is that tool's result.
"""
from __future__ import annotations

from typing import Iterator

from ..data.formats import Message
from ..data.templates import get_template
from ..generation import GenerationConfig, generate_stream, stop_criteria
from ..prompts import prompt_ids, reply_messages, tool_call_end


def stream_turn(model, tokenizer, template, system: str | None, history: list[Message], text: str,
                gen_config: GenerationConfig, *, agent: bool = False, tool_result: bool = False,
                guide=None) -> Iterator[tuple[list[Message], bool]]:
    """Yield (conversation so far, waiting for a tool result) as the reply grows; the last yield is the whole turn.

    `text` is the user's message, or, with tool_result, the result of the tool the model called last. A
    ToolCallGuide (sftkit.constrained) restricts calls to the tools the system prompt offers, as `sftkit chat` does.
    """
    template = get_template(template)
    stop_strings, stop_ids = stop_criteria(tokenizer, template)
    call_end = tool_call_end(template) if agent else ""
    conversation = history + [Message("tool" if tool_result else "user", text)]
    ids = prompt_ids(conversation, tokenizer, template, system)
    constraint = guide.for_conversations([conversation], system) if guide and agent else None
    reply = ""
    for piece in generate_stream(model, tokenizer, ids, gen_config, stop_strings, stop_ids,
                                 stop_after=(call_end,) if call_end else (), constraint=constraint):
        reply += piece
        yield conversation + reply_messages(reply), False
    conversation = conversation + reply_messages(reply)
    if conversation[-1].role == "user":
        conversation = conversation + [Message("assistant", "")]  # the model ended at once; keep the history alternating
    yield conversation, bool(call_end) and reply.endswith(call_end)
