"""DPO: direct preference optimisation, RLHF without a reward model or sampling during training.

The KL-regularised RLHF objective max E[r(x,y)] - beta KL(pi || pi_ref) has the closed-form optimum
pi*(y|x) = pi_ref(y|x) exp(r(x,y)/beta) / Z(x) [DPO-OPTIMAL], so a policy defines its own implicit reward

    r_theta(x, y) = beta log( pi_theta(y|x) / pi_ref(y|x) )                                        [DPO-REWARD]

(Z(x) cancels in a difference). Plugging it into the Bradley-Terry likelihood [BT] of preference pairs (y_w > y_l):

    L = -E[log sigmoid( beta log(pi_theta(y_w|x)/pi_ref(y_w|x)) - beta log(pi_theta(y_l|x)/pi_ref(y_l|x)) ) ] [DPO-LOSS]

with log pi(y|x) the SUM of the completion's token log-probs (the paper; --average-logprobs uses their mean, as the
code snippet of the blog post "强化学习算法-1：GRPO、DPO与PPO解析" does). At the start pi_theta = pi_ref and
L = log 2. --label-smoothing eps assumes a fraction eps of labels are flipped (conservative DPO). In the unified
view [UNIFIED-GRAD] the gradient coefficient is beta * sigmoid(r_l - r_w): large where the model still ranks the
pair wrongly.

K answers ranked best first are a Plackett-Luce ranking: successive choices of the best remaining answer, each a
softmax over the implicit rewards u_k = r_theta(x, y_k) (Z(x) cancels in each); for K = 2 this is [DPO-LOSS]:

    L = -E[ sum_{k=1}^{K-1} log( exp(u_k) / sum_{j>=k} exp(u_j) ) ]                                   [DPO-PL]

Data: --data with prompt/chosen/rejected rows (a JSONL, parquet, CSV or JSON file, a `datasets` directory or a
Hugging Face dataset id; --prompt-field, --chosen-field, --rejected-field name other columns), or by default pairs
built the way DeepSeekMath's unified view describes DPO's data: sample k completions per prompt from the reference
model, keep prompts with at least one correct and one wrong completion, pair one of each (a few of the samples go to
samples.jsonl). Rows may rank answers instead, "ranked": [best, ..., worst] (then the file's pairs are rankings of
two); --ranked K ranks K samples per prompt (`rank_key`). The rows, with reference log-probs computed once before
training, are saved to <output-dir>/pairs.jsonl (rankings.jsonl), which --resume reuses. With --lora-rank only LoRA
adapters train, and pi_ref is the model with its adapters off: no second copy.

Every tag in brackets is defined, with its derivation and papers, in docs/equations.md.

Usage: python dpo.py --model HuggingFaceTB/SmolLM2-135M-Instruct --data pairs.jsonl --beta 0.1
       python dpo.py                       # default model, pairs built from the built-in addition task
       torchrun --nproc-per-node 8 dpo.py --fsdp ...   # several GPUs: the same math (README)
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

from common import (NonFiniteError, RunError, all_reduce, arithmetic_problems, autocast, completion_logprobs,
                    completion_text, decode, encode_completions, encode_pairs, encode_prompts, evaluate, gather_objects,
                    generate, is_correct, is_main, parse_answer, parse_number, share, share_padded, world_size)
from plumbing import (SamplingArgs, Steps, all_reduce_gradients, at_least, between, check_args, check_finite,
                      check_messages, clip_grad_norm, data_fields, describe_run, distribute, epochs, exit_on_error,
                      fit_to_batch, load_eval_set, load_policy, log_metrics, log_samples, make_optimizer, note,
                      parse_args, prepare_output_dir, prompt_length_check, read_jsonl, read_rows, reference_model,
                      require, resume_state, save_checkpoint, save_pretrained, start_run, unused, write_atomic)


@dataclass
class Args(SamplingArgs):
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
    ranked: int = 0
    """built-in rankings instead of pairs (Plackett-Luce, [DPO-PL]): sample K completions per prompt, rank the
    distinct ones (correct first, then by distance to the answer, no number last); 0: pairs"""
    held_out_pairs: float = 0.1
    """fraction of pairs (or rankings) kept out of training, for the held-out accuracy; 0 trains on all of them"""

    chosen_field: str = "chosen"
    """--data's column holding the preferred answer"""
    rejected_field: str = "rejected"
    """--data's column holding the dispreferred answer"""
    micro_batch_size: int = 8
    """pairs (or rankings) per forward/backward pass"""
    learning_rate: float = 5e-6
    """peak learning rate of AdamW"""
    warmup_steps: int = 10
    """linear warmup steps, then cosine decay to 10% of the peak"""
    eval_every: int = 25
    """steps between evaluations (also before the first step and after the last); 0 disables"""
    save_every: int = 100
    """steps between checkpoints (for --resume); the final model is always saved"""


