"""The shape of the house: the shared flags declared once, each script's own flags first, imports that run one way,
and a script that works when copied with common.py and plumbing.py alone."""

import ast
import dataclasses
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import toy_task

import plumbing

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["sft", "reinforce", "ppo", "reward", "grpo", "grpo_iterative", "gspo", "dpo", "rft", "trpo"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_script_declares_a_shared_flag_again_only_to_change_its_default(script):
    Args = importlib.import_module(script).Args
    base = next(c for c in Args.__mro__ if c in (plumbing.TrainArgs, plumbing.SamplingArgs))
    shared = {f.name: f.default for f in dataclasses.fields(base)}
    redeclared = [name for name in Args.__dict__.get("__annotations__", {}) if name in shared]
    assert [name for name in redeclared if Args.__dataclass_fields__[name].default == shared[name]] == []
    assert len(shared) >= 30 and set(shared) <= {f.name for f in dataclasses.fields(Args)}


def test_help_lists_the_algorithms_own_flags_first(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    grpo = importlib.import_module("grpo")
    with pytest.raises(SystemExit):
        plumbing.parse_args(grpo.Args, grpo.__doc__, ["--help"])
    text = capsys.readouterr().out
    flags = [text.index(f"  {flag}\n") for flag in ("--group-size INT", "--clip-eps-low FLOAT", "--model STR",
                                                      "--seed INT", "--max-new-tokens INT", "--lora-rank INT")]
    assert flags == sorted(flags)  # grpo's own flags, then the shared ones in their groups (plumbing.FLAG_GROUPS)


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {alias.name for n in ast.walk(tree) if isinstance(n, ast.Import) for alias in n.names} | \
        {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}


def test_imports_run_one_way_scripts_to_plumbing_to_common():
    assert not imported_modules(ROOT / "common.py") & {"plumbing", *SCRIPTS}
    assert imported_modules(ROOT / "plumbing.py") & {"plumbing", *SCRIPTS} == set()
    for script in SCRIPTS:
        assert {"common", "plumbing"} <= imported_modules(ROOT / f"{script}.py")
        assert not imported_modules(ROOT / f"{script}.py") & (set(SCRIPTS) - {script}), script  # reads alone


def one_step(script: str, tmp_path: Path) -> list[str]:
    """Flags for one small step of a script on the toy data."""
    toy = toy_task(tmp_path)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Say {d}.", "chosen": "7", "rejected": str(d)}) + "\n"
                             for d in range(7)))
    sft_rows = tmp_path / "sft.jsonl"
    sft_rows.write_text("".join(json.dumps({"prompt": f"Say {d}.", "completion": "7"}) + "\n" for d in range(8)))
    rl = ["--data", toy, "--batch-size", "2", "--micro-batch-size", "4", "--max-new-tokens", "3"]
    return ["--max-steps", "1", "--eval-size", "0", *{
        "sft": ["--data", str(sft_rows), "--batch-size", "2", "--micro-batch-size", "2"],
        "reward": ["--data", str(pairs), "--batch-size", "2", "--micro-batch-size", "2"],
        "dpo": ["--data", str(pairs), "--batch-size", "2", "--micro-batch-size", "2"],
        "grpo": [*rl, "--group-size", "2"],
        "grpo_iterative": [*rl, "--group-size", "2", "--iteration-steps", "1"],
        "gspo": [*rl, "--group-size", "2", "--mini-batch-size", "4"],
        "reinforce": [*rl, "--group-size", "2"],
        "trpo": [*rl, "--group-size", "2", "--cg-iters", "2"],
        "ppo": [*rl, "--batch-size", "4", "--mini-batch-size", "4"],
        "rft": [*rl, "--online", "--num-samples", "2"],
    }[script]]


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_script_copied_with_common_and_plumbing_into_an_empty_folder_runs_there(script, tmp_path, tiny_model_dir):
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    for name in (f"{script}.py", "common.py", "plumbing.py"):
        shutil.copy(ROOT / name, folder / name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, f"{script}.py", "--model", tiny_model_dir, "--output-dir", "run",
                          "--device", "cpu", *one_step(script, tmp_path)], cwd=folder, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (folder / "run" / "final").is_dir() and json.loads((folder / "run" / "metrics.jsonl").read_text()
                                                              .splitlines()[-1])["step"] == 1
