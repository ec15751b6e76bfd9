"""Where a training step's time goes: each phase's seconds and FLOPs, and its rate against this machine's own matrix
multiply rate at the model's shapes, for the scripts' path (common.py: each distinct prompt computed once, finished
rows out of decoding) and, in the same run, the plain path (every row computes its prompt again; transformers'
generate), with the ratio of the two.

    python benchmarks/roofline.py                             # GRPO's CPU first run: 8 prompts x 8 completions
    python benchmarks/roofline.py --group-size 1              # one completion per prompt (PPO's rollouts)
    python benchmarks/roofline.py --batch-size 16 --device cuda --dtype bfloat16

The phases of one RL step, on the same sampled completions for both paths: sampling; the reference log-probs (no
grad, as pi_old's and pi_ref's passes are); the policy's forward with grad; its backward. FLOPs are counted as
computed, padding included, by hooks on every linear layer (2 x in x out per row) and every attention call
(4 x heads x head_dim x queries x keys); backward is twice its forward. The GEMM rate is torch.mm's at the model's
linear shapes with as many rows as a micro-batch's tokens.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import (autocast, completion_logprobs, encode_prompts, eos_token_ids, eval_problems,  # noqa: E402
                    generate, mask_after_eos)
from plumbing import DEFAULT_MODEL, cli, exit_on_error, load_model, require, resolve_device, resolve_dtype  # noqa: E402


@dataclass
class Args:
    model: str = DEFAULT_MODEL
    """the policy"""
    batch_size: int = 8
    """prompts per step"""
    group_size: int = 8
    """completions per prompt (1: PPO's one per prompt)"""
    micro_batch_size: int = 16
    """sequences per forward/backward pass"""
    max_new_tokens: int = 32
    temperature: float = 1.0
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    out: str = "benchmarks/results-roofline"
    """where roofline.json and roofline.md go"""


class FlopCounter(contextlib.AbstractContextManager):
    """Forward FLOPs of a model's linear layers and attention calls while active: 2 x in x out per row of a linear
    layer, 4 x heads x head_dim x queries x keys per attention call (Q K^T and the weighted sum of V)."""

    def __init__(self, model):
        self.model, self.flops, self.hooks = model, 0.0, []

    def __enter__(self):
        for module in self.model.modules():
            if isinstance(module, torch.nn.Linear):
                self.hooks.append(module.register_forward_hook(self.linear))
            elif type(module).__name__.endswith("Attention") and hasattr(module, "head_dim"):
                self.hooks.append(module.register_forward_hook(self.attention, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()

    def linear(self, module, inputs, output):
        self.flops += 2 * module.in_features * output.numel()

    def attention(self, module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        batch, queries = hidden.shape[:2]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        keys = cache.get_seq_length(module.layer_idx) if cache is not None else queries
        heads = module.config.num_attention_heads
        self.flops += 4 * batch * heads * module.head_dim * queries * keys


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def gemm_rate(model, rows: int, device, dtype) -> float:
    """FLOP/s of torch.mm over the model's distinct linear shapes, `rows` rows each, weighted as one pass uses them."""
    shapes = {}
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            shapes[(m.in_features, m.out_features)] = shapes.get((m.in_features, m.out_features), 0) + 1
    mm_dtype = dtype if device.type == "cuda" else torch.float32
    flops = seconds = 0.0
    for (n_in, n_out), count in shapes.items():
        x, w = torch.randn(rows, n_in, device=device, dtype=mm_dtype), torch.randn(n_in, n_out, device=device,
                                                                                 dtype=mm_dtype)
        x @ w  # warm-up
        sync(device)
        start, repeats = time.perf_counter(), 3
        for _ in range(repeats):
            x @ w
        sync(device)
        seconds += (time.perf_counter() - start) / repeats * count
        flops += 2 * rows * n_in * n_out * count
    return flops / seconds


def run_phases(model, tokenizer, prompt_ids, prompt_mask, args: Args, device, dtype, prompt_once: bool):
    """{phase: (seconds, forward-or-total FLOPs)} for one step, and the completions it sampled."""
    phases = {}
    torch.manual_seed(args.seed)
    with FlopCounter(model) as counter:
        sync(device)
        t = time.perf_counter()
        with autocast(device, dtype):
            if prompt_once:
                ids, mask, _ = generate(model, tokenizer, prompt_ids, prompt_mask, args.max_new_tokens,
                                        args.temperature)
            else:  # transformers' generate over every row, as the scripts sampled before
                config = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=True,
                                          temperature=args.temperature, top_k=0,
                                          eos_token_id=eos_token_ids(model, tokenizer),
                                          pad_token_id=tokenizer.pad_token_id)
                with torch.no_grad():
                    out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config)
                ids = out[:, prompt_ids.shape[1]:]
                mask, _ = mask_after_eos(ids, eos_token_ids(model, tokenizer))
        sync(device)
        phases["sampling"] = (time.perf_counter() - t, counter.flops)
    return phases, ids, mask


def score_phases(model, sequences, args: Args, device, dtype, prompt_once: bool, phases: dict) -> None:
    """The reference pass (no grad), the policy's forward (with grad) and its backward, micro-batch by micro-batch."""
    rows = torch.arange(len(sequences[0])).split(args.micro_batch_size)
    with FlopCounter(model) as counter:
        sync(device)
        t = time.perf_counter()
        with torch.no_grad(), autocast(device, dtype):
            for mb in rows:
                completion_logprobs(model, *(s[mb] for s in sequences), args.temperature, prompt_once=prompt_once)
        sync(device)
        phases["reference log-probs"] = (time.perf_counter() - t, counter.flops)
    forward = backward = flops = 0.0
    model.train()
    for mb in rows:
        with FlopCounter(model) as counter:
            sync(device)
            t = time.perf_counter()
            with autocast(device, dtype):
                lp, _ = completion_logprobs(model, *(s[mb] for s in sequences), args.temperature,
                                            prompt_once=prompt_once)
                loss = -(lp * sequences[3][mb]).sum() / sequences[3].sum()
            sync(device)
            t2 = time.perf_counter()
            loss.backward()
            sync(device)
            forward, backward, flops = forward + t2 - t, backward + time.perf_counter() - t2, flops + counter.flops
    model.zero_grad(set_to_none=True)
    model.eval()
    phases["policy forward"] = (forward, flops)
    phases["backward"] = (backward, 2 * flops)


def main(args: Args) -> None:
    require(min(args.batch_size, args.group_size, args.micro_batch_size, args.max_new_tokens) >= 1,
            "--batch-size, --group-size, --micro-batch-size and --max-new-tokens must be >= 1")
    require(args.temperature > 0, "--temperature must be > 0")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model, tokenizer = load_model(args.model, device)
    model.eval()
    problems = eval_problems(args.batch_size)
    prompt_ids, prompt_mask = encode_prompts(tokenizer, [p["prompt"] for p in problems for _ in range(args.group_size)],
                                             device)
    tokens = int(prompt_mask[:args.micro_batch_size].sum()) + args.micro_batch_size * args.max_new_tokens // 2
    rate = gemm_rate(model, tokens, device, dtype)
    results = {}
    for name, once in (("plain", False), ("prompt once", True)):
        phases, ids, mask = run_phases(model, tokenizer, prompt_ids, prompt_mask, args, device, dtype, once)
        score_phases(model, (prompt_ids, prompt_mask, ids, mask), args, device, dtype, once, phases)
        phases["step"] = tuple(map(sum, zip(*phases.values())))
        results[name] = {k: {"s": s, "gflop": f / 1e9, "gflop_per_s": f / 1e9 / s, "of_gemm": f / s / rate}
                         for k, (s, f) in phases.items()}
        results[name]["completion_tokens"] = int(mask.sum())
        print(name, json.dumps(results[name]), flush=True)

    where = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    lines = [f"One step of {args.batch_size} prompts x {args.group_size} completions (max_new_tokens "
             f"{args.max_new_tokens}, micro-batch {args.micro_batch_size}) on {where}, "
             f"{str(dtype).removeprefix('torch.')}; torch.mm at the model's shapes: {rate / 1e9:.0f} GFLOP/s.", "",
             "| phase | plain: s | GFLOP | of GEMM rate | prompt once: s | GFLOP | of GEMM rate | time ratio |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    a, b = results["plain"], results["prompt once"]
    for phase in ("sampling", "reference log-probs", "policy forward", "backward", "step"):
        lines.append(f"| {phase} | {a[phase]['s']:.1f} | {a[phase]['gflop']:.3g} | {a[phase]['of_gemm']:.0%} | "
                     f"{b[phase]['s']:.1f} | {b[phase]['gflop']:.3g} | {b[phase]['of_gemm']:.0%} | "
                     f"{b[phase]['s'] / a[phase]['s']:.2f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "roofline.json").write_text(json.dumps({"args": vars(args), "gemm_gflop_per_s": rate / 1e9,
                                                   "device": where, **results}, indent=2) + "\n")
    (out / "roofline.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    with exit_on_error():
        main(cli(Args, description=__doc__))
