"""TRPO: trust-region policy optimisation, the natural policy gradient made safe by a line search on the measured KL.

A plain gradient step of a fixed size can move the policy a long way in distribution, and in RL a bad step poisons
the samples that follow; TRPO bounds each step in the space of policies instead of parameters. Over a batch of
completions o_i sampled from pi_old, with N completion tokens in all:

    maximise   L(theta)  = (1/N) sum_i sum_t ratio_it A_i,   ratio_it = pi_theta(o_it|s_it) / pi_old(o_it|s_it)
    subject to KL(theta) = (1/N) sum_i sum_t KL(pi_old(.|s_it) || pi_theta(.|s_it)) <= delta               [TRPO]

with s_it = (q_i, o_i,<t) and the KL taken exactly over the vocabulary at every token. With L to first order (its
gradient g at theta_old, where ratio = 1, is the policy gradient) and KL to second order (its Hessian at theta_old
is the Fisher information F of the token distributions; its value and gradient there are 0):

    x     = (F + damping I)^-1 g, by conjugate gradient on products F v, F never formed                    [NPG]
    F v   = grad_theta( grad_theta KL(theta) . v ) at theta_old: two backward passes                      [NPG]
    step  = sqrt(2 delta / (g^T x)) x     (its quadratic KL, (1/2) step^T F step, is delta)                [NPG]
    theta = theta_old + s step, s the first of 1, 1/2, 1/4, ... whose measured KL <= delta and whose L
            improves; if none does, theta stays theta_old and the step is logged as rejected               [TRPO]

--no-line-search takes s = 1 as it is: the natural policy gradient with the quadratic model's step [NPG]. The exact
KL (not a sampled k1 or k3 estimate) is used because its Hessian at theta_old is exactly the Fisher matrix.

Advantages: A_i = r_i - mean(r_1..r_k), each reward centred on the mean of its prompt's k samples [PG-BASELINE], the
same A_i on every token of o_i. Not divided by the group's std: the step's length is set by delta, not by the size
of g (step is the same for g and c g, c > 0), so a batch-wide scale would change nothing, and a per-group std would
only re-weight prompts by how much their rewards vary (the bias [DR-GRPO] removes). There is no optimiser and no
learning rate: the weights are moved directly, by the step above. With --lora-rank, theta is the adapters' weights.

Every tag in brackets is defined, with its derivation and papers, in docs/equations.md.

Usage: python trpo.py --model HuggingFaceTB/SmolLM2-135M-Instruct --max-kl 0.01 --group-size 8
       python trpo.py                      # default model, built-in two-digit addition task
       python trpo.py --no-line-search     # the natural policy gradient's full step, unchecked
       torchrun --nproc-per-node 8 trpo.py ...   # several GPUs, each holding the model: the same math (README)
"""

from __future__ import annotations

import functools
import itertools
import time
from dataclasses import dataclass
from statistics import fmean

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import (all_reduce, autocast, decode, encode_prompts, evaluate, forward_pass, gather, generate, is_correct,
                    masked_mean, parse_number, rank, share, world_size)
from plumbing import (SamplingArgs, Steps, all_reduce_gradients, at_least, between, check_args, check_finite,
                      describe_run, distribute, exit_on_error, load_policy, log_metrics, log_samples, parse_args,
                      positive, prepare_output_dir, prompt_length_check, require, resume_state, save_checkpoint,
                      save_pretrained, start_run, task_data, unused)


@dataclass
class Args(SamplingArgs):
    group_size: int = 8
    """k: completions per prompt; each reward is centred on the mean of its prompt's k"""
    max_kl: float = 0.01
    """delta: the trust region, the largest mean token KL(pi_old || pi_theta) a step may reach"""
    cg_iters: int = 10
    """conjugate-gradient iterations for x = F^-1 g (each one Fisher-vector product over the batch)"""
    damping: float = 0.1
    """added to F's diagonal: a batch's Fisher matrix is singular (far fewer tokens than weights)"""
    line_search: bool = True
    """backtrack until the measured KL <= max_kl and the surrogate improves; off: the full natural-gradient step"""
    backtracks: int = 10
    """steps tried after the full one, each shrunk by --backtrack-ratio; none accepted: no update"""
    backtrack_ratio: float = 0.5
    """the factor by which each backtrack shrinks the step"""
    format_reward: float = 0.0
    """added to the reward when the completion is nothing but a number"""


