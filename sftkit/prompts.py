"""Conversations as generation prompts and replies as messages, rendered exactly as training rendered them.

Shared by chat, evaluation and serving, so the model sees at inference the ids it was trained on.
"""
from __future__ import annotations

from .data.errors import DataError
from .data.formats import Message, split_agent_text
from .data.pipeline import IMAGE_KEYS, encode, expand_images, with_placeholders
from .data.templates import Template, get_template, render
from .data.vision import with_pixels


def prompt_segments(messages: list[Message], tokenizer, template: "str | Template", system: str | None = None):
    """render() for generation: ends with the answer opener, or, after a tool result, where the answer goes on.

    render() closes a conversation that ends with a tool result with the template's end glue; the model
    never saw that glue mid-turn in training, so it is dropped.
    """
    template = get_template(template)
    segments = render(messages, template, bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token or "",
                      system=system, tokenizer=tokenizer)
    if messages[-1].role == "tool" and not template.use_tokenizer_template and segments and segments[-1][1] is None:
        segments = segments[:-1]
    return segments


def prompt_ids(messages: list[Message], tokenizer, template: "str | Template", system: str | None = None) -> list[int]:
    return encode(prompt_segments(messages, tokenizer, template, system), tokenizer).input_ids


def prompt_inputs(messages: list[Message], tokenizer, template: "str | Template", system: str | None = None,
                  processor=None) -> tuple[list[int], dict | None]:
    """(prompt ids, the prompt's image inputs or None): the images' placeholders expanded and their pixels made,
    as training encoded them. `processor` (a VisionProcessor) is needed when the messages have images."""
    images = [reference for message in messages for reference in message.images]
    if not images:
        return prompt_ids(messages, tokenizer, template, system), None
    if processor is None:
        raise DataError("this model takes no images (a text model, or a vision-language model sftkit does not drive)")
    segments = prompt_segments(with_placeholders(messages, processor.placeholder), tokenizer, template, system)
    counts = [processor.tokens_for(reference) for reference in images]
    ids = expand_images(encode(segments, tokenizer), counts, processor.image_token_id).input_ids
    example = with_pixels({"input_ids": ids, "images": images, "image_tokens": counts}, processor)
    return ids, {key: example[key] for key in IMAGE_KEYS}


def prompt_text(messages: list[Message], tokenizer, template: "str | Template", system: str | None = None) -> str:
    return "".join(text for text, _ in prompt_segments(messages, tokenizer, template, system))


def response_text(messages: list[Message], template: "str | Template") -> str:
    """An answer turn as one string with calls and results in the template's markers, as metrics parse it."""
    template = get_template(template)
    parts = []
    for message in messages:
        if message.role == "tool_call":
            parts.append(template.tool_call.replace("{{CONTENT}}", message.content))
        elif message.role == "tool":
            parts.append(template.tool_result.replace("{{CONTENT}}", message.content))
        else:
            parts.append(message.content)
    return "".join(parts)


def reply_messages(text: str) -> list[Message]:
    """Generated text as the turn's messages (text and tool calls), so the next prompt renders it as training did."""
    try:
        return split_agent_text(text)
    except ValueError:  # an unbalanced marker: keep the text as the model wrote it
        return [Message("assistant", text)] if text else []


def split_last_turn(conversation: list[Message]) -> tuple[list[Message], list[Message]]:
    """(the prompt: everything up to the last user message, the reference: the answer turn after it)."""
    last_user = max((i for i, message in enumerate(conversation) if message.role == "user"), default=None)
    if last_user is None or last_user == len(conversation) - 1:
        raise ValueError("the conversation has no answer after its last user message to compare with")
    return conversation[: last_user + 1], conversation[last_user + 1:]


def tool_call_end(template: "str | Template") -> str:
    """The marker that closes a tool call (<|endofthink|>): there the model waits for the tool's result."""
    return get_template(template).tool_call.partition("{{CONTENT}}")[2]
