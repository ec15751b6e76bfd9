"""rft.py: the kept set by hand, online RFT's gradient as REINFORCE's [UNIFIED-GRAD], learning end to end (offline and
online), resume, bad input."""

import json

import pytest
import torch
from helpers import logged, make_model, make_tokenizer, toy_task
from torchrun_driver import fixed_generate

import common
import plumbing
import reinforce
import rft


# ---- [RFT]: the kept set --------------------------------------------------------------------------------------------

def test_rejection_sample_keeps_each_prompts_distinct_right_texts_by_hand():
    problems = [{"prompt": "Say 1.", "answer": 7}, {"prompt": "Add 2 and 3.", "answer": "5"},
                {"prompt": "Say 1.", "answer": 7}]  # drawn twice: its samples are pooled
    completions = ["7", "8", "7", "seven 7",  # right, wrong, right again (dropped), right
                   "5", "2 + 3 = 5", "6", "5",  # right, right, wrong, right again (dropped)
                   "it is 7", "7", "77", "no"]  # right, a text the first draw kept (dropped), wrong, wrong
    rows = rft.rejection_sample(problems, completions, k=4)
    assert [(r["prompt"], r["completion"]) for r in rows] == [
        ("Say 1.", "7"), ("Say 1.", "seven 7"), ("Add 2 and 3.", "5"), ("Add 2 and 3.", "2 + 3 = 5"),
        ("Say 1.", "it is 7")]
    assert all(set(r) == {"prompt", "completion"} for r in rows)
    # the same text under two prompts is two examples; a chat prompt is a prompt like any other
    chat = [{"role": "user", "content": "Say 1."}]
    assert rft.rejection_sample([{"prompt": "a", "answer": 7}, {"prompt": chat, "answer": 7}], ["7", "7"], k=1) == [
        {"prompt": "a", "completion": "7"}, {"prompt": chat, "completion": "7"}]
    assert rft.rejection_sample(problems[:1], ["1", "2"], k=2) == []


def test_kept_mask_is_the_completion_mask_of_the_right_samples_only():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    kept = rft.kept_mask(mask, torch.tensor([1.0, 0.0, 1.0]))
    assert kept.tolist() == [[1, 1, 0], [0, 0, 0], [1, 0, 0]] and kept.dtype == mask.dtype


def test_kept_micro_batches_run_the_right_rows_first_and_nothing_when_none_is_right():
    correct = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0])
    assert [mb.tolist() for mb in rft.kept_micro_batches(correct, 2)] == [[1, 3], [4]]
    assert rft.kept_micro_batches(torch.zeros(4), 2) == ()


# ---- [ONLINE-RFT] is REINFORCE with 0/1 rewards and no baseline [UNIFIED-GRAD] --------------------------------------

PROMPTS = ["Say 1.", "Say 23."]
TEXTS = ["7", "8", "seven 7", "77", "7", "no, 5"]  # k = 3 samples per prompt; right: 0, 2, 4 (a repeat: kept online)


