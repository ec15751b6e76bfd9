"""plot.py: the time axis, the curves drawn and the PNG written, its refusals; benchmarks/run.py's use of it and its
default output directory. Fake run directories, no model."""

import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

import plot
from common import RunError

ROOT = Path(__file__).resolve().parents[1]
NEEDS_MATPLOTLIB = "plot.py needs matplotlib: pip install matplotlib"


def write_run(path: Path, rows: list[dict]) -> Path:
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def grpo_rows(seed: int = 0, steps: int = 10) -> list[dict]:
    """grpo.py's log: evaluation at steps 0, 5, 10 (step 0 has nothing else), sampled-batch values every step."""
    rng = random.Random(seed)
    rows = [{"step": 0, "eval_accuracy": 0.2}]
    for step in range(1, steps + 1):
        rows.append({"step": step, "reward_mean": rng.random(), "kl_k3": rng.random() / 10,
                     "completion_len": rng.uniform(10, 30), "step_time": rng.uniform(20, 40)})
        if step % 5 == 0:
            rows[-1]["eval_accuracy"] = 0.2 + step / 100
    return rows


def reward_rows() -> list[dict]:
    """reward.py's log: pair accuracies, no reward_mean, KL or length."""
    rows = [{"step": 0, "eval_pair_accuracy": 0.5}]
    rows += [{"step": s, "pair_accuracy": s / 10, "loss": 1 / s, "step_time": 2.0} for s in range(1, 7)]
    rows[3]["eval_pair_accuracy"], rows[6]["eval_pair_accuracy"] = 0.6, 0.7
    return rows


def timed_rows() -> list[dict]:
    """A newer run: wall-clock "time" on every row, which counts evaluation that step_time does not."""
    rows = [{"step": 0, "eval_accuracy": 0.1, "time": 12.0}]
    rows += [{"step": s, "reward_mean": 0.5, "step_time": 1.0, "time": 12.0 + 30 * s} for s in range(1, 4)]
    rows[-1]["eval_accuracy"] = 0.3
    return rows


@pytest.fixture
def runs(tmp_path):
    return [write_run(tmp_path / "grpo-a", grpo_rows()), write_run(tmp_path / "rm", reward_rows()),
            write_run(tmp_path / "timed", timed_rows())]


