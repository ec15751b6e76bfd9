"""The helpers a reader reads with the derivation: what every algorithm script needs and shows.

In the order a reader needs them:
  1. the batch layout, [prompt, left-padded | completion, right-padded], and the tokenization that builds it
     (prompts, completions, preference pairs), with the completion mask;
  2. sampling: completions for a batch of prompts, from exactly the distribution that the log-probs describe;
  3. log-probs: one forward pass over that layout (`forward_pass`, shared by the policy, the critic and the reward
     model), and per-token log-probs and entropies of the completion tokens;
  4. the built-in tasks (generated arithmetic, multi-step sums), their verifier and step checker;
  5. the held-out evaluation;
  6. what both floors share: the error types, mixed precision, and the few torchrun helpers that say which rows of a
     global batch are this process's and sum numbers over processes.
No advantages and no losses live here: those belong to the algorithm scripts. Flags, data files, the run directory,
checkpoints, LoRA and model loading are plumbing, in plumbing.py, which imports this module (never the other way).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import random
import re
import sys
import zlib
from fractions import Fraction

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from tqdm import tqdm



# ---------------------------------------------------------------------------------------------------------------
# The batch layout and tokenization. A batch is laid out as [prompt, left-padded | completion, right-padded],
# so that generation, scoring and supervised training all see the same tokens at the same places.
# ---------------------------------------------------------------------------------------------------------------

def render_prompt(tokenizer, prompt: str | list[dict]) -> str:
    """The prompt as the model sees it: through the chat template if the tokenizer has one, else plain text."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages) + "\n"


def _pad(seqs: list[list[int]], pad_id: int, left: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, span] = torch.tensor(s, dtype=torch.long)
        mask[i, span] = 1
    return ids.to(device), mask.to(device)


def encode_prompts(tokenizer, prompts: list, device="cpu", max_length: int | None = None):
    """Left-padded prompt ids and attention mask, (B, P). A prompt longer than max_length tokens keeps its last
    max_length (the question and the assistant's turn are at the end); rows from files are checked against the limit
    when they are read (`prompt_length_check`), so this cuts only where the user asked for it."""
    # A chat template writes its own BOS; without one, let the tokenizer add it.
    special = not tokenizer.chat_template
    seqs = [tokenizer(render_prompt(tokenizer, p), add_special_tokens=special).input_ids for p in prompts]
    if max_length is not None:
        seqs = [s[-max_length:] for s in seqs]
    return _pad(seqs, tokenizer.pad_token_id, left=True, device=device)


