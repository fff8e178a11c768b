from types import SimpleNamespace

import pytest
import torch

import tiny
from sftkit.data.templates import get_template
from sftkit.generation import (
    GenerationConfig,
    generate_batch,
    generate_stream,
    generation_config,
    stop_criteria,
    visible_end,
)

PROMPTS = ["What is the capital of France?", "hello", "Translate to Chinese: hello world, the quick brown fox."]


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny.make_model(tokenizer, seed=1).eval()


class ScriptedModel(torch.nn.Module):
    """A stand-in causal LM whose every row writes the token ids of `script` in order, whatever it is given."""

    def __init__(self, script: list[int], vocab_size: int):
        super().__init__()
        from transformers import LlamaConfig

        self.script, self.step = script, 0
        self.config = LlamaConfig(vocab_size=vocab_size, hidden_size=8, num_hidden_layers=1, num_attention_heads=2)
        self.prompts = []

    @property
    def device(self):
        return torch.device("cpu")

    def forward(self, input_ids, past_key_values=None, **_):
        if past_key_values.get_seq_length() == 0 and self.step == 0:
            self.prompts.append(input_ids.tolist())
        logits = torch.zeros(input_ids.shape[0], 1, self.config.vocab_size)
        logits[:, -1, self.script[min(self.step, len(self.script) - 1)]] = 1.0
        self.step += 1
        return SimpleNamespace(logits=logits, past_key_values=past_key_values)


