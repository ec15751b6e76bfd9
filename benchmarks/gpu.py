"""One command for a machine with a GPU: every script for a few steps in bf16, the sampling and phase benchmarks,
and the TRL comparison, all written into one results file, so that minutes on a borrowed GPU go to measuring.

    python benchmarks/gpu.py                                  # CUDA, bf16, the default model (~15 min on an H100)
    python benchmarks/gpu.py --scripts grpo dpo --steps 5     # some scripts only
    python benchmarks/gpu.py --device cpu --model <dir> --tiny --no-trl   # the command itself, on a tiny model

Each script runs through benchmarks/measure.py (wall time, peak CUDA memory) with its GPU defaults, `--max-steps
--steps`, and one held-out evaluation of --eval-size problems at the start and the end; `--tiny` swaps in sizes for a
tiny test model instead. A script that fails is recorded with its exit status and the others still run. Results:
<out>/gpu.json and <out>/gpu.md (one row per script: wall time, seconds per step, peak memory, last reward or loss,
held-out accuracy before and after), with benchmarks/sampling.py's and benchmarks/roofline.py's tables below.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from plumbing import DEFAULT_MODEL, cli, exit_on_error, require  # noqa: E402

SCRIPTS = ["sft", "reward", "reinforce", "ppo", "trpo", "grpo", "grpo_iterative", "gspo", "dpo", "rft"]
# --tiny: sizes for a tiny test model on a CPU (a check that every command runs, not a measurement). A tiny random
# model is never right on the built-in task: give dpo pairs and rft prompts it can get right through --flags.
TINY = {"*": ["--batch-size", "2", "--micro-batch-size", "2", "--eval-size", "4"],
        "reinforce": ["--group-size", "2", "--max-new-tokens", "3"], "trpo": ["--group-size", "2", "--cg-iters", "2",
                                                                             "--max-new-tokens", "3"],
        "grpo": ["--group-size", "2", "--max-new-tokens", "3"], "gspo": ["--group-size", "2", "--max-new-tokens", "3"],
        "grpo_iterative": ["--group-size", "2", "--max-new-tokens", "3"],
        "ppo": ["--mini-batch-size", "2", "--max-new-tokens", "3"], "sft": ["--max-new-tokens", "3"],
        "dpo": ["--max-new-tokens", "3"], "rft": ["--num-samples", "2", "--max-new-tokens", "3"], "reward": []}


@dataclass
class Args:
    model: str = DEFAULT_MODEL
    """the model every script starts from"""
    scripts: list[str] = field(default_factory=lambda: list(SCRIPTS))
    """the scripts to run"""
    steps: int = 3
    """training steps of each script"""
    eval_size: int = 64
    """held-out problems of each script's two evaluations"""
    device: str = "cuda"
    dtype: str = "bfloat16"
    tiny: bool = False
    """sizes for a tiny test model (checks the command, measures nothing)"""
    flags: list[str] = field(default_factory=list)
    """more flags for one script, as script:--flag=value, e.g. grpo:--group-size=16 (repeat for more)"""
    sampling: bool = True
    """also run benchmarks/sampling.py"""
    roofline: bool = True
    """also run benchmarks/roofline.py"""
    trl: bool = True
    """also run benchmarks/trl_compare.py (needs benchmarks/requirements.txt)"""
    out: str = "benchmarks/results-gpu"
    """where the runs, gpu.json and gpu.md go"""


