"""Iterative GRPO (DeepSeekMath's Algorithm 1): GRPO whose reference model and reward model follow the policy.

GRPO as in grpo.py (read it first; this file is grpo.py plus the iteration, and `diff grpo.py grpo_iterative.py`
shows exactly what iteration adds). Every K = --iteration-steps steps an iteration ends [GRPO-ITERATIVE]:

    the reward model (--reward-model, a reward.py final/) trains on the policy's own samples, labelled by the
    verifier (each group's right completions paired with its wrong ones), with a replay of --replay-fraction of the
    earlier iterations' pairs, on the Bradley-Terry loss [BT];
    pi_ref <- pi_theta, so the KL term [KL-K3] restarts from 0 and the policy may keep moving.

Within an iteration, every step is GRPO's:

    A_i     = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps), for every token of o_i            [GRPO-ADV]
    r_it    = pi_theta(o_it | q, o_i,<t) / pi_old(o_it | q, o_i,<t)                               [IS-RATIO]
    J(theta) = E[ (1/G) sum_i (1/|o_i|) sum_t { min(r_it A_i, clip(r_it, 1-eps_low, 1+eps_high) A_i)
                                                - beta D_KL,it } ]                                 [GRPO-OBJ] [PPO-CLIP]

with grpo.py's flags for [DR-GRPO], [ZERO-STD] and process supervision [GRPO-PROCESS] (which resets pi_ref only:
the reward model scores whole completions). Every tag in brackets is defined in docs/equations.md.

Usage: python grpo_iterative.py --reward-model runs/reward-xyz/final --iteration-steps 25
       python grpo_iterative.py --task sum --supervision process --max-new-tokens 64   # pi_ref reset only
"""

from __future__ import annotations

import bisect
import functools
import itertools
import random
import time
from dataclasses import dataclass
from statistics import fmean
from typing import Literal

import torch
import torch.nn.functional as F

from common import (all_reduce, autocast, check_sum_row, completion_logprobs, decode, encode_pairs, encode_prompts,
                    evaluate, forward_pass, gather, gather_objects, generate, is_correct, masked_mean, parse_number,
                    rank, share, shuffled_groups, sum_steps, world_size)
from plumbing import (SamplingArgs, Steps, all_reduce_gradients, at_least, between, check_args, check_finite,
                      clip_grad_norm, describe_run, distribute, exit_on_error, fit_to_batch, load_model,
                      load_optimizer_state, load_policy, load_reward_model, log_metrics, log_samples, make_optimizer,
                      optimizer_state, parse_args, positive, prepare_output_dir, prompt_length_check, reference_model,
                      require, resume_state, save_checkpoint, save_pretrained, start_run, task_data, unused)


@dataclass
class Args(SamplingArgs):
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
    """completions per optimiser step; None: the whole batch, batch_size * group_size"""
    loss_agg: Literal["grpo", "token", "constant"] = "grpo"
    """grpo: 1/|o_i| per completion, then the mean over completions; token: mean over all tokens (DAPO);
    constant: sum over tokens / (completions * max_new_tokens) (Dr. GRPO)"""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """divide advantages by the group's reward std, the whole batch's, or nothing (Dr. GRPO)"""
    mask_truncated: bool = False
    """leave completions that hit max_new_tokens without EOS out of the loss"""
    format_reward: float = 0.0
    """added to the reward when the completion is nothing but a number"""
    reward_model: str | None = None
    """a sequence-classification reward model (reward.py's final/) scoring prompt+completion; None: the verifier"""
    supervision: Literal["outcome", "process"] = "outcome"
    """outcome: one reward per completion [GRPO-ADV]; process: one per step (a line of the sum task, checked), each
    token credited with the steps that end at or after it [GRPO-PROCESS]"""
    iteration_steps: int = 25
    """K: steps per iteration; at the end of each, pi_ref <- pi_theta, and a --reward-model trains on the policy's
    samples labelled by the verifier [GRPO-ITERATIVE]"""
    rm_steps: int = 8
    """reward-model optimiser steps per iteration (one pass over its new and replayed pairs)"""
    rm_learning_rate: float = 1e-5
    """the reward model's learning rate (AdamW, constant)"""
    replay_fraction: float = 0.1
    """fraction of the earlier iterations' pairs replayed with the new ones (DeepSeekMath: 10%)"""
    task: Literal["arithmetic", "sum"] = "arithmetic"
    """built-in task: arithmetic (`Compute 23 + 45.`), or sum (3 or 4 numbers, one partial sum per line: the steps
    that --supervision process checks; give it room, --max-new-tokens 64)"""


