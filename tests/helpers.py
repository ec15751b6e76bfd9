"""Plain helpers the tests import: a character-level tokenizer and a tiny random Llama built offline from a config,
the RL toy task, and a reader for a run's metrics.jsonl.

The tokenizer mimics SmolLM2's: a ChatML chat template, and pad == EOS == <|im_end|>, the case where masks built
from `ids == pad` would hide the EOS a model has to learn."""

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHARS = list("0123456789+-*=.,?:!' \nabcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def make_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", pad_token="<|im_end|>")
    if chat_template:
        tokenizer.chat_template = CHATML
    return tokenizer


def make_model(tokenizer, seed: int = 0, hidden: int = 64, layers: int = 2,
               initializer_range: float = 0.02) -> LlamaForCausalLM:
    """initializer_range: with the default, the final norm and the small tied embeddings cap every token's
    probability at a few percent unless the embeddings themselves train; LoRA, which leaves them frozen, needs ~0.1."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True, initializer_range=initializer_range,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval()


def toy_task(tmp_path) -> str:
    """The RL toy task as a JSONL file: whatever the prompt says, answer 7. A random tiny model says it ~2% of the
    time, so learning shows as the reward going from near 0 to near 1."""
    path = tmp_path / "toy.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Say {d}.", "answer": 7}) + "\n" for d in range(10)))
    return str(path)


def logged(run_dir, key: str) -> list:
    """One metric from every line of a run's metrics.jsonl (None where the line lacks it)."""
    return [json.loads(line).get(key) for line in open(Path(run_dir) / "metrics.jsonl")]


def pair_files(tmp_path):
    """Train and eval JSONL files of toy preference pairs: "yes" is chosen over "no", as text or as chat messages."""
    rng = random.Random(0)
    rows = []
    for i in range(60):
        a = rng.randint(0, 9)
        good, bad = f"yes {a}", f"no {a}"
        rows.append({"prompt": f"Is {a} fine?", "chosen": good, "rejected": bad} if i % 2 else
                    {"prompt": f"Is {a} fine?", "chosen": [{"role": "assistant", "content": good}],
                     "rejected": [{"role": "assistant", "content": bad}]})
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:40]))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[40:]))
    return str(tmp_path / "train.jsonl"), str(tmp_path / "eval.jsonl")
