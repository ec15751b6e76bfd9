"""REINFORCE: the bare policy gradient, with the baselines that make it work (plain, moving mean, RLOO, REINFORCE++).

A completion is a trajectory, each token an action, prompt + tokens so far the state [PG-OBJ]. The log-derivative
trick gives an estimator from samples alone:

    grad J = E[ sum_t (G_t - b) grad log pi_theta(o_t | q, o_<t) ]                     [PG-GRAD] [PG-BASELINE]
    G_t    = sum_{t' >= t} gamma^(t'-t) r_t'   (reward-to-go)                          [REINFORCE-RTG]

so the loss is token cross-entropy weighted by the advantage, summed over the completion, averaged over completions:

    loss = -(1/n) sum_i sum_t A_it log pi_theta(o_it | q, o_i,<t)                     [PG-TOKEN-LOSS]

Any baseline b that does not depend on the sampled action leaves the gradient unbiased and lowers its variance:
  --baseline none          A_it = G_it                                 (Monte-Carlo return)
  --baseline mean          A_it = G_it - b, b a moving average of past batches' rewards
  --baseline rloo          A_it = G_it - (1/(k-1)) sum_{j != i} r_j    (leave-one-out over a prompt's k samples) [RLOO]
  --baseline reinforce++   KL to the reference folded into every token's reward, -beta (log pi_old - log pi_ref),
                           then A = G normalised over all tokens of the batch                              [REINFORCE++]
The reward r is the verifier's score on the last token (with gamma = 1 and no KL penalty, G_t = r for every t; with
reinforce++'s penalty, G_t also sums -beta * KL over the tokens from t on). One optimiser step per
sampled batch: on-policy, no ratio, no clipping, the estimator as derived.

Every tag in brackets is defined, with its derivation and papers, in docs/equations.md.

Usage: python reinforce.py --model HuggingFaceTB/SmolLM2-135M-Instruct --baseline rloo --group-size 8
       python reinforce.py                 # default model, built-in two-digit addition task, RLOO
       torchrun --nproc-per-node 8 reinforce.py --fsdp ...   # several GPUs: the same math (README)
"""

from __future__ import annotations

import functools
import itertools
import time
from dataclasses import dataclass
from statistics import fmean
from typing import Literal

import torch

from common import (all_reduce, autocast, completion_logprobs, decode, encode_prompts, evaluate, gather, generate,
                    is_correct, masked_mean, parse_number, rank, share, world_size)
from plumbing import (SamplingArgs, Steps, all_reduce_gradients, at_least, between, check_args, check_finite,
                      clip_grad_norm, describe_run, distribute, exit_on_error, load_model, load_policy, log_metrics,
                      log_samples, make_optimizer, parse_args, prepare_output_dir, prompt_length_check, reference_model,
                      require, resume_state, save_checkpoint, save_pretrained, start_run, task_data, unused)


@dataclass
class Args(SamplingArgs):
    baseline: Literal["none", "mean", "rloo", "reinforce++"] = "rloo"
    """what is subtracted from the return (see the module docstring)"""
    group_size: int = 8
    """k: completions per prompt (rloo needs k >= 2)"""
    gamma: float = 1.0
    """discount of the reward-to-go"""
    beta: float | None = None
    """KL penalty folded into per-token rewards; None: 0.01 with reinforce++, else 0 (no reference model loaded)"""
    baseline_decay: float = 0.9
    """--baseline mean: b <- decay * b + (1 - decay) * batch mean reward, after each step"""
    format_reward: float = 0.0
    """added to the reward when the completion is nothing but a number"""


def check_flags(args: Args) -> None:
    """REINFORCE's own flags: their ranges, then a group of at least two samples for the leave-one-out baseline."""
    check_args(args, group_size=at_least(1), gamma=between(0, 1), beta=at_least(0),
               baseline_decay=between(0, 1, hi_open=True))
    require(args.baseline != "rloo" or args.group_size >= 2, f"--baseline rloo needs --group-size >= 2 (got "
            f"{args.group_size}): the baseline of a sample is the mean of the others")
    unused(args, "baseline_decay", args.baseline == "mean", f"with --baseline {args.baseline}")


# ---- the math: one function per equation --------------------------------------------------------------------------

def token_rewards(scores: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None = None, beta: float = 0.0):
    """[RLHF-KL-REWARD] Per-token rewards (B, T): -beta * kl on every token (kl = log pi_old - log pi_ref, the k1
    estimate; no penalty if kl is None), plus the sequence's score on its last real token (its EOS, found from the
    mask's length, never from pad ids: pad == EOS for SmolLM2)."""
    rewards = torch.zeros(mask.shape, dtype=torch.float, device=mask.device)
    if kl is not None:
        rewards = rewards - beta * kl
    last = (mask.sum(1) - 1).clamp(min=0)
    rewards[torch.arange(len(mask)), last] += scores.to(rewards)
    return rewards * mask