def check_flags(args: Args) -> None:
    """Iterative GRPO's flags: their ranges, and the combinations that mean something."""
    check_args(args, group_size=at_least(1), clip_eps_low=between(0, 1, lo_open=True), clip_eps_high=positive,
               beta=at_least(0), num_iterations=at_least(1), mini_batch_size=at_least(1), iteration_steps=at_least(1),
               rm_steps=at_least(1), rm_learning_rate=positive, replay_fraction=between(0, 1))
    G, n_batch = args.group_size, args.batch_size * args.group_size
    mini_batch_size = args.mini_batch_size or n_batch
    fit_to_batch(args, "micro_batch_size", mini_batch_size)
    require(G >= 2, f"--group-size {G}: must be >= 2 (a group of one is its own baseline: A = 0)")
    require(n_batch % mini_batch_size == 0 and mini_batch_size % args.micro_batch_size == 0,
            f"batch_size * group_size ({n_batch}) must be a multiple of --mini-batch-size ({mini_batch_size}), "
            f"which must be a multiple of --micro-batch-size ({args.micro_batch_size})")
    require(args.supervision in ("outcome", "process"), f"--supervision {args.supervision}: expected outcome/process")
    require(args.supervision == "outcome" or args.data or args.task == "sum",
            "--supervision process checks steps: use --task sum, or --data rows with `numbers` (the terms of a sum)")
    require(args.task == "arithmetic" or args.ops == "+", f"--task sum adds numbers: --ops {args.ops} does not apply")
    require(args.supervision == "outcome" or not args.reward_model,
            "--reward-model scores whole completions: it is for --supervision outcome")
    unused(args, "task", args.data is None, "with --data (it picks a built-in task)")
    unused(args, "format_reward", not args.reward_model, "with --reward-model (it scores instead of the verifier)")
    unused(args, "clip_eps_low clip_eps_high", args.num_iterations > 1 or mini_batch_size < n_batch,
           "with one update per sampled batch (--num-iterations 1, one mini-batch): the ratio is 1, nothing is clipped")
    unused(args, "rm_steps rm_learning_rate replay_fraction", bool(args.reward_model), "without --reward-model")
    require(args.beta > 0 or args.reward_model, "--iteration-steps resets pi_ref and retrains --reward-model: with "
            "--beta 0 and no reward model it would do nothing")
    require(not (args.fsdp and args.reward_model), "--fsdp with --reward-model: the reward model's training is not "
            "sharded; leave out --fsdp")
    require(not (args.lora_rank and args.beta > 0), "--iteration-steps with --lora-rank: pi_ref <- pi_theta needs "
            "pi_ref as a copy of its own; leave out --lora-rank, or use --beta 0")


# ---- the math: one function per equation -----------------------------------------------------------------------------

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


