"""Every script: `--help` runs and documents every flag."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["sft.py", "reinforce.py", "ppo.py", "reward.py", "grpo.py", "grpo_iterative.py", "gspo.py", "dpo.py",
           "rft.py", "trpo.py"]


def args_fields(script: str) -> dict[str, bool]:
    """Each field of the script's Args dataclass and of the shared classes in plumbing.py it inherits (TrainArgs,
    SamplingArgs), and whether a docstring follows it."""
    fields = {}
    for path, name in [("plumbing.py", "TrainArgs"), ("plumbing.py", "SamplingArgs"), (script, "Args")]:
        tree = ast.parse((ROOT / path).read_text())
        cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)
        if name == "SamplingArgs" and not any(getattr(b, "id", "") == "SamplingArgs" for b in args_bases(script)):
            continue
        fields.update({n.target.id: isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                       for n, nxt in zip(cls.body, cls.body[1:] + [None]) if isinstance(n, ast.AnnAssign)})
    return fields


def args_bases(script: str) -> list:
    tree = ast.parse((ROOT / script).read_text())
    return next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Args").bases


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_documents_every_flag(script):
    out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "COLUMNS": "200"}).stdout
    fields = args_fields(script)
    assert [name for name, documented in fields.items() if not documented] == []
    assert [name for name in fields if "--" + name.replace("_", "-") not in out] == []
