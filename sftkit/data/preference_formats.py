"""to_preference(): every supported preference row schema -> one PreferenceRow (a prompt and its completions).

Detected per row, like SFT rows:
  prompt / chosen / rejected             strings or message lists (TRL's format); without a prompt, two message
                                         lists whose shared beginning is the prompt (TRL's implicit prompt)
  query / response / rejected_response   ms-swift's, with history and system (any SFT schema + rejected_response)
  messages + rejected_response           the last answer of messages is chosen, rejected_response replaces it
  any of these + label                   KTO: one completion (completion, response or the last answer),
                                         desirable (true) or not (false)
The prompt ends with the user's last message; a completion is the answer turn after it (text, tool calls,
tool results), which is exactly what SFT's train_on=last trains.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import DataError
from .formats import Message, split_agent_text, to_messages

PROMPT_ROLES = ("system", "user", "human")
TRUE_LABELS, FALSE_LABELS = ("true", "1", "yes", "desirable"), ("false", "0", "no", "undesirable")


@dataclass(frozen=True)
class PreferenceRow:
    """A prompt with a preferred and a dispreferred completion; a KTO row has only one of them."""

    prompt: list[Message]
    chosen: list[Message] | None = None
    rejected: list[Message] | None = None

    @property
    def paired(self) -> bool:
        return self.chosen is not None and self.rejected is not None


def to_preference(record: dict, *, paired: bool = True) -> PreferenceRow:
    """Convert one raw preference row; `paired` (every method but KTO) refuses rows with a single labelled completion."""
    if not isinstance(record, dict):
        raise DataError(f"a row must be a JSON object, got {type(record).__name__}")
    if "label" in record:
        row = _labelled(record)
    elif "rejected_response" in record:
        row = _with_rejected_response(record)
    elif "chosen" in record or "rejected" in record:
        row = _chosen_rejected(record)
    else:
        keys = ", ".join(sorted(map(str, record))) or "none"
        raise DataError("no preference schema: expected 'prompt'/'chosen'/'rejected', 'query'/'response'/'rejected_response', "
                        f"'messages' + 'rejected_response', or a KTO row with 'label'; got keys: {keys}")
    if paired and not row.paired:
        raise DataError("a row with a label holds one completion: it trains with --rlhf_type kto, pairs with the others",
                        field="label")
    return row


def _chosen_rejected(record: dict) -> PreferenceRow:
    for key in ("chosen", "rejected"):
        if key not in record:
            raise DataError("missing field", field=key)
    if "prompt" not in record:
        return _implicit_prompt(record)
    prompt_raw = _prompt_messages(record)
    prompt = _prompt(prompt_raw, record)
    chosen, rejected = (_completion(prompt_raw, prompt, record, key) for key in ("chosen", "rejected"))
    return PreferenceRow(prompt, chosen, rejected)


def _implicit_prompt(record: dict) -> PreferenceRow:
    """TRL's implicit prompt: chosen and rejected are whole conversations that differ only in their last answer."""
    halves = {}
    for key in ("chosen", "rejected"):
        if not isinstance(record[key], list):
            raise DataError("without a 'prompt', chosen and rejected must be message lists that share the prompt", field=key)
        conversation = _converted({"messages": record[key], "tools": record.get("tools")}, key)
        halves[key] = _split(conversation, key)
    if halves["chosen"][0] != halves["rejected"][0]:
        raise DataError("chosen and rejected must share everything up to the last user message", field="rejected")
    return PreferenceRow(halves["chosen"][0], halves["chosen"][1], halves["rejected"][1])


def _with_rejected_response(record: dict) -> PreferenceRow:
    """Any SFT row (query/response with history and system, messages, ...) whose last answer is the chosen one."""
    conversation = to_messages({key: value for key, value in record.items() if key != "rejected_response"})
    prompt, chosen = _split(conversation, "messages" if "messages" in record else "response")
    return PreferenceRow(prompt, chosen, _text_completion(record["rejected_response"], "rejected_response"))


