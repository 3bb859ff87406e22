"""`eqlen plot RUN_DIR`: reward and response lengths per iteration, as a PNG."""

from __future__ import annotations

from pathlib import Path

from pipeline.report import row_of, show_data


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = show_data(run_dir)
    rows = [row_of(it["stages"]) for it in data["iterations"]]
    xs = [it["index"] for it in data["iterations"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(xs, [r["reward"] for r in rows], marker="o")
    ax1.set(xlabel="iteration", ylabel="mean reward (round-0 tracks)", title="reward")
    ax1.grid(alpha=0.3)
    for key, label in (("len_correct", "correct"), ("len_incorrect", "incorrect")):
        ax2.plot(xs, [r[key] if r[key] is not None else float("nan") for r in rows], marker="o",
                 label=label)
    ax2.set(xlabel="iteration", ylabel="mean response length (tokens)", title="lengths")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.suptitle(Path(data["run_dir"]).name)
    fig.tight_layout()
    out = Path(out) if out else Path(data["run_dir"]) / "progress.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
