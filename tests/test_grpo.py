"""grpo.py: each equation against an independent computation, then learning end to end, then bad input."""

import json
import math

import pytest
import torch
from helpers import logged, make_model, make_tokenizer, toy_task

import common
import plumbing
import grpo


# ---- [GRPO-ADV], [ZERO-STD] ------------------------------------------------------------------------------------------

def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 1])
    eps = 1e-4
    std3 = math.sqrt(0.75 * 0.25)  # population std of (0, 0, 0, 1)
    expected = [0.5 / (0.5 + eps), -0.5 / (0.5 + eps), -0.5 / (0.5 + eps), 0.5 / (0.5 + eps),
                0, 0, 0, 0,  # all-equal group: no signal, and no NaN
                -0.25 / (std3 + eps), -0.25 / (std3 + eps), -0.25 / (std3 + eps), 0.75 / (std3 + eps)]
    torch.testing.assert_close(grpo.group_advantages(rewards, 4, "group", eps), torch.tensor(expected))


def test_group_advantages_without_std_scaling_are_centred_rewards():
    rewards = torch.tensor([2.0, 0.0, 1.0, 1.0])
    torch.testing.assert_close(grpo.group_advantages(rewards, 2, "none"), torch.tensor([1.0, -1.0, 0.0, 0.0]))
    batch_std = rewards.std(correction=0).item()  # sqrt(0.5)
    torch.testing.assert_close(grpo.group_advantages(rewards, 2, "batch"),
                               torch.tensor([1.0, -1.0, 0.0, 0.0]) / (batch_std + 1e-4))


def test_group_of_one_has_zero_advantage():
    adv = grpo.group_advantages(torch.tensor([1.0, 0.0, 0.3]), 1)
    assert not adv.isnan().any() and adv.abs().max() == 0


def test_zero_std_fraction_counts_groups_with_equal_rewards():
    rewards = torch.tensor([1.0, 0, 1, 1, 0, 0, 0.5, 0.5])
    assert grpo.zero_std_fraction(rewards, 2) == 0.75


# ---- [KL-K3] -------------------------------------------------------------------------------------------------------

def test_kl_k3_is_nonnegative_and_zero_where_the_policies_agree():
    torch.manual_seed(0)
    a, b = torch.randn(1000) * 3, torch.randn(1000) * 3
    assert (grpo.kl_k3(a, b) >= 0).all()
    assert grpo.kl_k3(a, a).abs().max() == 0


def test_kl_k3_averaged_over_samples_from_pi_theta_is_the_exact_kl():
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, generator=gen), 0)  # pi_theta
    q = torch.softmax(torch.randn(6, generator=gen), 0)  # pi_ref
    exact = (p * (p / q).log()).sum()
    tokens = torch.multinomial(p, 400_000, replacement=True, generator=gen)
    estimate = grpo.kl_k3(p.log()[tokens], q.log()[tokens]).mean()
    assert estimate.item() == pytest.approx(exact.item(), rel=0.02)


# ---- [IS-RATIO], [PPO-CLIP] ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("log_ratio, advantage, has_gradient", [
    (0.5, 1.0, False),    # ratio 1.65 > 1 + eps, advantage pushes it up: clipped, no gradient
    (-0.5, -1.0, False),  # ratio 0.61 < 1 - eps, advantage pushes it down: clipped, no gradient
    (0.05, 1.0, True),    # inside the trust region
    (-0.05, -1.0, True),
    (-0.5, 1.0, True),    # outside, but the advantage pulls it back: the min keeps the unclipped term
    (0.5, -1.0, True),
])
def test_clipped_loss_has_zero_gradient_only_where_clipping_binds(log_ratio, advantage, has_gradient):
    logprobs = torch.tensor([[log_ratio - 1.0]], requires_grad=True)
    loss, ratio = grpo.clipped_policy_loss(logprobs, torch.tensor([[-1.0]]), torch.tensor([[advantage]]), 0.2, 0.2)
    loss.sum().backward()
    assert ratio.item() == pytest.approx(math.exp(log_ratio))
    assert (logprobs.grad.abs().item() > 0) == has_gradient


def test_clip_higher_uses_separate_bounds():
    logprobs = torch.tensor([[math.log(1.25)]], requires_grad=True)
    loss, _ = grpo.clipped_policy_loss(logprobs, torch.zeros(1, 1), torch.ones(1, 1), 0.2, 0.28)
    loss.sum().backward()
    assert logprobs.grad.item() != 0  # 1.25 < 1.28: still inside with clip-higher
    assert loss.item() == pytest.approx(-1.25)