def check_flags(args: Args) -> None:
    """TRPO's own flags: their ranges; then what it does not have (a learning rate) and cannot do (double backward
    through sharded or checkpointed layers)."""
    check_args(args, group_size=at_least(1), max_kl=positive, cg_iters=at_least(1), damping=at_least(0),
               backtracks=at_least(0), backtrack_ratio=between(0, 1, lo_open=True, hi_open=True))
    require(args.group_size >= 2, f"--group-size {args.group_size}: must be >= 2 (a reward centred on a group of "
            f"one is 0)")
    unused(args, "learning_rate warmup_steps max_grad_norm", False, "in TRPO, which has no optimiser (--max-kl sets "
           "the step's size)")
    require(not args.fsdp, "--fsdp: TRPO solves for one flat vector of all trained weights (conjugate gradient, line "
            "search), which FSDP's shards do not give; run without --fsdp (each process holds the whole model)")
    require(not args.gradient_checkpointing, "--gradient-checkpointing: Fisher-vector products differentiate the KL "
            "twice, which checkpointed layers do not support; lower --micro-batch-size to save memory instead")
    require(args.lora_dropout == 0, f"--lora-dropout {args.lora_dropout}: TRPO needs pi_theta = pi_old at theta_old "
            f"(the KL's minimum, where its Hessian is the Fisher matrix); dropout makes them differ")


# ---- the math: one function per equation --------------------------------------------------------------------------

