"""Chat templates as plain strings, a registry of them, and render(): messages -> role-tagged segments.

A segment is `(text, role)`. role is None for template glue, "system"/"user" for what the model
reads, "assistant"/"tool_call" for what it must learn and "tool" for tool results it must not.
Placeholders: {{SYSTEM}}, {{QUERY}}, {{ROUND}} (1-based), {{CONTENT}}, {{BOS}}, {{EOS}}.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, replace

from ..errors import OptionError
from .errors import DataError
from .formats import Message

Segment = tuple[str, "str | None"]

AGENT_TOOL_CALL = "<|startofthink|>{{CONTENT}}<|endofthink|>"
AGENT_TOOL_RESULT = "\n\n<|startofexec|>{{CONTENT}}<|endofexec|>\n"


@dataclass(frozen=True)
class Template:
    """How one model family lays a conversation out as text.

    prefix opens the conversation and holds {{SYSTEM}}; prefix_no_system replaces it when there is
    no system text (None: the prefix with an empty system). prompt wraps each user turn and ends
    where the answer starts; suffix closes every answer and trains, so the model learns to stop;
    separator is untrained glue between rounds and end untrained glue after the last answer. A
    template whose prefix has no {{SYSTEM}} slot puts the system text in front of the first query.
    """

    prefix: str
    prompt: str
    suffix: str
    separator: str = ""
    end: str = ""
    prefix_no_system: str | None = None
    default_system: str | None = None
    stop_words: tuple[str, ...] = ()
    tool_call: str = AGENT_TOOL_CALL
    tool_result: str = AGENT_TOOL_RESULT
    use_tokenizer_template: bool = False


TEMPLATES: dict[str, Template] = {}


def register_template(name: str, template: Template, *, exist_ok: bool = False) -> Template:
    """Add a template under `name`; re-registering a name is an error unless exist_ok."""
    if name in TEMPLATES and not exist_ok:
        raise ValueError(f"template '{name}' is already registered")
    TEMPLATES[name] = template
    return template


def get_template(name_or_template: "str | Template") -> Template:
    """Look a template up by name (a Template passes through)."""
    if isinstance(name_or_template, Template):
        return name_or_template
    if name_or_template not in TEMPLATES:
        close = difflib.get_close_matches(str(name_or_template), TEMPLATES, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(sorted(TEMPLATES))}"
        raise OptionError("template", f"unknown template '{name_or_template}'{hint} (sftkit list templates)")
    return TEMPLATES[name_or_template]


def render(
    messages: list[Message],
    template: "str | Template",
    *,
    bos_token: str = "",
    eos_token: str = "",
    system: str | None = None,
    tokenizer=None,
) -> list[Segment]:
    """Lay a canonical conversation out as segments; joined, they are the exact model input text.

    `system` is used when the conversation has none (else the template's default system). A
    conversation that ends with the user's turn ends with the answer opener, ready to generate.
    """
    template = get_template(template)
    if template.use_tokenizer_template:
        if tokenizer is None:
            raise ValueError("the 'auto' template needs the tokenizer (its chat_template)")
        return render_with_chat_template(messages, tokenizer, system=system)
    special = {"{{BOS}}": bos_token or "", "{{EOS}}": eos_token or ""}
    system_text, rounds = _rounds(messages, system if system is not None else template.default_system)
    segments: list[Segment] = []
    has_slot = "{{SYSTEM}}" in template.prefix
    if system_text and has_slot:
        segments += _fill(template.prefix, {"{{SYSTEM}}": (system_text, "system"), **_glue(special)})
    else:
        segments += _fill(template.prefix_no_system if template.prefix_no_system is not None else template.prefix,
                          {"{{SYSTEM}}": ("", None), **_glue(special)})
    for index, (query, response) in enumerate(rounds):
        if index:
            segments += _fill(template.separator, _glue(special))
        if index == 0 and system_text and not has_slot:
            query = f"{system_text}\n\n{query}"
        segments += _fill(template.prompt, {"{{QUERY}}": (query, "user"), "{{ROUND}}": (str(index + 1), None), **_glue(special)})
        if response is None:
            continue
        for message in response:
            if message.role == "assistant":
                segments.append((message.content, "assistant"))
            elif message.role == "tool_call":
                segments += _fill(template.tool_call, {"{{CONTENT}}": (message.content, "tool_call")}, glue_role="tool_call")
            else:
                segments += _fill(template.tool_result, {"{{CONTENT}}": (message.content, "tool")}, glue_role="tool")
        if response and response[-1].role != "tool":
            segments += _fill(template.suffix, _glue(special), glue_role="assistant")
    if rounds and rounds[-1][1] is not None:
        segments += _fill(template.end, _glue(special))
    return _merge(segments)


def _rounds(messages: list[Message], default_system: str | None):
    """Split into the system text and (query, response messages | None) rounds."""
    system_text = default_system or ""
    rounds: list[tuple[str, list[Message] | None]] = []
    for message in messages:
        if message.role == "system":
            system_text = message.content
        elif message.role == "user":
            rounds.append((message.content, None))
        elif not rounds:
            raise DataError(f"a '{message.role}' message before any user message")
        else:
            query, response = rounds[-1]
            rounds[-1] = (query, (response or []) + [message])
    return system_text, rounds


def _glue(special: dict[str, str]) -> dict[str, Segment]:
    return {key: (value, None) for key, value in special.items()}


def _fill(pattern: str, slots: dict[str, Segment], glue_role: str | None = None) -> list[Segment]:
    """Cut `pattern` at its placeholders; literal text gets glue_role, slots their own role."""
    segments: list[Segment] = []
    rest = pattern
    while rest:
        hits = [(rest.find(key), key) for key in slots if key in rest]
        if not hits:
            segments.append((rest, glue_role))
            break
        position, key = min(hits)
        if position:
            segments.append((rest[:position], glue_role))
        value, role = slots[key]
        segments.append((value, role if key in ("{{SYSTEM}}", "{{QUERY}}", "{{CONTENT}}") else glue_role))
        rest = rest[position + len(key):]
    return segments


def _merge(segments: list[Segment]) -> list[Segment]:
    merged: list[Segment] = []
    for text, role in segments:
        if not text:
            continue
        if merged and merged[-1][1] == role:
            merged[-1] = (merged[-1][0] + text, role)
        else:
            merged.append((text, role))
    return merged


def render_with_chat_template(messages: list[Message], tokenizer, *, system: str | None = None) -> list[Segment]:
    """Render through the tokenizer's own Jinja chat_template and still find the assistant's text.

    Each answer is the difference between rendering the conversation up to it with the generation
    prompt and up to and including it: its content and end-of-turn token train, trailing whitespace
    and anything before the content (e.g. empty think blocks) are glue.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("template 'auto' needs a tokenizer with a chat_template; pick a named template instead")
    chat = _openai_messages(messages, system)

    def text_of(upto: int, generation: bool) -> str:
        return tokenizer.apply_chat_template(chat[:upto], tokenize=False, add_generation_prompt=generation)

    segments: list[Segment] = []
    done = 0
    for index, message in enumerate(chat):
        if message["role"] != "assistant":
            continue
        opened, closed = text_of(index, True), text_of(index + 1, False)
        if not (opened.startswith(_joined(segments)) and closed.startswith(opened)):
            raise ValueError("the tokenizer's chat_template does not render conversations prefix-stably; use a named template")
        segments += _reader_segments(opened[done:], chat[_last_assistant(chat, index) + 1:index])
        answer = closed[len(opened):]
        segments += _answer_segments(answer, message)
        done = len(closed)
    full = text_of(len(chat), chat[-1]["role"] != "assistant")
    if not full.startswith(_joined(segments)):
        raise ValueError("the tokenizer's chat_template does not render conversations prefix-stably; use a named template")
    segments += _reader_segments(full[done:], chat[_last_assistant(chat, len(chat)) + 1:])
    return _merge(segments)


def _joined(segments: list[Segment]) -> str:
    return "".join(text for text, _ in segments)


def _last_assistant(chat: list[dict], before: int) -> int:
    return max((i for i in range(before) if chat[i]["role"] == "assistant"), default=-1)


def _reader_segments(text: str, messages: list[dict]) -> list[Segment]:
    """Mark the system/user/tool contents inside a stretch of rendered prompt text; the rest is glue.

    Searched from the end, since templates put a role header before its content, never after.
    """
    tail: list[Segment] = []
    end = len(text)
    for message in reversed(messages):
        content = message.get("content") or ""
        found = text.rfind(content, 0, end) if content else -1
        if found < 0:
            continue
        tail = [(content, message.get("_sftkit_role", message["role"])), (text[found + len(content):end], None)] + tail
        end = found
    return [(text[:end], None)] + tail


def _answer_segments(answer: str, message: dict) -> list[Segment]:
    role = message.get("_sftkit_role", "assistant")
    content = message.get("content") or ""
    found = answer.find(content) if content else -1
    if found < 0:
        body, start = answer.rstrip(), 0
    else:
        body, start = answer[found:].rstrip(), found
    return [(answer[:start], None), (body, role), (answer[start + len(body):], None)]


def _openai_messages(messages: list[Message], system: str | None) -> list[dict]:
    """Canonical messages in the shape Jinja chat templates expect (role + content)."""
    chat = []
    if system and not any(m.role == "system" for m in messages):
        chat.append({"role": "system", "content": system})
    for message in messages:
        if message.role == "tool_call":
            chat.append({"role": "assistant", "content": message.content, "_sftkit_role": "tool_call"})
        else:
            chat.append({"role": message.role, "content": message.content})
    return chat


_CHATML = Template(
    prefix="<|im_start|>system\n{{SYSTEM}}<|im_end|>\n",
    prefix_no_system="",
    prompt="<|im_start|>user\n{{QUERY}}<|im_end|>\n<|im_start|>assistant\n",
    suffix="<|im_end|>",
    separator="\n",
    end="\n",
    stop_words=("<|im_end|>", "<|endoftext|>"),
)

BUILTIN_TEMPLATES = {
    "default": Template(
        prefix="{{SYSTEM}}\n\n",
        prefix_no_system="",
        prompt="### Human:\n{{QUERY}}\n\n### Assistant:\n",
        suffix="{{EOS}}",
        separator="\n\n",
        default_system="You are a helpful, harmless and honest assistant.",
    ),
    "chatml": _CHATML,
    "qwen": replace(_CHATML, default_system="You are a helpful assistant."),
    "smollm2": replace(_CHATML, default_system="You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
    "yi": _CHATML,
    "llama2": Template(
        prefix="{{BOS}}[INST] <<SYS>>\n{{SYSTEM}}\n<</SYS>>\n\n",
        prefix_no_system="{{BOS}}[INST] ",
        prompt="{{QUERY}} [/INST] ",
        suffix=" {{EOS}}",
        separator="{{BOS}}[INST] ",
        stop_words=("</s>",),
    ),
    "llama3": Template(
        prefix="{{BOS}}<|start_header_id|>system<|end_header_id|>\n\n{{SYSTEM}}<|eot_id|>",
        prefix_no_system="{{BOS}}",
        prompt="<|start_header_id|>user<|end_header_id|>\n\n{{QUERY}}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        suffix="<|eot_id|>",
        stop_words=("<|eot_id|>", "<|end_of_text|>"),
    ),
    "mistral": Template(
        prefix="{{BOS}}",
        prompt="[INST] {{QUERY}} [/INST]",
        suffix="{{EOS}}",
        stop_words=("</s>",),
    ),
    "baichuan": Template(
        prefix="{{SYSTEM}}",
        prompt="<reserved_106>{{QUERY}}<reserved_107>",
        suffix="{{EOS}}",
        stop_words=("</s>",),
    ),
    "chatglm2": Template(
        prefix="[gMASK]sop{{SYSTEM}}",
        prompt="[Round {{ROUND}}]\n\n问：{{QUERY}}\n\n答：",
        suffix="{{EOS}}",
        separator="\n\n",
        stop_words=("</s>",),
    ),
    "chatglm3": Template(
        prefix="[gMASK]sop<|system|>\n{{SYSTEM}}",
        prefix_no_system="[gMASK]sop",
        prompt="<|user|>\n{{QUERY}}<|assistant|>\n",
        suffix="<|user|>",
        stop_words=("<|user|>", "<|observation|>"),
    ),
    "internlm": Template(
        prefix="{{BOS}}<|System|>:{{SYSTEM}}\n",
        prefix_no_system="{{BOS}}",
        prompt="<|User|>:{{QUERY}}\n<|Bot|>:",
        suffix="<eoa>",
        separator="\n",
        stop_words=("<eoa>",),
    ),
    "xverse": Template(
        prefix="{{SYSTEM}}",
        prompt="Human: {{QUERY}}\n\nAssistant: ",
        suffix="{{EOS}}",
        stop_words=("</s>",),
    ),
    "auto": Template(prefix="", prompt="", suffix="", use_tokenizer_template=True),
    # Base models: the raw text, closed by EOS so the model learns where a document ends.
    "default-generation": Template(prefix="{{BOS}}", prompt="{{QUERY}}", suffix="{{EOS}}"),
    "chatglm-generation": Template(prefix="[gMASK]sop", prompt="{{QUERY}}", suffix="{{EOS}}"),
    # Qwen2.5's Jinja template puts this system text in when the conversation has none.
    "qwen2_5": replace(_CHATML, default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
    # Non-thinking Qwen3: every answer opens with the empty think block that enable_thinking=False
    # puts in the generation prompt, so training matches inference. Glue, not trained. Qwen3's Jinja
    # template drops that block from answers before the last user turn; here every round has it.
    "qwen3": replace(_CHATML, prompt="<|im_start|>user\n{{QUERY}}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"),
    # Gemma has no system role: its Jinja template (Gemma 3) puts the system text and a blank line in
    # front of the first user message, as render() does for a prefix without {{SYSTEM}}.
    "gemma": Template(
        prefix="{{BOS}}",
        prompt="<start_of_turn>user\n{{QUERY}}<end_of_turn>\n<start_of_turn>model\n",
        suffix="<end_of_turn>",
        separator="\n",
        end="\n",
        stop_words=("<end_of_turn>", "<eos>"),
    ),
    # Phi-3 and Phi-3.5; their Jinja template appends eos_token (<|endoftext|>) after the last turn.
    "phi3": Template(
        prefix="<|system|>\n{{SYSTEM}}<|end|>\n",
        prefix_no_system="",
        prompt="<|user|>\n{{QUERY}}<|end|>\n<|assistant|>\n",
        suffix="<|end|>",
        separator="\n",
        end="\n",
        stop_words=("<|end|>", "<|endoftext|>"),
    ),
    # Phi-4 (14B): ChatML tags with <|im_sep|> after the role and no newlines anywhere.
    "phi4": Template(
        prefix="<|im_start|>system<|im_sep|>{{SYSTEM}}<|im_end|>",
        prefix_no_system="",
        prompt="<|im_start|>user<|im_sep|>{{QUERY}}<|im_end|><|im_start|>assistant<|im_sep|>",
        suffix="<|im_end|>",
        stop_words=("<|im_end|>", "<|endoftext|>"),
    ),
    # Phi-4-mini: Phi-3's tags without newlines; its Jinja template appends eos_token after the last turn.
    "phi4-mini": Template(
        prefix="<|system|>{{SYSTEM}}<|end|>",
        prefix_no_system="",
        prompt="<|user|>{{QUERY}}<|end|><|assistant|>",
        suffix="<|end|>",
        stop_words=("<|end|>", "<|endoftext|>"),
    ),
    # Mistral-Nemo (tekken tokenizer): no spaces around [INST]. Its Jinja template puts the system
    # text in front of the last user message; here it goes in front of the first.
    "mistral-nemo": Template(
        prefix="{{BOS}}",
        prompt="[INST]{{QUERY}}[/INST]",
        suffix="{{EOS}}",
        stop_words=("</s>",),
    ),
    "bluelm": Template(prefix="{{BOS}}{{SYSTEM}}", prompt="[|Human|]:{{QUERY}}[|AI|]:", suffix="{{EOS}}", stop_words=("</s>",)),
    "ziya": Template(prefix="{{BOS}}{{SYSTEM}}", prompt="<human>:{{QUERY}}\n<bot>:", suffix="{{EOS}}", separator="\n",
                     stop_words=("</s>",)),
    # Skywork-13B-chat: every turn opens with </s><s>, as its demo's special_encode builds it.
    "skywork": Template(
        prefix="{{BOS}}{{SYSTEM}}{{EOS}}{{BOS}}",
        prompt="[USER]{{QUERY}}[SEP][BOT]",
        suffix="[SEP]{{EOS}}",
        separator="{{BOS}}",
        stop_words=("[SEP]", "</s>"),
    ),
    # PolyLM-chat-13B, laid out as its model card's example prompt; the card shows no multi-round layout.
    "polylm": Template(prefix="", prompt="<|user|>\n{{QUERY}}\n<|assistant|>\n", suffix="{{EOS}}", stop_words=("</s>",)),
    # SeqGPT is single-turn NLU: the query is "<text>\n<分类 or 抽取>: <label,label>", as its README builds it.
    "seqgpt": Template(prefix="", prompt="输入: {{QUERY}}\n输出: [GEN]", suffix="{{EOS}}", stop_words=("</s>",)),
    # OpenBuddy (Llama 2 / Mistral based). Its README recommends a long system prompt (ms-swift makes it the
    # default); none is set here: pass it with --system to train with it.
    "openbuddy": Template(
        prefix="{{BOS}}{{SYSTEM}}\n\n",
        prefix_no_system="{{BOS}}",
        prompt="User: {{QUERY}}\nAssistant: ",
        suffix="{{EOS}}",
        separator="\n",
        stop_words=("</s>",),
    ),
}

for _name, _template in BUILTIN_TEMPLATES.items():
    register_template(_name, _template)
