"""`eqlen plot RUN_DIR`: reward, response lengths and the within-prompt length gap per
iteration, and, when the run evaluates on held-out prompts (`eval.every`), avg@k and pass@k
per iteration (iteration i: the policy after i updates), as a PNG."""

from __future__ import annotations

from pathlib import Path

from flows.report import row_of, show_data


def _nan(v):
    return float("nan") if v is None else v


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = show_data(run_dir)
    rows = [row_of(it["stages"]) for it in data["iterations"]]
    xs = [it["index"] for it in data["iterations"]]
    held = [(x, r) for x, r in zip(xs, rows) if r["eval_k"]]
    # Training panels over the iterations that trained (not the final eval-only record).
    train = [(x, r) for x, r in zip(xs, rows) if "score" in data["iterations"][x]["stages"]]
    tx, tr = [x for x, _ in train], [r for _, r in train]
    fig, axes = plt.subplots(1, 3 + bool(held), figsize=(14 + 4.5 * bool(held), 3.6))
    ax1, ax2, ax3 = axes[:3]
    ax1.plot(tx, [_nan(r["reward"]) for r in tr], marker="o")
    ax1.set(xlabel="iteration", ylabel="mean reward (round-0 tracks)", title="reward")
    ax1.grid(alpha=0.3)
    for key, label in (("len_correct", "correct"), ("len_incorrect", "incorrect")):
        ax2.plot(tx, [_nan(r[key]) for r in tr], marker="o", label=label)
    ax2.set(xlabel="iteration", ylabel="mean response length (tokens)", title="lengths")
    ax2.legend()
    ax2.grid(alpha=0.3)
    ax3.plot(tx, [_nan(r["len_gap"]) for r in tr], marker="o")
    ax3.axhline(0, color="grey", lw=0.8)
    ax3.set(
        xlabel="iteration", ylabel="tokens", title="length gap within prompts (incorrect - correct)"
    )
    ax3.grid(alpha=0.3)
    if held:
        ax4 = axes[3]
        ks = sorted({r["eval_k"] for _, r in held})
        k = ks[0] if len(ks) == 1 else "k"
        hx = [x for x, _ in held]
        ax4.plot(hx, [_nan(r["avg_at_k"]) for _, r in held], marker="o", label=f"avg@{k}")
        ax4.plot(hx, [_nan(r["pass_at_k"]) for _, r in held], marker="s", label=f"pass@{k}")
        ax4.set(
            xlabel="updates done (iteration)",
            ylabel="held-out accuracy",
            title="held-out eval",
            ylim=(-0.02, 1.02),
        )
        ax4.legend()
        ax4.grid(alpha=0.3)
    fig.suptitle(Path(data["run_dir"]).name)
    fig.tight_layout()
    out = Path(out) if out else Path(data["run_dir"]) / "progress.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
