"""SFT: supervised fine-tuning, the imitation baseline every RL script is read against.

Maximise the likelihood of given completions y for prompts x, every completion token weighing the same:

    L(theta) = -(1/N) sum_{(x,y) in batch} sum_t log pi_theta(y_t | x, y_<t)            [SFT-LOSS]

with N the number of completion tokens in the whole batch (prompt tokens carry no loss). In the unified view
[UNIFIED-GRAD] this is the gradient coefficient GC = 1 on a fixed data set. The completion ends with EOS, which is
trained too: a model that never learns to stop never stops.

Every tag in brackets is defined, with its derivation and papers, in docs/equations.md.

Usage: python sft.py --model HuggingFaceTB/SmolLM2-135M-Instruct --data train.jsonl --max-steps 500
       python sft.py --data openai/gsm8k --max-new-tokens 256   # questions -> worked solutions, "#### 42" checked
       python sft.py                      # default model, built-in arithmetic task with correct answers
       torchrun --nproc-per-node 8 sft.py --fsdp ...   # several GPUs: the same math (README)
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import torch

from common import (all_reduce, autocast, completion_logprobs, encode_completions, encode_prompts, evaluate, share,
                    world_size)
from plumbing import (Steps, TrainArgs, all_reduce_gradients, at_least, check_args, check_finite, check_messages,
                      clip_grad_norm, describe_run, distribute, exit_on_error, fit_to_batch, load_policy, log_metrics,
                      make_optimizer, parse_args, prepare_output_dir, prompt_length_check, require, resume_state,
                      save_checkpoint, save_pretrained, start_run, task_data, unused)


@dataclass
class Args(TrainArgs):
    weight_decay: float = 0.0
    """AdamW weight decay"""
    completion_field: str = "completion"
    """--data's column holding the completion; without one, the answer is the completion (openai/gsm8k needs no flag:
    its `answer` is the worked solution)"""
    answer_field: str = "answer"
    """--data's column holding the answer: the completion of a row that has none, and, without --eval-data, what the
    held-out accuracy checks"""
    max_new_tokens: int = 32
    """completion length limit for the greedy evaluation"""
    generation_batch_size: int = 64
    """sequences per generate call in the evaluation"""

    # shared flags with SFT's own defaults
    max_steps: int = 200
    """optimiser steps"""
    batch_size: int = 32
    """examples per optimiser step"""
    micro_batch_size: int = 8
    """examples per forward/backward pass; gradients accumulate over batch_size / micro_batch_size of them"""
    learning_rate: float = 2e-5
    """peak learning rate of AdamW"""
    warmup_steps: int = 10
    """linear warmup steps, then cosine decay to 10% of the peak"""
    eval_every: int = 50
    """steps between held-out evaluations (also before the first step and after the last); 0 disables"""
    save_every: int = 100
    """steps between checkpoints (for --resume); the final model is always saved"""


def check_flags(args: Args) -> None:
    """SFT's flag rules, before anything is loaded: the shared ranges and its own, whole micro-batches."""
    check_args(args, weight_decay=at_least(0))
    unused(args, "completion_field", args.data is not None, "without --data")
    fit_to_batch(args, "micro_batch_size", args.batch_size)
    require(args.batch_size % args.micro_batch_size == 0,
            f"--batch-size {args.batch_size} must be a multiple of --micro-batch-size {args.micro_batch_size}")