# ---- aggregation [GRPO-OBJ], [DR-GRPO] -------------------------------------------------------------------------------

L = torch.tensor([[1.0, 9.0, 9.0], [2.0, 3.0, 4.0], [5.0, 6.0, 9.0]])  # 9s sit where the mask is 0
M = torch.tensor([[1, 0, 0], [1, 1, 1], [1, 1, 0]])


@pytest.mark.parametrize("loss_agg, expected", [
    ("grpo", (1 / 1 + (2 + 3 + 4) / 3 + (5 + 6) / 2) / 3),
    ("token", (1 + 2 + 3 + 4 + 5 + 6) / 6),
    ("constant", (1 + 2 + 3 + 4 + 5 + 6) / (3 * 8)),  # max_new_tokens = 8
])
def test_loss_aggregation_by_hand_and_across_micro_batches(loss_agg, expected):
    whole = grpo.aggregate(L, M, loss_agg, num_sequences=3, num_tokens=6, max_new_tokens=8)
    assert whole.item() == pytest.approx(expected)
    parts = [grpo.aggregate(L[rows], M[rows], loss_agg, 3, 6, 8) for rows in ([0], [1, 2])]
    assert sum(parts).item() == pytest.approx(expected)


# ---- on-policy GRPO is the policy gradient [PG-TOKEN-LOSS] -----------------------------------------------------------

def test_on_policy_grpo_gradient_equals_the_weighted_policy_gradient():
    tokenizer = make_tokenizer()
    tokenizer.padding_side = "left"
    model = make_model(tokenizer)
    prompt_ids, prompt_mask = common.encode_prompts(tokenizer, ["a", "bb", "ccc"])
    completion_ids, mask = common.encode_completions(tokenizer, ["1", "234", "56"])
    A = torch.tensor([[0.7], [-1.2], [0.4]])

    def grad_of(loss_fn):
        model.zero_grad()
        logprobs, _ = common.completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, mask, 0.8)
        loss_fn(logprobs).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    def grpo_loss(logprobs):
        per_token, ratio = grpo.clipped_policy_loss(logprobs, logprobs.detach(), A, 0.2, 0.2)
        assert torch.allclose(ratio, torch.ones_like(ratio))
        return grpo.aggregate(per_token, mask, "grpo", 3, int(mask.sum()), 8)

    def policy_gradient_loss(logprobs):  # [PG-TOKEN-LOSS]: -A log pi, weighted 1 / (G |o_i|)
        return (-A * logprobs * mask / mask.sum(1, keepdim=True)).sum() / 3

    torch.testing.assert_close(grad_of(grpo_loss), grad_of(policy_gradient_loss))


# ---- the reward ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("completion, fmt, expected", [
    ("59 + 63 = 122", 0.0, 1.0), ("122", 0.1, 1.1), (" 122 ", 0.1, 1.1), ("59 + 63 = 122", 0.1, 1.0),
    ("121", 0.1, 0.1), ("122? no: 121", 0.1, 0.0), ("", 0.1, 0.0),
])
def test_reward_checks_the_answer_and_optionally_the_format(completion, fmt, expected):
    assert grpo.reward(completion, common.is_correct(completion, "122"), fmt) == pytest.approx(expected)


# ---- learning, end to end -------------------------------------------------------------------------------------------

def toy_args(tmp_path, model_dir, **kw):
    data = toy_task(tmp_path)
    defaults = dict(model=model_dir, data=data, eval_data=data, output_dir=str(tmp_path / "run"),
                    max_steps=40, batch_size=8, group_size=8, micro_batch_size=32, learning_rate=1e-2,  # seeds 0-4: > 0.85
                    max_new_tokens=3, temperature=1.0, eval_every=0, beta=0.0, save_every=1000)
    return grpo.Args(**{**defaults, **kw})


def test_grpo_learns_the_toy_task(tmp_path, tiny_model_dir):
    grpo.main(toy_args(tmp_path, tiny_model_dir))
    rewards = logged(tmp_path / "run", "reward_mean")
    assert sum(rewards[:3]) / 3 < 0.15
    assert sum(rewards[-4:]) / 4 > 0.8


