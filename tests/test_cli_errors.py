"""Every mistake a user can make ends in one `Error: ...` line naming the file (exit 1, 2 for usage errors), never a
traceback; --debug shows one. Table-driven: command x bad input -> exit code and what the message names. Also:
checks run before the weights load, and the exit code of a run stopped by a signal."""
import json
import os
import shutil
import signal
import sys
import threading
import time

import pytest
import torch
from click.testing import CliRunner

from conftest import run_options
from sftkit.data import cache
from sftkit_cli.main import main


def argv(options: dict) -> list[str]:
    """A run's options as command-line flags."""
    args = []
    for key, value in options.items():
        values = value if isinstance(value, tuple) else (value,)
        args += [f"--{key}", *(str(v).lower() if isinstance(v, bool) else str(v) for v in values)]
    return args


def invoke(args, **kwargs):
    return CliRunner().invoke(main, [str(arg) for arg in args], **kwargs)


def assert_clean(result, code: int, names: str):
    """Exit code as expected, no traceback, one `Error:` whose text names `names`."""
    output = result.output
    assert result.exit_code == code, output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in output, output
    assert output.count("Error:") == 1, output
    assert names in output[output.index("Error:"):], output


def write(path, content):
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


# --- bad data and options: `train` (and `preview`) --------------------------------------------------------------

GOOD_ROW = b'{"query": "What is 1 plus 1?", "response": "2."}\n'
DATA_CASES = {
    "non-utf8": ("bad.jsonl", GOOD_ROW + b'{"query": "caf\xe9", "response": "x"}\n', 1, "bad.jsonl:2"),
    "non-utf8-csv": ("bad.csv", b"query,response\nhi,there\ncaf\xe9,x\n", 1, "bad.csv:3"),
    "empty": ("empty.jsonl", b"", 1, "empty.jsonl"),
    "header-only-csv": ("header.csv", b"instruction,output\n", 1, "header.csv"),
    "bad-json-line": ("broken.jsonl", GOOD_ROW + b'{"query": \n', 1, "broken.jsonl:2"),
}


@pytest.mark.parametrize("command", ["train", "preview"])
@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_data_is_one_line_naming_file_and_line(case, command, tiny_model_dir, tmp_path):
    name, content, code, names = DATA_CASES[case]
    data = write(tmp_path / name, content)
    args = ["--dataset", data, "--template", "chatml"]
    args += ["--tokenizer", tiny_model_dir] if command == "preview" else \
        ["--model", tiny_model_dir, "--output_dir", tmp_path / "out"]
    assert_clean(invoke([command, *args]), code, names)


def test_every_label_masked_says_how_many_rows_and_why(tiny_model_dir, chat_data, tmp_path):
    result = invoke(["train", "--model", tiny_model_dir, "--dataset", chat_data, "--template", "chatml", "--max_length", 4,
                     "--output_dir", tmp_path])
    assert_clean(result, 1, "train.jsonl")
    assert "all 15 training rows were dropped" in result.output and "raise --max_length" in result.output


def option_cases(tmp_path, chat_data):
    """id -> (extra train flags, exit code, what the message names)."""
    a_file = write(tmp_path / "not-a-folder", "x")
    bad_ds = write(tmp_path / "ds.json", "{not json")
    bad_yaml = write(tmp_path / "run.yaml", "model: [unclosed\n")
    return {
        "unknown-template": (["--template", "nosuch"], 2, "nosuch"),
        "lora-targets-match-nothing": (["--lora_target_modules", "qkv"], 2, "q_proj, k_proj, v_proj, o_proj"),
        "lora-regex-matches-nothing": (["--lora_target_modules", r".*\.attn_q"], 2, "lora_target_modules"),
        "negative-lora-alpha": (["--lora_alpha", "-5"], 2, "lora_alpha must be > 0"),
        "output-dir-is-a-file": (["--output_dir", a_file], 2, "not-a-folder is a file"),
        "deepspeed-config-missing": (["--deepspeed", tmp_path / "nosuch.json"], 2, "nosuch.json"),
        "deepspeed-config-not-json": (["--deepspeed", bad_ds], 2, "ds.json"),
        "config-file-not-yaml": (["--config", bad_yaml], 2, "run.yaml"),
        "bad-device-name": (["--device", "gpu"], 2, "device must be cpu, cuda or cuda:N"),
        "model-folder-missing": (["--model", tmp_path / "nosuch-model"], 1, "nosuch-model"),
        "resume-from-nothing": (["--resume_from_checkpoint", tmp_path / "nosuch-run"], 1, "nosuch-run"),
    }


OPTION_CASES = ["unknown-template", "lora-targets-match-nothing", "lora-regex-matches-nothing", "negative-lora-alpha",
                "output-dir-is-a-file", "deepspeed-config-missing", "deepspeed-config-not-json", "config-file-not-yaml",
                "bad-device-name", "model-folder-missing", "resume-from-nothing"]


