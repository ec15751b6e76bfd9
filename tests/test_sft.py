"""sft.py: [SFT-LOSS] by hand, gradient accumulation, learning end to end, resume, bad input, divergence."""

import hashlib
import json
import math
import random
import re

import pytest
import torch
from helpers import make_model, make_tokenizer

import common
import plumbing
import sft


def test_sft_loss_is_the_mean_nll_over_completion_tokens():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss = sft.sft_loss(logprobs, mask, num_tokens=3)
    assert loss.item() == pytest.approx((1 + 2 + 4) / 3)
    loss.backward()
    # masked positions (prompt, padding after EOS) get no gradient; each completion token -1/N
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1.0, -1.0, 0.0], [-1.0, 0.0, 0.0]]) / 3)


def micro_batch_gradients(model, batch, micro, normalise_per_micro_batch=False):
    prompt_ids, prompt_mask, completion_ids, completion_mask = batch
    model.zero_grad()
    n = int(completion_mask.sum())
    for i in range(0, len(prompt_ids), micro):
        mb = slice(i, i + micro)
        lp, _ = common.completion_logprobs(model, prompt_ids[mb], prompt_mask[mb], completion_ids[mb],
                                           completion_mask[mb])
        if normalise_per_micro_batch:  # the classic bug: a mean of micro-batch means
            loss = sft.sft_loss(lp, completion_mask[mb], int(completion_mask[mb].sum())) * micro / len(prompt_ids)
        else:
            loss = sft.sft_loss(lp, completion_mask[mb], n)
        loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_gradient_accumulation_equals_one_batch_with_unequal_lengths():
    tokenizer = make_tokenizer()
    tokenizer.padding_side = "left"
    model = make_model(tokenizer)
    completions = ["1", "a much longer completion", "22", "medium one"]
    batch = (*common.encode_prompts(tokenizer, ["p", "a longer prompt", "q?", "xyz"]),
             *common.encode_completions(tokenizer, completions))
    full = micro_batch_gradients(model, batch, micro=4)
    for micro in (1, 2):
        torch.testing.assert_close(micro_batch_gradients(model, batch, micro), full, rtol=1e-4, atol=1e-6)
    wrong = micro_batch_gradients(model, batch, micro=2, normalise_per_micro_batch=True)
    assert not torch.allclose(wrong, full, rtol=1e-3, atol=1e-6)  # the test can tell the difference


ROWS = [{"prompt": f"Compute {a} + {b}.", "completion": str(a + b)} for a, b in
        [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4), (6, 1), (9, 9)]]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def tiny_args(tmp_path, model_dir, **kw):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    eval_data = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": r["prompt"], "answer": r["completion"]}
                                                       for r in ROWS])
    defaults = dict(model=model_dir, data=data, eval_data=eval_data, output_dir=str(tmp_path / "run"),
                    max_steps=120, batch_size=8, micro_batch_size=4, learning_rate=3e-3, warmup_steps=5,
                    eval_every=60, max_new_tokens=4, save_every=1000)
    return sft.Args(**{**defaults, **kw})


def test_sft_memorises_a_small_data_set(tmp_path, tiny_model_dir):
    """Through the real entry point: loss near zero, and greedy answers on the same prompts go from 0 to all right.
    (With 1 or 2 threads the last loss is 0.012, and learning rates 2e-3 to 5e-3 all end below 0.05 at accuracy 1;
    1e-2 stalls at 0.073 with one answer wrong.)"""
    last = sft.main(tiny_args(tmp_path, tiny_model_dir))
    log = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert log[0]["step"] == 0 and log[0]["eval_accuracy"] == 0.0
    assert log[1]["loss"] > 2.0
    assert last["loss"] < 0.1
    assert last["eval_accuracy"] == 1.0
    reloaded, _ = plumbing.load_model(str(tmp_path / "run" / "final"))  # final/ is a plain HF checkpoint
    assert reloaded.config.hidden_size == 64