def centred_rewards(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[PG-BASELINE] A_i = r_i - (1/k) sum_j r_j over the k samples of r_i's prompt (adjacent in scores); not divided
    by the group's std (see the module docstring). It is [RLOO]'s advantage times (k-1)/k."""
    r = scores.view(-1, k)
    return (r - r.mean(1, keepdim=True)).view(-1)


def surrogate(logprobs, old_logprobs, advantages, mask, n_tokens: float) -> torch.Tensor:
    """[TRPO] [IS-RATIO] sum_t ratio_t A_t / N over some rows' tokens, ratio = exp(log pi_theta - log pi_old), N the
    completion tokens of the whole batch (so the micro-batches' values add up to L). At theta_old ratio = 1 and the
    gradient is (1/N) sum_t A_t grad log pi_theta(o_t): the policy gradient."""
    ratio = torch.exp(logprobs - old_logprobs)
    return (ratio * advantages * mask).sum() / n_tokens


def mean_kl(old_vocab_logprobs, vocab_logprobs, mask, n_tokens: float) -> torch.Tensor:
    """[NPG] sum_t KL(pi_old(.|s_t) || pi_theta(.|s_t)) / N from log-probs over the whole vocabulary, (b, T, V):
    sum_v pi_old(v) (log pi_old(v) - log pi_theta(v)) at each token, exact. At theta_old its value and gradient are 0
    and its Hessian is the Fisher matrix F = E[grad log pi grad log pi^T] (a sampled estimate's is F only on
    average)."""
    kl = (old_vocab_logprobs.exp() * (old_vocab_logprobs - vocab_logprobs)).sum(-1)
    return (kl * mask).sum() / n_tokens


def conjugate_gradient(fvp, g: torch.Tensor, iters: int, damping: float = 0.0, tol: float = 1e-10):
    """[NPG] x = (F + damping I)^-1 g from products F v alone (fvp(v) -> F v), in at most `iters` iterations of
    conjugate gradient (exact after dim(g) of them for a positive-definite F, in exact arithmetic). Returns x and the
    relative residual |g - (F + damping I) x| / |g| as the iteration tracks it (0 for g = 0, where x = 0)."""
    x, r, p = torch.zeros_like(g), g.clone(), g.clone()
    rr, gg = r @ r, g @ g
    for _ in range(iters):
        if rr <= tol ** 2 * gg:
            break
        Ap = fvp(p) + damping * p
        if p @ Ap <= 0:  # F + damping I is positive definite; bf16 rounding without damping can say otherwise
            break
        alpha = rr / (p @ Ap)
        x, r = x + alpha * p, r - alpha * Ap
        rr, rr_old = r @ r, rr
        p = r + (rr / rr_old) * p
    return x, (rr.sqrt() / gg.sqrt()).item() if gg > 0 else 0.0


def natural_step(x: torch.Tensor, g: torch.Tensor, max_kl: float) -> torch.Tensor:
    """[NPG] step = sqrt(2 delta / (g^T x)) x with x = F^-1 g: the natural gradient scaled so that the quadratic KL,
    (1/2) step^T F step = delta (g^T x = g^T F^-1 g = x^T F x; with damping, at most delta). Zero when g^T x <= 0 (no
    signal: every group's rewards were equal)."""
    gx = g @ x
    return torch.sqrt(2 * max_kl / gx) * x if gx > 0 else torch.zeros_like(x)


def line_search(measure, max_kl: float, backtracks: int, ratio: float, check: bool = True):
    """[TRPO] The first fraction s of the step in 1, ratio, ratio^2, ... (backtracks + 1 tries) whose measured mean KL
    is <= max_kl and whose surrogate gain L(theta_old + s step) - L(theta_old) is > 0; measure(s) -> (kl, gain).
    Returns (s, kl, gain, tries): s = 0 (with kl = gain = 0) if no fraction passed, and the caller keeps theta_old.
    check=False: the natural policy gradient [NPG], s = 1 whatever its KL and gain."""
    for tries in range(1, (backtracks + 1 if check else 1) + 1):
        s = ratio ** (tries - 1)
        kl, gain = measure(s)
        if not check or (kl <= max_kl and gain > 0):
            return s, kl, gain, tries
    return 0.0, 0.0, 0.0, backtracks + 1


def reward(completion: str, correct: bool, format_reward: float = 0.0) -> float:
    """What is rewarded: 1 for a right answer (the verifier's verdict, `is_correct`), plus format_reward if the
    completion is nothing but one number, as the prompt asks."""
    bare_number = parse_number(completion) is not None and completion.strip().lstrip("-").replace(",", "").isdigit()
    return float(correct) + format_reward * bare_number


# ---- training ------------------------------------------------------------------------------------------------------

def main(args: Args) -> dict:
    checkpoint, device, dtype = start_run(args, "trpo", check_flags)  # flags, resume, torchrun, seeds, dtype
    k = args.group_size
    model, tokenizer = load_policy(args, checkpoint, device)  # pi_theta; with LoRA only its adapters train
    too_long = prompt_length_check(tokenizer, args.max_prompt_length, args.truncate_prompts)
    problems, eval_set = task_data(args, too_long)
    output_dir = prepare_output_dir(args, checkpoint)  # the first write: every check has passed
    model = distribute(model, False, dtype)  # torchrun: every rank holds the whole model, rank 0's weights
    params = [p for p in model.parameters() if p.requires_grad]  # theta: the trained weights, as one flat vector
    describe_run("trpo", args, model, device, dtype, f"{args.batch_size} prompts x {k} completions")
    start_step, _ = resume_state(checkpoint, model, None, None)  # no optimiser: the weights and the random state
    problems = itertools.islice(problems, start_step * args.batch_size, None)  # the stream is the seed's
    micro_batch_size = args.micro_batch_size // world_size()  # this rank's share of the global size

    run_eval = functools.partial(evaluate, model, tokenizer, eval_set, args.max_new_tokens,  # held-out, greedy
                                 args.generation_batch_size, device, dtype, args.max_prompt_length)
    progress = Steps(start_step, args.max_steps, "trpo", args.eval_every, args.save_every)  # Ctrl-C: save, stop
    metrics: dict = {}
    if eval_set and args.eval_every and start_step == 0:
        metrics = {"step": 0, "eval_accuracy": run_eval()}
        progress.write(log_metrics(output_dir, metrics, ("eval_accuracy",)))
    for step in progress:
        # ---- 1. sample k completions per prompt from pi_old (pi_theta as it is now) ------------------------------
        t0 = time.time()
        batch = share([next(problems) for _ in range(args.batch_size)])  # this rank's prompts (whole groups)
        n_local = len(batch) * k
        mine = slice(rank() * n_local, (rank() + 1) * n_local)  # its rows of the global batch
        prompt_ids, prompt_mask = encode_prompts(tokenizer, [p["prompt"] for p in batch for _ in range(k)], device,
                                                 args.max_prompt_length)
        with autocast(device, dtype):
            completion_ids, completion_mask, truncated = generate(
                model, tokenizer, prompt_ids, prompt_mask, args.max_new_tokens, args.temperature, args.top_p,
                batch_size=args.generation_batch_size)
        completions = decode(tokenizer, completion_ids, completion_mask)
        sequences = (prompt_ids, prompt_mask, completion_ids, completion_mask)  # (B*k, P) and (B*k, C)
        mask = completion_mask
        micro_batches = torch.arange(n_local, device=device).split(micro_batch_size)
        t_sample = time.time() - t0

        # ---- 2. score: the verifier's verdict, plus the format bonus ---------------------------------------------
        answers = [p["answer"] for p in batch for _ in range(k)]
        correct = torch.tensor([is_correct(c, a) for c, a in zip(completions, answers)], dtype=torch.float)
        scores = torch.tensor([reward(c, bool(ok), args.format_reward) for c, ok in zip(completions, correct)],
                              device=device)

        # ---- 3. advantages: each reward centred on its group's mean, on every token [PG-BASELINE] ----------------
        advantages = centred_rewards(scores, k)[:, None] * mask  # (B*k, C): whole groups on each rank
        scores, correct = gather(scores), gather(correct)  # the global batch's, for the metrics
        n_tokens = all_reduce(mask.sum())  # N: the global batch's completion tokens, the denominator of L and KL

        # ---- 4. g, the gradient of the surrogate at theta_old (ratio = 1): the policy gradient [TRPO] [IS-RATIO] -
        t1 = time.time()
        model.train()
        old_logprobs, old_vocab, entropies = [], [], []  # pi_old on every micro-batch, kept for the line search
        for mb in micro_batches:
            with autocast(device, dtype):
                vocab = vocab_logprobs(model, sequences, mb, args.temperature)  # (b, C, V)
            logprobs = vocab.gather(-1, completion_ids[mb, :, None]).squeeze(-1)
            surrogate(logprobs, logprobs.detach(), advantages[mb], mask[mb], n_tokens).backward()
            old_logprobs.append(logprobs.detach())
            old_vocab.append(vocab.detach())
            entropies.append(masked_mean(-(vocab.exp() * vocab).sum(-1).detach(), mask[mb]).item())
        all_reduce_gradients(model)  # the batch's g: the sum of the ranks' shares
        g = flat_grad(model, params)

        # ---- 5. the natural gradient x = F^-1 g by conjugate gradient on Fisher-vector products [NPG] -------------
        fvp = functools.partial(fisher_vector_product, model, params, sequences, micro_batches, mask, n_tokens,
                                args.temperature, device, dtype)
        x, cg_residual = conjugate_gradient(fvp, g, args.cg_iters, args.damping)
        full_step = natural_step(x, g, args.max_kl)  # its quadratic KL is max_kl
        check_finite(step + 1, grad_norm=g.norm().item(), step_norm=full_step.norm().item())  # before any update

        # ---- 6. the step: backtrack until the measured KL <= delta and L improves [TRPO]; or take it all [NPG] ---
        theta_old = torch.cat([p.detach().reshape(-1) for p in params])
        measure = functools.partial(measure_step, model, params, theta_old, full_step, sequences, micro_batches,
                                    old_vocab, old_logprobs, advantages, mask, n_tokens, args.temperature, device,
                                    dtype)
        fraction, kl, gain, tries = (line_search(measure, args.max_kl, args.backtracks, args.backtrack_ratio,
                                                 args.line_search) if full_step.any() else (0.0, 0.0, 0.0, 0))
        set_flat(params, theta_old + fraction * full_step if fraction else theta_old)  # rejected: theta_old
        t_train = time.time() - t1

        # ---- 7. log, evaluate, save ------------------------------------------------------------------------------
        metrics = metrics_row(step + 1, scores, correct, advantages, mask, entropies, g, x, full_step, fraction, kl,
                              gain, tries, cg_residual, truncated, prompt_mask, t0, t_sample, t_train)
        if eval_set and progress.eval_due(step + 1):
            metrics["eval_accuracy"] = run_eval()
        log_samples(output_dir, step + 1, [{"prompt": p["prompt"], "completion": c, "answer": p["answer"],
                                            "reward": r} for p, c, r in zip(batch, completions[::k],
                                                                            scores[mine][::k].tolist())][:4],
                    show="eval_accuracy" in metrics)  # a few samples, one per group
        progress.write(log_metrics(output_dir, metrics, ("reward_mean", "accuracy", "kl_step", "step_fraction",
                                                         "surrogate_gain", "completion_len", "eval_accuracy")))
        if progress.checkpoint_due(step + 1):  # every --save-every steps, and on Ctrl-C
            save_checkpoint(step + 1, model, tokenizer, None, None, output_dir)  # no optimiser state to keep
            progress.stop_if_requested(step + 1, output_dir)
    save_pretrained(model, tokenizer, output_dir / "final", merge_lora=args.merge_lora)
    return metrics


def metrics_row(step: int, scores, correct, advantages, mask, entropies: list[float], g, x, full_step,
                fraction: float, kl: float, gain: float, tries: int, cg_residual: float, truncated, prompt_mask,
                t0: float, t_sample: float, t_train: float) -> dict:
    """The step's line of metrics.jsonl: rewards and per-token statistics of the global batch (gathered here); the
    step's measured KL(pi_old || pi_new) and surrogate gain, the fraction of the natural step taken (0: rejected, or
    with 0 tries no step to try: every group's rewards were equal), the line search's tries, CG's relative residual,
    |g| and the size of the step taken; entropy as the mean over ranks of theirs."""
    lengths, truncated = gather(mask.sum(1).float()), gather(truncated)
    advantages, mask = gather(advantages), gather(mask)
    n_tokens = int(lengths.sum())
    return {"step": step, "reward_mean": scores.mean().item(), "reward_std": scores.std(correction=0).item(),
            "accuracy": correct.mean().item(),
            "advantage_std": masked_mean((advantages - masked_mean(advantages, mask)) ** 2, mask).sqrt().item(),
            "kl_step": kl, "surrogate_gain": gain, "step_fraction": fraction, "step_rejected": fraction == 0,
            "line_search_tries": tries, "cg_residual": cg_residual, "grad_norm": g.norm().item(),
            "natural_grad_gx": (g @ x).item(), "step_norm": (fraction * full_step).norm().item(),
            "entropy": all_reduce(fmean(entropies)) / world_size(), "completion_len": lengths.mean().item(),
            "completion_len_max": int(lengths.max()), "truncated_frac": truncated.float().mean().item(),
            "sample_tokens_per_s": int(n_tokens / t_sample),
            "train_tokens_per_s": int((all_reduce(prompt_mask.sum()) + n_tokens) / t_train),
            "step_time": time.time() - t0}


def vocab_logprobs(model, sequences, rows, temperature: float) -> torch.Tensor:
    """log pi(. | q, o_<t) over the whole vocabulary at every completion position of some rows of (prompt_ids,
    prompt_mask, completion_ids, completion_mask), (b, C, V) in fp32, at the sampling temperature: the exact KL
    needs every token's probability, not only the sampled one's."""
    prompt_ids, prompt_mask, completion_ids, completion_mask = (t[rows] for t in sequences)
    logits = forward_pass(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                          logits_to_keep=completion_ids.shape[1] + 1).logits[:, :-1]  # position t predicts t+1
    return torch.log_softmax(logits.float() / temperature, dim=-1)


def fisher_vector_product(model, params, sequences, micro_batches, mask, n_tokens: float, temperature: float,
                          device, dtype, v: torch.Tensor) -> torch.Tensor:
    """[NPG] F v for the whole batch, F the Hessian of the mean token KL at theta_old (never formed): per micro-batch,
    the KL's gradient with its graph kept (0 in value at theta_old), dotted with v and differentiated again, which
    accumulates H v in .grad; then summed over ranks like a gradient. Attention runs in PyTorch's plain (math)
    kernel, the one that can be differentiated twice."""
    vs = [u.view_as(p) for u, p in zip(v.split([p.numel() for p in params]), params)]
    with sdpa_kernel(SDPBackend.MATH):
        for mb in micro_batches:
            with autocast(device, dtype):
                vocab = vocab_logprobs(model, sequences, mb, temperature)
            kl = mean_kl(vocab.detach(), vocab, mask[mb], n_tokens)  # pi_old = pi_theta here, held constant
            grads = torch.autograd.grad(kl, params, create_graph=True, allow_unused=True)
            sum((grad * u).sum() for grad, u in zip(grads, vs) if grad is not None).backward()
    all_reduce_gradients(model)
    return flat_grad(model, params)


@torch.no_grad()
def measure_step(model, params, theta_old, full_step, sequences, micro_batches, old_vocab, old_logprobs, advantages,
                 mask, n_tokens: float, temperature: float, device, dtype, fraction: float) -> tuple[float, float]:
    """(mean KL(pi_old || pi_theta), L(theta) - L(theta_old)) over the whole batch at theta = theta_old + fraction *
    step, the weights left there: what the line search accepts or refuses. pi_old's distributions are those kept
    from step 4 (one fp32 copy of the batch's completion logits, the memory that exact KLs cost); the sums are
    all-reduced, so every rank takes the same decision."""
    set_flat(params, theta_old + fraction * full_step)
    kl = gain = 0.0
    for mb, old_vocab_mb, old_mb in zip(micro_batches, old_vocab, old_logprobs):
        with autocast(device, dtype):
            vocab = vocab_logprobs(model, sequences, mb, temperature)
        logprobs = vocab.gather(-1, sequences[2][mb, :, None]).squeeze(-1)
        kl += mean_kl(old_vocab_mb, vocab, mask[mb], n_tokens).item()
        gain += (surrogate(logprobs, old_mb, advantages[mb], mask[mb], n_tokens)
                 - surrogate(old_mb, old_mb, advantages[mb], mask[mb], n_tokens)).item()
    return all_reduce(kl), all_reduce(gain)


def flat_grad(model, params) -> torch.Tensor:
    """The trained weights' .grad as one vector (0 where a weight got none), then the gradients cleared."""
    vector = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    model.zero_grad(set_to_none=True)
    return vector


@torch.no_grad()
def set_flat(params, vector: torch.Tensor) -> None:
    """Copy a flat vector into the trained weights, in place (tied weights stay tied)."""
    for p, chunk in zip(params, vector.split([p.numel() for p in params])):
        p.copy_(chunk.view_as(p))


if __name__ == "__main__":
    with exit_on_error():
        main(parse_args(Args, __doc__))