@pytest.mark.parametrize("case", OPTION_CASES)
def test_bad_options_are_one_line(case, tiny_model_dir, chat_data, tmp_path):
    extra, code, names = option_cases(tmp_path, chat_data)[case]
    base = ["--model", tiny_model_dir, "--dataset", chat_data, "--template", "chatml", "--output_dir", tmp_path / "out"]
    assert_clean(invoke(["train", *base, *extra]), code, names)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("flag", ["--device", "--devices"])
@pytest.mark.parametrize("value", ["cuda", "cuda:0"])
def test_cuda_without_cuda(flag, value, tiny_model_dir, chat_data, tmp_path):
    result = invoke(["train", "--model", tiny_model_dir, "--dataset", chat_data, flag, value, "--output_dir", tmp_path])
    assert_clean(result, 2, "CUDA is not available")


def test_unwritable_cache_folder(tiny_model_dir, chat_data, tmp_path, monkeypatch):
    blocked = write(tmp_path / "a-file", "x") / "cache"  # cannot be made, even by root
    monkeypatch.setattr(cache, "cache_dir", lambda: blocked)
    result = invoke(["train", "--model", tiny_model_dir, "--dataset", chat_data, "--output_dir", tmp_path / "out"])
    assert_clean(result, 1, str(blocked))
    assert "--dataset_cache false" in result.output


def test_deepspeed_not_installed_names_the_extra(tiny_model_dir, chat_data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed raises ImportError
    result = invoke(["train", "--model", tiny_model_dir, "--dataset", chat_data, "--deepspeed", "zero2",
                     "--output_dir", tmp_path])
    assert_clean(result, 1, "pip install 'sftkit[deepspeed]'")


def test_preview_accepts_a_tokenizer_folder_without_config(tiny_model_dir, chat_data, tmp_path):
    folder = tmp_path / "tokenizer-only"
    folder.mkdir()
    for name in os.listdir(tiny_model_dir):
        if name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(os.path.join(tiny_model_dir, name), folder)
    result = invoke(["preview", "--tokenizer", folder, "--dataset", chat_data, "--template", "chatml"])
    assert result.exit_code == 0 and "16 of 16 rows kept" in result.output, result.output


# --- broken checkpoints: chat, infer, eval, merge and resume ----------------------------------------------------

BREAKS = {
    "truncated-adapter": ("adapter_model.safetensors", lambda c: open(c / "adapter_model.safetensors", "r+b").truncate(64)),
    "missing-adapter": ("adapter_model.safetensors", lambda c: os.remove(c / "adapter_model.safetensors")),
    "missing-adapter-config": ("adapter_config.json", lambda c: os.remove(c / "adapter_config.json")),
    "invalid-adapter-config": ("adapter_config.json", lambda c: write(c / "adapter_config.json", "{")),
    "invalid-trainer-state": ("trainer_state.json", lambda c: write(c / "trainer_state.json", "{")),
    "invalid-sft-args": ("sft_args.json", lambda c: write(c.parent / "sft_args.json", "{")),
    "truncated-optimizer": ("optimizer.pt", lambda c: open(c / "optimizer.pt", "r+b").truncate(64)),
}
# (break, command, with the manifest): the manifest names every changed file; without it, each reader names
# the file it cannot use (a file a command does not read cannot stop it, so those pairs are left out).
CHECKPOINT_CASES = (
    [(b, c, True) for b in BREAKS if b != "truncated-optimizer" for c in ("chat", "infer", "eval", "merge")]
    + [(b, "resume", True) for b in BREAKS]
    + [(b, c, False) for b in ("truncated-adapter", "missing-adapter", "missing-adapter-config", "invalid-adapter-config",
                               "invalid-sft-args") for c in ("chat", "merge")]
    + [(b, "resume", False) for b in ("truncated-adapter", "missing-adapter", "invalid-trainer-state", "invalid-sft-args",
                                      "truncated-optimizer")]
)


@pytest.mark.parametrize("broken,command,with_manifest", CHECKPOINT_CASES,
                         ids=[f"{c}-{b}-{'manifest' if m else 'no-manifest'}" for b, c, m in CHECKPOINT_CASES])
def test_broken_checkpoints_are_one_line_naming_the_file(broken, command, with_manifest, trained_run, tiny_model_dir,
                                                         chat_data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    checkpoint = run / ("checkpoint-2" if command == "resume" else "checkpoint-4")
    name, change = BREAKS[broken]
    if not with_manifest:
        os.remove(checkpoint / "manifest.json")
    change(checkpoint)
    if command == "resume":
        args = ["train", *argv(run_options(tiny_model_dir, chat_data, tmp_path / "unused")),
                "--resume_from_checkpoint", checkpoint]
    else:
        args = [command, "--ckpt_dir", checkpoint] + (["--output", tmp_path / "out.json"] if command in ("infer", "eval") else [])
    assert_clean(invoke(args, input=""), 1, name)


def test_merge_of_full_weights_says_so_and_of_an_empty_folder_says_that(trained_run, run_config, tmp_path):
    from sftkit.train import train

    full = train(run_config(tmp_path / "full", sft_type="full", max_steps=2, learning_rate=1e-3))
    assert_clean(invoke(["merge", "--ckpt_dir", full]), 1, "holds full weights (sft_type full): nothing to merge")
    for name in os.listdir(full):
        if name.startswith("model"):
            os.remove(os.path.join(full, name))
    os.remove(os.path.join(full, "manifest.json"))
    assert_clean(invoke(["merge", "--ckpt_dir", full]), 1, "holds no weights")


# --- --debug, exit codes --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(how, tiny_model_dir, chat_data, tmp_path):
    args = ["train", "--model", tiny_model_dir, "--dataset", write(tmp_path / "empty.jsonl", ""), "--output_dir", tmp_path]
    result = invoke(["--debug", *args] if how == "flag" else args, env={"SFTKIT_DEBUG": "1"} if how == "env" else None)
    assert result.exit_code == 1 and not isinstance(result.exception, SystemExit)
    assert "holds no rows" in str(result.exception)


def test_a_run_stopped_by_sigterm_exits_143_after_saving(tiny_model_dir, chat_data, tmp_path):
    """So `sftkit train && sftkit merge` never merges a half-trained model."""
    out = tmp_path / "run"

    def terminate_once_training():
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.02)
        if (out / "metrics.jsonl").exists():  # inside the loop, where SIGTERM means: save, then stop
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate_once_training, daemon=True).start()
    result = invoke(["train", *argv(run_options(tiny_model_dir, chat_data, out, max_steps=100000, eval_steps=100000,
                                                save_steps=100000))])
    assert_clean(result, 143, "stopped by SIGTERM; checkpoint saved")
    assert os.path.isfile(out / "latest") and (out / open(out / "latest").read()).is_dir()


