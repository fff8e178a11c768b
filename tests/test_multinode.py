"""Past one machine: ms-swift's launch variables, two simulated nodes of this machine (gloo on 127.0.0.1) that
equal one process, FSDP2 that equals one process and resumes exactly, and what stays per node or global."""
import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

import tiny
from launch import assert_same_losses, nodes, options, records, torchrun
from sftkit import distributed
from sftkit.checkpoint import require_shared
from sftkit.config import ConfigError, TrainConfig, build_config
from sftkit.distributed import LaunchError, World, launch_command, process_world
from sftkit.errors import CheckpointError, TrainingError
from sftkit.fsdp import Strategy, parse_strategy
from sftkit.train import rank_devices, train

TWO_NODES = {"NNODES": "2", "NODE_RANK": "1", "NPROC_PER_NODE": "4", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29501"}
SRUN_RANK = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
             "MASTER_ADDR": "10.0.0.1"}


# -- launching ---------------------------------------------------------------------------------------------------


def test_each_node_reruns_itself_under_torchrun_with_static_rendezvous():
    command = launch_command(TWO_NODES, ["train", "--max_steps", "2"])
    assert command[1:3] == ["-m", "torch.distributed.run"]
    assert set(command[3:8]) == {"--nproc_per_node=4", "--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.1",
                                 "--master_port=29501"}
    assert command[8:] == ["-m", "sftkit_cli.main", "train", "--max_steps", "2"]


def test_c10d_rendezvous_when_asked():
    command = launch_command({**TWO_NODES, "RDZV_BACKEND": "c10d", "RDZV_ID": "job7"}, ["train"])
    assert {"--rdzv_backend=c10d", "--rdzv_endpoint=10.0.0.1:29501", "--rdzv_id=job7"} <= set(command)
    assert not any(part.startswith("--node_rank") for part in command)


def test_one_node_without_a_port_picks_a_free_one():
    command = launch_command({"NPROC_PER_NODE": "2"}, ["train"])
    assert "--standalone" in command and "--nproc_per_node=2" in command


def test_the_node_rank_of_an_srun_task_per_node():
    command = launch_command({**TWO_NODES, "NODE_RANK": "", "SLURM_NODEID": "1"}, ["train"])
    assert "--node_rank=1" in command


@pytest.mark.parametrize("env", [
    {},
    {"NPROC_PER_NODE": "1"},
    {**TWO_NODES, "LOCAL_RANK": "0", "RANK": "4", "WORLD_SIZE": "8"},  # torchrun or deepspeed started this process
    SRUN_RANK,  # srun started every rank
], ids=["nothing-asked", "one-process", "under-torchrun-or-deepspeed", "under-srun"])
def test_no_relaunch(env):
    assert launch_command(env, ["train"]) is None


@pytest.mark.parametrize("env,message", [
    ({"NNODES": "2", "NODE_RANK": "0"}, "NNODES=2 needs MASTER_ADDR"),
    ({"NNODES": "2", "MASTER_ADDR": "10.0.0.1"}, "NNODES=2 needs NODE_RANK"),
    ({"NPROC_PER_NODE": "two"}, "NPROC_PER_NODE must be an integer, got 'two'"),
    ({**TWO_NODES, "RDZV_BACKEND": "etcd"}, "RDZV_BACKEND must be static or c10d, got 'etcd'"),
])
def test_launch_variables_that_describe_no_run(env, message):
    with pytest.raises(LaunchError, match=message):
        launch_command(env, ["train"])


@pytest.mark.parametrize("env,world,init_method", [
    ({"LOCAL_RANK": "1", "RANK": "5", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}, World(5, 8, 1, 4), "env://"),
    ({"LOCAL_RANK": "1", "RANK": "5", "WORLD_SIZE": "8", "LOCAL_SIZE": "4"}, World(5, 8, 1, 4), "env://"),  # deepspeed
    (SRUN_RANK, World(5, 8, 1, 4), "tcp://10.0.0.1:29500"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}, World(), None),  # an sbatch script itself, not an srun task
], ids=["torchrun", "deepspeed", "srun", "sbatch-script"])
def test_the_place_of_this_process_from_its_launcher(env, world, init_method):
    assert process_world(env) == (world, init_method)


def test_srun_ranks_need_the_address_of_the_first_node():
    with pytest.raises(LaunchError, match="MASTER_ADDR is not set"):
        process_world({key: value for key, value in SRUN_RANK.items() if key != "MASTER_ADDR"})


