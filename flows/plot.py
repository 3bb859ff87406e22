"""`eqlen plot RUN_DIR`: reward, response lengths and the within-prompt length gap per
iteration, as a PNG."""

from __future__ import annotations

from pathlib import Path

from flows.report import row_of, show_data


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = show_data(run_dir)
    rows = [row_of(it["stages"]) for it in data["iterations"]]
    xs = [it["index"] for it in data["iterations"]]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 3.6))
    ax1.plot(xs, [r["reward"] for r in rows], marker="o")
    ax1.set(xlabel="iteration", ylabel="mean reward (round-0 tracks)", title="reward")
    ax1.grid(alpha=0.3)
    for key, label in (("len_correct", "correct"), ("len_incorrect", "incorrect")):
        ax2.plot(
            xs,
            [r[key] if r[key] is not None else float("nan") for r in rows],
            marker="o",
            label=label,
        )
    ax2.set(xlabel="iteration", ylabel="mean response length (tokens)", title="lengths")
    ax2.legend()
    ax2.grid(alpha=0.3)
    ax3.plot(
        xs, [r["len_gap"] if r["len_gap"] is not None else float("nan") for r in rows], marker="o"
    )
    ax3.axhline(0, color="grey", lw=0.8)
    ax3.set(
        xlabel="iteration", ylabel="tokens", title="length gap within prompts (incorrect - correct)"
    )
    ax3.grid(alpha=0.3)
    fig.suptitle(Path(data["run_dir"]).name)
    fig.tight_layout()
    out = Path(out) if out else Path(data["run_dir"]) / "progress.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
