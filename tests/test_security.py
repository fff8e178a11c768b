"""Nothing read from a checkpoint or the cache runs code: malicious pickles planted as every file resume, chat,
merge and the tokenized-data cache read never execute (the marker file is never made); manifests catch
truncation and edits and name the file; DeepSpeed state is refused unless this user's key signed it."""
import json
import os
import stat

import pytest
import torch
from click.testing import CliRunner

from sftkit import manifest
from sftkit.checkpoint import check_files
from sftkit.config import MergeConfig, TrainConfig
from sftkit.chat import merge
from sftkit.data import cache, prepare
from sftkit.errors import CheckpointError
from sftkit.inference import load_for_inference
from sftkit.train import train
from sftkit_cli.main import main


class Payload:
    """Unpickling this runs `touch marker`: what an attacker's file would do if sftkit unpickled it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path, marker) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"state": Payload(marker)}, path)


def test_the_payload_does_run_when_unpickled(tmp_path):
    """The test's own premise: the planted file is really malicious."""
    plant(str(tmp_path / "evil.pt"), tmp_path / "marker")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert (tmp_path / "marker").exists()


READ_BY_RESUME = ["optimizer.pt", "training_state.json", "rng.json", "rng.safetensors", "adapter_model.safetensors",
                  "trainer_state.json"]


@pytest.mark.parametrize("with_manifest", [True, False], ids=["manifest", "no-manifest"])
@pytest.mark.parametrize("name", READ_BY_RESUME + ["adapter_config.json", "tokenizer.json"])
def test_resume_never_unpickles_a_planted_file(name, with_manifest, run_copy, run_config, tmp_path):
    """With the manifest the swapped file is named before anything loads; without it, each reader refuses what is
    not its data format (files resume does not read are left alone)."""
    marker = tmp_path / "marker"
    checkpoint = run_copy / "checkpoint-2"
    plant(str(checkpoint / name), marker)
    if not with_manifest:
        os.remove(checkpoint / "manifest.json")
    resume = run_config(tmp_path / "unused", resume_from_checkpoint=str(checkpoint))
    if with_manifest or name in READ_BY_RESUME:
        with pytest.raises(CheckpointError, match=name):
            train(resume)
    else:
        train(resume)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["training_state.pt", "adapter_model.bin", "pytorch_model.bin", "rng_state.pth"])
def test_planted_pickles_beside_a_checkpoint_are_never_read(name, run_copy, run_config, tmp_path):
    """Old or foreign file names (the pickled training_state.pt of earlier sftkit, peft's and HF's .bin) are ignored."""
    marker = tmp_path / "marker"
    plant(str(run_copy / "checkpoint-2" / name), marker)
    best = train(run_config(tmp_path / "unused", resume_from_checkpoint=str(run_copy / "checkpoint-2")))
    assert best.startswith(str(run_copy)) and not marker.exists()
    load_for_inference(str(run_copy / "checkpoint-2"))
    merge(MergeConfig(ckpt_dir=str(run_copy / "checkpoint-2"), output_dir=str(tmp_path / "merged")))
    assert not marker.exists()


@pytest.mark.parametrize("with_manifest", [True, False], ids=["manifest", "no-manifest"])
@pytest.mark.parametrize("command", ["chat", "merge"])
def test_chat_and_merge_never_unpickle_the_adapter(command, with_manifest, run_copy, tmp_path):
    marker = tmp_path / "marker"
    checkpoint = run_copy / "checkpoint-2"
    plant(str(checkpoint / "adapter_model.safetensors"), marker)
    if not with_manifest:
        os.remove(checkpoint / "manifest.json")
    result = CliRunner().invoke(main, [command, "--ckpt_dir", str(checkpoint)], input="")
    assert result.exit_code == 1 and "adapter_model.safetensors" in result.output, result.output
    assert isinstance(result.exception, SystemExit) and not marker.exists()


def test_a_full_weights_checkpoint_is_read_from_safetensors_only(run_config, tmp_path):
    """A full checkpoint whose weights were swapped for a pickled pytorch_model.bin is refused, not unpickled."""
    run = tmp_path / "full"
    train(run_config(run, sft_type="full", max_steps=2, learning_rate=1e-3))
    checkpoint = run / "checkpoint-2"
    marker = tmp_path / "marker"
    os.remove(checkpoint / "model.safetensors")
    os.remove(checkpoint / "manifest.json")
    plant(str(checkpoint / "pytorch_model.bin"), marker)
    with pytest.raises(CheckpointError, match="holds no weights"):
        load_for_inference(str(checkpoint))
    assert not marker.exists()


def test_deepspeed_state_is_refused_unless_signed_or_trusted(run_copy, run_config, tmp_path):
    """DeepSpeed unpickles its own files: a checkpoint this user did not sign (or with files its manifest does not
    list) is refused before DeepSpeed starts, and the error names the flag."""
    marker = tmp_path / "marker"
    checkpoint = run_copy / "checkpoint-2"
    plant(str(checkpoint / "deepspeed" / "mp_rank_00_model_states.pt"), marker)
    with pytest.raises(CheckpointError, match="not in its signed manifest.*--trust_checkpoint true"):
        check_files(str(checkpoint), resume=True)
    os.remove(checkpoint / "manifest.json")
    with pytest.raises(CheckpointError, match="not signed by this user's sftkit.*--trust_checkpoint true"):
        check_files(str(checkpoint), resume=True)
    assert check_files(str(checkpoint), resume=True, trust=True).listed is False  # the user's explicit choice
    manifest.write(str(checkpoint))  # signed with this user's key, the DeepSpeed files listed: trusted
    assert check_files(str(checkpoint), resume=True).signed
    assert not marker.exists()


