"""The sweep: every entry point (the training scripts, plot.py, the benchmarks' commands) run through its own
`if __name__ == "__main__"` block with bad input, asserting what a user sees and what is left on disk: one line
that names what to fix, no traceback, exit status 2 for a refusal (nothing written), 1 for a fault during a run
(the last checkpoint intact).

The entry points run in this process (runpy, as `python script.py` would run them; a subprocess per case would
spend most of the time importing torch); tests/test_surfaces.py runs a few of the same through a real subprocess."""

import errno
import runpy
import sys
import traceback
import types
from pathlib import Path

import pytest
from helpers import toy_task

import plumbing

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["sft", "reinforce", "ppo", "reward", "grpo", "grpo_iterative", "gspo", "dpo", "rft", "trpo"]
GROUPS = {"reinforce", "grpo", "grpo_iterative", "gspo", "trpo"}  # scripts that sample groups of completions: --group-size


def run_entry(path: Path, argv: list[str], capsys) -> tuple[int, str]:
    """(exit status, stderr) of `python <path> <argv>`; an uncaught exception is what Python would print."""
    capsys.readouterr()
    saved = sys.argv
    sys.argv = [str(path), *argv]
    try:
        runpy.run_path(str(path), run_name="__main__")
        status, tb = 0, ""
    except SystemExit as e:
        status, tb = (e.code if isinstance(e.code, int) else 0 if e.code is None else 1), ""
    except BaseException:  # noqa: BLE001 - what the interpreter would print, then status 1
        status, tb = 1, traceback.format_exc()
    finally:
        sys.argv = saved
    return status, capsys.readouterr().err + tb


def assert_one_line(status: int, err: str, expected: int, says: str) -> None:
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert status == expected and len(errors) == 1 and says in errors[0], (status, err[-3000:])


# ---- the training scripts: (case, extra flags, what the line names); every one a refusal, nothing written ---------

def fake_tracker(name: str, message: str) -> types.ModuleType:
    """A tracker package that is installed but not logged in: its init raises, as wandb's does without an API key."""
    module = types.ModuleType(name)

    def init(**kwargs):
        raise RuntimeError(message)
    module.init, module.log, module.finish = init, lambda *a, **k: None, lambda: None
    return module


REFUSALS = [
    ("a flag out of range", ["--max-steps", "0"], "--max-steps 0: must be >= 1"),
    ("a flag that does not exist", ["--max-stepz", "3"], "--max-stepz"),
    ("a value of the wrong type", ["--batch-size", "two"], "--batch-size"),
    ("a model path that does not exist", ["--model", "./no-such-model"], "no-such-model"),
    ("a data file that does not exist", ["--data", "no-such.jsonl"], "no-such.jsonl"),
    ("a data file of an unknown kind", ["--data", "rows.xml"], "rows.xml"),
    ("--output-dir is a file", ["--output-dir", "a-file"], "a file is in the way"),
    ("--output-dir under a file", ["--output-dir", "a-file/run"], "a file is in the way"),
    ("--resume of nothing", ["--resume", "nowhere"], "no run there"),
    ("a LoRA target that matches nothing", ["--lora-rank", "2", "--lora-target-modules", "q_proj,v_projj"],
     "v_projj matches no module"),
    ("a LoRA flag without --lora-rank", ["--lora-alpha", "8"], "--lora-alpha 8.0: has no effect without --lora-rank"),
    ("a built-in task flag with --data", ["--data", "toy.jsonl", "--digits", "3"], "--digits 3: has no effect"),
    ("--eval-data with no held-out set", ["--eval-data", "toy.jsonl"], "--eval-data toy.jsonl: has no effect"),
    ("--fsdp without torchrun", ["--fsdp"], "torchrun"),
    ("--device of no kind", ["--device", "tpu"], "--device tpu"),
    ("a tracker that is not logged in", ["--report-to", "wandb"], "--report-to wandb: could not start a run"),
    ("a tracker that is not installed", ["--report-to", "trackio"], "pip install trackio"),
    ("a data file whose reader is not installed", ["--data", "rows.parquet"], "pip install datasets"),
]

