"""A resume cannot silently change the run; what a killed save leaves is cleaned up; a full disk during a save
leaves `latest` on the last good checkpoint; and a seeded kill -9 loop during saves never corrupts a checkpoint
or logs a step twice."""
import errno
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from sftkit import checkpoint as checkpoints
from sftkit.errors import CheckpointError, TrainingError
from sftkit.run import RESUME_FILE, pointer, read_run_args
from sftkit.train import train


def metric_steps(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        return [(record["step"], "loss" in record) for record in map(json.loads, handle)]


def test_resume_with_other_options_lists_every_difference(run_copy, run_config, tmp_path):
    changed = run_config(tmp_path / "unused", resume_from_checkpoint=str(run_copy / "checkpoint-2"), seed=7,
                         learning_rate=1e-3, batch_size=2)
    with pytest.raises(TrainingError, match=r"seed: was 42, now 7.*batch_size: was 1, now 2.*learning_rate: was 0.005, "
                                            r"now 0.001.*--ignore_args_mismatch true"):
        train(changed)


def test_ignored_mismatch_goes_on_and_is_recorded_beside_the_untouched_args(run_copy, run_config, tmp_path):
    original = (run_copy / "sft_args.json").read_bytes()
    train(run_config(tmp_path / "unused", resume_from_checkpoint=str(run_copy / "checkpoint-2"), learning_rate=1e-3,
                     ignore_args_mismatch=True))
    assert (run_copy / "sft_args.json").read_bytes() == original
    records = [json.loads(line) for line in open(run_copy / RESUME_FILE)]
    assert records[-1]["checkpoint"] == "checkpoint-2" and records[-1]["step"] == 2
    assert records[-1]["differences"] == ["learning_rate: was 0.005, now 0.001"]
    # Each checkpoint reports the options it was trained with.
    assert read_run_args(str(run_copy / "checkpoint-2"))["learning_rate"] == 0.005
    assert read_run_args(str(run_copy / "checkpoint-4"))["learning_rate"] == 0.001


def test_resume_drops_metrics_after_its_step_and_removes_leftovers(run_copy, run_config, tmp_path):
    (run_copy / "checkpoint-3.tmp").mkdir()
    (run_copy / "latest.tmp").write_text("checkpoint-3")
    with open(run_copy / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 3, "loss": 1.0}\n{"step": 4, "lo')  # cut short by a crash
    train(run_config(tmp_path / "unused", resume_from_checkpoint=str(run_copy / "checkpoint-2")))
    steps = metric_steps(run_copy)
    assert len(steps) == len(set(steps)) and [s for s, is_loss in steps if is_loss] == [1, 2, 3, 4]
    assert not (run_copy / "checkpoint-3.tmp").exists() and not (run_copy / "latest.tmp").exists()


def test_a_new_run_into_a_folder_holding_one_is_refused(trained_run, run_config):
    from sftkit.errors import OptionError

    with pytest.raises(OptionError, match="already holds a run.*--resume_from_checkpoint"):
        train(run_config(trained_run))


def test_disk_full_during_a_save_keeps_latest_on_the_last_good_checkpoint(run_config, tmp_path, monkeypatch):
    real = checkpoints.save_rng_states

    def full_at_step_4(folder, states):
        if folder.endswith("checkpoint-4.tmp"):
            raise OSError(errno.ENOSPC, "No space left on device", os.path.join(folder, "rng.json"))
        real(folder, states)

    monkeypatch.setattr(checkpoints, "save_rng_states", full_at_step_4)
    with pytest.raises(CheckpointError, match="could not save checkpoint-4: the disk is full.*still .*checkpoint-2"):
        train(run_config(tmp_path))
    assert pointer(str(tmp_path), "latest") == str(tmp_path / "checkpoint-2")
    assert not (tmp_path / "checkpoint-4.tmp").exists() and not (tmp_path / "checkpoint-4").exists()
    checkpoints.check_files(str(tmp_path / "checkpoint-2"), resume=True)


@pytest.mark.slow
def test_kill_9_during_saves_never_corrupts_a_checkpoint(tiny_model_dir, chat_data, tmp_path):
    """A seeded loop of 50 kill -9 at chosen file operations of the saves (kill_saves.py), then a clean finish:
    every `latest` verifies and resumes, no step is logged twice, and the weights equal an uninterrupted run's."""
    script = os.path.join(os.path.dirname(__file__), "kill_saves.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, script, tiny_model_dir, chat_data, str(tmp_path), "--cycles", "50", "--seed", "13"],
                            capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    print(figures)  # the reliability figures (pytest -s shows them)
    assert figures["cycles"] == 50 and figures["killed"] == 50
    assert figures["corrupt"] == 0 and figures["duplicate_metrics"] == 0 and figures["unresumable"] == 0
    final, reference = load_file(figures["final_adapter"]), load_file(figures["reference_adapter"])
    assert all(torch.equal(final[key], reference[key]) for key in reference)
