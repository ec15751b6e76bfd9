"""ppo.py: GAE against the direct sum, rewards, clipping, the critic, learning end to end (reward.py's own tests:
test_reward.py)."""

import contextlib
import json
import math

import pytest
import torch
from helpers import logged, make_model, pair_files, toy_task

import common
import plumbing
import ppo
import reward

MASK = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])


def direct_gae(rewards, values, mask, gamma, lam):
    """sum_l (gamma lam)^l delta_t+l with delta_t = r_t + gamma V_t+1 - V_t and V = 0 past each row's end."""
    out = torch.zeros_like(rewards)
    for i in range(len(rewards)):
        n = int(mask[i].sum())
        v = [values[i, t].item() for t in range(n)] + [0.0]
        delta = [rewards[i, t].item() + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            out[i, t] = sum((gamma * lam) ** l * delta[t + l] for l in range(n - t))
    return out


@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("lam", [0.0, 0.95, 1.0])
def test_gae_equals_the_direct_sum_on_ragged_rows(gamma, lam):
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 5) * MASK, torch.randn(3, 5)
    advantages, returns = ppo.gae(rewards, values, MASK, gamma, lam)
    torch.testing.assert_close(advantages, direct_gae(rewards, values, MASK, gamma, lam))
    torch.testing.assert_close(returns, (advantages + values) * MASK)  # [RETURNS]


def test_gae_lambda_zero_is_the_td_error():
    torch.manual_seed(1)
    rewards, values = torch.randn(3, 5) * MASK, torch.randn(3, 5) * MASK
    advantages, _ = ppo.gae(rewards, values, MASK, 0.9, 0.0)
    next_values = torch.cat([values[:, 1:], torch.zeros(3, 1)], 1) * MASK  # V(s_T) = 0 after the last token
    torch.testing.assert_close(advantages, (rewards + 0.9 * next_values - values) * MASK)


def test_gae_lambda_one_is_monte_carlo_return_minus_value():
    torch.manual_seed(2)
    rewards, values = torch.randn(3, 5) * MASK, torch.randn(3, 5) * MASK
    advantages, returns = ppo.gae(rewards, values, MASK, 0.9, 1.0)
    mc = torch.zeros(3, 5)
    for i in range(3):
        for t in range(5):
            mc[i, t] = sum(0.9 ** (u - t) * rewards[i, u] for u in range(t, 5))
    torch.testing.assert_close(advantages, (mc - values) * MASK)
    torch.testing.assert_close(returns, mc * MASK)  # the value target is the Monte-Carlo return


def test_score_lands_on_the_last_real_token_and_kl_on_every_token():
    """pad == EOS: rows 0 and 1 end in EOS followed by pad ids equal to it; the score must sit on the first one."""
    kl = torch.full((3, 5), 2.0)
    rewards = ppo.token_rewards(torch.tensor([1.0, -1.0, 3.0]), MASK, kl, beta=0.1)
    expected = -0.2 * MASK.float()
    expected[0, 3] += 1.0
    expected[1, 1] -= 1.0
    expected[2, 4] += 3.0
    torch.testing.assert_close(rewards, expected)


def test_value_clipping_by_hand():
    values, old, returns = torch.tensor([1.5, 0.1, -1.0]), torch.tensor([1.0, 0.0, 0.0]), torch.tensor([2.0, 1.0, 0.5])
    loss, clipped = ppo.value_loss(values, old, returns, clip_value=0.2)
    # row 0: unclipped (1.5-2)^2 = .25, clipped V = 1.2: (1.2-2)^2 = .64 -> .64
    # row 1: unclipped (0.1-1)^2 = .81, clipped V = 0.1 (inside): .81
    # row 2: unclipped (-1-.5)^2 = 2.25, clipped V = -0.2: (-.2-.5)^2 = .49 -> 2.25
    torch.testing.assert_close(loss, 0.5 * torch.tensor([0.64, 0.81, 2.25]))
    assert clipped.tolist() == [True, False, False]
    unclipped_loss, _ = ppo.value_loss(values, old, returns, clip_value=None)
    torch.testing.assert_close(unclipped_loss, 0.5 * (values - returns) ** 2)


