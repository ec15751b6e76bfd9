"""Data sources other than JSONL (through `datasets`), GSM8K's answers, the held-out part of a user's data, LoRA
with the adapters-off reference, tracking, sampled completions, the start-up line and timing: what users of TRL and
CleanRL expect. Offline: tiny models, local files; a hub id is stood in for by a patched loader."""

import importlib
import inspect
import json
import re
import sys
import types

import datasets
import pytest
import torch
from helpers import logged, make_model, make_tokenizer, toy_task

import common
import plumbing
import grpo

GSM8K_ROWS = [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
               "answer": f"He has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b:,}"}
              for a, b in [(3, 4), (10, 5), (999, 1), (7, 0), (12, 30), (2, 2), (1500, 250), (8, 9), (6, 6), (4, 3),
                           (11, 11), (20, 2)]]


def gsm8k_dir(tmp_path):
    """A directory written by `datasets` in GSM8K's format: train and test splits of question/answer rows."""
    path = tmp_path / "gsm8k"
    datasets.DatasetDict(train=datasets.Dataset.from_list(GSM8K_ROWS[:10]),
                         test=datasets.Dataset.from_list(GSM8K_ROWS[10:])).save_to_disk(str(path))
    return str(path)


# ---- data sources ---------------------------------------------------------------------------------------------------

def test_gsm8k_answers_are_read_after_the_four_hashes():
    assert common.parse_answer("He has 3 + 4 = 7 apples.\n#### 7") == 7
    assert common.parse_answer("So 1,500 + 250 = 1,750.\n#### 1,750") == 1750
    assert common.is_correct("The answer is 1750.", GSM8K_ROWS[6]["answer"])
    assert not common.is_correct("The answer is 250.", GSM8K_ROWS[6]["answer"])  # not the last number of the text
    assert common.parse_answer("#### seven") is None


@pytest.mark.parametrize("kind", ["parquet", "csv", "tsv", "json", "jsonl", "dir"])
def test_every_kind_of_source_gives_the_same_rows(tmp_path, kind):
    rows = [{"q": f"What is {i} + 1?", "a": str(i + 1), "extra": i} for i in range(5)]
    dataset = datasets.Dataset.from_list(rows)
    path = tmp_path / f"data.{kind}"
    if kind == "parquet":
        dataset.to_parquet(str(path))
    elif kind in ("csv", "tsv"):
        dataset.to_csv(str(path), index=False, sep="," if kind == "csv" else "\t")
    elif kind == "json":
        path.write_text(json.dumps(rows))  # a JSON array
    elif kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        dataset.save_to_disk(str(path))
    read = plumbing.read_rows(str(path), ("prompt", "answer"), (common.check_answer_row,),
                            names={"prompt": "q", "answer": "a"})
    assert [(r["prompt"], common.parse_answer(r["answer"])) for r in read] == [(r["q"], int(r["a"])) for r in rows]


def test_a_bad_row_is_named_by_its_number_and_nothing_is_skipped(tmp_path):
    rows = [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}, {"prompt": "c", "answer": "three"}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    with pytest.raises(common.RunError, match=r"d\.parquet: row 3: 'answer' = \"three\" is not one number"):
        plumbing.read_rows(str(tmp_path / "d.parquet"), ("prompt", "answer"), (common.check_answer_row,))
    datasets.Dataset.from_list([{"prompt": "a", "answer": None}]).to_parquet(str(tmp_path / "e.parquet"))
    with pytest.raises(common.RunError, match=r"row 1: missing field\(s\) answer"):
        plumbing.read_rows(str(tmp_path / "e.parquet"), ("prompt", "answer"))


def test_a_mapped_column_that_is_absent_names_its_flag(tmp_path):
    datasets.Dataset.from_list([{"prompt": "a", "answer": "1"}]).to_parquet(str(tmp_path / "d.parquet"))
    with pytest.raises(common.RunError, match=r"row 1: missing field\(s\) solution \(--answer-field\) "
                                              r"\(has: prompt, answer\)"):
        plumbing.read_rows(str(tmp_path / "d.parquet"), ("prompt", "answer"), names={"answer": "solution"})


def test_unknown_files_and_splits_are_refused(tmp_path):
    (tmp_path / "d.txt").write_text("hello\n")
    with pytest.raises(common.RunError, match=r"unknown kind of file"):
        plumbing.read_rows(str(tmp_path / "d.txt"))
    with pytest.raises(common.RunError, match=r"no split 'validation' \(it has train, test\); choose one with "
                                              r"--data-split"):
        plumbing.read_rows(gsm8k_dir(tmp_path), ("prompt",), split="validation")


