"""common.py: log-probs against naive computations, masks, the task, data files, model loading, checkpoints."""

import json
import random
import re

import pytest
import torch
from helpers import make_model, make_tokenizer
from transformers import GenerationConfig

import common
import plumbing


# ---- per-token log-probs -------------------------------------------------------------------------------------------

def naive_logprobs_and_entropy(logits, targets, temperature):
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, targets[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_equal_naive_log_softmax_values_and_gradients(temperature):
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, requires_grad=True)
    targets = torch.randint(0, 11, (3, 5))
    w_lp, w_h = torch.randn(3, 5), torch.randn(3, 5)  # arbitrary upstream gradients for both outputs

    lp, h = common.token_logprobs(logits, targets, temperature)
    (grad,) = torch.autograd.grad((lp * w_lp + h * w_h).sum(), logits)
    lp_ref, h_ref = naive_logprobs_and_entropy(logits, targets, temperature)
    (grad_ref,) = torch.autograd.grad((lp_ref * w_lp + h_ref * w_h).sum(), logits)

    torch.testing.assert_close(lp, lp_ref)
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(grad, grad_ref)


def test_token_logprobs_of_bf16_logits_are_computed_in_fp32():
    torch.manual_seed(0)
    logits = (torch.randn(2, 4, 50) * 5).bfloat16()
    targets = torch.randint(0, 50, (2, 4))
    lp, _ = common.token_logprobs(logits, targets)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, naive_logprobs_and_entropy(logits.float(), targets, 1.0)[0])


@pytest.fixture(scope="module")
def model_and_batch():
    tokenizer = make_tokenizer()
    tokenizer.padding_side = "left"
    model = make_model(tokenizer)
    prompts = ["What is 1+1?", "Hi", "a much longer prompt, to force padding"]
    completions = ["2", "hello there", "ok"]
    prompt_ids, prompt_mask = common.encode_prompts(tokenizer, prompts)
    completion_ids, completion_mask = common.encode_completions(tokenizer, completions)
    return model, tokenizer, prompt_ids, prompt_mask, completion_ids, completion_mask


def test_completion_logprobs_equal_unpadded_full_log_softmax(model_and_batch):
    """Each row of the padded batch (left-padded prompt, right-padded completion) against the row scored alone,
    with no padding at all, through a plain full-vocabulary log_softmax."""
    model, _, prompt_ids, prompt_mask, completion_ids, completion_mask = model_and_batch
    lp, _ = common.completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, 0.9)
    for i in range(len(prompt_ids)):
        p, c = prompt_ids[i][prompt_mask[i].bool()], completion_ids[i][completion_mask[i].bool()]
        seq = torch.cat([p, c])[None]
        logp = torch.log_softmax(model(seq).logits[0, :-1] / 0.9, -1)
        expected = logp[len(p) - 1:].gather(-1, c[:, None]).squeeze(-1)
        torch.testing.assert_close(lp[i, :len(c)], expected, rtol=1e-4, atol=1e-5)


def test_logprobs_identical_with_left_and_right_padding(model_and_batch):
    """Move the split between 'prompt' (left-padded) and 'completion' (right-padded): the same tokens get the same
    log-probs whether the padding sits on their left or their right."""
    model, _, prompt_ids, prompt_mask, completion_ids, completion_mask = model_and_batch
    rows = [torch.cat([p[pm.bool()], c[cm.bool()]]).tolist()
            for p, pm, c, cm in zip(prompt_ids, prompt_mask, completion_ids, completion_mask)]
    results = []
    for split in (1, 5):  # 1: everything right-padded; 5: mostly left-padded
        p_ids, p_mask = common._pad([r[:split] for r in rows], 0, left=True, device="cpu")
        c_ids, c_mask = common._pad([r[split:] for r in rows], 0, left=False, device="cpu")
        lp, _ = common.completion_logprobs(model, p_ids, p_mask, c_ids, c_mask)
        results.append([lp[i, 5 - split:c_mask[i].sum()] for i in range(len(rows))])  # tokens 5.. of each row
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_logprobs_under_bf16_autocast_stay_fp32_and_close_to_fp32s(model_and_batch):
    """--dtype bfloat16 on a CPU: the matmuls run in bf16 under autocast, the log-probs come out in fp32, within bf16's
    rounding of the fp32 ones, and gradients reach the fp32 weights."""
    model, _, prompt_ids, prompt_mask, completion_ids, completion_mask = model_and_batch
    batch = (prompt_ids.repeat_interleave(2, 0), prompt_mask.repeat_interleave(2, 0),
             completion_ids.repeat_interleave(2, 0), completion_mask.repeat_interleave(2, 0))
    full, _ = common.completion_logprobs(model, *batch)
    with common.autocast(torch.device("cpu"), torch.bfloat16):
        half, _ = common.completion_logprobs(model, *batch)
    assert half.dtype == torch.float32 and not torch.equal(half, full)
    torch.testing.assert_close(half * batch[3], full * batch[3], rtol=0.05, atol=0.05)
    model.zero_grad()
    (half * batch[3]).sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    model.zero_grad()


