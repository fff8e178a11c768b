"""The continuous-batching engine: requests that join mid-generation get exactly what they get alone."""
import asyncio

import pytest
import torch

import tiny
from sftkit.generation import GenerationConfig, generate_stream
from sftkit.serve.engine import Engine, EngineRequest, QueueFull

PROMPTS = ["What is the capital of France?", "hello", "Translate to Chinese: hello world, the quick brown fox.",
           "Numbers like 42 and 3.14 appear too."]


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny.make_model(tokenizer, seed=1).eval()


def ids_of(tokenizer, text):
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


class Recorder:
    """Collects one request's events as the engine delivers them."""

    def __init__(self):
        self.events = []

    def __call__(self, event):
        self.events.append(event)

    @property
    def text(self):
        return "".join(event.text for event in self.events)

    @property
    def final(self):
        return self.events[-1] if self.events and self.events[-1].final else None


def run_until_idle(engine, limit=500):
    for _ in range(limit):
        if not (engine.stats()["running"] or engine.stats()["waiting"]):
            return
        engine.step()
    raise AssertionError("the engine did not finish")


def alone(model, tokenizer, request):
    return "".join(generate_stream(model, tokenizer, request.prompt_ids, request.config, request.stop_strings,
                                   request.stop_token_ids, stop_after=request.stop_after))


def test_requests_joining_mid_generation_get_what_they_get_alone(model, tokenizer):
    requests = [EngineRequest(ids_of(tokenizer, text), GenerationConfig(max_new_tokens=n))
                for text, n in zip(PROMPTS, (14, 20, 6, 11))]
    engine = Engine(model, tokenizer)
    recorders = [Recorder() for _ in requests]
    engine.submit(requests[0], recorders[0])
    for _ in range(3):
        engine.step()
    engine.submit(requests[1], recorders[1])
    engine.submit(requests[2], recorders[2])
    engine.step()
    engine.submit(requests[3], recorders[3])
    run_until_idle(engine)
    assert [recorder.text for recorder in recorders] == [alone(model, tokenizer, r) for r in requests]
    assert [recorder.final.completion_tokens for recorder in recorders] == [14, 20, 6, 11]
    assert {recorder.final.finish_reason for recorder in recorders} == {"length"}
    # Rows joined a running batch and left it one by one: 1, then 3, then 4 rows decoded together.
    assert list(engine.batch_sizes)[:5] == [1, 1, 1, 3, 4] and engine.batch_sizes[-1] == 1


def test_sampling_options_and_stops_are_per_request(model, tokenizer):
    prompt = ids_of(tokenizer, PROMPTS[0])
    greedy = "".join(generate_stream(model, tokenizer, prompt, GenerationConfig(max_new_tokens=12)))
    stop_word = greedy[3:6]
    requests = [
        EngineRequest(prompt, GenerationConfig(max_new_tokens=12)),
        EngineRequest(prompt, GenerationConfig(max_new_tokens=12, do_sample=True, temperature=0.8, top_p=0.9, seed=5)),
        EngineRequest(prompt, GenerationConfig(max_new_tokens=12, do_sample=True, top_k=20, seed=6)),
        EngineRequest(prompt, GenerationConfig(max_new_tokens=12, repetition_penalty=1.5)),
        EngineRequest(ids_of(tokenizer, PROMPTS[1]), GenerationConfig(max_new_tokens=12), stop_strings=(stop_word,)),
        EngineRequest(prompt, GenerationConfig(max_new_tokens=12), stop_strings=(stop_word,)),
    ]
    engine = Engine(model, tokenizer)
    recorders = [Recorder() for _ in requests]
    for request, recorder in zip(requests, recorders):
        engine.submit(request, recorder)
    run_until_idle(engine)
    assert [recorder.text for recorder in recorders] == [alone(model, tokenizer, r) for r in requests]
    assert len({recorder.text for recorder in recorders[:4]}) == 4  # the options really differ
    assert recorders[5].text == greedy[:3] and recorders[5].final.finish_reason == "stop"


def test_cancelled_rows_leave_the_batch(model, tokenizer):
    engine = Engine(model, tokenizer)
    kept, dropped = Recorder(), Recorder()
    engine.submit(EngineRequest(ids_of(tokenizer, PROMPTS[0]), GenerationConfig(max_new_tokens=8)), kept)
    sequence = engine.submit(EngineRequest(ids_of(tokenizer, PROMPTS[2]), GenerationConfig(max_new_tokens=8)), dropped)
    engine.step()
    sequence.cancel()
    engine.step()
    assert engine.stats()["running"] == 1
    run_until_idle(engine)
    assert kept.final.completion_tokens == 8 and dropped.final is None


