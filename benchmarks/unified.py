"""DeepSeekMath's comparison of the methods of its unified paradigm [UNIFIED-GRAD] (its Figure 5), at our scale: one SFT
model on the multi-step sum task, then from it RFT [RFT], online RFT [ONLINE-RFT], GRPO with outcome supervision
[GRPO-ADV] and GRPO with process supervision [GRPO-PROCESS], each given the same number of sampled completions;
beside them, on two-digit addition from the default model, PPO's clip and penalty variants and TRPO.

    python benchmarks/unified.py                                # the settings below (1-2 hours on 2 CPU cores)
    python benchmarks/unified.py --steps 4 --out /tmp/unified    # a quick look

1. SFT: `--sft-steps` steps of sft.py on worked sums (one partial sum per line) written from the task's training
   split, so that every method starts from a model that writes the steps.
2. The four arms, from sft/final, on the same training sums (train.jsonl, with their numbers) and the same held-out
   sums (eval.jsonl): each samples `--prompts` x `--samples` completions per step for `--steps` steps; offline RFT
   draws the same total once, from the SFT model (`--num-prompts = steps x prompts`).
3. PPO-clip, PPO-penalty and TRPO on the built-in addition task from the default model: `--steps` steps of
   `--prompts` x `--samples` completions each (PPO: one completion per prompt, so `--prompts x --samples` prompts).
Every model is evaluated greedily on the held-out problems; the sum arms also for step accuracy (common.sum_steps).
Runs are started two at a time, one thread each. A finished run under --out is reused, so an interrupted comparison
continues.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import eval_problems, sum_problems  # noqa: E402
from plumbing import DEFAULT_MODEL, cli, exit_on_error, require  # noqa: E402
from process_supervision import held_out  # noqa: E402  (greedy final-answer and step accuracy on sums)


@dataclass
class Args:
    model: str = DEFAULT_MODEL
    """the model SFT starts from, and the PPO family"""
    sft_steps: int = 3
    """SFT steps (16 worked sums each) that make the starting model of the four sum arms: few, so that it starts
    well short of what the task allows (20 steps reach 90% and leave the arms nothing to separate them)"""
    steps: int = 8
    """sampling steps of every arm"""
    prompts: int = 4
    """prompts per step (offline RFT: steps x prompts prompts, sampled once)"""
    samples: int = 8
    """completions per prompt"""
    eval_size: int = 40
    """held-out problems for every evaluation"""
    eval_every: int = 2
    """steps between held-out evaluations (final-answer accuracy over steps)"""
    ppo_family: bool = True
    """also run PPO-clip, PPO-penalty and TRPO on two-digit addition"""
    cg_iters: int = 5
    """TRPO's conjugate-gradient iterations (each a double-backward pass over the batch: the step's main cost)"""
    seed: int = 0
    out: str = "benchmarks/results-unified"
    """where the run directories, the data, results.json and results.md go"""
    extra: list[str] = field(default_factory=list)
    """more flags for every run, e.g. --extra=--dtype=bfloat16"""


def worked(numbers: list[int]) -> str:
    """A sum written the way the task asks: one partial sum per line, a + b = c."""
    lines, total = [], numbers[0]
    for n in numbers[1:]:
        lines.append(f"{total} + {n} = {total + n}")
        total += n
    return "\n".join(lines)


def write_data(out: Path, args: Args) -> None:
    """sft.jsonl (prompt, worked completion), train.jsonl (prompt, answer, numbers) from the training split, disjoint
    from each other; eval.jsonl, the held-out sums."""
    stream = sum_problems("train", digits=1, seed=args.seed)
    sft = list(itertools.islice(stream, 16 * args.sft_steps))
    train = list(itertools.islice(stream, args.steps * args.prompts * 4))
    rows = {"sft.jsonl": [{"prompt": p["prompt"], "completion": worked(p["numbers"])} for p in sft],
            "train.jsonl": train, "eval.jsonl": eval_problems(args.eval_size, digits=1, task="sum")}
    for name, items in rows.items():
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in items))


def launch(name: str, script: str, flags: list[str], out: Path, args: Args):
    """Start a run (a child process, one thread) unless --out already holds it finished; returns the process or None."""
    if (out / name / "final").exists():
        return None
    command = [sys.executable, script, *flags, "--seed", str(args.seed), "--save-every", "100000",
               "--output-dir", str((out / name).resolve()), *args.extra]
    print(" ".join(command), flush=True)
    return subprocess.Popen(command, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))


def run_pairs(runs: list[tuple[str, str, list[str]]], out: Path, args: Args) -> None:
    """The runs, two at a time; any failure stops the comparison with one line."""
    for pair in (runs[i:i + 2] for i in range(0, len(runs), 2)):
        started = [(name, launch(name, script, flags, out, args)) for name, script, flags in pair]
        failed = [name for name, p in started if p is not None and p.wait()]
        require(not failed, f"{', '.join(failed)} stopped (its message is above); run this again with the same --out "
                            f"to continue: finished runs are reused")


def curve(run_dir: Path) -> list:
    return [(m["step"], m["eval_accuracy"]) for m in map(json.loads, open(run_dir / "metrics.jsonl"))
            if "eval_accuracy" in m]


def main(args: Args) -> None:
    require(min(args.sft_steps, args.steps, args.prompts, args.samples, args.eval_size, args.eval_every,
                args.cg_iters) >= 1,
            "--sft-steps, --steps, --prompts, --samples, --eval-size, --eval-every and --cg-iters must be >= 1")
    require(args.samples >= 2, "--samples must be >= 2 (GRPO's group)")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    write_data(out, args)
    data, evals = str(out / "train.jsonl"), ["--eval-data", str(out / "eval.jsonl"), "--eval-size",
                                             str(args.eval_size), "--eval-every", str(args.eval_every)]
    sample = ["--max-new-tokens", "64", "--micro-batch-size", "16"]
    run_pairs([("sft", "sft.py", ["--model", args.model, "--data", str(out / "sft.jsonl"), "--max-steps", str(args.sft_steps), "--batch-size",
                                  "16", "--micro-batch-size", "16", "--warmup-steps", "0", *evals])], out, args)
    start = str(out / "sft" / "final")
    group = ["--model", start, "--data", data, "--max-steps", str(args.steps), *sample, *evals]
    prompts = ["--batch-size", str(args.prompts)]
    arms = [("rft", "rft.py", [*group, "--num-samples", str(args.samples), "--num-prompts",  # examples per step
                               str(args.steps * args.prompts), "--batch-size", str(args.prompts * args.samples // 2)]),
            ("online-rft", "rft.py", [*group, *prompts, "--online", "--num-samples", str(args.samples)]),
            ("grpo-outcome", "grpo.py", [*group, *prompts, "--group-size", str(args.samples)]),
            ("grpo-process", "grpo.py", [*group, *prompts, "--group-size", str(args.samples), "--supervision",
                                         "process"])]
    addition = ["--model", args.model, "--max-steps", str(args.steps), "--eval-size", str(args.eval_size), "--eval-every",
                str(args.eval_every), "--micro-batch-size", "16"]
    ppo = [*addition, "--batch-size", str(args.prompts * args.samples), "--mini-batch-size", "16"]
    family = [("ppo-clip", "ppo.py", ppo), ("ppo-penalty", "ppo.py", [*ppo, "--policy-loss", "penalty"]),
              ("trpo", "trpo.py", [*addition, "--batch-size", str(args.prompts), "--group-size", str(args.samples),
                                   "--cg-iters", str(args.cg_iters)])]
    run_pairs(arms + (family if args.ppo_family else []), out, args)

    problems = [json.loads(line) for line in open(out / "eval.jsonl")]
    results = {"sft": {**held_out(start, problems), "curve": curve(out / "sft")}}
    for name, _, _ in arms:
        results[name] = {**held_out(str(out / name / "final"), problems), "curve": curve(out / name)}
    for name, _, _ in family if args.ppo_family else []:
        results[name] = {"curve": curve(out / name)}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"{args.steps} steps x {args.prompts} prompts x {args.samples} completions per arm; SFT {args.sft_steps} "
             f"steps; greedy, {len(problems)} held-out problems.", "",
             "| run | held-out accuracy over steps (step: accuracy) | final-answer accuracy | step accuracy |",
             "| --- | --- | --- | --- |"]
    for name, r in results.items():
        steps = ", ".join(f"{s}: {a:.0%}" for s, a in r["curve"])
        final = f"{r['accuracy']:.1%} | {r['step_accuracy']:.1%}" if "accuracy" in r else f"{r['curve'][-1][1]:.1%} | -"
        lines.append(f"| {name} | {steps} | {final} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    with exit_on_error():
        main(cli(Args, description=__doc__))