def test_a_hub_id_with_several_configs_reads_main_and_says_so(monkeypatch, capsys):
    """`--data openai/gsm8k`: GSM8K has configs main and socratic; the loader is stood in for (no hub here)."""
    calls = []

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        if config is None:
            raise ValueError("Config name is missing. Please pick one among the available configs: ['main', 'socratic']")
        return datasets.Dataset.from_list(GSM8K_ROWS)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(datasets, "get_dataset_config_names", lambda name: ["main", "socratic"])
    rows = plumbing.read_rows("openai/gsm8k", ("prompt", "answer"), (common.check_answer_row,), split="test")
    assert calls == [("openai/gsm8k", None, "test"), ("openai/gsm8k", "main", "test")]
    assert rows[0]["prompt"] == GSM8K_ROWS[0]["question"]  # no `prompt` column: GSM8K's `question`
    err = capsys.readouterr().err
    assert "reading 'main'" in err and "reading prompts from 'question'" in err


def test_user_data_without_eval_data_holds_out_a_fixed_tenth(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "answer": i}) + "\n" for i in range(50)))
    args = grpo.Args(data=str(path), eval_size=200, seed=3)
    stream, eval_set = plumbing.task_data(args)
    train = {next(stream)["prompt"] for _ in range(500)}
    assert len(eval_set) == 5 and len(train) == 45 and not train & {r["prompt"] for r in eval_set}
    assert "held-out accuracy: 5 of the 50 rows" in capsys.readouterr().err
    args.seed, args.eval_size = 4, 3  # --eval-size caps the held-out rows
    assert len(plumbing.task_data(args)[1]) == 3
    args.eval_size = 200  # the held-out rows do not depend on the seed
    assert plumbing.task_data(args)[1] == eval_set


def test_rows_without_answers_give_no_held_out_accuracy_and_say_so(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "completion": f"c{i}"}) + "\n" for i in range(20)))
    args = grpo.Args(data=str(path), eval_size=200)
    stream, eval_set = plumbing.task_data(args, fields=("prompt",))
    assert eval_set == [] and "no held-out accuracy" in capsys.readouterr().err
    assert len({next(stream)["prompt"] for _ in range(100)}) == 20  # and nothing is taken out of training


# ---- GSM8K end to end, offline ------------------------------------------------------------------------------------

def test_grpo_trains_on_a_gsm8k_format_dataset(tmp_path, tiny_model_dir):
    """The documented `python grpo.py --data openai/gsm8k`, on a local directory in GSM8K's format: prompts from
    `question`, answers after '####', the held-out accuracy on its test split."""
    data = gsm8k_dir(tmp_path)
    last = grpo.main(grpo.Args(model=tiny_model_dir, data=data, eval_data=data, output_dir=str(tmp_path / "run"),
                               max_steps=2, batch_size=2, group_size=2, micro_batch_size=4, max_new_tokens=4,
                               eval_every=1, save_every=100))
    assert last["step"] == 2 and "eval_accuracy" in last
    samples = [json.loads(line) for line in open(tmp_path / "run" / "samples.jsonl")]
    assert {s["step"] for s in samples} == {1, 2}
    assert all(s["prompt"] in {r["question"] for r in GSM8K_ROWS[:10]} for s in samples)  # train split only


# ---- LoRA -----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_model_dir(tmp_path_factory):
    """A tiny model whose frozen embeddings still allow confident predictions (see helpers.make_model)."""
    path = tmp_path_factory.mktemp("tiny-lora")
    tokenizer = make_tokenizer()
    make_model(tokenizer, initializer_range=0.15).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def lora_args(tmp_path, model_dir, **kw):
    data = toy_task(tmp_path)
    defaults = dict(model=model_dir, data=data, eval_data=data, output_dir=str(tmp_path / "run"), max_steps=40,
                    batch_size=8, group_size=8, micro_batch_size=64, learning_rate=1e-2, max_new_tokens=3,
                    temperature=1.0, eval_every=0, beta=0.0, save_every=1000, lora_rank=8, lora_alpha=16)
    return grpo.Args(**{**defaults, **kw})


def test_grpo_with_lora_learns_the_toy_task(tmp_path, lora_model_dir):
    grpo.main(lora_args(tmp_path, lora_model_dir))
    rewards = logged(tmp_path / "run", "reward_mean")
    assert sum(rewards[:3]) / 3 < 0.5
    assert sum(rewards[-5:]) / 5 > 0.85
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()