def process_advantages(step_rewards: list[list[float]], step_end_tokens: list[list[int]], group_size: int,
                       mask: torch.Tensor, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """[GRPO-PROCESS] Per-token advantages (B*G, T) from step rewards: every step reward normalised by the mean and
    population std of all the steps of its group's G completions (eps and --scale-rewards as in group_advantages),
    then A_it = the sum of the normalised rewards of the steps of o_i that end at token t or after it; 0 after the
    last step. A completion with no step counts as one step with reward 0 ending at its last token: it stays in the
    baseline, and all of its tokens share the blame."""
    rewards, ends = zip(*[(r, e) if r else ([0.0], [max(n - 1, 0)])
                          for r, e, n in zip(step_rewards, step_end_tokens, mask.sum(1).tolist())])
    row = torch.tensor([i for i, r in enumerate(rewards) for _ in r])
    flat = torch.tensor([x for r in rewards for x in r], dtype=torch.float)
    group, n_groups = row // group_size, len(rewards) // group_size
    count = torch.zeros(n_groups).index_add_(0, group, torch.ones_like(flat))
    centred = flat - (torch.zeros(n_groups).index_add_(0, group, flat) / count)[group]
    if scale == "group":
        std = (torch.zeros(n_groups).index_add_(0, group, centred ** 2) / count).sqrt()  # population std
        centred = centred / (std[group] + eps)
    elif scale == "batch":
        centred = centred / (flat.std(correction=0) + eps)
    at_step_ends = torch.zeros(mask.shape).index_put_((row, torch.tensor([t for e in ends for t in e])), centred,
                                                      accumulate=True)
    return at_step_ends.flip(1).cumsum(1).flip(1).to(mask.device) * mask  # sum over the steps ending at or after t


def step_end_tokens(tokenizer, ids: list[int], char_ends: list[int]) -> list[int]:
    """[GRPO-PROCESS] index(j): for each step, the position of the sampled token that holds its last character
    (char_ends: the index just past it in the decoded completion). Found by decoding prefixes of the sampled ids
    themselves, not by tokenizing the text again (a sample need not be the tokenizer's own tokenization of its text);
    a token that holds the end of one step and the start of the next ends the first."""
    prefix_length = lambda k: len(tokenizer.decode(ids[:k + 1], skip_special_tokens=True))  # noqa: E731
    return [min(bisect.bisect_left(range(len(ids)), end, key=prefix_length), len(ids) - 1) for end in char_ends]


def process_supervision(tokenizer, completions: list[str], numbers: list[list[int]], completion_ids, completion_mask,
                        group_size: int, scale: str, mine: slice):
    """[GRPO-PROCESS] for this rank's completions (G per entry of `numbers`): every step checked (sum_steps) and
    located at its last token, the global batch's step rewards normalised (process_advantages). Returns this rank's
    advantages (B*G, C), the global step accuracy and the fraction of groups whose step rewards are all equal."""
    steps = [sum_steps(c, n) for c, n in zip(completions, (n for n in numbers for _ in range(group_size)))]
    step_rewards = sum(gather_objects([[float(right) for right, _ in s] for s in steps]), [])  # global
    ends = sum(gather_objects([step_end_tokens(tokenizer, ids[m.bool()].tolist(), [end for _, end in s])
                               for ids, m, s in zip(completion_ids, completion_mask, steps)]), [])
    advantages = process_advantages(step_rewards, ends, group_size, gather(completion_mask),
                                    scale)[mine, :completion_mask.shape[1]]
    filled = [r or [0.0] for r in step_rewards]  # no step: one step with reward 0, as process_advantages has it
    zero_std = fmean(len(set(sum(filled[g:g + group_size], []))) == 1 for g in range(0, len(filled), group_size))
    return advantages, sum(map(sum, filled)) / sum(map(len, filled)), zero_std


def clipped_policy_loss(logprobs, old_logprobs, advantages, clip_eps_low: float, clip_eps_high: float):
    """Per token -min(r A, clip(r, 1-eps_low, 1+eps_high) A) with r = pi_theta / pi_old; advantages (B, 1), broadcast
    over the tokens, or (B, T) [GRPO-PROCESS]. Returns the loss (B, T) and the ratio (for clip statistics)."""
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


# ---- a learned reward model instead of the verifier (--reward-model; the same function in ppo.py) -------------------

def reward_model_scores(reward_model, prompt_ids, prompt_mask, completion_ids, completion_mask) -> torch.Tensor:
    """r(x, y): a sequence-classification model's scalar head on the hidden state of the completion's last real
    token (its EOS, found from the mask, not from pad ids), (B,)."""
    hidden = forward_pass(reward_model.base_model, prompt_ids, prompt_mask, completion_ids,
                          completion_mask).last_hidden_state
    last = prompt_ids.shape[1] + completion_mask.sum(1) - 1
    return reward_model.score(hidden[torch.arange(len(hidden)), last]).squeeze(-1).float()


# ---- iterative GRPO: the reward model keeps learning from the policy's samples [GRPO-ITERATIVE] ----------------------

def verifier_pairs(prompts: list, completions: list[str], correct: list[bool], group_size: int) -> list[dict]:
    """New reward-model data: in each group, its right completions paired with its wrong ones, as the verifier labels
    them (reward.py's prompt/chosen/rejected rows)."""
    groups = [list(zip(completions[g:g + group_size], correct[g:g + group_size]))
              for g in range(0, len(completions), group_size)]
    return [{"prompt": prompt, "chosen": right, "rejected": wrong} for prompt, group in zip(prompts, groups)
            for right, wrong in zip([c for c, ok in group if ok], [c for c, ok in group if not ok])]


def replay_mix(new_pairs: list, history: list, fraction: float, rng: random.Random) -> tuple[list, list]:
    """One iteration's reward-model data: the new pairs and a random `fraction` of the earlier ones (DeepSeekMath
    replays 10% of the historical data), shuffled; and the history, now holding the new pairs too."""
    mix = new_pairs + rng.sample(history, round(fraction * len(history)))
    return rng.sample(mix, len(mix)), history + new_pairs


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """[BT] -log sigmoid(r(x, y+) - r(x, y-)) per pair."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards)


def train_reward_model(reward_model, optimizer, tokenizer, pairs: list[dict], args, device, dtype, step: int) -> dict:
    """--rm-steps optimiser steps of the Bradley-Terry loss [BT], one pass over the (shuffled) pairs, each step the
    mean over its part of them, in micro-batches; under torchrun each rank takes every W-th pair of a step's part."""
    reward_model.train()
    losses, wins = [], 0
    for part in (pairs[i::args.rm_steps] for i in range(min(args.rm_steps, len(pairs)))):
        loss_sum, mine = 0.0, part[rank()::world_size()]
        for i in range(0, len(mine), args.micro_batch_size):
            with autocast(device, dtype):
                sequences = encode_pairs(tokenizer, mine[i:i + args.micro_batch_size], device, args.max_prompt_length)
                chosen, rejected = reward_model_scores(reward_model, *sequences).chunk(2)
            loss = bradley_terry_loss(chosen, rejected).sum() / len(part)
            loss.backward()
            loss_sum += loss.item()
            wins += (chosen > rejected).sum().item()
        all_reduce_gradients(reward_model)
        grad_norm, loss_sum = clip_grad_norm(reward_model, args.max_grad_norm), all_reduce(loss_sum)
        check_finite(step, rm_loss=loss_sum, rm_grad_norm=grad_norm)  # before the update, never after
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss_sum)
    reward_model.eval()
    return {"rm_loss": fmean(losses), "rm_pair_accuracy": all_reduce(wins) / len(pairs), "rm_pairs": len(pairs)} \
        if pairs else {}


