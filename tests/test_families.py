"""Model families for real: each architecture the registry calls `tested` trains, merges and generates here through
the CLI, and ChatGLM's layout (a stand-in with its remote code's shape, loaded as remote code) trains like the rest."""
import copy
import importlib.util
import json
import math
import os

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import tiny
from sftkit.architecture import output_head
from sftkit.data.formats import Message
from sftkit.data.pipeline import IGNORE_INDEX, build_example, collate
from sftkit.lora import LoRAConfig, inject_lora
from sftkit.loss import backbone_hidden, loss_sum
from sftkit.model import load_model_and_tokenizer
from sftkit.registry import MODELS, TESTED_ARCHITECTURES, register_model
from sftkit_cli.main import main

# The registered model type whose template and default LoRA targets each architecture's tiny model trains with.
ENTRIES = {"llama": "llama3.2-1b-instruct", "mistral": "mistral-7b-instruct", "qwen2": "qwen2.5-0.5b-instruct",
           "qwen3": "qwen3-0.6b", "gemma": "gemma-2b-it", "gemma2": "gemma2-2b-it", "gemma3_text": "gemma3-1b-it",
           "gemma3": "gemma3-4b-it", "phi3": "phi3-mini-4k-instruct", "bloom": "seqgpt-560m", "gpt2": "polylm-chat-13b"}
ROWS = [{"query": f"What is {a} plus {a}?", "response": f"{a} plus {a} is {2 * a}."} for a in range(6)]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("families") / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return str(path)


