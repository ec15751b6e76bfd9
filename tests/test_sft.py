"""sft.py: [SFT-LOSS] by hand, gradient accumulation, learning end to end, resume, bad input."""

import json
import re

import pytest
import torch
from conftest import make_model, make_tokenizer

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
                    max_steps=120, batch_size=8, micro_batch_size=4, learning_rate=1e-2, warmup_steps=5,
                    eval_every=60, max_new_tokens=4, save_every=1000)
    return sft.Args(**{**defaults, **kw})


def test_sft_memorises_a_small_data_set(tmp_path, tiny_model_dir):
    """Through the real entry point: loss near zero, and greedy answers on the same prompts go from 0 to all right."""
    last = sft.main(tiny_args(tmp_path, tiny_model_dir))
    log = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert log[0]["step"] == 0 and log[0]["eval_accuracy"] == 0.0
    assert log[1]["loss"] > 2.0
    assert last["loss"] < 0.05
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
    assert steps == [6, 7, 8, 9, 10]


def test_resume_in_place_rewrites_the_steps_after_the_checkpoint(tmp_path, tiny_model_dir):
    args = dict(max_steps=10, save_every=5, eval_every=0, learning_rate=1e-3)
    sft.main(tiny_args(tmp_path, tiny_model_dir, **args))
    with pytest.raises(FileExistsError, match="already holds a run .* pass --resume"):
        sft.main(tiny_args(tmp_path, tiny_model_dir, **args))  # a fresh run must not mix into the old log
    sft.main(tiny_args(tmp_path, tiny_model_dir, resume=str(tmp_path / "run"), **args))
    steps = [json.loads(line)["step"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert steps == list(range(1, 11))  # steps 6..10 were logged by both runs and appear once


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p"}, "needs `prompt` and `completion`, or `messages`"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "'messages' must be a list of at least two"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "x"}]}, "messages ending with the assistant's"),
    ({"prompt": "p", "completion": 3}, "'completion' must be a string"),
])
def test_bad_training_rows_name_file_and_line(tmp_path, tiny_model_dir, row, message):
    data = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], row])
    with pytest.raises(ValueError, match=re.escape("bad.jsonl:2: ") + ".*" + re.escape(message)):
        sft.main(tiny_args(tmp_path, tiny_model_dir, data=data))
    assert not (tmp_path / "run").exists()  # nothing written before the data is known to be good


def test_chat_messages_rows_train_on_the_last_assistant_message():
    row = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                        {"role": "assistant", "content": "a"}]}
    assert sft.check_row(row) is None
    prompt, completion = sft.to_example(row)
    assert prompt == row["messages"][:2] and completion == "a"


def test_batch_size_must_be_a_multiple_of_micro_batch_size(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="--batch-size 8 must be a multiple of --micro-batch-size 3"):
        sft.main(tiny_args(tmp_path, tiny_model_dir, micro_batch_size=3))