@pytest.mark.parametrize("log_ratio, advantage, has_gradient", [
    (0.5, 1.0, False), (-0.5, -1.0, False), (0.05, 1.0, True), (-0.5, 1.0, True), (0.5, -1.0, True),
])
def test_ppo_clip_zero_gradient_region(log_ratio, advantage, has_gradient):
    logprobs = torch.tensor([log_ratio], requires_grad=True)
    loss, _ = ppo.policy_loss(logprobs, torch.zeros(1), torch.tensor([advantage]), 0.2)
    loss.sum().backward()
    assert (logprobs.grad.abs().item() > 0) == has_gradient


def test_penalty_loss_per_token_by_hand():
    """[PPO-PENALTY] -(r A - beta_pen (r - 1 - log r)) on three tokens with ratios 1, 2 and 1/2, and its gradient
    -(r A - beta_pen (r - 1)) with respect to log pi_theta: the KL term pulls only where pi_theta has left pi_old."""
    log2 = math.log(2)
    old = torch.tensor([-1.0, -2.0, -0.5])
    logprobs = (old + torch.tensor([0.0, log2, -log2])).requires_grad_()
    advantages = torch.tensor([1.0, -1.0, 2.0])
    loss, ratio = ppo.penalty_policy_loss(logprobs, old, advantages, beta_pen=0.5)
    torch.testing.assert_close(ratio, torch.tensor([1.0, 2.0, 0.5]).detach())
    expected = [-(1 * 1 - 0.5 * 0), -(2 * -1 - 0.5 * (2 - 1 - log2)), -(0.5 * 2 - 0.5 * (0.5 - 1 + log2))]
    torch.testing.assert_close(loss, torch.tensor(expected))
    loss.sum().backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([-1.0, -(-2 - 0.5 * 1), -(1 - 0.5 * -0.5)]))


def test_penalty_term_averaged_over_pi_old_is_the_exact_kl_and_its_gradient():
    """On a categorical policy over 6 tokens: the KL term of every token weighed by pi_old (the tokens' sampling
    distribution) is KL(pi_old || pi_theta) exactly, value and gradient."""
    gen = torch.Generator().manual_seed(0)
    old = torch.log_softmax(torch.randn(6, generator=gen), 0)
    logits = torch.randn(6, generator=gen, requires_grad=True)
    theta = torch.log_softmax(logits, 0)
    per_token, _ = ppo.penalty_policy_loss(theta, old, torch.zeros(6), beta_pen=1.0)  # A = 0: the KL term alone
    expected = (old.exp() * per_token).sum()
    exact = (old.exp() * (old - theta)).sum()  # KL(pi_old || pi_theta)
    torch.testing.assert_close(expected, exact)
    g_expected, = torch.autograd.grad(expected, logits, retain_graph=True)
    g_exact, = torch.autograd.grad(exact, logits)
    torch.testing.assert_close(g_expected, g_exact)


@pytest.mark.parametrize("kl, expected", [
    (0.016, 2.0), (0.5, 2.0),  # above 1.5 d_targ: doubled
    (0.0066, 0.5), (0.0, 0.5),  # below d_targ / 1.5: halved
    (0.01, 1.0), (0.0067, 1.0), (0.015, 1.0),  # in between, both ends included: unchanged
])
def test_penalty_beta_doubles_halves_or_stays_by_the_papers_rule(kl, expected):
    assert ppo.adapt_penalty_beta(1.0, kl, kl_target=0.01) == expected


def test_adaptive_beta_moves_towards_the_target_and_is_bounded():
    assert ppo.adaptive_beta(0.1, kl=2.0, target_kl=1.0, horizon=100, n_samples=10) == pytest.approx(0.1 * 1.02)
    assert ppo.adaptive_beta(0.1, kl=0.5, target_kl=1.0, horizon=100, n_samples=10) == pytest.approx(0.1 * 0.98)
    assert ppo.adaptive_beta(0.1, kl=1.05, target_kl=1.0, horizon=100, n_samples=10) == pytest.approx(0.1 * 1.005)


def test_explained_variance_of_perfect_and_constant_critics():
    torch.manual_seed(0)
    returns = torch.randn(3, 5) * MASK
    assert ppo.explained_variance(returns, returns, MASK) == pytest.approx(1.0)
    assert ppo.explained_variance(torch.zeros(3, 5), returns, MASK) == pytest.approx(
        1 - ((returns - 0)[MASK.bool()].var(correction=0) / returns[MASK.bool()].var(correction=0)).item())
    assert ppo.explained_variance(torch.zeros(3, 5), torch.zeros(3, 5), MASK) is None


