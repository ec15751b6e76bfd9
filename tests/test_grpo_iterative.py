"""grpo_iterative.py: what iteration adds to grpo.py [GRPO-ITERATIVE], against independent computations, then end to
end (the reference reset, the reward model's training with replay, resume mid-iteration), then bad flags."""

import json
import math

import pytest
import torch
from helpers import logged, toy_task

import common
import grpo_iterative
import plumbing


def toy_args(tmp_path, model_dir, **kw):
    data = toy_task(tmp_path)
    defaults = dict(model=model_dir, data=data, eval_data=data, output_dir=str(tmp_path / "run"),
                    max_steps=40, batch_size=8, group_size=8, micro_batch_size=32, learning_rate=1e-2,
                    max_new_tokens=3, temperature=1.0, eval_every=0, beta=0.0, save_every=1000)
    return grpo_iterative.Args(**{**defaults, **kw})


# ---- iterative GRPO [GRPO-ITERATIVE] -----------------------------------------------------------------------------

def test_verifier_pairs_pair_right_with_wrong_completions_of_the_same_prompt():
    completions = ["7", "3", "7.", "x", "1", "2", "3", "4", "5", "7", "6", "8"]
    correct = [True, False, True, False, False, False, False, False, False, True, False, False]
    assert grpo_iterative.verifier_pairs(["p", "q", "r"], completions, correct, 4) == [  # q's group, all wrong, has none
        {"prompt": "p", "chosen": "7", "rejected": "3"}, {"prompt": "p", "chosen": "7.", "rejected": "x"},
        {"prompt": "r", "chosen": "7", "rejected": "5"}]


@pytest.mark.parametrize("fraction, replayed", [(0.1, 5), (0.5, 25), (0.0, 0), (1.0, 50)])
def test_the_replay_mix_holds_the_new_pairs_and_the_asked_fraction_of_the_earlier_ones(fraction, replayed):
    history = [{"prompt": "old", "chosen": str(i), "rejected": "x"} for i in range(50)]
    new = [{"prompt": "new", "chosen": str(i), "rejected": "x"} for i in range(20)]
    mix, after = grpo_iterative.replay_mix(new, history, fraction, __import__("random").Random(0))
    old = [p for p in mix if p["prompt"] == "old"]
    assert len(mix) == 20 + replayed and len(old) == replayed and all(p in history for p in old)
    assert sorted(p["chosen"] for p in mix if p["prompt"] == "new") == sorted(p["chosen"] for p in new)
    assert after == history + new and len({p["chosen"] for p in old}) == replayed  # drawn without replacement


def test_kl_to_the_reference_is_exactly_zero_after_the_reset(tiny_model_dir):
    policy, tokenizer = plumbing.load_model(tiny_model_dir)
    ref = plumbing.load_model(tiny_model_dir)[0]
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))  # the policy has moved away from the reference
    prompt_ids, prompt_mask = common.encode_prompts(tokenizer, ["a", "bb"])
    completion_ids, mask = common.encode_completions(tokenizer, ["12", "345"])

    def kl():
        with torch.no_grad():
            return grpo_iterative.kl_k3(*(common.completion_logprobs(m, prompt_ids, prompt_mask, completion_ids, mask, 0.7)[0]
                                for m in (policy, ref))) * mask
    assert kl().max() > 0
    ref.load_state_dict(policy.state_dict())  # pi_ref <- pi_theta, as grpo_iterative.main does at the end of an iteration
    assert kl().abs().max() == 0


def iterative_args(tmp_path, model_dir, reward_model_dir, **kw):
    return toy_args(tmp_path, model_dir, reward_model=reward_model_dir, iteration_steps=3, beta=0.05, rm_steps=2,
                    rm_learning_rate=1e-3, learning_rate=1e-3, max_new_tokens=2, **kw)


@pytest.fixture
def half_right(monkeypatch):
    """Completions starting with a character before 'a' count as right: about half, so every group has pairs."""
    monkeypatch.setattr(grpo_iterative, "is_correct", lambda completion, answer: completion[:1] < "a")


