"""Reward model: a causal LM with a scalar head, trained on preference pairs with the Bradley-Terry loss.

RLHF's first stage. The model reads prompt + completion and outputs r(x, y) at the completion's last token (its EOS).
Under the Bradley-Terry model a human (or a verifier) prefers y+ to y- with probability

    P(y+ > y- | x) = sigmoid(r(x, y+) - r(x, y-))                                                  [BT]

so training maximises the log-likelihood of the observed preferences: loss = -log sigmoid(r(x, y+) - r(x, y-)).
Only differences of r are identified: the scale is arbitrary, the offset too. The saved model (final/) is a standard
sequence-classification checkpoint that `ppo.py --reward-model` loads (with --lora-rank: final/merged, --merge-lora).

Data: --data with prompt/chosen/rejected rows (the format dpo.py reads; chosen/rejected as text, or as chat messages
whose last is the assistant's), or by default pairs from the built-in task: the correct answer preferred to a near
miss (off by 1, 2 or 10), in the same wording. These are hard, since the reward model must do the sum itself;
pairs of the policy's own right and wrong samples, such as the pairs.jsonl that dpo.py writes, are easier to learn
(measured runs of both: README, "PPO on a learned reward model").

Every tag in brackets is defined, with its derivation and papers, in docs/equations.md.

Usage: python reward.py --data pairs.jsonl --max-steps 200
       python reward.py                    # default model, built-in addition task
       torchrun --nproc-per-node 8 reward.py --fsdp ...   # several GPUs: the same math (README)
"""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

from common import (all_reduce, arithmetic_problems, autocast, completion_text, encode_pairs, eos_token_ids,
                    eval_problems, forward_pass, gather, share, share_padded, world_size)
from plumbing import (Steps, TrainArgs, all_reduce_gradients, check_args, check_finite, check_messages, clip_grad_norm,
                      data_fields, describe_run, distribute, epochs, exit_on_error, fit_to_batch, hold_out, is_lora,
                      load_model, log_metrics, make_optimizer, note, parse_args, prepare_output_dir,
                      prompt_length_check, read_rows, require, resume_state, save_checkpoint, save_pretrained,
                      start_run, unused, with_lora)


@dataclass
class Args(TrainArgs):
    # the Bradley-Terry loss has no hyperparameters of its own

    chosen_field: str = "chosen"
    """--data's column holding the preferred completion"""
    rejected_field: str = "rejected"
    """--data's column holding the dispreferred completion"""
    batch_size: int = 32
    """preference pairs per optimiser step"""
    warmup_steps: int = 10
    """linear warmup steps, then cosine decay to 10% of the peak"""
    eval_every: int = 25
    """steps between evaluations of eval_pair_accuracy, the fraction of held-out pairs whose chosen completion scores
    above the rejected (also before the first step and after the last); 0 disables"""
    save_every: int = 100
    """steps between checkpoints (for --resume); the final model is always saved"""


def check_flags(args: Args) -> None:
    """The reward model's flag rules, before anything is loaded: the shared ranges, whole micro-batches."""
    check_args(args)
    unused(args, "chosen_field rejected_field", args.data is not None or args.eval_data is not None,
           "without --data or --eval-data")
    fit_to_batch(args, "micro_batch_size", args.batch_size)
    require(args.batch_size % args.micro_batch_size == 0,
            f"--batch-size {args.batch_size} must be a multiple of --micro-batch-size {args.micro_batch_size}")


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """[BT] -log sigmoid(r(x, y+) - r(x, y-)) per pair."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards)


def reward_model_scores(reward_model, prompt_ids, prompt_mask, completion_ids, completion_mask) -> torch.Tensor:
    """r(x, y): a sequence-classification model's scalar head on the hidden state of the completion's last real
    token (its EOS, found from the mask, not from pad ids), (B,)."""
    hidden = forward_pass(reward_model.base_model, prompt_ids, prompt_mask, completion_ids,
                          completion_mask).last_hidden_state
    last = prompt_ids.shape[1] + completion_mask.sum(1) - 1
    return reward_model.score(hidden[torch.arange(len(hidden)), last]).squeeze(-1).float()


def pad_apart_from_eos(tokenizer, eos_ids: list[int], vocab_size: int) -> None:
    """Pad with a special token that is not an EOS, where the tokenizer pads with its EOS (SmolLM2 does).

    Why: transformers' XxxForSequenceClassification (and so TRL, or anyone loading final/) reads the score at the last
    token whose id is not config.pad_token_id; with pad == EOS that is the token before the EOS, not the EOS that
    reward_model_scores reads, and the same checkpoint would score the same text differently. The stand-in is a token
    the vocabulary already has (unk, else bos, else another special token): no new token, no embedding resize, the
    vocabulary unchanged (load_reward_model compares it). Padding is masked everywhere here, so the loss is the same;
    one thing changes, for the better: the embedding row at config.pad_token_id gets no gradient (nn.Embedding's
    padding_idx), and that row was the EOS's, the very token the score is read at. The saved tokenizer and
    config.pad_token_id then point transformers' pooling at the EOS."""
    if tokenizer.pad_token_id not in eos_ids:
        return
    candidates = (tokenizer.unk_token_id, tokenizer.bos_token_id, *tokenizer.all_special_ids)
    pad = next((i for i in candidates if i is not None and i not in eos_ids and i < vocab_size), None)
    if pad is not None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad)
    else:
        note("the tokenizer pads with its EOS and has no other special token to pad with, so plain transformers will "
             "read this reward model's score one token before the EOS that reward.py reads")