def test_critic_starts_at_zero_and_reads_the_state_before_each_token(tiny_model_dir):
    model, tokenizer = plumbing.load_model(tiny_model_dir)
    critic = ppo.Critic(model.base_model, model.config.hidden_size)
    batch = (*common.encode_prompts(tokenizer, ["a", "bbb"]), *common.encode_completions(tokenizer, ["1", "22"]))
    assert critic(*batch).abs().max() == 0
    torch.nn.init.normal_(critic.head.weight)
    values = critic(*batch)
    assert values.shape == batch[2].shape
    # V(s_0) depends on the prompt only: changing the first completion token leaves it unchanged
    other = batch[2].clone()
    other[:, 0] = tokenizer.convert_tokens_to_ids("9")
    torch.testing.assert_close(critic(batch[0], batch[1], other, batch[3])[:, 0], values[:, 0])


# ---- pairs for a reward model from reward.py -------------------------------------------------------------------------

# ---- learning, end to end -------------------------------------------------------------------------------------------

def toy_args(tmp_path, model_dir, **kw):
    data = toy_task(tmp_path)
    defaults = dict(model=model_dir, data=data, eval_data=data, output_dir=str(tmp_path / "run"),
                    max_steps=60, batch_size=32, mini_batch_size=16, micro_batch_size=16, learning_rate=2e-3,
                    max_new_tokens=3, temperature=1.0, eval_every=0, save_every=1000)
    return ppo.Args(**{**defaults, **kw})


def test_ppo_learns_the_toy_task_and_its_critic_explains_the_returns(tmp_path, tiny_model_dir):
    ppo.main(toy_args(tmp_path, tiny_model_dir))
    rewards = logged(tmp_path / "run", "reward_mean")
    assert sum(rewards[:3]) / 3 < 0.15
    assert sum(rewards[-4:]) / 4 > 0.8
    explained = [v for v in logged(tmp_path / "run", "explained_variance")[-10:] if v is not None]
    assert sum(explained) / len(explained) > 0.1


def test_ppo_with_the_kl_penalty_learns_and_adapts_beta_pen_after_every_rollout(tmp_path, tiny_model_dir):
    """--policy-loss penalty: no clip; the logged beta_pen follows the rule from the KL that each rollout's updates
    made. (Seed 0: the reward goes from ~0.02 to ~0.8 in 30 steps, beta_pen from 0.5 up to 8 and back down.)"""
    ppo.main(toy_args(tmp_path, tiny_model_dir, policy_loss="penalty", max_steps=30))
    rewards = logged(tmp_path / "run", "reward_mean")
    assert sum(rewards[:3]) / 3 < 0.15
    assert sum(rewards[-4:]) / 4 > 0.7
    beta_pen, kl = logged(tmp_path / "run", "beta_pen"), logged(tmp_path / "run", "penalty_kl")
    assert beta_pen == [ppo.adapt_penalty_beta(b, d, 0.01) for b, d in zip([1.0] + beta_pen[:-1], kl)]
    assert len(set(beta_pen)) > 2 and max(kl) > 0.015  # it moved both ways
    assert logged(tmp_path / "run", "clip_frac") == [None] * 30  # nothing is clipped


def test_ppo_with_a_shared_backbone_learns(tmp_path, tiny_model_dir):
    ppo.main(toy_args(tmp_path, tiny_model_dir, shared_backbone=True))
    assert sum(logged(tmp_path / "run", "reward_mean")[-4:]) / 4 > 0.8


def test_ppo_with_flipped_advantages_does_not_learn(tmp_path, tiny_model_dir, monkeypatch):
    original = ppo.whiten
    monkeypatch.setattr(ppo, "whiten", lambda *a, **k: -original(*a, **k))
    ppo.main(toy_args(tmp_path, tiny_model_dir))
    assert sum(logged(tmp_path / "run", "reward_mean")[-8:]) / 8 < 0.05


def test_ppo_runs_with_a_reward_model_from_reward_py(tmp_path, tiny_model_dir):
    data, eval_data = pair_files(tmp_path)
    reward.main(reward.Args(model=tiny_model_dir, data=data, eval_data=eval_data, output_dir=str(tmp_path / "rm"),
                            max_steps=2, batch_size=8, micro_batch_size=8, eval_every=0))
    last = ppo.main(toy_args(tmp_path, tiny_model_dir, reward_model=str(tmp_path / "rm" / "final"), max_steps=2,
                             target_kl=0.1, early_stop_kl=1.0))
    assert math.isfinite(last["reward_mean"]) and last["beta"] != 0.05  # scored by the model, beta adapted


