"""grpo.py's process supervision [GRPO-PROCESS] and the sum task it checks (common.py): the step checker, the step
ends on real tokenizations, the advantages against a hand computation, and learning end to end."""

import json
import math

import pytest
import torch
from helpers import CHARS, CHATML, SPECIALS, logged, make_model, make_tokenizer
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

import common
import plumbing
import grpo


def bpe_tokenizer(words=(), added=()) -> PreTrainedTokenizerFast:
    """helpers.make_tokenizer's characters, plus multi-character tokens: `words` built by BPE merges (so the text is
    tokenized into them), `added` as whole added tokens."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    merges = []
    for word in words:
        for k in range(2, len(word) + 1):
            if word[:k] not in vocab:
                vocab[word[:k]] = len(vocab)
                merges.append((word[:k - 1], word[k - 1]))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", pad_token="<|im_end|>")
    tokenizer.chat_template = CHATML
    tokenizer.add_tokens(list(added))
    return tokenizer


# ---- the sum task and its step checker (common.py) -------------------------------------------------------------------

@pytest.mark.parametrize("completion, expected", [
    ("12 + 34 = 46\n46 + 56 = 102", [(True, 12), (True, 26)]),
    # a wrong result, a step that goes on from it correctly (the error is not carried), a step past the numbers
    ("12+34=47\nso 47 + 56 = 103.\n103 + 1 = 104", [(False, 8), (True, 25), (False, 40)]),
    ("12 + 34 = 46\n12 + 56 = 68", [(True, 12), (False, 25)]),  # does not go on from 46
    ("12 + 34 = 46\n46 + 34 = 80", [(True, 12), (False, 25)]),  # adds the wrong number
    ("34 + 12 = 46\n46 + 56 = 102", [(False, 12), (True, 26)]),  # does not start from the first number
    ("Let me add.\n\n12 + 34 = 46\n46 + 56 = 102 and 1 + 1 = 2\n", [(True, 25), (True, 39)]),  # a line's first
    # stopping early: one more wrong step, the missing one, past the text (the completion's last token)
    ("12 + 34 = 46", [(True, 12), (False, 13)]), ("102", [(False, 4)]), ("", [(False, 1)]),
    ("12 + 34 =", [(False, 10)]),
])
def test_sum_steps_checks_each_line(completion, expected):
    assert common.sum_steps(completion, [12, 34, 56]) == expected
    for _, end in expected:
        assert end == len(completion) + 1 or completion[end - 1].isdigit()  # just past the step's last character


def test_the_sum_task_and_the_default_task():
    problems = list(zip(range(200), common.sum_problems("train", 2, seed=0)))
    for _, p in problems:
        assert len(p["numbers"]) in (3, 4) and p["answer"] == str(sum(p["numbers"]))
        assert common.check_sum_row(p) is None and all(str(n) in p["prompt"] for n in p["numbers"])
        right = "\n".join(f"{sum(p['numbers'][:j])} + {p['numbers'][j]} = {sum(p['numbers'][:j + 1])}"
                          for j in range(1, len(p["numbers"])))
        assert all(ok for ok, _ in common.sum_steps(right, p["numbers"])) and common.is_correct(right, p["answer"])
    held_out = {p["prompt"] for p in common.eval_problems(100, task="sum")}
    assert len(held_out) == 100 and not held_out & {p["prompt"] for _, p in problems}
    assert common.eval_problems(3) == common.eval_problems(3, 2, "+", "arithmetic")  # the default is unchanged
    assert common.eval_problems(3)[0]["prompt"].startswith("Compute ")


@pytest.mark.parametrize("numbers, answer, message", [
    (None, 3, "'numbers' must be a list"), ([1], 1, "'numbers' must be a list"), ([1, True], 2, "must be a list"),
    ([1, 2.5], 3.5, "must be a list"), ([1, 2], 4, "'numbers' add up to 3, not to 'answer' 4"), ([1, 2], "3", None),
])
def test_a_data_row_for_process_supervision_needs_numbers_that_add_up(numbers, answer, message):
    problem = common.check_sum_row({"prompt": "p", "answer": answer, **({} if numbers is None else
                                                                        {"numbers": numbers})})
    assert problem == message if message is None else message in problem


# ---- the token that ends each step, on real tokenizations --------------------------------------------------------

TEXT = "12 + 34 = 46\n46 + 56 = 102"


def containing_token(offsets, char):
    return next(k for k, (start, end) in enumerate(offsets) if start <= char < end)


@pytest.mark.parametrize("tokenizer, pieces", [
    (make_tokenizer(), ["6", "2"]),
    (bpe_tokenizer(["12", " +", "= 4", "6\n", "= 102"]), ["6\n", "= 102"]),  # both steps end inside a token
], ids=["characters", "bpe"])
def test_step_ends_map_to_the_token_holding_the_last_character(tokenizer, pieces):
    encoding = tokenizer(TEXT, add_special_tokens=False, return_offsets_mapping=True)
    ends = [end for _, end in common.sum_steps(TEXT, [12, 34, 56])]
    expected = [containing_token(encoding.offset_mapping, end - 1) for end in ends]  # the tokenizer's own offsets
    ids = encoding.input_ids + [tokenizer.eos_token_id]
    assert grpo.step_end_tokens(tokenizer, ids, ends) == expected
    assert [tokenizer.decode([ids[k]]) for k in expected] == pieces
    assert grpo.step_end_tokens(tokenizer, ids, [len(TEXT) + 1]) == [len(ids) - 1]  # past the text: the EOS
    first_step = ids[:expected[0] + 1] + ids[-1:]  # the first step's tokens, then EOS: the missing step ends there
    unfinished = common.sum_steps(tokenizer.decode(first_step, skip_special_tokens=True), [12, 34, 56])
    assert grpo.step_end_tokens(tokenizer, first_step, [end for _, end in unfinished]) == [expected[0], expected[0] + 1]


def test_step_ends_follow_the_sampled_tokens_not_a_fresh_tokenization():
    """A policy may sample "1", "2" where the tokenizer would write "12": the step ends are positions in the sampled
    ids, found from their own decoded prefixes."""
    tokenizer = bpe_tokenizer(["12", "= 46\n"])
    sampled = [tokenizer.convert_tokens_to_ids(t) for t in ["1", "2", " ", "+", " ", "3", "4", " ", "= 46\n", "4",
                                                             "6", " ", "+", " ", "5", "6", " ", "=", " ", "1", "0",
                                                             "2", "<|im_end|>"]]
    assert tokenizer.decode(sampled, skip_special_tokens=True) == TEXT
    ends = [end for _, end in common.sum_steps(TEXT, [12, 34, 56])]
    assert grpo.step_end_tokens(tokenizer, sampled, ends) == [8, 21]  # "= 46\n" holds the 6; then the final "2"


# ---- [GRPO-PROCESS] the advantages ----------------------------------------------------------------------------------

def test_process_advantages_by_hand():
    """Group 1 (G = 3): steps of unequal length, one completion with no step. Group 2: equal step rewards."""
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]] * 2)
    rewards = [[1.0, 1.0], [1.0], [], [1.0, 1.0], [1.0], [1.0]]
    ends = [[1, 4], [2], [], [0, 5], [3], [1]]
    eps = 1e-4
    # group 1 pools R = (1, 1, 1, 0): the third completion is one step, reward 0, ending at its last token (4)
    std = math.sqrt(0.75 * 0.25)
    a, b = 0.25 / (std + eps), -0.75 / (std + eps)
    expected = torch.tensor([[2 * a, 2 * a, a, a, a, 0],  # steps end at 1 and 4; nothing ends after 4
                             [a, a, a, 0, 0, 0],          # one step, ending at 2; token 3 is after it
                             [b, b, b, b, b, 0],          # no step: every token shares the blame
                             [0] * 6, [0] * 6, [0] * 6])  # group 2: all step rewards equal, no signal, no NaN
    advantages = grpo.process_advantages(rewards, ends, 3, mask, "group", eps)
    torch.testing.assert_close(advantages, expected)
    assert not advantages.isnan().any()
    centred = grpo.process_advantages(rewards, ends, 3, mask, "none")  # [DR-GRPO]: centred only
    torch.testing.assert_close(centred[:3], torch.tensor([[0.5, 0.5, 0.25, 0.25, 0.25, 0], [0.25, 0.25, 0.25, 0, 0, 0],
                                                          [-0.75] * 5 + [0]]))


def test_one_step_per_completion_ending_at_its_last_token_is_outcome_supervision():
    torch.manual_seed(0)
    mask = (torch.arange(7) < torch.randint(1, 8, (12, 1))).long()
    outcome = torch.randint(0, 2, (12,)).float()
    ends = [[int(n) - 1] for n in mask.sum(1)]
    for scale in ("group", "batch", "none"):
        torch.testing.assert_close(grpo.process_advantages([[r] for r in outcome.tolist()], ends, 4, mask, scale),
                                   grpo.group_advantages(outcome, 4, scale)[:, None] * mask)


# ---- learning, end to end -------------------------------------------------------------------------------------------

# right; wrong; right after the wrong one (the error is not carried); wrong (adds 1, not 0)
STEP_TOKENS = ["1 + 0 = 1\n", "1 + 0 = 2\n", "2 + 0 = 2\n", "1 + 1 = 2\n"]


@pytest.fixture(scope="module")
def step_model_dir(tmp_path_factory) -> str:
    """A tiny random model whose tokenizer has whole steps of the toy sum 1 + 0 + 0 as tokens (each holding its step's
    last character and the newline after it), right and wrong ones, among its ~80 characters: a random policy writes
    a right step ~1 time in 80, as it writes the toy task's '7'. (A sum whose two steps differ, 1 + 2 + 3, is beyond
    this model within a test's budget: it cannot yet tell the first line from the second, and settles on repeating
    the first.)"""
    tokenizer = bpe_tokenizer(added=STEP_TOKENS)
    path = tmp_path_factory.mktemp("step-llama")
    make_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def toy_sum(tmp_path) -> str:
    path = tmp_path / "sum.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Add 1, 0 and 0 ({d}).", "answer": 1, "numbers": [1, 0, 0]}) + "\n"
                            for d in range(10)))
    return str(path)


def process_args(tmp_path, model_dir, **kw):
    data = toy_sum(tmp_path)
    defaults = dict(model=model_dir, data=data, eval_data=data, output_dir=str(tmp_path / "run"), supervision="process",
                    max_steps=30, batch_size=8, group_size=8, micro_batch_size=64, learning_rate=1e-2,
                    max_new_tokens=3, temperature=1.0, eval_every=0, beta=0.0, save_every=1000)
    return grpo.Args(**{**defaults, **kw})


def test_process_supervision_learns_the_steps(tmp_path, step_model_dir):
    """Two right steps, then stop: a third step is past the numbers, so wrong. Seeds 0-4: step_accuracy from 0.02-0.08
    (first 3 steps) to 0.77-0.82 (last 4: some completions still write a third step), accuracy to 0.96-1.0."""
    grpo.main(process_args(tmp_path, step_model_dir))
    step_accuracy, accuracy = logged(tmp_path / "run", "step_accuracy"), logged(tmp_path / "run", "accuracy")
    assert sum(step_accuracy[:3]) / 3 < 0.15
    assert sum(step_accuracy[-4:]) / 4 > 0.6 and sum(accuracy[-4:]) / 4 > 0.85


def test_process_supervision_resumed_reproduces_the_uninterrupted_run(tmp_path, step_model_dir):
    kw = dict(max_steps=4, save_every=2)
    grpo.main(process_args(tmp_path, step_model_dir, **kw))
    grpo.main(process_args(tmp_path, step_model_dir, resume=str(tmp_path / "run"), output_dir=str(tmp_path / "resumed"),
                           **kw))
    a, b = (plumbing.load_model(str(tmp_path / run / "final"))[0] for run in ("run", "resumed"))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert logged(tmp_path / "run", "step_accuracy") == logged(tmp_path / "resumed", "step_accuracy")


def test_the_sum_task_runs_end_to_end(tmp_path, tiny_model_dir):
    """The built-in multi-step task with process supervision: held-out evaluation included."""
    last = grpo.main(process_args(tmp_path, tiny_model_dir, data=None, eval_data=None, task="sum", max_steps=1,
                                  batch_size=2, group_size=2, micro_batch_size=4, max_new_tokens=4, eval_size=4,
                                  eval_every=1))
    assert 0 <= last["step_accuracy"] <= 1 and "eval_accuracy" in last


@pytest.mark.parametrize("flag, message", [
    (dict(data=None), "--supervision process checks steps: use --task sum"),
    (dict(supervision="steps"), "--supervision steps: expected outcome/process"),
    (dict(data=None, task="sum", ops="+-"), "--task sum adds numbers: --ops"),
])
def test_bad_process_flags_are_refused_before_anything_is_written(tmp_path, tiny_model_dir, flag, message):
    with pytest.raises(common.RunError, match=message):
        grpo.main(process_args(tmp_path, tiny_model_dir, **flag))
    assert not (tmp_path / "run").exists()


def test_a_data_row_without_numbers_is_a_file_line_error(tmp_path, tiny_model_dir):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "Add 1, 2 and 3.", "answer": 6, "numbers": [1, 2, 3]}\n{"prompt": "p", "answer": 6}\n')
    with pytest.raises(common.RunError, match=r"bad.jsonl:2: 'numbers' must be a list"):
        grpo.main(process_args(tmp_path, tiny_model_dir, data=str(data)))
    assert not (tmp_path / "run").exists()
