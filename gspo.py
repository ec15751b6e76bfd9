"""GSPO: group sequence policy optimisation (Qwen), GRPO with one importance ratio per sequence.

Sampling, the verifier reward and the group advantage are GRPO's. What changes is the off-policy correction: GRPO
weighs every token by its own ratio pi_theta/pi_old, a noisy one-sample estimate that grows with length; GSPO uses one
length-normalised ratio per sequence, the unit the reward is given for, and clips it far more tightly:

    A_i      = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps)                                   [GRPO-ADV]
    s_i      = exp( (1/|o_i|) sum_t (log pi_theta(o_it) - log pi_old(o_it)) )                    [GSPO-RATIO]
    J(theta) = E[ (1/G) sum_i min(s_i A_i, clip(s_i, 1-eps_low, 1+eps_high) A_i) ]               [PPO-CLIP]

--token-level is GSPO-token: s_it = sg[s_i] * pi_theta(o_it) / sg[pi_theta(o_it)] [GSPO-TOKEN] has the value s_i but
lets a per-token advantage through; with one advantage per sequence (ours) its gradient equals GSPO's.

When GSPO equals GRPO: on-policy, pi_old = pi_theta at the update, every ratio is 1, nothing is clipped, and both
gradients are (1/G) sum_i A_i (1/|o_i|) sum_t grad log pi_theta(o_it). It differs only when updates are off-policy:
several optimiser steps per sampled batch (mini-batches, --num-iterations > 1) or stale samples. So, as in the GSPO
paper, each sampled batch is split into four mini-batches by default. Defaults follow the paper: clip range
3e-4 / 4e-4, no KL term (--beta adds [KL-K3] per token, averaged over each sequence).

Every tag in brackets is defined, with its derivation and papers, in docs/equations.md.

Usage: python gspo.py --model HuggingFaceTB/SmolLM2-135M-Instruct --group-size 16
       python gspo.py                      # default model, built-in two-digit addition task
       torchrun --nproc-per-node 8 gspo.py --fsdp ...   # several GPUs: the same math (README)
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
                    is_correct, masked_mean, parse_number, rank, share, shuffled_groups, world_size)
from plumbing import (SamplingArgs, Steps, all_reduce_gradients, at_least, between, check_args, check_finite,
                      clip_grad_norm, describe_run, distribute, exit_on_error, fit_to_batch, load_model, load_policy,
                      log_metrics, log_samples, make_optimizer, parse_args, positive, prepare_output_dir,
                      prompt_length_check, reference_model, require, resume_state, save_checkpoint, save_pretrained,
                      start_run, task_data, unused)


@dataclass
class Args(SamplingArgs):
    group_size: int = 8
    """G: completions per prompt"""
    clip_eps_low: float = 3e-4
    """sequence ratio clipped below at 1 - clip_eps_low"""
    clip_eps_high: float = 4e-4
    """sequence ratio clipped above at 1 + clip_eps_high"""
    beta: float = 0.0
    """KL coefficient; 0 (the GSPO paper's choice) skips the reference model entirely"""
    num_iterations: int = 1
    """mu: passes over each sampled batch"""
    mini_batch_size: int | None = None
    """completions per optimiser step; None: a quarter of the batch, four off-policy updates per sampled batch"""
    token_level: bool = False
    """GSPO-token: the per-token form of the ratio (same value; lets per-token advantages through)"""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """divide advantages by the group's reward std, the whole batch's, or nothing (Dr. GRPO)"""
    mask_truncated: bool = False
    """leave completions that hit max_new_tokens without EOS out of the loss"""
    format_reward: float = 0.0
    """added to the reward when the completion is nothing but a number"""


def check_flags(args: Args) -> None:
    """GSPO's flags: their ranges, and batch sizes that nest (batch, mini-batch, micro-batch)."""
    check_args(args, group_size=at_least(1), clip_eps_low=between(0, 1, lo_open=True), clip_eps_high=positive,
               beta=at_least(0), num_iterations=at_least(1), mini_batch_size=at_least(1))
    G, n_batch = args.group_size, args.batch_size * args.group_size
    fit_to_batch(args, "micro_batch_size", n_batch)
    mini_batch_size = args.mini_batch_size or max(args.micro_batch_size, n_batch // 4)
    require(G >= 2, f"--group-size {G}: must be >= 2 (a group of one is its own baseline: A = 0)")
    require(n_batch % mini_batch_size == 0 and mini_batch_size % args.micro_batch_size == 0,
            f"batch_size * group_size ({n_batch}) must be a multiple of --mini-batch-size ({mini_batch_size}), "
            f"which must be a multiple of --micro-batch-size ({args.micro_batch_size})")
    unused(args, "clip_eps_low clip_eps_high", args.num_iterations > 1 or mini_batch_size < n_batch,
           "with one update per sampled batch (--num-iterations 1, one mini-batch): the ratio is 1, nothing is clipped")


# ---- the math: one function per equation --------------------------------------------------------------------------

def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4):
    """[GRPO-ADV] A_i = (r_i - mean_group) / (std + eps); rewards (B*G,) with each group's G samples adjacent.
    std is the population std, so a group of one, or of equal rewards, gets A = 0 (not NaN). scale='none' keeps
    r_i - mean only [DR-GRPO]."""
    r = rewards.view(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (r.std(dim=1, keepdim=True, correction=0) + eps)
    elif scale == "batch":
        centred = centred / (rewards.std(correction=0) + eps)
    return centred.view(-1)


def zero_std_fraction(rewards: torch.Tensor, group_size: int) -> float:
    """[ZERO-STD] fraction of groups whose rewards are all equal: their advantages are 0, they teach nothing."""
    r = rewards.view(-1, group_size)
    return (r == r[:, :1]).all(dim=1).float().mean().item()


def sequence_ratio(logprobs, old_logprobs, mask) -> torch.Tensor:
    """[GSPO-RATIO] s_i = exp of the mean log-ratio over the completion's own tokens, (B,); padding never counts."""
    log_ratio = ((logprobs - old_logprobs) * mask).sum(1) / mask.sum(1).clamp(min=1)
    return torch.exp(log_ratio)


def token_level_ratio(logprobs, old_logprobs, mask) -> torch.Tensor:
    """[GSPO-TOKEN] s_it = sg[s_i] * pi_theta(o_it) / sg[pi_theta(o_it)], (B, T): every value equals s_i, the gradient
    flows through each token's own log-prob."""
    s_i = sequence_ratio(logprobs, old_logprobs, mask).detach()
    return s_i[:, None] * torch.exp(logprobs - logprobs.detach())


def clipped_objective_loss(ratio, advantages, clip_eps_low: float, clip_eps_high: float) -> torch.Tensor:
    """[PPO-CLIP] on the sequence ratio: -min(s A, clip(s, 1-eps_low, 1+eps_high) A)."""
    clipped = torch.clamp(ratio, 1 - clip_eps_low, 1 + clip_eps_high)
    return -torch.min(ratio * advantages, clipped * advantages)


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """[KL-K3] pi_ref/pi_theta - log(pi_ref/pi_theta) - 1 per token: >= 0, unbiased for KL(pi_theta || pi_ref)
    when the tokens come from pi_theta."""
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio  # = exp(x) - x - 1, without the cancellation that goes below 0


def sequence_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, clip_eps_low: float,
                  clip_eps_high: float, beta: float = 0.0, token_level: bool = False):
    """Per-sequence loss (B,) and ratio: the clipped objective on s_i (or s_it averaged over the completion's
    tokens, token_level), plus beta * the completion's mean [KL-K3] if ref_logprobs is given."""
    if token_level:
        ratio = token_level_ratio(logprobs, old_logprobs, mask)  # (B, T)
        per_token = clipped_objective_loss(ratio, advantages[:, None], clip_eps_low, clip_eps_high)
        loss = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)
        ratio = ratio[:, 0]
    else:
        ratio = sequence_ratio(logprobs, old_logprobs, mask)  # (B,)
        loss = clipped_objective_loss(ratio, advantages, clip_eps_low, clip_eps_high)
    if ref_logprobs is not None:
        loss = loss + beta * (kl_k3(logprobs, ref_logprobs) * mask).sum(1) / mask.sum(1).clamp(min=1)
    return loss * (mask.sum(1) > 0), ratio  # a completion masked out entirely (--mask-truncated) adds nothing


