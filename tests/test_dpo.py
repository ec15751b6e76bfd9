"""dpo.py: [DPO-LOSS] by hand, its gradient's direction, sum vs mean, pair construction, learning end to end."""

import json
import math
import random
import re
import shutil

import pytest
import torch
from helpers import make_model, make_tokenizer

import common
import dpo


def test_dpo_loss_by_hand():
    loss, chosen, rejected = dpo.dpo_loss(torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]),
                                          torch.tensor([-4.0]), beta=0.5)
    # Delta_w = 1, Delta_l = -1: margin = 0.5 * 2 = 1
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)))
    assert chosen.item() == pytest.approx(0.5) and rejected.item() == pytest.approx(-0.5)  # [DPO-REWARD]
    smoothed, _, _ = dpo.dpo_loss(torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]),
                                  torch.tensor([-4.0]), beta=0.5, label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(0.9 * math.log(1 + math.exp(-1)) + 0.1 * math.log(1 + math.exp(1)))


def test_dpo_loss_is_log_2_when_the_policy_is_the_reference():
    torch.manual_seed(0)
    chosen, rejected = torch.randn(5) * 10, torch.randn(5) * 10
    loss, _, _ = dpo.dpo_loss(chosen, rejected, chosen, rejected, beta=0.1)
    torch.testing.assert_close(loss, torch.full((5,), math.log(2)))