def check_flags(args: Args) -> None:
    """DPO's flags: their ranges, and the combinations that mean something."""
    check_args(args, beta=at_least(0), label_smoothing=between(0, 0.5, hi_open=True), num_prompts=at_least(1),
               num_samples=at_least(2), held_out_pairs=between(0, 1, hi_open=True))
    fit_to_batch(args, "micro_batch_size", args.batch_size)
    require(args.batch_size % args.micro_batch_size == 0,
            f"--batch-size {args.batch_size} must be a multiple of --micro-batch-size {args.micro_batch_size}")
    require(args.ranked == 0 or args.ranked >= 2, f"--ranked {args.ranked}: rank at least 2 samples, or 0 for pairs")
    require(not (args.ranked and args.data), "--ranked builds rankings from the built-in task; a --data file gives "
                                             "its own as 'ranked' rows: drop --ranked")
    unused(args, "num_prompts num_samples", args.data is None, "with --data (they build the built-in pairs)")
    unused(args, "chosen_field rejected_field", args.data is not None or args.eval_data is not None,
           "without --data or --eval-data")


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


def plackett_luce_loss(policy_logps, ref_logps, beta: float, valid=None):
    """[DPO-PL] -sum_{k<K} log( exp(u_k) / sum_{j>=k} exp(u_j) ), u = beta (log pi_theta(y|x) - log pi_ref(y|x)) the
    implicit rewards [DPO-REWARD], per ranking: (B, K) log-probs of answers best first -> (B,). A batch of rankings
    of different lengths is padded at the worst end, valid (B, K) False there. Each denominator is a suffix
    log-sum-exp, logcumsumexp over the reversed order; the k = K term is log 1 = 0."""
    u = beta * (policy_logps - ref_logps)
    valid = torch.ones_like(u, dtype=torch.bool) if valid is None else valid
    u = u.masked_fill(~valid, float("-inf"))  # padding: exp(u) = 0 in every sum
    log_denominators = u.flip(1).logcumsumexp(1).flip(1)  # log sum_{j>=k} exp(u_j)
    return -torch.where(valid, u - log_denominators, 0.0).sum(1)


def adjacent_wins(scores: torch.Tensor, valid: torch.Tensor) -> tuple[int, int]:
    """Over rankings (B, K), best first: how many adjacent answers have score_k > score_{k+1}, and how many adjacent
    pairs there are (for pairs: one each)."""
    both = valid[:, 1:]
    return int(((scores[:, :-1] > scores[:, 1:]) & both).sum()), int(both.sum())


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


def check_ranking(row: dict) -> str | None:
    """Why a ranking is unusable (None if fine): "ranked" lists at least two answers, best first, each text or chat
    messages ending with the assistant's, no two of them the same completion (a ranking has no ties)."""
    ranked = row["ranked"]
    if not isinstance(ranked, list) or len(ranked) < 2:
        return "'ranked' must be a list of at least two answers, best first"
    for i, value in enumerate(ranked):
        if not (isinstance(value, str) or (check_messages(value) is None and value[-1]["role"] == "assistant")):
            return f"'ranked' answer {i + 1} must be text or chat messages ending with the assistant's"
    texts = [completion_text(value) for value in ranked]
    if (dup := next((i for i, text in enumerate(texts) if text in texts[:i]), None)) is not None:
        return (f"'ranked' answers {texts.index(texts[dup]) + 1} and {dup + 1} are the same completion: a ranking "
                f"orders distinct answers; remove one")
    return None


