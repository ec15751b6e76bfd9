"""reinforce.py: returns and baselines by hand and brute force, baseline invariance measured, learning end to end."""

import contextlib
import json
import re

import pytest
import torch
from helpers import logged, make_model, make_tokenizer, toy_task

import common
import plumbing
import reinforce

MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])


def test_score_lands_on_the_last_real_token_and_kl_on_every_token():
    """Where pad == EOS the last real token is the EOS: found from the mask's length, not from token ids."""
    kl = torch.full((3, 4), 0.5)
    rewards = reinforce.token_rewards(torch.tensor([1.0, 2.0, 3.0]), MASK, kl, beta=0.1)
    expected = torch.tensor([[-0.05, -0.05, 0.95, 0], [-0.05, -0.05, -0.05, 1.95], [2.95, 0, 0, 0]])
    torch.testing.assert_close(rewards, expected)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reward_to_go_against_the_brute_force_sum(gamma):
    torch.manual_seed(0)
    rewards = torch.randn(3, 4) * MASK
    returns = reinforce.reward_to_go(rewards, MASK, gamma)
    for i in range(3):
        n = int(MASK[i].sum())
        for t in range(4):
            expected = sum(gamma ** (u - t) * rewards[i, u].item() for u in range(t, n)) if t < n else 0.0
            assert returns[i, t].item() == pytest.approx(expected, abs=1e-6)


def test_rloo_baseline_by_hand_and_as_scaled_centred_reward():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 1.0])  # two prompts, k = 3
    torch.testing.assert_close(reinforce.rloo_baseline(scores, 3), torch.tensor([0.0, 0.5, 0.5, 2.0, 1.0, 2.0]))
    advantages = scores - reinforce.rloo_baseline(scores, 3)
    centred = scores - scores.view(2, 3).mean(1).repeat_interleave(3)
    torch.testing.assert_close(advantages, 3 / 2 * centred)  # r_i - mean_{j != i} r_j = k/(k-1) (r_i - mean)


def test_each_baseline_by_hand():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]])
    returns = reinforce.reward_to_go(reinforce.token_rewards(scores, mask), mask, 1.0)  # gamma 1: r on every token
    torch.testing.assert_close(returns, scores[:, None] * mask)
    adv = lambda b, **kw: reinforce.advantages_for(b, returns, scores, mask, k=2, **kw)  # noqa: E731
    torch.testing.assert_close(adv("none"), returns)
    torch.testing.assert_close(adv("mean", running_mean=0.25), (scores[:, None] - 0.25) * mask)
    torch.testing.assert_close(adv("rloo"), torch.tensor([[1.0, 1, 0], [-1, 0, 0], [-1, -1, -1], [1, 1, 0]]))
    # reinforce++: normalised over the 8 valid tokens of the batch (4 of return 1, 4 of return 0), not per group
    mean, std = 0.5, 0.5
    torch.testing.assert_close(adv("reinforce++"), ((scores[:, None] - mean) / std) * mask)


def test_whitening_ignores_padding():
    torch.manual_seed(0)
    returns = torch.randn(3, 4) * MASK + (1 - MASK) * 1000.0  # huge values where the mask is 0
    white = reinforce.whiten(returns, MASK)
    valid = white[MASK.bool()]
    assert valid.mean().item() == pytest.approx(0, abs=1e-6)
    assert (valid ** 2).mean().item() == pytest.approx(1, abs=1e-4)
    assert (white[~MASK.bool()] == 0).all()


def test_baseline_leaves_the_gradient_unbiased_and_lowers_its_variance():
    """[PG-BASELINE] on a categorical policy over 5 actions, where grad J = p * (r - J) exactly: the mean of many
    single-sample estimates approaches it with and without a constant baseline; the baseline's variance is lower."""
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(5, generator=gen)
    r = torch.tensor([1.0, 2.0, 1.5, 3.0, 2.5])
    p = torch.softmax(theta, 0)
    exact = p * (r - (p * r).sum())

    def single_sample_gradient(theta, action, advantage):
        logprobs = torch.log_softmax(theta, 0).gather(0, action.view(1)).view(1, 1)
        return -reinforce.policy_gradient_loss(logprobs, advantage.view(1, 1), torch.ones(1, 1), 1)  # ascent
    per_sample = torch.func.vmap(torch.func.grad(single_sample_gradient), in_dims=(None, 0, 0))

    actions = torch.multinomial(p, 200_000, replacement=True, generator=gen)
    plain = per_sample(theta, actions, r[actions])
    with_baseline = per_sample(theta, actions, r[actions] - 2.0)
    torch.testing.assert_close(plain.mean(0), exact, atol=0.01, rtol=0)
    torch.testing.assert_close(with_baseline.mean(0), exact, atol=0.01, rtol=0)
    assert with_baseline.var(0).sum() < 0.5 * plain.var(0).sum()


