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