def test_logged_learning_rate_is_the_one_each_step_used(tmp_path, tiny_model_dir):
    sft.main(tiny_args(tmp_path, tiny_model_dir, max_steps=6, warmup_steps=2, eval_every=0, learning_rate=1e-3))
    lrs = [json.loads(line)["lr"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    f = plumbing.lr_lambda(2, 6)
    assert lrs == pytest.approx([1e-3 * f(step) for step in range(6)])
    assert lrs[:3] == pytest.approx([0.5e-3, 1e-3, 1e-3 * f(2)])  # warmup, peak, then decay


def test_resume_reproduces_an_uninterrupted_run(tmp_path, tiny_model_dir):
    args = dict(max_steps=10, save_every=5, eval_every=0, learning_rate=1e-3)
    sft.main(tiny_args(tmp_path, tiny_model_dir, **args))  # leaves checkpoint/ at step 5 and final/ at step 10
    resumed_dir = tmp_path / "resumed"
    sft.main(tiny_args(tmp_path, tiny_model_dir, resume=str(tmp_path / "run"), output_dir=str(resumed_dir), **args))
    a, _ = plumbing.load_model(str(tmp_path / "run" / "final"))
    b, _ = plumbing.load_model(str(resumed_dir / "final"))
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)
    steps = [json.loads(line)["step"] for line in open(resumed_dir / "metrics.jsonl")]
    assert steps == list(range(1, 11))  # a copy of the run's log up to its checkpoint, then its own steps
    assert [json.loads(line)["step"] for line in open(tmp_path / "run" / "metrics.jsonl")] == list(range(1, 11))


def test_resume_in_place_rewrites_the_steps_after_the_checkpoint(tmp_path, tiny_model_dir):
    args = dict(max_steps=10, save_every=5, eval_every=0, learning_rate=1e-3)
    sft.main(tiny_args(tmp_path, tiny_model_dir, **args))
    with pytest.raises(common.RunError, match="already holds a run: pass --resume"):
        sft.main(tiny_args(tmp_path, tiny_model_dir, **args))  # a fresh run must not mix into the old log
    sft.main(tiny_args(tmp_path, tiny_model_dir, resume=str(tmp_path / "run"), **args))
    steps = [json.loads(line)["step"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert steps == list(range(1, 11))  # steps 6..10 were logged by both runs and appear once


# ---- bad input: an error naming what to fix, and nothing written ------------------------------------------------

def write_lines(path, lines: list[bytes]) -> str:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return str(path)


GOOD_LINES = [json.dumps(r).encode() for r in ROWS]


@pytest.mark.parametrize("line, message", [
    (b'{"prompt": "p"}', "needs `prompt` and `completion` (or `answer`), or `messages`"),
    (b'{"prompt": "p", "answer": true}', "'answer', the completion of a row without one, must be text or a number"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', "'messages' must be a list of at least two"),
    (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "x"}]}',
     "messages ending with the assistant's"),
    (b'{"messages": []}', "'messages' must be a non-empty list"),
    (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 123}]}',
     'message 1 must be an object with a text "content"'),
    (b'{"messages": [{"role": "user", "content": 123}, {"role": "assistant", "content": "x"}]}',
     'message 0 must be an object with a text "content"'),
    (b'{"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]}',
     'message 0 has role "bot"'),
    (b'{"messages": ["hi", {"role": "assistant", "content": "x"}]}', "message 0 must be an object"),
    (b'{"prompt": "p", "completion": 3}', "'completion' must be text"),
    (b'{"prompt": "p", "completion": null}', "'completion' must be text"),
    (b'{"prompt": 5, "completion": "x"}', "'prompt' must be a non-empty list"),
    (b'{"prompt": "p\\ud800", "completion": "x"}', "not valid text"),
    (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\\udfff"}]}',
     "not valid text"),
    (b'{"prompt": "p\xff", "completion": "x"}', "not UTF-8 text (byte 0xff"),
    (b'{"prompt": "p", "completion": "x"', "not valid JSON"),
    (b'["p", "x"]', "expected a JSON object"),
])
def test_a_bad_row_on_the_last_line_names_file_and_line_and_writes_nothing(tmp_path, tiny_model_dir, line, message):
    data = write_lines(tmp_path / "bad.jsonl", GOOD_LINES + [line])
    last_line = len(GOOD_LINES) + 1
    with pytest.raises(common.RunError, match=re.escape(f"bad.jsonl:{last_line}: ") + ".*" + re.escape(message)):
        sft.main(tiny_args(tmp_path, tiny_model_dir, data=data))
    assert not (tmp_path / "run").exists()  # nothing written before the data is known to be good