# --- checks before the expensive part -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def garbage_weights_model(tiny_model_dir, tmp_path_factory):
    """A model folder whose config and tokenizer are fine but whose weights file is garbage: loading it fails."""
    folder = tmp_path_factory.mktemp("garbage") / "model"
    shutil.copytree(tiny_model_dir, folder)
    write(folder / "model.safetensors", os.urandom(4096))
    return str(folder)


def test_a_garbage_weights_file_is_itself_one_line(garbage_weights_model, chat_data, tmp_path):
    result = invoke(["train", "--model", garbage_weights_model, "--dataset", chat_data, "--template", "chatml",
                     "--output_dir", tmp_path])
    assert_clean(result, 1, "model.safetensors")


@pytest.mark.parametrize("case,code,names", [
    ("bad-data", 1, "bad.jsonl:2"),
    ("lora-targets-match-nothing", 2, "lora_target_modules"),
    ("deepspeed-config-not-json", 2, "ds.json"),
    ("output-dir-is-a-file", 2, "not-a-folder"),
    ("resume-from-nothing", 1, "nosuch-run"),
])
def test_checks_come_before_the_weights_load(case, code, names, garbage_weights_model, chat_data, tmp_path):
    """Were the weights loaded first, each of these would fail on the garbage weights file instead."""
    data = write(tmp_path / "bad.jsonl", GOOD_ROW + b"{oops\n") if case == "bad-data" else chat_data
    extra = [] if case == "bad-data" else option_cases(tmp_path, chat_data)[case][0]
    result = invoke(["train", "--model", garbage_weights_model, "--dataset", data, "--template", "chatml",
                     "--output_dir", tmp_path / "out", *extra])
    assert_clean(result, code, names)
    assert "model.safetensors" not in result.output


# --- the smaller CLI defects ------------------------------------------------------------------------------------------


def test_help_shows_choices_defaults_and_types():
    text = " ".join(invoke(["train", "--help"]).output.split())
    for shown in ("--sft_type [lora|full]", "[default: lora]", "--lora_rank INTEGER", "--learning_rate FLOAT",
                  "--packing BOOL", "--custom-train-dataset-path TEXT...", "[choices: lora, full]"):
        assert shown in text, shown


def test_version_and_list_everything():
    assert invoke(["--version"]).output.startswith("sftkit, version ")
    listed = invoke(["list"])
    assert listed.exit_code == 0 and all(f"{name}:\n" in listed.output for name in ("models", "templates", "datasets"))
    assert set(json.loads(invoke(["list", "--format", "json"]).output)) == {"models", "templates", "datasets"}


def test_several_values_after_one_flag(tiny_model_dir, chat_data, tmp_path):
    """`--dataset a.jsonl b.jsonl`, as ms-swift users write it."""
    second = shutil.copy(chat_data, tmp_path / "second.jsonl")
    result = invoke(["preview", "--dataset", chat_data, second, "--tokenizer", tiny_model_dir, "--template", "chatml",
                     "--num_examples", "0"])
    assert result.exit_code == 0 and "32 of 32 rows kept" in result.output, result.output
    result = invoke(["preview", f"--dataset={chat_data}", second, "--tokenizer", tiny_model_dir, "--num_examples", "0"])
    assert "32 of 32 rows kept" in result.output, result.output
