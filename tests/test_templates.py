"""Templates: golden renderings, exact parity with apply_chat_template, and the tokens that train."""
import json
import os
from pathlib import Path

import pytest

from sftkit.data.formats import Message
from sftkit.data.pipeline import IGNORE_INDEX, build_example, encode, mask
from sftkit.data.templates import (TEMPLATES, Template, TemplateError, TokenText, Tokens, get_template, pattern_text,
                                   register_template, render)

GOLDEN = Path(__file__).parent / "golden" / "templates.json"
THINK = '<|startofthink|>{"api_name": "weather", "parameters": {"city": "Paris"}}<|endofthink|>'

CONVERSATION = [
    Message("system", "You are terse."),
    Message("user", "What is 2+2?"),
    Message("assistant", "4."),
    Message("user", "Weather in Paris?"),
    Message("tool_call", '{"api_name": "weather", "parameters": {"city": "Paris"}}'),
    Message("tool", '{"temp": 18}'),
    Message("assistant", "18 C."),
]
NAMED = sorted(name for name in TEMPLATES if name != "auto")
PARTS = ("prefix", "prompt", "suffix", "separator", "end", "prefix_no_system")
WITH_TOKENS = [name for name in NAMED if any(isinstance(getattr(TEMPLATES[name], part), tuple) for part in PARTS)]
TEXT_ONLY = [name for name in NAMED if name not in WITH_TOKENS]


def specials(tokenizer):
    return dict(bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)


def rendering(name, tokenizer):
    segments = render(CONVERSATION, name, tokenizer=tokenizer, **specials(tokenizer))
    encoded = encode(segments, tokenizer)
    return {"segments": [list(s) for s in segments], "input_ids": encoded.input_ids, "labels": mask(encoded)}


def golden_text(renderings) -> str:
    """One segment per line and the ids on one line each, so a diff of the golden file reads well."""
    blocks = []
    for name, value in sorted(renderings.items()):
        segments = ",\n    ".join(json.dumps(segment, ensure_ascii=False) for segment in value["segments"])
        blocks.append(f'  "{name}": {{\n   "segments": [\n    {segments}\n   ],\n'
                      f'   "input_ids": {json.dumps(value["input_ids"])},\n   "labels": {json.dumps(value["labels"])}\n  }}')
    return "{\n" + ",\n".join(blocks) + "\n}\n"


def test_builtin_templates_match_golden(tokenizer, marker_tokenizer):
    """Golden text + ids + labels per template; regenerate with SFTKIT_UPDATE_GOLDEN=1 after a deliberate change.
    Templates that write token ids need a tokenizer that has those tokens."""
    current = {name: rendering(name, marker_tokenizer if name in WITH_TOKENS else tokenizer) for name in NAMED + ["auto"]}
    if os.environ.get("SFTKIT_UPDATE_GOLDEN"):
        GOLDEN.write_text(golden_text(current), encoding="utf-8")
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
    assert sorted(golden) == sorted(current)
    for name in current:
        assert current[name] == golden[name], name


def test_required_builtins_exist():
    for name in ["default", "chatml", "llama2", "llama3", "mistral", "baichuan", "chatglm2", "chatglm3", "internlm", "xverse", "auto"]:
        assert name in TEMPLATES


@pytest.mark.parametrize("name", TEXT_ONLY + ["auto"])
def test_joined_encoding_equals_plain_tokenization(name, tokenizer):
    segments = render(CONVERSATION, name, tokenizer=tokenizer, **specials(tokenizer))
    text = "".join(t for t, _ in segments)
    assert encode(segments, tokenizer).input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]


MARKERS = ["<|user|>", "<|assistant|>", "<|system|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>",
           "<eoa>", "<reserved_106>", "<reserved_107>", "[gMASK]", "sop", "<|im_sep|>", "<|end|>", "<start_of_turn>",
           "<end_of_turn>", "<think>", "</think>", "[USER]", "[BOT]", "[SEP]"]


@pytest.fixture(scope="module")
def marker_tokenizer():
    """The tiny tokenizer with each template's markers as special tokens, as real model tokenizers have them."""
    import tiny

    extended = tiny.make_tokenizer()
    extended.add_special_tokens({"additional_special_tokens": MARKERS})
    return extended


@pytest.mark.parametrize("name", NAMED)
def test_trainable_text_is_answers_calls_and_end_of_turn(name, marker_tokenizer):
    tokenizer = marker_tokenizer
    template = get_template(name)
    example = build_example(CONVERSATION, tokenizer=tokenizer, template=name)
    trained = tokenizer.decode([t for t, l in zip(example["input_ids"], example["labels"]) if l != IGNORE_INDEX])
    suffix = pattern_text(template.suffix, tokenizer).replace("{{EOS}}", tokenizer.eos_token).replace("{{BOS}}", tokenizer.bos_token)
    call = template.tool_call.replace("{{CONTENT}}", CONVERSATION[4].content)
    # A space that ends the prompt glue rides on the answer's first token (" 4"): ignore spaces.
    assert trained.replace(" ", "") == ("4." + suffix + call + "18 C." + suffix).replace(" ", "")
    assert '{"temp": 18}' not in trained and "Paris?" not in trained


def as_chat(messages):
    return [{"role": "assistant" if m.role == "tool_call" else m.role, "content": m.content} for m in messages]


@pytest.mark.parametrize("name", ["chatml", "auto"])
@pytest.mark.parametrize("with_system", [True, False])
def test_chatml_and_auto_equal_apply_chat_template(name, with_system, tokenizer):
    conversation = [m for m in CONVERSATION[:4] if with_system or m.role != "system"] + [Message("assistant", "It is 18 C.")]
    example = build_example(conversation, tokenizer=tokenizer, template=name)
    expected = tokenizer.apply_chat_template(as_chat(conversation), tokenize=True, return_dict=True)["input_ids"]
    assert example["input_ids"] == list(expected)
    trained = tokenizer.decode([t for t, l in zip(example["input_ids"], example["labels"]) if l != IGNORE_INDEX])
    assert trained == "4.<|im_end|>It is 18 C.<|im_end|>"


def test_generation_prompt_when_conversation_ends_with_user(tokenizer):
    conversation = [Message("user", "hi")]
    for name in ("chatml", "auto"):
        text = "".join(t for t, _ in render(conversation, name, tokenizer=tokenizer))
        assert text == tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)


def test_system_default_and_override(tokenizer):
    conversation = [Message("user", "hi"), Message("assistant", "yo")]
    assert render(conversation, "qwen")[0] == ("<|im_start|>system\n", None)
    assert render(conversation, "qwen")[1] == ("You are a helpful assistant.", "system")
    assert render(conversation, "qwen", system="Be brief.")[1] == ("Be brief.", "system")
    assert render(conversation, "chatml")[0] == ("<|im_start|>user\n", None)


def test_template_without_system_slot_prefixes_first_query():
    segments = render([Message("system", "S"), Message("user", "hi"), Message("assistant", "yo")], "mistral", bos_token="<s>", eos_token="</s>")
    assert "".join(t for t, _ in segments) == "<s>[INST] S\n\nhi [/INST]yo</s>"


def test_register_and_lookup_errors():
    custom = Template(prefix="", prompt="Q: {{QUERY}}\nA: ", suffix="\n")
    register_template("test-qa", custom)
    assert get_template("test-qa") is custom
    with pytest.raises(ValueError, match="already registered"):
        register_template("test-qa", custom)
    with pytest.raises(ValueError, match="did you mean"):
        get_template("chatm")
    del TEMPLATES["test-qa"]


def test_auto_needs_a_chat_template(tokenizer):
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    with pytest.raises(ValueError, match="chat_template"):
        render(CONVERSATION, "auto", tokenizer=bare)


# -- token pieces: ids written as they are, for tokens a tokenizer does not parse out of text ------------------------


@pytest.mark.parametrize("name", WITH_TOKENS)
def test_token_pieces_are_their_ids_and_the_text_between_them_is_tokenized_as_usual(name, marker_tokenizer):
    tokenizer = marker_tokenizer
    segments = render(CONVERSATION, name, tokenizer=tokenizer, **specials(tokenizer))
    expected, run = [], ""
    for text, _ in segments + [(TokenText(Tokens(("<unk>",))), None)]:  # a sentinel flushes the last text run
        if isinstance(text, TokenText):
            expected += tokenizer(run, add_special_tokens=False)["input_ids"] + text.tokens.ids(tokenizer)
            run = ""
        else:
            run += text
    assert encode(segments, tokenizer).input_ids == expected[:-1]
    assert any(isinstance(text, TokenText) for text, _ in segments)


def test_a_template_in_ms_swifts_spelling_with_ids_and_tokenizer_attributes(tokenizer):
    """ms-swift writes token pieces as lists: ids, and tokenizer attributes such as eos_token_id."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    template = Template(prefix=[[bos]], prompt=["Q: {{QUERY}}\nA:"], suffix=[["eos_token_id"]], separator=["\n"])
    assert template.prompt == "Q: {{QUERY}}\nA:" and template.separator == "\n"  # all text: stays a plain string
    register_template("test-swift-ids", template)
    try:
        example = build_example([Message("user", "hi"), Message("assistant", "yo")], tokenizer=tokenizer,
                                template="test-swift-ids")
    finally:
        del TEMPLATES["test-swift-ids"]
    text = tokenizer("Q: hi\nA:", add_special_tokens=False)["input_ids"] + tokenizer("yo", add_special_tokens=False)["input_ids"]
    assert example["input_ids"] == [bos] + text + [eos]
    trained = [token for token, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    assert trained == tokenizer("yo", add_special_tokens=False)["input_ids"] + [eos]
    rendered = render([Message("user", "hi")], template)
    assert "".join(t for t, _ in rendered) == f"<id:{bos}>Q: hi\nA:"  # without a tokenizer ids read as <id:N>
    assert "".join(t for t, _ in render([Message("user", "hi")], template, tokenizer=tokenizer)) == "<s>Q: hi\nA:"


def test_a_token_the_tokenizer_lacks_is_named(tokenizer):
    with pytest.raises(TemplateError, match=r"writes the token '\[gMASK\]', which this tokenizer's vocabulary does not have"):
        build_example(CONVERSATION[1:3], tokenizer=tokenizer, template="chatglm3")
    with pytest.raises(ValueError, match="ids >= 0 or token names"):
        Template(prefix=[[-1]], prompt="{{QUERY}}", suffix="")
    with pytest.raises(TypeError, match="tool_call"):
        Template(prefix="", prompt="{{QUERY}}", suffix="", tool_call=["<call>", [5]])


def test_a_python_tokenizer_encodes_segment_by_segment():
    """A Python (slow) tokenizer gives no character offsets: each segment is tokenized on its own, as ms-swift and the
    remote code of such models build prompts, and every token keeps its segment's role."""
    from remote_code.tinyglm.tokenization_tinyglm import TinyGLMTokenizer

    slow = TinyGLMTokenizer()
    assert not slow.is_fast
    segments = render(CONVERSATION[1:3], "chatml")
    encoded = encode(segments, slow)
    assert encoded.input_ids == [i for text, _ in segments for i in slow(text, add_special_tokens=False)["input_ids"]]
    assert encoded.roles == [role for text, role in segments for _ in slow(text, add_special_tokens=False)["input_ids"]]
