import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return tiny.make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Path of a tiny llama saved with save_pretrained (model + tokenizer)."""
    return tiny.save_tiny(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(autouse=True, scope="session")
def _private_dataset_cache(tmp_path_factory):
    """Tokenized-data cache entries of the tests go to a temporary folder, not the user's cache."""
    import sftkit.data.cache

    original = sftkit.data.cache.cache_dir
    folder = tmp_path_factory.mktemp("sftkit-cache")
    sftkit.data.cache.cache_dir = lambda: folder
    yield
    sftkit.data.cache.cache_dir = original


@pytest.fixture(autouse=True, scope="session")
def _private_checkpoint_key(tmp_path_factory):
    """Checkpoints of the tests are signed with a key of their own (the environment reaches torchrun children too)."""
    from sftkit.manifest import KEY_ENV

    original = os.environ.get(KEY_ENV)
    os.environ[KEY_ENV] = str(tmp_path_factory.mktemp("sftkit-key") / "checkpoint.key")
    yield
    if original is None:
        os.environ.pop(KEY_ENV, None)
    else:
        os.environ[KEY_ENV] = original


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory):
    """16 query/response rows in a .jsonl file."""
    import json

    path = tmp_path_factory.mktemp("chat-data") / "train.jsonl"
    rows = [{"query": f"What is {a} times {b}?", "response": f"{a} times {b} is {a * b}."} for a in range(4) for b in range(4)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def run_options(model_dir, data_file, output_dir, **overrides) -> dict:
    """A tiny LoRA run: 4 steps, a checkpoint every 2, no output-dir suffix."""
    values = dict(model=model_dir, dataset=(data_file,), dataset_test_ratio=0.125, max_steps=4, eval_steps=2, save_steps=2,
                  logging_steps=1, learning_rate=5e-3, output_dir=str(output_dir), add_output_dir_suffix=False,
                  template="chatml", lora_dropout=0.0, save_total_limit=10)
    values.update(overrides)
    return values


@pytest.fixture(scope="session")
def run_config(tiny_model_dir, chat_data):
    """run_config(output_dir, **overrides) -> the TrainConfig of a tiny LoRA run on the tiny model and chat_data."""
    from sftkit.config import TrainConfig

    return lambda output_dir, **overrides: TrainConfig(**run_options(tiny_model_dir, chat_data, output_dir, **overrides))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, run_config):
    """A finished tiny LoRA run folder (checkpoint-2 and checkpoint-4); copy it before changing anything."""
    from sftkit.train import train

    folder = tmp_path_factory.mktemp("trained-run")
    train(run_config(folder))
    return str(folder)


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """A copy of the finished run that a test may change."""
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    return copy


@pytest.fixture(scope="session")
def vlm_dir(tmp_path_factory):
    """Path of a tiny Qwen2-VL saved like a published one (weights, tokenizer, preprocessor_config.json)."""
    return tiny.save_tiny_vlm(tmp_path_factory.mktemp("tiny-qwen2-vl"))


@pytest.fixture(scope="session")
def vision(vlm_dir):
    """(tokenizer, VisionProcessor) of the tiny Qwen2-VL, loaded the way training loads them."""
    from sftkit.model import load_processor, load_tokenizer

    tokenizer = load_tokenizer(vlm_dir)
    return tokenizer, load_processor(vlm_dir, tokenizer)


@pytest.fixture(scope="session")
def pictures(tmp_path_factory):
    """Three PNGs: 56x56 (4 image tokens), 84x56 (6) and 112x112 (16)."""
    return tiny.make_pngs(tmp_path_factory.mktemp("pictures"))