def test_online_rft_gradient_is_reinforce_with_0_1_rewards_and_no_baseline():
    """On the same samples, the gradient of rft's loss (SFT's, on the right samples) equals that of reinforce.py's
    [PG-TOKEN-LOSS] with the verifier's 0/1 reward, --baseline none and the same normaliser (the kept tokens N);
    with reinforce's own normaliser (the n completions) it is N/n times rft's."""
    tokenizer = make_tokenizer()
    model = make_model(tokenizer)
    k, n = 3, len(TEXTS)
    prompt_ids, prompt_mask = common.encode_prompts(tokenizer, [p for p in PROMPTS for _ in range(k)])
    completion_ids, mask = common.encode_completions(tokenizer, TEXTS)
    correct = torch.tensor([common.is_correct(t, 7) for t in TEXTS], dtype=torch.float)
    assert correct.tolist() == [1, 0, 1, 0, 1, 0]

    def grad_of(loss_fn):
        model.zero_grad()
        logprobs, _ = common.completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, mask, 0.7)
        loss_fn(logprobs).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    kept = rft.kept_mask(mask, correct)
    N = int(kept.sum())
    assert 0 < N < int(mask.sum())

    def rft_loss(logprobs):
        return rft.sft_loss(logprobs, kept, N)

    def reinforce_loss(logprobs, normaliser):
        scores = torch.tensor([reinforce.reward(t, bool(ok)) for t, ok in zip(TEXTS, correct)])  # 0/1
        returns = reinforce.reward_to_go(reinforce.token_rewards(scores, mask), mask, 1.0)
        advantages = reinforce.advantages_for("none", returns, scores, mask, k)  # A = R: 1 or 0 on every token
        return reinforce.policy_gradient_loss(logprobs, advantages, mask, normaliser)

    g_rft = grad_of(rft_loss)
    torch.testing.assert_close(g_rft, grad_of(lambda lp: reinforce_loss(lp, N)))
    torch.testing.assert_close(g_rft * N / n, grad_of(lambda lp: reinforce_loss(lp, n)))
    assert g_rft.abs().max() > 1e-3  # the gradient is not trivially zero


