"""dpo.py: [DPO-LOSS] by hand, its gradient's direction, sum vs mean, pair construction, learning end to end;
[DPO-PL] against brute force, ranked rows and built-in rankings."""

import itertools
import json
import math
import random
import re
import shutil

import pytest
import torch
from helpers import make_model, make_tokenizer

import common
import plumbing
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
    assert "90 pairs to train on, 0 held out" in capsys.readouterr().err
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
                       capsys.readouterr().err)
    pairs = plumbing.read_jsonl(tmp_path / "run" / "pairs.jsonl", ("prompt", "chosen", "rejected", "ref_chosen"))
    built, skipped = int(report[1]), int(report[2])
    assert built == len(pairs) > 0 and built + skipped == 16
    assert all("a" in p["chosen"] and "a" not in p["rejected"] for p in pairs)
    dpo.main(toy_args(tmp_path, tiny_model_dir, **args, resume=str(tmp_path / "run"),
                      output_dir=str(tmp_path / "resumed")))
    a, _ = plumbing.load_model(str(tmp_path / "run" / "final"))
    b, _ = plumbing.load_model(str(tmp_path / "resumed" / "final"))
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
    last = dpo.main(toy_args(tmp_path, tiny_model_dir, eval_data=None, eval_size=0, max_steps=1, eval_every=1))
    assert "eval_accuracy" not in last and last["eval_pref_accuracy"] is not None
    eval_keys = [sorted(k for k in row if k.startswith("eval")) for row in run_rows(tmp_path)]
    assert eval_keys == [["eval_pref_accuracy"]] * 2


def test_a_run_resumed_without_a_checkpoint_starts_over_and_rebuilds_its_pairs(tmp_path, tiny_model_dir):
    args = dict(max_steps=2, eval_every=0, save_every=1000)
    dpo.main(toy_args(tmp_path, tiny_model_dir, **args))
    first = (tmp_path / "run" / "pairs.jsonl").read_text()
    final, _ = plumbing.load_model(str(tmp_path / "run" / "final"))
    shutil.rmtree(tmp_path / "run" / "final")  # as if it had stopped before its first checkpoint
    (tmp_path / "run" / "pairs.jsonl").write_text("")
    dpo.main(toy_args(tmp_path, tiny_model_dir, **args, resume=str(tmp_path / "run")))
    assert (tmp_path / "run" / "pairs.jsonl").read_text() == first
    assert [row["step"] for row in run_rows(tmp_path)] == [1, 2]
    again, _ = plumbing.load_model(str(tmp_path / "run" / "final"))
    for p, q in zip(final.parameters(), again.parameters()):
        torch.testing.assert_close(p, q)


# ---- [DPO-PL]: Plackett-Luce over K ranked answers ------------------------------------------------------------------

def brute_force_plackett_luce(u: torch.Tensor) -> torch.Tensor:
    """-log P(ranking), P the explicit product of successive softmax choices: prod_k exp(u_k) / sum_{j>=k} exp(u_j)."""
    out = []
    for row in u:
        probability = 1.0
        for k in range(len(row)):
            probability = probability * torch.exp(row[k]) / sum(torch.exp(row[j]) for j in range(k, len(row)))
        out.append(-torch.log(probability))
    return torch.stack(out)


@pytest.mark.parametrize("B, K, beta", [(1, 2, 0.1), (3, 3, 0.5), (4, 5, 1.0), (2, 7, 0.05)])
def test_plackett_luce_loss_equals_the_product_of_softmax_choices(B, K, beta):
    torch.manual_seed(B * K)
    policy, ref = torch.randn(B, K, dtype=torch.float64) * 3, torch.randn(B, K, dtype=torch.float64) * 3
    torch.testing.assert_close(dpo.plackett_luce_loss(policy, ref, beta),
                               brute_force_plackett_luce(beta * (policy - ref)))
    # pi_theta = pi_ref: every ordering is equally likely, P = 1/K!
    torch.testing.assert_close(dpo.plackett_luce_loss(policy, policy, beta),
                               torch.full((B,), math.log(math.factorial(K)), dtype=torch.float64))


def test_plackett_luce_with_two_answers_is_dpo():
    torch.manual_seed(0)
    policy, ref = torch.randn(6, 2) * 5, torch.randn(6, 2) * 5
    dpo_losses, _, _ = dpo.dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta=0.3)
    torch.testing.assert_close(dpo.plackett_luce_loss(policy, ref, beta=0.3), dpo_losses)