def sft_loss(logprobs: torch.Tensor, mask: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[SFT-LOSS] -(1/N) sum_t log pi(y_t | ...) over completion tokens. num_tokens = N counts the tokens of the whole
    optimiser batch, so micro-batch losses add up to the batch mean (not to a mean of micro-batch means)."""
    return -(logprobs * mask).sum() / max(num_tokens, 1)  # every completion holds its EOS: N >= 1, never 0/0


def check_row(row: dict) -> str | None:
    """A data row is {prompt, completion}, {prompt, answer} (the answer is the completion, text or a number) or
    {messages: [..., {"role": "assistant", ...}]}, every message checked."""
    if "messages" in row:
        messages = row["messages"]
        if problem := check_messages(messages):
            return f"'messages' {problem}"
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            return "'messages' must be a list of at least two messages ending with the assistant's (the completion)"
        return None
    if "prompt" not in row or ("completion" not in row and "answer" not in row):
        return (f"needs `prompt` and `completion` (or `answer`), or `messages` (has: {', '.join(row) or 'none'}); "
                f"name other columns with --prompt-field / --completion-field")
    if "completion" in row:
        return None if isinstance(row["completion"], str) else "'completion' must be text (a JSON string)"
    answer = row["answer"]
    return (None if isinstance(answer, (str, int, float)) and not isinstance(answer, bool) else
            "'answer', the completion of a row without one, must be text or a number")


def to_example(row: dict) -> tuple:
    """(prompt, completion): a chat's last message is the completion, the messages before it the prompt; a row
    without a completion has its answer as the completion (the built-in task's rows, GSM8K's worked solutions)."""
    if "messages" in row:
        return row["messages"][:-1], row["messages"][-1]["content"]
    return row["prompt"], row["completion"] if "completion" in row else str(row["answer"])


def main(args: Args) -> dict:
    # ---- checks: flags, the run to resume, the model, data; nothing is written before all of them pass -----------
    checkpoint, device, dtype = start_run(args, "sft", check_flags)  # --resume's flags, torchrun, seeds, dtype
    model, tokenizer = load_policy(args, checkpoint, device)  # --lora-rank: the frozen model with trained adapters
    too_long = prompt_length_check(tokenizer, args.max_prompt_length, args.truncate_prompts)

    def prompt_too_long(row: dict) -> str | None:  # a chat row's prompt is its messages before the last
        return too_long({"prompt": to_example(row)[0]})

    def held_out_check(row: dict) -> str | None:  # a row held out of --data is answered from its `prompt`
        return too_long(row) if "prompt" in row else ("a chat `messages` row with an `answer` cannot be held out for "
                                                      "the held-out accuracy: pass --eval-data, or --eval-size 0")

    # rows forever; the held-out set: --eval-data, the built-in task's, or --data's rows with answers held out
    rows, eval_set = task_data(args, (check_row, prompt_too_long), fields=(), eval_checks=held_out_check)
    output_dir = prepare_output_dir(args, checkpoint)
    model = distribute(model, args.fsdp, dtype)  # replicated, or sharded by FSDP2 (--fsdp); one process: as is
    optimizer, scheduler = make_optimizer(model, args, args.weight_decay)  # AdamW, warmup then cosine
    describe_run("sft", args, model, device, dtype, f"{args.batch_size} examples")
    start_step, _ = resume_state(checkpoint, model, optimizer, scheduler)  # 0 on a fresh run
    rows = itertools.islice(rows, start_step * args.batch_size, None)  # the stream is a function of the seed

    def run_eval() -> float:
        model.eval()
        return evaluate(model, tokenizer, eval_set, args.max_new_tokens, args.generation_batch_size, device, dtype,
                        args.max_prompt_length)

    progress = Steps(start_step, args.max_steps, "sft", args.eval_every, args.save_every)  # Ctrl-C: save, stop
    metrics: dict = {}
    if eval_set and args.eval_every and start_step == 0:
        metrics = {"step": 0, "eval_accuracy": run_eval()}
        progress.write(log_metrics(output_dir, metrics, ("eval_accuracy",)))
    for step in progress:
        # ---- 1. a batch of (prompt, completion) examples, this rank's share of it --------------------------------
        t0 = time.time()
        batch = share([to_example(next(rows)) for _ in range(args.batch_size)])  # this rank's rows of the batch
        prompts, completions = zip(*batch)
        prompt_ids, prompt_mask = encode_prompts(tokenizer, list(prompts), device, args.max_prompt_length)
        completion_ids, completion_mask = encode_completions(tokenizer, list(completions), device)
        num_tokens = int(all_reduce(completion_mask.sum()))  # N of [SFT-LOSS], over the whole batch (all ranks)

        # ---- 2. the loss [SFT-LOSS], its gradient accumulated over micro-batches ---------------------------------
        model.train()
        loss_sum, micro_batch_size = 0.0, args.micro_batch_size // world_size()
        for i in range(0, len(batch), micro_batch_size):
            mb = slice(i, i + micro_batch_size)
            with autocast(device, dtype):
                logprobs, _ = completion_logprobs(model, prompt_ids[mb], prompt_mask[mb],
                                                  completion_ids[mb], completion_mask[mb])
            loss = sft_loss(logprobs, completion_mask[mb], num_tokens)  # [SFT-LOSS]: this rank's share of it
            loss.backward()
            loss_sum += loss.item()

        # ---- 3. one optimiser step -------------------------------------------------------------------------------
        all_reduce_gradients(model)  # the batch's gradient: the sum of the ranks' (one all-reduce per step)
        grad_norm, loss_sum = clip_grad_norm(model, args.max_grad_norm), all_reduce(loss_sum)
        check_finite(step + 1, loss=loss_sum, grad_norm=grad_norm)  # before the update, never after
        optimizer.step()
        lr = scheduler.get_last_lr()[0]  # the rate this step used
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        # ---- 4. log, evaluate, save ------------------------------------------------------------------------------
        metrics = metrics_row(step + 1, loss_sum, grad_norm, lr, num_tokens, prompt_mask, args.batch_size, t0)
        if eval_set and progress.eval_due(step + 1):
            metrics["eval_accuracy"] = run_eval()
        progress.write(log_metrics(output_dir, metrics, ("loss", "grad_norm", "eval_accuracy")))
        if progress.checkpoint_due(step + 1):  # for --resume
            save_checkpoint(step + 1, model, tokenizer, optimizer, scheduler, output_dir)
            progress.stop_if_requested(step + 1, output_dir)
    save_pretrained(model, tokenizer, output_dir / "final", merge_lora=args.merge_lora)
    return metrics


def metrics_row(step: int, loss: float, grad_norm: float, lr: float, num_tokens: int, prompt_mask: torch.Tensor,
                batch_size: int, t0: float) -> dict:
    """The step's row of metrics.jsonl: loss, gradient norm, learning rate, mean completion length (tokens, EOS
    included) and training throughput (prompt and completion tokens per second, all ranks)."""
    step_time = max(time.time() - t0, 1e-9)
    return {"step": step, "loss": loss, "grad_norm": grad_norm, "lr": lr, "completion_len": num_tokens / batch_size,
            "train_tokens_per_s": int((all_reduce(prompt_mask.sum()) + num_tokens) / step_time),
            "step_time": step_time}


if __name__ == "__main__":
    with exit_on_error():
        main(parse_args(Args, __doc__))
