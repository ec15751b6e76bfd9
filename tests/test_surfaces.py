"""Surfaces a user touches, through the real entry points: a mistake or a fault ends in one line that names what to
fix, with no traceback, and leaves nothing half-written; a small run fits its own defaults; CSV and TSV files are
read as the text they hold."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import toy_task

import common
import plumbing

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / f"{script}.py"), *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})


def one_line_error(out: subprocess.CompletedProcess, status: int, says: str) -> None:
    assert out.returncode == status, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and says in errors[0], out.stderr[-2000:]


# ---- the sweep: bad input through the real entry point; what is on disk afterwards -------------------------------

@pytest.mark.parametrize("case", ["output-dir-is-a-file", "output-dir-under-a-file",
                                  "tsv-row-with-a-tab-too-many"])
def test_a_mistake_is_one_line_and_writes_nothing(case, tmp_path, tiny_model_dir):
    (tmp_path / "a-file").write_text("not a directory\n")
    toy = toy_task(tmp_path)
    argv = ["--model", tiny_model_dir, "--data", toy, "--eval-size", "0", "--max-steps", "1", "--batch-size", "2",
            "--group-size", "2", "--max-new-tokens", "3", "--output-dir", str(tmp_path / "run")]
    if case == "output-dir-is-a-file":
        argv[-1], says = str(tmp_path / "a-file"), "a file is in the way"
    elif case == "output-dir-under-a-file":
        argv[-1], says = str(tmp_path / "a-file" / "run"), "a file is in the way"
    else:
        (tmp_path / "rows.tsv").write_text("prompt\tanswer\nSay 1.\t7\nSay 2.\t7\textra\n")
        argv[argv.index(toy)], says = str(tmp_path / "rows.tsv"), "rows.tsv:3: 3 cells, but the header line has 2"
    out = run("grpo", *argv, cwd=tmp_path)
    one_line_error(out, 2, says)
    assert not (tmp_path / "run").exists() and (tmp_path / "a-file").read_text() == "not a directory\n"


def test_a_full_disk_while_safetensors_writes_is_one_line_and_keeps_the_last_copy(tmp_path, tiny_model_dir,
                                                                                 monkeypatch):
    model, tokenizer = plumbing.load_model(tiny_model_dir)
    target = tmp_path / "checkpoint"
    plumbing.save_pretrained(model, tokenizer, target, {"step": 1})
    before = sorted(p.name for p in target.iterdir())

    def full_disk(*args, **kwargs):
        from safetensors import SafetensorError
        raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")
    monkeypatch.setattr(type(model), "save_pretrained", full_disk)
    with pytest.raises(common.RunError, match="could not write .*checkpoint.tmp"):
        plumbing.save_pretrained(model, tokenizer, target, {"step": 2})
    assert sorted(p.name for p in target.iterdir()) == before and not (tmp_path / "checkpoint.tmp").exists()


# ---- a small run fits the defaults it did not set -------------------------------------------------------------------

def test_a_small_grpo_run_fits_the_micro_batch_it_did_not_set(tmp_path, tiny_model_dir):
    out = run("grpo", "--model", tiny_model_dir, "--data", toy_task(tmp_path), "--eval-size", "0", "--max-steps", "1",
              "--batch-size", "2", "--group-size", "2", "--max-new-tokens", "3", "--output-dir", "run", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"--micro-batch-size (16 \(its default\)|64 \(a CPU size\)) is larger than the batch it splits, "
                     r"4: using 4", out.stderr), out.stderr
    assert json.loads((tmp_path / "run" / "args.json").read_text())["micro_batch_size"] == 4


def test_a_micro_batch_the_user_chose_is_still_checked(tmp_path, tiny_model_dir):
    out = run("grpo", "--model", tiny_model_dir, "--data", toy_task(tmp_path), "--batch-size", "2", "--group-size", "2",
              "--micro-batch-size", "3", "--output-dir", "run", cwd=tmp_path)
    one_line_error(out, 2, "must be a multiple of --micro-batch-size (3)")
    assert not (tmp_path / "run").exists()


# ---- CSV and TSV: the file's rows, as text ----------------------------------------------------------------------

def test_a_tsv_is_its_lines_and_a_stray_quote_is_a_character(tmp_path):
    lines = [f'Say "{i}.\t{i}' if i == 3 else f"Say {i}.\t{i}" for i in range(10)]
    (tmp_path / "rows.tsv").write_text("prompt\tanswer\n" + "\n".join(lines) + "\n")
    rows = plumbing.read_rows(tmp_path / "rows.tsv", ("prompt", "answer"))
    assert len(rows) == 10 and rows[3]["prompt"] == 'Say "3.'
    assert [r["answer"] for r in rows] == [str(i) for i in range(10)]


def test_csv_columns_of_digits_stay_text_so_numbers_are_completions_and_preferences(tmp_path):
    (tmp_path / "sft.csv").write_text("prompt,completion\nWhat is 3 + 4?,7\n\"Say 1, then 2.\",12\n")
    rows = plumbing.read_rows(tmp_path / "sft.csv", ("prompt", "completion"))
    assert rows == [{"prompt": "What is 3 + 4?", "completion": "7"},
                    {"prompt": "Say 1, then 2.", "completion": "12"}]
    (tmp_path / "pairs.csv").write_text('prompt,chosen,rejected\nWhat is 3 + 4?,7,"8"\n')
    assert plumbing.read_rows(tmp_path / "pairs.csv", ("prompt", "chosen", "rejected"))[0]["rejected"] == "8"


def test_an_empty_csv_cell_is_a_missing_field(tmp_path):
    (tmp_path / "rows.csv").write_text("prompt,answer\nSay 1.,\n")
    with pytest.raises(common.RunError, match="answer"):
        plumbing.read_rows(tmp_path / "rows.csv", ("prompt", "answer"))


def test_sft_trains_on_a_csv_whose_completions_are_numbers(tmp_path, tiny_model_dir):
    (tmp_path / "sft.csv").write_text("prompt,completion\n" + "".join(f"Say {i}.,{i}\n" for i in range(8)))
    out = run("sft", "--model", tiny_model_dir, "--data", "sft.csv", "--eval-size", "0", "--max-steps", "1",
              "--batch-size", "2", "--output-dir", "run", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "run" / "final").is_dir()


# ---- LoRA: a run's final/ is a model like any other; its adapters name their base as the user did -------------------

def test_a_lora_runs_final_trains_as_the_model_of_the_next_run(tmp_path, tiny_model_dir):
    rows = tmp_path / "sft.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"Say {i}.", "completion": "7"}) + "\n" for i in range(8)))
    flags = ["--data", str(rows), "--eval-size", "0", "--max-steps", "1", "--batch-size", "2"]
    first = run("sft", "--model", tiny_model_dir, "--lora-rank", "4", "--output-dir", "lora", *flags, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    base = json.loads((tmp_path / "lora" / "final" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == tiny_model_dir
    second = run("sft", "--model", "lora/final", "--output-dir", "next", *flags, cwd=tmp_path)
    assert second.returncode == 0 and "Traceback" not in second.stderr, second.stderr[-2000:]
    assert "(0.0M trained" not in second.stdout + second.stderr and (tmp_path / "next" / "final").is_dir()


def test_the_adapters_record_the_base_model_as_given_not_its_cache_path(tiny_model_dir):
    import sft
    model, _ = plumbing.load_model(tiny_model_dir)
    args = sft.Args(model="SomeOrg/some-model", lora_rank=4)  # as if the hub id had been loaded into a cache
    assert plumbing.with_lora(model, args).peft_config["default"].base_model_name_or_path == "SomeOrg/some-model"


# ---- resume: the held-out rows of --data are the run's ---------------------------------------------------------

def test_resume_refuses_an_eval_size_that_would_change_the_rows_held_out_of_data(tmp_path, tiny_model_dir):
    flags = ["--model", tiny_model_dir, "--data", toy_task(tmp_path), "--eval-size", "2", "--max-steps", "2",
             "--save-every", "1", "--batch-size", "2", "--group-size", "2", "--max-new-tokens", "3",
             "--eval-every", "0", "--output-dir", "run"]
    assert run("grpo", *flags, cwd=tmp_path).returncode == 0
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    out = run("grpo", "--resume", "run", "--eval-size", "0", "--max-steps", "3", cwd=tmp_path)
    one_line_error(out, 2, "--eval-size 0 (the run's: 2)")
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics
