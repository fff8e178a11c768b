"""`sftkit deploy` against the official openai client on 127.0.0.1: chat, streaming, tool calls, adapters, errors, load.

The tool-call round trip uses a tiny model fully fine-tuned by `sftkit train` for a few seconds on one
MSAgent-style row (fenced api_name/parameters call, exec result, answer) with OpenAI `tools`: a random
model never writes a valid call, and a trained one exercises the real path end to end - the tools text
in the prompt, the generated markers, the parser, and the call rendered back as the model wrote it.
"""
import asyncio
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

pytest.importorskip("uvicorn", reason="the deploy extra is not installed")
openai = pytest.importorskip("openai", reason="the dev extra (openai client) is not installed")

from serving import client, running, save_two_adapters  # noqa: E402
from sftkit.inference import load_for_inference  # noqa: E402
from sftkit.prompts import prompt_ids, prompt_inputs  # noqa: E402
from sftkit.config import DeployConfig, TrainConfig  # noqa: E402
from sftkit.data.formats import to_messages  # noqa: E402
from sftkit.data.templates import get_template  # noqa: E402
from sftkit.generation import GenerationConfig, generate_batch, generate_stream, stop_criteria  # noqa: E402
from sftkit.lora import load_adapter  # noqa: E402
from sftkit.serve.deploy import load_service  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL = '```JSON\n{"api_name": "get_weather", "parameters": {"city": "Paris"}}\n```'
ANSWER = "It is sunny in Paris, 21 C."
TOOL_ROW = {"tools": TOOLS, "messages": [
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": f"<|startofthink|>{CALL}<|endofthink|>\n\n<|startofexec|>sunny, 21 C<|endofexec|>\n{ANSWER}"}]}


def service_for(model_dir, **options):
    return load_service(DeployConfig(**{"model": model_dir, "template": "chatml", "max_new_tokens": 16,
                                        "served_model_name": "tiny", **options}))


@pytest.fixture(scope="module")
def plain(tiny_model_dir):
    """(base URL, service) of a server over the tiny random model."""
    service = service_for(tiny_model_dir)
    with running(service) as url:
        yield url, service


def expected_chat(service, messages, max_tokens=16, **options):
    """What the served model writes alone, by sftkit's own generation loop."""
    served = service.models["tiny"]
    ids = prompt_ids(to_messages({"messages": messages}, "messages", require_response=False), service.tokenizer,
                     served.template, served.system)
    text = "".join(generate_stream(service.backend.model, service.tokenizer, ids,
                                   GenerationConfig(max_new_tokens=max_tokens, **options),
                                   *stop_criteria(service.tokenizer, served.template)))
    return text, len(ids)


def test_chat_streamed_or_not_is_what_the_model_writes(plain):
    url, service = plain
    expected, prompt_tokens = expected_chat(service, QUESTION)
    reply = client(url).chat.completions.create(model="tiny", messages=QUESTION)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, 16)

    chunks = list(client(url).chat.completions.create(model="tiny", messages=QUESTION, stream=True, temperature=0,
                                                      stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == expected
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16


def test_sampling_options_reach_the_model(plain):
    url, service = plain
    options = dict(top_p=0.9, seed=11, temperature=0.7)
    expected, _ = expected_chat(service, QUESTION, 12, do_sample=True, top_k=5, repetition_penalty=1.3, **options)
    reply = client(url).chat.completions.create(model="tiny", messages=QUESTION, max_tokens=12,
                                                extra_body={"top_k": 5, "repetition_penalty": 1.3}, **options)
    assert reply.choices[0].message.content == expected
    greedy, _ = expected_chat(service, QUESTION, 12)
    assert expected != greedy
    stop = greedy[2:5]
    stopped = client(url).chat.completions.create(model="tiny", messages=QUESTION, max_tokens=12, stop=[stop])
    assert stopped.choices[0].message.content == greedy[:2] and stopped.choices[0].finish_reason == "stop"


def test_completions_take_text_batches_and_token_ids(plain):
    url, service = plain
    tokenizer, model = service.tokenizer, service.backend.model

    def expected(ids):
        return "".join(generate_stream(model, tokenizer, ids, GenerationConfig(max_new_tokens=8)))

    prompts = ["The quick brown", "Numbers like 42"]
    reply = client(url).completions.create(model="tiny", prompt=prompts, max_tokens=8)
    assert [choice.text for choice in reply.choices] == [expected(tokenizer(p)["input_ids"]) for p in prompts]
    assert reply.usage.prompt_tokens == sum(len(tokenizer(p)["input_ids"]) for p in prompts)
    ids = tokenizer("hello world")["input_ids"]
    streamed = client(url).completions.create(model="tiny", prompt=ids, max_tokens=8, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == expected(ids)


@pytest.fixture(scope="module")
def agent(tiny_model_dir, tmp_path_factory):
    """A server over a tiny model trained by `sftkit train` to call get_weather and then answer."""
    from sftkit.train import train

    folder = tmp_path_factory.mktemp("agent")
    data = folder / "tools.jsonl"
    data.write_text(json.dumps(TOOL_ROW) + "\n")
    best = train(TrainConfig(model=tiny_model_dir, dataset=(str(data),), val_dataset=(str(data),), sft_type="full",
                             max_steps=120, learning_rate=3e-3, warmup_ratio=0.0, lr_scheduler_type="constant",
                             eval_steps=1000, template="chatml", output_dir=str(folder / "run"),
                             add_output_dir_suffix=False))
    service = load_service(DeployConfig(ckpt_dir=best, served_model_name="agent", max_new_tokens=64))
    with running(service) as url:
        yield url, best


def test_tool_call_round_trip(agent):
    api = client(agent[0])
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = api.chat.completions.create(model="agent", messages=messages, tools=TOOLS)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    messages += [choice.message, {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    second = api.chat.completions.create(model="agent", messages=messages, tools=TOOLS)
    assert second.choices[0].message.content == ANSWER and second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.tool_calls is None


def test_a_streamed_tool_call_arrives_whole(agent):
    chunks = list(client(agent[0]).chat.completions.create(
        model="agent", messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=TOOLS, stream=True))
    assert not "".join(chunk.choices[0].delta.content or "" for chunk in chunks)  # the markers never leak as text
    [call] = [call for chunk in chunks for call in chunk.choices[0].delta.tool_calls or []]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("question", ["What is the weather in Paris?", "Tell me a joke about the sea.", "hello"])
def test_streamed_and_whole_replies_agree_with_tools(agent, question):
    """A call, plain text, and whatever "hello" gets."""
    api, messages = client(agent[0]), [{"role": "user", "content": question}]
    whole = api.chat.completions.create(model="agent", messages=messages, tools=TOOLS, max_tokens=40).choices[0]
    chunks = [chunk.choices[0] for chunk in api.chat.completions.create(
        model="agent", messages=messages, tools=TOOLS, max_tokens=40, stream=True) if chunk.choices]
    assert "".join(chunk.delta.content or "" for chunk in chunks) == (whole.message.content or "")
    streamed_calls = [(call.function.name, call.function.arguments) for chunk in chunks for call in chunk.delta.tool_calls or []]
    assert streamed_calls == [(call.function.name, call.function.arguments) for call in whole.message.tool_calls or []]
    assert chunks[-1].finish_reason == whole.finish_reason


def test_tools_prompt_none_leaves_the_tools_to_the_system_prompt(plain, tiny_model_dir):
    url, _ = plain
    with_tools = client(url).chat.completions.create(model="tiny", messages=QUESTION, tools=TOOLS, max_tokens=1)
    without = client(url).chat.completions.create(model="tiny", messages=QUESTION, max_tokens=1)
    assert with_tools.usage.prompt_tokens > without.usage.prompt_tokens
    with running(service_for(tiny_model_dir, tools_prompt="none")) as other:
        left_out = client(other).chat.completions.create(model="tiny", messages=QUESTION, tools=TOOLS, max_tokens=1)
    assert left_out.usage.prompt_tokens == without.usage.prompt_tokens


def test_calls_are_constrained_to_the_request_tools_unless_turned_off(agent):
    """For "hello" this model writes a call whose JSON is broken: free, it comes back as content; constrained (the
    default), it is a valid call to get_weather."""
    url, best = agent
    messages = [{"role": "user", "content": "hello"}]
    constrained = client(url).chat.completions.create(model="agent", messages=messages, tools=TOOLS, max_tokens=40).choices[0]
    [call] = constrained.message.tool_calls
    assert call.function.name == "get_weather" and set(json.loads(call.function.arguments)) == {"city"}
    service = load_service(DeployConfig(ckpt_dir=best, served_model_name="agent", max_new_tokens=64,
                                        constrained_tool_calls=False))
    with running(service) as free_url:
        free = client(free_url).chat.completions.create(model="agent", messages=messages, tools=TOOLS, max_tokens=40).choices[0]
    assert free.message.tool_calls is None and "<|startofthink|>" in free.message.content


def test_grounded_calls_take_their_values_from_the_request(agent):
    """For "hello" the constrained call names a city of the model's own; with --ground_tool_values the city can only
    be a run of the request's words, and "hello" is the only one."""
    url, best = agent
    messages = [{"role": "user", "content": "hello"}]
    [call] = client(url).chat.completions.create(model="agent", messages=messages, tools=TOOLS,
                                                 max_tokens=40).choices[0].message.tool_calls
    assert json.loads(call.function.arguments)["city"] != "hello"
    service = load_service(DeployConfig(ckpt_dir=best, served_model_name="agent", max_new_tokens=64,
                                        ground_tool_values=True))
    with running(service) as grounded_url:
        [call] = client(grounded_url).chat.completions.create(model="agent", messages=messages, tools=TOOLS,
                                                              max_tokens=40).choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "hello"}


def test_without_tools_the_reply_is_plain_text(agent):
    """tool_choice none (or no tools) returns what the model writes, markers and all, as content."""
    reply = client(agent[0]).chat.completions.create(
        model="agent", messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=TOOLS, tool_choice="none", max_tokens=4)
    assert reply.choices[0].finish_reason == "length" and reply.choices[0].message.tool_calls is None


def test_adapters_are_chosen_by_model_name_in_one_batch(tiny_model_dir, tmp_path):
    base, tokenizer, settings = load_for_inference(model=tiny_model_dir, template="chatml")
    folders = save_two_adapters(base, tmp_path)
    service = service_for(tiny_model_dir, adapters=tuple(f"{name}={folder}" for name, folder in folders.items()))
    expected = {}
    for name in ("tiny", *folders):
        reference, _, _ = load_for_inference(model=tiny_model_dir, template="chatml")
        if name in folders:
            load_adapter(reference, folders[name])
            reference.eval()  # the injected layers' dropout starts in training mode
        ids = prompt_ids(to_messages({"messages": QUESTION}, "messages", require_response=False), tokenizer, "chatml")
        expected[name] = "".join(generate_stream(reference, tokenizer, ids, GenerationConfig(max_new_tokens=16),
                                                 *stop_criteria(tokenizer, get_template("chatml"))))
    assert len(set(expected.values())) == 3
    with running(service) as url:
        api = client(url)
        assert [model.id for model in api.models.list()] == ["tiny", "ours", "peft"]
        replies = {}
        threads = [threading.Thread(target=lambda name=name: replies.__setitem__(
            name, api.chat.completions.create(model=name, messages=QUESTION).choices[0].message.content))
            for name in expected]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert replies == expected


def data_url(path) -> str:
    with open(path, "rb") as handle:
        return "data:image/png;base64," + base64.b64encode(handle.read()).decode()


def test_images_in_messages_reach_a_vision_language_model(vlm_dir, vision, pictures, plain):
    """OpenAI image_url parts (data URLs) are the prompt's images: replies, sent together so rows with and without
    images share a batch, are what sftkit's generation (itself checked against transformers' generate) writes
    alone. A file path is refused (a client must not make the server open its files), as are images to a text model."""
    tokenizer, processor = vision
    service = load_service(DeployConfig(model=vlm_dir, template="qwen", max_new_tokens=8, served_model_name="vlm"))
    with torch.no_grad():  # sharper attention: a random model barely looks at positions, and this test is about them
        for name, weight in service.backend.model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")) and "visual" not in name:
                weight.mul_(30)
    asked = [[pictures[0]], [pictures[1]], [], [pictures[2], pictures[0]]]
    messages = [[{"role": "user", "content": [*({"type": "image_url", "image_url": {"url": data_url(p)}} for p in images),
                                              {"type": "text", "text": "What colour is it?"}]}] for images in asked]
    expected = []
    for images in asked:
        row = {"messages": [{"role": "user", "content": "<image>" * len(images) + "What colour is it?"}], "images": images}
        ids, inputs = prompt_inputs(to_messages(row, "messages", require_response=False), tokenizer, "qwen",
                                    processor=processor)
        expected.append((generate_batch(service.backend.model, tokenizer, [ids], GenerationConfig(max_new_tokens=8),
                                        *stop_criteria(tokenizer, get_template("qwen")), images=[inputs])[0], len(ids)))
    assert len({text for text, _ in expected}) > 1

    async def together(url):
        api = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0)
        replies = await asyncio.gather(*(api.chat.completions.create(model="vlm", messages=m) for m in messages))
        return [(reply.choices[0].message.content, reply.usage.prompt_tokens) for reply in replies]

    with running(service) as url:
        assert asyncio.run(together(url)) == expected
        with pytest.raises(openai.BadRequestError, match="data URL"):
            client(url).chat.completions.create(model="vlm", messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": pictures[0]}}, {"type": "text", "text": "hi"}]}])
    with pytest.raises(openai.BadRequestError, match="takes no images"):
        client(plain[0]).chat.completions.create(model="tiny", messages=messages[0])


def raw(url, path, body=None, headers=None, method=None):
    """(status, JSON body) of a request sent without the openai client."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url.removesuffix("/v1") + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_bad_requests_get_openai_errors(tiny_model_dir):
    service = service_for(tiny_model_dir, api_key="secret", max_num_seqs=1, max_queue=1, max_new_tokens=900)
    with running(service) as url:
        api = client(url, api_key="secret")
        with pytest.raises(openai.AuthenticationError):
            client(url, api_key="wrong").models.list()
        status, body = raw(url, "/v1/models")
        assert status == 401 and "missing API key" in body["error"]["message"]
        with pytest.raises(openai.NotFoundError, match="not served here"):
            api.chat.completions.create(model="gpt-4", messages=QUESTION)
        with pytest.raises(openai.BadRequestError, match="top_k"):
            api.chat.completions.create(model="tiny", messages=QUESTION, extra_body={"top_k": "ten"})
        with pytest.raises(openai.BadRequestError, match="tool result that follows no tool call"):
            api.chat.completions.create(model="tiny", messages=QUESTION + [{"role": "tool", "content": "x", "tool_call_id": "c"}])
        with pytest.raises(openai.APIStatusError, match="context is 1024 tokens") as too_long:
            api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello " * 1100}])
        assert too_long.value.status_code == 413
        status, body = raw(url, "/v1/chat/completions", b"{bad json", {"Authorization": "Bearer secret"})
        assert status == 400 and body["error"]["type"] == "invalid_request_error" and "JSON" in body["error"]["message"]
        assert raw(url, "/v1/nothing", headers={"Authorization": "Bearer secret"})[0] == 404
        assert raw(url, "/v1/chat/completions", headers={"Authorization": "Bearer secret"}, method="GET")[0] == 405

        # One request runs (max_num_seqs 1), one waits (max_queue 1): the next one is refused with 429.
        running_stream = api.chat.completions.create(model="tiny", messages=QUESTION, stream=True)
        next(iter(running_stream))
        waiting = threading.Thread(target=lambda: api.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=2))
        waiting.start()
        wait_for(lambda: raw(url, "/health")[1]["waiting"] == 1)
        with pytest.raises(openai.RateLimitError, match="too many requests"):
            api.chat.completions.create(model="tiny", messages=QUESTION)
        running_stream.close()
        waiting.join()


def wait_for(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def post_and_hang_up(url, body, read_first_event: bool):
    """Send a request over a bare socket and close it early, as a client that goes away does."""
    host, port = url.removeprefix("http://").removesuffix("/v1").split(":")
    payload = json.dumps(body).encode()
    with socket.create_connection((host, int(port))) as connection:
        connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        if read_first_event:
            received = b""
            while b"data:" not in received:
                received += connection.recv(4096)
        else:
            wait_for(lambda: raw(url, "/health")[1]["running"] == 1)


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_hangs_up_frees_its_slot(tiny_model_dir, stream):
    service = service_for(tiny_model_dir)
    engine = service.backend
    with running(service) as url:
        post_and_hang_up(url, {"model": "tiny", "messages": QUESTION, "max_tokens": 1000, "stream": stream}, stream)
        wait_for(lambda: raw(url, "/health")[1]["running"] == 0)
    assert engine.decode_steps < 900  # stopped early, not at the end of its 1000 tokens


def test_32_concurrent_clients_are_batched(plain):
    """0 errors, the same replies as one at a time, and at least 3x the throughput (generated tokens per second)."""
    url, _ = plain

    async def chat(api, index):
        reply = await api.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"Question {index}: what is {index} + {index}?"}],
            max_tokens=16)
        return reply.choices[0].message.content, reply.usage.completion_tokens

    async def one_by_one():
        api = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0)
        return [await chat(api, index) for index in range(32)]

    async def together():
        api = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0)
        return await asyncio.gather(*(chat(api, index) for index in range(32)))

    start = time.perf_counter()
    sequential = asyncio.run(one_by_one())
    sequential_seconds = time.perf_counter() - start
    start = time.perf_counter()
    concurrent = asyncio.run(together())
    concurrent_seconds = time.perf_counter() - start
    assert concurrent == sequential
    tokens = sum(count for _, count in concurrent)
    speedup = sequential_seconds / concurrent_seconds
    print(f"\n32 chats, {tokens} tokens: one by one {tokens / sequential_seconds:.0f} tokens/s, "
          f"32 concurrent {tokens / concurrent_seconds:.0f} tokens/s ({speedup:.1f}x)")
    assert speedup >= 3


def test_sigterm_lets_requests_in_flight_finish(tiny_model_dir):
    command = [sys.executable, "-m", "sftkit_cli.main", "deploy", "--model", tiny_model_dir, "--template", "chatml",
               "--port", "0", "--served_model_name", "tiny", "--shutdown_timeout", "60"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = ""
        while "serving" not in line:
            line = server.stdout.readline()
            assert line, "the server exited before it was ready"
        url = line.split(" at ")[1].split()[0]
        chunks, first = [], threading.Event()

        def read():
            for chunk in client(url).chat.completions.create(model="tiny", messages=QUESTION, stream=True,
                                                             max_tokens=900, stream_options={"include_usage": True}):
                chunks.append(chunk)
                first.set()

        reader = threading.Thread(target=read)
        reader.start()
        assert first.wait(60)
        server.send_signal(signal.SIGTERM)
        reader.join(120)
        output = server.communicate(timeout=120)[0]
    finally:
        if server.poll() is None:
            server.kill()
    assert server.returncode == -signal.SIGTERM
    assert "Waiting for connections to close" in output  # the request was still running at SIGTERM
    assert chunks[-1].usage.completion_tokens == 900  # and it finished


def test_cli_errors_are_one_line(tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from sftkit_cli.main import main

    result = CliRunner().invoke(main, ["deploy", "--model", tiny_model_dir, "--port", "0", "--adapters", f"a={tmp_path}/none"])
    assert result.exit_code == 1 and "is not a folder" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["deploy", "--adapters", "nameless"])
    assert result.exit_code == 2 and "name=DIR" in result.output


@pytest.mark.skipif(__import__("importlib").util.find_spec("vllm") is not None and __import__("torch").cuda.is_available(),
                    reason="vllm and a GPU are present")
def test_vllm_backend_needs_vllm_and_a_gpu():
    from click.testing import CliRunner

    from sftkit_cli.main import main

    result = CliRunner().invoke(main, ["deploy", "--infer_backend", "vllm", "--port", "0"])
    assert result.exit_code == 1 and "--infer_backend vllm needs" in result.output and "Traceback" not in result.output
