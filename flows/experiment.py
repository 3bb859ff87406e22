"""`eqlen experiment`: the loss-correction baselines and EqLen on the same task, seeds and budget.

Every method is a set of config overrides on one base config (the demo by default). All
runs share one stage cache (`DIR/cache`), so whatever the design lets them share is
computed once: the group-family methods start from the same iteration-0 rollouts, scores
and units, and differ from their update on. Each (method, seed) is a full online run in
`DIR/runs/<method>-s<seed>`; the results table and plots are written from their records.

Stages run in-process through `flows.runner` (the same code the Prefect flow wraps), so
an experiment of 30 runs does not pay 30 Prefect server starts.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from flows import runner
from flows.report import console, row_of, show_data
from pipeline import config as config_mod

GSPO_CLIP = ["update.clip_low=3e-4", "update.clip_high=4e-4"]
EQLEN = ["generate.rounds=4", "pair.strategy=eqlen", "update.loss_agg=unit_mean"]
METHODS: dict[str, list[str]] = {
    "grpo": ["update.loss_agg=seq_mean_token_mean"],
    "dapo": ["update.loss_agg=token_mean"],
    "dr_grpo": ["update.loss_agg=seq_mean_token_sum_norm"],
    "delta_l": ["update.loss_agg=delta_l"],
    "gspo": ["update.algorithm=gspo", *GSPO_CLIP],
    "rloo": ["update.algorithm=rloo"],
    "truncate": ["pair.strategy=truncate", "update.loss_agg=unit_mean"],
    "eqlen_grpo": [*EQLEN],
    "eqlen_gspo": [*EQLEN, "update.algorithm=gspo", *GSPO_CLIP],
    "eqlen_rloo": [*EQLEN, "update.algorithm=rloo"],
}


def run_experiment(
    out: str | Path,
    *,
    methods: list[str],
    seeds: list[int],
    base: list[str] = (),
    config_file: str | None = None,
) -> list[dict]:
    out = Path(out).resolve()
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise config_mod.ConfigError(f"unknown method(s) {unknown}; valid: {', '.join(METHODS)}")
    from flows import preflight

    def config_of(method: str, seed: int):
        return config_mod.load(
            config_file, [*base, *METHODS[method], f"seed={seed}", f"cache_dir={out / 'cache'}"]
        )

    # Every method's config is checked before the first run: a typo found after an hour of
    # the other methods would waste it.
    for method in methods:
        preflight.check(config_of(method, seeds[0]), out / "runs" / f"{method}-s{seeds[0]}")
    results = []
    for method in methods:
        for seed in seeds:
            cfg = config_of(method, seed)
            run_dir = out / "runs" / f"{method}-s{seed}"
            t0 = time.perf_counter()
            runner.online(
                cfg,
                run_dir,
                call=lambda n, c, d, i, r, f: runner.run_stage(
                    n, c, d, i, r, force=f, log=lambda m: None
                ),
            )
            wall = time.perf_counter() - t0
            rows = [row_of(it["stages"]) for it in show_data(run_dir)["iterations"]]
            res = summarize(method, seed, rows, wall)
            console.print(
                f"{method:<11} seed {seed}: final reward {res['final_reward']:.3f}  "
                f"Δlen(incorrect) {res['drift_incorrect']:+.2f}  {wall:.0f}s"
            )
            results.append(res)
    write_report(out, results, seeds)
    return results


def summarize(method: str, seed: int, rows: list[dict], wall: float) -> dict:
    def drift(key):
        vals = [r[key] for r in rows if r[key] is not None]
        return vals[-1] - vals[0] if len(vals) > 1 else float("nan")

    return {
        "method": method,
        "seed": seed,
        "final_reward": float(np.mean([r["reward"] for r in rows[-2:]])),
        "drift_incorrect": drift("len_incorrect"),
        "drift_correct": drift("len_correct"),
        "gap_first": _num(rows[0]["len_gap"]),
        "gap_last": _num(rows[-1]["len_gap"]),
        "gap_mean": _nanmean([_num(r["len_gap"]) for r in rows[1:]]),
        "eff": float(np.mean([r["eff"] for r in rows])),
        "wall": wall,
        "cached": sum(r["cached"] for r in rows),
        "stages": len(runner.STAGE_NAMES) * len(rows),
        "reward_curve": [r["reward"] for r in rows],
        "len_incorrect_curve": [r["len_incorrect"] for r in rows],
        "len_gap_curve": [r["len_gap"] for r in rows],
    }


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def _nanmean(vals: list[float]) -> float:
    vals = [v for v in vals if v == v]
    return float(np.mean(vals)) if vals else float("nan")


def _ms(vals) -> str:
    vals = np.asarray(vals, dtype=float)
    return f"{vals.mean():.3f} ± {vals.std(ddof=1):.3f}" if len(vals) > 1 else f"{vals.mean():.3f}"


def write_report(out: Path, results: list[dict], seeds: list[int]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in results))
    lines = [
        "| method | final reward | Δ len incorrect | Δ len correct | gap first | gap mean "
        "after | gap last | eff. token ratio | wall s (per run) | cached stages |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(16, 4.2))
    for m in methods:
        rs = [r for r in results if r["method"] == m]
        lines.append(
            f"| {m} | {_ms([r['final_reward'] for r in rs])} | "
            f"{_ms([r['drift_incorrect'] for r in rs])} | "
            f"{_ms([r['drift_correct'] for r in rs])} | "
            f"{_ms([r['gap_first'] for r in rs])} | {_ms([r['gap_mean'] for r in rs])} | "
            f"{_ms([r['gap_last'] for r in rs])} | "
            f"{np.mean([r['eff'] for r in rs]):.3f} | {np.mean([r['wall'] for r in rs]):.0f} | "
            f"{np.mean([r['cached'] for r in rs]):.0f}/{rs[0]['stages']} |"
        )
        style = "-" if m.startswith("eqlen") else "--"
        a1.plot(np.nanmean([r["reward_curve"] for r in rs], axis=0), style, label=m)
        for ax, key in ((a2, "len_incorrect_curve"), (a3, "len_gap_curve")):
            curves = np.array([[_num(v) for v in r[key]] for r in rs], dtype=float)
            ax.plot(np.nanmean(curves, axis=0), style, label=m)
    a1.set(xlabel="iteration", ylabel="mean reward", title=f"reward (mean of {len(seeds)} seeds)")
    a2.set(xlabel="iteration", ylabel="tokens", title="mean length of incorrect responses")
    a3.set(
        xlabel="iteration", ylabel="tokens", title="length gap within prompts (incorrect - correct)"
    )
    a3.axhline(0, color="grey", lw=0.8)
    for a in (a1, a2, a3):
        a.grid(alpha=0.3)
    a3.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=110)
    plt.close(fig)
    text = (
        "# Experiment results\n\nSeeds: " + ", ".join(map(str, seeds)) + ". final reward = "
        "mean reward of the last two iterations; Δ len = mean response length at the last "
        "iteration minus the first (tokens), for incorrect and correct responses; gap = mean "
        "length of incorrect minus correct responses to the same prompt, over prompts with "
        "both (score metric `len_gap`), at the first iteration, its mean over the later "
        "iterations, and at the last; ± is the std over seeds; cached stages = stage runs "
        "served from the shared cache (mean per run), whose time the wall time leaves out."
        "\n\n" + "\n".join(lines) + "\n\n![reward and lengths](results.png)\n"
    )
    (out / "results.md").write_text(text)
    console.print(text, markup=False)
    return out / "results.md"