def toy_args(tmp_path, model_dir, **kw):
    data = toy_task(tmp_path)
    defaults = dict(model=model_dir, data=data, eval_data=data, output_dir=str(tmp_path / "run"),
                    max_steps=60, batch_size=8, group_size=8, micro_batch_size=32, learning_rate=5e-3,
                    max_new_tokens=3, temperature=1.0, eval_every=0, save_every=1000)
    return reinforce.Args(**{**defaults, **kw})


@pytest.mark.parametrize("baseline", ["none", "mean", "rloo", "reinforce++"])
def test_reinforce_learns_the_toy_task(tmp_path, tiny_model_dir, baseline):
    last = reinforce.main(toy_args(tmp_path, tiny_model_dir, baseline=baseline))
    rewards = logged(tmp_path / "run", "reward_mean")
    assert sum(rewards[:3]) / 3 < 0.15
    assert sum(rewards[-4:]) / 4 > 0.8
    assert (last["kl_k1"] > 0) == (baseline == "reinforce++")  # the reference model is used only where KL is on


def test_reinforce_with_flipped_advantages_does_not_learn(tmp_path, tiny_model_dir, monkeypatch):
    original = reinforce.advantages_for
    monkeypatch.setattr(reinforce, "advantages_for", lambda *a, **k: -original(*a, **k))
    reinforce.main(toy_args(tmp_path, tiny_model_dir, baseline="rloo"))
    assert sum(logged(tmp_path / "run", "reward_mean")[-8:]) / 8 < 0.05


def test_rloo_needs_two_samples_per_prompt(tmp_path, tiny_model_dir):
    with pytest.raises(common.RunError, match="--baseline rloo needs --group-size >= 2"):
        reinforce.main(toy_args(tmp_path, tiny_model_dir, group_size=1))
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize("flag", [dict(temperature=0.0), dict(gamma=1.5), dict(baseline_decay=1.0),
                                  dict(learning_rate=float("nan"))])
def test_bad_flags_are_refused_before_anything_is_written(tmp_path, tiny_model_dir, flag):
    with pytest.raises(common.RunError, match="--" + next(iter(flag)).replace("_", "-")):
        reinforce.main(toy_args(tmp_path, tiny_model_dir, **flag))
    assert not (tmp_path / "run").exists()


def test_a_prompt_over_the_length_limit_is_refused_before_anything_is_written(tmp_path, tiny_model_dir):
    with pytest.raises(common.RunError, match=r"toy.jsonl:1: the prompt is \d+ tokens, over --max-prompt-length 8"):
        reinforce.main(toy_args(tmp_path, tiny_model_dir, max_prompt_length=8))
    assert not (tmp_path / "run").exists()


def files_of(directory):
    return {f.relative_to(directory): f.read_bytes() for f in sorted(directory.rglob("*")) if f.is_file()}


def test_divergence_stops_before_the_update_and_keeps_the_last_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    """A learning rate of 1e30 blows the weights up after the first step with a gradient: the next step's gradient
    norm is NaN. The run must stop there, before optimizer.step(), leaving the previous checkpoint as it was."""
    saved = []  # the checkpoint's bytes after every save
    original = reinforce.save_checkpoint

    def recording_save(step, model, tokenizer, optimizer, scheduler, output_dir, **kwargs):
        original(step, model, tokenizer, optimizer, scheduler, output_dir, **kwargs)
        saved.append(files_of(output_dir / "checkpoint"))
    monkeypatch.setattr(reinforce, "save_checkpoint", recording_save)

    with pytest.raises(common.NonFiniteError, match=r"step (\d+): non-finite") as error:
        reinforce.main(toy_args(tmp_path, tiny_model_dir, baseline="none", learning_rate=1e30, max_steps=10,
                                save_every=1))
    failed = int(re.search(r"step (\d+)", str(error.value)).group(1))
    run = tmp_path / "run"
    assert failed >= 2 and len(saved) == failed - 1  # a checkpoint after every step before the failing one
    assert not (run / "final").exists()
    assert files_of(run / "checkpoint") == saved[-1]  # byte-identical: not overwritten by the failing step
    assert plumbing.read_trainer_state(run / "checkpoint")["step"] == failed - 1
    model, _ = plumbing.load_model(str(run / "checkpoint"))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert logged(run, "step") == list(range(1, failed))  # the failing step logged nothing