def test_iterative_grpo_resets_the_reference_and_trains_the_reward_model(tmp_path, tiny_model_dir, reward_model_dir,
                                                                        half_right):
    grpo_iterative.main(iterative_args(tmp_path, tiny_model_dir, reward_model_dir, max_steps=6))
    run = tmp_path / "run"
    assert logged(run, "iteration") == [0, 0, 0, 1, 1, 1]
    kl = logged(run, "kl_k3")
    assert kl[2] > 1e-3 and abs(kl[0]) < 1e-9 and abs(kl[3]) < 1e-9  # pi_theta = pi_ref at the start, and again
    # right after the reset at the end of step 3 (up to rounding: the loss pass groups rows otherwise than pi_ref's)
    rm_pairs, rm_new = logged(run, "rm_pairs"), logged(run, "rm_new_pairs")
    assert rm_pairs[:2] == rm_new[:2] == [None, None] and rm_pairs[2] == rm_new[2] > 20  # iteration 0: no history
    assert rm_pairs[5] == rm_new[5] + round(0.1 * rm_new[2])  # iteration 1 replays 10% of iteration 0's pairs
    assert all(math.isfinite(x) for x in (logged(run, "rm_loss")[2], logged(run, "rm_loss")[5]))
    trained = plumbing.load_model(str(run / "final" / "reward_model"))[0]  # loads as a model; compare the backbones
    given = plumbing.load_model(reward_model_dir)[0]
    assert any(not torch.equal(p, q) for p, q in zip(trained.parameters(), given.parameters()))


def test_iterative_grpo_resumed_mid_iteration_reproduces_the_uninterrupted_run(tmp_path, tiny_model_dir,
                                                                             reward_model_dir, half_right):
    """The checkpoint at step 4 is inside iteration 1: pi_ref reset at step 3, the reward model trained once, step 4's
    pairs not used yet. Steps 5-6 from it, with the reward model's second training at step 6, must match."""
    kw = dict(max_steps=6, save_every=4)
    grpo_iterative.main(iterative_args(tmp_path, tiny_model_dir, reward_model_dir, **kw))
    grpo_iterative.main(iterative_args(tmp_path, tiny_model_dir, reward_model_dir, resume=str(tmp_path / "run"),
                             output_dir=str(tmp_path / "resumed"), **kw))
    for sub in ("", "reward_model"):
        a = plumbing.load_model(str(tmp_path / "run" / "final" / sub))[0]
        b = plumbing.load_model(str(tmp_path / "resumed" / "final" / sub))[0]
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    timing = ("sample_tokens_per_s", "train_tokens_per_s", "step_time", "time")
    rows = [[{k: v for k, v in json.loads(line).items() if k not in timing} for line in open(run / "metrics.jsonl")]
            for run in (tmp_path / "run", tmp_path / "resumed")]
    assert rows[0] == rows[1] and len(rows[0]) == 6 and "rm_loss" in rows[0][5]


@pytest.mark.parametrize("flag, message", [
    (dict(iteration_steps=0), "--iteration-steps 0: must be >= 1"),
    (dict(iteration_steps=2, rm_steps=0), "--rm-steps 0: must be >= 1"),
    (dict(rm_learning_rate=0.0), "--rm-learning-rate 0.0: must be > 0"),
    (dict(iteration_steps=2), "with --beta 0 and no reward model it would do nothing"),
    (dict(replay_fraction=1.5), "--replay-fraction 1.5: must be in"),
])
def test_bad_iterative_flags_are_refused_before_anything_is_written(tmp_path, tiny_model_dir, flag, message):
    with pytest.raises(common.RunError, match=message):
        grpo_iterative.main(toy_args(tmp_path, tiny_model_dir, **flag))
    assert not (tmp_path / "run").exists()


def test_lora_with_a_reference_to_reset_is_refused(tmp_path, tiny_model_dir):
    with pytest.raises(common.RunError, match="--iteration-steps with --lora-rank"):
        grpo_iterative.main(toy_args(tmp_path, tiny_model_dir, iteration_steps=2, beta=0.1, lora_rank=8))
    assert not (tmp_path / "run").exists()