def test_plackett_luce_padding_is_ignored_and_gradients_match_brute_force():
    """A batch of rankings of 4, 2 and 3 answers, padded at the worst end with values that would dominate if used."""
    torch.manual_seed(1)
    policy = (torch.randn(3, 4, dtype=torch.float64) * 2).requires_grad_()
    ref = torch.randn(3, 4, dtype=torch.float64)
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    with torch.no_grad():
        policy[~valid] = 50.0
    loss = dpo.plackett_luce_loss(policy, ref, 0.7, valid)
    (grad,) = torch.autograd.grad(loss.sum(), policy)
    for b, n in enumerate(valid.sum(1).tolist()):
        row = policy[b:b + 1, :n].detach().clone().requires_grad_()
        expected = brute_force_plackett_luce(0.7 * (row - ref[b:b + 1, :n]))
        torch.testing.assert_close(loss[b:b + 1], expected)
        (expected_grad,) = torch.autograd.grad(expected.sum(), row)
        torch.testing.assert_close(grad[b, :n], expected_grad[0])
        assert (grad[b, n:] == 0).all()
    assert torch.autograd.gradcheck(lambda p: dpo.plackett_luce_loss(p, ref, 0.7, valid), (policy,))


def test_adjacent_wins_counts_ordered_neighbours_of_each_ranking():
    scores = torch.tensor([[3.0, 2.0, 2.5, 0.0], [1.0, 0.0, 9.0, 9.0]])
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    assert dpo.adjacent_wins(scores, valid) == (3, 4)  # 3>2, not 2>2.5, 2.5>0; 1>0


def test_ranking_logprobs_put_each_answer_in_its_slot(tokenizer):
    model = make_model(tokenizer)
    rows = [{"prompt": "Say 1.", "ranked": ["7", "3", "55"]}, {"prompt": "Say 2.", "chosen": "1", "rejected": "22"}]
    with torch.no_grad():
        table, valid, _ = dpo.ranking_logprobs(model, tokenizer, rows, "cpu", None, False)
        for b, row in enumerate(rows):
            for k, answer in enumerate(dpo.answers(row)):
                sequences = (*common.encode_prompts(tokenizer, [row["prompt"]]),
                             *common.encode_completions(tokenizer, [answer]))
                alone = dpo.sequence_logprob(common.completion_logprobs(model, *sequences)[0], sequences[3])
                torch.testing.assert_close(table[b, k], alone[0], atol=1e-5, rtol=1e-5)
    assert valid.tolist() == [[True, True, True], [True, True, False]]


def test_built_in_rankings_order_distinct_samples_and_skip_uninformative_prompts():
    problems = [{"prompt": "p1", "answer": "5"}, {"prompt": "p2", "answer": "6"}, {"prompt": "p3", "answer": "7"},
                {"prompt": "p4", "answer": "8"}]
    completions = ["no", "4", "5", "4", "7.0", "3", "7",   # ranked, with a duplicate and ties
                   "6", "6", "6", "6", "6", "6", "6",      # one distinct answer: skipped
                   "x", "y", "z", "xx", "x", "y", "z",     # no number at all, all of equal rank: skipped
                   "9", "7", "9", "7", "no", "no", "no"]   # 9 and 7 equally far from 8, both before "no"
    rankings, skipped = dpo.rankings_from_samples(problems, completions, 7)
    assert skipped == 2
    # correct; off by 1; off by 2 (ties: shorter first, then sampling order: 3 before 7, 7 before 7.0); no number
    assert rankings == [{"prompt": "p1", "ranked": ["5", "4", "3", "7", "7.0", "no"]},
                        {"prompt": "p4", "ranked": ["9", "7", "no"]}]