def test_reinforce_resume_reproduces_an_uninterrupted_run(tmp_path, tiny_model_dir):
    """Bit-exact, with the --baseline mean's running mean carried in the checkpoint."""
    args = dict(baseline="mean", max_steps=4, save_every=2, batch_size=4, group_size=4, learning_rate=1e-2,
                max_new_tokens=1, format_reward=1.0)  # one token: a digit ~1 time in 8, so rewards are not all 0
    reinforce.main(toy_args(tmp_path, tiny_model_dir, **args))
    reinforce.main(toy_args(tmp_path, tiny_model_dir, resume=str(tmp_path / "run"),
                            output_dir=str(tmp_path / "resumed"), **args))
    a, _ = plumbing.load_model(str(tmp_path / "run" / "final"))
    b, _ = plumbing.load_model(str(tmp_path / "resumed" / "final"))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    timing = ("sample_tokens_per_s", "train_tokens_per_s", "step_time", "time")
    rows = [[{k: v for k, v in json.loads(line).items() if k not in timing} for line in open(run / "metrics.jsonl")]
            for run in (tmp_path / "run", tmp_path / "resumed")]
    assert rows[0] == rows[1] and len(rows[0]) == 4 and rows[0][-1]["reward_mean"] > 0


def test_eval_size_zero_disables_evaluation(tmp_path, tiny_model_dir):
    last = reinforce.main(toy_args(tmp_path, tiny_model_dir, max_steps=2, batch_size=2, group_size=2, eval_every=1,
                                   eval_size=0, eval_data=None))
    assert "eval_accuracy" not in last and logged(tmp_path / "run", "step") == [1, 2]


def test_a_stop_request_saves_the_step_and_stops(tmp_path, tiny_model_dir, monkeypatch):
    """Ctrl-C (as Steps records it) after step 1: that step is checkpointed whatever --save-every, and nothing more."""
    class StopAfterFirst(plumbing.Steps):
        def __iter__(self):
            for step in super().__iter__():
                self._requested = True  # as if Ctrl-C came during the step (on this rank)
                yield step
    monkeypatch.setattr(reinforce, "Steps", StopAfterFirst)
    with pytest.raises(common.Interrupted, match="after step 1"):
        reinforce.main(toy_args(tmp_path, tiny_model_dir, max_steps=4, batch_size=2, group_size=2))
    assert plumbing.read_trainer_state(tmp_path / "run" / "checkpoint")["step"] == 1
    assert not (tmp_path / "run" / "final").exists() and logged(tmp_path / "run", "step") == [1]


@pytest.fixture(scope="module")
def lora_model_dir(tmp_path_factory, tokenizer) -> str:
    """A tiny model whose wider initialisation lets frozen embeddings reach high probabilities (helpers.make_model)."""
    path = tmp_path_factory.mktemp("tiny-llama-lora")
    make_model(tokenizer, initializer_range=0.15).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_reinforce_learns_the_toy_task_with_lora(tmp_path, lora_model_dir):
    """Seeds 0-3: reward 0.00-0.03 over the first 3 steps, 0.95-0.96 over the last 4."""
    reinforce.main(toy_args(tmp_path, lora_model_dir, baseline="rloo", lora_rank=8, lora_alpha=16,
                            learning_rate=1e-2, max_steps=30))
    rewards = logged(tmp_path / "run", "reward_mean")
    assert sum(rewards[:3]) / 3 < 0.15
    assert sum(rewards[-4:]) / 4 > 0.85
    final = tmp_path / "run" / "final"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()


def test_with_lora_pi_ref_is_the_starting_model_with_no_second_copy(tmp_path, lora_model_dir, monkeypatch):
    """reinforce++ folds the KL to pi_ref into the reward: with --lora-rank, pi_ref is the policy with its adapters
    off, whose log-probs are exactly the starting model's at every step, while the policy itself moves away."""
    tokenizer, base = make_tokenizer(), plumbing.load_model(lora_model_dir)[0]
    batch = (*common.encode_prompts(tokenizer, ["Say 1.", "Say 23."]),
             *common.encode_completions(tokenizer, ["7", "45"]))
    ref_vs_base, policy_vs_base = [], []
    original = reinforce.reference_model

    @contextlib.contextmanager
    def checked(model, ref_model):
        assert ref_model is None  # no second copy loaded
        with original(model, ref_model) as ref, torch.no_grad():
            ref_vs_base.append((common.completion_logprobs(ref, *batch)[0]
                                - common.completion_logprobs(base, *batch)[0]).abs().max().item())
            yield ref
        with torch.no_grad():
            policy_vs_base.append((common.completion_logprobs(model, *batch)[0]
                                   - common.completion_logprobs(base, *batch)[0]).abs().max().item())
    monkeypatch.setattr(reinforce, "reference_model", checked)
    reinforce.main(toy_args(tmp_path, lora_model_dir, baseline="reinforce++", lora_rank=8, lora_alpha=16,
                            learning_rate=1e-2, max_steps=4, batch_size=4, group_size=4, max_new_tokens=1,
                            format_reward=1.0))  # one token: a digit ~1 time in 8, so rewards are not all 0
    assert ref_vs_base == [0.0] * 4
    assert policy_vs_base[0] == 0.0 and policy_vs_base[-1] > 1e-3  # fresh adapters are 0; then they train
    kl = logged(tmp_path / "run", "kl_k1")
    assert kl[0] == 0.0 and kl[-1] != 0.0  # as with a full copy: exactly 0 before the first update
