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