def test_a_bad_eval_row_names_file_and_line_and_writes_nothing(tmp_path, tiny_model_dir):
    eval_data = write_lines(tmp_path / "bad_eval.jsonl", [b'{"prompt": "p", "answer": 3}',
                                                          b'{"prompt": "p", "answer": "x = 5"}'])
    with pytest.raises(common.RunError, match=re.escape("bad_eval.jsonl:2: 'answer'") + ".*not one number"):
        sft.main(tiny_args(tmp_path, tiny_model_dir, eval_data=eval_data))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kw, message", [
    (dict(micro_batch_size=3), "--batch-size 8 must be a multiple of --micro-batch-size 3"),
    (dict(max_steps=0), "--max-steps 0: must be >= 1"),
    (dict(learning_rate=float("nan")), "--learning-rate nan: must be a finite number"),
    (dict(max_prompt_length=0), "--max-prompt-length 0: must be >= 1"),
    (dict(model="/no/such/model"), "--model /no/such/model: no such directory"),
])
def test_bad_flags_and_models_are_refused_before_anything_is_written(tmp_path, tiny_model_dir, kw, message):
    with pytest.raises(common.RunError, match=re.escape(message)):
        sft.main(tiny_args(tmp_path, tiny_model_dir, **kw))
    assert not (tmp_path / "run").exists()


def test_a_utf8_bom_at_the_start_of_the_file_is_accepted(tmp_path, tiny_model_dir):
    data = write_lines(tmp_path / "bom.jsonl", [b"\xef\xbb\xbf" + GOOD_LINES[0]] + GOOD_LINES[1:])
    sft.main(tiny_args(tmp_path, tiny_model_dir, data=data, max_steps=1, eval_every=0))
    assert (tmp_path / "run" / "final" / "config.json").exists()


def test_a_prompt_over_max_prompt_length_is_refused_unless_truncated(tmp_path, tiny_model_dir):
    # "Compute 1 + 2." is 33 tokens through the fixture's chat template (one per character, plus the markers)
    for name, kw in (("eval", {}), ("train", dict(eval_data=None, eval_size=0))):  # the held-out rows are checked too
        with pytest.raises(common.RunError, match=re.escape(f"{name}.jsonl:1: the prompt is 33 tokens, over "
                                                            f"--max-prompt-length 20")):
            sft.main(tiny_args(tmp_path, tiny_model_dir, max_prompt_length=20, **kw))
        assert not (tmp_path / "run").exists()
    long_chat = {"messages": [{"role": "user", "content": "x" * 50}, {"role": "assistant", "content": "y"}]}
    data = write_lines(tmp_path / "chat.jsonl", GOOD_LINES + [json.dumps(long_chat).encode()])
    with pytest.raises(common.RunError, match=r"chat\.jsonl:9: the prompt is \d+ tokens, over --max-prompt-length 40"):
        sft.main(tiny_args(tmp_path, tiny_model_dir, data=data, max_prompt_length=40))
    assert not (tmp_path / "run").exists()
    last = sft.main(tiny_args(tmp_path, tiny_model_dir, data=data, max_prompt_length=20, truncate_prompts=True,
                              max_steps=1, eval_every=1))
    assert math.isfinite(last["loss"]) and "eval_accuracy" in last


def test_eval_size_0_disables_evaluation(tmp_path, tiny_model_dir):
    sft.main(tiny_args(tmp_path, tiny_model_dir, eval_data=None, eval_size=0, eval_every=1, max_steps=2))
    log = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [row["step"] for row in log] == [1, 2] and not any("eval_accuracy" in row for row in log)


def test_chat_messages_rows_train_on_the_last_assistant_message():
    row = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                        {"role": "assistant", "content": "a"}]}
    assert sft.check_row(row) is None
    prompt, completion = sft.to_example(row)
    assert prompt == row["messages"][:2] and completion == "a"


# ---- divergence: stopped before the update, the last checkpoint intact ------------------------------------------