def test_the_reference_with_adapters_off_is_the_starting_model(tmp_path, lora_model_dir):
    """After LoRA steps, pi_ref (the policy with its adapters off) gives the starting model's log-probs exactly, and
    pi_theta does not; the run's first KL is 0 as with a copy of the starting model."""
    last = grpo.main(lora_args(tmp_path, lora_model_dir, max_steps=3, beta=0.04, learning_rate=3e-2))
    assert logged(tmp_path / "run", "kl_k3")[0] == pytest.approx(0, abs=1e-6) and last["kl_k3"] > 0
    base, tokenizer = plumbing.load_model(lora_model_dir)
    policy = plumbing.with_lora(plumbing.load_model(lora_model_dir)[0], lora_args(tmp_path, lora_model_dir),
                              tmp_path / "run" / "final")
    prompt_ids, prompt_mask = common.encode_prompts(tokenizer, ["Say 3.", "Say 12."])
    completion_ids, completion_mask = common.encode_completions(tokenizer, ["7", "77"])
    batch = (prompt_ids, prompt_mask, completion_ids, completion_mask)
    with torch.no_grad():
        expected = common.completion_logprobs(base, *batch)[0] * completion_mask
        with plumbing.reference_model(policy, None) as ref:
            torch.testing.assert_close(common.completion_logprobs(ref, *batch)[0] * completion_mask, expected,
                                       rtol=0, atol=1e-6)
        assert (common.completion_logprobs(policy, *batch)[0] * completion_mask - expected).abs().max() > 1e-3


def test_lora_final_loads_with_peft_and_merged_with_transformers(tmp_path, lora_model_dir):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM
    grpo.main(lora_args(tmp_path, lora_model_dir, max_steps=2, learning_rate=3e-2, merge_lora=True))
    final = tmp_path / "run" / "final"
    adapters = AutoPeftModelForCausalLM.from_pretrained(str(final)).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(final / "merged")).eval()
    ours, tokenizer = plumbing.load_model(str(final))  # an adapter directory: its base with the adapters merged
    ids = tokenizer(["Say 5.<|im_end|>"], return_tensors="pt").input_ids
    with torch.no_grad():
        expected = adapters(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)
        assert (expected - AutoModelForCausalLM.from_pretrained(lora_model_dir)(input_ids=ids).logits).abs().max() > 1e-3


def test_a_resumed_lora_run_is_the_uninterrupted_run(tmp_path, lora_model_dir):
    kw = dict(max_steps=4, save_every=2, learning_rate=3e-2)
    grpo.main(lora_args(tmp_path, lora_model_dir, **kw))
    grpo.main(lora_args(tmp_path, lora_model_dir, resume=str(tmp_path / "run"), output_dir=str(tmp_path / "resumed"),
                        **kw))
    from safetensors.torch import load_file
    a, b = (load_file(tmp_path / run / "final" / "adapter_model.safetensors") for run in ("run", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert logged(tmp_path / "run", "reward_mean") == logged(tmp_path / "resumed", "reward_mean")


def test_lora_flags_are_checked(tmp_path, lora_model_dir):
    with pytest.raises(common.RunError, match="--lora-target-modules nope"):
        grpo.main(lora_args(tmp_path, lora_model_dir, lora_target_modules="nope"))
    with pytest.raises(common.RunError, match="--lora-dropout 1.0: must be in"):
        grpo.main(lora_args(tmp_path, lora_model_dir, lora_dropout=1.0))
    assert not (tmp_path / "run").exists()


# ---- tracking, samples, the terminal ---------------------------------------------------------------------------------

def test_a_missing_tracker_package_is_refused_before_anything_is_written(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails
    with pytest.raises(common.RunError, match=r"--report-to wandb needs the wandb package: pip install wandb"):
        grpo.main(grpo.Args(model=tiny_model_dir, data=toy_task(tmp_path), output_dir=str(tmp_path / "run"),
                            report_to="wandb", max_steps=1))
    assert not (tmp_path / "run").exists()


def test_report_to_sends_every_metrics_row(tmp_path, tiny_model_dir, monkeypatch):
    """tensorboard and wandb, stood in for by modules that record what they are given."""
    scalars, logged_rows, inits = [], [], []

    class SummaryWriter:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, key, value, step):
            scalars.append((key, value, step))

        def flush(self):
            pass

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard",
                        types.SimpleNamespace(__name__="torch.utils.tensorboard", SummaryWriter=SummaryWriter))
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(
        __name__="wandb", init=lambda **kw: inits.append(kw), log=lambda row, step: logged_rows.append((step, row)),
        finish=lambda: None))
    for report_to in ("tensorboard", "wandb"):
        grpo.main(grpo.Args(model=tiny_model_dir, data=toy_task(tmp_path), eval_data=toy_task(tmp_path),
                            output_dir=str(tmp_path / report_to), report_to=report_to, max_steps=2, batch_size=2,
                            group_size=2, micro_batch_size=4, max_new_tokens=2, eval_every=2, save_every=100))
    rows = [json.loads(line) for line in open(tmp_path / "wandb" / "metrics.jsonl")]
    assert [(step, row["reward_mean"]) for step, row in logged_rows if "reward_mean" in row] == \
        [(r["step"], r["reward_mean"]) for r in rows if "reward_mean" in r]
    assert inits[0]["name"] == "wandb" and inits[0]["config"]["report_to"] == "wandb"
    assert ("eval_accuracy", rows[0]["eval_accuracy"], 0) in scalars
    assert sorted({s for k, _, s in scalars if k == "reward_mean"}) == [1, 2]