def ids_of(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def scripted(tokenizer, text, extra=()):
    return ScriptedModel(ids_of(tokenizer, text) + list(extra), len(tokenizer))


def test_greedy_stream_equals_hf_generate(model, tokenizer):
    prompt = ids_of(tokenizer, PROMPTS[0])
    config = GenerationConfig(max_new_tokens=24)
    streamed = "".join(generate_stream(model, tokenizer, prompt, config))
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=24, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    new = out[0, len(prompt):].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    assert streamed == tokenizer.decode(new)


def test_generation_runs_without_dropout_and_restores_the_mode(tokenizer):
    model = tiny.make_model(tokenizer, seed=1)
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.9
    model.train()
    prompt = ids_of(tokenizer, PROMPTS[0])
    texts = {"".join(generate_stream(model, tokenizer, prompt, GenerationConfig(max_new_tokens=8))) for _ in range(2)}
    assert len(texts) == 1 and model.training


def test_cache_gives_the_no_cache_result(model, tokenizer):
    """The reference recomputes the whole sequence every step."""
    ids = ids_of(tokenizer, PROMPTS[2])
    generated = []
    with torch.no_grad():
        for _ in range(16):
            token = int(model(torch.tensor([ids + generated]), use_cache=False).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            generated.append(token)
    assert "".join(generate_stream(model, tokenizer, ids, GenerationConfig(max_new_tokens=16))) == tokenizer.decode(generated)


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_left_padded_batch_equals_rows(model, tokenizer, penalty):
    config = GenerationConfig(max_new_tokens=12, repetition_penalty=penalty)
    prompts = [ids_of(tokenizer, text) for text in PROMPTS]
    assert len({len(p) for p in prompts}) == 3  # padding differs per row
    batch = generate_batch(model, tokenizer, prompts, config)
    assert batch == ["".join(generate_stream(model, tokenizer, p, config)) for p in prompts]


def test_batch_rows_stop_independently(tokenizer):
    """Every row follows the same script; the row whose stop string comes first stops, the other runs on."""
    fake = scripted(tokenizer, "Hello world<|endofthink|> more")
    prompts = [ids_of(tokenizer, "hi"), ids_of(tokenizer, "a longer prompt")]
    replies = generate_batch(fake, tokenizer, prompts, GenerationConfig(max_new_tokens=12), stop_after=("<|endofthink|>",))
    assert replies == ["Hello world<|endofthink|>"] * 2
    both = generate_batch(scripted(tokenizer, "Hello world"), tokenizer, prompts, GenerationConfig(max_new_tokens=5))
    assert both == ["Hello world"] * 2


def test_stop_string_is_cut_and_never_half_shown(tokenizer):
    fake = scripted(tokenizer, "Hello world<|endofthink|> more")
    pieces = list(generate_stream(fake, tokenizer, [1], GenerationConfig(max_new_tokens=20), stop_strings=("<|endofthink|>",)))
    assert "".join(pieces) == "Hello world"
    assert not any("<" in piece for piece in pieces)


def test_stop_after_keeps_the_stop_string(tokenizer):
    fake = scripted(tokenizer, "Hello world<|endofthink|> more")
    text = "".join(generate_stream(fake, tokenizer, [1], GenerationConfig(max_new_tokens=20), stop_after=("<|endofthink|>",)))
    assert text == "Hello world<|endofthink|>"


def test_stop_tokens_and_eos(tokenizer):
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    fake = scripted(tokenizer, "Hello", extra=[im_start] + ids_of(tokenizer, " more"))
    assert "".join(generate_stream(fake, tokenizer, [1], GenerationConfig(max_new_tokens=20), stop_token_ids=(im_start,))) == "Hello"
    fake = scripted(tokenizer, "Hello", extra=[tokenizer.eos_token_id] + ids_of(tokenizer, " more"))
    assert "".join(generate_stream(fake, tokenizer, [1], GenerationConfig(max_new_tokens=20))) == "Hello"


def test_partial_stop_string_at_the_end_is_released(tokenizer):
    fake = scripted(tokenizer, "Hello <|", extra=[tokenizer.eos_token_id])
    assert "".join(generate_stream(fake, tokenizer, [1], GenerationConfig(max_new_tokens=20), stop_strings=("<|endofthink|>",))) == "Hello <|"


def test_split_characters_are_released_whole(tokenizer):
    text = "你好猫 ok"
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids_of(tokenizer, text))  # the tokenizer splits 猫
    fake = scripted(tokenizer, text, extra=[tokenizer.eos_token_id])
    pieces = list(generate_stream(fake, tokenizer, [1], GenerationConfig(max_new_tokens=20)))
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_unfinished_character_at_the_end_decodes_like_the_tokenizer(tokenizer):
    ids = ids_of(tokenizer, "猫")
    fake = ScriptedModel(ids, len(tokenizer))
    text = "".join(generate_stream(fake, tokenizer, [1], GenerationConfig(max_new_tokens=len(ids) - 1)))
    assert text == tokenizer.decode(ids[:-1])
    before_eos = ScriptedModel(ids[:-1] + [tokenizer.eos_token_id], len(tokenizer))
    assert generate_batch(before_eos, tokenizer, [[1]], GenerationConfig(max_new_tokens=9)) == [text]


def test_sampling_is_reproducible_with_a_seed(model, tokenizer):
    prompt = ids_of(tokenizer, PROMPTS[1])

    def sample(**options):
        return "".join(generate_stream(model, tokenizer, prompt, GenerationConfig(max_new_tokens=16, do_sample=True, **options)))

    assert sample(seed=7) == sample(seed=7)
    assert sample(seed=7) != sample(seed=8)
    greedy = "".join(generate_stream(model, tokenizer, prompt, GenerationConfig(max_new_tokens=16)))
    assert sample(seed=7, top_k=1) == greedy
    assert sample(seed=7, top_p=1e-6) == greedy


def test_visible_end_holds_back_a_possible_stop_string():
    assert visible_end("Hello <|end", ("<|endofthink|>",)) == (6, False)
    assert visible_end("Hello <|endofthink|> x", ("<|endofthink|>",)) == (6, True)
    assert visible_end("Hello <|endofthink|> x", (), ("<|endofthink|>",)) == (20, True)
    assert visible_end("Hello", ("<|endofthink|>",)) == (5, False)


def test_stop_criteria_from_a_template(tokenizer):
    strings, token_ids = stop_criteria(tokenizer, get_template("chatml"))
    assert strings == () and token_ids == (tokenizer.convert_tokens_to_ids("<|endoftext|>"),)  # <|im_end|> is eos
    strings, token_ids = stop_criteria(tokenizer, get_template("llama3"))
    assert strings == ("<|end_of_text|>", "<|eot_id|>") and token_ids == ()  # several tokens each here


def test_generation_config_from_any_options_and_validation():
    options = SimpleNamespace(max_new_tokens=5, do_sample=True, temperature=0.7, top_k=3, top_p=0.9,
                              repetition_penalty=1.1, seed=1, agent=True)
    assert generation_config(options) == GenerationConfig(5, True, 0.7, 3, 0.9, 1.1, 1)
    with pytest.raises(ValueError, match="temperature.*top_p"):
        GenerationConfig(temperature=0, top_p=1.5)


def test_generation_passes_the_cache_as_the_model_takes_it_without_warnings(model, tokenizer):
    """transformers 5.24 renamed past_key_values to cache and warns on the old name at every step; 5.17 has only
    the old one. Whichever the model's forward takes is used, so no FutureWarning is printed."""
    import inspect
    import warnings

    from sftkit.generation import cache_argument

    assert cache_argument(model) == ("cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values")
    assert cache_argument(ScriptedModel([1], 10)) == "past_key_values"
    ids = [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in PROMPTS]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate_batch(model, tokenizer, ids, GenerationConfig(max_new_tokens=3))