def check_preference(row: dict) -> str | None:
    """A --data row is a pair (chosen, rejected) or a ranking (ranked), not both. An empty cell (null) is no field:
    every row of a table (parquet, CSV) has every column."""
    has = [key for key, value in row.items() if value is not None]
    if "ranked" in has:
        return "has 'ranked' and 'chosen'/'rejected': keep one form" if {"chosen", "rejected"} & set(has) else (
            check_ranking(row))
    missing = [key for key in ("chosen", "rejected") if key not in has]
    return f"missing field(s) {', '.join(missing)}, or 'ranked' (has: {', '.join(has)})" if missing else check_pair(row)


def answers(row: dict, prefix: str = "") -> list:
    """A row's answers, best first: a ranking's, or a pair's chosen and rejected (a ranking of two); with prefix "ref_",
    the reference log-probs stored with them (pairs.jsonl, rankings.jsonl)."""
    return row[prefix + "ranked"] if "ranked" in row else [row[prefix + "chosen"], row[prefix + "rejected"]]


def check_ref_logprobs(row: dict) -> str | None:
    """A row of pairs.jsonl or rankings.jsonl: its reference log-probs are finite numbers, one per answer."""
    values = answers(row, "ref_")
    if not (isinstance(values, list) and len(values) == len(answers(row)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)):
        return f"reference log-probs {json.dumps(values)}: not one finite number per answer; the file is damaged"
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


def rank_key(completion: str, answer) -> tuple:
    """How a built-in answer ranks, smaller first: correct, then wrong by |parsed number - answer|, then no number."""
    if is_correct(completion, answer):
        return (0, 0)
    value = parse_number(completion)
    return (2, 0) if value is None else (1, abs(value - parse_answer(answer)))


def rankings_from_samples(problems: list[dict], completions: list[str], k: int):
    """A ranking of each prompt's distinct samples, best first by rank_key, ties broken by length (shorter first) and
    then by sampling order; the number of prompts skipped (fewer than two distinct samples, or all of equal rank)."""
    rankings, skipped = [], 0
    for i, problem in enumerate(problems):
        samples = list(dict.fromkeys(completions[i * k:(i + 1) * k]))  # distinct texts, in sampling order
        keys = {c: rank_key(c, problem["answer"]) for c in samples}
        if len(set(keys.values())) < 2:
            skipped += 1
        else:
            rankings.append({"prompt": problem["prompt"], "ranked": sorted(samples, key=lambda c: (keys[c], len(c)))})
    return rankings, skipped


def ranking_logprobs(model, tokenizer, rows: list[dict], device, max_length: int, average: bool):
    """log pi(y_k|x) of every row's answers (sum or mean), (B, K) for K the longest, in one forward pass; valid (B, K),
    False where a shorter ranking is padded; the tokens processed. Sequences go rank by rank (every row's first
    answer, then every second, ...), as encode_pairs lays out pairs."""
    lists = [answers(row) for row in rows]
    slots = [(b, k) for k in range(max(map(len, lists))) for b in range(len(rows)) if k < len(lists[b])]
    sequences = (*encode_prompts(tokenizer, [rows[b]["prompt"] for b, _ in slots], device, max_length),
                 *encode_completions(tokenizer, [completion_text(lists[b][k]) for b, k in slots], device))
    logprobs, _ = completion_logprobs(model, *sequences)
    where = tuple(torch.tensor(slots, device=device).T)
    valid = torch.zeros(len(rows), max(map(len, lists)), dtype=torch.bool, device=device)
    valid[where] = True
    table = torch.zeros(valid.shape, device=device).index_put(where, sequence_logprob(logprobs, sequences[3], average))
    return table, valid, int(sequences[1].sum() + sequences[3].sum())


def ref_table(rows: list[dict], device) -> torch.Tensor:
    """The stored reference log-probs, (B, K), padded like ranking_logprobs (with 0: masked by valid)."""
    width = max(len(answers(row)) for row in rows)
    return torch.tensor([answers(row, "ref_") + [0.0] * (width - len(answers(row))) for row in rows], device=device)


