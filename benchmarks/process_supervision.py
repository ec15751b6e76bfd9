"""Outcome against process supervision [GRPO-PROCESS] on the built-in multi-step sum task: the same GRPO run (same
seed, steps, batch and sampled prompts) with --supervision outcome and --supervision process, then the starting model
and both final/ models evaluated greedily on the same held-out sums, for the final answer and for every step.

    python benchmarks/process_supervision.py                          # the settings below
    python benchmarks/process_supervision.py --steps 10 --out /tmp/ps # a quick look

A step is a line "a + b = c" (common.sum_steps): right when it continues from the previous result with the next
number and its arithmetic is true. Step accuracy is right steps / all steps, a sum that stops early counting the step
it did not write as wrong. A finished run under --out is reused, so an interrupted comparison continues.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import decode, encode_prompts, eval_problems, generate, is_correct, sum_steps  # noqa: E402
from plumbing import DEFAULT_MODEL, cli, exit_on_error, load_model, require  # noqa: E402

SETTINGS = ["--task", "sum", "--digits", "1", "--batch-size", "4", "--group-size", "8", "--micro-batch-size", "16",
            "--max-new-tokens", "64", "--learning-rate", "1e-5"]


@dataclass
class Args:
    steps: int = 8
    """sampling steps for each arm"""
    eval_size: int = 100
    """held-out sums for the before/after evaluation"""
    seed: int = 0
    out: str = "benchmarks/results-process"
    """where both run directories and results.json / results.md go"""
    extra: list[str] = field(default_factory=list)
    """more flags for both runs, e.g. --extra=--dtype=bfloat16"""


def held_out(model_dir: str, problems: list[dict]) -> dict:
    """Greedy final-answer accuracy and step accuracy of a model on the held-out sums."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(model_dir, device)
    ids, mask = encode_prompts(tokenizer, [p["prompt"] for p in problems], device)
    completion_ids, completion_mask, _ = generate(model.eval(), tokenizer, ids, mask, 64, greedy=True, batch_size=128)
    completions = decode(tokenizer, completion_ids, completion_mask)
    steps = [sum_steps(c, p["numbers"]) for c, p in zip(completions, problems)]
    return {"accuracy": sum(is_correct(c, p["answer"]) for c, p in zip(completions, problems)) / len(problems),
            "step_accuracy": sum(ok for s in steps for ok, _ in s) / max(1, sum(map(len, steps))),
            "example": completions[0]}


def main(args: Args) -> None:
    require(args.steps >= 1 and args.eval_size >= 1, "--steps and --eval-size must be >= 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    problems = eval_problems(args.eval_size, digits=1, task="sum")
    results = {"starting model": held_out(DEFAULT_MODEL, problems)}
    runs = {}
    for supervision in ("outcome", "process"):  # both at once, one thread each
        run_dir = out / supervision
        if not (run_dir / "final").exists():
            command = [sys.executable, "grpo.py", *SETTINGS, "--supervision", supervision, "--seed", str(args.seed),
                       "--max-steps", str(args.steps), "--eval-every", "0", "--save-every", str(10 * args.steps),
                       "--output-dir", str(run_dir.resolve()), *args.extra]
            print(" ".join(command), flush=True)
            runs[supervision] = subprocess.Popen(command, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if any(run.wait() for run in runs.values()):
        require(False, "a training run stopped (its message is above); run this again with the same --out to "
                       "continue: finished runs are reused")
    for supervision in ("outcome", "process"):
        run_dir = out / supervision
        log = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
        results[supervision] = {**held_out(str(run_dir / "final"), problems),
                                "train_time_s": sum(m.get("step_time", 0) for m in log),
                                "sampled_accuracy_first_3": sum(m["accuracy"] for m in log[:3]) / 3,
                                "sampled_accuracy_last_3": sum(m["accuracy"] for m in log[-3:]) / 3}
    lines = [f"GRPO on --task sum, {args.steps} steps, seed {args.seed}, `{' '.join(SETTINGS)}`; greedy, "
             f"{len(problems)} held-out sums.", "",
             "| model | final-answer accuracy | step accuracy | sampled accuracy, first 3 -> last 3 steps | "
             "train time (min) |", "| --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        sampled = (f"{r['sampled_accuracy_first_3']:.1%} -> {r['sampled_accuracy_last_3']:.1%}"
                   if "train_time_s" in r else "-")
        time_min = f"{r['train_time_s'] / 60:.1f}" if "train_time_s" in r else "-"
        lines.append(f"| {name} | {r['accuracy']:.1%} | {r['step_accuracy']:.1%} | {sampled} | {time_min} |")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    with exit_on_error():
        main(cli(Args, description=__doc__))
