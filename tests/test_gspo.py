"""gspo.py: the sequence ratio, when GSPO equals GRPO and when it does not, learning end to end."""

import json
import math
import re

import pytest
import torch
from helpers import logged, make_model, make_tokenizer, toy_task

import common
import plumbing
import grpo
import gspo


def test_sequence_ratio_is_exp_of_the_masked_mean_log_ratio():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]])
    old = torch.tensor([[-1.5, -1.0, -9.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    expected = [math.exp(((-1 + 1.5) + (-2 + 1.0)) / 2), math.exp(0.5)]
    torch.testing.assert_close(gspo.sequence_ratio(logprobs, old, mask), torch.tensor(expected))


def test_padding_does_not_change_the_sequence_ratio():
    torch.manual_seed(0)
    logprobs, old = torch.randn(3, 4), torch.randn(3, 4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    padded = lambda x: torch.cat([x, torch.randn(3, 5) * 100], 1)  # noqa: E731 - garbage where the mask is 0
    torch.testing.assert_close(gspo.sequence_ratio(padded(logprobs), padded(old), torch.cat([mask, torch.zeros(3, 5)], 1)),
                               gspo.sequence_ratio(logprobs, old, mask))


def test_token_level_ratio_has_the_sequence_value_and_the_same_gradient_when_advantages_are_shared():
    torch.manual_seed(0)
    old = torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    A = torch.tensor([0.5, -1.0, 2.0])

    def grad(token_level):
        logprobs = (old + 0.1 * torch.randn(3, 5, generator=torch.Generator().manual_seed(1))).requires_grad_()
        # a wide clip range: this checks the estimator, not the clipping
        loss, ratio = gspo.sequence_loss(logprobs, old, None, A, mask, 10.0, 10.0, token_level=token_level)
        loss.sum().backward()
        return ratio, logprobs.grad

    (r_seq, g_seq), (r_tok, g_tok) = grad(False), grad(True)
    torch.testing.assert_close(r_tok, r_seq)
    torch.testing.assert_close(g_tok, g_seq)


def tiny_batch():
    tokenizer = make_tokenizer()
    tokenizer.padding_side = "left"
    model = make_model(tokenizer)
    prompt_ids, prompt_mask = common.encode_prompts(tokenizer, ["a", "bb", "ccc", "d"])
    completion_ids, mask = common.encode_completions(tokenizer, ["1", "234", "56", "7777"])
    return model, (prompt_ids, prompt_mask, completion_ids, mask), mask


A = torch.tensor([0.7, -1.2, 0.4, 0.1])


def gradients(model, batch, loss_fn):
    model.zero_grad()
    logprobs, _ = common.completion_logprobs(model, *batch)
    loss_fn(logprobs).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def grpo_loss(old, mask):
    def f(logprobs):
        per_token, _ = grpo.clipped_policy_loss(logprobs, old(logprobs), A[:, None], 0.2, 0.2)
        return grpo.aggregate(per_token, mask, "grpo", 4, int(mask.sum()), 8)
    return f


def gspo_loss(old, mask):
    def f(logprobs):
        loss, _ = gspo.sequence_loss(logprobs, old(logprobs), None, A, mask, 0.2, 0.2)
        return loss.sum() / 4
    return f


def test_on_policy_gspo_and_grpo_gradients_are_identical():
    model, batch, mask = tiny_batch()
    on_policy = lambda logprobs: logprobs.detach()  # noqa: E731 - pi_old = pi_theta: every ratio is 1
    torch.testing.assert_close(gradients(model, batch, gspo_loss(on_policy, mask)),
                               gradients(model, batch, grpo_loss(on_policy, mask)))


def test_off_policy_gspo_and_grpo_gradients_differ():
    """Stale samples: pi_old differs token by token from pi_theta (within the clip range, so no clipping)."""
    model, batch, mask = tiny_batch()
    noise = 0.05 * torch.randn(mask.shape, generator=torch.Generator().manual_seed(0))
    stale = lambda logprobs: logprobs.detach() + noise  # noqa: E731
    g_gspo, g_grpo = gradients(model, batch, gspo_loss(stale, mask)), gradients(model, batch, grpo_loss(stale, mask))
    assert not torch.allclose(g_gspo, g_grpo, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("mean_log_ratio, advantage, has_gradient", [
    (1e-3, 1.0, False),   # s = 1.001 > 1 + 4e-4, pushed up further: clipped
    (-1e-3, -1.0, False),  # s = 0.999 < 1 - 3e-4, pushed down further: clipped
    (1e-4, 1.0, True),    # inside GSPO's tight range
    (1e-3, -1.0, True),   # outside, but pulled back: unclipped side of the min
])
def test_gspo_clips_the_sequence_ratio_with_its_tight_range(mean_log_ratio, advantage, has_gradient):
    logprobs = torch.full((1, 3), -1.0 + mean_log_ratio, requires_grad=True)
    defaults = gspo.Args()
    loss, ratio = gspo.sequence_loss(logprobs, torch.full((1, 3), -1.0), None, torch.tensor([advantage]),
                                     torch.ones(1, 3), defaults.clip_eps_low, defaults.clip_eps_high)
    loss.sum().backward()
    assert ratio.item() == pytest.approx(math.exp(mean_log_ratio))
    assert (logprobs.grad.abs().sum().item() > 0) == has_gradient


def toy_args(tmp_path, model_dir, **kw):
    data = toy_task(tmp_path)
    defaults = dict(model=model_dir, data=data, eval_data=data, output_dir=str(tmp_path / "run"),
                    max_steps=40, batch_size=8, group_size=8, micro_batch_size=16, learning_rate=1e-2,  # seeds 0-4 > 0.9
                    max_new_tokens=3, temperature=1.0, eval_every=0, save_every=1000)
    return gspo.Args(**{**defaults, **kw})


@pytest.mark.parametrize("token_level", [False, True])
def test_gspo_learns_the_toy_task(tmp_path, tiny_model_dir, token_level):
    gspo.main(toy_args(tmp_path, tiny_model_dir, token_level=token_level))
    rewards = logged(tmp_path / "run", "reward_mean")
    assert sum(rewards[:3]) / 3 < 0.15
    assert sum(rewards[-4:]) / 4 > 0.9


def test_gspo_with_flipped_advantages_does_not_learn(tmp_path, tiny_model_dir, monkeypatch):
    original = gspo.group_advantages
    monkeypatch.setattr(gspo, "group_advantages", lambda *a, **k: -original(*a, **k))
    gspo.main(toy_args(tmp_path, tiny_model_dir))
    assert sum(logged(tmp_path / "run", "reward_mean")[-8:]) / 8 < 0.05


def test_a_mini_batch_without_loss_tokens_contributes_nothing(tmp_path, tiny_model_dir, monkeypatch):
    """--mask-truncated with every completion truncated: no NaN, no optimiser step, the weights unchanged."""
    original = gspo.generate

    def all_truncated(*args, **kwargs):
        ids, mask, truncated = original(*args, **kwargs)
        return ids, mask, torch.ones_like(truncated)
    monkeypatch.setattr(gspo, "generate", all_truncated)
    last = gspo.main(toy_args(tmp_path, tiny_model_dir, mask_truncated=True, max_steps=1, batch_size=2, group_size=4,
                              micro_batch_size=2))
    assert last["truncated_frac"] == 1.0 and "loss" not in last and "grad_norm" not in last  # no step was taken
    assert all(math.isfinite(v) for v in last.values() if isinstance(v, float))
    before, _ = plumbing.load_model(tiny_model_dir)
    after, _ = plumbing.load_model(str(tmp_path / "run" / "final"))
    for p, q in zip(before.parameters(), after.parameters()):
        assert torch.isfinite(q).all() and torch.equal(p, q)


def test_inconsistent_batch_sizes_are_a_clear_error(tmp_path, tiny_model_dir):
    with pytest.raises(common.RunError, match=r"\(64\) must be a multiple of --mini-batch-size \(24\)"):
        gspo.main(toy_args(tmp_path, tiny_model_dir, mini_batch_size=24))
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def lora_model_dir(tmp_path_factory, tokenizer) -> str:
    """A tiny model whose wider initialisation lets frozen embeddings reach high probabilities (helpers.make_model)."""
    path = tmp_path_factory.mktemp("tiny-llama-lora")
    make_model(tokenizer, initializer_range=0.15).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_gspo_learns_the_toy_task_with_lora_and_saves_adapters_and_the_merged_model(tmp_path, lora_model_dir):
    """Seeds 0-3: reward 0.00-0.01 over the first 3 steps, 0.95-0.96 over the last 4."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM
    gspo.main(toy_args(tmp_path, lora_model_dir, lora_rank=8, lora_alpha=16, max_steps=30, merge_lora=True))
    rewards = logged(tmp_path / "run", "reward_mean")
    assert sum(rewards[:3]) / 3 < 0.15
    assert sum(rewards[-4:]) / 4 > 0.85
    final = tmp_path / "run" / "final"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    assert not (final / "model.safetensors").exists()  # the adapters only, not a copy of the frozen weights
    ids = torch.tensor([[5, 9, 12, 30, 41]])
    logits = {name: model(input_ids=ids).logits for name, model in [
        ("adapters", AutoPeftModelForCausalLM.from_pretrained(final).eval()),
        ("load_model", plumbing.load_model(str(final))[0].eval()),
        ("merged", AutoModelForCausalLM.from_pretrained(final / "merged").eval()),
        ("base", plumbing.load_model(lora_model_dir)[0].eval())]}
    torch.testing.assert_close(logits["load_model"], logits["adapters"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits["merged"], logits["adapters"], rtol=1e-4, atol=1e-4)
    assert (logits["adapters"] - logits["base"]).abs().max() > 0.1  # the adapters changed the model


def test_gspo_trains_on_a_parquet_file_whose_columns_the_field_flags_name(tmp_path, tiny_model_dir, capsys):
    """--data file.parquet --prompt-field question_text --answer-field solution; no --eval-data: 10% of its rows
    (here 1 of 10) are held out for the held-out accuracy, and the run says so."""
    import datasets
    path = str(tmp_path / "toy.parquet")
    datasets.Dataset.from_list([{"question_text": f"Say {d}.", "solution": 7} for d in range(10)]).to_parquet(path)
    args = dict(data=path, eval_data=None, max_steps=2, batch_size=2, group_size=4, micro_batch_size=4, eval_every=1)
    with pytest.raises(common.RunError, match=r"missing field\(s\) nope \(--prompt-field\)"):
        gspo.main(toy_args(tmp_path, tiny_model_dir, prompt_field="nope", answer_field="solution", **args))
    assert not (tmp_path / "run").exists()
    last = gspo.main(toy_args(tmp_path, tiny_model_dir, prompt_field="question_text", answer_field="solution", **args))
    assert "held-out accuracy: 1 of the 10 rows" in capsys.readouterr().err
    assert logged(tmp_path / "run", "step") == [0, 1, 2] and 0 <= last["eval_accuracy"] <= 1
    samples = [json.loads(line) for line in open(tmp_path / "run" / "samples.jsonl")]
    assert [s["step"] for s in samples] == [1, 1, 2, 2]  # a sample of each of the step's prompts
    assert all(re.fullmatch(r"Say \d\.", s["prompt"]) and s["answer"] == 7 for s in samples)
