"""reward.py: [BT] by hand, learning to rank toy pairs end to end, bad pair rows."""

import json
import math
import re

import pytest
import torch
from helpers import pair_files

import common
import reward


# ---- [BT] ------------------------------------------------------------------------------------------------------------

def test_bradley_terry_loss_by_hand():
    loss = reward.bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(loss, torch.tensor([math.log(1 + math.exp(-1)), math.log(2)]))


# ---- learning, end to end --------------------------------------------------------------------------------------------

def test_reward_model_learns_to_rank_toy_pairs(tmp_path, tiny_model_dir):
    data, eval_data = pair_files(tmp_path)
    last = reward.main(reward.Args(model=tiny_model_dir, data=data, eval_data=eval_data,
                                   output_dir=str(tmp_path / "rm"), max_steps=30, batch_size=16, micro_batch_size=8,
                                   learning_rate=3e-3, warmup_steps=2, eval_every=30))
    log = [json.loads(line) for line in open(tmp_path / "rm" / "metrics.jsonl")]
    assert log[0]["eval_pair_accuracy"] < 0.8  # a random head ranks the held-out pairs by chance
    assert log[1]["loss"] > 0.5
    assert last["eval_pair_accuracy"] == 1.0 and last["loss"] < 0.1


# ---- bad input: an error naming file and line ------------------------------------------------------------------------

def write_lines(path, lines: list[bytes]) -> str:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return str(path)


def test_bad_pair_rows_name_file_and_line(tmp_path, tiny_model_dir):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "a", "rejected": 3}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: 'rejected' must be text or chat messages"):
        reward.main(reward.Args(model=tiny_model_dir, data=str(path), output_dir=str(tmp_path / "rm")))


@pytest.mark.parametrize("pair", [
    {"prompt": "p", "chosen": "same", "rejected": "same"},
    {"prompt": "p", "chosen": [{"role": "assistant", "content": "same"}], "rejected": "same"},
])
def test_reward_refuses_a_pair_with_the_same_completion_twice(tmp_path, tiny_model_dir, pair):
    path = write_lines(tmp_path / "pairs.jsonl", [b'{"prompt": "p", "chosen": "a", "rejected": "b"}',
                                                  json.dumps(pair).encode()])
    with pytest.raises(common.RunError, match=re.escape("pairs.jsonl:2: 'chosen' and 'rejected' are the same "
                                                        "completion: the pair teaches nothing")):
        reward.main(reward.Args(model=tiny_model_dir, data=path, output_dir=str(tmp_path / "rm")))
    assert not (tmp_path / "rm").exists()