def test_sequence_logprob_sum_and_average_with_unequal_lengths():
    logprobs = torch.tensor([[-1.0, -2.0, -9.0], [-4.0, -9.0, -9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(dpo.sequence_logprob(logprobs, mask), torch.tensor([-3.0, -4.0]))
    torch.testing.assert_close(dpo.sequence_logprob(logprobs, mask, average=True), torch.tensor([-1.5, -4.0]))


@pytest.mark.parametrize("average", [False, True])
def test_gradient_step_pushes_chosen_up_and_rejected_down(average):
    tokenizer = make_tokenizer()
    tokenizer.padding_side = "left"
    model = make_model(tokenizer)
    pairs = [{"prompt": "Say 7.", "chosen": "7", "rejected": "seven, I think"},
             {"prompt": "Say 1.", "chosen": "1 it is", "rejected": "2"}]
    with torch.no_grad():
        ref_chosen, ref_rejected = dpo.pair_logprobs(model, common.encode_pairs(tokenizer, pairs, "cpu"), average)
    chosen, rejected = dpo.pair_logprobs(model, common.encode_pairs(tokenizer, pairs, "cpu"), average)
    loss, _, _ = dpo.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1)
    loss.mean().backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.05 * p.grad
        new_chosen, new_rejected = dpo.pair_logprobs(model, common.encode_pairs(tokenizer, pairs, "cpu"), average)
    assert (new_chosen > ref_chosen).all() and (new_rejected < ref_rejected).all()


def test_pair_construction_skips_and_counts_prompts_without_both():
    problems = [{"prompt": "p1", "answer": "5"}, {"prompt": "p2", "answer": "6"}, {"prompt": "p3", "answer": "7"}]
    completions = ["5", "4", "5",      # right and wrong: one pair
                   "6", "6", "6",      # all right: skipped
                   "no", "idea", ""]   # all wrong: skipped
    pairs, skipped = dpo.pairs_from_samples(problems, completions, 3, random.Random(0))
    assert skipped == 2 and len(pairs) == 1
    assert pairs[0] == {"prompt": "p1", "chosen": "5", "rejected": "4"}
    assert dpo.pairs_from_samples([], [], 3, random.Random(0)) == ([], 0)


def toy_pairs(tmp_path):
    """Whatever the prompt, '7' is preferred to any other digit."""
    rows = [{"prompt": f"Say {d}.", "chosen": "7", "rejected": w} for d in range(10) for w in "012345689"]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "toy.jsonl").write_text("".join(json.dumps({"prompt": f"Say {d}.", "answer": 7}) + "\n"
                                                for d in range(10)))
    return str(tmp_path / "pairs.jsonl"), str(tmp_path / "toy.jsonl")


def toy_args(tmp_path, model_dir, **kw):
    data, eval_data = toy_pairs(tmp_path)
    defaults = dict(model=model_dir, data=data, eval_data=eval_data, output_dir=str(tmp_path / "run"), max_steps=40,
                    batch_size=16, micro_batch_size=8, learning_rate=1e-3, warmup_steps=2, eval_every=40,
                    max_new_tokens=3, save_every=1000)
    return dpo.Args(**{**defaults, **kw})


def run_rows(tmp_path):
    """Every line of the run's metrics.jsonl, as dicts (not helpers.logged, which reads one metric)."""
    return [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]


def test_dpo_learns_toy_preferences(tmp_path, tiny_model_dir):
    last = dpo.main(toy_args(tmp_path, tiny_model_dir))
    log = run_rows(tmp_path)
    assert log[0]["eval_pref_accuracy"] == 0.0  # pi = pi_ref: every implicit-reward margin is exactly 0
    assert log[1]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert last["eval_pref_accuracy"] == 1.0 and last["pref_accuracy"] == 1.0
    assert last["margin"] > 0.5 > log[5]["margin"] > 0
    assert last["loss"] < 0.45


def test_held_out_pairs_zero_trains_on_every_pair(tmp_path, tiny_model_dir, capsys):
    last = dpo.main(toy_args(tmp_path, tiny_model_dir, held_out_pairs=0.0, max_steps=1))
    assert "90 pairs to train on, 0 held out" in capsys.readouterr().out
    assert last["eval_pref_accuracy"] is None


def test_dpo_with_swapped_preferences_learns_the_opposite(tmp_path, tiny_model_dir, monkeypatch):
    original = dpo.dpo_loss
    monkeypatch.setattr(dpo, "dpo_loss", lambda pc, pr, rc, rr, *a, **k: original(pr, pc, rr, rc, *a, **k)[:1] +
                        original(pc, pr, rc, rr, *a, **k)[1:])
    last = dpo.main(toy_args(tmp_path, tiny_model_dir))
    assert last["eval_pref_accuracy"] == 0.0 and last["margin"] < -0.5


def test_built_in_pairs_are_sampled_saved_and_reused_on_resume(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """The tiny model cannot add, so 'correct' is redefined: a completion with an 'a' in it."""
    monkeypatch.setattr(dpo, "is_correct", lambda completion, answer: "a" in completion)
    args = dict(data=None, digits=1, num_prompts=16, num_samples=4, max_new_tokens=6, temperature=1.0,
                max_steps=4, save_every=2, eval_every=0)
    dpo.main(toy_args(tmp_path, tiny_model_dir, **args))
    report = re.search(r"built (\d+) pairs from 16 prompts x 4 samples; (\d+) prompts had no right-and-wrong pair",
                       capsys.readouterr().out)
    pairs = common.read_jsonl(tmp_path / "run" / "pairs.jsonl", ("prompt", "chosen", "rejected", "ref_chosen"))
    built, skipped = int(report[1]), int(report[2])
    assert built == len(pairs) > 0 and built + skipped == 16
    assert all("a" in p["chosen"] and "a" not in p["rejected"] for p in pairs)
    dpo.main(toy_args(tmp_path, tiny_model_dir, **args, resume=str(tmp_path / "run"),
                      output_dir=str(tmp_path / "resumed")))
    a, _ = common.load_model(str(tmp_path / "run" / "final"))
    b, _ = common.load_model(str(tmp_path / "resumed" / "final"))
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)


def test_no_pairs_at_all_is_a_clear_error(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(dpo, "is_correct", lambda completion, answer: False)
    with pytest.raises(common.RunError, match="no prompt gave both a right and a wrong completion"):
        dpo.main(toy_args(tmp_path, tiny_model_dir, data=None, digits=1, num_prompts=4, num_samples=2,
                          max_new_tokens=2))
    assert not (tmp_path / "run").exists()  # the pairs are built before anything is written


def test_bad_pair_rows_name_file_and_line(tmp_path, tiny_model_dir):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": [], "rejected": "b"}\n')
    with pytest.raises(common.RunError, match="bad.jsonl:2: 'chosen' must be text or chat messages"):
        dpo.main(toy_args(tmp_path, tiny_model_dir, data=str(path)))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("chosen, rejected", [
    ('"7"', '"7"'),
    ('[{"role": "user", "content": "p"}, {"role": "assistant", "content": "7"}]', '"7"'),  # the same completion
])
def test_a_pair_with_the_same_chosen_and_rejected_is_a_file_line_error(tmp_path, tiny_model_dir, chosen, rejected):
    path = tmp_path / "same.jsonl"
    path.write_text('{"prompt": "p", "chosen": "7", "rejected": "3"}\n\n'
                    f'{{"prompt": "p", "chosen": {chosen}, "rejected": {rejected}}}\n')
    with pytest.raises(common.RunError, match=r"same\.jsonl:3: 'chosen' and 'rejected' are the same completion"):
        dpo.main(toy_args(tmp_path, tiny_model_dir, data=str(path)))
    assert not (tmp_path / "run").exists()


def test_a_diverging_run_stops_before_the_update_and_saves_nothing(tmp_path, tiny_model_dir):
    with pytest.raises(common.NonFiniteError, match=r"step \d+: non-finite") as error:
        dpo.main(toy_args(tmp_path, tiny_model_dir, learning_rate=1e30, warmup_steps=0, max_steps=20, eval_every=0))
    bad_step = int(str(error.value).split()[1].rstrip(":"))
    assert bad_step > 1  # it did run, then went non-finite
    assert len(run_rows(tmp_path)) == bad_step - 1  # every logged step finite; the bad one neither applied nor logged
    assert all(math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"]) for row in run_rows(tmp_path))
    assert not (tmp_path / "run" / "final").exists() and not (tmp_path / "run" / "checkpoint").exists()


def test_eval_size_zero_skips_the_task_evaluation_but_not_the_preference_accuracy(tmp_path, tiny_model_dir):
    last = dpo.main(toy_args(tmp_path, tiny_model_dir, eval_size=0, max_steps=1, eval_every=1))
    assert "eval_accuracy" not in last and last["eval_pref_accuracy"] is not None
    eval_keys = [sorted(k for k in row if k.startswith("eval")) for row in run_rows(tmp_path)]
    assert eval_keys == [["eval_pref_accuracy"]] * 2


def test_a_run_resumed_without_a_checkpoint_starts_over_and_rebuilds_its_pairs(tmp_path, tiny_model_dir):
    args = dict(max_steps=2, eval_every=0, save_every=1000)
    dpo.main(toy_args(tmp_path, tiny_model_dir, **args))
    first = (tmp_path / "run" / "pairs.jsonl").read_text()
    final, _ = common.load_model(str(tmp_path / "run" / "final"))
    shutil.rmtree(tmp_path / "run" / "final")  # as if it had stopped before its first checkpoint
    (tmp_path / "run" / "pairs.jsonl").write_text("")
    dpo.main(toy_args(tmp_path, tiny_model_dir, **args, resume=str(tmp_path / "run")))
    assert (tmp_path / "run" / "pairs.jsonl").read_text() == first
    assert [row["step"] for row in run_rows(tmp_path)] == [1, 2]
    again, _ = common.load_model(str(tmp_path / "run" / "final"))
    for p, q in zip(final.parameters(), again.parameters()):
        torch.testing.assert_close(p, q)
