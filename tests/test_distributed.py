"""DDP on CPU with gloo (2 processes == 1 process with the same global batch), resume, and model parallel placement."""
import importlib.util
import json
import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

from sftkit.config import TrainConfig
from sftkit.data.pipeline import build_example, collate
from launch import assert_same_losses, options, records, stop_launched_run, torchrun
from sftkit.loss import loss_sum
from sftkit.placement import place, plan_placement
from sftkit.train import train


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddp") / "train.jsonl"
    rows = [{"query": f"What is {a} times {b}?", "response": f"{a} times {b} is {a * b}."} for a in range(5) for b in range(4)]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return str(path)


@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_global_batch(tiny_model_dir, data_file, tmp_path):
    torchrun(options(tiny_model_dir, data_file, tmp_path / "ddp", batch_size=2))
    train(TrainConfig(**{**options(tiny_model_dir, data_file, tmp_path / "single"), "dataset": (data_file,), "batch_size": 4}))
    assert_same_losses(tmp_path / "ddp", tmp_path / "single", 1e-5)
    ddp_weights = load_file(str(tmp_path / "ddp" / "checkpoint-4" / "adapter_model.safetensors"))
    single_weights = load_file(str(tmp_path / "single" / "checkpoint-4" / "adapter_model.safetensors"))
    for key in single_weights:
        torch.testing.assert_close(ddp_weights[key], single_weights[key], rtol=1e-4, atol=1e-5)
    # Only rank 0 wrote shared files: one line per step and evaluation, one checkpoint per save.
    assert len([r for r in records(tmp_path / "ddp") if "loss" in r]) == 4
    assert sorted(os.listdir(tmp_path / "ddp")).count("checkpoint-2") == 1

    # DDP resumes from its own checkpoint to the same weights.
    copy = tmp_path / "resumed"
    shutil.copytree(tmp_path / "ddp", copy)
    shutil.rmtree(copy / "checkpoint-4")
    torchrun(options(tiny_model_dir, data_file, tmp_path / "unused", batch_size=2, resume_from_checkpoint=copy / "checkpoint-2"))
    resumed = load_file(str(copy / "checkpoint-4" / "adapter_model.safetensors"))
    for key in resumed:
        assert torch.equal(resumed[key], ddp_weights[key]), key


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_qlora_under_ddp_equals_one_process(tiny_model_dir, data_file, tmp_path):
    """As the seed's scripts run QLoRA on several GPUs: each rank loads and quantizes its own copy of the base."""
    qlora = dict(batch_size=2, quantization_bit=4, ddp_backend="gloo")
    torchrun(options(tiny_model_dir, data_file, tmp_path / "ddp", **qlora))
    train(TrainConfig(**{**options(tiny_model_dir, data_file, tmp_path / "single", **qlora), "dataset": (data_file,),
                         "batch_size": 4}))
    assert_same_losses(tmp_path / "ddp", tmp_path / "single", 1e-5)
    assert json.load(open(tmp_path / "ddp" / "sft_args.json"))["quantization_bit"] == 4
    ddp_weights = load_file(str(tmp_path / "ddp" / "checkpoint-4" / "adapter_model.safetensors"))
    single_weights = load_file(str(tmp_path / "single" / "checkpoint-4" / "adapter_model.safetensors"))
    for key in single_weights:
        torch.testing.assert_close(ddp_weights[key], single_weights[key], rtol=1e-4, atol=1e-5)


def test_nproc_per_node_relaunches_under_torchrun(monkeypatch):
    from click.testing import CliRunner

    from sftkit_cli import main as cli_main

    seen = {}
    monkeypatch.setenv("NPROC_PER_NODE", "2")
    for variable in ("LOCAL_RANK", "NNODES", "MASTER_PORT", "SLURM_PROCID"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr("sftkit.distributed.run_launcher", lambda command: seen.setdefault("command", command) and 0)
    monkeypatch.setattr(cli_main.sys, "argv", ["sftkit", "train", "--max_steps", "2"])
    CliRunner().invoke(cli_main.main, ["train", "--max_steps", "2"])
    assert seen["command"][1:6] == ["-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1", "--standalone"]
    assert seen["command"][-5:] == ["-m", "sftkit_cli.main", "train", "--max_steps", "2"]


@pytest.mark.parametrize("sent,exit_code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_to_the_launching_sftkit_stops_every_rank_after_saving(sent, exit_code, tiny_model_dir, data_file, tmp_path):
    """`NPROC_PER_NODE=2 sftkit train` relaunches itself under torchrun: a stop signal to it (a scheduler's SIGTERM,
    a Ctrl-C) reaches the ranks once, they save and stop, and it exits with the code of a saved stop."""
    values = options(tiny_model_dir, data_file, tmp_path / "run", max_steps=100_000, eval_steps=100_000, save_steps=100_000)
    code, output, left = stop_launched_run(values, sent)
    assert code == exit_code, output[-3000:]
    assert left == [], "processes left running"
    saved = [name for name in os.listdir(tmp_path / "run") if name.startswith("checkpoint-")]
    assert len(saved) == 1 and output.count(f"checkpoint saved: {tmp_path / 'run' / saved[0]}") == 2  # both ranks


@pytest.mark.parametrize("sizes,devices,first,last,expected", [
    ([10] * 8, ["a", "b"], 0, 0, ["a"] * 4 + ["b"] * 4),
    ([10] * 8, ["a", "b"], 40, 0, ["a"] * 2 + ["b"] * 6),
    ([10] * 8, ["a", "b"], 0, 40, ["a"] * 6 + ["b"] * 2),
    ([10] * 8, ["a", "b", "c", "d"], 0, 0, ["a", "a", "b", "b", "c", "c", "d", "d"]),
    ([10, 30, 10, 10, 10, 10], ["a", "b"], 0, 0, ["a", "a", "b", "b", "b", "b"]),
    ([10] * 3, ["a", "b", "c"], 100, 100, ["b", "b", "c"]),  # a is full with the embeddings alone
    ([5] * 4, ["only"], 0, 0, ["only"] * 4),
])
def test_placement_plan(sizes, devices, first, last, expected):
    plan = plan_placement(sizes, devices, first, last)
    assert plan == expected
    assert plan == sorted(plan, key=devices.index)  # contiguous runs, in device order


def test_placed_model_gives_the_same_loss(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    batch = collate([build_example({"query": "What is 2 times 3?", "response": "6."}, tokenizer=tokenizer, template="chatml")],
                    tokenizer.pad_token_id)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    placed = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    devices = ["cpu", "cuda:0"] if torch.cuda.is_available() else ["cpu", "cpu"]
    mapping = place(placed, devices)
    assert mapping["layers.0"] == devices[0] and mapping["lm_head"] == devices[-1]
    expected, _ = loss_sum(plain, batch)
    got, _ = loss_sum(placed, batch)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-5)


def test_ranks_meet_before_they_leave_the_group(monkeypatch):
    from sftkit import distributed

    calls = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: calls.append("destroy"))
    distributed.shutdown(distributed.World(0, 2))
    distributed.shutdown(distributed.World())  # one process has no group to leave
    assert calls == ["barrier", "destroy"]
