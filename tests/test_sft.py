"""sft.py: [SFT-LOSS] by hand, gradient accumulation, learning end to end, resume, bad input, divergence."""

import hashlib
import json
import math
import re

import pytest
import torch
from helpers import make_model, make_tokenizer

import common
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
    reloaded, _ = common.load_model(str(tmp_path / "run" / "final"))  # final/ is a plain HF checkpoint
    assert reloaded.config.hidden_size == 64


def test_logged_learning_rate_is_the_one_each_step_used(tmp_path, tiny_model_dir):
    sft.main(tiny_args(tmp_path, tiny_model_dir, max_steps=6, warmup_steps=2, eval_every=0, learning_rate=1e-3))
    lrs = [json.loads(line)["lr"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    f = common.lr_lambda(2, 6)
    assert lrs == pytest.approx([1e-3 * f(step) for step in range(6)])
    assert lrs[:3] == pytest.approx([0.5e-3, 1e-3, 1e-3 * f(2)])  # warmup, peak, then decay


def test_resume_reproduces_an_uninterrupted_run(tmp_path, tiny_model_dir):
    args = dict(max_steps=10, save_every=5, eval_every=0, learning_rate=1e-3)
    sft.main(tiny_args(tmp_path, tiny_model_dir, **args))  # leaves checkpoint/ at step 5 and final/ at step 10
    resumed_dir = tmp_path / "resumed"
    sft.main(tiny_args(tmp_path, tiny_model_dir, resume=str(tmp_path / "run"), output_dir=str(resumed_dir), **args))
    a, _ = common.load_model(str(tmp_path / "run" / "final"))
    b, _ = common.load_model(str(resumed_dir / "final"))
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
    (b'{"prompt": "p"}', "needs `prompt` and `completion`, or `messages`"),
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
    with pytest.raises(common.RunError, match=re.escape("train.jsonl:1: the prompt is 33 tokens, over "
                                                        "--max-prompt-length 20")):
        sft.main(tiny_args(tmp_path, tiny_model_dir, max_prompt_length=20))
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
    sft.main(tiny_args(tmp_path, tiny_model_dir, eval_size=0, eval_every=1, max_steps=2))
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
    original = sft.save_pretrained

    def recording_save(model, tokenizer, target, *a, **k):
        original(model, tokenizer, target, *a, **k)
        saved[target.name] = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in target.iterdir()}
    monkeypatch.setattr(sft, "save_pretrained", recording_save)

    with pytest.raises(common.NonFiniteError, match=r"^step 2: non-finite loss"):
        sft.main(tiny_args(tmp_path, tiny_model_dir, learning_rate=1e12, warmup_steps=0, save_every=1, max_steps=5,
                           eval_every=0))
    run = tmp_path / "run"
    assert not (run / "final").exists()
    assert [json.loads(line)["step"] for line in open(run / "metrics.jsonl")] == [1]  # step 2 was never logged
    checkpoint = run / "checkpoint"
    assert list(saved) == ["checkpoint"]
    assert {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in checkpoint.iterdir()} == saved["checkpoint"]
    assert common.read_trainer_state(checkpoint)["step"] == 1
    model, _ = common.load_model(str(checkpoint))
    assert all(torch.isfinite(p).all() for p in model.parameters())