OWN_FLAGS_WITHOUT_EFFECT = {  # each script's own flags that a combination makes do nothing
    "sft": (["--completion-field", "output"], "--completion-field output: has no effect without --data"),
    "reinforce": (["--baseline-decay", "0.5"], "--baseline-decay 0.5: has no effect with --baseline rloo"),
    "ppo": (["--kl-horizon", "500"], "--kl-horizon 500: has no effect without --target-kl",
            ["--penalty-beta", "2"], "--penalty-beta 2.0: has no effect with --policy-loss clip"),
    "reward": (["--chosen-field", "good"], "--chosen-field good: has no effect without --data"),
    "grpo": (["--clip-eps-high", "0.28"], "--clip-eps-high 0.28: has no effect with one update per sampled batch"),
    "grpo_iterative": (["--rm-steps", "3"], "--rm-steps 3: has no effect without --reward-model"),
    "gspo": (["--format-reward", "0.1", "--group-size", "1"], "--group-size 1: must be >= 2"),
    "dpo": (["--data", "toy.jsonl", "--num-samples", "4"], "--num-samples 4: has no effect with --data"),
    "rft": (["--online", "--num-prompts", "8"], "--num-prompts 8: has no effect with --online"),
    "trpo": (["--learning-rate", "0.001"], "--learning-rate 0.001: has no effect in TRPO"),
}


OVERRIDES = {  # where a script refuses the case for a reason of its own, first
    ("grpo_iterative", "a LoRA target that matches nothing"): "--iteration-steps with --lora-rank",
    ("trpo", "--fsdp without torchrun"): "--fsdp: TRPO solves for one flat vector",
}


def base_flags(script: str, model: str) -> list[str]:
    return ["--model", model, "--max-steps", "1", "--batch-size", "2", "--eval-size", "0", "--output-dir", "run",
            *(["--group-size", "2"] if script in GROUPS else []),
            *(["--max-new-tokens", "3"] if script not in ("sft", "reward") else [])]


def merged(flags: list[str], extra: list[str]) -> list[str]:
    """The base flags with the case's: a flag the case gives replaces the base's (each base flag takes a value)."""
    given = {a for a in extra if a.startswith("--")}
    pairs = [flags[i:i + 2] for i in range(0, len(flags), 2)]
    return [a for pair in pairs if pair[0] not in given for a in pair] + extra


FILES = ["a-file", "rows.parquet", "rows.xml", "toy.jsonl"]  # what prepared() puts in the working directory


def prepared(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("not a directory\n")
    (tmp_path / "rows.xml").write_text("<rows/>\n")
    (tmp_path / "rows.parquet").write_bytes(b"PAR1")
    toy_task(tmp_path)
    monkeypatch.setitem(sys.modules, "wandb", fake_tracker("wandb", "api_key not configured (no-tty). call "
                                                                    "wandb.login(key=[your_api_key])"))
    monkeypatch.setitem(sys.modules, "trackio", None)  # import trackio: ImportError, as when it is not installed
    monkeypatch.setitem(sys.modules, "datasets", None)  # the same for `datasets`, which reads parquet


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_mistake_is_one_line_and_writes_nothing(script, tmp_path, monkeypatch, capsys, tiny_model_dir):
    prepared(tmp_path, monkeypatch)
    failures = []
    own = OWN_FLAGS_WITHOUT_EFFECT[script]  # (flags, what the line names), one pair or more
    cases = [*REFUSALS, *((f"its own flag without effect {i}", *own[i:i + 2]) for i in range(0, len(own), 2))]
    for case, extra, says in cases:
        says = OVERRIDES.get((script, case), says)
        status, err = run_entry(ROOT / f"{script}.py", merged(base_flags(script, tiny_model_dir), extra), capsys)
        try:
            assert_one_line(status, err, 2, says)
            assert sorted(p.name for p in tmp_path.iterdir()) == FILES
            assert (tmp_path / "a-file").read_text() == "not a directory\n"
        except AssertionError as e:
            failures.append(f"{case}: {e}")
    assert failures == []


# ---- faults during a run: exit status 1, the last checkpoint intact ------------------------------------------------

@pytest.mark.parametrize("script", ["sft", "grpo"])
def test_a_full_disk_at_the_final_save_is_one_line_status_1_and_keeps_the_checkpoint(script, tmp_path, monkeypatch,
                                                                                  capsys, tiny_model_dir):
    prepared(tmp_path, monkeypatch)
    from transformers import PreTrainedModel
    real = PreTrainedModel.save_pretrained

    def save(self, directory, *args, **kwargs):
        if "final" in str(directory):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, directory, *args, **kwargs)
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save)
    flags = base_flags(script, tiny_model_dir)
    flags[flags.index("--max-steps") + 1] = "2"
    status, err = run_entry(ROOT / f"{script}.py", [*flags, "--save-every", "1"], capsys)
    assert_one_line(status, err, 1, "no space left on device")
    run = tmp_path / "run"
    assert plumbing.read_trainer_state(run / "checkpoint")["step"] == 1
    assert not (run / "final").exists() and not list(run.glob("*.tmp"))


