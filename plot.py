"""Learning curves of one or more runs in one PNG: held-out accuracy, reward, KL to the reference and completion
length, against step (top row) and against time (bottom row).

    python plot.py runs/grpo-a runs/grpo-b --out curves.png
    python plot.py runs/grpo-a runs/gspo-a --labels GRPO GSPO --smooth 10
    python plot.py runs/rm --out rm.png     # reward.py: pair accuracies in place of accuracy and reward

Each argument is a run directory (its metrics.jsonl). Per-step values of the sampled or training batch (reward, KL,
length) are noisy, so they are drawn as a trailing mean over --smooth steps; held-out accuracy is drawn as logged. The
time axis is the run's wall clock where its rows log "time", else the sum of its step times (evaluation excluded).
Needs matplotlib (pip install matplotlib).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import tyro

from common import RunError
from plumbing import cli, exit_on_error, read_metrics, require

# (title, the keys that can hold it: the first one a run logs is used, smoothed?). reward.py logs pair accuracies.
PANELS = [("held-out accuracy", ("eval_accuracy", "eval_pair_accuracy"), False),
          ("reward", ("reward_mean", "pair_accuracy"), True),
          ("KL to the reference", ("kl_k3", "kl_k1", "kl"), True),
          ("completion length (tokens)", ("completion_len",), True)]
FIGSIZE, DPI = (20, 9), 100  # inches, dots per inch: a 2000 x 900 PNG


class NoMatplotlib(RunError):
    """matplotlib is not installed: callers that can do without the plot (benchmarks/run.py) catch this one."""


@dataclass
class Args:
    runs: tyro.conf.Positional[tuple[str, ...]]
    """run directories, each with a metrics.jsonl"""
    out: str = "curves.png"
    """the image to write (PNG; a .pdf or .svg name picks that format)"""
    labels: tuple[str, ...] = ()
    """one legend label per run, in order; none: each run directory's name"""
    smooth: int = 5
    """steps in the trailing mean of the per-step curves (reward, KL, length); 1 draws them raw"""


def load_runs(dirs) -> list[tuple[str, list[dict]]]:
    """(label, rows) per run directory, each row with "minutes" added: the time axis."""
    paths = [Path(d).resolve() for d in dirs]
    labels = [p.name for p in paths]
    if len(set(labels)) < len(labels):  # e.g. results-a/grpo and results-b/grpo
        labels = [f"{p.parent.name}/{p.name}" for p in paths]
    runs = []
    for d, label in zip(dirs, labels):
        file = Path(d) / "metrics.jsonl"
        require(file.is_file(), f"{d}: no metrics.jsonl (not a run directory?)")
        rows = read_metrics(file)
        require(bool(rows), f"{file}: no rows (the run logged nothing yet)")
        require(all(isinstance(r, dict) and "step" in r for r in rows), f"{file}: a row without \"step\"")
        seconds = 0.0
        for row in rows:  # wall clock where logged; else the summed step times (the step-0 evaluation has none: 0)
            seconds = row["time"] if "time" in row else seconds + row.get("step_time", 0.0)
            row["minutes"] = seconds / 60
        runs.append((label, rows))
    return runs


def trailing_mean(ys: list[float], window: int) -> list[float]:
    return [sum(ys[max(0, i - window + 1):i + 1]) / len(ys[max(0, i - window + 1):i + 1]) for i in range(len(ys))]


def plot_runs(runs: list[tuple[str, list[dict]]], out: Path, smooth: int = 5) -> Path:
    """Draw the runs (load_runs's output) into one figure at `out`; return `out`."""
    require(smooth >= 1, f"--smooth {smooth}: must be >= 1")
    try:
        import matplotlib
    except ImportError:
        raise NoMatplotlib("plot.py needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(2, len(PANELS), figsize=FIGSIZE, dpi=DPI)
    for col, (title, keys, smoothed) in enumerate(PANELS):
        used = []
        for i, (label, rows) in enumerate(runs):
            key = next((k for k in keys if any(k in r for r in rows)), None)
            if key is None:
                continue
            used += [key] if key not in used else []
            points = [(r["step"], r["minutes"], r[key]) for r in rows if r.get(key) is not None]
            steps, minutes, ys = map(list, zip(*points))
            if smoothed:
                ys = trailing_mean(ys, smooth)
            for ax, xs in ((axes[0, col], steps), (axes[1, col], minutes)):
                ax.plot(xs, ys, color=f"C{i}", marker=None if smoothed else "o", label=label)
        mean = f", {smooth}-step trailing mean" if smoothed and smooth > 1 else ""
        for row, ax in enumerate(axes[:, col]):
            ax.set(title=title, xlabel="step" if row == 0 else "time (min)",
                   ylabel=" / ".join(used) + mean if used else "")
            ax.grid(alpha=0.3)
            if not used:  # say so rather than leave a blank panel that looks like a plotting bug
                ax.text(0.5, 0.5, "not logged", transform=ax.transAxes, ha="center", va="center", color="gray")
                ax.set(xticks=[], yticks=[])
    handles = [Line2D([], [], color=f"C{i}", label=label) for i, (label, _) in enumerate(runs)]
    fig.legend(handles=handles, loc="upper center", ncol=min(len(runs), 8), frameon=False)
    fig.text(0.5, 0.005, "time: the run's wall clock where it logs \"time\", else the sum of its step times "
             "(evaluation excluded)", ha="center", va="bottom", fontsize=8, color="gray")
    fig.tight_layout(rect=(0, 0.02, 1, 0.95))  # room for the legend above and the note below
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out)
    except OSError as e:
        raise RunError(f"--out {out}: could not write it ({e.strerror or e}); choose another path") from None
    finally:
        plt.close(fig)
    return out


FORMATS = (".png", ".pdf", ".svg")


def main(args: Args) -> Path:
    require(bool(args.runs), "give at least one run directory")
    require(Path(args.out).suffix.lower() in FORMATS, f"--out {args.out}: the name picks the format; end it in "
            f"{', '.join(FORMATS)}")
    require(not args.labels or len(args.labels) == len(args.runs),
            f"--labels: {len(args.labels)} given for {len(args.runs)} runs; give one per run, or none")
    runs = load_runs(args.runs)
    if args.labels:
        runs = [(label, rows) for label, (_, rows) in zip(args.labels, runs)]
    out = plot_runs(runs, Path(args.out), args.smooth)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    with exit_on_error():
        main(cli(Args, description=__doc__))