@pytest.mark.parametrize("layout", ["groups", "shuffled", "pairs"])
def test_a_shared_prompt_is_computed_once_with_the_same_logprobs_and_gradients(model_and_batch, layout):
    """Rows that share a prompt (a group's completions, adjacent or not; DPO's chosen rows then rejected rows): the
    prompt-once path gives the one-pass log-probs, entropies and gradients to fp32 rounding, while the model body
    computes each distinct prompt's positions once."""
    model, tokenizer, prompt_ids, prompt_mask, _, _ = model_and_batch
    G = 4
    torch.manual_seed(0)
    completions = ["".join(random.Random(i).choice("0123456789 ab") for _ in range(1 + i % 7)) for i in range(3 * G)]
    c_ids, c_mask = common.encode_completions(tokenizer, completions)
    rows = torch.arange(3).repeat_interleave(G)  # prompt of each row
    if layout == "shuffled":
        rows = rows[torch.randperm(len(rows))]
    elif layout == "pairs":
        rows, c_ids, c_mask = torch.tensor([0, 1, 2, 0, 1, 2]), c_ids[:6], c_mask[:6]
    batch = (prompt_ids[rows], prompt_mask[rows], c_ids, c_mask)
    positions = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, i, o: positions.append(i[0].numel()))
    results = []
    try:
        for once in (False, True):
            positions.clear()
            model.zero_grad()
            lp, h = common.completion_logprobs(model, *batch, temperature=0.8, prompt_once=once)
            ((lp * c_mask).sum() + 0.5 * (h * c_mask).sum()).backward()
            results.append((lp * c_mask, h * c_mask, [p.grad.clone() for p in model.parameters()], sum(positions)))
    finally:
        hook.remove()
        model.zero_grad()
    (lp1, h1, g1, n1), (lp2, h2, g2, n2) = results
    torch.testing.assert_close(lp2, lp1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h2, h1, rtol=1e-5, atol=1e-5)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    start = int(batch[1].any(0).long().argmax())  # both paths skip columns that are padding in every row
    P, C = batch[0].shape[1] - start, int(c_mask.any(0).nonzero().max()) + 1
    assert n1 == len(rows) * (P + C) and n2 == len(set(rows.tolist())) * P + len(rows) * C


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_tokens_are_scored_with_the_distribution_they_were_drawn_from(model_and_batch, monkeypatch,
                                                                              temperature):
    """The sampling loop (prompts computed once, finished rows dropped, left padding): the distribution each token was
    drawn from, as handed to torch.multinomial, gives every sampled token the log-prob completion_logprobs gives it."""
    model, tokenizer, prompt_ids, prompt_mask, _, _ = model_and_batch
    draws = []
    multinomial = torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda probs, n: draws.append(probs) or multinomial(probs, n))
    torch.manual_seed(0)
    group = (prompt_ids.repeat_interleave(3, 0), prompt_mask.repeat_interleave(3, 0))
    ids, mask, _ = common.generate(model, tokenizer, *group, 8, temperature)
    lp, _ = common.completion_logprobs(model, *group, ids, mask, temperature)
    assert 0 < int(mask.sum(1).min()) < int(mask.sum(1).max())  # some rows finished early and left the batch
    live = torch.arange(len(ids))
    for t, probs in enumerate(draws):
        live = live[:len(probs)] if t == 0 else live[mask[live, t].bool()]  # the rows still sampling at t
        assert len(probs) == len(live)
        drawn = probs[torch.arange(len(live)), ids[live, t]]
        torch.testing.assert_close(drawn.log(), lp[live, t], rtol=1e-4, atol=1e-5)


def test_sampled_token_frequencies_match_the_model_distribution(model_and_batch):
    """Many one-token completions of one prompt: the empirical frequencies match exp(log-prob): the chi-square
    statistic within 3 standard deviations of its mean (seeded); a distribution off by a temperature fails it."""
    model, tokenizer, prompt_ids, prompt_mask, _, _ = model_and_batch
    n = 4000
    torch.manual_seed(0)
    ids, mask, _ = common.generate(model, tokenizer, prompt_ids[:1].expand(n, -1), prompt_mask[:1].expand(n, -1), 1)
    vocab = torch.arange(len(tokenizer))
    lp, _ = common.completion_logprobs(model, prompt_ids[:1].expand(len(vocab), -1),
                                       prompt_mask[:1].expand(len(vocab), -1), vocab[:, None],
                                       torch.ones(len(vocab), 1, dtype=torch.long))
    observed = torch.bincount(ids[:, 0], minlength=len(vocab)).float()

    def chi2(logprobs):
        expected = logprobs.exp() * n
        big = expected >= 5  # the rare tokens, if any, pooled into one cell
        e = torch.cat([expected[big], expected[~big].sum()[None]]) if (~big).any() else expected
        o = torch.cat([observed[big], observed[~big].sum()[None]]) if (~big).any() else observed
        return ((o - e) ** 2 / e).sum().item(), 3 * (2 * len(e)) ** 0.5 + len(e)  # statistic, mean df + 3 sd

    value, bound = chi2(lp[:, 0].detach())
    assert value < bound, (value, bound)
    value, bound = chi2(torch.log_softmax(torch.log_softmax(lp[:, 0].detach(), 0) / 0.7, 0))  # T = 0.7's instead
    assert value > bound, (value, bound)


