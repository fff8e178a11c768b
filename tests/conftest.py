import os
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
