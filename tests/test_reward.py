"""reward.py: [BT] by hand, learning to rank toy pairs end to end, bad pair rows."""

import json
import math
import re

import pytest
import torch
from helpers import pair_files
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import common
import plumbing
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


# ---- final/ is a standard checkpoint: plain transformers reads the score where reward.py does ------------------------

def test_final_scores_the_same_under_plain_transformers(tmp_path, tiny_model_dir):
    """transformers' XxxForSequenceClassification pools at the last token whose id is not config.pad_token_id; the
    tiny tokenizer, like SmolLM2's, has pad == EOS, which would put that one token before the EOS reward.py reads.
    final/ must pad with another token, so that transformers (or TRL, or ppo.py) give reward.py's scores."""
    data, _ = pair_files(tmp_path)
    reward.main(reward.Args(model=tiny_model_dir, data=data, output_dir=str(tmp_path / "rm"), max_steps=2,
                            batch_size=4, micro_batch_size=4, learning_rate=1e-3, warmup_steps=0, eval_size=0))
    final = tmp_path / "rm" / "final"
    model = AutoModelForSequenceClassification.from_pretrained(final, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(tiny_model_dir).get_vocab()  # load_reward_model's check
    pairs = [{"prompt": "Is 3 fine?", "chosen": "yes 3", "rejected": "no"},
             {"prompt": "Is 12 fine? Answer in a few words.", "chosen": [{"role": "assistant", "content": "yes"}],
              "rejected": [{"role": "assistant", "content": "no, 12 is not fine at all"}]},
             {"prompt": "Hi", "chosen": "hello there, how are you?", "rejected": "go away"}]
    prompt_ids, prompt_mask, completion_ids, completion_mask = common.encode_pairs(tokenizer, pairs, "cpu")
    with torch.no_grad():
        ours = reward.reward_model_scores(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    texts = [common.render_prompt(tokenizer, p["prompt"]) + common.completion_text(p[key]) + tokenizer.eos_token
             for key in ("chosen", "rejected") for p in pairs]
    for side in ("left", "right"):
        batch = tokenizer(texts, add_special_tokens=False, padding=True, padding_side=side, return_tensors="pt")
        assert [ids[m.bool()].tolist() for ids, m in zip(batch.input_ids, batch.attention_mask)] == [  # reward.py's ids
            torch.cat([p[pm.bool()], c[cm.bool()]]).tolist()
            for p, pm, c, cm in zip(prompt_ids, prompt_mask, completion_ids, completion_mask)]
        with torch.no_grad():
            theirs = model(**batch).logits.squeeze(-1)
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


# ---- LoRA: adapters on the frozen backbone, the score head trained in full ------------------------------------------

LORA = dict(lora_rank=8, lora_alpha=16.0, learning_rate=1e-2, warmup_steps=0, batch_size=16, micro_batch_size=16)


def test_lora_reward_model_learns_to_rank_toy_pairs(tmp_path, tiny_model_dir):
    """30 steps: held-out pair accuracy 0 -> 1, loss ~0.7 -> 1e-4 (seeds 0-3: last loss 1e-4 to 3e-4, accuracy 1
    each); the adapters moved (peft starts lora_B at zero) and the saved score head is the trained one."""
    from safetensors.torch import load_file
    data, eval_data = pair_files(tmp_path)
    last = reward.main(reward.Args(model=tiny_model_dir, data=data, eval_data=eval_data,
                                   output_dir=str(tmp_path / "rm"), max_steps=30, eval_every=30, **LORA))
    log = [json.loads(line) for line in open(tmp_path / "rm" / "metrics.jsonl")]
    assert log[0]["eval_pair_accuracy"] < 0.8 and log[1]["loss"] > 0.5
    assert last["eval_pair_accuracy"] == 1.0 and last["loss"] < 0.01
    saved = load_file(tmp_path / "rm" / "final" / "adapter_model.safetensors")
    lora_b = [v for k, v in saved.items() if "lora_B" in k]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b)
    assert any(k.endswith("score.weight") for k in saved)  # the head travels with the adapters


def test_a_lora_reward_model_saves_adapters_and_a_merged_model_with_the_same_scores(tmp_path, tiny_model_dir):
    peft = pytest.importorskip("peft")
    data, _ = pair_files(tmp_path)
    reward.main(reward.Args(model=tiny_model_dir, data=data, output_dir=str(tmp_path / "rm"), max_steps=3,
                            eval_size=0, merge_lora=True, **LORA))
    final = tmp_path / "rm" / "final"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    assert not (final / "config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(final)
    merged = AutoModelForSequenceClassification.from_pretrained(final / "merged", dtype=torch.float32).eval()
    # the base model's own config has two labels and pads with EOS: a reader of the adapters passes reward.py's
    adapters = peft.AutoPeftModelForSequenceClassification.from_pretrained(
        final, num_labels=1, pad_token_id=tokenizer.pad_token_id).eval()
    assert merged.config.num_labels == 1 and merged.config.pad_token_id == tokenizer.pad_token_id
    texts = [common.render_prompt(tokenizer, "Is 3 fine?") + answer + tokenizer.eos_token for answer in ("yes 3", "no")]
    batch = tokenizer(texts, add_special_tokens=False, padding=True, padding_side="right", return_tensors="pt")
    with torch.no_grad():
        scores = {name: model(**batch).logits.squeeze(-1) for name, model in (("adapters", adapters),
                                                                              ("merged", merged))}
        fresh = reward.reward_model_from(plumbing.load_model(tiny_model_dir)[0], tokenizer)
    torch.testing.assert_close(scores["merged"], scores["adapters"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(scores["merged"], fresh(**batch).logits.squeeze(-1).detach())  # it was trained


# ---- --data: any source, columns named by the field flags, some pairs held out --------------------------------------

def test_a_parquet_file_with_its_own_column_names_trains_with_some_pairs_held_out(tmp_path, tiny_model_dir, capsys):
    """--chosen-field / --rejected-field map the columns (the prompt comes from `question`, as in GSM8K). With no
    --eval-data, 4 of the 40 pairs are kept out of training and scored: the run names them and what is measured."""
    datasets = pytest.importorskip("datasets")
    data, _ = pair_files(tmp_path)
    rows = [json.loads(line) for line in open(data)]
    path = tmp_path / "pairs.parquet"
    datasets.Dataset.from_list([{"question": r["prompt"], "good": common.completion_text(r["chosen"]),
                                 "bad": common.completion_text(r["rejected"])} for r in rows]).to_parquet(str(path))
    last = reward.main(reward.Args(model=tiny_model_dir, data=str(path), chosen_field="good", rejected_field="bad",
                                   output_dir=str(tmp_path / "rm"), max_steps=30, batch_size=16, micro_batch_size=8,
                                   learning_rate=3e-3, warmup_steps=2, eval_every=30))
    err = capsys.readouterr().err
    assert "reading prompts from 'question'" in err
    assert ("eval_pair_accuracy (how often the chosen completion scores above the rejected): 4 of the 40 pairs of "
            f"{path}, kept out of training") in err
    log = [json.loads(line) for line in open(tmp_path / "rm" / "metrics.jsonl")]
    assert log[0]["eval_pair_accuracy"] in (0.0, 0.25, 0.5, 0.75)  # 4 pairs, not the built-in task's 200
    assert last["eval_pair_accuracy"] == 1.0 and last["loss"] < 0.1