def test_a_diverging_run_stops_with_the_step_and_keeps_its_last_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    """lr 1e12: step 1 is finite (weights ~1e12), step 2's loss is NaN. The run must stop before applying it."""
    saved = {}
    original = plumbing.save_pretrained  # what save_checkpoint (and so sft.py's checkpoints) calls

    def recording_save(model, tokenizer, target, *a, **k):
        original(model, tokenizer, target, *a, **k)
        saved[target.name] = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in target.iterdir()}
    monkeypatch.setattr(plumbing, "save_pretrained", recording_save)
    monkeypatch.setattr(sft, "save_pretrained", recording_save)  # final/

    with pytest.raises(common.NonFiniteError, match=r"^step 2: non-finite loss"):
        sft.main(tiny_args(tmp_path, tiny_model_dir, learning_rate=1e12, warmup_steps=0, save_every=1, max_steps=5,
                           eval_every=0))
    run = tmp_path / "run"
    assert not (run / "final").exists()
    assert [json.loads(line)["step"] for line in open(run / "metrics.jsonl")] == [1]  # step 2 was never logged
    checkpoint = run / "checkpoint"
    assert list(saved) == ["checkpoint"]
    assert {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in checkpoint.iterdir()} == saved["checkpoint"]
    assert plumbing.read_trainer_state(checkpoint)["step"] == 1
    model, _ = plumbing.load_model(str(checkpoint))
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---- LoRA: adapters on the frozen model; checkpoints and final/ hold the adapters --------------------------------

@pytest.fixture(scope="module")
def lora_model_dir(tmp_path_factory, tokenizer) -> str:
    """A tiny model that LoRA can teach with the embeddings frozen: initializer_range 0.15 (see make_model), and an
    EOS row drawn like the others. Here pad == EOS, and nn.Embedding starts its padding_idx row at zero: with tied,
    frozen embeddings EOS's logit would then be 0 whatever the hidden state, and the model could not learn to stop
    (measured: the loss stalls near 1.4 and greedy answers run on past the number)."""
    path = tmp_path_factory.mktemp("lora-llama")
    model = make_model(tokenizer, initializer_range=0.15)
    with torch.no_grad():
        model.get_input_embeddings().weight[tokenizer.eos_token_id].normal_(
            0, 0.15, generator=torch.Generator().manual_seed(0))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


LORA = dict(lora_rank=8, lora_alpha=16.0, learning_rate=1e-2, warmup_steps=0, batch_size=8, micro_batch_size=8)


def test_lora_memorises_a_small_data_set(tmp_path, lora_model_dir):
    """Only the adapters train: 30 steps take the loss from ~5 to under 0.1 and greedy accuracy from 0 to 1 (seeds
    0-3: last loss 0.037, 0.038, 0.039, 0.079, accuracy 1 each; 20 steps: 0.08-0.27, accuracy 1 each)."""
    last = sft.main(tiny_args(tmp_path, lora_model_dir, max_steps=30, eval_every=30, **LORA))
    log = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert log[0]["eval_accuracy"] == 0.0 and log[1]["loss"] > 4.0
    assert last["loss"] < 0.1 and last["eval_accuracy"] == 1.0


def test_a_lora_run_saves_adapters_and_a_merged_model_with_the_same_logits(tmp_path, lora_model_dir, tokenizer):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM
    sft.main(tiny_args(tmp_path, lora_model_dir, max_steps=3, eval_every=0, merge_lora=True, **LORA))
    final = tmp_path / "run" / "final"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    assert not (final / "config.json").exists()  # the adapters only, not a second copy of the model
    ids = tokenizer(["Compute 1 + 2.", "Compute 9 + 9."], return_tensors="pt").input_ids
    with torch.no_grad():
        logits = {"adapters": peft.AutoPeftModelForCausalLM.from_pretrained(final).eval()(ids).logits,
                  "load_model": plumbing.load_model(str(final))[0].eval()(ids).logits,  # merged on loading
                  "merged": AutoModelForCausalLM.from_pretrained(final / "merged").eval()(ids).logits,
                  "base": AutoModelForCausalLM.from_pretrained(lora_model_dir).eval()(ids).logits}
    for name in ("load_model", "merged"):
        torch.testing.assert_close(logits[name], logits["adapters"], rtol=1e-4, atol=1e-4)
    assert (logits["adapters"] - logits["base"]).abs().max() > 0.1  # the adapters changed the model