def preference_logprobs(model, tokenizer, rows: list[dict], ranked: bool, device, args: Args):
    """(B, K) log pi(y_k|x) of each row's answers, best first; valid (B, K); the tokens processed. Pairs go through
    encode_pairs (as benchmarks/ checks against TRL), rankings through ranking_logprobs."""
    if ranked:
        return ranking_logprobs(model, tokenizer, rows, device, args.max_prompt_length, args.average_logprobs)
    sequences = encode_pairs(tokenizer, rows, device, args.max_prompt_length)
    valid = torch.ones(len(rows), 2, dtype=torch.bool, device=device)
    return (torch.stack(pair_logprobs(model, sequences, args.average_logprobs), 1), valid,
            int(sequences[1].sum() + sequences[3].sum()))


def read_preferences(args: Args, checkpoint, too_long) -> tuple[list[dict] | None, bool]:
    """--data's rows (None: built from samples, or a resumed run's own), and whether the run trains on rankings
    (Plackett-Luce) or pairs (DPO): a file with any ranking makes each of its pairs a ranking of two."""
    columns = data_fields(args)  # --prompt-field, --chosen-field, --rejected-field: --data's own column names
    required = ("prompt", *(key for key in ("chosen", "rejected") if key in columns))  # a renamed one must be there
    rows = ([{k: v for k, v in row.items() if v is not None}  # an empty cell is no field (check_preference)
             for row in read_rows(args.data, required, (check_preference, too_long), args.data_split, columns)]
            if args.data and not checkpoint else None)
    ranked = ((checkpoint.parent / "rankings.jsonl").is_file() if checkpoint
              else bool(args.ranked) or any("ranked" in row for row in rows or ()))
    require(not (ranked and args.label_smoothing), "--label-smoothing is for pairs [DPO-LOSS]; rankings (--ranked, "
                                                   "or 'ranked' rows in --data) have no smoothed loss: drop it")
    rows = [{k: v for k, v in row.items() if k not in ("chosen", "rejected")} | {"ranked": answers(row)}
            for row in rows] if ranked and rows else rows
    return rows, ranked


def sample_preferences(pi_ref, tokenizer, args: Args, ranked: bool, rng: random.Random, device, dtype):
    """The default data, built the way DeepSeekMath's unified view describes DPO's: k completions per built-in prompt
    sampled from pi_ref, a right and a wrong one paired (or all of them ranked, --ranked k). Under torchrun each rank
    samples its share of the prompts; gathered, every rank builds the same rows. Also returns a few samples."""
    k = args.ranked or args.num_samples
    problems = list(itertools.islice(arithmetic_problems("train", args.digits, args.ops, args.seed), args.num_prompts))
    mine, padded = share_padded(problems)
    prompt_ids, prompt_mask = encode_prompts(
        tokenizer, [p["prompt"] for p in padded for _ in range(k)], device, args.max_prompt_length)
    with autocast(device, dtype):
        ids, mask, _ = generate(pi_ref, tokenizer, prompt_ids, prompt_mask, args.max_new_tokens, args.temperature,
                                args.top_p, batch_size=args.generation_batch_size)
    completions = sum(gather_objects(decode(tokenizer, ids, mask)[:len(mine) * k]), [])  # all, in order
    samples = [{"prompt": p["prompt"], "completion": c, "answer": p["answer"], "correct": is_correct(c, p["answer"])}
               for p, c in zip(problems[:4], completions[::k])]
    rows, skipped = (rankings_from_samples(problems, completions, k) if ranked  # the same on every rank
                     else pairs_from_samples(problems, completions, k, rng))
    note(f"built {len(rows)} {'rankings' if ranked else 'pairs'} from {args.num_prompts} prompts x {k} samples; "
         f"{skipped} prompts had {'no two answers of different rank' if ranked else 'no right-and-wrong pair'} and "
         f"were skipped")
    if not rows:
        raise RunError(("no prompt gave two distinct answers of different rank: raise --ranked" if ranked
                        else "no prompt gave both a right and a wrong completion: raise --num-samples") +
                       ", --num-prompts or --temperature")
    return rows, samples