def test_a_full_queue_refuses_new_requests(model, tokenizer):
    engine = Engine(model, tokenizer, max_queue=2)
    request = EngineRequest(ids_of(tokenizer, PROMPTS[1]), GenerationConfig(max_new_tokens=2))
    engine.submit(request, Recorder())
    engine.submit(request, Recorder())
    with pytest.raises(QueueFull):
        engine.submit(request, Recorder())


def test_a_failed_forward_pass_fails_its_requests_and_the_engine_goes_on(model, tokenizer):
    calls = {"count": 0}
    original = model.forward

    def flaky(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 2:
            raise RuntimeError("out of memory")
        return original(*args, **kwargs)

    engine = Engine(model, tokenizer)
    failed, later = Recorder(), Recorder()
    request = EngineRequest(ids_of(tokenizer, PROMPTS[0]), GenerationConfig(max_new_tokens=5))
    model.forward = flaky
    try:
        engine.submit(request, failed)
        run_until_idle(engine)
        engine.submit(request, later)
        run_until_idle(engine)
    finally:
        del model.forward
    assert "out of memory" in failed.final.error
    assert later.text == alone(model, tokenizer, request)


def test_listen_delivers_events_into_the_event_loop_from_the_engine_thread(model, tokenizer):
    request = EngineRequest(ids_of(tokenizer, PROMPTS[3]), GenerationConfig(max_new_tokens=9))
    engine = Engine(model, tokenizer)

    async def read():
        return [event async for event in engine.listen(request)]

    engine.start()
    try:
        events = asyncio.run(read())
    finally:
        engine.stop()
    assert "".join(event.text for event in events) == alone(model, tokenizer, request)
    assert events[-1].final and events[-1].completion_tokens == 9


def test_the_kv_cache_shrinks_when_long_rows_leave(model, tokenizer):
    """After the longest row finishes, the padding columns only it needed are cut."""
    engine = Engine(model, tokenizer)
    long_prompt = ids_of(tokenizer, PROMPTS[2] * 3)
    engine.submit(EngineRequest(long_prompt, GenerationConfig(max_new_tokens=2)), Recorder())
    short = Recorder()
    engine.submit(EngineRequest(ids_of(tokenizer, PROMPTS[1]), GenerationConfig(max_new_tokens=6)), short)
    engine.step()
    engine.step()
    assert engine.stats()["running"] == 1
    assert engine._mask.shape[1] == len(ids_of(tokenizer, PROMPTS[1])) + 2
    assert torch.equal(engine._mask, torch.ones_like(engine._mask))
    run_until_idle(engine)
    assert short.final.completion_tokens == 6


def test_a_request_with_tools_gets_the_likeliest_offered_call(model, tokenizer):
    """The request's CallConstraint runs inside the engine: scored candidates fork the engine's own cache."""
    import json

    from steered import Preferring
    from sftkit.constrained import ToolCallGuide
    from sftkit.tools import offered_tools

    opener, closer = "<|startofthink|>", "<|endofthink|>"
    weather = {"name": "weather", "parameters": [{"name": "city", "enum": ["Paris", "Oslo"], "required": True}]}
    book = {"name": "book_table", "parameters": [{"name": "people", "type": "integer", "minimum": 1, "maximum": 9,
                                                  "required": True}]}
    tools = offered_tools(f"Tools:\n1. {json.dumps(weather)}\n2. {json.dumps(book)}")
    liked = '{"api_name": "weather", "parameters": {"city": "Oslo"}}'
    pushed = Preferring(model, list(ids_of(tokenizer, opener)), list(ids_of(tokenizer, liked + closer)),
                        list(ids_of(tokenizer, '{"api_name": "book_table", "parameters": {"people": 2}}' + closer)))
    prompt = ids_of(tokenizer, "<|im_start|>user\nweather in Oslo?<|im_end|>\n<|im_start|>assistant\n")
    texts = []
    for constraint in (None, ToolCallGuide(tokenizer, "chatml").constraint([tools])):
        engine, recorder = Engine(pushed, tokenizer), Recorder()
        engine.submit(EngineRequest(prompt, GenerationConfig(max_new_tokens=60), stop_after=(closer,),
                                    constraint=constraint), recorder)
        run_until_idle(engine)
        texts.append(recorder.text)
    assert texts[0].startswith(opener + '{"api_name": "b') and texts[1] == opener + liked + closer
