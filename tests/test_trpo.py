"""trpo.py: conjugate gradient against the exact solve with an explicit Fisher matrix, Fisher-vector products against
finite differences, the line search's rules, the trust region measured independently, learning end to end, resume."""

import json

import pytest
import torch
from helpers import logged, make_model, toy_task
from torchrun_driver import fixed_generate

import common
import plumbing
import trpo

TOY = ["7", "8", "77", "7 7 7", "no", "seven 7", "3"]  # right and wrong answers: every batch has a signal


# ---- the math on a policy small enough to write F down --------------------------------------------------------------

def small_policy(seed: int = 0):
    """A softmax policy over 4 actions in 4 states with linear logits (the last action's fixed at 0, so no direction
    of theta leaves every distribution unchanged): 9 parameters, a full-rank Fisher matrix, float64."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(4, 3, generator=gen, dtype=torch.float64)  # (states, d)
    theta_old = torch.randn(3 * 3, generator=gen, dtype=torch.float64)  # (actions - 1) x d

    def vocab_logprobs(theta):  # (1, states, actions): one "sequence" of 4 tokens
        logits = torch.cat([features @ theta.view(3, 3).T, torch.zeros(4, 1, dtype=torch.float64)], dim=1)
        return torch.log_softmax(logits, -1)[None]
    return features, theta_old, vocab_logprobs


def test_conjugate_gradient_on_fisher_vector_products_is_the_exact_solve_with_the_explicit_fisher():
    """[NPG] F as the Hessian of trpo.mean_kl at theta_old equals the analytic Fisher sum_s phi phi^T (x) (diag p - p
    p^T); CG on double-backward products of the same KL gives F^-1 g (and (F + damping I)^-1 g); the natural step's
    quadratic KL is exactly delta."""
    features, theta_old, vocab_logprobs = small_policy()
    mask, n = torch.ones(1, 4), 4.0
    old = vocab_logprobs(theta_old).detach()
    kl = lambda theta: trpo.mean_kl(old, vocab_logprobs(theta), mask, n)  # noqa: E731
    hessian = torch.autograd.functional.hessian(kl, theta_old)
    p = old[0].exp()[:, :3]  # the free actions' probabilities, (states, 3)
    analytic = sum(torch.kron(torch.diag(p[s]) - torch.outer(p[s], p[s]), torch.outer(features[s], features[s]))
                   for s in range(4)) / n
    torch.testing.assert_close(hessian, analytic)
    assert torch.linalg.matrix_rank(hessian) == 9

    theta = theta_old.clone().requires_grad_(True)
    actions, advantages = torch.tensor([[0, 3, 1, 2]]), torch.tensor([[1.0, -0.5, 0.25, 2.0]], dtype=torch.float64)
    logprobs = vocab_logprobs(theta).gather(-1, actions[..., None]).squeeze(-1)
    g = torch.autograd.grad(trpo.surrogate(logprobs, logprobs.detach(), advantages, mask, n), theta)[0]

    def fvp(v):  # the product the script computes: the KL's gradient with its graph, dotted with v, differentiated
        grad = torch.autograd.grad(kl(theta), theta, create_graph=True)[0]
        return torch.autograd.grad(grad @ v, theta)[0]
    x, residual = trpo.conjugate_gradient(fvp, g, iters=20)  # 9 in exact arithmetic
    torch.testing.assert_close(x, torch.linalg.solve(hessian, g), rtol=1e-8, atol=1e-10)
    assert residual < 1e-8
    damped, _ = trpo.conjugate_gradient(fvp, g, iters=20, damping=0.1)
    torch.testing.assert_close(damped, torch.linalg.solve(hessian + 0.1 * torch.eye(9, dtype=torch.float64), g))
    step = trpo.natural_step(x, g, max_kl=0.01)
    assert (0.5 * step @ hessian @ step).item() == pytest.approx(0.01, rel=1e-8)  # [NPG]: the quadratic KL is delta
    assert (g @ step).item() > 0  # uphill for the surrogate
    assert not trpo.natural_step(torch.zeros(9), torch.zeros(9), 0.01).any()  # no signal, no step


def test_few_conjugate_gradient_iterations_report_their_residual():
    torch.manual_seed(0)
    a = torch.randn(20, 20, dtype=torch.float64)
    matrix = a @ a.T + 0.1 * torch.eye(20, dtype=torch.float64)
    g = torch.randn(20, dtype=torch.float64)
    x, residual = trpo.conjugate_gradient(lambda v: matrix @ v, g, iters=3)
    assert residual == pytest.approx(((g - matrix @ x).norm() / g.norm()).item(), rel=1e-6) and residual > 1e-3
    assert trpo.conjugate_gradient(lambda v: matrix @ v, torch.zeros(20, dtype=torch.float64), 5)[1] == 0.0


def test_fisher_vector_product_on_a_tiny_model_is_the_kl_gradients_finite_difference(tokenizer):
    """F v from double backward, accumulated over two micro-batches, equals (grad KL(theta + eps v) - grad KL(theta -
    eps v)) / (2 eps), the KL's gradient taken by a plain backward pass. (nn.Embedding's padding_idx, here pad =
    EOS, zeroes that row's gradient from the input side by design, so autograd's gradient is not the function's
    derivative there: switched off, to compare with the function itself.)"""
    model = make_model(tokenizer)
    model.model.embed_tokens.padding_idx = None
    params = [p for p in model.parameters() if p.requires_grad]
    sequences = (*common.encode_prompts(tokenizer, ["Say 1.", "Say 23.", "Say 4.", "Say 56."]),
                 *common.encode_completions(tokenizer, ["7", "45 x", "no", "seven"]))
    mask, n = sequences[3], float(sequences[3].sum())
    rows = torch.arange(4).split(2)
    with torch.no_grad():
        old = trpo.vocab_logprobs(model, sequences, torch.arange(4), 1.0)
    theta_old = torch.cat([p.detach().reshape(-1) for p in params])
    v = torch.randn(theta_old.shape, generator=torch.Generator().manual_seed(0))
    v /= v.norm()

    def kl_gradient(theta):
        trpo.set_flat(params, theta)
        trpo.mean_kl(old, trpo.vocab_logprobs(model, sequences, torch.arange(4), 1.0), mask, n).backward()
        return trpo.flat_grad(model, params)
    eps = 1e-2
    finite = (kl_gradient(theta_old + eps * v) - kl_gradient(theta_old - eps * v)) / (2 * eps)
    trpo.set_flat(params, theta_old)
    fv = trpo.fisher_vector_product(model, params, sequences, rows, mask, n, 1.0, torch.device("cpu"),
                                    torch.float32, v)
    assert torch.nn.functional.cosine_similarity(fv, finite, dim=0) > 0.999
    assert fv.norm().item() == pytest.approx(finite.norm().item(), rel=1e-3)
    assert (v @ fv).item() > 0  # F is positive semi-definite
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in params]), theta_old)  # the weights untouched


def test_line_search_takes_the_first_fraction_within_the_trust_region_that_improves_the_surrogate():
    tried = []

    def measure(s):  # the KL grows as s^2, the gain is negative beyond s = 0.3
        tried.append(s)
        return 0.04 * s * s, s * (0.3 - s)
    assert trpo.line_search(measure, 0.01, backtracks=10, ratio=0.5) == pytest.approx((0.25, 0.0025, 0.0125, 3))
    assert tried == [1.0, 0.5, 0.25]
    assert trpo.line_search(measure, 0.0, backtracks=3, ratio=0.5) == (0.0, 0.0, 0.0, 4)  # none: rejected
    assert trpo.line_search(measure, 0.01, backtracks=3, ratio=0.5, check=False) == pytest.approx((1, 0.04, -0.7, 1))


def test_group_centred_advantages_sum_to_zero_per_group():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    torch.testing.assert_close(trpo.centred_rewards(scores, 3), torch.tensor([2 / 3, -1 / 3, -1 / 3, 0, 0, 0]))


# ---- end to end ---------------------------------------------------------------------------------------------------

def toy_args(tmp_path, model_dir, **kw):
    data = toy_task(tmp_path)
    defaults = dict(model=model_dir, data=data, eval_data=data if kw.get("eval_size") != 0 else None,
                    output_dir=str(tmp_path / "run"), max_steps=25,
                    batch_size=8, group_size=8, micro_batch_size=32, max_kl=0.2, cg_iters=4, max_new_tokens=3,
                    temperature=1.0, eval_every=0, save_every=1000)
    return trpo.Args(**{**defaults, **kw})


def recording_generate(monkeypatch, texts=TOY):
    """Sampling replaced by fixed completions (tests/torchrun_driver.py), each call's batch recorded."""
    generate, calls = fixed_generate(texts, None), []

    def recorded(model, tokenizer, prompt_ids, prompt_mask, *args, **kwargs):
        out = generate(model, tokenizer, prompt_ids, prompt_mask, *args, **kwargs)
        calls.append((prompt_ids, prompt_mask, out[0], out[1]))
        return out
    monkeypatch.setattr(trpo, "generate", recorded)
    return calls