def first_gradient(module, monkeypatch) -> dict:
    """Record the gradient a script's first optimiser step sees, after its micro-batches (one process)."""
    grads = {}

    def recording(model):
        if not grads:
            grads.update({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    monkeypatch.setattr(module, "all_reduce_gradients", recording)
    return grads


def test_online_rft_takes_reinforces_step_through_the_entry_points(tmp_path, tiny_model_dir, monkeypatch):
    """The same samples in both scripts (sampling replaced by fixed completions that depend only on the row): rft.py
    --online's first gradient, over micro-batches of its right samples only, is reinforce.py --baseline none's times
    n/N, the ratio of their normalisers."""
    texts = ["7", "8", "77", "7 7 7", "no", "3"]
    for module in (rft, reinforce):
        monkeypatch.setattr(module, "generate", fixed_generate(texts, None))
    common_args = dict(model=tiny_model_dir, data=toy_task(tmp_path), max_steps=1, batch_size=4, max_new_tokens=4,
                       temperature=0.7, eval_size=0)
    g_rft = first_gradient(rft, monkeypatch)
    rft.main(rft.Args(**common_args, online=True, num_samples=4, micro_batch_size=2,
                      output_dir=str(tmp_path / "rft")))
    g_reinforce = first_gradient(reinforce, monkeypatch)
    reinforce.main(reinforce.Args(**common_args, baseline="none", group_size=4, micro_batch_size=16,
                                  output_dir=str(tmp_path / "reinforce")))
    kept, N, n = logged(tmp_path / "rft", "kept")[0], logged(tmp_path / "rft", "kept_tokens")[0], 16
    assert 2 < kept < n  # several micro-batches of right samples, and wrong ones left out
    assert logged(tmp_path / "reinforce", "reward_mean")[0] == pytest.approx(kept / n)
    assert sorted(g_rft) == sorted(g_reinforce) and g_rft
    for name in g_rft:
        torch.testing.assert_close(g_rft[name] * N, g_reinforce[name] * n, rtol=1e-4, atol=1e-6, msg=name)


# ---- learning, end to end -------------------------------------------------------------------------------------------

def toy_args(tmp_path, model_dir, **kw):
    data = toy_task(tmp_path)
    defaults = dict(model=model_dir, data=data, eval_data=data, output_dir=str(tmp_path / "run"),
                    max_steps=60, batch_size=8, num_samples=8, micro_batch_size=32, learning_rate=5e-3,
                    max_new_tokens=3, temperature=1.0, eval_every=0, save_every=1000, online=True)
    return rft.Args(**{**defaults, **kw})


def test_online_rft_learns_the_toy_task(tmp_path, tiny_model_dir):
    rft.main(toy_args(tmp_path, tiny_model_dir))
    accuracy = logged(tmp_path / "run", "accuracy")
    assert sum(accuracy[:3]) / 3 < 0.15
    assert sum(accuracy[-4:]) / 4 > 0.8
    assert logged(tmp_path / "run", "kept") == [round(64 * a) for a in accuracy]


def test_offline_rft_learns_the_toy_task_from_the_starting_models_right_samples(tmp_path, tiny_model_dir):
    """~2% of the starting model's samples are right; fine-tuned on those alone, it answers every held-out prompt."""
    offline = dict(online=False, num_prompts=64, num_samples=16, batch_size=8, micro_batch_size=8, max_steps=20,
                   eval_every=20)
    rft.main(toy_args(tmp_path, tiny_model_dir, **offline))
    eval_accuracy = [a for a in logged(tmp_path / "run", "eval_accuracy") if a is not None]
    assert eval_accuracy[0] < 0.2 and eval_accuracy[-1] >= 0.9
    rows = [json.loads(line) for line in open(tmp_path / "run" / rft.DATA_FILE)]
    assert 0 < len(rows) == logged(tmp_path / "run", "num_examples")[0] < 64 * 16 * 0.2
    assert all(common.is_correct(r["completion"], 7) for r in rows)  # right, and distinct per prompt
    assert len({(r["prompt"], r["completion"]) for r in rows}) == len(rows)


@pytest.mark.parametrize("online", [True, False])
def test_rft_resume_reproduces_an_uninterrupted_run(tmp_path, tiny_model_dir, online):
    """Bit-exact; offline, the resumed run trains on the kept set that the run saved, without sampling again."""
    args = dict(online=online, max_steps=4, save_every=2, batch_size=4, micro_batch_size=4, learning_rate=1e-2,
                **({} if online else {"num_prompts": 32}))  # 32 samples a step online, 256 offline: ~3% right
    rft.main(toy_args(tmp_path, tiny_model_dir, **args))
    rft.main(toy_args(tmp_path, tiny_model_dir, resume=str(tmp_path / "run"), output_dir=str(tmp_path / "resumed"),
                      **args))
    a, _ = plumbing.load_model(str(tmp_path / "run" / "final"))
    b, _ = plumbing.load_model(str(tmp_path / "resumed" / "final"))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    timing = ("sample_tokens_per_s", "train_tokens_per_s", "step_time", "time")
    rows = [[{k: v for k, v in json.loads(line).items() if k not in timing} for line in open(run / "metrics.jsonl")]
            for run in (tmp_path / "run", tmp_path / "resumed")]
    assert rows[0] == rows[1] and len(rows[0]) == 4 and any(row["loss"] > 0 for row in rows[0])
    if not online:
        assert (tmp_path / "resumed" / rft.DATA_FILE).read_text() == (tmp_path / "run" / rft.DATA_FILE).read_text()


# ---- bad input ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag, message", [
    (dict(num_prompts=64), "--num-prompts 64: has no effect with --online"),
    (dict(num_samples=0), "--num-samples 0: must be >= 1"),
    (dict(online=False, batch_size=8, micro_batch_size=3), "--batch-size 8 must be a multiple of --micro-batch-size 3"),
    (dict(temperature=0.0), "--temperature 0.0: must be > 0"),
])
def test_bad_flags_are_refused_before_anything_is_written(tmp_path, tiny_model_dir, flag, message):
    with pytest.raises(common.RunError, match=message):
        rft.main(toy_args(tmp_path, tiny_model_dir, **flag))
    assert not (tmp_path / "run").exists()


def test_offline_rft_without_a_right_sample_is_refused_before_anything_is_written(tmp_path, tiny_model_dir):
    data = tmp_path / "hard.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {d}.", "answer": 123456}) + "\n" for d in range(10)))
    with pytest.raises(common.RunError, match="no sample of the starting model was right"):
        rft.main(toy_args(tmp_path, tiny_model_dir, online=False, data=str(data), eval_data=str(data),
                          num_prompts=8, num_samples=2, max_new_tokens=2, micro_batch_size=8))
    assert not (tmp_path / "run").exists()