def toy_rankings(tmp_path, order="73519", seed=0):
    """Whatever the prompt, answers are preferred in one fixed order; 2 to 4 of them per row, and one plain pair (a
    ranking of two, in a file that has rankings)."""
    rng = random.Random(seed)
    rows = [{"prompt": f"Say {d}.", "ranked": sorted(rng.sample(order, rng.choice([2, 3, 4])), key=order.index)}
            for d in range(10) for _ in range(6)]
    rows[0] = {"prompt": "Say 0.", "chosen": "7", "rejected": "9"}
    (tmp_path / "ranked.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(tmp_path / "ranked.jsonl")


def test_dpo_learns_toy_rankings(tmp_path, tiny_model_dir):
    """Full-batch steps on the 48 training rankings (12 held out). When the thresholds were set, run seeds 0-2 and data
    seeds 0-2 all gave eval_rank_accuracy 1.0, a last loss <= 0.62 of the first, and a margin >= 1.2."""
    last = dpo.main(toy_args(tmp_path, tiny_model_dir, data=toy_rankings(tmp_path), max_steps=20, batch_size=48,
                             micro_batch_size=24, learning_rate=5e-3, eval_every=20, eval_size=0, eval_data=None,
                             held_out_pairs=0.2))
    log = run_rows(tmp_path)
    assert {k: v for k, v in log[0].items() if k != "time"} == {"step": 0, "eval_rank_accuracy": 0.0,
                                                                "num_rankings": 60}  # pi = pi_ref: every u is 0, a tie
    rows = plumbing.read_jsonl(tmp_path / "run" / "rankings.jsonl", ("prompt", "ranked", "ref_ranked"))
    assert {"prompt": "Say 0.", "ranked": ["7", "9"]} in [{k: r[k] for k in ("prompt", "ranked")} for r in rows]
    start = sum(math.log(math.factorial(len(r["ranked"]))) for r in rows[12:]) / 48  # -log(1/K!) at pi = pi_ref
    assert log[1]["loss"] == pytest.approx(start, abs=1e-4)
    assert last["loss"] < 0.7 * start
    assert last["eval_rank_accuracy"] >= 0.9 and last["rank_accuracy"] >= 0.9
    assert last["margin"] > 0.8 and last["reward_best"] > 0 > last["reward_worst"]


def test_built_in_rankings_are_sampled_ranked_saved_and_reused_on_resume(tmp_path, tiny_model_dir, capsys):
    args = dict(data=None, ranked=4, digits=1, num_prompts=16, max_new_tokens=4, temperature=1.0, max_steps=2,
                batch_size=8, save_every=1, eval_every=0)
    dpo.main(toy_args(tmp_path, tiny_model_dir, **args))
    report = re.search(r"built (\d+) rankings from 16 prompts x 4 samples; (\d+) prompts had no two answers of "
                       r"different rank", capsys.readouterr().err)
    rows = plumbing.read_jsonl(tmp_path / "run" / "rankings.jsonl", ("prompt", "ranked", "ref_ranked"))
    assert int(report[1]) == len(rows) > 0 and int(report[1]) + int(report[2]) == 16
    assert not (tmp_path / "run" / "pairs.jsonl").exists()
    problems = {p["prompt"]: p["answer"] for p in itertools.islice(common.arithmetic_problems("train", 1), 16)}
    for row in rows:
        keys = [(dpo.rank_key(c, problems[row["prompt"]]), len(c)) for c in row["ranked"]]
        assert keys == sorted(keys) and len(set(keys)) > 1 and len(set(row["ranked"])) == len(row["ranked"])
        assert len(row["ref_ranked"]) == len(row["ranked"]) and all(math.isfinite(v) for v in row["ref_ranked"])
    dpo.main(toy_args(tmp_path, tiny_model_dir, **args, resume=str(tmp_path / "run" / "checkpoint"),
                      output_dir=str(tmp_path / "resumed")))
    assert (tmp_path / "resumed" / "rankings.jsonl").read_text() == (tmp_path / "run" / "rankings.jsonl").read_text()
    a, _ = plumbing.load_model(str(tmp_path / "run" / "final"))
    b, _ = plumbing.load_model(str(tmp_path / "resumed" / "final"))
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("row, message", [
    ('{"prompt": "p", "ranked": ["7"]}', "'ranked' must be a list of at least two answers"),
    ('{"prompt": "p", "ranked": "73"}', "'ranked' must be a list of at least two answers"),
    ('{"prompt": "p", "ranked": ["7", "3", "7"]}', "'ranked' answers 1 and 3 are the same completion"),
    ('{"prompt": "p", "ranked": ["3", [{"role": "user", "content": "p"}, {"role": "assistant", "content": "3"}]]}',
     "'ranked' answers 1 and 2 are the same completion"),
    ('{"prompt": "p", "ranked": ["7", 3]}', "'ranked' answer 2 must be text or chat messages"),
    ('{"prompt": "p", "ranked": ["7", [{"role": "user", "content": "p"}]]}', "'ranked' answer 2 must be text or chat"),
    ('{"prompt": "p", "ranked": ["7", "3"], "chosen": "7"}', "has 'ranked' and 'chosen'/'rejected': keep one form"),
    ('{"prompt": "p", "chosen": "7"}', "missing field\\(s\\) rejected, or 'ranked'"),
])
def test_bad_rankings_name_file_and_line(tmp_path, tiny_model_dir, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "p", "ranked": ["7", "3", "5"]}\n' + row + "\n")
    with pytest.raises(common.RunError, match=rf"bad\.jsonl:2: {message}"):
        dpo.main(toy_args(tmp_path, tiny_model_dir, data=str(path)))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, message", [
    (dict(data=None, ranked=1), "--ranked 1: rank at least 2"),
    (dict(ranked=4), "--ranked builds rankings from the built-in task"),
    (dict(data=None, ranked=4, label_smoothing=0.1), "--label-smoothing is for pairs"),
    (dict(label_smoothing=0.1, ranked_file=True), "--label-smoothing is for pairs"),
])
def test_ranking_flags_are_checked_before_anything_is_written(tmp_path, tiny_model_dir, flags, message):
    if flags.pop("ranked_file", False):
        flags["data"] = toy_rankings(tmp_path)
    with pytest.raises(common.RunError, match=message):
        dpo.main(toy_args(tmp_path, tiny_model_dir, **flags))
    assert not (tmp_path / "run").exists()


