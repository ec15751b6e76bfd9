"""benchmarks/gpu.py, the one command a session lent a GPU runs: checked here on the tiny model, on a CPU, in bf16
(through autocast), so that on the GPU the minutes go to measuring. Four scripts (a group method, PPO, DPO on pairs,
online RFT on the toy task) and the sampling and phase benchmarks; each script's own tests cover it in fp32."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from helpers import pair_files, toy_task

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_command_runs_scripts_and_benchmarks_into_one_results_file(tmp_path, tiny_model_dir):
    pairs, _ = pair_files(tmp_path)
    toy = toy_task(tmp_path)
    out = tmp_path / "gpu"
    done = subprocess.run([sys.executable, "benchmarks/gpu.py", "--device", "cpu", "--dtype", "bfloat16", "--tiny",
                           "--no-trl", "--model", tiny_model_dir, "--steps", "2", "--out", str(out),
                           "--scripts", "grpo", "ppo", "dpo", "rft",
                           "--flags", f"dpo:--data={pairs}", f"rft:--data={toy}", "rft:--online",
                           f"grpo:--data={toy}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((out / "gpu.json").read_text())
    assert [r["script"] for r in results["scripts"]] == ["grpo", "ppo", "dpo", "rft"]
    for r in results["scripts"]:
        assert r["status"] == 0 and r["s_per_step"] > 0 and r["peak_rss_mib"] > 0, r
        args = json.loads((out / r["script"] / "args.json").read_text())
        assert args["dtype"] == "bfloat16" and args["device"] == "cpu" and args["max_steps"] == 2
    table = (out / "gpu.md").read_text()
    assert table.count("| ok |") == 4 and "## sampling" in table and "## roofline" in table
    assert "| sampling |" in results["roofline"]["table"] and "bfloat16" in results["roofline"]["table"]


def test_a_bad_gpu_command_is_one_line(tmp_path):
    cases = [(["--scripts", "grpo", "nope"], "--scripts nope"), (["--flags", "grpo-group-size=4"],
                                                                  "--flags grpo-group-size=4")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "no CUDA device"))
    for flags, message in cases:
        done = subprocess.run([sys.executable, "benchmarks/gpu.py", *flags, "--out", str(tmp_path / "x")], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and done.stderr.strip().startswith("error: ") and message in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