def test_generate_ignores_the_checkpoints_sampling_defaults(model_and_batch):
    """A generation config asking for top_k=1 would make sampling greedy; ours must sample from the full softmax."""
    model, tokenizer, prompt_ids, prompt_mask, _, _ = model_and_batch
    model.generation_config.top_k, model.generation_config.do_sample = 1, True
    try:
        torch.manual_seed(0)
        runs = {tuple(common.generate(model, tokenizer, prompt_ids[:1], prompt_mask[:1], 6, 1.0)[0][0].tolist())
                for _ in range(5)}
    finally:
        model.generation_config.top_k = None
    assert len(runs) > 1


# ---- masks -----------------------------------------------------------------------------------------------------

def test_completion_mask_keeps_the_first_eos_when_pad_is_eos():
    tokenizer = make_tokenizer()
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    ids, mask = common.encode_completions(tokenizer, ["12", "3"])
    eos = tokenizer.eos_token_id
    assert ids[1].tolist() == tokenizer("3").input_ids + [eos, eos]  # EOS, then a pad that is also EOS
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0]]

    generated = torch.tensor([[5, 6, eos, eos, eos], [eos, eos, eos, eos, eos], [5, 6, 7, 8, 9]])
    mask, truncated = common.mask_after_eos(generated, [eos])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert truncated.tolist() == [False, False, True]


def test_prompts_without_chat_template_are_plain_text():
    tokenizer = make_tokenizer(chat_template=False)
    ids, mask = common.encode_prompts(tokenizer, ["1+1=", [{"role": "user", "content": "hi"}]])
    assert tokenizer.decode(ids[0][mask[0].bool()]) == "1+1=\n"
    assert tokenizer.decode(ids[1][mask[1].bool()]) == "hi\n"
    templated = make_tokenizer()
    assert common.render_prompt(templated, "hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


# ---- the task --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("59 + 63 = 122", "122"), ("The answer is -7.", "-7"), ("5-3=2", "2"), ("x = 1,234 apples", "1234"),
    ("122 is the sum", "122"), ("It is 78.0", "78"), ("no number here", None), ("", None), ("-0", "0"),
])
def test_parse_number(text, expected):
    result = common.parse_number(text)
    assert (result is None) if expected is None else (result == common.Fraction(expected))


def test_is_correct_compares_numbers_not_strings():
    assert common.is_correct("So 23 + 45 = 68.", "68")
    assert common.is_correct("-12", -12)
    assert common.is_correct("68 is the answer to 23 + 46", "46")  # the last number is the answer
    assert not common.is_correct("I don't know", "68")


def test_eval_split_is_fixed_and_disjoint_from_train():
    eval_set = common.eval_problems(200, digits=2, ops="+-*")
    assert eval_set == common.eval_problems(200, digits=2, ops="+-*")
    assert len({p["prompt"] for p in eval_set}) == 200
    train = common.arithmetic_problems("train", digits=2, ops="+-*", seed=3)
    train_prompts = {next(train)["prompt"] for _ in range(20_000)}
    assert not train_prompts & {p["prompt"] for p in eval_set}
    for p in eval_set[:20]:
        a, op, b = p["prompt"].split()[1:4]
        assert int(p["answer"]) == common.OPS[op](int(a), int(b.rstrip(".")))


def test_one_digit_eval_split_is_small_but_finite():
    assert 0 < len(common.eval_problems(200, digits=1)) < 30


# ---- data files ------------------------------------------------------------------------------------------------

def write(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "a", "answer": 1}', '{"prompt": "b", "answer": 2'], "data.jsonl:2: not valid JSON"),
    (['{"prompt": "a", "answer": 1}', '', '{"prompt": "b"}'], "data.jsonl:3: missing field(s) answer"),
    (['[1, 2]'], "data.jsonl:1: expected a JSON object"),
    (['{"prompt": "a", "answer": "many"}'], "data.jsonl:1: 'answer' = \"many\" is not one number"),
    (['{"prompt": 3, "answer": 3}'], "data.jsonl:1: 'prompt' must be a non-empty list of"),
    ([''], "no rows"),
])
def test_bad_jsonl_rows_name_file_and_line(tmp_path, lines, message):
    with pytest.raises(common.RunError, match=re.escape(message)):
        plumbing.problem_stream(str(write(tmp_path, lines)), 2, "+", seed=0)