def test_a_lora_run_resumed_from_its_checkpoint_reproduces_the_uninterrupted_run(tmp_path, lora_model_dir):
    from safetensors.torch import load_file
    args = dict(max_steps=6, save_every=3, eval_every=0, **LORA)
    sft.main(tiny_args(tmp_path, lora_model_dir, **args))  # checkpoint/ (adapters) at step 3, final/ at step 6
    assert (tmp_path / "run" / "checkpoint" / "adapter_model.safetensors").is_file()
    sft.main(tiny_args(tmp_path, lora_model_dir, resume=str(tmp_path / "run"), output_dir=str(tmp_path / "resumed"),
                       **args))
    a, b = (load_file(tmp_path / run / "final" / "adapter_model.safetensors") for run in ("run", "resumed"))
    assert a.keys() == b.keys() and len(a) > 0 and all(torch.equal(a[k], b[k]) for k in a)
    timing = ("train_tokens_per_s", "step_time", "time")
    rows = [[{k: v for k, v in json.loads(line).items() if k not in timing} for line in open(tmp_path / run /
                                                                                              "metrics.jsonl")]
            for run in ("run", "resumed")]
    assert rows[0] == rows[1] and len(rows[0]) == 6


# ---- --data: any source, columns named by the field flags --------------------------------------------------------

def test_a_parquet_file_with_its_own_column_names_trains_as_the_jsonl_does(tmp_path, tiny_model_dir, capsys):
    """--prompt-field / --completion-field map the columns; the rows, and so every loss, are the JSONL file's. The
    rows have no answer: no held-out accuracy, and the run says so (none on the built-in task, which it never saw)."""
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "train.parquet"
    datasets.Dataset.from_list([{"instruction": r["prompt"], "response": r["completion"]} for r in ROWS]).to_parquet(
        str(path))
    run = dict(max_steps=3, eval_every=1, eval_data=None, learning_rate=1e-3)
    sft.main(tiny_args(tmp_path, tiny_model_dir, **run, output_dir=str(tmp_path / "jsonl")))
    sft.main(tiny_args(tmp_path, tiny_model_dir, **run, data=str(path), prompt_field="instruction",
                       completion_field="response"))
    assert capsys.readouterr().err.count("note: no held-out accuracy: the rows of") == 2
    logs = [[json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")] for name in ("jsonl", "run")]
    assert [row["loss"] for row in logs[1]] == [row["loss"] for row in logs[0]] and len(logs[1]) == 3
    assert not any("eval_accuracy" in row for log in logs for row in log)


def test_gsm8k_shaped_rows_train_on_the_worked_solution_and_hold_some_out(tmp_path, tiny_model_dir, tokenizer,
                                                                          capsys):
    """openai/gsm8k's columns, question and answer (a worked solution ending "#### 42"), and no flags: the solution is
    the completion, and 10% of the rows are held out of training for the held-out accuracy, which checks the
    number after ####."""
    datasets = pytest.importorskip("datasets")
    rows = [{"question": f"What is {a} + {b}?", "answer": f"{a} + {b} = {a + b}.\n#### {a + b}"}
            for a, b in [(i, 3 * i % 10) for i in range(1, 21)]]
    path = tmp_path / "gsm8k.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    sft.main(tiny_args(tmp_path, tiny_model_dir, data=str(path), eval_data=None, max_steps=1, batch_size=18,
                       micro_batch_size=9, eval_every=1, max_new_tokens=4))
    err = capsys.readouterr().err
    assert "reading prompts from 'question'" in err and "held-out accuracy: 2 of the 20 rows of" in err
    log = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [row["step"] for row in log] == [0, 1] and log[0]["eval_accuracy"] == 0.0 and "eval_accuracy" in log[1]
    held_out = sorted(random.Random(1234).sample(range(20), 2))  # task_data's fixed draw
    trained = [r for i, r in enumerate(rows) if i not in held_out]  # one batch of 18: every training row once
    tokens = sum(len(tokenizer(r["answer"], add_special_tokens=False).input_ids) + 1 for r in trained)  # + EOS
    assert log[1]["completion_len"] == pytest.approx(tokens / 18)