def test_a_manifest_signed_with_another_key_is_not_trusted(run_copy, tmp_path, monkeypatch):
    checkpoint = str(run_copy / "checkpoint-2")
    assert manifest.verify(checkpoint).signed
    monkeypatch.setenv(manifest.KEY_ENV, str(tmp_path / "other.key"))
    verified = manifest.verify(checkpoint)
    assert verified.listed and not verified.signed


def test_the_key_is_private_and_made_once(tmp_path, monkeypatch):
    path = tmp_path / "keys" / "checkpoint.key"
    monkeypatch.setenv(manifest.KEY_ENV, str(path))
    key = manifest.signing_key(create=True)
    assert len(key) == 32 and manifest.signing_key(create=True) == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700


@pytest.mark.parametrize("change,message", [
    (lambda c: open(c / "adapter_model.safetensors", "r+b").truncate(100), "adapter_model.safetensors has 100 bytes"),
    (lambda c: (c / "trainer_state.json").write_text((c / "trainer_state.json").read_text().replace('"step": 2', '"step": 3')),
     "trainer_state.json was changed after saving"),
    (lambda c: os.remove(c / "adapter_config.json"), "adapter_config.json is missing"),
    (lambda c: (c / "manifest.json").write_text("{"), "manifest.json is not valid JSON"),
    (lambda c: (c / "manifest.json").write_text('{"format": "sftkit-checkpoint-manifest", "version": 1, "files": '
                                                '{"../x": {"size": 1, "sha256": "0"}}}'), "outside its folder"),
], ids=["truncated", "edited-step", "missing", "bad-manifest", "escaping-path"])
def test_manifest_names_the_file_that_does_not_match(change, message, run_copy):
    checkpoint = run_copy / "checkpoint-4"
    change(checkpoint)
    with pytest.raises(CheckpointError, match=message):
        check_files(str(checkpoint), resume=False)


def test_inference_needs_only_the_files_it_reads(run_copy):
    """Deleting the optimizer state (to save space) keeps a checkpoint usable for chat, infer, eval and merge."""
    checkpoint = run_copy / "checkpoint-4"
    os.remove(checkpoint / "optimizer.pt")
    check_files(str(checkpoint), resume=False)
    with pytest.raises(CheckpointError, match="optimizer.pt is missing"):
        check_files(str(checkpoint), resume=True)


# --- the tokenized-data cache ------------------------------------------------------------------------------------


@pytest.fixture
def cached(tokenizer, chat_data, tmp_path, monkeypatch):
    """(settings, entry folder) of a fresh private cache holding the chat data's examples."""
    monkeypatch.setattr(cache, "cache_dir", lambda: tmp_path / "cache")
    settings = TrainConfig(dataset=(chat_data,), template="chatml", dataset_test_ratio=0.25)
    first = prepare.prepare_data(settings, tokenizer)
    key = cache.dataset_key([chat_data], "chatml", tokenizer,
                            {name: getattr(settings, name) for name in prepare.KEY_FIELDS} | {"val": []})
    return settings, first, cache.cache_path(key)


def test_cache_entry_is_data_only_and_private(cached):
    _, _, entry = cached
    assert sorted(os.listdir(entry)) == ["conversations.jsonl", "entry.json", "tokens.safetensors"]
    assert stat.S_IMODE(os.stat(entry).st_mode) == 0o700 and stat.S_IMODE(os.stat(os.path.dirname(entry)).st_mode) == 0o700
    assert all(stat.S_IMODE(os.stat(os.path.join(entry, name)).st_mode) == 0o600 for name in os.listdir(entry))


@pytest.mark.parametrize("name", ["tokens.safetensors", "conversations.jsonl", "entry.json"])
def test_a_planted_cache_file_is_rebuilt_never_executed(name, cached, tokenizer, tmp_path, capsys, monkeypatch):
    settings, first, entry = cached
    marker = tmp_path / "marker"
    plant(os.path.join(entry, name), marker)
    calls = []
    monkeypatch.setattr(prepare, "tokenize_data", lambda *args: calls.append(1) or first)
    again = prepare.prepare_data(settings, tokenizer)
    assert calls and not marker.exists() and "does not check out" in capsys.readouterr().out
    assert again == first and cache.load(os.path.basename(entry)) == first  # rebuilt, and good again


def test_an_entry_whose_record_was_rewritten_to_match_is_still_not_unpickled(cached, tokenizer, tmp_path):
    """An attacker who also rewrites entry.json's hashes gets a safetensors parse error, not code execution."""
    _, _, entry = cached
    marker = tmp_path / "marker"
    plant(os.path.join(entry, "tokens.safetensors"), marker)
    record = json.load(open(os.path.join(entry, "entry.json")))
    record["files"]["tokens.safetensors"] = manifest.describe(os.path.join(entry, "tokens.safetensors"))
    json.dump(record, open(os.path.join(entry, "entry.json"), "w"))
    assert cache.load(os.path.basename(entry), say=lambda text: None) is None and not marker.exists()


def test_cached_examples_equal_fresh_ones(cached, tokenizer):
    settings, first, entry = cached
    assert cache.load(os.path.basename(entry)) == first == prepare.tokenize_data(settings, tokenizer)
