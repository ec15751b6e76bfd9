"""Shared fixtures: a tiny random Llama and a character-level tokenizer (built by helpers.py).

The plain helpers live in helpers.py; tests import them from there, not from this file."""

import json

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


@pytest.fixture(scope="session")
def reward_model_dir(tmp_path_factory, tiny_model_dir) -> str:
    """A reward model made by reward.py from the tiny model: two steps on pairs preferring the toy task's 7."""
    tmp = tmp_path_factory.mktemp("reward-model")
    pairs = tmp / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Say {d}.", "chosen": "7", "rejected": str(d)}) + "\n"
                             for d in range(10) if d != 7))
    import reward  # a script: imported where it is used

    reward.main(reward.Args(model=tiny_model_dir, data=str(pairs), output_dir=str(tmp / "run"), max_steps=2,
                            batch_size=8, micro_batch_size=8, eval_size=0))
    return str(tmp / "run" / "final")