def reward_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """[REINFORCE-RTG] G_t = r_t + gamma G_{t+1}, backwards over the completion (G = 0 after its last token)."""
    returns = torch.zeros_like(rewards)
    running = torch.zeros(len(rewards), device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        returns[:, t] = running
    return returns


def rloo_baseline(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[RLOO] b_i = (1/(k-1)) sum_{j != i} r_j over the k samples of one prompt (adjacent in scores)."""
    r = scores.view(-1, k)
    return ((r.sum(1, keepdim=True) - r) / (k - 1)).view(-1)


def whiten(advantages: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(A - mean) / std over every valid token of the batch (not per group), 0 on padding; over the valid tokens of
    the whole batch: under torchrun the sums are all-reduced over ranks (then, as masked_mean, in A's dtype)."""
    n = advantages.new_tensor(all_reduce(mask.sum())).clamp(min=1)
    mean = advantages.new_tensor(all_reduce((advantages * mask).sum())) / n
    var = advantages.new_tensor(all_reduce(((advantages - mean) ** 2 * mask).sum())) / n
    return (advantages - mean) / (var.sqrt() + eps) * mask


def advantages_for(baseline: str, returns, scores, mask, k: int, running_mean: float = 0.0) -> torch.Tensor:
    """A_it = G_it - b, for each --baseline choice."""
    if baseline == "none":
        return returns  # plain [PG-GRAD]: the Monte-Carlo return itself
    if baseline == "mean":
        return (returns - running_mean) * mask  # [PG-BASELINE], b from past batches: independent of these actions
    if baseline == "rloo":
        return (returns - rloo_baseline(scores, k)[:, None]) * mask  # [RLOO]
    if baseline == "reinforce++":
        return whiten(returns, mask)  # [REINFORCE++]
    raise ValueError(f"--baseline {baseline!r}: expected none, mean, rloo or reinforce++")


def policy_gradient_loss(logprobs, advantages, mask, num_sequences: int) -> torch.Tensor:
    """[PG-TOKEN-LOSS] -(1/n) sum_i sum_t A_it log pi(o_it): summed over tokens as [PG-GRAD] is, averaged over the
    n completions of the whole batch (so micro-batch losses add up to the batch loss)."""
    return -(advantages * logprobs * mask).sum() / num_sequences


def reward(completion: str, correct: bool, format_reward: float = 0.0) -> float:
    """What is rewarded: 1 for a right answer (the verifier's verdict, `is_correct`), plus format_reward if the
    completion is nothing but one number, as the prompt asks."""
    bare_number = parse_number(completion) is not None and completion.strip().lstrip("-").replace(",", "").isdigit()
    return float(correct) + format_reward * bare_number


# ---- training ------------------------------------------------------------------------------------------------------

def main(args: Args) -> dict:
    checkpoint, device, dtype = start_run(args, "reinforce", check_flags)  # flags, resume, torchrun, seeds, dtype
    k, n_batch = args.group_size, args.batch_size * args.group_size
    beta = args.beta if args.beta is not None else (0.01 if args.baseline == "reinforce++" else 0.0)
    # pi_theta (trained) and pi_ref (the frozen starting model, only if beta > 0; with LoRA, pi_theta with its
    # adapters off)
    model, tokenizer = load_policy(args, checkpoint, device)
    ref_model = (load_model(args.model, device)[0].eval().requires_grad_(False) if beta > 0 and not args.lora_rank
                 else None)
    too_long = prompt_length_check(tokenizer, args.max_prompt_length, args.truncate_prompts)
    problems, eval_set = task_data(args, too_long)
    output_dir = prepare_output_dir(args, checkpoint)  # the first write: every check has passed
    model, ref_model = (distribute(m, args.fsdp, dtype) if m is not None else None
                        for m in (model, ref_model))  # torchrun: replicated or FSDP2
    optimizer, scheduler = make_optimizer(model, args)
    describe_run("reinforce", args, model, device, dtype, f"{args.batch_size} prompts x {k} completions")
    start_step, state = resume_state(checkpoint, model, optimizer, scheduler)
    running_mean = state.get("running_mean", 0.0)  # the --baseline mean b, from past batches only
    problems = itertools.islice(problems, start_step * args.batch_size, None)  # the stream is the seed's
    micro_batch_size = args.micro_batch_size // world_size()  # this rank's share of the global size

    run_eval = functools.partial(evaluate, model, tokenizer, eval_set, args.max_new_tokens,  # held-out, greedy
                                 args.generation_batch_size, device, dtype, args.max_prompt_length)
    progress = Steps(start_step, args.max_steps, "reinforce", args.eval_every, args.save_every)  # Ctrl-C: save, stop
    metrics: dict = {}
    if eval_set and args.eval_every and start_step == 0:
        metrics = {"step": 0, "eval_accuracy": run_eval()}
        progress.write(log_metrics(output_dir, metrics, ("eval_accuracy",)))
    for step in progress:
        # ---- 1. sample k completions per prompt from pi_theta ----------------------------------------------------
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

        # ---- 3. log-probs under pi_old and pi_ref, no grad, only if beta > 0: the KL of [RLHF-KL-REWARD] ---------
        kl = None
        if beta > 0:  # log pi_old - log pi_ref per token (k1), folded into the reward below
            with torch.no_grad(), autocast(device, dtype):
                old_logprobs = torch.cat([logprobs_of(model, sequences, mb, args.temperature)[0]
                                          for mb in micro_batches])
                with reference_model(model, ref_model) as ref:  # pi_ref (LoRA: the adapters off)
                    kl = old_logprobs - torch.cat([logprobs_of(ref, sequences, mb, args.temperature)[0]
                                                   for mb in micro_batches])

        # ---- 4. returns, baseline, advantages [REINFORCE-RTG] [PG-BASELINE] [RLOO] [REINFORCE++] -----------------
        returns = reward_to_go(token_rewards(scores, mask, kl, beta), mask, args.gamma)  # (B*k, C)
        advantages = advantages_for(args.baseline, returns, scores, mask, k, running_mean)  # rloo: whole groups here
        scores, correct = gather(scores), gather(correct)  # the global batch's: the running mean, metrics
        running_mean = args.baseline_decay * running_mean + (1 - args.baseline_decay) * scores.mean().item()

        # ---- 5. loss and one optimiser step: on-policy, no ratio, no clipping [PG-TOKEN-LOSS] --------------------
        t1 = time.time()
        model.train()
        loss_sum, entropies = 0.0, []
        for mb in micro_batches:
            with autocast(device, dtype):
                logprobs, entropy = logprobs_of(model, sequences, mb, args.temperature)
            loss = policy_gradient_loss(logprobs, advantages[mb], mask[mb], n_batch)  # n: the global batch's
            loss.backward()
            loss_sum += loss.item()
            entropies.append(masked_mean(entropy.detach(), mask[mb]).item())
        all_reduce_gradients(model)  # the batch's gradient: the sum of the ranks' (one all-reduce per step)
        grad_norm, loss_sum = clip_grad_norm(model, args.max_grad_norm), all_reduce(loss_sum)
        check_finite(step + 1, loss=loss_sum, grad_norm=grad_norm)  # before the update, never after
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]  # the rate this step used
        scheduler.step()
        t_train = time.time() - t1

        # ---- 6. log, evaluate, save ------------------------------------------------------------------------------
        metrics = metrics_row(step + 1, loss_sum, scores, correct, advantages, kl, mask, entropies, grad_norm, lr,
                              truncated, prompt_mask, t0, t_sample, t_train)
        if eval_set and progress.eval_due(step + 1):
            metrics["eval_accuracy"] = run_eval()
        log_samples(output_dir, step + 1, [{"prompt": p["prompt"], "completion": c, "answer": p["answer"],
                                            "reward": r} for p, c, r in zip(batch, completions[::k],
                                                                            scores[mine][::k].tolist())][:4],
                    show="eval_accuracy" in metrics)  # a few samples, one per group
        progress.write(log_metrics(output_dir, metrics, ("reward_mean", "accuracy", "kl_k1", "grad_norm",
                                                         "completion_len", "eval_accuracy")))
        if progress.checkpoint_due(step + 1):  # every --save-every steps, and on Ctrl-C
            save_checkpoint(step + 1, model, tokenizer, optimizer, scheduler, output_dir,
                            state={"running_mean": running_mean})
            progress.stop_if_requested(step + 1, output_dir)
    save_pretrained(model, tokenizer, output_dir / "final", merge_lora=args.merge_lora)
    return metrics


def metrics_row(step: int, loss: float, scores, correct, advantages, kl, mask, entropies: list[float],
                grad_norm: float, lr: float, truncated, prompt_mask, t0: float, t_sample: float,
                t_train: float) -> dict:
    """The step's line of metrics.jsonl: the loss and gradient norm of the whole batch, rewards and per-token
    statistics of the global batch (gathered here), entropy as the mean over ranks of theirs."""
    lengths, truncated = gather(mask.sum(1).float()), gather(truncated)
    advantages, kl, mask = (gather(t) if t is not None else None for t in (advantages, kl, mask))
    n_tokens = int(lengths.sum())
    return {"step": step, "loss": loss, "reward_mean": scores.mean().item(),
            "reward_std": scores.std(correction=0).item(), "accuracy": correct.mean().item(),
            "advantage_std": masked_mean((advantages - masked_mean(advantages, mask)) ** 2, mask).sqrt().item(),
            "kl_k1": masked_mean(kl, mask).item() if kl is not None else 0.0,
            "entropy": all_reduce(fmean(entropies)) / world_size(),
            "grad_norm": grad_norm, "lr": lr, "completion_len": lengths.mean().item(),
            "completion_len_max": int(lengths.max()), "truncated_frac": truncated.float().mean().item(),
            "sample_tokens_per_s": int(n_tokens / t_sample),
            "train_tokens_per_s": int((all_reduce(prompt_mask.sum()) + n_tokens) / t_train),
            "step_time": time.time() - t0}


def logprobs_of(model, sequences, rows, temperature: float):
    """(log pi(o_t | q, o_<t), entropy) for some rows of (prompt_ids, prompt_mask, completion_ids, completion_mask)."""
    return completion_logprobs(model, *(t[rows] for t in sequences), temperature)


if __name__ == "__main__":
    with exit_on_error():
        main(parse_args(Args, __doc__))