def reward_model_from(lm, tokenizer):
    """A sequence-classification model (one label) with the language model's backbone and a freshly initialised
    head (small random weights: a zero head would give the backbone no gradient until the head has grown)."""
    config = lm.config
    config.num_labels, config.pad_token_id = 1, tokenizer.pad_token_id
    reward_model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    reward_model.base_model.load_state_dict(lm.base_model.state_dict())
    return reward_model


def reward_model_to_train(args, checkpoint, device):
    """(reward model, tokenizer): --model's backbone with a fresh scalar head (reward_model_from), or the checkpoint's
    model on resume; with --lora-rank, adapters on the frozen backbone and the score head trained in full (peft's
    SEQ_CLS task), fresh or the checkpoint's. The tokenizer pads apart from EOS (pad_apart_from_eos)."""
    lm, tokenizer = load_model(args.model, device)
    pad_apart_from_eos(tokenizer, eos_token_ids(lm, tokenizer), lm.get_input_embeddings().num_embeddings)
    reward_model = (AutoModelForSequenceClassification.from_pretrained(checkpoint, dtype=torch.float32)
                    if checkpoint and not args.lora_rank else reward_model_from(lm, tokenizer)).to(device)
    reward_model.config.pad_token_id = tokenizer.pad_token_id  # also a checkpoint's, saved before pads were moved
    del lm
    return with_lora(reward_model, args, checkpoint, task_type="SEQ_CLS"), tokenizer


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


def task_pairs(problems, seed: int):
    """Built-in pairs: the correct answer preferred to a near miss, both bare or both in 'a + b = c' form."""
    rng = random.Random(seed)
    for p in problems:
        wrong = int(p["answer"]) + rng.choice([-10, -2, -1, 1, 2, 10])
        stem = p["prompt"].split(". ")[0].removeprefix("Compute ") + " = " if rng.random() < 0.5 else ""
        yield {"prompt": p["prompt"], "chosen": stem + p["answer"], "rejected": stem + str(wrong)}


def pair_data(args, checks=()) -> tuple:
    """(training pairs forever, held-out pairs): the built-in task's, or --data's (read and checked now, in full)
    reshuffled every epoch, and --eval-data's first --eval-size. With --data and no --eval-data, a fixed 10% of its
    pairs (at most --eval-size, drawn the same way whatever the seed) is held out of training, and the run says so:
    pairs of the built-in task would measure nothing the run trained for."""
    fields, checks, names = ("prompt", "chosen", "rejected"), (check_pair, *checks), data_fields(args)
    if args.eval_data:
        eval_pairs = read_rows(args.eval_data, fields, checks, args.eval_data_split, names)[:args.eval_size]
    elif args.data is None:
        eval_pairs = list(task_pairs(eval_problems(args.eval_size, args.digits, args.ops), seed=0))
    else:
        eval_pairs = []  # some of --data's, below
    if args.data is None:
        return task_pairs(arithmetic_problems("train", args.digits, args.ops, args.seed), args.seed), eval_pairs
    rows = read_rows(args.data, fields, checks, args.data_split, names)
    if args.eval_size and not args.eval_data:
        if len(rows) < 2:
            note(f"no held-out pair accuracy: {args.data} has one pair; pass --eval-data to measure one")
        else:
            rows, eval_pairs = hold_out(rows, args.eval_size)
            note(f"eval_pair_accuracy (how often the chosen completion scores above the rejected): {len(eval_pairs)} "
                 f"of the {len(rows) + len(eval_pairs)} pairs of {args.data}, kept out of training (a fixed 10%, at "
                 f"most --eval-size; pass --eval-data to choose them)")
    return epochs(rows, args.seed), eval_pairs