def test_jsonl_rows_load_and_stream_reshuffles_every_epoch(tmp_path):
    path = write(tmp_path, [json.dumps({"prompt": f"q{i}", "answer": i}) for i in range(5)])
    stream = plumbing.problem_stream(str(path), 2, "+", seed=0)
    epochs = [[next(stream)["answer"] for _ in range(5)] for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(5))


def test_missing_data_file_fails_before_any_training(tmp_path):
    with pytest.raises(common.RunError, match="nope.jsonl: no such file"):
        plumbing.problem_stream(str(tmp_path / "nope.jsonl"), 2, "+", seed=0)


# ---- models ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, message", [
    ("./no/such/dir", "no such directory"), ("/tmp/missing-model.gguf", "no such .gguf file"),
])
def test_unknown_model_path_is_a_clear_error(name, message):
    with pytest.raises(common.RunError, match=message):
        plumbing.load_model(name)


def test_directory_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(common.RunError, match="no config.json"):
        plumbing.load_model(str(tmp_path))


def test_loaded_model_pads_left_and_has_no_dropout(tiny_model_dir):
    model, tokenizer = plumbing.load_model(tiny_model_dir)
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id is not None
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))


# ---- checkpoints -----------------------------------------------------------------------------------------------

def test_crash_during_save_keeps_the_last_good_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    model, tokenizer = plumbing.load_model(tiny_model_dir)
    target = tmp_path / "checkpoint"
    plumbing.save_pretrained(model, tokenizer, target, {"step": 1})

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("power cut")
    monkeypatch.setattr(tokenizer, "save_pretrained", crash)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        plumbing.save_pretrained(model, tokenizer, target, {"step": 2})
    assert plumbing.load_trainer_state(plumbing.find_checkpoint(str(tmp_path)))["step"] == 1
    reloaded, _ = plumbing.load_model(str(target))
    assert not torch.equal(next(reloaded.parameters()), next(model.parameters()))


def test_checkpoint_survives_a_crash_between_the_two_renames(tmp_path, tiny_model_dir):
    model, tokenizer = plumbing.load_model(tiny_model_dir)
    plumbing.save_pretrained(model, tokenizer, tmp_path / "checkpoint", {"step": 7})
    (tmp_path / "checkpoint").rename(tmp_path / "checkpoint.old")  # the state right after the first rename
    assert plumbing.find_checkpoint(str(tmp_path)) == tmp_path / "checkpoint.old"


def test_resume_restores_the_random_state(tmp_path, tiny_model_dir):
    model, tokenizer = plumbing.load_model(tiny_model_dir)
    torch.manual_seed(5)
    random.seed(5)
    plumbing.save_pretrained(model, tokenizer, tmp_path / "checkpoint", {"step": 3})
    expected = torch.rand(3), random.random()
    plumbing.load_trainer_state(tmp_path / "checkpoint")
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


def test_resume_without_a_run_is_a_clear_error(tmp_path):
    args = type("Args", (), {})()
    args.resume, args.output_dir = str(tmp_path), None
    with pytest.raises(common.RunError, match="no run there"):
        plumbing.open_run(args, "x")


# ---- the embedded default model (real SmolLM2 weights; fetched and converted on first use) ------------------------

@pytest.mark.slow
def test_default_model_loads_and_answers():
    model, tokenizer = plumbing.load_model(plumbing.DEFAULT_MODEL)
    assert model.config.model_type == "llama" and not hasattr(model.config, "quantization_config")
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    prompt_ids, prompt_mask = common.encode_prompts(tokenizer, ["Compute 2 + 3. Reply with only the final answer."])
    ids, mask, truncated = common.generate(model, tokenizer, prompt_ids, prompt_mask, 16, greedy=True)
    text = common.decode(tokenizer, ids, mask)[0]
    assert not truncated[0] and common.is_correct(text, "5"), text
    # a group of 4 sampled completions of the prompt: computed once, the prompt gives the one-pass log-probs
    torch.manual_seed(0)
    group = (prompt_ids.repeat(4, 1), prompt_mask.repeat(4, 1))
    ids, mask, _ = common.generate(model, tokenizer, *group, 12, temperature=1.0)
    once, _ = common.completion_logprobs(model, *group, ids, mask)
    full, _ = common.completion_logprobs(model, *group, ids, mask, prompt_once=False)
    torch.testing.assert_close(once * mask, full * mask, rtol=1e-4, atol=1e-4)
