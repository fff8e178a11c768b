"""The activation estimate against what autograd really keeps, the checkpointing plan, and out-of-memory advice."""
import importlib
import json
import re
import sys

import pytest
import torch
from click.testing import CliRunner

import tiny
from sftkit import memory
from sftkit.attention import use_varlen_attention
from sftkit.config import ConfigError, TrainConfig, build_config
from sftkit.data.pipeline import collate
from sftkit.lora import LoRAConfig, inject_lora
from sftkit.loss import loss_sum
from sftkit.memory import (CheckpointPlan, ModelShape, NotEnoughMemory, apply_plan, choose_plan, estimate_activations,
                           explain_out_of_memory, parse_memory)


def model_for(tokenizer, arch="llama", lora_rank=4, dropout=0.0, attention="sdpa"):
    torch.manual_seed(0)
    model = tiny.make_model(tokenizer, arch=arch)
    if attention == "varlen":
        use_varlen_attention(model)
    elif attention == "eager":
        model.set_attn_implementation("eager")
    if lora_rank:
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        inject_lora(model, LoRAConfig(r=lora_rank, alpha=8, dropout=dropout, target_modules="all-linear"))
        tiny.randomize_lora_B(model)
    return model.train()


def padded_batch(tokenizer, rows=4, width=48):
    generator = torch.Generator().manual_seed(0)
    examples = []
    for row in range(rows):
        ids = torch.randint(10, 500, (width - 7 * row,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return collate(examples, tokenizer.pad_token_id)


def saved_bytes(model, batch) -> tuple[int, int]:
    """Bytes of the distinct tensors autograd saves for backward (parameters excluded), and the trainable tokens."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        _, trainable = loss_sum(model, batch)
    return sum(saved.values()), trainable


CASES = [("llama", 4, 0.0, "sdpa"), ("llama", 4, 0.0, "varlen"), ("llama", 4, 0.1, "varlen"), ("llama", 0, 0.0, "varlen"),
         ("llama", 4, 0.0, "eager"), ("qwen2", 4, 0.0, "varlen"), ("qwen2", 0, 0.0, "sdpa")]


@pytest.mark.parametrize("arch,rank,dropout,attention", CASES)
def test_estimate_matches_what_autograd_keeps(tokenizer, arch, rank, dropout, attention):
    model = model_for(tokenizer, arch, rank, dropout, attention)
    batch = padded_batch(tokenizer)
    measured, trainable = saved_bytes(model, batch)
    estimate = estimate_activations(ModelShape.from_config(model.config), batch["input_ids"].numel(), trainable,
                                    lora_rank=rank, lora_dropout=dropout > 0, full=rank == 0, attention=attention,
                                    sequence=batch["input_ids"].shape[1])
    assert estimate.layers * estimate.per_layer + estimate.logits == pytest.approx(measured, rel=0.12)


@pytest.mark.parametrize("part", ["mlp", "attention", "layer"])
def test_checkpointed_parts_give_the_same_gradients_and_keep_less(tokenizer, part):
    batch = padded_batch(tokenizer)
    results = []
    for plan in (CheckpointPlan(), CheckpointPlan(part, 2)):
        model = model_for(tokenizer, dropout=0.1, attention="varlen")  # dropout: the recompute must replay its masks
        assert len(apply_plan(model, plan)) == plan.layers
        kept, trainable = saved_bytes(model, batch)
        torch.manual_seed(1)
        model.zero_grad()
        loss_sum(model, batch)[0].backward()
        results.append((kept, [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (plain, expected), (checkpointed, grads) = results
    for want, got in zip(expected, grads):
        torch.testing.assert_close(got, want)
    estimate = estimate_activations(ModelShape.from_config(model.config), batch["input_ids"].numel(), trainable,
                                    lora_rank=4, lora_dropout=True, attention="varlen")
    assert plain - checkpointed == pytest.approx(2 * estimate.saving(part), rel=0.2)


def test_checkpointing_is_skipped_without_gradients(tokenizer):
    model = model_for(tokenizer)
    apply_plan(model, CheckpointPlan("layer", 2))
    with torch.no_grad():
        summed, _ = loss_sum(model.eval(), padded_batch(tokenizer))
    assert torch.isfinite(summed)


def shape_estimate():
    shape = ModelShape(layers=30, hidden=576, intermediate=1536, heads=9, kv_heads=3, head_dim=64, vocab=49152)
    return estimate_activations(shape, 4 * 1024, 2000, attention="varlen")


def test_plan_is_nothing_while_the_estimate_fits():
    estimate = shape_estimate()
    assert choose_plan(estimate, 10**9, None) == CheckpointPlan()
    assert choose_plan(estimate, 10**9, 10**9 + estimate.activations(CheckpointPlan())) == CheckpointPlan()


def test_plan_recomputes_the_fewest_flops_that_fit():
    estimate, fixed = shape_estimate(), 10**9
    unchecked = fixed + estimate.activations(CheckpointPlan())
    small = choose_plan(estimate, fixed, unchecked - estimate.saving("mlp"))
    assert small == CheckpointPlan("mlp", 1)  # the MLP frees the most per recomputed FLOP here
    tight = choose_plan(estimate, fixed, unchecked - 30 * estimate.saving("mlp") - estimate.saving("layer"))
    assert tight.part == "layer" and tight.layers < 30
    assert fixed + estimate.activations(tight) <= unchecked - 30 * estimate.saving("mlp") - estimate.saving("layer")
    assert choose_plan(estimate, fixed, fixed) == CheckpointPlan("layer", 30)  # nothing fits: everything, and a warning
    assert choose_plan(estimate, fixed, unchecked - estimate.saving("mlp"), parts=("layer",)).part == "layer"


def test_memory_sizes_parse():
    assert parse_memory("24GB") == 24 * 2**30 and parse_memory("900 MiB") == 900 * 2**20 and parse_memory("1.5gb") == 3 * 2**29
    assert parse_memory("auto") == "auto" and parse_memory("none") is None and parse_memory(None) is None
    with pytest.raises(ConfigError, match="max_memory must be a size such as 24GB"):
        build_config(TrainConfig, overrides={"max_memory": "lots"})


def test_train_prints_the_estimate_and_checkpoints_under_a_budget(tiny_model_dir, tmp_path, capsys):
    from sftkit.train import train

    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"query": f"What is {a} plus 2?", "response": f"{a + 2}."}) for a in range(8)))
    train(TrainConfig(model=tiny_model_dir, dataset=(str(data),), template="chatml", max_steps=1, batch_size=4, eval_steps=10,
                      output_dir=str(tmp_path / "out"), add_output_dir_suffix=False, max_memory="1KB", dataset_cache=False))
    printed = capsys.readouterr().out
    assert "attention: sftkit_varlen" in printed
    assert re.search(r"estimated peak memory per micro-batch of \d+ tokens \(4 rows, no padding\)", printed)  # padding-free
    assert "to fit the budget: checkpointing whole layers in 2 of 2 layers" in printed
    assert "warning: the estimate exceeds the budget even so" in printed


OUT_OF_MEMORY = [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.30 GiB"), MemoryError(),
                 RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                              "you tried to allocate 9985589248 bytes.")]


@pytest.mark.parametrize("error", OUT_OF_MEMORY, ids=["cuda", "python", "cpu-allocator"])
def test_out_of_memory_names_the_options_that_lower_the_need(error):
    def run(config):
        raise error

    with pytest.raises(NotEnoughMemory) as raised:
        explain_out_of_memory(run)(TrainConfig(batch_size=4, max_length=1024))
    message = str(raised.value)
    assert all(flag in message for flag in ("--batch_size", "--max_length", "--gradient_checkpointing", "--packing"))
    assert "(now 4)" in message and "(now 1024)" in message and raised.value.__cause__ is error


def test_other_errors_pass_through():
    def run(config):
        raise RuntimeError("shapes do not match")

    with pytest.raises(RuntimeError, match="shapes do not match"):
        explain_out_of_memory(run)(TrainConfig())


def test_cli_reports_out_of_memory_in_one_line(monkeypatch):
    from sftkit_cli.main import main

    def run(config):
        raise MemoryError()

    monkeypatch.setattr(importlib.import_module("sftkit.train"), "train", explain_out_of_memory(run))
    result = CliRunner().invoke(main, ["train", "--batch_size", "8"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "Error: out of memory" in result.output and "--batch_size (now 8)" in result.output


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_heap_threshold_leaves_a_user_setting_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert memory.limit_heap_fragmentation() is False
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    assert memory.limit_heap_fragmentation() is True


def test_a_padding_free_micro_batch_is_its_longest_rows_together(tokenizer):
    model = tiny.make_model(tokenizer)
    rows = [{"input_ids": [5] * length, "labels": [5] * length} for length in (10, 50, 20, 30)]
    said = []
    padded = memory.prepare_memory(model, TrainConfig(batch_size=2), torch.device("cpu"), rows, said.append)
    flat = memory.prepare_memory(model, TrainConfig(batch_size=2), torch.device("cpu"), rows, said.append, padding_free=True)
    estimates = [line for line in said if "estimated peak memory" in line]
    assert "micro-batch of 2 x 50 tokens" in estimates[0] and "micro-batch of 80 tokens (2 rows, no padding)" in estimates[1]
    assert flat < padded
    split = memory.prepare_memory(model, TrainConfig(batch_size=2), torch.device("cpu"), rows, said.append, padding_free=True,
                                  forward_tokens=40)
    packed = memory.prepare_memory(model, TrainConfig(batch_size=2, packing=True), torch.device("cpu"), rows, said.append,
                                   forward_tokens=40)
    estimates = [line for line in said if "estimated peak memory" in line]
    assert "2 rows in forward passes of at most 50 tokens" in estimates[2] == estimates[3]  # a longer row alone
    assert split == packed < flat