def main(args: Args) -> dict:
    # ---- checks: flags, the run to resume, the model, data; nothing is written before all of them pass -----------
    # --resume's flags, torchrun, seeds (the head is drawn on every rank, then rank 0's is used: distribute), dtype
    checkpoint, device, dtype = start_run(args, "reward", check_flags)
    reward_model, tokenizer = reward_model_to_train(args, checkpoint, device)
    too_long = prompt_length_check(tokenizer, args.max_prompt_length, args.truncate_prompts)
    pairs, eval_pairs = pair_data(args, checks=(too_long,))
    output_dir = prepare_output_dir(args, checkpoint)
    if args.gradient_checkpointing:
        reward_model.gradient_checkpointing_enable()
    # replicated, or sharded by FSDP2 (--fsdp) with backbone and head as units of their own, since
    # reward_model_scores calls each directly; one process: as is
    reward_model = distribute(reward_model, args.fsdp, dtype)
    scorer = reward_model.get_base_model() if is_lora(reward_model) else reward_model  # LoRA: what peft wraps
    optimizer, scheduler = make_optimizer(reward_model, args)  # AdamW, warmup then cosine
    describe_run("reward", args, reward_model, device, dtype, f"{args.batch_size} pairs")
    start_step, _ = resume_state(checkpoint, reward_model, optimizer, scheduler)  # 0 on a fresh run
    pairs = itertools.islice(pairs, start_step * args.batch_size, None)

    @torch.no_grad()
    def pairwise_accuracy() -> float:
        """Under torchrun each rank scores its share of the pairs (`share_padded`: all ranks the same number of
        forward passes, as FSDP needs); the wins are summed over ranks."""
        reward_model.eval()
        mine, padded = share_padded(eval_pairs)
        wins, micro_batch_size = [], args.micro_batch_size // world_size()
        for i in range(0, len(padded), micro_batch_size):
            with autocast(device, dtype):
                sequences = encode_pairs(tokenizer, padded[i:i + micro_batch_size], device, args.max_prompt_length)
                chosen, rejected = reward_model_scores(scorer, *sequences).chunk(2)
            wins.append(chosen > rejected)
        return all_reduce(torch.cat(wins)[:len(mine)].sum()) / len(eval_pairs)  # only called with eval pairs

    progress = Steps(start_step, args.max_steps, "reward", args.eval_every, args.save_every)  # Ctrl-C: save, stop
    metrics: dict = {}
    if eval_pairs and args.eval_every and start_step == 0:
        metrics = {"step": 0, "eval_pair_accuracy": pairwise_accuracy()}
        progress.write(log_metrics(output_dir, metrics, ("eval_pair_accuracy",)))
    for step in progress:
        # ---- 1. a batch of preference pairs, this rank's share of it ---------------------------------------------
        t0 = time.time()
        batch = share([next(pairs) for _ in range(args.batch_size)])  # this rank's pairs of the batch

        # ---- 2. score both completions r(x, y+), r(x, y-); the loss [BT], accumulated over micro-batches --------
        reward_model.train()
        loss_sum, wins, margins, n_tokens, micro_batch_size = 0.0, 0, [], 0, args.micro_batch_size // world_size()
        for i in range(0, len(batch), micro_batch_size):
            sequences = encode_pairs(tokenizer, batch[i:i + micro_batch_size], device, args.max_prompt_length)
            n_tokens += int(sequences[1].sum() + sequences[3].sum())
            with autocast(device, dtype):
                chosen, rejected = reward_model_scores(scorer, *sequences).chunk(2)
            loss = bradley_terry_loss(chosen, rejected).sum() / args.batch_size  # [BT], mean over the global batch
            loss.backward()
            loss_sum += loss.item()
            wins += (chosen > rejected).sum().item()
            margins.append((chosen - rejected).detach())

        # ---- 3. one optimiser step -------------------------------------------------------------------------------
        all_reduce_gradients(reward_model)  # the batch's gradient: the sum of the ranks' (one all-reduce per step)
        grad_norm, loss_sum = clip_grad_norm(reward_model, args.max_grad_norm), all_reduce(loss_sum)
        check_finite(step + 1, loss=loss_sum, grad_norm=grad_norm)  # before the update, never after
        optimizer.step()
        lr = scheduler.get_last_lr()[0]  # the rate this step used
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        # ---- 4. log, evaluate, save ------------------------------------------------------------------------------
        metrics = metrics_row(step + 1, loss_sum, wins, margins, grad_norm, lr, n_tokens, args.batch_size, t0)
        if eval_pairs and progress.eval_due(step + 1):
            metrics["eval_pair_accuracy"] = pairwise_accuracy()
        progress.write(log_metrics(output_dir, metrics, ("loss", "pair_accuracy", "margin", "eval_pair_accuracy")))
        if progress.checkpoint_due(step + 1):  # for --resume
            save_checkpoint(step + 1, reward_model, tokenizer, optimizer, scheduler, output_dir)
            progress.stop_if_requested(step + 1, output_dir)
    save_pretrained(reward_model, tokenizer, output_dir / "final", merge_lora=args.merge_lora)
    return metrics


def metrics_row(step: int, loss: float, wins: int, margins: list, grad_norm: float, lr: float, n_tokens: int,
                batch_size: int, t0: float) -> dict:
    """The step's row of metrics.jsonl: loss, pair_accuracy (the batch's pairs ranked right), margin (the mean of
    r(x, y+) - r(x, y-)), gradient norm, learning rate and training throughput (tokens per second, all ranks)."""
    step_time = max(time.time() - t0, 1e-9)
    return {"step": step, "loss": loss, "pair_accuracy": all_reduce(wins) / batch_size,
            "margin": gather(torch.cat(margins)).mean().item(), "grad_norm": grad_norm,
            "lr": lr, "train_tokens_per_s": int(all_reduce(n_tokens) / step_time), "step_time": step_time}


if __name__ == "__main__":
    with exit_on_error():
        main(parse_args(Args, __doc__))