def cli(*args):
    result = CliRunner().invoke(main, [str(arg) for arg in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def train_merge_infer(data_file, run_dir, *model_args):
    """sftkit train (2 steps), merge and infer (on the adapter and on the merged model): the run's checkpoint,
    the merged folder and both inference results."""
    cli("train", *model_args, "--dataset", data_file, "--max_steps", 2, "--learning_rate", 1e-2, "--lora_dropout", 0,
        "--dataset_test_ratio", 0, "--dataset_cache", "false", "--output_dir", run_dir, "--add_output_dir_suffix", "false")
    checkpoint = os.path.join(run_dir, "checkpoint-2")
    merged = cli("merge", "--ckpt_dir", checkpoint).output.strip().rsplit(" ", 1)[-1]
    results = []
    for folder in (checkpoint, merged):
        output = os.path.join(run_dir, f"{os.path.basename(folder)}.jsonl")
        cli("infer", "--ckpt_dir", folder, "--dataset", data_file, "--max_new_tokens", 4, "--output", output)
        with open(output, encoding="utf-8") as handle:
            results.append([json.loads(line) for line in handle])
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as handle:
        losses = [record["loss"] for record in map(json.loads, handle) if "loss" in record]
    return checkpoint, merged, losses, results


def assert_trained_merged_and_generated(checkpoint, merged, losses, results):
    assert losses and all(math.isfinite(loss) for loss in losses)
    adapter = load_file(os.path.join(checkpoint, "adapter_model.safetensors"))
    assert any(key.endswith("lora_B.weight") and value.abs().sum() > 0 for key, value in adapter.items())
    on_adapter, on_merged = results
    assert len(on_adapter) == len(ROWS) and all(isinstance(row["prediction"], str) for row in on_adapter)
    # Greedy generation from the merged weights is what the base plus the adapter generates.
    assert [row["prediction"] for row in on_merged] == [row["prediction"] for row in on_adapter]
    assert os.path.isfile(os.path.join(merged, "config.json")) and not os.path.exists(os.path.join(merged, "adapter_config.json"))


def test_every_tested_architecture_has_an_entry_here():
    assert sorted(ENTRIES) == sorted(TESTED_ARCHITECTURES)
    assert all(MODELS[model_type].architecture == arch for arch, model_type in ENTRIES.items())


@pytest.mark.parametrize("architecture", TESTED_ARCHITECTURES)
def test_architecture_trains_merges_and_generates(architecture, data_file, tmp_path):
    """Through `--model_type`, so the entry's template, default LoRA targets and patch are what runs."""
    entry = MODELS[ENTRIES[architecture]]
    base = tiny.save_tiny(tmp_path / "base", arch=architecture)
    model_type = f"test-{architecture}"
    register_model(model_type, base, entry.lora_target_modules, entry.template, entry.patch, architecture=architecture)
    try:
        outcome = train_merge_infer(data_file, tmp_path / "run", "--model_type", model_type,
                                    "--lora_target_modules", "DEFAULT")
    finally:
        del MODELS[model_type]
    assert_trained_merged_and_generated(*outcome)
    merged_model = AutoModelForCausalLM.from_pretrained(outcome[1])
    assert type(merged_model).__name__ == json.load(open(os.path.join(base, "config.json")))["architectures"][0]


# -- ChatGLM2/3's layout --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def glm_dir(tmp_path_factory):
    return tiny.save_tinyglm(tmp_path_factory.mktemp("tinyglm"))


@pytest.fixture(scope="module")
def glm(glm_dir):
    model, tokenizer, _ = load_model_and_tokenizer(glm_dir, trust_remote_code=True)
    return model, tokenizer


def glm_batch(tokenizer, square=False):
    """Two conversations, or as many copies of one as it has tokens (a square batch)."""
    conversations = [[Message("user", f"What is {a} plus {a}?"), Message("assistant", f"{2 * a}.")] for a in (1, 7)]
    examples = [build_example(c, tokenizer=tokenizer, template="chatglm3") for c in conversations]
    if square:
        examples = examples[:1] * len(examples[0]["input_ids"])
    return collate(examples, tokenizer.pad_token_id)


def test_chatglm_layout_trains_merges_and_generates(glm_dir, data_file, tmp_path):
    outcome = train_merge_infer(data_file, tmp_path / "run", "--model", glm_dir, "--trust_remote_code", "true",
                                "--template", "chatglm3", "--lora_target_modules", "query_key_value")
    assert_trained_merged_and_generated(*outcome)
    assert os.path.isfile(os.path.join(outcome[1], "modeling_tinyglm.py"))  # the merged model keeps its code


def test_chatglm_head_is_found_and_stays_out_of_all_linear(glm):
    model, _ = glm
    assert model.get_output_embeddings() is None
    assert output_head(model) is model.transformer.output_layer
    names = inject_lora(copy.deepcopy(model), LoRAConfig())
    assert "transformer.output_layer" not in names and "transformer.encoder.layers.0.self_attention.query_key_value" in names


@pytest.mark.parametrize("square", [False, True], ids=["batch", "square-batch"])  # square: shapes cannot tell the layout
def test_sequence_first_hidden_states_give_the_models_own_loss(glm, square):
    model, tokenizer = glm
    batch = glm_batch(tokenizer, square)
    assert (batch["input_ids"].shape[0] == batch["input_ids"].shape[1]) is square
    with torch.no_grad():
        total, count = loss_sum(model, batch)
        expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert backbone_hidden(model, batch).shape[:2] == batch["input_ids"].shape
    torch.testing.assert_close(total / count, expected)


def test_an_unknown_layout_trains_on_the_models_own_logits(glm, monkeypatch):
    model, tokenizer = glm
    batch = glm_batch(tokenizer, square=True)
    monkeypatch.setattr(model.config, "model_type", "not-chatglm")  # no hint: a square batch is ambiguous
    assert backbone_hidden(model, batch) is None
    with torch.no_grad():
        total, count = loss_sum(model, batch)
        expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    torch.testing.assert_close(total / count, expected)


def test_chatglm_templates_write_special_tokens_as_ids(glm):
    """ChatGLM's tokenizer reads "[gMASK]" typed as text as seven characters; the template puts in its one id."""
    _, tokenizer = glm
    example = build_example([Message("user", "hi"), Message("assistant", "ok"), Message("user", "and?"),
                             Message("assistant", "no")], tokenizer=tokenizer, template="chatglm3")
    ids = tokenizer.convert_tokens_to_ids
    gmask, sop, user, assistant = ids("[gMASK]"), ids("sop"), ids("<|user|>"), ids("<|assistant|>")
    assert len(tokenizer("[gMASK]", add_special_tokens=False)["input_ids"]) == 7
    text = lambda value: tokenizer(value, add_special_tokens=False)["input_ids"]  # noqa: E731
    expected = ([gmask, sop, user] + text("\nhi") + [assistant] + text("\nok") + [user] + text("\nand?") + [assistant]
                + text("\nno") + [user])
    assert example["input_ids"] == expected
    trained = [token for token, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    assert trained == text("ok") + [user] + text("no") + [user]  # each answer and the <|user|> that ends it


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_qlora_keeps_chatglms_output_layer_unquantized(glm_dir):
    from sftkit.quant import QuantizationOptions, is_quantized_linear

    model, _, _ = load_model_and_tokenizer(glm_dir, trust_remote_code=True, quantization=QuantizationOptions(bits=4))
    assert is_quantized_linear(model.transformer.encoder.layers[0].self_attention.query_key_value)
    assert type(model.transformer.output_layer) is torch.nn.Linear


def test_chatglm_replies_stop_at_its_role_tokens(glm):
    from sftkit.data.templates import get_template
    from sftkit.generation import stop_criteria

    _, tokenizer = glm
    strings, ids = stop_criteria(tokenizer, get_template("chatglm3"))
    assert {tokenizer.convert_tokens_to_ids("<|user|>"), tokenizer.convert_tokens_to_ids("<|observation|>")} <= set(ids)
    assert "<|user|>" in strings  # typed as text it is several tokens: matched as text too
