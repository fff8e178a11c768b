"""DeepSpeed ZeRO-2 / ZeRO-3 with 2 CPU processes (gloo): same losses as one plain process, exact resume, exports."""
import importlib.util
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from launch import assert_same_losses, options, records, torchrun
from sftkit.config import TrainConfig, build_config
from sftkit.config import ConfigError
from sftkit.deepspeed import fill_config
from sftkit.train import train

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ds") / "train.jsonl"
    rows = [{"query": f"What is {a} minus {b}?", "response": f"{a} minus {b} is {a - b}."} for a in range(5) for b in range(4)]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return str(path)


@needs_deepspeed
@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_zero_matches_single_process_and_resumes(stage, tiny_model_dir, data_file, tmp_path):
    torchrun(options(tiny_model_dir, data_file, tmp_path / "ds", batch_size=2, deepspeed=stage))
    single = tmp_path / "single"
    train(TrainConfig(**{**options(tiny_model_dir, data_file, single), "dataset": (data_file,), "batch_size": 4}))
    assert_same_losses(tmp_path / "ds", single, 1e-4)
    exported = load_file(str(tmp_path / "ds" / "checkpoint-4" / "adapter_model.safetensors"))
    reference = load_file(str(single / "checkpoint-4" / "adapter_model.safetensors"))
    for key in reference:
        torch.testing.assert_close(exported[key], reference[key], rtol=1e-3, atol=1e-5)
    assert os.path.isdir(tmp_path / "ds" / "checkpoint-2" / "deepspeed")

    copy = tmp_path / "resumed"
    shutil.copytree(tmp_path / "ds", copy)
    shutil.rmtree(copy / "checkpoint-4")
    torchrun(options(tiny_model_dir, data_file, tmp_path / "unused", batch_size=2, deepspeed=stage,
                     resume_from_checkpoint=copy / "checkpoint-2"))
    resumed = load_file(str(copy / "checkpoint-4" / "adapter_model.safetensors"))
    for key in resumed:
        torch.testing.assert_close(resumed[key], exported[key], rtol=0, atol=1e-7)


@needs_deepspeed
@pytest.mark.slow
@pytest.mark.parametrize("extra", [
    {"dataset_test_ratio": 0.05},  # 1 validation example on 2 ranks: one rank has none
    {"dataset_test_ratio": 0.15, "predict_with_generate": True, "eval_generation_limit": 3, "eval_max_new_tokens": 4},
], ids=["odd-validation-count", "predict-with-generate"])
def test_zero3_evaluation_needs_every_rank_and_finishes(extra, tiny_model_dir, data_file, tmp_path):
    """Under ZeRO-3 every forward needs every rank: uneven shards and generation must not hang."""
    torchrun(options(tiny_model_dir, data_file, tmp_path, batch_size=2, deepspeed="zero3", max_steps=2, eval_steps=1,
                     **extra), timeout=180)
    evaluations = [r for r in records(tmp_path) if "eval_loss" in r]
    assert [r["step"] for r in evaluations] == [1, 2] and all(r["eval_loss"] > 0 for r in evaluations)
    if extra.get("predict_with_generate"):
        assert all("eval_rouge_l" in r for r in evaluations)


def test_auto_values_are_filled_from_the_training_options():
    config = fill_config("zero3", micro_batch=2, accumulation=4, world_size=8, max_grad_norm=0.5,
                         compute_dtype=torch.bfloat16, hidden_size=64)
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"], config["train_batch_size"]) == (2, 4, 64)
    assert config["gradient_clipping"] == 0.5 and config["bf16"]["enabled"] is True and config["fp16"]["enabled"] is False
    assert config["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    assert not any(value == "auto" for value in json.dumps(config).split('"') if value == "auto")


def test_conflicting_explicit_value_is_an_error(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=8"):
        fill_config(str(path), micro_batch=2, accumulation=1, world_size=1, max_grad_norm=1.0, compute_dtype=torch.float32)


@pytest.mark.parametrize("values,message", [
    ({"deepspeed": "zero2", "devices": "cpu,cpu"}, "deepspeed and model parallel"),
    ({"sft_type": "full", "quantization_bit": "4"}, "quantization_bit needs sft_type lora"),
    ({"deepspeed": "zero3", "quantization_bit": "4"}, "does not train under DeepSpeed ZeRO-3: ZeRO-3 splits every weight"),
    ({"deepspeed": "zero3_offload", "quantization_bit": "8"}, "Use ZeRO-2 .* or plain DDP for QLoRA"),
])
def test_wrong_combinations_fail_early(values, message):
    with pytest.raises(ConfigError, match=message):
        build_config(TrainConfig, None, values)


def test_quantized_base_is_allowed_with_zero2(tmp_path):
    stage3 = tmp_path / "mine.json"
    stage3.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert build_config(TrainConfig, None, {"deepspeed": "zero2", "quantization_bit": "4"}).quantization_bit == 4
    with pytest.raises(ConfigError, match="ZeRO-3"):
        build_config(TrainConfig, None, {"deepspeed": str(stage3), "quantization_bit": "4"})


@needs_deepspeed
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_qlora_under_zero2_equals_one_process(tiny_model_dir, data_file, tmp_path):
    """QLoRA with ZeRO-2 as the seed's scripts run it: ZeRO-2 shards the adapters' optimizer state and gradients, and
    every rank holds its own quantized base. Evaluation only at the end: on CPU, bitsandbytes repacks 4-bit weights
    at the first evaluation, which shifts later losses a little."""
    qlora = dict(batch_size=2, quantization_bit=4, eval_steps=4, save_steps=2)
    torchrun(options(tiny_model_dir, data_file, tmp_path / "ds", deepspeed="zero2", **qlora))
    single = tmp_path / "single"
    train(TrainConfig(**{**options(tiny_model_dir, data_file, single, **qlora), "dataset": (data_file,), "batch_size": 4}))
    assert_same_losses(tmp_path / "ds", single, 1e-4)
    exported = load_file(str(tmp_path / "ds" / "checkpoint-4" / "adapter_model.safetensors"))
    expected = load_file(str(single / "checkpoint-4" / "adapter_model.safetensors"))
    for key in expected:  # ZeRO-2 reduces in its own order: a few elements differ in the last digits
        torch.testing.assert_close(exported[key], expected[key], rtol=1e-3, atol=1e-4)


def test_a_quantized_checkpoint_is_refused_under_zero3(tokenizer):
    """A GPTQ checkpoint is quantized without quantization_bit: the backend refuses it under ZeRO-3 too."""
    import tiny
    from sftkit.backend import build_backend
    from sftkit.distributed import World
    from sftkit.errors import TrainingError

    model = tiny.make_model(tokenizer)
    model.hf_quantizer = object()  # what transformers attaches to a quantized checkpoint
    with pytest.raises(TrainingError, match="does not train under DeepSpeed ZeRO-3"):
        build_backend(TrainConfig(deepspeed="zero3"), model, world=World(), devices=["cpu"],
                      compute_dtype=torch.float32, total_steps=1)
