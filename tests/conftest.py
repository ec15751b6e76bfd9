"""Shared fixtures: a tiny random Llama and a character-level tokenizer (built by helpers.py).

The plain helpers live in helpers.py; tests import them from there, not from this file."""

import pytest
from helpers import make_model, make_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> str:
    """A tiny random model saved with save_pretrained: what the scripts' --model takes."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
