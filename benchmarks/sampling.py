"""Rollout speed: completion tokens per second of transformers' `generate` at several batch sizes, and of its static
KV cache, with and without `torch.compile`, on the default model and the built-in task. (The scripts sample with
common.generate, their own loop: benchmarks/roofline.py sets the two side by side.)

    python benchmarks/sampling.py --batch-sizes 16 64 128 --out benchmarks/results

Each configuration samples the same prompts (temperature 0.7, max_new_tokens as given) after one warm-up call, and
is timed over --repeats calls; the median is reported. Compilation time is reported separately (the first call).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import autocast, encode_prompts, eos_token_ids, eval_problems, mask_after_eos  # noqa: E402
from plumbing import DEFAULT_MODEL, cli, exit_on_error, load_model, require, resolve_device, resolve_dtype  # noqa: E402


@dataclass
class Args:
    model: str = DEFAULT_MODEL
    """the model to sample from"""
    batch_sizes: tuple[int, ...] = (16, 64, 128)
    """sequences per generate call"""
    max_new_tokens: int = 32
    repeats: int = 3
    """timed calls per configuration (after one warm-up call)"""
    static_cache: bool = True
    """also time cache_implementation='static'"""
    compile: bool = True
    """also time the static cache with torch.compile (CUDA only: compiling on CPU takes minutes and gains little)"""
    device: str = "auto"
    dtype: str = "auto"
    out: str = "benchmarks/results"
    """where sampling.json and sampling.md go"""


def time_generate(model, tokenizer, prompt_ids, prompt_mask, args: Args, device, dtype, **options) -> dict:
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=True, temperature=0.7, top_k=0,
                              eos_token_id=eos_token_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id,
                              **options)
    timings, tokens = [], []
    for i in range(args.repeats + 1):
        torch.manual_seed(i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad(), autocast(device, dtype):
            out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config)
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - start)
        tokens.append(int(mask_after_eos(out[:, prompt_ids.shape[1]:], config.eos_token_id)[0].sum()))
    rates = [n / t for n, t in zip(tokens[1:], timings[1:])]
    return {"first_call_s": timings[0], "median_s": statistics.median(timings[1:]),
            "completion_tokens_per_s": statistics.median(rates)}


def main(args: Args) -> None:
    require(args.batch_sizes and min(args.batch_sizes) >= 1 and args.max_new_tokens >= 1 and args.repeats >= 1,
            "--batch-sizes (one or more), --max-new-tokens and --repeats must be >= 1")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model, tokenizer = load_model(args.model, device)
    model.eval()
    problems = eval_problems(max(args.batch_sizes))
    results = []
    for batch_size in args.batch_sizes:
        prompt_ids, prompt_mask = encode_prompts(tokenizer, [p["prompt"] for p in problems[:batch_size]], device)
        configs = [("dynamic cache (plain generate)", {})]
        if args.static_cache:  # on CUDA, generate() compiles the forward by itself when the cache is static
            configs.append(("static cache", {"cache_implementation": "static", "disable_compile": True}))
            if args.compile and device.type == "cuda":
                configs.append(("static cache + torch.compile", {"cache_implementation": "static"}))
        for name, options in configs:
            result = {"batch_size": batch_size, "config": name,
                      **time_generate(model, tokenizer, prompt_ids, prompt_mask, args, device, dtype, **options)}
            print(json.dumps(result), flush=True)
            results.append(result)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    lines = [f"Sampling speed on {name}, {dtype}, max_new_tokens={args.max_new_tokens}, temperature 0.7.", "",
             "| batch | configuration | completion tokens/s | median s / call | first call s |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['batch_size']} | {r['config']} | {r['completion_tokens_per_s']:.0f} | {r['median_s']:.2f} | "
              f"{r['first_call_s']:.2f} |" for r in results]
    (out / "sampling.md").write_text("\n".join(lines) + "\n")
    (out / "sampling.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    with exit_on_error():
        main(cli(Args, description=__doc__))