def encode_completions(tokenizer, completions: list[str], device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded completion ids, each ending in EOS, and the completion mask, (B, C).

    The mask comes from lengths, never from `ids == pad`: where pad == EOS (SmolLM2) that would mask out the very
    EOS the model has to learn to emit."""
    seqs = [tokenizer(c, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for c in completions]
    return _pad(seqs, tokenizer.pad_token_id, left=False, device=device)


def completion_text(value) -> str:
    """A chosen/rejected field: text, or chat messages whose last (the assistant's) holds the completion."""
    return value[-1]["content"] if isinstance(value, list) else value


def encode_pairs(tokenizer, pairs: list[dict], device, max_length: int | None = None):
    """Chosen rows then rejected rows, (2B, ...), for one forward pass over both; prompts cut to their last
    max_length tokens (see encode_prompts). Each pair is {"prompt", "chosen", "rejected"} (see completion_text)."""
    prompts = [p["prompt"] for p in pairs] * 2
    completions = [completion_text(p["chosen"]) for p in pairs] + [completion_text(p["rejected"]) for p in pairs]
    return (*encode_prompts(tokenizer, prompts, device, max_length),
            *encode_completions(tokenizer, completions, device))


def mask_after_eos(completion_ids: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Completion mask covering tokens up to and including the first EOS, and which rows never emitted one."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    after_first_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
    return (~after_first_eos).long(), ~is_eos.any(1)


def decode(tokenizer, completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> list[str]:
    return [tokenizer.decode(ids[m.bool()], skip_special_tokens=True)
            for ids, m in zip(completion_ids, completion_mask)]


# ---------------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------------

def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and whatever the generation config adds."""
    ids = {tokenizer.eos_token_id}
    extra = model.generation_config.eos_token_id
    ids.update(extra if isinstance(extra, list) else [extra])
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate(model, tokenizer, prompt_ids, prompt_mask, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, greedy: bool = False, batch_size: int | None = None):
    """Sample completions for a left-padded batch of prompts, `batch_size` rows at a time, from exactly
    softmax(logits / temperature) (no top-k, no repetition penalty, whatever the checkpoint's generation config
    says), optionally nucleus-filtered (top_p < 1); greedy: the most likely token.

    Our own loop with a KV cache: each distinct prompt computed once, a row out of the batch once it emits EOS; under
    FSDP (collective forward passes) a rank keeps stepping, on a dummy row if it has no other, until all are done.

    Returns completion_ids (B, C) with pad after the first EOS, completion_mask (B, C) up to and including that EOS,
    and truncated (B,), True where the completion hit max_new_tokens without an EOS."""
    eos_ids = torch.tensor(eos_token_ids(model, tokenizer), device=prompt_ids.device)
    was_training = model.training
    model.eval()
    chunks = []
    try:
        step = batch_size or len(prompt_ids)
        for i in range(0, len(prompt_ids), step):
            chunks.append(sample_rows(model, prompt_ids[i:i + step], prompt_mask[i:i + step], max_new_tokens,
                                      eos_ids, tokenizer.pad_token_id, temperature, top_p, greedy))
    finally:
        model.train(was_training)
    width = max(c.shape[1] for c in chunks)
    completion_ids = torch.cat([F.pad(c, (0, width - c.shape[1]), value=tokenizer.pad_token_id) for c in chunks])
    completion_mask, truncated = mask_after_eos(completion_ids, eos_ids.tolist())
    return completion_ids.masked_fill(completion_mask == 0, tokenizer.pad_token_id), completion_mask, truncated


def next_token(logits: torch.Tensor, temperature: float, top_p: float, greedy: bool) -> torch.Tensor:
    """One token per row from logits (n, V): argmax, or a draw from softmax(logits / T), restricted to the smallest
    set of most likely tokens whose mass reaches top_p when top_p < 1."""
    if greedy:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if not torch.isfinite(probs).all():
        raise NonFiniteError("sampling: the policy's probabilities are not finite; its weights have diverged")
    if top_p < 1:
        sorted_probs, order = probs.sort(-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # the mass before a token already reaches top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1).squeeze(-1)


def sample_rows(model, prompt_ids, prompt_mask, max_new_tokens: int, eos_ids, pad_id: int, temperature: float,
                top_p: float, greedy: bool) -> torch.Tensor:
    """The sampling loop of `generate` for one chunk of rows: completion ids (n, <= max_new_tokens)."""
    name, synced = cache_name(model), is_sharded(model) and world_size() > 1
    cache, logits = prefill(model, prompt_ids, prompt_mask, *shared_prompts(prompt_ids, prompt_mask))
    tokens = torch.full((len(prompt_ids), max_new_tokens), pad_id, dtype=torch.long, device=prompt_ids.device)
    finished = torch.zeros(len(prompt_ids), dtype=torch.bool, device=prompt_ids.device)
    live = torch.arange(len(prompt_ids), device=prompt_ids.device)  # rows still sampling, in the cache's order
    positions, mask = prompt_mask.sum(-1), prompt_mask
    for t in range(max_new_tokens):
        picked = next_token(logits, temperature, top_p, greedy)
        tokens[live, t] = picked  # (a row kept after its EOS writes past it: mask_after_eos drops that)
        finished[live] |= torch.isin(picked, eos_ids)
        done = bool(finished.all()) or t == max_new_tokens - 1
        if synced:  # every rank steps until all are done: FSDP's forward passes are collective
            done = all_reduce(float(not done)) == 0
        if done:
            break
        keep = (~finished[live]).nonzero().squeeze(-1)
        if len(keep) < len(live):  # rows that emitted EOS leave the batch and the cache
            keep = keep if len(keep) else keep.new_zeros(1)  # (under FSDP a done rank steps on with one row)
            live, picked, positions, mask = live[keep], picked[keep], positions[keep], mask[keep]
            cache.reorder_cache(keep)
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
        out = model(input_ids=picked[:, None], attention_mask=mask, position_ids=positions[:, None] + t,
                    use_cache=True, **{name: cache})
        cache, logits = out[name], out.logits[:, -1]
    return tokens[:, :t + 1]


# ---------------------------------------------------------------------------------------------------------------
# Log-probs of the completion's tokens and entropies there: each distinct prompt once, then the completions on top
# ---------------------------------------------------------------------------------------------------------------

def forward_pass(model, prompt_ids, prompt_mask, completion_ids, completion_mask, **kwargs):
    """The model's output on [prompt | completion], (B, P + C): position ids from the attention mask, so left padding
    changes nothing, and no KV cache. `model` is a causal LM (read .logits) or a bare backbone such as
    `model.base_model` (read .last_hidden_state); kwargs go to it (logits_to_keep)."""
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                 **kwargs)


class _TokenLogprobs(torch.autograd.Function):
    """log softmax(logits / T) at the target tokens, and the entropy of softmax(logits / T), both differentiable.

    What it computes, naively (T the temperature):

        logp = torch.log_softmax(logits.float() / T, -1); picked = logp.gather(-1, targets[..., None]).squeeze(-1)
        entropy = -(logp.exp() * logp).sum(-1)

    but one batch row at a time in fp32, keeping only the logits (in their own dtype) and two (B, T) tensors for
    backward: no (B, T, V) fp32 log-softmax copy of the batch is ever built."""

    @staticmethod
    def forward(ctx, logits, targets, temperature):
        lse = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
        picked, entropy = torch.empty_like(lse), torch.empty_like(lse)
        for i in range(logits.shape[0]):
            x = logits[i].float() / temperature
            lse[i] = torch.logsumexp(x, dim=-1)
            picked[i] = x.gather(-1, targets[i, :, None]).squeeze(-1)
            entropy[i] = lse[i] - (torch.softmax(x, dim=-1) * x).sum(-1)  # H = lse - E_p[x]
        ctx.save_for_backward(logits, targets, lse, entropy)
        ctx.temperature = temperature
        return picked - lse, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        logits, targets, lse, entropy = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for i in range(logits.shape[0]):
            x = logits[i].float() / ctx.temperature
            p = torch.exp(x - lse[i, :, None])
            g_lp, g_h = grad_logprobs[i, :, None], grad_entropy[i, :, None]
            # d logp_target/dx = onehot - p ;  dH/dx = -p * (x - E_p[x]),  E_p[x] = lse - H
            g = -p * (g_lp + g_h * (x - (lse[i] - entropy[i])[:, None]))
            g.scatter_add_(-1, targets[i, :, None], g_lp)
            grad[i] = (g / ctx.temperature).to(grad.dtype)
        return grad, None, None


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    """(log pi(target), entropy) per position, from logits (B, T, V) and targets (B, T)."""
    return _TokenLogprobs.apply(logits, targets, temperature)


def completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature: float = 1.0,
                        prompt_once: bool = True):
    """log pi(o_t | q, o_<t) for every completion token, and the policy's entropy there; both (B, C).

    Logits are divided by the sampling temperature so that pi here is the distribution the tokens were drawn from.
    Values at masked positions are meaningless: mask them.

    A prompt that several rows share (a group's G completions, DPO's chosen and rejected) is computed once (`prefill`,
    gradients flow back through its cache), then the completions on top: the log-probs of one pass over [prompt |
    completion] (`forward_pass`, `prompt_once=False`) to float rounding. Only the completions' logits are computed."""
    C = completion_ids.shape[1]
    # Skip columns that are padding in every row (a micro-batch of short sequences pays for its own length only).
    start = int(prompt_mask.any(0).long().argmax())
    end = int(completion_mask.any(0).nonzero().max()) + 1 if completion_mask.any() else 1
    prompt_ids, prompt_mask = prompt_ids[:, start:], prompt_mask[:, start:]
    completion_ids, completion_mask = completion_ids[:, :end], completion_mask[:, :end]
    first, which = shared_prompts(prompt_ids, prompt_mask)
    checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    if not prompt_once or len(first) == len(prompt_ids) or checkpointing:
        # one pass; gradient checkpointing recomputes layers without a cache, so it takes this path too
        logits = forward_pass(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                              logits_to_keep=end + 1).logits[:, :-1]  # position t predicts token t+1
    else:
        cache, last = prefill(model, prompt_ids, prompt_mask, first, which)  # the last prompt position predicts o_1
        positions = prompt_mask.sum(-1, keepdim=True) + torch.arange(end, device=completion_ids.device)
        rest = model(input_ids=completion_ids, attention_mask=torch.cat([prompt_mask, completion_mask], dim=1),
                     position_ids=positions, use_cache=True, logits_to_keep=end, **{cache_name(model): cache}).logits
        logits = torch.cat([last[:, None], rest[:, :-1]], dim=1)
    logprobs, entropy = token_logprobs(logits, completion_ids, temperature)
    return F.pad(logprobs, (0, C - end)), F.pad(entropy, (0, C - end))


def shared_prompts(prompt_ids, prompt_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, which): a row holding each distinct prompt of the batch, and for each row its prompt's index in first."""
    distinct, which = torch.unique(torch.cat([prompt_ids, prompt_mask], 1), dim=0, return_inverse=True)
    rows = torch.arange(len(which), device=which.device)
    return torch.full((len(distinct),), len(which), device=which.device).scatter_reduce(0, which, rows, "amin"), which


def prefill(model, prompt_ids, prompt_mask, first, which):
    """Each distinct prompt (rows `first`) through the model once, filling a KV cache; then for every row (`which`)
    its prompt's keys and values (differentiable) and last position's logits (n, V). Positions count real tokens."""
    ids, mask = prompt_ids[first], prompt_mask[first]
    out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True,
                logits_to_keep=1)
    cache = out[cache_name(model)]
    cache.reorder_cache(which)
    return cache, out.logits[which, -1]


def cache_name(model) -> str:
    """The KV cache's name in a model's forward and output: `cache` in newer transformers, `past_key_values` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def shuffled_groups(n_rows: int, group_size: int, device) -> torch.Tensor:
    """Rows 0..n_rows-1 in a random order of whole groups (adjacent rows), so a micro-batch shares its prompts."""
    groups = torch.randperm(n_rows // group_size, device=device)
    return (groups[:, None] * group_size + torch.arange(group_size, device=device)).flatten()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------------------------
# The built-in tasks: generated arithmetic with a verifiable answer (--task arithmetic, the default), and sums
# written one partial sum per line, whose every step can be checked too (--task sum, for process supervision)
# ---------------------------------------------------------------------------------------------------------------

PROMPT_TEMPLATE = "Compute {a} {op} {b}. Reply with only the final answer."

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}

MAX_DIGITS = 18


def is_eval_problem(a: int, op: str, b: int) -> bool:
    """A fixed 10% of all problems form the held-out split, whatever the seed: train never sees them."""
    return zlib.crc32(f"{a}{op}{b}".encode()) % 10 == 0


def check_task_flags(digits: int, ops: str) -> None:
    if not 1 <= digits <= MAX_DIGITS:
        raise RunError(f"--digits {digits}: expected 1 to {MAX_DIGITS}")
    if not ops or any(op not in OPS for op in ops):
        raise RunError(f"--ops {ops!r}: use characters from {''.join(OPS)}")


def arithmetic_problems(split: str, digits: int = 2, ops: str = "+", seed: int = 0):
    """Endless stream of {"prompt", "answer"} dicts from the train or eval split."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be train or eval, not {split!r}")
    check_task_flags(digits, ops)
    rng = random.Random(seed)
    lo, hi = 10 ** (digits - 1) if digits > 1 else 0, 10 ** digits - 1
    while True:
        a, b, op = rng.randint(lo, hi), rng.randint(lo, hi), rng.choice(ops)
        if is_eval_problem(a, op, b) == (split == "eval"):
            yield {"prompt": PROMPT_TEMPLATE.format(a=a, op=op, b=b), "answer": str(OPS[op](a, b))}


SUM_TEMPLATE = ("Compute {numbers}, adding one number at a time. Write each partial sum on its own line as "
                "a + b = c.")


def sum_problems(split: str, digits: int = 2, seed: int = 0):
    """Endless stream of {"prompt", "answer", "numbers"} dicts: 3 or 4 numbers to add, one step per line. As for
    arithmetic_problems, a fixed 10% of all problems (by a hash of the numbers) is the held-out split."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be train or eval, not {split!r}")
    check_task_flags(digits, "+")
    rng = random.Random(seed)
    lo, hi = 10 ** (digits - 1) if digits > 1 else 0, 10 ** digits - 1
    while True:
        numbers = [rng.randint(lo, hi) for _ in range(rng.choice((3, 4)))]
        if (zlib.crc32("+".join(map(str, numbers)).encode()) % 10 == 0) == (split == "eval"):
            listed = ", ".join(map(str, numbers[:-1])) + f" and {numbers[-1]}"
            yield {"prompt": SUM_TEMPLATE.format(numbers=listed), "answer": str(sum(numbers)), "numbers": numbers}


def task_problems(task: str, split: str, digits: int, ops: str, seed: int):
    """The built-in task's stream: arithmetic (--ops) or sum."""
    if task == "sum":
        return sum_problems(split, digits, seed)
    if task == "arithmetic":
        return arithmetic_problems(split, digits, ops, seed)
    raise RunError(f"--task {task!r}: expected arithmetic or sum")


# ---- the verifier ----------------------------------------------------------------------------------------------

# A number as a reader writes it: optional sign, digits with optional thousands commas, optional decimals and
# exponent, optionally "/ denominator". Parsed exactly (Fraction), never evaluated; exponents are capped so that a
# completion's "1e999999999" cannot make a number with a billion digits.
_INT = r"(?:\d{1,3}(?:,\d{3})+|\d+)"

_REAL = rf"{_INT}(?:\.\d+)?(?:[eE][-+]?\d{{1,3}})?"

_NUMBER = re.compile(rf"(?<![\w.])-?{_REAL}(?:/{_REAL})?(?!\d|[eE][-+]?\d)")  # "7ic" reads 7


def _to_fraction(text: str) -> Fraction | None:
    try:
        return Fraction(text.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def parse_number(text: str) -> Fraction | None:
    """The last number in a model's text ("59 + 63 = 122." -> 122, "-7" -> -7, "1,234" -> 1234, "1e20" -> 10^20,
    "3/4" -> 3/4), exact, or None if it holds none."""
    for match in reversed(_NUMBER.findall(text)):
        value = _to_fraction(match)
        if value is not None:
            return value
    return None


def parse_answer(answer) -> Fraction | None:
    """A reference answer: one number and nothing else, exact (JSON 5, 0.1, 1e20; text "42", "-3.5", "1e-05",
    "1,234", "3/4"), or GSM8K's solution ending in "#### 42"; None if it is not that (a list, a dict, a bool,
    "x = 5", "1/0")."""
    if isinstance(answer, bool) or not isinstance(answer, (int, float, str)):
        return None
    if isinstance(answer, float) and not math.isfinite(answer):
        return None
    text = str(answer).strip()  # str(0.1) is '0.1': the number as written, not its binary expansion
    if isinstance(answer, str) and "####" in text:  # GSM8K: the worked solution, then "#### 42"
        text = text.rsplit("####", 1)[1].strip()
    return _to_fraction(text) if _NUMBER.fullmatch(text) else None


def is_correct(completion: str, answer) -> bool:
    """The verifier: the completion's last number equals the answer, as exact numbers ("1e20" and
    "100000000000000000000" both match 1e20, "20" does not)."""
    predicted, target = parse_number(completion), parse_answer(answer)
    return predicted is not None and predicted == target


def check_answer_row(row: dict) -> str | None:
    """A task row's answer must be one number: the verifier compares numbers."""
    if row.get("answer") is None:
        return "missing field(s) answer"
    if parse_answer(row["answer"]) is None:
        return (f"'answer' = {json.dumps(row['answer'])} is not one number (expected e.g. 42, -3.5, 1e-05, \"3/4\" "
                f"or a solution ending in \"#### 42\")")
    return None



# ---- the step checker of the sum task (process supervision) ----------------------------------------------------

_STEP = re.compile(r"(?<!\d)(-?\d+) *\+ *(-?\d+) *= *(-?\d+)(?!\d)")  # "12 + 34 = 46", parsed, never evaluated


def sum_steps(completion: str, numbers: list[int]) -> list[tuple[bool, int]]:
    """The steps of a sum completion, checked: one step per line that holds an equation a + b = c (its first), as
    (right, end), with end the index just past the step's last character. Step j (from 1) is right when a is the
    previous step's result (for the first step, the first number), b is number j+1, and a + b = c. An error is not
    carried: a step that goes on correctly from a wrong result is right (the final answer is still wrong). Lines
    without an equation are not steps; a step past the last number is wrong. A completion that stops before the last
    number is added ends with one more wrong step, the one it did not write, at its end: end = len(completion) + 1,
    past the text, is the completion's last token (its EOS, the decision to stop), so stopping early or writing no
    step does not score like a finished sum. The final answer is the completion's last number, for the verifier."""
    steps, previous, offset = [], numbers[0], 0
    for line in completion.splitlines(keepends=True):
        if match := _STEP.search(line):
            a, b, c = map(int, match.groups())
            j = len(steps) + 1
            steps.append((j < len(numbers) and a == previous and b == numbers[j] and a + b == c, offset + match.end()))
            previous = c
        offset += len(line)
    return steps if len(steps) >= len(numbers) - 1 else [*steps, (False, len(completion) + 1)]


def check_sum_row(row: dict) -> str | None:
    """A data row whose steps can be checked: `numbers`, two or more integers, in order, that add up to its answer."""
    numbers = row.get("numbers")
    if not (isinstance(numbers, list) and len(numbers) >= 2
            and all(isinstance(n, int) and not isinstance(n, bool) for n in numbers)):
        return ("'numbers' must be a list of two or more integers (the terms of the sum, in order): --supervision "
                "process checks each step against them")
    if parse_answer(row["answer"]) != sum(numbers):
        return f"'numbers' add up to {sum(numbers)}, not to 'answer' {json.dumps(row['answer'])}"
    return None


# ---------------------------------------------------------------------------------------------------------------
# The held-out evaluation: greedy accuracy on problems that training never sees
# ---------------------------------------------------------------------------------------------------------------

def eval_problems(n: int, digits: int = 2, ops: str = "+", task: str = "arithmetic") -> list[dict]:
    """The held-out set: the same n distinct problems for every script and every seed (fewer if the split is
    smaller than n, as with 1-digit operands)."""
    seen, out, repeats = set(), [], 0
    for p in task_problems(task, "eval", digits, ops, seed=1234):
        if len(out) >= n or repeats > 10_000:
            return out
        if p["prompt"] in seen:
            repeats += 1
        else:
            seen.add(p["prompt"])
            out.append(p)


@torch.no_grad()
def evaluate(model, tokenizer, problems: list[dict], max_new_tokens: int, batch_size: int, device, dtype,
             max_prompt_length: int | None = None) -> float:
    """Greedy accuracy on held-out problems. Under torchrun each rank answers its share (`share_padded`: all ranks
    the same number of generate calls, as FSDP needs) and the right answers are summed over ranks."""
    mine, padded = share_padded(problems)
    chunk = min(batch_size, max(16, math.ceil(len(padded) / 8)))  # a few calls at least, for the progress bar
    completions = []
    for i in tqdm(range(0, len(padded), chunk), desc="evaluating", leave=False,
                  disable=not is_main() or not sys.stderr.isatty()):  # a log file: no redraws
        prompt_ids, prompt_mask = encode_prompts(tokenizer, [p["prompt"] for p in padded[i:i + chunk]], device,
                                                 max_prompt_length)
        with autocast(device, dtype):
            ids, mask, _ = generate(model, tokenizer, prompt_ids, prompt_mask, max_new_tokens, greedy=True)
        completions += decode(tokenizer, ids, mask)
    right = sum(is_correct(c, p["answer"]) for c, p in zip(completions, mine))
    return all_reduce(right) / len(problems)


# ---------------------------------------------------------------------------------------------------------------
# What both floors share: the error types, mixed precision, and which rows are this process's under torchrun
# ---------------------------------------------------------------------------------------------------------------

# A problem the user can fix (a flag, a data row, a run directory) is a RunError: the command line prints its
# one-line message, not a traceback, and exits with status 2. Nothing is written before those checks pass.

class RunError(ValueError):
    """Bad input or run state, with a message that says what to fix."""


class NonFiniteError(RuntimeError):
    """A loss or gradient norm that is NaN or infinite: the run stops before the optimiser applies it."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: the run stopped after a finished step and saved a checkpoint of it."""


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision: fp32 master weights (small RL updates survive), matmuls in `dtype`."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# `torchrun --nproc-per-node N script.py ...` starts N copies of a script. Every rank reads the same data in the same
# order and takes its share of each global batch (`share`); batch sizes stay global, so the math does not depend on
# N. Without torchrun every helper here is a no-op: rank 0 of 1. (Joining the process group, distributing the model
# and reducing gradients are plumbing: plumbing.py.)

def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def share(items: list) -> list:
    """This rank's contiguous share of a global batch (len(items) is a multiple of the world size: checked with the
    flags). Rank r holds rows r*n/W .. (r+1)*n/W - 1, so gathering the shares in rank order gives the batch back."""
    n = len(items) // world_size()
    return items[rank() * n:(rank() + 1) * n]


def share_padded(items: list) -> tuple[list, list]:
    """This rank's contiguous share of items that need not divide evenly (ceil(n/W) each, the last ones shorter), and
    that share padded to ceil(n/W) with copies of its first item (or items[0]): under FSDP every rank makes the same
    number of forward passes. Drop the padding's results; the shares gathered in rank order are the items."""
    n = -(-len(items) // world_size())
    mine = items[rank() * n:(rank() + 1) * n]
    return mine, mine + (mine or items)[:1] * (n - len(mine))


def all_reduce(value: float, op: str = "sum") -> float:
    """A number summed (or its max, or min) over ranks."""
    if world_size() == 1:
        return float(value)
    t = torch.tensor(float(value), dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t.item()


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """The ranks' tensors concatenated along dim 0 in rank order (the global batch from the shares), on every rank.
    Widths may differ beyond dim 0 (completion lengths): narrower ones are right-padded with zeros."""
    if world_size() == 1:
        return tensor
    parts = gather_objects(tensor.cpu())
    width = max(p.shape[1] for p in parts) if tensor.dim() > 1 else None
    return torch.cat([F.pad(p, (0, width - p.shape[1])) if width else p for p in parts]).to(tensor.device)


def gather_objects(obj) -> list:
    """One picklable object from every rank, in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def is_sharded(model) -> bool:
    """Whether FSDP shards the module or any part of it (PPO's optimiser spans the actor and the critic)."""
    return any(isinstance(m, FSDPModule) for m in model.modules())