@torch.no_grad()
def with_ref_logprobs(pi_ref, tokenizer, rows: list[dict], ranked: bool, micro_batch_size: int, device, dtype,
                      args: Args) -> list[dict]:
    """The rows with their answers' log pi_ref(y_k|x): ref_chosen and ref_rejected, or ref_ranked. Under torchrun each
    rank scores its share of the rows; gathered, every rank holds them all."""
    unit, (mine, padded) = "rankings" if ranked else "pairs", share_padded(rows)
    scored = []  # each of this rank's rows: its answers' log pi_ref(y_k|x)
    for i in range(0, len(padded), micro_batch_size):
        with autocast(device, dtype):
            ref, valid, _ = preference_logprobs(pi_ref, tokenizer, padded[i:i + micro_batch_size], ranked, device, args)
        scored += [r[v].tolist() for r, v in zip(ref, valid)]
    scored = sum(gather_objects(scored[:len(mine)]), [])  # every row's, in order, on every rank
    if (bad := next((i for i, v in enumerate(scored) if not all(map(math.isfinite, v))), None)) is not None:
        raise NonFiniteError(f"the reference model gives a non-finite log-prob to an answer of {unit[:-1]} "
                             f"{bad + 1} (of {args.data or f'the built-in {unit}'})")
    return [dict(row, ref_ranked=values) if ranked else dict(row, ref_chosen=values[0], ref_rejected=values[1])
            for row, values in zip(rows, scored)]