@pytest.mark.parametrize("policy_loss", ["clip", "penalty"])
def test_ppo_resume_reproduces_an_uninterrupted_run(tmp_path, tiny_model_dir, policy_loss):
    """Bit-exact: the critic (head and its own backbone) and the adapted beta (and beta_pen) travel in the
    checkpoint."""
    args = dict(max_steps=4, save_every=2, batch_size=16, mini_batch_size=8, micro_batch_size=8, learning_rate=1e-2,
                max_new_tokens=1, format_reward=1.0, target_kl=0.01,  # one token: a digit ~1 in 8, rewards not all 0
                policy_loss=policy_loss)
    ppo.main(toy_args(tmp_path, tiny_model_dir, **args))
    ppo.main(toy_args(tmp_path, tiny_model_dir, resume=str(tmp_path / "run"), output_dir=str(tmp_path / "resumed"),
                      **args))
    a, _ = plumbing.load_model(str(tmp_path / "run" / "final"))
    b, _ = plumbing.load_model(str(tmp_path / "resumed" / "final"))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    timing = ("sample_tokens_per_s", "train_tokens_per_s", "step_time", "time")
    rows = [[{k: v for k, v in json.loads(line).items() if k not in timing} for line in open(run / "metrics.jsonl")]
            for run in (tmp_path / "run", tmp_path / "resumed")]
    assert rows[0] == rows[1] and len(rows[0]) == 4  # value_loss and beta too: the critic and beta were restored
    assert rows[0][-1]["beta"] != 0.05 and rows[0][-1]["value_loss"] > 0
    assert ("beta_pen" in rows[0][-1]) == (policy_loss == "penalty")


@pytest.mark.parametrize("flag, message", [
    (dict(temperature=0.0), "--temperature 0.0: must be > 0"), (dict(gamma=1.5), "--gamma 1.5: must be in"),
    (dict(mini_batch_size=12), r"--batch-size \(32\) must be a multiple of --mini-batch-size \(12\)"),
    (dict(clip_value=-1.0), "--clip-value"), (dict(vf_coef=float("inf")), "--vf-coef inf: must be a finite number"),
    (dict(lora_rank=8, shared_backbone=True), "--shared-backbone with --lora-rank"),
    (dict(penalty_beta=2.0), "--penalty-beta 2.0: has no effect with --policy-loss clip"),
    (dict(policy_loss="penalty", clip_eps=0.1), "--clip-eps 0.1: has no effect with --policy-loss penalty"),
    (dict(policy_loss="penalty", penalty_kl_target=0.0), "--penalty-kl-target 0.0: must be > 0"),
])
def test_bad_flags_are_refused_before_anything_is_written(tmp_path, tiny_model_dir, flag, message):
    with pytest.raises(common.RunError, match=message):
        ppo.main(toy_args(tmp_path, tiny_model_dir, **flag))
    assert not (tmp_path / "run").exists()


def test_a_missing_or_untrained_reward_model_is_refused_before_anything_is_written(tmp_path, tiny_model_dir):
    with pytest.raises(common.RunError, match="--reward-model .*nope: no such directory"):
        ppo.main(toy_args(tmp_path, tiny_model_dir, reward_model=str(tmp_path / "nope")))
    # a causal LM would load as a classifier with a random score head, and score noise without a word
    with pytest.raises(common.RunError, match=r"--reward-model .*: not a trained reward model \(score.weight"):
        ppo.main(toy_args(tmp_path, tiny_model_dir, reward_model=tiny_model_dir))
    assert not (tmp_path / "run").exists()


# ---- LoRA and other data ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_model_dir(tmp_path_factory, tokenizer) -> str:
    """A tiny model whose larger initial weights let frozen embeddings reach high probabilities (helpers.make_model):
    with the default 0.02, LoRA cannot learn the toy task."""
    path = tmp_path_factory.mktemp("tiny-llama-lora")
    make_model(tokenizer, initializer_range=0.15).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_ppo_with_lora_learns_the_toy_task(tmp_path, lora_model_dir):
    """Only the actor's adapters and the critic train. The first right answers are rare (~2% of samples) and when
    they come is luck: with 64 rollouts a step the last 4 steps' reward is 0.80, 0.74 and 0.45 for seeds 0, 2, 3 (the
    last found its first ones late); with 32, seed 0 found none in 6 steps and never learned."""
    ppo.main(toy_args(tmp_path, lora_model_dir, max_steps=25, learning_rate=1e-2, lora_rank=8, lora_alpha=16,
                      batch_size=64, mini_batch_size=32))
    rewards = logged(tmp_path / "run", "reward_mean")
    assert sum(rewards[:3]) / 3 < 0.15
    assert sum(rewards[-4:]) / 4 > 0.7