# ---- LoRA: only adapters train, pi_ref is the model with them off; data from other sources ---------------------------

@pytest.fixture(scope="module")
def lora_model_dir(tmp_path_factory):
    """A tiny model whose frozen embeddings still allow confident predictions (see helpers.make_model)."""
    path = tmp_path_factory.mktemp("tiny-lora")
    tokenizer = make_tokenizer()
    make_model(tokenizer, initializer_range=0.15).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


LORA = dict(lora_rank=8, lora_alpha=16)


def test_lora_dpo_learns_toy_preferences(tmp_path, lora_model_dir, capsys):
    """When the thresholds were set, seeds 0-3 all gave eval_pref_accuracy 0 -> 1, a last loss <= 0.21, a margin
    >= 1.5, and the greedy accuracy (says 7) 0 -> 1.0, 1.0, 1.0, 0.3."""
    last = dpo.main(toy_args(tmp_path, lora_model_dir, **LORA, learning_rate=2e-2, max_steps=15, eval_every=15,
                             micro_batch_size=16))
    assert "LoRA), batch: 16 pairs" in capsys.readouterr().out  # describe_run: only the adapters train
    log = run_rows(tmp_path)
    assert log[0]["eval_pref_accuracy"] == 0.0  # fresh adapters are zero: pi_theta = pi_ref, every margin 0
    assert log[1]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert last["eval_pref_accuracy"] == 1.0 and last["pref_accuracy"] == 1.0
    assert last["loss"] < 0.3 and last["margin"] > 1.2
    assert last["eval_accuracy"] > log[0]["eval_accuracy"] == 0.0