def test_metrics_have_time_and_the_terminal_shows_time_per_step(tmp_path, tiny_model_dir, capsys):
    grpo.main(grpo.Args(model=tiny_model_dir, data=toy_task(tmp_path), eval_data=toy_task(tmp_path),
                        output_dir=str(tmp_path / "run"), max_steps=3, batch_size=2, group_size=2,
                        micro_batch_size=4, max_new_tokens=2, eval_every=3, save_every=100))
    times = logged(tmp_path / "run", "time")
    assert all(t is not None for t in times) and times == sorted(times)
    out = capsys.readouterr().out
    assert "grpo: cpu (" in out and "M parameters" in out and "batch: 2 prompts x 2 completions" in out
    assert " s/step, " in out and " to go" in out
    assert "' -> '" in out  # the samples shown at the evaluation step


@pytest.mark.parametrize("script", sorted(plumbing.CPU_SIZES))
def test_a_run_started_on_a_cpu_takes_cpu_sizes_unless_a_flag_is_given(script, capsys):
    """No size flags on a CPU: CPU_SIZES, said at the start; a flag given wins; on a GPU, or resuming, the defaults
    stand. Every script's sizes pass its own flag checks."""
    module = importlib.import_module(script)
    Args, sizes = module.Args, plumbing.CPU_SIZES[script]
    args = plumbing.parse_args(Args, argv=["--device", "cpu"])
    assert args.cpu_sized == sizes and all(getattr(args, k) == v for k, v in sizes.items())
    module.check_flags(args)  # the sizes fit together: micro-batches divide mini-batches, and so on
    first = next(iter(sizes))
    args = plumbing.parse_args(Args, argv=["--device", "cpu", f"--{first.replace('_', '-')}", "3"])
    assert getattr(args, first) == 3 and first not in args.cpu_sized and len(args.cpu_sized) == len(sizes) - 1
    args = plumbing.parse_args(Args, argv=["--device", "cuda"])
    assert args.cpu_sized == {} and all(getattr(args, k) == getattr(Args(), k) for k in sizes)
    args = plumbing.parse_args(Args, argv=["--device", "cpu"])
    model = make_model(make_tokenizer())
    plumbing.describe_run(script, args, model, torch.device("cpu"), torch.float32, "a batch")
    err = capsys.readouterr().err
    assert "note: on a CPU, sizes that fit it: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in sizes.items()) \
        in err and "any flag you give wins" in err


def test_a_resume_drops_the_samples_logged_after_its_checkpoint(tmp_path, tiny_model_dir):
    kw = dict(model=tiny_model_dir, data=toy_task(tmp_path), output_dir=str(tmp_path / "run"), batch_size=2,
              group_size=2, micro_batch_size=4, max_new_tokens=2, eval_every=0, save_every=2)
    grpo.main(grpo.Args(max_steps=3, **kw))
    (tmp_path / "run" / "final").rename(tmp_path / "final-3")  # as if step 3 had died before its end
    grpo.main(grpo.Args(max_steps=3, resume=str(tmp_path / "run"), **kw))
    steps = [json.loads(line)["step"] for line in open(tmp_path / "run" / "samples.jsonl")]
    assert steps == sorted(steps) and steps.count(3) == steps.count(1) and steps.count(3) > 0


# ---- --help ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", ["sft", "reward", "dpo", "grpo", "grpo_iterative", "gspo", "reinforce", "ppo",
                                    "rft", "trpo"])
def test_help_has_the_description_and_each_default_once(script, capsys):
    module = __import__(script)
    with pytest.raises(SystemExit):
        plumbing.parse_args(module.Args, module.__doc__, ["--help"])
    text = capsys.readouterr().out
    assert module.__doc__.splitlines()[0][:40] in text
    # tyro appends "(default: X)" to every help text: a docstring that says "default: ..." itself says it twice
    source = "".join(inspect.getsource(c) for c in module.Args.__mro__ if c is not object)  # the shared ones too
    docstrings = re.findall(r'^    [a-z_]+: [^\n]*\n    """(.*?)"""', source, re.M | re.S)
    assert len(docstrings) > 20 and not [d for d in docstrings if "default:" in d or "(default" in d]