def test_ppo_with_lora_takes_pi_ref_from_the_actor_with_its_adapters_off(tmp_path, lora_model_dir, monkeypatch):
    """At every step the pi_ref that ppo uses gives the starting model's log-probs, although the adapters have moved
    the actor away from it; the first step's KL is exactly 0, as with a separate copy. final/ holds the adapters,
    which load with peft and as a merged model, and final/merged is that merged model."""
    base, tokenizer = plumbing.load_model(lora_model_dir)
    batch = (*common.encode_prompts(tokenizer, ["Say 1.", "Say 23."]),
             *common.encode_completions(tokenizer, ["7", "45"]))
    with torch.no_grad():
        expected = common.completion_logprobs(base, *batch)[0]
    gaps = []  # (pi_ref - starting model, pi_theta - starting model), largest log-prob difference at each step

    @contextlib.contextmanager
    def checked_reference_model(model, ref_model):
        assert ref_model is None  # no second copy with LoRA
        with torch.no_grad():
            theta = common.completion_logprobs(model, *batch)[0]
            with plumbing.reference_model(model, ref_model) as ref:
                gaps.append(((common.completion_logprobs(ref, *batch)[0] - expected).abs().max().item(),
                             (theta - expected).abs().max().item()))
                yield ref

    monkeypatch.setattr(ppo, "reference_model", checked_reference_model)
    ppo.main(toy_args(tmp_path, lora_model_dir, max_steps=3, batch_size=16, mini_batch_size=8, micro_batch_size=8,
                      learning_rate=1e-2, lora_rank=8, lora_alpha=16, merge_lora=True, max_new_tokens=1,
                      format_reward=1.0))  # one token: a digit ~1 in 8, so rewards are not all 0 and the actor moves
    assert len(gaps) == 3 and all(ref_gap < 1e-6 for ref_gap, _ in gaps)
    assert gaps[0][1] == 0 and gaps[-1][1] > 1e-2  # the adapters start at zero, then move the actor
    kl = logged(tmp_path / "run", "kl_k1")
    assert kl[0] == 0 and kl[-1] > 0

    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM
    final = tmp_path / "run" / "final"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    assert not (final / "model.safetensors").exists()
    adapted = AutoPeftModelForCausalLM.from_pretrained(final).eval()
    merged, _ = plumbing.load_model(str(final))
    plain = AutoModelForCausalLM.from_pretrained(final / "merged").eval()
    ids, mask = batch[0], batch[1]
    with torch.no_grad():
        logits = [m(input_ids=ids, attention_mask=mask).logits for m in (adapted, merged, plain, base)]
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[2], logits[0], atol=1e-5, rtol=1e-5)
    assert (logits[0] - logits[3]).abs().max() > 1e-2  # the saved adapters are the trained ones


def test_ppo_trains_on_a_parquet_file_whose_columns_are_named_by_the_field_flags(tmp_path, tiny_model_dir):
    """--data as a parquet file with other column names, mapped by --prompt-field/--answer-field; a held-out 10% of
    its rows gives the eval accuracy, and samples.jsonl shows the file's prompts with their answers and rewards."""
    import datasets
    rows = [{"instruction": f"Say {d}.", "target": "7", "id": d} for d in range(20)]
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "toy.parquet")
    ppo.main(toy_args(tmp_path, tiny_model_dir, data=str(tmp_path / "toy.parquet"), eval_data=None, max_steps=2,
                      batch_size=8, mini_batch_size=8, micro_batch_size=8, eval_every=1, prompt_field="instruction",
                      answer_field="target"))
    assert all(isinstance(v, float) for v in logged(tmp_path / "run", "eval_accuracy"))  # held-out rows of the file
    samples = [json.loads(line) for line in open(tmp_path / "run" / "samples.jsonl")]
    assert [s["step"] for s in samples] == [1] * 4 + [2] * 4
    assert all(s["prompt"] in {r["instruction"] for r in rows} and str(s["answer"]) == "7" for s in samples)
    assert all(s["reward"] == ppo.reward(s["completion"], common.is_correct(s["completion"], 7)) for s in samples)