# ---- training --------------------------------------------------------------------------------------------------------

def main(args: Args) -> dict:
    checkpoint, device, dtype = start_run(args, "grpo_iterative", check_flags,
                                          ("batch_size", "mini_batch_size", "micro_batch_size"))
    G, n_batch = args.group_size, args.batch_size * args.group_size
    mini_batch_size = args.mini_batch_size or n_batch
    def saved(name: str, given: str) -> str:  # pi_ref and the reward model move: a resumed run loads its own
        return str(checkpoint / name) if checkpoint and (checkpoint / name).is_dir() else given

    # pi_theta (trained); pi_ref, the last iteration's policy (if beta > 0); a reward model
    model, tokenizer = load_policy(args, checkpoint, device)
    ref_model = (load_model(saved("ref_model", args.model), device)[0].eval().requires_grad_(False)
                 if args.beta > 0 else None)
    reward_model = (load_reward_model(saved("reward_model", args.reward_model), tokenizer, device)
                    if args.reward_model else None)
    too_long = prompt_length_check(tokenizer, args.max_prompt_length, args.truncate_prompts)
    checks = (too_long, check_sum_row) if args.supervision == "process" else too_long  # rows: steps checkable
    problems, eval_set = task_data(args, checks, eval_checks=too_long)
    output_dir = prepare_output_dir(args, checkpoint)  # the first write: every check has passed
    model, ref_model, reward_model = (distribute(m, args.fsdp, dtype) if m is not None else None
                                      for m in (model, ref_model, reward_model))  # torchrun: replicated or FSDP2
    optimizer, scheduler = make_optimizer(model, args)
    start_step, state = resume_state(checkpoint, model, optimizer, scheduler)
    rm_optimizer = (torch.optim.AdamW(reward_model.requires_grad_(True).parameters(), lr=args.rm_learning_rate,
                                      weight_decay=0.0) if reward_model is not None else None)
    if rm_optimizer is not None and state:
        load_optimizer_state(reward_model, rm_optimizer, state["rm_optimizer"])
    replay, new_pairs = state.get("replay", []), state.get("new_pairs", [])  # the reward model's pairs, by iteration
    describe_run("grpo_iterative", args, model, device, dtype, f"{args.batch_size} prompts x {G} completions")
    problems = itertools.islice(problems, start_step * args.batch_size, None)  # the stream is the seed's
    updates_per_batch = args.num_iterations * (n_batch // mini_batch_size)  # > 1: pi_old needs a pass of its own
    micro_batch_size = args.micro_batch_size // world_size()  # this rank's share of each global size

    run_eval = functools.partial(evaluate, model, tokenizer, eval_set, args.max_new_tokens,  # held-out, greedy
                                 args.generation_batch_size, device, dtype, args.max_prompt_length)
    progress = Steps(start_step, args.max_steps, "grpo_iterative", args.eval_every, args.save_every)  # Ctrl-C: saves
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

        # ---- 2. score: the verifier, or a reward model (the verifier still measures accuracy) ----------------------
        answers = [p["answer"] for p in batch for _ in range(G)]
        correct = torch.tensor([is_correct(c, a) for c, a in zip(completions, answers)], dtype=torch.float)
        if reward_model is None:
            rewards = torch.tensor([reward(c, bool(ok), args.format_reward) for c, ok in zip(completions, correct)])
        else:
            with torch.no_grad(), autocast(device, dtype):
                rewards = torch.cat([reward_model_scores(reward_model, *(t[mb] for t in sequences))
                                     for mb in micro_batches]).cpu()
        if reward_model is not None:  # [GRPO-ITERATIVE]: the verifier labels the policy's samples for the reward model
            new_pairs += sum(gather_objects(verifier_pairs([p["prompt"] for p in batch], completions,
                                                           correct.bool().tolist(), G)), [])  # every rank's
        rewards, correct = gather(rewards), gather(correct)  # the global batch's: groups, batch std, metrics

        # ---- 3. group-relative advantages [GRPO-ADV], [ZERO-STD]; per step with process supervision [GRPO-PROCESS]
        loss_mask = completion_mask * ~truncated[:, None] if args.mask_truncated else completion_mask
        if args.supervision == "outcome":
            advantages = group_advantages(rewards, G, args.scale_rewards)[mine].to(device)[:, None]  # A_i, all tokens
            zero_std, step_accuracy = zero_std_fraction(rewards, G), None
        else:  # a reward per step: each line of the sum checked, and the token that ends it
            advantages, step_accuracy, zero_std = process_supervision(
                tokenizer, completions, [p["numbers"] for p in batch], completion_ids, completion_mask, G,
                args.scale_rewards, mine)

        # ---- 4. log-probs under pi_old and pi_ref, once per batch, no grad ----------------------------------------
        with torch.no_grad(), autocast(device, dtype):
            old_logprobs = (torch.cat([logprobs_of(model, sequences, mb, args.temperature)[0]
                                       for mb in micro_batches]) if updates_per_batch > 1 else None)
            with reference_model(model, ref_model) as ref:  # pi_ref (LoRA: the adapters off)
                ref_logprobs = (torch.cat([logprobs_of(ref, sequences, mb, args.temperature)[0]
                                           for mb in micro_batches]) if args.beta > 0 else None)

        # ---- 5. optimise -J: num_iterations passes, one optimiser step per mini-batch [GRPO-OBJ] ------------------
        t1 = time.time()
        model.train()
        stats = {k: [] for k in ("loss", "kl_k3", "clip_frac_low", "clip_frac_high", "entropy", "grad_norm")}
        for _ in range(args.num_iterations):
            for mini in shuffled_groups(n_local, G, device).split(mini_batch_size // world_size()):
                n_seq, n_tok, mini_loss = mini_batch_size, int(all_reduce(loss_mask[mini].sum())), 0.0  # global
                if n_tok == 0:  # every completion masked out (--mask-truncated): nothing to learn, and no step
                    continue  # (AdamW's momentum alone would still move the weights)
                for mb in mini.split(micro_batch_size):
                    mask, A = loss_mask[mb], advantages[mb]  # (mb, 1) for outcome, (mb, T) for process
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

        # ---- 6. an iteration ends: the reward model trains on, pi_ref <- pi_theta [GRPO-ITERATIVE] ----------------
        iteration = {"iteration": step // args.iteration_steps}
        if (step + 1) % args.iteration_steps == 0 and reward_model is not None:
            mix, replay = replay_mix(new_pairs, replay, args.replay_fraction, random.Random(args.seed + step))
            iteration |= train_reward_model(reward_model, rm_optimizer, tokenizer, mix, args, device, dtype, step + 1)
            iteration["rm_new_pairs"], new_pairs = len(new_pairs), []
        if (step + 1) % args.iteration_steps == 0 and ref_model is not None:
            ref_model.load_state_dict(model.state_dict())  # the KL to pi_ref starts again from 0

        # ---- 7. log, evaluate, save -------------------------------------------------------------------------------
        metrics = metrics_row(step + 1, stats, rewards, correct, zero_std, step_accuracy, completion_mask, truncated,
                              prompt_mask, lr, t0, t_sample, t_train, args.num_iterations) | iteration
        if eval_set and progress.eval_due(step + 1):
            metrics["eval_accuracy"] = run_eval()
        log_samples(output_dir, step + 1, [{"prompt": p["prompt"], "completion": c, "answer": p["answer"],
                                            "reward": r} for p, c, r in zip(batch[:4], completions[::G],
                                                                            rewards[mine][::G].tolist())],
                    show="eval_accuracy" in metrics)  # a few samples, one per group
        progress.write(log_metrics(output_dir, metrics, ("reward_mean", "accuracy", "step_accuracy", "zero_std_frac",
                                                         "kl_k3", "grad_norm", "completion_len", "eval_accuracy")))
        if progress.checkpoint_due(step + 1):  # every --save-every steps, and on Ctrl-C
            rm_state = dict(rm_optimizer=optimizer_state(reward_model, rm_optimizer)) if reward_model else {}
            save_checkpoint(step + 1, model, tokenizer, optimizer, scheduler, output_dir,
                            dict(rm_state, replay=replay, new_pairs=new_pairs),
                            {name: m for name, m in (("ref_model", ref_model), ("reward_model", reward_model)) if m})
            progress.stop_if_requested(step + 1, output_dir)
    save_pretrained(model, tokenizer, output_dir / "final", extra={"reward_model": reward_model} if reward_model
                    else None, merge_lora=args.merge_lora)
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