def _labelled(record: dict) -> PreferenceRow:
    desirable = _label(record["label"])
    rest = {key: value for key, value in record.items() if key != "label"}
    if "completion" in rest:
        prompt_raw = _prompt_messages(rest)
        prompt = _prompt(prompt_raw, rest)
        completion = _completion(prompt_raw, prompt, rest, "completion")
    else:
        prompt, completion = _split(to_messages(rest), "messages" if "messages" in rest else "response")
    return PreferenceRow(prompt, completion, None) if desirable else PreferenceRow(prompt, None, completion)


def _label(value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_LABELS + FALSE_LABELS:
        return value.strip().lower() in TRUE_LABELS
    raise DataError(f"must be true (desirable) or false (undesirable), got {value!r}", field="label")


def _prompt_messages(record: dict) -> list:
    """The prompt as raw message dicts: a string is one user message (after the row's system, if any)."""
    prompt = record.get("prompt")
    if isinstance(prompt, str):
        system = [{"role": "system", "content": record["system"]}] if record.get("system") else []
        return system + [{"role": "user", "content": prompt}]
    if isinstance(prompt, list):
        return prompt
    raise DataError(f"expected a string or a list of messages, got {type(prompt).__name__}", field="prompt")


def _prompt(prompt_raw: list, record: dict) -> list[Message]:
    prompt = _converted({"messages": prompt_raw, "tools": record.get("tools")}, "prompt", require_response=False)
    if prompt[-1].role != "user":
        raise DataError("the prompt must end with a user message (the completions answer it)", field="prompt")
    return prompt


def _completion(prompt_raw: list, prompt: list[Message], record: dict, key: str) -> list[Message]:
    """The answer turn `key` holds (a string, or assistant/tool messages), rendered after the prompt."""
    value = record[key]
    if isinstance(value, str):
        raw, offset = [{"role": "assistant", "content": value}], None
    elif isinstance(value, list):
        raw, offset = value, len(prompt_raw)
        for index, item in enumerate(raw):
            if isinstance(item, dict) and str(item.get("role", "")).lower() in PROMPT_ROLES:
                raise DataError("a completion holds the answer turn only (assistant, tool call and tool messages)",
                                field=f"{key}[{index}].role")
    else:
        raise DataError(f"expected a string or a list of messages, got {type(value).__name__}", field=key)
    conversation = _converted({"messages": prompt_raw + raw, "tools": record.get("tools")}, key, offset=offset,
                              prompt_length=len(prompt_raw))
    return conversation[len(prompt):]


def _text_completion(value, field: str) -> list[Message]:
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__}", field=field)
    try:
        messages = split_agent_text(value)
    except ValueError as error:
        raise DataError(str(error), field=field) from None
    if not any(message.role in ("assistant", "tool_call") for message in messages):
        raise DataError("empty response", field=field)
    return messages


def _split(conversation: list[Message], field: str) -> tuple[list[Message], list[Message]]:
    """(everything up to the last user message, the answer turn after it)."""
    last_user = max((i for i, message in enumerate(conversation) if message.role == "user"), default=None)
    if last_user is None or last_user == len(conversation) - 1:
        raise DataError("no answer after the last user message", field=field)
    return conversation[:last_user + 1], conversation[last_user + 1:]


_MESSAGE_FIELD = re.compile(r"messages\[(\d+)\](.*)")


def _converted(record: dict, key: str, *, require_response: bool = True, offset: int | None = 0,
               prompt_length: int = 0) -> list[Message]:
    """to_messages on a messages row, with errors naming the row's own field (prompt[1].content, chosen, ...).

    Items before prompt_length came from the prompt; the rest from `key`, a list from index `offset`, or a
    string when offset is None.
    """
    try:
        return to_messages({k: v for k, v in record.items() if v is not None}, "messages", require_response=require_response)
    except DataError as error:
        match = _MESSAGE_FIELD.fullmatch(error.field or "")
        if not match:
            raise DataError(error.message, field=key if error.field == "messages" else error.field) from None
        index, rest = int(match.group(1)), match.group(2)
        if index < prompt_length:
            field = f"prompt[{index}]{rest}"
        elif offset is None:
            field = key
        else:
            field = f"{key}[{index - offset}]{rest}"
        raise DataError(error.message, field=field) from None