def exact_mean_kl(old_model, new_model, sequences, temperature: float) -> float:
    """The mean over completion tokens of KL(pi_old || pi_new) over the vocabulary, computed here from scratch."""
    def logprobs(model):
        logits = common.forward_pass(model, *sequences).logits[:, sequences[0].shape[1] - 1:-1]
        return torch.log_softmax(logits.double() / temperature, -1)
    with torch.no_grad():
        old, new = logprobs(old_model), logprobs(new_model)
    kl = (old.exp() * (old - new)).sum(-1)
    return ((kl * sequences[3]).sum() / sequences[3].sum()).item()


@pytest.mark.parametrize("line_search", [True, False])
def test_the_step_taken_has_the_measured_kl_and_stays_in_the_trust_region(tmp_path, tiny_model_dir, monkeypatch,
                                                                         line_search):
    """One step on a fixed batch: the KL between the starting and the final model, computed independently, is what
    the run logged, and with the line search it is within --max-kl (without it, NPG's step is taken unchecked)."""
    calls = recording_generate(monkeypatch)
    trpo.main(toy_args(tmp_path, tiny_model_dir, max_steps=1, max_kl=0.01, temperature=0.7, eval_size=0,
                       line_search=line_search))
    start, final = plumbing.load_model(tiny_model_dir)[0], plumbing.load_model(str(tmp_path / "run" / "final"))[0]
    kl = exact_mean_kl(start, final, calls[0], 0.7)
    row = json.loads(open(tmp_path / "run" / "metrics.jsonl").read().splitlines()[-1])
    assert row["kl_step"] == pytest.approx(kl, rel=1e-3) and kl > 1e-4
    assert row["surrogate_gain"] > 0 or not line_search
    if line_search:
        assert kl <= 0.01 and 0 < row["step_fraction"] <= 1 and not row["step_rejected"]
    else:
        assert row["step_fraction"] == 1 and row["line_search_tries"] == 1