def last(run_dir: Path, *keys: str):
    """The last logged value of the first key present, from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")] if (run_dir / "metrics.jsonl").exists() else []
    for key in keys:
        values = [r[key] for r in rows if key in r]
        if values:
            return values
    return []


def run_script(script: str, args: Args, out: Path) -> dict:
    run_dir = out / script
    flags = ["--model", args.model, "--device", args.device, "--dtype", args.dtype, "--max-steps", str(args.steps),
             "--eval-every", str(args.steps), "--save-every", str(10 * args.steps), "--output-dir", str(run_dir)]
    flags += [*TINY["*"], *TINY[script]] if args.tiny else ["--eval-size", str(args.eval_size)]
    flags += [f.split(":", 1)[1] for f in args.flags if f.split(":", 1)[0] == script]
    command = [sys.executable, str(ROOT / "benchmarks" / "measure.py"), str(out / f"{script}.measure.json"),
               f"{script}.py", *flags]
    print(" ".join(command[1:]), flush=True)
    start = time.time()
    done = subprocess.run(command, cwd=ROOT)
    result = {"script": script, "status": done.returncode, "wall_s": time.time() - start}
    if done.returncode == 0:
        result = {**json.loads((out / f"{script}.measure.json").read_text()), **result}  # its peak memory
        times = last(run_dir, "step_time")
        accuracy = last(run_dir, "eval_accuracy", "eval_pair_accuracy")
        result.update(s_per_step=sum(times) / len(times) if times else None,
                      reward_or_loss=(last(run_dir, "reward_mean", "loss") or [None])[-1],
                      eval_first=accuracy[0] if accuracy else None, eval_last=accuracy[-1] if accuracy else None)
    else:
        print(f"{script}.py stopped with exit status {done.returncode} (its message is above); going on", flush=True)
    return result


def fmt(value) -> str:
    return "-" if value is None else f"{value:.3g}"


def run_benchmark(name: str, flags: list[str], out: Path) -> dict:
    command = [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *flags, "--out", str(out / name)]
    print(" ".join(command[1:]), flush=True)
    done = subprocess.run(command, cwd=ROOT, env=dict(os.environ))
    table = out / name / f"{name}.md"
    return {"status": done.returncode, "table": table.read_text() if done.returncode == 0 and table.exists() else None}


def main(args: Args) -> None:
    unknown = sorted(set(args.scripts) - set(SCRIPTS))
    bad = [f for f in args.flags if f.split(":", 1)[0] not in SCRIPTS or not f.partition(":")[2].startswith("--")]
    require(not bad, f"--flags {' '.join(bad)}: expected script:--flag=value with a script of {' '.join(SCRIPTS)}")
    require(not unknown, f"--scripts {' '.join(unknown)}: expected some of {' '.join(SCRIPTS)}")
    require(args.steps >= 1 and args.eval_size >= 1, "--steps and --eval-size must be >= 1")
    if args.device.startswith("cuda"):
        import torch
        require(torch.cuda.is_available(), "--device cuda: no CUDA device is visible here; on a CPU, pass --device "
                                           "cpu (and --tiny with a tiny model to check the command)")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = {"args": vars(args), "scripts": [run_script(s, args, out) for s in args.scripts]}
    common = ["--model", args.model, "--device", args.device, "--dtype", args.dtype]
    small = ["--max-new-tokens", "4"] if args.tiny else []
    if args.sampling:
        results["sampling"] = run_benchmark("sampling", [*common, *small, "--repeats", "1" if args.tiny else "3",
                                                         "--batch-sizes", *(["4"] if args.tiny else ["16", "64", "256"]),
                                                         "--no-compile" if args.tiny else "--compile"], out)
    if args.roofline:
        sizes = ["--batch-size", "2", "--group-size", "2", "--micro-batch-size", "4"] if args.tiny else \
            ["--batch-size", "16", "--group-size", "8", "--micro-batch-size", "64"]
        results["roofline"] = run_benchmark("roofline", [*common, *small, *sizes], out)
    if args.trl:
        if importlib.util.find_spec("trl") is None:
            results["trl_compare"] = {"status": None, "table": "skipped: trl is not installed (pip install -r "
                                                               "benchmarks/requirements.txt)"}
        else:
            results["trl_compare"] = run_benchmark("trl_compare", ["--steps", str(args.steps)], out)
    (out / "gpu.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    lines = [f"Every script for {args.steps} steps on {args.device}, {args.dtype}, from {args.model}.", "",
             "| script | status | wall s | s/step | peak MiB | last reward or loss | held-out: first -> last |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results["scripts"]:
        peak = r.get("peak_cuda_mib", r.get("peak_rss_mib"))
        status = "ok" if r["status"] == 0 else f"exit {r['status']}"
        lines.append(f"| {r['script']} | {status} | {r['wall_s']:.0f} | "
                     f"{fmt(r.get('s_per_step'))} | {fmt(peak)} | {fmt(r.get('reward_or_loss'))} | "
                     f"{fmt(r.get('eval_first'))} -> {fmt(r.get('eval_last'))} |")
    for name in ("sampling", "roofline", "trl_compare"):
        if name in results:
            lines += ["", f"## {name}", "", results[name]["table"] or f"failed (exit {results[name]['status']})"]
    (out / "gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    failed = [r["script"] for r in results["scripts"] if r["status"]] + \
        [n for n in ("sampling", "roofline", "trl_compare") if results.get(n, {}).get("status")]
    require(not failed, f"{', '.join(failed)} failed (see above); the others' results are in {out / 'gpu.md'}")


if __name__ == "__main__":
    with exit_on_error():
        main(cli(Args, description=__doc__))