def test_the_cli_runs_in_place_under_a_launcher_and_takes_deepspeeds_local_rank(monkeypatch):
    from click.testing import CliRunner

    from sftkit_cli import main as cli_main

    ran, relaunched = [], []
    for key, value in {**TWO_NODES, "LOCAL_RANK": "0", "RANK": "4", "WORLD_SIZE": "8"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr("sftkit.distributed.run_launcher", lambda command: relaunched.append(command) or 0)
    monkeypatch.setattr(sys.modules["sftkit.train"], "train", lambda config: ran.append(config.max_steps))
    result = CliRunner().invoke(cli_main.main, ["--local_rank=0", "train", "--max_steps", "2"])
    assert result.exit_code == 0, result.output
    assert ran == [2] and relaunched == []


def test_a_bad_launch_variable_is_a_one_line_error(monkeypatch):
    from click.testing import CliRunner

    from sftkit_cli import main as cli_main

    monkeypatch.setenv("NNODES", "2")
    for key in ("MASTER_ADDR", "LOCAL_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    result = CliRunner().invoke(cli_main.main, ["train", "--max_steps", "2"])
    assert result.exit_code == 1 and "NNODES=2 needs MASTER_ADDR" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("visible,world,expected", [
    (4, World(5, 8, 1, 4), ["cuda:1"]),  # node 1 of 2, four GPUs: its local rank picks the GPU
    (8, World(5, 8, 1, 4), ["cuda:2", "cuda:3"]),
    (1, World(5, 8, 1, 4), ["cuda:0"]),  # the launcher shows each rank only its own GPU
])
def test_each_rank_takes_its_share_of_its_own_nodes_gpus(monkeypatch, visible, world, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    assert rank_devices(TrainConfig(), world) == expected


def test_more_ranks_on_a_node_than_gpus_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(TrainingError, match="4 ranks on this node but only 2 GPUs"):
        rank_devices(TrainConfig(), World(5, 8, 1, 4))


# -- per node and global -----------------------------------------------------------------------------------------


def test_a_folder_another_rank_cannot_see_stops_every_rank(monkeypatch, tmp_path):
    monkeypatch.setattr(distributed, "gather", lambda value, world: [value, False, value])
    with pytest.raises(CheckpointError, match="not visible from rank 1 of 3: .* filesystem every node shares"):
        require_shared(str(tmp_path), World(0, 3))


def _prepare_on_one_node(rank: int, folder: str, data_files: list[str], port: int) -> None:
    """One rank of a two-rank node: prepare each dataset, record whether this rank tokenized and what it got."""
    import torch.distributed as dist

    import sftkit.data.prepare as prepare

    os.environ["SFTKIT_CACHE"] = os.path.join(folder, "cache")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    original = prepare.tokenize_data
    outcomes = []
    for data_file in data_files:
        tokenized = []
        prepare.tokenize_data = lambda *args, **kwargs: tokenized.append(rank) or original(*args, **kwargs)
        config = TrainConfig(dataset=(data_file,), template="chatml", dataset_test_ratio=0.2)
        try:
            examples, _ = prepare.prepare_data(config, tiny.make_tokenizer(), lambda *a: None, World(rank, 2, rank, 2))
            outcomes.append({"tokenized": len(tokenized), "examples": [e["input_ids"] for e in examples]})
        except Exception as error:  # reported to the test: a rank that raises must not leave the other waiting
            outcomes.append({"tokenized": len(tokenized), "error": f"{type(error).__name__}: {error}"})
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as handle:
        json.dump(outcomes, handle)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def one_node(tmp_path_factory, data_file):
    """What each of a node's two ranks did with good data, then with a bad row."""
    from launch import _free_port

    folder = tmp_path_factory.mktemp("node")
    bad = folder / "bad.jsonl"
    bad.write_text('{"query": "no response"}\n')
    processes = mp.spawn(_prepare_on_one_node, args=(str(folder), [data_file, str(bad)], _free_port()), nprocs=2,
                         join=False)
    for _ in range(24):  # a rank left waiting would hang here, so give up after two minutes
        if processes.join(timeout=5):
            break
    else:
        for process in processes.processes:
            process.kill()
        pytest.fail("a rank never finished preparing the data")
    return folder, [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.slow
def test_the_tokenized_cache_is_built_once_per_node(one_node):
    folder, ((first, _), (second, _)) = one_node
    assert (first["tokenized"], second["tokenized"]) == (1, 0)  # the node's first rank built it, the other waited
    assert first["examples"] == second["examples"] and first["examples"]
    assert not [name for name in os.listdir(folder / "cache" / "datasets") if name.endswith(".tmp")]


@pytest.mark.slow
def test_bad_data_stops_every_rank_of_the_node(one_node):
    _, ((_, first), (_, second)) = one_node
    assert "error" in first and "bad.jsonl" in first["error"]
    assert second["error"].startswith("SftkitError: rank 0 could not prepare the data")


# -- two simulated nodes and FSDP2 against one process ---------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The tokenized-data cache of the launched runs (all of them, on every simulated node): a temporary folder."""
    return {"SFTKIT_CACHE": str(tmp_path_factory.mktemp("cache"))}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("nodes") / "train.jsonl"
    rows = [{"query": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."} for a in range(5) for b in range(4)]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return str(path)


def run_options(model_dir, data_file, output_dir, **extra):
    """The runs compared here. Adam turns rounding noise in a gradient coordinate near zero into a step of up to
    the learning rate (seen: one adapter weight of thousands off by 2e-5 at 5e-3), so the rate is small."""
    return options(model_dir, data_file, output_dir, **{"learning_rate": 1e-3, **extra})


@pytest.fixture(scope="module")
def single(tiny_model_dir, data_file, tmp_path_factory):
    """One process with the global batch (2) of two ranks with batch 1 each."""
    folder = tmp_path_factory.mktemp("single")
    train(TrainConfig(**{**run_options(tiny_model_dir, data_file, folder), "dataset": (data_file,), "batch_size": 2}))
    return folder


def assert_same_run(run, reference, tolerance=1e-5):
    assert_same_losses(run, reference, tolerance)
    for step in (2, 4):
        exported = load_file(str(run / f"checkpoint-{step}" / "adapter_model.safetensors"))
        expected = load_file(str(reference / f"checkpoint-{step}" / "adapter_model.safetensors"))
        assert exported.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(exported[key], expected[key], rtol=0, atol=tolerance)


def resume_copy(run, tmp_path):
    """The run folder as it was after checkpoint-2 (its checkpoint-4 removed), to resume from."""
    copy = tmp_path / "resumed"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoint-4")
    return copy


@pytest.fixture(scope="module")
def two_nodes(tiny_model_dir, data_file, cache, tmp_path_factory):
    """A run on two simulated nodes of one process each; both publish into one cache folder, atomically."""
    run = tmp_path_factory.mktemp("two-nodes") / "run"
    return run, nodes(run_options(tiny_model_dir, data_file, run, batch_size=1), **cache)


@pytest.mark.slow
def test_two_nodes_equal_one_process(two_nodes, single):
    run, launched = two_nodes
    assert "world size 2" in launched[0].stdout and "world size" not in launched[1].stdout
    assert_same_run(run, single)
    # Global rank 0 alone wrote the run's files: one line per step and evaluation, one of each file.
    assert len(records(run)) == 6 and sorted(os.listdir(run)).count("checkpoint-2") == 1


@pytest.mark.slow
def test_two_nodes_resume_from_their_checkpoint(two_nodes, tiny_model_dir, data_file, cache, tmp_path):
    run, _ = two_nodes
    copy = resume_copy(run, tmp_path)
    nodes(run_options(tiny_model_dir, data_file, tmp_path / "unused", batch_size=1, resume_from_checkpoint=copy / "checkpoint-2"),
          **cache)
    resumed = load_file(str(copy / "checkpoint-4" / "adapter_model.safetensors"))
    for key, value in load_file(str(run / "checkpoint-4" / "adapter_model.safetensors")).items():
        assert torch.equal(resumed[key], value), key


@pytest.fixture(scope="module")
def fsdp_run(tiny_model_dir, data_file, cache, tmp_path_factory):
    run = tmp_path_factory.mktemp("fsdp") / "run"
    torchrun(run_options(tiny_model_dir, data_file, run, batch_size=1, fsdp="full_shard auto_wrap"), **cache)
    return run


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft's, not ours
def test_fsdp_equals_one_process_and_exports_a_peft_adapter(fsdp_run, single, tiny_model_dir, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sftkit.lora import load_adapter

    assert_same_run(fsdp_run, single)
    assert sorted(os.listdir(fsdp_run / "checkpoint-4" / "fsdp")) == [
        "param_groups.json", "shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors"]
    input_ids = torch.randint(0, len(tokenizer), (2, 10), generator=torch.Generator().manual_seed(0))
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), fsdp_run / "checkpoint-4")
    ours = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    load_adapter(ours, str(fsdp_run / "checkpoint-4"))
    torch.testing.assert_close(tiny.logits(theirs, input_ids), tiny.logits(ours, input_ids))
    assert not torch.equal(tiny.logits(ours, input_ids), tiny.logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                                                      input_ids))


@pytest.mark.slow
def test_fsdp_resumes_exactly_from_its_sharded_checkpoint(fsdp_run, tiny_model_dir, data_file, cache, tmp_path):
    copy = resume_copy(fsdp_run, tmp_path)
    torchrun(run_options(tiny_model_dir, data_file, tmp_path / "unused", batch_size=1, fsdp="full_shard auto_wrap",
                         resume_from_checkpoint=copy / "checkpoint-2"), **cache)
    resumed = load_file(str(copy / "checkpoint-4" / "adapter_model.safetensors"))
    for key, value in load_file(str(fsdp_run / "checkpoint-4" / "adapter_model.safetensors")).items():
        assert torch.equal(resumed[key], value), key
    # The resume dropped the copied log's records after step 2 and logged steps 3 and 4 again.
    continued = [(r["step"], r.get("loss"), r.get("eval_loss")) for r in records(copy) if r["step"] > 2]
    assert continued == [(r["step"], r.get("loss"), r.get("eval_loss")) for r in records(fsdp_run) if r["step"] > 2]


@pytest.mark.slow
def test_fsdp_full_fine_tuning_of_a_tied_model_with_accumulation_and_checkpointing(data_file, cache, tmp_path):
    """A head tied to the embeddings shares their unit; gradients reduce only at the window's end; the export is a
    transformers model that loads as is, its head still tied."""
    from transformers import AutoModelForCausalLM

    model_dir = tiny.save_tiny(tmp_path / "tied", tied=True)
    values = options(model_dir, data_file, tmp_path / "fsdp", sft_type="full", max_steps=2, batch_size=1,
                     gradient_accumulation_steps=2, learning_rate=1e-3)
    torchrun({**values, "fsdp": "shard_grad_op offload", "gradient_checkpointing": True}, **cache)
    train(TrainConfig(**{**values, "dataset": (data_file,), "batch_size": 2, "output_dir": str(tmp_path / "single")}))
    assert_same_losses(tmp_path / "fsdp", tmp_path / "single", 1e-5)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "checkpoint-2")
    expected = AutoModelForCausalLM.from_pretrained(tmp_path / "single" / "checkpoint-2")
    assert exported.lm_head.weight is exported.model.embed_tokens.weight
    for (name, value), (_, reference) in zip(exported.state_dict().items(), expected.state_dict().items()):
        torch.testing.assert_close(value, reference, rtol=0, atol=1e-5, msg=name)
    assert not torch.equal(exported.model.embed_tokens.weight,
                           AutoModelForCausalLM.from_pretrained(model_dir).model.embed_tokens.weight)


@contextlib.contextmanager
def _no_unpickling():
    """Reading a file with pickle or torch.load fails inside (the process group's own messages still flow)."""
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint file was unpickled")

    saved = pickle.load, torch.load
    pickle.load, torch.load = refuse, refuse
    try:
        yield
    finally:
        pickle.load, torch.load = saved


def _fsdp_steps_on_one_node(rank: int, folder: str, port: int) -> None:
    """Two FSDP ranks and, beside them, one plain process with the same global batches: the loss of every window,
    the trained weights, then evaluation loss and greedy generation straight through the model (no root)."""
    import copy
    from contextlib import nullcontext
    from functools import partial

    import torch.distributed as dist

    from sftkit import fsdp
    from sftkit.backend import LossModule, TorchBackend
    from sftkit.data.pipeline import build_example, collate, trainable_tokens
    from sftkit.evaluate import evaluate_loss
    from sftkit.lora import LoRAConfig, inject_lora
    from sftkit.loss import loss_sum, without_metrics
    from sftkit.window import accumulate

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    world, single = World(rank, 2, rank, 2), World()
    tokenizer = tiny.make_tokenizer()
    rows = [{"query": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."} for a in range(4) for b in range(2)]
    examples = [build_example(row, tokenizer=tokenizer, template="chatml") for row in rows]
    loss_fn = partial(without_metrics, partial(loss_sum, chunk_size=3))  # the head runs several times per forward
    outcome = {}
    for case in ("untied-lora", "tied-full"):
        torch.manual_seed(0)
        model = tiny.make_model(tokenizer, tied=case.startswith("tied"))
        if case.endswith("lora"):
            inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0))
            tiny.randomize_lora_B(model)
        reference = copy.deepcopy(model)
        trained = [p for p in reference.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trained, lr=1e-3)
        plain = TorchBackend(LossModule(reference, loss_fn), reference, optimizer,
                             torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), None, max_grad_norm=1.0,
                             world=single)
        module = fsdp.shard(LossModule(model, loss_fn), strategy=Strategy(), world_size=2, device=torch.device("cpu"),
                            compute_dtype=torch.float32)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        sharded = fsdp.FSDPBackend(module, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
                                   max_grad_norm=1.0, world=world)
        losses = []
        for step in range(2):  # windows of two micro-batches, each a global batch of two examples
            window = [examples[4 * step + 2 * i:4 * step + 2 * i + 2] for i in range(2)]
            tokens = sum(trainable_tokens(e) for batch in window for e in batch)
            shards, whole_batches = [(batch[rank:rank + 1], 1.0) for batch in window], [(batch, 1.0) for batch in window]
            mine, _ = accumulate(sharded, shards, [collate(s, tokenizer.pad_token_id) for s, _ in shards],
                                 torch.device("cpu"), nullcontext(), tokens, world)
            theirs, _ = accumulate(plain, whole_batches, [collate(s, tokenizer.pad_token_id) for s, _ in whole_batches],
                                   torch.device("cpu"), nullcontext(), tokens, single)
            losses.append([distributed.sum_floats([float(mine)], world)[0] / tokens, float(theirs) / tokens])
            losses[-1] += [float(sharded.clip_gradients()), float(plain.clip_gradients())]
            sharded.step()
            plain.step()
        whole = {name: value.full_tensor() for name, value in model.state_dict().items()}
        weights = max((whole[name] - value).abs().max().item() for name, value in reference.state_dict().items())
        evaluation = [evaluate_loss(m, examples[:3], 2, tokenizer.pad_token_id, "cpu", nullcontext(), w, lockstep=True)
                      for m, w in ((model, world), (reference, single))]
        prompt = torch.tensor([examples[rank]["input_ids"][:8]])
        with torch.no_grad():
            generated = [m.generate(prompt, max_new_tokens=4, do_sample=False).tolist() for m in (model, reference)]
        saved = os.path.join(folder, case)
        os.makedirs(saved, exist_ok=True)
        sharded.save(saved)
        torch.manual_seed(1)  # a fresh model that only the checkpoint can make equal again
        fresh = tiny.make_model(tokenizer, tied=case.startswith("tied"))
        if case.endswith("lora"):
            inject_lora(fresh, LoRAConfig(r=4, alpha=8, dropout=0.0))
            fresh.load_state_dict(reference.state_dict() | {k: v for k, v in fresh.state_dict().items() if "lora" in k})
        fresh_module = fsdp.shard(LossModule(fresh, loss_fn), strategy=Strategy(), world_size=2,
                                  device=torch.device("cpu"), compute_dtype=torch.float32)
        fresh_optimizer = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-3)
        restored = fsdp.FSDPBackend(fresh_module, fresh_optimizer,
                                    torch.optim.lr_scheduler.LambdaLR(fresh_optimizer, lambda step: 1.0), max_grad_norm=1.0,
                                    world=world)
        with _no_unpickling():
            restored.load(saved)
        for backend in (sharded, restored):  # one more step each: the same weights only if the optimizer came back too
            batch = examples[rank:rank + 1]
            accumulate(backend, [(batch, 1.0)], [collate(batch, tokenizer.pad_token_id)], torch.device("cpu"), nullcontext(),
                       sum(trainable_tokens(e) for e in examples[:2]), world)
            backend.clip_gradients()
            backend.step()
        resumed = all(torch.equal(a.full_tensor(), b.full_tensor())
                      for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
        outcome[case] = {"losses": losses, "weights": weights, "eval": [e["eval_loss"] for e in evaluation],
                         "same_generation": generated[0] == generated[1], "resumed": resumed}
    with open(os.path.join(folder, f"fsdp{rank}.json"), "w") as handle:
        json.dump(outcome, handle)
    dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_steps_evaluates_and_generates_like_one_process_with_a_chunked_head(tmp_path):
    """The loss runs the backbone, then the head in chunks, never the model's forward: each owns its parameters, so
    training (through the root), evaluation and generation (straight through the model) all see whole weights;
    a saved backend, tied head or not, reloads without unpickling anything and takes the very same next step."""
    from launch import _free_port

    mp.spawn(_fsdp_steps_on_one_node, args=(str(tmp_path), _free_port()), nprocs=2, join=True)
    for case in ("untied-lora", "tied-full"):
        outcome = json.loads((tmp_path / "fsdp0.json").read_text())[case]
        for mine, theirs, my_norm, their_norm in outcome["losses"]:
            assert abs(mine - theirs) < 1e-5 and abs(my_norm - their_norm) < 1e-5, (case, outcome)
        assert outcome["weights"] < 1e-5 and abs(outcome["eval"][0] - outcome["eval"][1]) < 1e-5, (case, outcome)
        assert outcome["same_generation"] and outcome["resumed"], case


@pytest.mark.slow
def test_fsdp_evaluation_with_uneven_shards_and_generation_finishes(tiny_model_dir, data_file, cache, tmp_path):
    """Every forward needs every rank: 3 validation examples on 2 ranks, and generation, must not hang."""
    torchrun(options(tiny_model_dir, data_file, tmp_path, batch_size=1, fsdp="full_shard", max_steps=2, eval_steps=1,
                     dataset_test_ratio=0.15, predict_with_generate=True, eval_generation_limit=3, eval_max_new_tokens=4),
             timeout=180, **cache)
    evaluations = [r for r in records(tmp_path) if "eval_loss" in r]
    assert [r["step"] for r in evaluations] == [1, 2] and all("eval_rouge_l" in r for r in evaluations)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_the_deepspeed_launcher_starts_the_ranks_itself(tiny_model_dir, data_file, cache, tmp_path):
    """`deepspeed --module sftkit_cli.main train ...` passes --local_rank and its variables: sftkit runs in place."""
    from launch import _env, _free_port

    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(_free_port()),
               "--module", "sftkit_cli.main", "train"]
    command += [item for key, value in options(tiny_model_dir, data_file, tmp_path, max_steps=1, eval_steps=1).items()
                for item in (f"--{key}", str(value))]
    result = subprocess.run(command, capture_output=True, text=True, env={**_env(), **cache}, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "world size 2" in result.stdout and os.path.isdir(tmp_path / "checkpoint-1")


# -- FSDP options and the checkpoints of other backends ----------------------------------------------------------------


@pytest.mark.parametrize("text,strategy", [
    ("full_shard", Strategy()),
    ("full_shard auto_wrap", Strategy()),
    ("shard_grad_op", Strategy(reshard_after_forward=False)),
    ("full_shard auto_wrap offload", Strategy(offload=True)),
    ("offload", Strategy(offload=True)),
])
def test_fsdp_strategy_in_ms_swift_words(text, strategy):
    assert parse_strategy(text) == strategy


@pytest.mark.parametrize("flags,message", [
    ({"fsdp": "hybrid_shard"}, "fsdp must be full_shard or shard_grad_op"),
    ({"fsdp": "full_shard shard_grad_op"}, "fsdp must be full_shard or shard_grad_op"),
    ({"fsdp": "full_shard", "deepspeed": "zero3"}, "fsdp and deepspeed do not combine"),
    ({"fsdp": "full_shard", "quantization_bit": 4}, "fsdp and quantization_bit do not combine"),
    ({"fsdp": "full_shard", "devices": "cpu,cpu"}, "fsdp and devices do not combine"),
    ({"fsdp": "full_shard", "optim": "adamw_8bit"}, "use --optim adamw"),
    ({"fsdp": "full_shard", "dtype": "fp16"}, "bf16 or fp32"),
])
def test_fsdp_options_that_do_not_combine(flags, message):
    with pytest.raises(ConfigError, match=message):
        build_config(TrainConfig, None, flags)


@pytest.mark.slow
def test_a_checkpoint_resumes_only_with_the_backend_that_wrote_it(fsdp_run, tiny_model_dir, data_file, tmp_path):
    copy = resume_copy(fsdp_run, tmp_path)
    with pytest.raises(CheckpointError, match="saved by an FSDP run: resume it with the same --fsdp"):
        train(TrainConfig(**{**options(tiny_model_dir, data_file, tmp_path), "dataset": (data_file,),
                             "resume_from_checkpoint": str(copy / "checkpoint-2"), "ignore_args_mismatch": True}))


def test_fsdp_needs_several_processes(tiny_model_dir, data_file, tmp_path):
    with pytest.raises(TrainingError, match="--fsdp shards over several processes"):
        train(TrainConfig(**{**options(tiny_model_dir, data_file, tmp_path), "dataset": (data_file,), "fsdp": "full_shard"}))