def test_a_rejected_step_leaves_the_weights_exactly_as_they_were(tmp_path, tiny_model_dir, monkeypatch):
    """No fraction passes (a trust region of 0): theta_old is restored bit for bit and the step is logged as
    rejected."""
    recording_generate(monkeypatch)
    line_search = trpo.line_search
    monkeypatch.setattr(trpo, "line_search", lambda measure, max_kl, *a: line_search(measure, 0.0, *a))
    trpo.main(toy_args(tmp_path, tiny_model_dir, max_steps=1, backtracks=3, eval_size=0))
    start, final = plumbing.load_model(tiny_model_dir)[0], plumbing.load_model(str(tmp_path / "run" / "final"))[0]
    assert all(torch.equal(p, q) for p, q in zip(start.parameters(), final.parameters()))
    row = json.loads(open(tmp_path / "run" / "metrics.jsonl").read())
    assert row["step_rejected"] and row["step_fraction"] == 0 and row["line_search_tries"] == 4
    assert row["kl_step"] == 0 and row["grad_norm"] > 0


def test_trpo_learns_the_toy_task(tmp_path, tiny_model_dir):
    """Seeds 0-3: reward 0.03-0.06 over the first 3 steps, 0.66-0.95 over the last 4 of 25 (--max-kl 0.2,
    --cg-iters 4)."""
    trpo.main(toy_args(tmp_path, tiny_model_dir))
    rewards, kl = logged(tmp_path / "run", "reward_mean"), logged(tmp_path / "run", "kl_step")
    assert sum(rewards[:3]) / 3 < 0.15
    assert sum(rewards[-4:]) / 4 > 0.6
    assert max(kl) <= 0.2 and sum(logged(tmp_path / "run", "step_rejected")) < 5


