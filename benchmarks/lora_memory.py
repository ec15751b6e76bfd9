"""What LoRA saves: the same short GRPO and DPO runs on the default model, full fine-tuning vs --lora-rank, with the
peak memory of each (the process's peak RSS on CPU, the CUDA allocator's peak on a GPU) and the bytes of the
training state it holds: weights, the reference model's copy, gradients and AdamW's two moments.

    python benchmarks/lora_memory.py                       # writes benchmarks/results-lora/results.{md,json}
    python benchmarks/lora_memory.py --out /tmp/lora --extra=--dtype=bfloat16

Full fine-tuning keeps a second copy of the model as pi_ref for GRPO's KL (DPO scores its pairs with the model before
its first update), a gradient and two AdamW moments for every weight; with LoRA pi_ref is the policy with its adapters
switched off, and only the adapters have gradients and moments.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from plumbing import cli, exit_on_error, require, run_command  # noqa: E402

RUNS = {
    "grpo": ["--batch-size", "2", "--group-size", "4", "--micro-batch-size", "8", "--max-new-tokens", "16"],
    "dpo": ["--num-prompts", "8", "--num-samples", "4", "--batch-size", "4", "--micro-batch-size", "4"],
}


@dataclass
class Args:
    algorithms: tuple[str, ...] = ("grpo", "dpo")
    """which scripts to measure"""
    lora_rank: int = 16
    """the LoRA run's --lora-rank (all linear layers)"""
    steps: int = 2
    """optimiser or sampling steps per run: enough for the state to be allocated"""
    out: str = "benchmarks/results-lora"
    """where the run directories, results.json and results.md go"""
    extra: list[str] = field(default_factory=list)
    """more flags for every run, e.g. --extra=--dtype=bfloat16"""


def state_bytes(algorithm: str, lora_rank: int) -> dict:
    """Bytes of fp32 training state for the default model, counted from its parameters: weights, pi_ref's copy (GRPO's
    KL, full fine-tuning only; DPO computes its reference log-probs once, before the first update, with the model
    itself), gradients and AdamW's two moments of what trains."""
    from plumbing import DEFAULT_MODEL, load_model

    model, _ = load_model(DEFAULT_MODEL)
    total = sum(p.numel() for p in model.parameters())
    if lora_rank:
        model = _lora(model, lora_rank)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    weights = sum(p.numel() for p in model.parameters())
    reference = total if algorithm == "grpo" and not lora_rank else 0  # LoRA: the adapters switched off
    return {"parameters": total, "trained": trained,
            "state_mib": 4 * (weights + reference + 3 * trained) / 2**20}


def _lora(model, rank: int):
    from types import SimpleNamespace

    from plumbing import with_lora
    flags = SimpleNamespace(lora_rank=rank, lora_alpha=2 * rank, lora_dropout=0.0, lora_target_modules="all-linear",
                            fsdp=False)
    return with_lora(model, flags)


def main(args: Args) -> None:
    unknown = [a for a in args.algorithms if a not in RUNS]
    require(not unknown, f"--algorithms {' '.join(unknown)}: expected some of {' '.join(RUNS)}")
    require(args.lora_rank >= 1 and args.steps >= 1, "--lora-rank and --steps must be >= 1")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for algorithm in args.algorithms:
        for rank in (0, args.lora_rank):
            name = f"{algorithm}-lora{rank}" if rank else f"{algorithm}-full"
            cost = out / f"{name}.cost.json"
            if not cost.exists():
                lora = ["--lora-rank", str(rank), "--lora-alpha", str(2 * rank)] if rank else []
                command = [sys.executable, str(ROOT / "benchmarks" / "measure.py"), str(cost), f"{algorithm}.py",
                           *RUNS[algorithm], *lora, "--max-steps", str(args.steps), "--eval-size", "0",
                           "--save-every", "1000", "--output-dir", str(out / name), *args.extra]
                print(" ".join(command), flush=True)
                run_command(command, f"{name}", cwd=ROOT)
            measured = json.loads(cost.read_text())
            rows.append({"run": name, "algorithm": algorithm, "lora_rank": rank, **state_bytes(algorithm, rank),
                         "peak_mib": measured.get("peak_cuda_mib", measured["peak_rss_mib"]),
                         "device": measured["device"], "wall_s": measured["wall_s"]})
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    peak = "peak RSS (MiB)" if rows[0]["device"] == "cpu" else "peak CUDA memory (MiB)"
    lines = [f"Device: {rows[0]['device']}. Default model (SmolLM2-135M-Instruct), fp32 weights, {args.steps} steps.", "",
             f"| run | trained parameters | training state, counted (MiB) | {peak} |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['run']} | {r['trained'] / 1e6:.1f}M of {r['parameters'] / 1e6:.1f}M | {r['state_mib']:.0f} | "
              f"{r['peak_mib']:.0f} |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    with exit_on_error():
        main(cli(Args, description=__doc__))