def test_grpo_learns_in_bf16_on_a_cpu(tmp_path, tiny_model_dir):
    """--dtype bfloat16: the matmuls under autocast (a GPU's path, run here), the weights and log-probs in fp32."""
    grpo.main(toy_args(tmp_path, tiny_model_dir, dtype="bfloat16"))
    rewards = logged(tmp_path / "run", "reward_mean")
    assert sum(rewards[:3]) / 3 < 0.15
    assert sum(rewards[-4:]) / 4 > 0.6
    assert json.loads((tmp_path / "run" / "args.json").read_text())["dtype"] == "bfloat16"


def test_grpo_with_several_iterations_kl_and_clip_higher_learns(tmp_path, tiny_model_dir):
    """The off-policy path: mu = 2 passes, 2 mini-batches (4 optimiser steps per batch), pi_old and pi_ref scored."""
    last = grpo.main(toy_args(tmp_path, tiny_model_dir, num_iterations=2, mini_batch_size=32, learning_rate=1e-2,
                              beta=0.01, clip_eps_high=0.28, max_steps=30))
    rewards = logged(tmp_path / "run", "reward_mean")
    assert sum(rewards[:3]) / 3 < 0.15
    assert sum(rewards[-4:]) / 4 > 0.6  # seeds 0-3 end at 0.75-0.98
    assert last["kl_k3"] > 0 and "clip_frac_low" in last and "clip_frac_high" in last


def test_grpo_with_flipped_advantages_does_not_learn(tmp_path, tiny_model_dir, monkeypatch):
    """Sign control: the same run, with every advantage negated, must drive the reward down, not up."""
    original = grpo.group_advantages
    monkeypatch.setattr(grpo, "group_advantages", lambda *a, **k: -original(*a, **k))
    grpo.main(toy_args(tmp_path, tiny_model_dir))
    assert sum(logged(tmp_path / "run", "reward_mean")[-8:]) / 8 < 0.05


def test_grpo_resume_reproduces_an_uninterrupted_run(tmp_path, tiny_model_dir):
    args = dict(max_steps=4, save_every=2, learning_rate=1e-3)
    grpo.main(toy_args(tmp_path, tiny_model_dir, **args))
    grpo.main(toy_args(tmp_path, tiny_model_dir, resume=str(tmp_path / "run"),
                       output_dir=str(tmp_path / "resumed"), **args))
    a, _ = plumbing.load_model(str(tmp_path / "run" / "final"))
    b, _ = plumbing.load_model(str(tmp_path / "resumed" / "final"))
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)


def test_inconsistent_batch_sizes_are_a_clear_error(tmp_path, tiny_model_dir):
    with pytest.raises(common.RunError, match=r"\(64\) must be a multiple of --mini-batch-size \(24\)"):
        grpo.main(toy_args(tmp_path, tiny_model_dir, mini_batch_size=24))


# ---- a learned reward model (--reward-model) -------------------------------------------------------------------------

def test_grpo_runs_with_a_reward_model_from_reward_py(tmp_path, tiny_model_dir, reward_model_dir):
    last = grpo.main(toy_args(tmp_path, tiny_model_dir, reward_model=reward_model_dir, max_steps=2))
    rewards, stds = logged(tmp_path / "run", "reward_mean"), logged(tmp_path / "run", "reward_std")
    assert all(math.isfinite(r) for r in rewards) and all(s > 0 for s in stds)
    assert not all(r * 64 == int(r * 64) for r in rewards)  # scores, not the verifier's 0/1 over 64 completions
    assert "accuracy" in last and last["grad_norm"] > 0  # the verifier still measures; the scores teach


def test_a_bad_reward_model_is_refused_before_anything_is_written(tmp_path, tiny_model_dir, reward_model_dir):
    with pytest.raises(common.RunError, match="--reward-model .*nope: no such directory"):
        grpo.main(toy_args(tmp_path, tiny_model_dir, reward_model=str(tmp_path / "nope")))
    with pytest.raises(common.RunError, match=r"--reward-model .*: not a trained reward model \(score.weight"):
        grpo.main(toy_args(tmp_path, tiny_model_dir, reward_model=tiny_model_dir))
    with pytest.raises(common.RunError, match="--reward-model scores whole completions"):
        grpo.main(toy_args(tmp_path, tiny_model_dir, reward_model=reward_model_dir, supervision="process"))
    assert not (tmp_path / "run").exists()