def test_trpo_resume_reproduces_an_uninterrupted_run(tmp_path, tiny_model_dir):
    """Bit-exact: the checkpoint holds the weights, the step and the random state (there is no optimiser)."""
    args = dict(max_steps=4, save_every=2, batch_size=4, group_size=4, max_kl=0.05, max_new_tokens=1,
                format_reward=1.0, eval_size=0)  # one token: a digit ~1 time in 8, so rewards are not all 0
    trpo.main(toy_args(tmp_path, tiny_model_dir, **args))
    assert "optimizer" not in plumbing.read_trainer_state(tmp_path / "run" / "checkpoint")
    trpo.main(toy_args(tmp_path, tiny_model_dir, resume=str(tmp_path / "run"), output_dir=str(tmp_path / "resumed"),
                       **args))
    a, _ = plumbing.load_model(str(tmp_path / "run" / "final"))
    b, _ = plumbing.load_model(str(tmp_path / "resumed" / "final"))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    timing = ("sample_tokens_per_s", "train_tokens_per_s", "step_time", "time")
    rows = [[{k: v for k, v in json.loads(line).items() if k not in timing} for line in open(run / "metrics.jsonl")]
            for run in (tmp_path / "run", tmp_path / "resumed")]
    assert rows[0] == rows[1] and len(rows[0]) == 4 and sum(r["step_fraction"] > 0 for r in rows[0]) >= 2


@pytest.fixture(scope="module")
def lora_model_dir(tmp_path_factory, tokenizer) -> str:
    path = tmp_path_factory.mktemp("tiny-llama-lora")
    make_model(tokenizer, initializer_range=0.15).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft reads a renamed property
def test_with_lora_only_the_adapters_move_within_the_trust_region(tmp_path, lora_model_dir, monkeypatch):
    calls = recording_generate(monkeypatch)
    trpo.main(toy_args(tmp_path, lora_model_dir, lora_rank=8, lora_alpha=16, max_steps=1, max_kl=0.01,
                       eval_size=0))
    final = tmp_path / "run" / "final"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    from peft import AutoPeftModelForCausalLM
    start, tuned = plumbing.load_model(lora_model_dir)[0], AutoPeftModelForCausalLM.from_pretrained(final)
    kl = exact_mean_kl(start, tuned, calls[0], 1.0)
    row = json.loads(open(tmp_path / "run" / "metrics.jsonl").read())
    assert 1e-5 < kl <= 0.01 and row["kl_step"] == pytest.approx(kl, rel=1e-3) and row["step_fraction"] > 0


@pytest.mark.parametrize("flag, match", [
    (dict(fsdp=True), "--fsdp: TRPO solves for one flat vector"),
    (dict(learning_rate=1e-3), "--learning-rate 0.001: has no effect in TRPO, which has no optimiser"),
    (dict(gradient_checkpointing=True), "--gradient-checkpointing: Fisher-vector products"),
    (dict(group_size=1), "--group-size 1: must be >= 2"),
    (dict(max_kl=0.0), "--max-kl 0.0: must be > 0"),
    (dict(backtrack_ratio=1.0), "--backtrack-ratio 1.0: must be in"),
    (dict(lora_rank=4, lora_dropout=0.1), "--lora-dropout 0.1: TRPO needs pi_theta = pi_old"),
])
def test_bad_flags_are_refused_before_anything_is_written(tmp_path, tiny_model_dir, flag, match):
    with pytest.raises(common.RunError, match=match):
        trpo.main(toy_args(tmp_path, tiny_model_dir, **flag))
    assert not (tmp_path / "run").exists()