def test_lora_pairs_are_sampled_and_scored_by_pi_ref_the_model_with_its_adapters_off(tmp_path, lora_model_dir,
                                                                                      monkeypatch, capsys):
    """Built-in pairs: generate() is given the starting model, and the stored reference log-probs are the starting
    model's, even though the policy's adapters are not zero here (fresh ones are: they would hide a pi_ref that is
    really pi_theta). A few of the samples go to samples.jsonl at step 0, and to the terminal."""
    monkeypatch.setattr(dpo, "is_correct", lambda completion, answer: "a" in completion)  # the tiny model can't add
    policies = []

    def perturbed_policy(args, checkpoint, device):
        model, tokenizer = plumbing.load_policy(args, checkpoint, device)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
        policies.append(model)
        return model, tokenizer

    base, tokenizer = plumbing.load_model(lora_model_dir)
    probe = tokenizer(["Say 5.<|im_end|>"], return_tensors="pt").input_ids
    given = []  # the logits, on the probe, of each model generate() is given, when it is given it

    def spy(model, *args, **kwargs):
        with torch.no_grad():
            given.append(model(input_ids=probe).logits)
        return common.generate(model, *args, **kwargs)

    monkeypatch.setattr(dpo, "load_policy", perturbed_policy)
    monkeypatch.setattr(dpo, "generate", spy)
    dpo.main(toy_args(tmp_path, lora_model_dir, **LORA, data=None, digits=1, num_prompts=16, num_samples=4,
                      max_new_tokens=6, temperature=1.0, max_steps=2, eval_every=0))
    with torch.no_grad():
        expected = base(input_ids=probe).logits
        assert len(given) == 1 and (given[0] - expected).abs().max() < 1e-5
        assert (policies[0](input_ids=probe).logits - expected).abs().max() > 0.1  # the adapters on: not pi_ref
        pairs = plumbing.read_jsonl(tmp_path / "run" / "pairs.jsonl", ("prompt", "chosen", "rejected", "ref_chosen"))
        chosen, rejected = dpo.pair_logprobs(base, common.encode_pairs(tokenizer, pairs, "cpu"), False)
    torch.testing.assert_close(torch.tensor([p["ref_chosen"] for p in pairs]), chosen, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(torch.tensor([p["ref_rejected"] for p in pairs]), rejected, rtol=1e-5, atol=1e-4)
    samples = [json.loads(line) for line in open(tmp_path / "run" / "samples.jsonl")]
    assert [s["step"] for s in samples] == [0] * 4 and all(s.keys() >= {"prompt", "completion", "answer", "correct"}
                                                           for s in samples)
    shown = capsys.readouterr().out
    assert all(repr(s["completion"][:80]) in shown for s in samples)


def test_a_lora_run_saves_adapters_and_pi_ref_stays_the_starting_model(tmp_path, lora_model_dir):
    """final/ holds the adapters (peft loads them; plumbing.load_model merges them into the base), final/merged the
    merged weights (plain transformers); with the adapters off, the trained policy is exactly the starting model."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM
    dpo.main(toy_args(tmp_path, lora_model_dir, **LORA, learning_rate=2e-2, max_steps=3, eval_every=0,
                      merge_lora=True))
    final = tmp_path / "run" / "final"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    adapters = AutoPeftModelForCausalLM.from_pretrained(str(final)).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(final / "merged")).eval()
    ours, tokenizer = plumbing.load_model(str(final))
    base = AutoModelForCausalLM.from_pretrained(lora_model_dir).eval()
    ids = tokenizer(["Say 5.<|im_end|>"], return_tensors="pt").input_ids
    with torch.no_grad():
        expected = adapters(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)
        assert (expected - base(input_ids=ids).logits).abs().max() > 1e-3  # it trained
        with plumbing.reference_model(adapters, None) as ref:
            torch.testing.assert_close(ref(input_ids=ids).logits, base(input_ids=ids).logits, rtol=0, atol=1e-6)


def test_pairs_from_a_parquet_file_with_their_own_column_names(tmp_path, tiny_model_dir, capsys):
    """--prompt-field, --chosen-field and --rejected-field map a parquet file's columns; with --data and no
    --eval-data there is no task accuracy (the pairs have no answers), only the held-out pairs' accuracy."""
    import datasets
    rows = [{"instruction": f"Say {d}.", "good": "7", "bad": w, "id": i}
            for i, (d, w) in enumerate(itertools.product(range(10), "012345689"))]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "pairs.parquet"))
    names = dict(prompt_field="instruction", chosen_field="good", rejected_field="bad")
    missing = r"pairs\.parquet: row 1: missing field\(s\) worse \(--rejected-field\)"
    with pytest.raises(common.RunError, match=missing):
        dpo.main(toy_args(tmp_path, tiny_model_dir, data=str(tmp_path / "pairs.parquet"),
                          **{**names, "rejected_field": "worse"}))
    assert not (tmp_path / "run").exists()
    last = dpo.main(toy_args(tmp_path, tiny_model_dir, data=str(tmp_path / "pairs.parquet"), eval_data=None,
                             **names, max_steps=4, eval_every=4))
    assert "note: no task accuracy (eval_accuracy)" in capsys.readouterr().err
    assert "eval_accuracy" not in last and last["eval_pref_accuracy"] == 1.0 and last["margin"] > 0
    saved = plumbing.read_jsonl(tmp_path / "run" / "pairs.jsonl", ("prompt", "chosen", "rejected", "ref_chosen"))
    assert sorted((r["prompt"], r["chosen"], r["rejected"], r["id"]) for r in saved) == sorted(
        (r["instruction"], r["good"], r["bad"], r["id"]) for r in rows)


def test_prompt_and_answer_fields_name_the_eval_data_columns_too(tmp_path, tiny_model_dir):
    """--prompt-field and --answer-field name --eval-data's columns as well as --data's (as in the RL scripts)."""
    pairs = [{"instruction": f"Say {d}.", "chosen": "7", "rejected": w} for d in range(10) for w in "0123"]
    (tmp_path / "renamed.jsonl").write_text("".join(json.dumps(row) + "\n" for row in pairs))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({"instruction": f"Say {d}.", "solution": 7}) + "\n"
                                                 for d in range(10)))
    args = dict(data=str(tmp_path / "renamed.jsonl"), eval_data=str(tmp_path / "eval.jsonl"),
                prompt_field="instruction", max_steps=1, eval_every=1, eval_size=4)
    with pytest.raises(common.RunError, match=r"eval\.jsonl:1: missing field\(s\) answer \(has: instruction"):
        dpo.main(toy_args(tmp_path, tiny_model_dir, **args))
    assert not (tmp_path / "run").exists()
    last = dpo.main(toy_args(tmp_path, tiny_model_dir, **args, answer_field="solution"))
    assert 0.0 <= last["eval_accuracy"] <= 1.0 and last["eval_pref_accuracy"] is not None
