"""Train every algorithm on the default model and the built-in addition task, from the same starting model, with one
stated step budget; write a markdown table and plots of what each one learned and what it cost.

    python benchmarks/run.py                                  # all six, the settings below
    python benchmarks/run.py --algorithms grpo dpo --steps 20 --out benchmarks/results-quick

Each run goes through benchmarks/measure.py (wall time, peak memory) and leaves its own run directory under --out,
by default a fresh benchmarks/results-<YYYYmmdd-HHMMSS>, so committed results are never overwritten. Given an
existing --out, a finished run there is reused (read up to --steps if it went further), so an interrupted benchmark
continues where it stopped when given its directory again. Held-out accuracy is greedy, on the same --eval-size
problems of the held-out split for every algorithm, before the first step and after the last. The curves are
plot.py's (skipped, with a note, when matplotlib is not installed).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from plot import NoMatplotlib, load_runs, plot_runs  # noqa: E402  (the repository root's plot.py)
from plumbing import cli, exit_on_error, require, run_command  # noqa: E402

# Per-algorithm settings: each script's defaults, with batch sizes cut so that the whole benchmark fits a few hours
# of two CPU cores: 64 sampled completions per step for the group methods (8 prompts x 8), 32 rollouts for PPO
# (which also trains a critic). SFT and DPO train on data from the same task: correct answers, and pairs of the
# model's own right and wrong samples.
SETTINGS = {
    "sft": ["--batch-size", "32"],
    "dpo": ["--num-prompts", "256", "--num-samples", "8", "--batch-size", "16"],
    "grpo": ["--batch-size", "8", "--group-size", "8", "--micro-batch-size", "16"],
    "gspo": ["--batch-size", "8", "--group-size", "8", "--micro-batch-size", "16"],
    "reinforce": ["--baseline", "rloo", "--batch-size", "8", "--group-size", "8", "--micro-batch-size", "16"],
    "ppo": ["--batch-size", "32", "--mini-batch-size", "16", "--micro-batch-size", "16"],
}


@dataclass
class Args:
    algorithms: tuple[str, ...] = ("sft", "dpo", "grpo", "gspo", "reinforce", "ppo")
    """which scripts to run, in this order"""
    steps: int = 30
    """optimiser (SFT, DPO) or sampling (RL) steps for every algorithm"""
    eval_every: int = 10
    """steps between held-out evaluations"""
    eval_size: int = 200
    """held-out problems per evaluation"""
    seed: int = 0
    out: str | None = None
    """where the run directories, results.json, results.md and the plots go; None: a fresh
    benchmarks/results-<YYYYmmdd-HHMMSS>. An existing one is continued, its finished runs reused"""
    extra: list[str] = field(default_factory=list)
    """more flags for every script, e.g. --extra=--dtype=bfloat16"""


def run(algorithm: str, args: Args, out: Path) -> dict:
    run_dir, cost_file = out / algorithm, out / f"{algorithm}.cost.json"
    if not (cost_file.exists() and (run_dir / "final").exists()):
        command = [sys.executable, str(ROOT / "benchmarks" / "measure.py"), str(cost_file), f"{algorithm}.py",
                   *SETTINGS[algorithm], "--max-steps", str(args.steps), "--eval-every", str(args.eval_every),
                   "--eval-size", str(args.eval_size), "--seed", str(args.seed), "--output-dir", str(run_dir),
                   "--save-every", str(10 * args.steps), *args.extra]
        print(" ".join(command), flush=True)
        run_command(command, f"{algorithm}.py", cwd=ROOT)
    # A finished run that went further than --steps (an earlier, longer benchmark) is read up to --steps.
    log = [m for line in open(run_dir / "metrics.jsonl") if (m := json.loads(line))["step"] <= args.steps]
    if log[-1]["step"] < args.steps:
        require(False, f"{run_dir} stopped at step {log[-1]['step']} < --steps {args.steps}: delete it to rerun")
    evals = [(m["step"], m["eval_accuracy"]) for m in log if "eval_accuracy" in m]
    steps = [m for m in log if "step_time" in m]
    mean = lambda key: sum(m[key] for m in steps if key in m) / max(1, sum(key in m for m in steps))  # noqa: E731
    return {"algorithm": algorithm, "settings": " ".join(SETTINGS[algorithm]), **json.loads(cost_file.read_text()),
            "accuracy_before": evals[0][1], "accuracy_after": evals[-1][1], "evals": evals,
            "train_time_s": sum(m["step_time"] for m in steps), "step_time_s": mean("step_time"),
            "sample_tokens_per_s": mean("sample_tokens_per_s") or None,
            "train_tokens_per_s": mean("train_tokens_per_s"), "log": log}


def output_dir(args: Args) -> Path:
    """--out, absolute (the scripts run with the repository root as their working directory)."""
    return Path(args.out or ROOT / "benchmarks" / f"results-{time.strftime('%Y%m%d-%H%M%S')}").resolve()


def plot(args: Args, out: Path) -> None:
    """plot.py's curves of the benchmark's runs, read up to --steps like the table."""
    runs = [(label, [m for m in rows if m["step"] <= args.steps])
            for label, rows in load_runs([out / algorithm for algorithm in args.algorithms])]
    try:
        print(f"wrote {plot_runs(runs, out / 'curves.png')}")
    except NoMatplotlib:
        print("skipped the plot: matplotlib is not installed (pip install matplotlib)")


def table(results: list[dict]) -> str:
    device = results[0]["device"]
    memory = "peak CUDA memory (MiB)" if "peak_cuda_mib" in results[0] else "peak RSS (MiB)"
    lines = [f"Device: {device}, {results[0]['threads']} threads. Same starting model, same held-out problems.", "",
             f"| algorithm | held-out accuracy before -> after | steps | train time (min) | s / step | "
             f"sampling tok/s | training tok/s | {memory} | settings |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        sample = f"{r['sample_tokens_per_s']:.0f}" if r["sample_tokens_per_s"] else "-"
        peak = r.get("peak_cuda_mib", r["peak_rss_mib"])
        lines.append(f"| {r['algorithm']} | {r['accuracy_before']:.1%} -> **{r['accuracy_after']:.1%}** | "
                     f"{r['evals'][-1][0]} | {r['train_time_s'] / 60:.1f} | {r['step_time_s']:.1f} | {sample} | "
                     f"{r['train_tokens_per_s']:.0f} | {peak:.0f} | `{r['settings']}` |")
    return "\n".join(lines) + "\n"


def main(args: Args) -> None:
    unknown = [a for a in args.algorithms if a not in SETTINGS]
    require(not unknown, f"--algorithms {' '.join(unknown)}: expected some of {' '.join(SETTINGS)}")
    require(args.steps >= 1 and args.eval_every >= 1 and args.eval_size >= 1,
            "--steps, --eval-every and --eval-size must be >= 1")
    out = output_dir(args)
    out.mkdir(parents=True, exist_ok=True)
    results = [run(algorithm, args, out) for algorithm in args.algorithms]
    (out / "results.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "log"} for r in results],
                                                 indent=2) + "\n")
    (out / "results.md").write_text(table(results))
    print(table(results))
    plot(args, out)


if __name__ == "__main__":
    with exit_on_error():
        main(cli(Args, description=__doc__))
