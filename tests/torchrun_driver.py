"""Runs training scripts' main() one after another in this process, as tests/test_distributed.py asks: plainly
(`python tests/torchrun_driver.py runs.json`) or as every rank of `torchrun ... tests/torchrun_driver.py runs.json`.

runs.json is a list of {"script", "args", "completions", "fail_on_rank"}: the script's Args as a dict; with
"completions" (a list of texts), sampling is replaced by completions that depend only on the row's place in the
global batch and on the call, never on the model, the rank or the world size, so that runs at different world sizes
train on the same samples; "fail_on_rank" makes that rank raise at its first sampling call. The gradient of each
run's first optimiser step (after the ranks' gradients are summed, gathered whole from FSDP's shards) is saved to
<output_dir>/first_gradient.pt, for comparison before AdamW (which magnifies rounding in near-zero gradients)."""

import importlib
import json
import sys
import zlib

import torch

import common
import plumbing


def fixed_generate(texts: list[str], fail_on_rank: int | None):
    calls = [0]

    def generate(model, tokenizer, prompt_ids, prompt_mask, max_new_tokens, temperature=1.0, top_p=1.0,
                 greedy=False, batch_size=None):
        if common.rank() == fail_on_rank:
            raise RuntimeError(f"rank {fail_on_rank} fails on purpose")
        n, first = len(prompt_ids), common.rank() * len(prompt_ids)  # the rows' places in the global batch
        picked = [texts[zlib.crc32(f"{calls[0]}:{first + i}".encode()) % len(texts)] for i in range(n)]
        calls[0] += 1
        rows = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_new_tokens - 1] + [tokenizer.eos_token_id]
                for t in picked]
        width = max(map(len, rows))
        ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows], device=prompt_ids.device)
        mask, truncated = common.mask_after_eos(ids, [tokenizer.eos_token_id])
        return ids, mask, truncated
    return generate


def recording(all_reduce_gradients, output_dir: str):
    """all_reduce_gradients, saving the gradient of the first model it reduces, once."""
    done = [False]

    def reduce(model) -> None:
        all_reduce_gradients(model)
        if not done[0]:
            done[0] = True
            grads = {name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().cpu()
                     for name, p in model.named_parameters() if p.grad is not None}  # full_tensor: collective
            if common.is_main():
                torch.save(grads, f"{output_dir}/first_gradient.pt")
    return reduce


def main() -> None:
    for run in json.loads(open(sys.argv[1]).read()):
        module = importlib.import_module(run["script"])
        if run.get("completions") or run.get("fail_on_rank") is not None:
            module.generate = fixed_generate(run.get("completions") or ["7"], run.get("fail_on_rank"))
        module.all_reduce_gradients = recording(plumbing.all_reduce_gradients, run["args"]["output_dir"])
        with plumbing.exit_on_error():
            module.main(module.Args(**run["args"]))


if __name__ == "__main__":
    main()