def reward(completion: str, correct: bool, format_reward: float = 0.0) -> float:
    """What is rewarded: 1 for a right answer (the verifier's verdict, `is_correct`), plus format_reward if the
    completion is nothing but one number, as the prompt asks."""
    bare_number = parse_number(completion) is not None and completion.strip().lstrip("-").replace(",", "").isdigit()
    return float(correct) + format_reward * bare_number


# ---- training ------------------------------------------------------------------------------------------------------

def main(args: Args) -> dict:
    checkpoint, device, dtype = start_run(args, "gspo", check_flags,
                                          ("batch_size", "mini_batch_size", "micro_batch_size"))
    G, n_batch = args.group_size, args.batch_size * args.group_size
    mini_batch_size = args.mini_batch_size or max(args.micro_batch_size, n_batch // 4)  # default: 4 updates a batch
    # pi_theta (trained); pi_ref, the frozen starting model (only if beta > 0; LoRA: pi_theta with its adapters off)
    model, tokenizer = load_policy(args, checkpoint, device)
    ref_model = (load_model(args.model, device)[0].eval().requires_grad_(False)
                 if args.beta > 0 and not args.lora_rank else None)
    too_long = prompt_length_check(tokenizer, args.max_prompt_length, args.truncate_prompts)
    problems, eval_set = task_data(args, too_long)
    output_dir = prepare_output_dir(args, checkpoint)  # the first write: every check has passed
    model, ref_model = (distribute(m, args.fsdp, dtype) if m is not None else None
                        for m in (model, ref_model))  # torchrun: replicated or FSDP2
    optimizer, scheduler = make_optimizer(model, args)
    describe_run("gspo", args, model, device, dtype, f"{args.batch_size} prompts x {G} completions")
    start_step, _ = resume_state(checkpoint, model, optimizer, scheduler)
    problems = itertools.islice(problems, start_step * args.batch_size, None)  # the stream is the seed's
    updates_per_batch = args.num_iterations * (n_batch // mini_batch_size)  # > 1: pi_old needs a pass of its own
    micro_batch_size = args.micro_batch_size // world_size()  # this rank's share of each global size

    run_eval = functools.partial(evaluate, model, tokenizer, eval_set, args.max_new_tokens,  # held-out, greedy
                                 args.generation_batch_size, device, dtype, args.max_prompt_length)
    progress = Steps(start_step, args.max_steps, "gspo", args.eval_every, args.save_every)  # Ctrl-C: save, stop
    metrics: dict = {}
    if eval_set and args.eval_every and start_step == 0:
        metrics = {"step": 0, "eval_accuracy": run_eval()}
        progress.write(log_metrics(output_dir, metrics, ("eval_accuracy",)))
    for step in progress:
        # ---- 1. sample G completions per prompt from pi_old -------------------------------------------------------
        t0 = time.time()
        batch = share([next(problems) for _ in range(args.batch_size)])  # this rank's prompts (whole groups)
        n_local = len(batch) * G
        mine = slice(rank() * n_local, (rank() + 1) * n_local)  # its rows of the global batch
        prompt_ids, prompt_mask = encode_prompts(tokenizer, [p["prompt"] for p in batch for _ in range(G)], device,
                                                 args.max_prompt_length)
        with autocast(device, dtype):
            completion_ids, completion_mask, truncated = generate(
                model, tokenizer, prompt_ids, prompt_mask, args.max_new_tokens, args.temperature, args.top_p,
                batch_size=args.generation_batch_size)
        completions = decode(tokenizer, completion_ids, completion_mask)
        sequences = (prompt_ids, prompt_mask, completion_ids, completion_mask)  # (B*G, P) and (B*G, C)
        micro_batches = torch.arange(n_local, device=device).split(micro_batch_size)
        t_sample = time.time() - t0

        # ---- 2. score: the verifier -------------------------------------------------------------------------------
        answers = [p["answer"] for p in batch for _ in range(G)]
        correct = torch.tensor([is_correct(c, a) for c, a in zip(completions, answers)], dtype=torch.float)
        rewards = torch.tensor([reward(c, bool(ok), args.format_reward) for c, ok in zip(completions, correct)])
        rewards, correct = gather(rewards), gather(correct)  # the global batch's: groups, batch std, metrics

        # ---- 3. group-relative advantages [GRPO-ADV], [ZERO-STD] --------------------------------------------------
        advantages = group_advantages(rewards, G, args.scale_rewards)[mine].to(device)  # one A_i per sequence
        loss_mask = completion_mask * ~truncated[:, None] if args.mask_truncated else completion_mask

        # ---- 4. log-probs under pi_old and pi_ref, once per batch, no grad ----------------------------------------
        with torch.no_grad(), autocast(device, dtype):
            old_logprobs = (torch.cat([logprobs_of(model, sequences, mb, args.temperature)[0]
                                       for mb in micro_batches]) if updates_per_batch > 1 else None)
            with reference_model(model, ref_model) as ref:  # pi_ref (LoRA: the adapters off)
                ref_logprobs = (torch.cat([logprobs_of(ref, sequences, mb, args.temperature)[0]
                                           for mb in micro_batches]) if args.beta > 0 else None)

        # ---- 5. optimise -J: num_iterations passes, one optimiser step per mini-batch [GSPO-RATIO] [PPO-CLIP] -----
        t1 = time.time()
        model.train()
        stats = {k: [] for k in ("loss", "kl_k3", "clip_frac_low", "clip_frac_high", "entropy", "grad_norm")}
        for _ in range(args.num_iterations):
            for mini in shuffled_groups(n_local, G, device).split(mini_batch_size // world_size()):
                n_seq, n_tok, mini_loss = mini_batch_size, int(all_reduce(loss_mask[mini].sum())), 0.0  # global
                if n_tok == 0:  # every completion masked out (--mask-truncated): nothing to learn, and no step
                    continue  # (AdamW's momentum alone would still move the weights)
                for mb in mini.split(micro_batch_size):
                    mask, A = loss_mask[mb], advantages[mb]  # one A_i per sequence
                    with autocast(device, dtype):
                        logprobs, entropy = logprobs_of(model, sequences, mb, args.temperature)
                    old = old_logprobs[mb] if old_logprobs is not None else logprobs.detach()  # pi_old = pi_theta
                    ref = ref_logprobs[mb] if ref_logprobs is not None else None
                    per_sequence, ratio = sequence_loss(logprobs, old, ref, A, mask, args.clip_eps_low,
                                                        args.clip_eps_high, args.beta, args.token_level)
                    loss = per_sequence.sum() / n_seq  # (1/G) sum_i over the mini-batch's groups
                    loss.backward()
                    mini_loss += loss.item()
                    if ref is not None:
                        stats["kl_k3"].append(masked_mean(kl_k3(logprobs.detach(), ref), mask).item())
                    stats["clip_frac_low"].append(((ratio < 1 - args.clip_eps_low) & (A < 0)).float().mean().item())
                    stats["clip_frac_high"].append(((ratio > 1 + args.clip_eps_high) & (A > 0)).float().mean().item())
                    stats["entropy"].append(masked_mean(entropy.detach(), mask).item())
                all_reduce_gradients(model)  # the mini-batch's gradient: the sum of the ranks' (one all-reduce)
                grad_norm, mini_loss = clip_grad_norm(model, args.max_grad_norm), all_reduce(mini_loss)
                check_finite(step + 1, loss=mini_loss, grad_norm=grad_norm)  # before the update, never after
                stats["grad_norm"].append(grad_norm)
                stats["loss"].append(mini_loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]  # the rate this step used
        scheduler.step()
        t_train = max(time.time() - t1, 1e-6)  # every mini-batch may have been skipped

        # ---- 6. log, evaluate, save -------------------------------------------------------------------------------
        metrics = metrics_row(step + 1, stats, rewards, correct, zero_std_fraction(rewards, G), None, completion_mask,
                              truncated, prompt_mask, lr, t0, t_sample, t_train, args.num_iterations)
        if eval_set and progress.eval_due(step + 1):
            metrics["eval_accuracy"] = run_eval()
        log_samples(output_dir, step + 1, [{"prompt": p["prompt"], "completion": c, "answer": p["answer"],
                                            "reward": r} for p, c, r in zip(batch[:4], completions[::G],
                                                                            rewards[mine][::G].tolist())],
                    show="eval_accuracy" in metrics)  # a few samples, one per group
        progress.write(log_metrics(output_dir, metrics, ("reward_mean", "accuracy", "zero_std_frac", "kl_k3",
                                                         "grad_norm", "completion_len", "eval_accuracy")))
        if progress.checkpoint_due(step + 1):  # every --save-every steps, and on Ctrl-C
            save_checkpoint(step + 1, model, tokenizer, optimizer, scheduler, output_dir)
            progress.stop_if_requested(step + 1, output_dir)
    save_pretrained(model, tokenizer, output_dir / "final", merge_lora=args.merge_lora)
    return metrics


def metrics_row(step: int, stats: dict, rewards, correct, zero_std: float, step_accuracy: float | None,
                completion_mask, truncated, prompt_mask, lr: float, t0: float, t_sample: float, t_train: float,
                num_iterations: int) -> dict:
    """The step's line of metrics.jsonl: losses and statistics of every rank, rewards of the global batch."""
    lengths, truncated = gather(completion_mask.sum(1).float()), gather(truncated)
    n_tokens = int(lengths.sum())
    stats = {k: fmean(v) if k in ("loss", "grad_norm") else all_reduce(fmean(v)) / world_size()
             for k, v in stats.items() if v}  # loss, grad_norm: global already; the rest: mean over ranks
    return {"step": step, **stats,
            "reward_mean": rewards.mean().item(), "reward_std": rewards.std(correction=0).item(),
            "accuracy": correct.mean().item(), "zero_std_frac": zero_std, "lr": lr,
            "completion_len": lengths.mean().item(), "completion_len_max": int(lengths.max()),
            "truncated_frac": truncated.float().mean().item(), "sample_tokens_per_s": int(n_tokens / t_sample),
            "train_tokens_per_s": int(num_iterations * (all_reduce(prompt_mask.sum()) + n_tokens) / t_train),
            "step_time": time.time() - t0, **({"step_accuracy": step_accuracy} if step_accuracy is not None else {})}


def logprobs_of(model, sequences, rows, temperature: float):
    """(log pi(o_t | q, o_<t), entropy) for some rows of (prompt_ids, prompt_mask, completion_ids, completion_mask)."""
    return completion_logprobs(model, *(t[rows] for t in sequences), temperature)


if __name__ == "__main__":
    with exit_on_error():
        main(parse_args(Args, __doc__))
