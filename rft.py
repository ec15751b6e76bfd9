"""RFT: rejection-sampling fine-tuning, offline (samples of the starting model, drawn once) or online (--online).

Sample k completions per training prompt, keep those the verifier marks right, and fine-tune on them with SFT's
loss. RFT samples once, from the starting model pi_sft, before any update, and keeps each prompt's distinct right
texts; online RFT samples from the current policy pi_theta at every step and keeps its right samples as they are:

    D      = { (q, o) : o ~ pi_sft(.|q), k samples per q, I(o) = 1 }, each distinct o once per q            [RFT]
    D_t    = { (q, o) : q in step t's prompts, o ~ pi_theta(.|q), k samples per q, I(o) = 1 }       [ONLINE-RFT]
    L      = -(1/N) sum_{(q,o) in the batch} sum_t log pi_theta(o_t | q, o_<t)                        [SFT-LOSS]

with I(o) the verifier's verdict (1 right, 0 wrong) and N the kept completion tokens of the whole batch (as in
sft.py). pi is softmax(logits / T) at the sampling temperature, as in the RL scripts: the distribution the samples
came from. In the unified view [UNIFIED-GRAD] both have the gradient coefficient GC = I(o), on data sampled once
from pi_sft or afresh from pi_theta; online RFT is REINFORCE with 0/1 rewards and no baseline (`reinforce.py
--baseline none`), normalised by N instead of the number of completions. It reinforces every right answer alike and
never pushes a wrong one down, which GRPO's advantage does (DeepSeekMath compares the four in its Figure 5).

Offline, --batch-size counts examples of the kept set, saved to <output-dir>/rft_data.jsonl (which --resume reads
back); online, prompts, with --num-samples completions each. With --lora-rank only LoRA adapters train.

Every tag in brackets is defined, with its derivation and papers, in docs/equations.md.

Usage: python rft.py --model HuggingFaceTB/SmolLM2-135M-Instruct --num-prompts 512 --num-samples 8
       python rft.py --online --batch-size 16 --num-samples 8     # online RFT
       torchrun --nproc-per-node 8 rft.py --fsdp ...   # several GPUs: the same math (README)
"""

from __future__ import annotations

import functools
import itertools
import json
import time
from dataclasses import dataclass

import torch

from common import (RunError, all_reduce, autocast, completion_logprobs, decode, encode_completions, encode_prompts,
                    evaluate, gather, gather_objects, generate, is_correct, is_main, share, share_padded, world_size)
from plumbing import (SamplingArgs, Steps, all_reduce_gradients, at_least, check_args, check_finite, clip_grad_norm,
                      describe_run, distribute, epochs, exit_on_error, fit_to_batch, load_policy, log_metrics,
                      log_samples, make_optimizer, note, parse_args, prepare_output_dir, prompt_length_check,
                      read_jsonl, require, resume_state, save_checkpoint, save_pretrained, start_run, task_data, unused,
                      write_atomic)

DATA_FILE = "rft_data.jsonl"  # offline: the kept samples, in the run directory


@dataclass
class Args(SamplingArgs):
    online: bool = False
    """online RFT [ONLINE-RFT]: sample from the current policy at every step; off: RFT [RFT], sample once from the
    starting model"""
    num_samples: int = 8
    """k: completions sampled per prompt (offline: once per prompt; online: per prompt of every step)"""
    num_prompts: int = 512
    """offline: training prompts to sample from, the first of the training stream (--data: its rows, shuffled, again
    after each epoch)"""


def check_flags(args: Args) -> None:
    """RFT's flags: their ranges; offline, whole micro-batches (as SFT's); --num-prompts only where it applies."""
    check_args(args, num_samples=at_least(1), num_prompts=at_least(1))
    fit_to_batch(args, "micro_batch_size", args.batch_size * (args.num_samples if args.online else 1))
    require(args.online or args.batch_size % args.micro_batch_size == 0,
            f"--batch-size {args.batch_size} must be a multiple of --micro-batch-size {args.micro_batch_size}")
    unused(args, "num_prompts", not args.online, "with --online (every step samples --batch-size new prompts)")