def held_out_split(rows: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    """(held-out rows, training rows): the first `fraction` of the shuffled rows, at least one when fraction > 0, and
    never all of them (the training rows are never empty)."""
    n_held_out = min(len(rows) - 1, max(1, round(len(rows) * fraction))) if fraction else 0
    return rows[:n_held_out], rows[n_held_out:]


@torch.no_grad()
def preference_accuracy(model, tokenizer, rows: list[dict], ranked: bool, micro_batch_size: int, device, dtype,
                        args: Args) -> float | None:
    """How often the implicit reward [DPO-REWARD] puts y_k above y_{k+1} in the held-out rows (None: none held out).
    Each rank scores its share; the counts are summed over ranks."""
    mine, padded = share_padded(rows)
    wins = total = 0
    for i in range(0, len(padded), micro_batch_size):
        chunk = padded[i:i + micro_batch_size]
        with autocast(device, dtype):
            policy, valid, _ = preference_logprobs(model, tokenizer, chunk, ranked, device, args)
        real = slice(0, max(len(mine) - i, 0))  # not the padding
        w, n = adjacent_wins((policy - ref_table(chunk, device))[real], valid[real])  # u of y_k above y_{k+1}
        wins, total = wins + w, total + n
    return all_reduce(wins) / all_reduce(total) if rows else None


# ---- training ------------------------------------------------------------------------------------------------------

def main(args: Args) -> dict:
    # ---- checks: flags, the run to resume, model, data, rows; nothing is written before all of them pass ----------
    checkpoint, device, dtype = start_run(args, "dpo", check_flags)  # --resume's flags; torchrun; seeds; dtype
    micro_batch_size = args.micro_batch_size // world_size()  # this rank's part of each micro-batch
    # pi_theta, trained: every weight, or (--lora-rank) LoRA adapters on --model's frozen weights. pi_ref, the model
    # before any update, is only needed before training (section 1 below), with the adapters off under LoRA
    model, tokenizer = load_policy(args, checkpoint, device)
    too_long = prompt_length_check(tokenizer, args.max_prompt_length, args.truncate_prompts)
    rows, ranked = read_preferences(args, checkpoint, too_long)  # --data's rows; None: built in section 1
    names = ("rankings", "best", "worst", "rank") if ranked else ("pairs", "chosen", "rejected", "pref")
    unit, best, worst, acc = names  # the rows file, and the names of the metrics
    # the greedy task accuracy: on --eval-data (its columns named by --prompt-field, --answer-field), or on the
    # built-in task when the pairs are built from it; --data's pairs have no answers, and the built-in task's
    # accuracy would measure nothing they train
    task_eval = bool(args.eval_data or not args.data)
    eval_set = load_eval_set(args.eval_data, args.eval_size if task_eval else 0, args.digits, args.ops, too_long,
                             split=args.eval_data_split,
                             names={k: v for k, v in data_fields(args).items() if k in ("prompt", "answer")})
    if not task_eval and args.eval_size:
        note(f"no task accuracy (eval_accuracy): the {unit} of {args.data} have no answers to check, and the built-in "
             f"task's would measure nothing they train; the held-out accuracy is eval_{acc}_accuracy, on "
             f"--held-out-pairs of them (pass --eval-data with prompt/answer rows for a task accuracy too)")
    rng = random.Random(args.seed)
    model = distribute(model, args.fsdp, dtype)  # replicated, or sharded by FSDP2 (--fsdp), before it samples/scores
    optimizer, scheduler = make_optimizer(model, args)  # before any forward pass (FSDP2 swaps in the shards)
    describe_run("dpo", args, model, device, dtype, f"{args.batch_size} {unit}")

    # ---- 1. preference rows and their reference log-probs, once: pi_ref is the model before any update ------------
    samples = []  # a few of pi_ref's samples (built-in rows), for samples.jsonl and the terminal
    if checkpoint:  # the run's own rows (prepare_output_dir copies them along when resuming into a new directory)
        rows = read_jsonl(checkpoint.parent / f"{unit}.jsonl", ("prompt", "ranked", "ref_ranked") if ranked else
                          ("prompt", "chosen", "rejected", "ref_chosen", "ref_rejected"),
                          (check_preference, check_ref_logprobs))
    else:
        model.eval()  # no dropout in what pi_ref says or scores
        # pi_ref: the model itself, not yet updated; with LoRA, the model with its adapters off (the starting model)
        with reference_model(model, None if args.lora_rank else model) as pi_ref:
            if rows is None:  # the default: sample k completions per prompt from pi_ref; pair or rank them
                rows, samples = sample_preferences(pi_ref, tokenizer, args, ranked, rng, device, dtype)
            rng.shuffle(rows)
            # scored in the chunks eval_*_accuracy reads them in, held-out rows apart: at step 0 pi = pi_ref and
            # every implicit-reward margin is exactly 0, not float noise of another batch layout
            rows = [r for part in held_out_split(rows, args.held_out_pairs)
                    for r in with_ref_logprobs(pi_ref, tokenizer, part, ranked, micro_batch_size, device, dtype, args)]
    output_dir = prepare_output_dir(args, checkpoint)
    if not checkpoint and is_main():  # rank 0 writes; every rank already holds the rows
        write_atomic(output_dir / f"{unit}.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    log_samples(output_dir, 0, samples, show=True)  # what pi_ref says, once: the rows were built from it
    held_out, train_rows = held_out_split(rows, args.held_out_pairs)
    note(f"{len(train_rows)} {unit} to train on, {len(held_out)} held out for eval_{acc}_accuracy (--held-out-pairs "
         f"{args.held_out_pairs})")

    def evaluations() -> dict:
        """The greedy task accuracy (unless --eval-size 0) and the held-out pairs' (rankings') accuracy."""
        model.eval()  # no (LoRA) dropout; the next step sets train() again
        task = {"eval_accuracy": evaluate(model, tokenizer, eval_set, args.max_new_tokens, args.generation_batch_size,
                                          device, dtype, args.max_prompt_length)} if eval_set else {}
        return {**task, f"eval_{acc}_accuracy": preference_accuracy(model, tokenizer, held_out, ranked,
                                                                    micro_batch_size, device, dtype, args)}

    # ---- 2. resume --------------------------------------------------------------------------------------------------
    start_step, _ = resume_state(checkpoint, model, optimizer, scheduler)  # (0, {}) when fresh
    stream = epochs(train_rows, args.seed)  # shuffled epochs, from where the resumed run was in them
    for _ in range(start_step * args.batch_size):
        next(stream)
    progress = Steps(start_step, args.max_steps, "dpo", args.eval_every, args.save_every)  # Ctrl-C: save, stop
    metrics: dict = {}
    if args.eval_every and start_step == 0:
        metrics = {"step": 0, **evaluations(), f"num_{unit}": len(rows)}
        progress.write(log_metrics(output_dir, metrics, ("eval_accuracy", f"eval_{acc}_accuracy", f"num_{unit}")))

    # ---- 3. training loop [DPO-LOSS] or [DPO-PL] --------------------------------------------------------------------
    for step in progress:
        t0 = time.time()
        batch = share([next(stream) for _ in range(args.batch_size)])  # this rank's rows of the global batch
        model.train()
        sums = {k: 0.0 for k in ("loss", f"reward_{best}", f"reward_{worst}", f"logp_{best}", f"logp_{worst}")}
        n_tokens = wins = n_adjacent = 0
        for i in range(0, len(batch), micro_batch_size):
            chunk = batch[i:i + micro_batch_size]
            with autocast(device, dtype):
                policy, valid, tokens = preference_logprobs(model, tokenizer, chunk, ranked, device, args)  # (B, K)
            ref = ref_table(chunk, device)
            losses = (plackett_luce_loss(policy, ref, args.beta, valid) if ranked else
                      dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], args.beta, args.label_smoothing)[0])
            loss = losses.sum() / args.batch_size  # mean over the global batch's rows: this rank's share of it
            loss.backward()
            rewards = args.beta * (policy - ref).detach()  # [DPO-REWARD]
            last = valid.sum(1, keepdim=True) - 1  # each row's worst answer
            w, n = adjacent_wins(rewards, valid)
            n_tokens, wins, n_adjacent = n_tokens + tokens, wins + w, n_adjacent + n
            for key, value in (("loss", losses), (f"reward_{best}", rewards[:, 0]),
                               (f"reward_{worst}", rewards.gather(1, last)), (f"logp_{best}", policy[:, 0]),
                               (f"logp_{worst}", policy.gather(1, last))):
                sums[key] += value.detach().sum().item() / args.batch_size
        all_reduce_gradients(model)  # the batch's gradient: the sum of the ranks' (one all-reduce per step)
        grad_norm, sums = clip_grad_norm(model, args.max_grad_norm), {k: all_reduce(v) for k, v in sums.items()}
        n_tokens, wins, n_adjacent = (all_reduce(x) for x in (n_tokens, wins, n_adjacent))  # the global batch's
        check_finite(step + 1, loss=sums["loss"], grad_norm=grad_norm)  # before the update, never after
        optimizer.step()
        lr = scheduler.get_last_lr()[0]  # the rate this step used
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        # ---- 4. log, evaluate, save ----------------------------------------------------------------------------
        metrics = metrics_row(step + 1, sums, wins / n_adjacent, grad_norm, lr, n_tokens, time.time() - t0, names)
        if progress.eval_due(step + 1):
            metrics.update(evaluations())
        progress.write(log_metrics(output_dir, metrics, ("loss", "margin", f"{acc}_accuracy", f"logp_{best}",
                                                         f"logp_{worst}", "eval_accuracy", f"eval_{acc}_accuracy")))
        if progress.checkpoint_due(step + 1):  # every --save-every steps but the last, or on Ctrl-C
            save_checkpoint(step + 1, model, tokenizer, optimizer, scheduler, output_dir)
            progress.stop_if_requested(step + 1, output_dir)
    save_pretrained(model, tokenizer, output_dir / "final", merge_lora=args.merge_lora)
    return metrics


def metrics_row(step: int, sums: dict, accuracy: float, grad_norm: float, lr: float, n_tokens: int, seconds: float,
                names: tuple) -> dict:
    """A step's metrics: the means over the global batch, the adjacent answers' accuracy, the implicit-reward margin."""
    _, best, worst, acc = names
    return {"step": step, **sums, f"{acc}_accuracy": accuracy,
            "margin": sums[f"reward_{best}"] - sums[f"reward_{worst}"], "grad_norm": grad_norm, "lr": lr,
            "train_tokens_per_s": int(n_tokens / seconds), "step_time": seconds}


if __name__ == "__main__":
    with exit_on_error():
        main(parse_args(Args, __doc__))