@pytest.fixture
def figures(monkeypatch):
    """The figures plot_runs saves, kept for inspection."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    saved, savefig = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (saved.append(self), savefig(self, *a, **k))[1])
    return saved


def test_time_axis_is_logged_time_else_summed_step_times(runs):
    (label_a, a), (label_rm, rm), (label_t, timed) = plot.load_runs(runs)
    assert (label_a, label_rm, label_t) == ("grpo-a", "rm", "timed")
    elapsed, expected = 0.0, [0.0]
    for row in grpo_rows()[1:]:
        elapsed += row["step_time"]
        expected.append(elapsed / 60)
    assert [r["minutes"] for r in a] == pytest.approx(expected)
    assert [r["minutes"] for r in rm] == pytest.approx([0, 2 / 60, 4 / 60, 6 / 60, 8 / 60, 10 / 60, 12 / 60])
    assert [r["minutes"] for r in timed] == pytest.approx([0.2, 0.7, 1.2, 1.7])  # "time", not the 1 s step_time


def test_png_written_with_each_panels_curves(runs, tmp_path, figures):
    Image = pytest.importorskip("PIL.Image")
    out = plot.main(plot.Args(runs=tuple(map(str, runs)), out=str(tmp_path / "sub" / "curves.png"), smooth=3))
    assert out.read_bytes()[:4] == b"\x89PNG"
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (2000, 900)  # FIGSIZE x DPI, not cropped
    (fig,) = figures
    axes = fig.axes
    assert [ax.get_title() for ax in axes[:4]] == [title for title, _, _ in plot.PANELS]
    assert [ax.get_xlabel() for ax in axes] == ["step"] * 4 + ["time (min)"] * 4

    def line(ax, run):  # the curve of run (its index) in the panel
        (match,) = [ln for ln in ax.get_lines() if ln.get_label() == ["grpo-a", "rm", "timed"][run]]
        return list(match.get_xdata()), list(match.get_ydata())

    # Held-out accuracy: raw, with markers; reward.py's pair accuracy where there is no eval_accuracy.
    assert line(axes[0], 0)[0] == [0, 5, 10] and line(axes[0], 0)[1] == pytest.approx([0.2, 0.25, 0.3])
    assert [ln.get_marker() for ln in axes[0].get_lines()] == ["o"] * 3
    assert line(axes[0], 1)[0] == [0, 3, 6] and line(axes[0], 1)[1] == pytest.approx([0.5, 0.6, 0.7])
    assert line(axes[4], 2)[0] == pytest.approx([0.2, 1.7])  # time row: the logged "time" in minutes
    # Reward: a 3-step trailing mean of reward_mean, pair_accuracy for reward.py.
    rewards = [r["reward_mean"] for r in grpo_rows()[1:]]
    assert line(axes[1], 0)[0] == list(range(1, 11))
    assert line(axes[1], 0)[1] == pytest.approx([sum(rewards[max(0, i - 2):i + 1]) / len(rewards[max(0, i - 2):i + 1])
                                                 for i in range(10)])
    assert line(axes[1], 1)[1] == pytest.approx([0.1, 0.15, 0.2, 0.3, 0.4, 0.5])
    assert "reward_mean" in axes[1].get_ylabel() and "pair_accuracy" in axes[1].get_ylabel()
    assert len(axes[2].get_lines()) == 1 and "kl_k3" in axes[2].get_ylabel()  # only grpo-a logs KL
    assert [t.get_text() for ax in axes for t in ax.texts] == []  # every panel has a curve
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["grpo-a", "rm", "timed"]


def test_panel_nobody_logged_says_so(tmp_path, figures):
    run = write_run(tmp_path / "rm", reward_rows())
    plot.main(plot.Args(runs=(str(run),), out=str(tmp_path / "c.png"), labels=("reward model",)))
    axes = figures[0].axes
    assert [[t.get_text() for t in ax.texts] for ax in axes[:4]] == [[], [], ["not logged"], ["not logged"]]
    assert [len(ax.get_lines()) for ax in axes] == [1, 1, 0, 0] * 2
    assert [t.get_text() for t in figures[0].legends[0].get_texts()] == ["reward model"]


def test_labels_must_match_the_runs(runs, tmp_path):
    with pytest.raises(RunError, match="--labels: 1 given for 3 runs"):
        plot.main(plot.Args(runs=tuple(map(str, runs)), out=str(tmp_path / "c.png"), labels=("only one",)))
    assert not (tmp_path / "c.png").exists()


def test_directory_without_metrics_or_rows_is_named(tmp_path):
    with pytest.raises(RunError, match="nothing-here: no metrics.jsonl"):
        plot.load_runs([tmp_path / "nothing-here"])
    write_run(tmp_path / "fresh", [])
    with pytest.raises(RunError, match=r"fresh/metrics.jsonl: no rows"):
        plot.load_runs([tmp_path / "fresh"])


def test_missing_matplotlib_is_one_line(runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    with pytest.raises(RunError, match="^" + NEEDS_MATPLOTLIB + "$"):
        plot.main(plot.Args(runs=(str(runs[0]),), out=str(tmp_path / "c.png")))
    # The command line: that line on stderr, exit status 2, no traceback.
    code = ("import sys, runpy; sys.modules['matplotlib'] = None; sys.argv = ['plot.py', *sys.argv[1:]]; "
            "runpy.run_path('plot.py', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code, str(runs[0]), "--out", str(tmp_path / "c.png")], cwd=ROOT,
                          capture_output=True, text=True)
    assert (done.returncode, done.stderr.strip()) == (2, "error: " + NEEDS_MATPLOTLIB)
    assert not (tmp_path / "c.png").exists()


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_run", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_benchmark_writes_a_fresh_directory_by_default(tmp_path):
    bench = load_benchmark()
    assert bench.Args().out is None
    out = bench.output_dir(bench.Args())
    assert out.parent == ROOT / "benchmarks" and out != ROOT / "benchmarks" / "results"
    assert out.name.startswith("results-") and len(out.name) == len("results-20250101-120000")
    assert bench.output_dir(bench.Args(out=str(tmp_path / "mine"))) == tmp_path / "mine"  # given: kept, continued
    # .gitignore keeps such a directory's run directories (model weights) out of git, and its results in.
    if subprocess.run(["git", "rev-parse"], cwd=ROOT, capture_output=True).returncode:
        pytest.skip("not a git checkout")
    rel = out.relative_to(ROOT)
    ignored = subprocess.run(["git", "check-ignore", "--no-index", str(rel / "grpo" / "final" / "model.safetensors"),
                              str(rel / "results.md"), str(rel / "curves.png")], cwd=ROOT, capture_output=True,
                             text=True).stdout.split()
    assert ignored == [str(rel / "grpo" / "final" / "model.safetensors")]


def test_benchmark_without_matplotlib_skips_the_plot(tmp_path, monkeypatch, capsys):
    bench = load_benchmark()
    write_run(tmp_path / "grpo", grpo_rows(steps=12))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    bench.plot(bench.Args(algorithms=("grpo",), steps=10), tmp_path)
    assert capsys.readouterr().out == "skipped the plot: matplotlib is not installed (pip install matplotlib)\n"
    assert not (tmp_path / "curves.png").exists()


def test_benchmark_plots_up_to_its_steps(tmp_path, figures):
    bench = load_benchmark()
    write_run(tmp_path / "grpo", grpo_rows(steps=12))  # an earlier, longer run reused
    bench.plot(bench.Args(algorithms=("grpo",), steps=10), tmp_path)
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert list(figures[0].axes[0].get_lines()[0].get_xdata()) == [0, 5, 10]
    assert list(figures[0].axes[1].get_lines()[0].get_xdata()) == list(range(1, 11))