def test_a_tracker_that_fails_on_resume_leaves_the_run_as_it_was(tmp_path, monkeypatch, capsys, tiny_model_dir):
    prepared(tmp_path, monkeypatch)
    flags = [*base_flags("grpo", tiny_model_dir), "--save-every", "1"]
    flags[flags.index("--max-steps") + 1] = "2"
    assert run_entry(ROOT / "grpo.py", flags, capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    status, err = run_entry(ROOT / "grpo.py", ["--resume", "run", "--max-steps", "3", "--report-to", "wandb"], capsys)
    assert_one_line(status, err, 2, "could not start a run")
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == before


# ---- plot.py and the benchmarks' commands ----------------------------------------------------------------------------

OTHER_ENTRIES = [
    ("plot.py", [], "give at least one run directory"),
    ("plot.py", ["no-such-run"], "no-such-run: no metrics.jsonl"),
    ("plot.py", ["run", "--labels", "a", "b"], "--labels: 2 given for 1 runs"),
    ("plot.py", ["run", "--smooth", "0"], "--smooth 0: must be >= 1"),
    ("plot.py", ["run", "--out", "curves.xyz"], "--out curves.xyz: the name picks the format"),
    ("plot.py", ["run", "--out", "a-file/curves.png"], "--out a-file/curves.png: could not write it"),
    ("plot.py", ["run", "--smoth", "3"], "--smoth"),
    ("benchmarks/run.py", ["--algorithms", "grpo", "rlhf"], "--algorithms rlhf"),
    ("benchmarks/run.py", ["--steps", "0"], "--steps"),
    ("benchmarks/lora_memory.py", ["--algorithms", "sft"], "--algorithms sft"),
    ("benchmarks/process_supervision.py", ["--steps", "0"], "--steps"),
    ("benchmarks/sampling.py", ["--batch-sizes", "0"], "--batch-sizes"),
    ("benchmarks/sampling.py", ["--repeats", "x"], "--repeats"),
    ("benchmarks/trl_compare.py", ["--pairs", "ppo"], "--pairs"),
    ("benchmarks/measure.py", [], "usage: python benchmarks/measure.py"),
    ("benchmarks/measure.py", ["out.json", "nosuch.py"], "usage: python benchmarks/measure.py"),
]


def test_plot_and_the_benchmarks_refuse_in_one_line(tmp_path, monkeypatch, capsys):
    prepared(tmp_path, monkeypatch)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "reward_mean": 0.5}\n')
    failures = []
    for entry, argv, says in OTHER_ENTRIES:
        status, err = run_entry(ROOT / entry, argv, capsys)
        try:
            assert_one_line(status, err, 2, says)
            assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*FILES, "run"])
        except AssertionError as e:
            failures.append(f"{entry} {' '.join(argv)}: {e}")
    assert failures == []


def test_a_benchmark_whose_run_fails_says_how_to_continue(tmp_path, monkeypatch, capsys):
    """benchmarks/run.py runs each script in a child process: a child's failure is one more line, status 1."""
    prepared(tmp_path, monkeypatch)
    monkeypatch.setattr(sys, "executable", "false")  # every child exits with status 1
    status, err = run_entry(ROOT / "benchmarks" / "run.py", ["--algorithms", "grpo", "--out", "bench"], capsys)
    assert_one_line(status, err, 1, "grpo.py stopped (exit status 1")


# ---- --help: one paragraph per flag, wrapped to the terminal, in groups -------------------------------------------

@pytest.mark.parametrize("width", [60, 120])
def test_help_wraps_each_flag_to_the_terminal_in_groups(width, monkeypatch, capsys):
    import grpo
    monkeypatch.setenv("COLUMNS", str(width))
    monkeypatch.setattr(sys, "argv", ["grpo.py", "--help"])
    with pytest.raises(SystemExit) as e:
        plumbing.parse_args(grpo.Args, grpo.__doc__)
    text = capsys.readouterr().out
    assert e.value.code == 0
    flag_lines = text[text.index("grpo's own flags:"):].splitlines()
    assert max(len(line) for line in flag_lines) <= width  # the flags' text fits; the docstring's equations may not
    for title in ("grpo's own flags:", *(f"{t}:" for t in plumbing.FLAG_GROUPS)):
        assert f"\n{title}\n" in text
    # --loss-agg's docstring has a line break mid-sentence in the source: the help joins it, then wraps
    para = text[text.index("  --loss-agg"):].split("\n  --")[0]
    words = " ".join(line.strip() for line in para.splitlines()[1:])
    assert "token: mean over all tokens (DAPO); constant: sum over tokens" in words
    assert all(len(line) <= width for line in para.splitlines())


def test_every_shared_flag_is_in_one_help_group():
    grouped = [n for names in plumbing.FLAG_GROUPS.values() for n in names]
    assert sorted(grouped) == sorted(f.name for f in plumbing.dataclasses.fields(plumbing.SamplingArgs))