# ---- the math: one function per equation --------------------------------------------------------------------------

def rejection_sample(problems: list[dict], completions: list[str], k: int) -> list[dict]:
    """[RFT] The fine-tuning set: of each prompt's k samples (adjacent in completions), those the verifier marks
    right, I(o) = 1, each distinct text once per prompt (in sampling order; a prompt drawn twice pools its samples)."""
    kept = {}
    for i, problem in enumerate(problems):
        for completion in completions[i * k:(i + 1) * k]:
            if is_correct(completion, problem["answer"]):
                key = (json.dumps(problem["prompt"]), completion)
                kept.setdefault(key, {"prompt": problem["prompt"], "completion": completion})
    return list(kept.values())


def kept_mask(mask: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """[ONLINE-RFT] The completion mask of the kept samples, (B, C): GC = I(o) on every token of sample o, 1 if it is
    right, 0 if not [UNIFIED-GRAD]."""
    return mask * correct[:, None].to(mask.dtype)


def sft_loss(logprobs: torch.Tensor, mask: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[SFT-LOSS] -(1/N) sum_t log pi(y_t | ...) over completion tokens. num_tokens = N counts the tokens of the whole
    optimiser batch, so micro-batch losses add up to the batch mean (not to a mean of micro-batch means)."""
    return -(logprobs * mask).sum() / max(num_tokens, 1)  # every completion holds its EOS: N >= 1, never 0/0


# ---- the offline data ---------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_training_set(model, tokenizer, problems: list[dict], args: Args, device, dtype):
    """[RFT]'s data, once, from the starting model: k samples per prompt, the right and distinct ones kept. Under
    torchrun each rank samples its share of the prompts; gathered, every rank builds the same rows. Also returns a
    few samples, for samples.jsonl."""
    k = args.num_samples
    mine, padded = share_padded(problems)  # FSDP: the same number of generate calls on every rank
    prompt_ids, prompt_mask = encode_prompts(tokenizer, [p["prompt"] for p in padded for _ in range(k)], device,
                                             args.max_prompt_length)
    with autocast(device, dtype):
        ids, mask, _ = generate(model, tokenizer, prompt_ids, prompt_mask, args.max_new_tokens, args.temperature,
                                args.top_p, batch_size=args.generation_batch_size)
    completions = sum(gather_objects(decode(tokenizer, ids, mask)[:len(mine) * k]), [])  # all, in order
    rows = rejection_sample(problems, completions, k)  # the same on every rank
    right = sum(is_correct(c, p["answer"]) for c, p in zip(completions, (p for p in problems for _ in range(k))))
    note(f"RFT data: {right} of the {len(completions)} samples ({len(problems)} prompts x {k}) right, {len(rows)} "
         f"distinct ones kept")
    if not rows:
        raise RunError("no sample of the starting model was right: raise --num-samples, --num-prompts or "
                       "--temperature")
    samples = [{"prompt": p["prompt"], "completion": c, "answer": p["answer"],
                "reward": float(is_correct(c, p["answer"]))} for p, c in zip(problems[:4], completions[::k])]
    return rows, samples


# ---- training ------------------------------------------------------------------------------------------------------

def main(args: Args) -> dict:
    checkpoint, device, dtype = start_run(args, "rft", check_flags)  # flags, resume, torchrun, seeds, dtype
    k = args.num_samples
    model, tokenizer = load_policy(args, checkpoint, device)  # pi_theta; --lora-rank: adapters on frozen weights
    problems, eval_set = task_data(args, prompt_length_check(tokenizer, args.max_prompt_length, args.truncate_prompts))
    model = distribute(model, args.fsdp, dtype)  # torchrun: replicated or FSDP2
    optimizer, scheduler = make_optimizer(model, args)
    describe_run("rft", args, model, device, dtype,
                 f"{args.batch_size} prompts x {k} completions" if args.online else f"{args.batch_size} examples")

    # ---- 0. offline [RFT]: k samples per prompt from the starting model, once; the right, distinct ones kept -------
    rows, samples = None, []
    if not args.online and checkpoint:  # the run's own set (copied along when resuming into a new directory)
        rows = read_jsonl(checkpoint.parent / DATA_FILE, ("prompt", "completion"))
    elif not args.online:  # the model before any update is pi_sft (fresh LoRA adapters are 0)
        rows, samples = sample_training_set(model, tokenizer, list(itertools.islice(problems, args.num_prompts)),
                                            args, device, dtype)
    output_dir = prepare_output_dir(args, checkpoint)  # the first write: every check has passed
    if rows is not None and not checkpoint and is_main():
        write_atomic(output_dir / DATA_FILE, "".join(json.dumps(row) + "\n" for row in rows))
    log_samples(output_dir, 0, samples, show=True)  # what pi_sft says, once
    start_step, _ = resume_state(checkpoint, model, optimizer, scheduler)
    stream = problems if args.online else epochs(rows, args.seed)  # prompts, or examples of the kept set
    stream = itertools.islice(stream, start_step * args.batch_size, None)  # either is a function of the seed
    micro_batch_size = args.micro_batch_size // world_size()  # this rank's share of the global size

    run_eval = functools.partial(evaluate, model, tokenizer, eval_set, args.max_new_tokens,  # held-out, greedy
                                 args.generation_batch_size, device, dtype, args.max_prompt_length)
    progress = Steps(start_step, args.max_steps, "rft", args.eval_every, args.save_every)  # Ctrl-C: save, stop
    metrics: dict = {}
    if eval_set and args.eval_every and start_step == 0:
        metrics = {"step": 0, "eval_accuracy": run_eval(), **({"num_examples": len(rows)} if rows else {})}
        progress.write(log_metrics(output_dir, metrics, ("eval_accuracy", "num_examples")))
    for step in progress:
        # ---- 1. the batch: online, k samples per prompt from pi_theta, scored [ONLINE-RFT]; offline, the set's ------
        t0 = time.time()
        batch = share([next(stream) for _ in range(args.batch_size)])  # this rank's prompts (or examples)
        if args.online:
            prompts = [p for p in batch for _ in range(k)]
            prompt_ids, prompt_mask = encode_prompts(tokenizer, [p["prompt"] for p in prompts], device,
                                                     args.max_prompt_length)
            with autocast(device, dtype):
                completion_ids, mask, _ = generate(
                    model, tokenizer, prompt_ids, prompt_mask, args.max_new_tokens, args.temperature, args.top_p,
                    batch_size=args.generation_batch_size)
            completions = decode(tokenizer, completion_ids, mask)
            correct = torch.tensor([is_correct(c, p["answer"]) for c, p in zip(completions, prompts)],
                                   dtype=torch.float, device=device)  # I(o): the verifier's verdict
        else:
            prompt_ids, prompt_mask = encode_prompts(tokenizer, [r["prompt"] for r in batch], device,
                                                     args.max_prompt_length)
            completion_ids, mask = encode_completions(tokenizer, [r["completion"] for r in batch], device)
            correct = torch.ones(len(batch), device=device)  # every example of the set is right
        t_sample = time.time() - t0

        # ---- 2. the loss [SFT-LOSS] on the kept samples, GC = I(o) [UNIFIED-GRAD]; gradients accumulated ---------
        kept = kept_mask(mask, correct)  # (B, C): 0 on the tokens of a wrong sample
        num_tokens = int(all_reduce(kept.sum()))  # N of [SFT-LOSS], over the whole batch (all ranks)
        model.train()
        loss_sum = 0.0
        for mb in kept_micro_batches(correct, micro_batch_size):  # the kept rows; as many passes on every rank
            with autocast(device, dtype):
                logprobs, _ = completion_logprobs(model, prompt_ids[mb], prompt_mask[mb], completion_ids[mb],
                                                  mask[mb], args.temperature)
            loss = sft_loss(logprobs, kept[mb], num_tokens)  # [SFT-LOSS]: this rank's share of it
            loss.backward()
            loss_sum += loss.item()

        # ---- 3. one optimiser step (nothing kept in the whole batch: no gradient, AdamW leaves the weights) ---------
        all_reduce_gradients(model)  # the batch's gradient: the sum of the ranks' (one all-reduce per step)
        grad_norm, loss_sum = clip_grad_norm(model, args.max_grad_norm), all_reduce(loss_sum)
        check_finite(step + 1, loss=loss_sum, grad_norm=grad_norm)  # before the update, never after
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]  # the rate this step used
        scheduler.step()

        # ---- 4. log, evaluate, save ------------------------------------------------------------------------------
        metrics = metrics_row(step + 1, loss_sum, correct, kept, mask, grad_norm, lr, prompt_mask, args.online, t0,
                              t_sample)
        if eval_set and progress.eval_due(step + 1):
            metrics["eval_accuracy"] = run_eval()
        if args.online:  # a few samples, one per prompt
            log_samples(output_dir, step + 1, [{"prompt": p["prompt"], "completion": c, "answer": p["answer"],
                                                "reward": r} for p, c, r in zip(batch, completions[::k],
                                                                                correct[::k].tolist())][:4],
                        show="eval_accuracy" in metrics)
        progress.write(log_metrics(output_dir, metrics, ("loss", "accuracy", "kept", "grad_norm", "completion_len",
                                                         "eval_accuracy")))
        if progress.checkpoint_due(step + 1):  # every --save-every steps, and on Ctrl-C
            save_checkpoint(step + 1, model, tokenizer, optimizer, scheduler, output_dir)
            progress.stop_if_requested(step + 1, output_dir)
    save_pretrained(model, tokenizer, output_dir / "final", merge_lora=args.merge_lora)
    return metrics


def metrics_row(step: int, loss: float, correct, kept, mask, grad_norm: float, lr: float, prompt_mask, online: bool,
                t0: float, t_sample: float) -> dict:
    """The step's row of metrics.jsonl: the loss and gradient norm of the whole batch; online, the samples' accuracy
    and how many of them (and of their tokens) were kept; lengths and throughput of the global batch."""
    correct, lengths, kept_tokens = gather(correct), gather(mask.sum(1).float()), all_reduce(kept.sum())
    step_time = max(time.time() - t0, 1e-9)
    sampled = {"accuracy": correct.mean().item(), "kept": int(correct.sum()), "kept_tokens": int(kept_tokens),
               "sample_tokens_per_s": int(lengths.sum() / max(t_sample, 1e-9))} if online else {}
    return {"step": step, "loss": loss, **sampled, "grad_norm": grad_norm, "lr": lr,
            "completion_len": lengths.mean().item(), "completion_len_max": int(lengths.max()),
            "train_tokens_per_s": int((all_reduce(prompt_mask.sum()) + kept_tokens) / max(step_time - t_sample, 1e-9)),
            "step_time": step_time}


def kept_micro_batches(correct: torch.Tensor, micro_batch_size: int) -> tuple[torch.Tensor, ...]:
    """This rank's micro-batches of rows to train on: the kept (right) rows first, as many as the rank with the most
    kept rows has, so that every rank makes the same number of forward passes (FSDP's are collective, and the ranks'
    gradients are summed together); a rank with fewer takes some wrong rows, whose kept_mask is 0. None kept in the
    whole batch: no micro-batch."""
    rows = torch.argsort(correct, descending=True, stable=True)[:int(all_reduce(correct.sum(), "max"))]
    return rows.split(micro_batch_size) if len(rows) else ()


if __name__ == "__main__":
    with exit_on_error():
        main(parse_args(Args, __doc__))
