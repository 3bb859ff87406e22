"""`eqlen experiment`: the loss-correction baselines and EqLen on one task, seeds and budget.

Every method is a set of config overrides on one base: the task's (`TASKS`), then the
user's `--config` / `--set`. All runs share one stage cache (`DIR/cache`), so whatever
the design lets them share is computed once: the group-family methods start from the same
iteration-0 rollouts, scores and units, and differ from their update on. Each (method,
seed) is a full online run in `DIR/runs/<method>-s<seed>`; the results table and plots are
written from their records (`write_report`).

Comparing like with like (docs/results.md says what each figure means):
- every run is charged the *compute* seconds of each of its stages (the manifest's
  seconds, also for a stage another run computed first and it took from the cache) and the
  tokens its generate stage sampled, so methods are compared at matched token and time
  budgets as well as per iteration (EqLen with rounds > 1 samples more per prompt);
- a held-out split of the task (prompts of the same task drawn with another seed, none of
  them a training prompt) is evaluated at iteration 0, every `eval.every` and at the end:
  avg@k, the held-out accuracy;
- seeds give 95% t-intervals; each EqLen variant is tested against its group baseline
  (Welch's t-test) on final reward, held-out accuracy and incorrect-length drift;
- the fraction of units that carry signal (members' rewards not all equal) per iteration.

Stages run in-process through `flows.runner` (the same code the Prefect flow wraps), so
an experiment of 70 runs does not pay 70 Prefect flow runs.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np

from flows import runner
from flows.report import console, row_of, show_data
from pipeline import cache
from pipeline import config as config_mod

GSPO_CLIP = ["update.clip_low=3e-4", "update.clip_high=4e-4"]
EQLEN = ["generate.rounds=4", "pair.strategy=eqlen", "update.loss_agg=unit_mean"]
METHODS: dict[str, list[str]] = {
    "grpo": ["update.loss_agg=seq_mean_token_mean"],
    "dapo": ["update.loss_agg=token_mean"],
    "dr_grpo": ["update.loss_agg=seq_mean_token_sum_norm"],
    "delta_l": ["update.loss_agg=delta_l"],
    "gspo": ["update.algorithm=gspo", *GSPO_CLIP],
    "luspo": ["update.algorithm=luspo", *GSPO_CLIP],
    # ScaleRL's truncation at 5 (1 + clip_high), token-level normaliser as in TRL.
    "cispo": ["update.algorithm=cispo", "update.loss_agg=token_mean", "update.clip_high=4"],
    "sapo": ["update.algorithm=sapo"],
    "rloo": ["update.algorithm=rloo"],  # verl's form: token-level surrogate, LOO advantage
    "rloo_trl": ["update.algorithm=rloo_trl"],  # TRL's RLOOTrainer: one ratio per sequence
    "truncate": ["pair.strategy=truncate", "update.loss_agg=unit_mean"],
    "eqlen_grpo": [*EQLEN],
    "eqlen_gspo": [*EQLEN, "update.algorithm=gspo", *GSPO_CLIP],
    "eqlen_rloo": [*EQLEN, "update.algorithm=rloo"],
    # Ways to raise the fraction of units with signal (not in the default list).
    "eqlen_grpo_g16": [*EQLEN, "generate.group_size=16"],
    "eqlen_grpo_r8": ["generate.rounds=8", *EQLEN[1:]],
    "eqlen_grpo_t13": [*EQLEN, "generate.temperature=1.3"],
}
EXTRA = ("eqlen_grpo_g16", "eqlen_grpo_r8", "eqlen_grpo_t13")
DEFAULT_METHODS = [m for m in METHODS if m not in EXTRA]
# Each EqLen method against the group method with the same loss (the significance tests).
BASELINE = {"eqlen_grpo": "grpo", "eqlen_gspo": "gspo", "eqlen_rloo": "rloo", "truncate": "grpo"}
BASELINE.update({m: "grpo" for m in EXTRA})

# Built-in tasks: their base overrides and how many held-out prompts to evaluate.
TASKS: dict[str, list[str]] = {
    "demo": ["eval.every=5", "eval.k=4", "eval.max_prompts=128"],
    # docs/tasks.md: the settings under which GRPO lengthens the padding of wrong answers.
    "pad": [
        "data.prompts=pad",
        "model=pad",
        "iterations=25",
        "data.prompts_per_iteration=128",
        "generate.max_new_tokens=64",
        "update.lr=2e-4",
        "eval.every=25",  # the initial and the final policy
        "eval.k=4",
        "eval.max_prompts=128",
    ],
}
BUILTIN_PROMPTS = ("demo", "pad")
HELDOUT_SEED = 1_000_003  # the held-out prompts' draw: another seed of the same generator


def run_experiment(
    out: str | Path,
    *,
    methods: list[str],
    seeds: list[int],
    base: list[str] = (),
    config_file: str | None = None,
    task: str | None = None,
) -> list[dict]:
    out = Path(out).resolve()
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise config_mod.ConfigError(f"unknown method(s) {unknown}; valid: {', '.join(METHODS)}")
    if task is not None and task not in TASKS:
        raise config_mod.ConfigError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")
    from flows import preflight

    task_sets = TASKS[task] if task else []

    def config_of(method: str, seed: int, heldout: str = ""):
        sets = [*task_sets, *base, *METHODS[method], f"seed={seed}", f"cache_dir={out / 'cache'}"]
        if heldout:
            sets.append(f"eval.data={heldout}")
        return config_mod.load(config_file, sets)

    heldout = heldout_prompts(config_of(methods[0], 0), out)
    # Every method's config is checked before the first run: a typo found after an hour of
    # the other methods would waste it.
    for method in methods:
        preflight.check(
            config_of(method, seeds[0], heldout), out / "runs" / f"{method}-s{seeds[0]}"
        )
    results = []
    for method in methods:
        for seed in seeds:
            cfg = config_of(method, seed, heldout)
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
            res = summarize(method, seed, show_data(run_dir)["iterations"], wall)
            console.print(
                f"{method:<14} seed {seed}: final reward {res['final_reward']:.3f}  "
                f"held-out {_fmt(res['heldout'])}  Δlen(incorrect) "
                f"{res['drift_incorrect']:+.2f}  {res['tokens']:,} tokens  {wall:.0f}s"
            )
            results.append(res)
    write_report(out, results, seeds, task=task or "custom", base=[*task_sets, *base])
    return results


def heldout_prompts(cfg, out: Path) -> str:
    """A held-out prompt file for a built-in task's prompts (`eval.data` as given
    otherwise): the task's generator with another seed, minus every training prompt."""
    if cfg.eval.data or cfg.eval.every <= 0:
        return cfg.eval.data
    from pipeline import prompts

    if cfg.data.prompts not in BUILTIN_PROMPTS:
        return ""  # a user's dataset: held-out data is theirs to give (eval.data)
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    train = prompts.load_table(cfg)
    other = prompts.load_table(dataclasses.replace(cfg, seed=cfg.seed + HELDOUT_SEED))
    held = other.filter(pc.invert(pc.is_in(other.column("prompt"), train.column("prompt"))))
    if cfg.eval.max_prompts:
        held = held.slice(0, cfg.eval.max_prompts)
    path = out / f"heldout-{cfg.data.prompts}.parquet"
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(held.drop_columns(["prompt_id"]), path)
    return str(path)


def summarize(method: str, seed: int, iterations: list[dict], wall: float) -> dict:
    """One run's figures from its `eqlen show` iterations."""
    train = [it for it in iterations if "score" in it["stages"]]
    rows = [row_of(it["stages"]) for it in train]

    def drift(key):
        vals = [r[key] for r in rows if r[key] is not None]
        return vals[-1] - vals[0] if len(vals) > 1 else float("nan")

    def metric(it, stage, key, default=0.0):
        return (it["stages"].get(stage) or {}).get("metrics", {}).get(key, default)

    tokens = [float(metric(it, "generate", "tokens_generated")) for it in train]
    signal = [
        1.0 - metric(it, "pair", "zero_signal_units") / max(1, metric(it, "pair", "units", 1))
        for it in train
    ]
    # Training compute: the held-out evaluation is measurement, not budget.
    compute = [
        sum(compute_seconds(s) for n, s in it["stages"].items() if n != "eval") for it in train
    ]
    evals = [
        (i, r["avg_at_k"], r["eval_k"])
        for i, r in enumerate(row_of(it["stages"]) for it in iterations)
        if r["avg_at_k"] is not None
    ]
    return {
        "method": method,
        "seed": seed,
        "final_reward": float(np.mean([r["reward"] for r in rows[-2:]])),
        "heldout": evals[-1][1] if evals else float("nan"),
        "heldout_first": evals[0][1] if evals else float("nan"),
        "drift_incorrect": drift("len_incorrect"),
        "drift_correct": drift("len_correct"),
        "gap_first": _num(rows[0]["len_gap"]),
        "gap_last": _num(rows[-1]["len_gap"]),
        "gap_mean": _nanmean([_num(r["len_gap"]) for r in rows[1:]]),
        "eff": float(np.mean([r["eff"] for r in rows])),
        "signal": float(np.mean(signal)),
        "tokens": int(sum(tokens)),
        "compute_s": float(sum(compute)),
        "wall": wall,
        "cached": sum(r["cached"] for r in rows),
        "stages": sum(len(it["stages"]) for it in iterations),
        "reward_curve": [r["reward"] for r in rows],
        "len_incorrect_curve": [r["len_incorrect"] for r in rows],
        "len_gap_curve": [r["len_gap"] for r in rows],
        "signal_curve": signal,
        "tokens_cum": np.cumsum(tokens).tolist(),
        "seconds_cum": np.cumsum(compute).tolist(),
        "heldout_curve": evals,
    }


def compute_seconds(stage: dict) -> float:
    """What computing the stage's dataset took, whoever computed it (its manifest)."""
    manifest = cache.lookup(Path(stage["path"])) if stage.get("path") else None
    return float((manifest or {}).get("seconds") or stage.get("seconds") or 0.0)


def at_budget(xs: list[float], ys: list[float], budget: float) -> float:
    """ys linearly interpolated at x = budget (NaN past the run's last x)."""
    if not xs or budget > xs[-1] + 1e-9:
        return float("nan")
    return float(np.interp(budget, xs, ys))


def interval(vals) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (NaN-free values; 0 for one value)."""
    from scipy import stats

    v = np.asarray([x for x in vals if x == x], dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan")
    if len(v) == 1:
        return float(v[0]), 0.0
    return float(v.mean()), float(
        stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    )


def comparisons(methods: list[str]) -> list[tuple[str, str]]:
    """The tests the report makes: each EqLen method against the group method with its loss
    (BASELINE), then every other method against GRPO, the reference of the loss family."""
    pairs = [(m, b) for m, b in BASELINE.items() if m in methods and b in methods]
    if "grpo" in methods:
        pairs += [(m, "grpo") for m in methods if m != "grpo" and m not in BASELINE]
    return pairs


def welch_p(a, b) -> float:
    """Two-sided p-value of Welch's t-test (NaN with fewer than two values a side)."""
    from scipy import stats

    a = [x for x in a if x == x]
    b = [x for x in b if x == x]
    if len(a) < 2 or len(b) < 2 or (np.std(a) == 0 and np.std(b) == 0):
        return float("nan")
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def _nanmean(vals: list[float]) -> float:
    vals = [v for v in vals if v == v]
    return float(np.mean(vals)) if vals else float("nan")


def _fmt(v, spec=".3f") -> str:
    return "-" if v is None or v != v else format(v, spec)


def _ci(vals, spec=".3f") -> str:
    m, h = interval(vals)
    return "-" if m != m else f"{m:{spec}} ± {h:{spec.lstrip('+')}}"


def write_report(
    out: Path, results: list[dict], seeds: list[int], *, task: str = "", base=()
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in results))
    by = {m: [r for r in results if r["method"] == m] for m in methods}
    # Matched budgets: what every run reached (the smallest run's total).
    tok_budget = min(r["tokens_cum"][-1] for r in results)
    sec_budget = min(r["seconds_cum"][-1] for r in results)
    k = next((r["heldout_curve"][-1][2] for r in results if r["heldout_curve"]), None)
    lines = [
        "| method | final reward | held-out avg@k | Δ len incorrect | gap mean after | "
        "gap last | signal fraction | tokens per run | compute s per run | "
        f"reward at {tok_budget:,.0f} tokens | reward at {sec_budget:.0f} s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, rs in by.items():

        def col(key, spec=".3f", rs=rs):
            return _ci([r[key] for r in rs], spec)

        def budget(xkey, b, rs=rs):
            return _ci([at_budget(r[xkey], r["reward_curve"], b) for r in rs])

        cells = [
            m,
            col("final_reward"),
            col("heldout"),
            col("drift_incorrect", "+.2f"),
            col("gap_mean", ".2f"),
            col("gap_last", ".2f"),
            f"{np.mean([r['signal'] for r in rs]):.2f}",
            f"{np.mean([r['tokens'] for r in rs]):,.0f}",
            f"{np.mean([r['compute_s'] for r in rs]):.0f}",
            budget("tokens_cum", tok_budget),
            budget("seconds_cum", sec_budget),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    tests = [
        "| method vs baseline | final reward p | held-out p | Δ len incorrect p | gap mean p |",
        "|---|---|---|---|---|",
    ]
    for m, b in comparisons(list(by)):
        if m in by and b in by:
            ps = [
                welch_p([r[key] for r in by[m]], [r[key] for r in by[b]])
                for key in ("final_reward", "heldout", "drift_incorrect", "gap_mean")
            ]
            cells = [f"**{p:.3f}**" if p < 0.05 else _fmt(p) for p in ps]
            tests.append(f"| {m} vs {b} | " + " | ".join(cells) + " |")

    fig, axes = plt.subplots(2, 3, figsize=(17, 8.5))
    plots = [
        (axes[0, 0], None, "reward_curve", "iteration", "mean reward"),
        (axes[0, 1], "tokens_cum", "reward_curve", "tokens generated", "mean reward"),
        (axes[0, 2], "seconds_cum", "reward_curve", "compute seconds", "mean reward"),
        (axes[1, 0], None, "len_incorrect_curve", "iteration", "length of incorrect responses"),
        (
            axes[1, 1],
            None,
            "len_gap_curve",
            "iteration",
            "gap within prompts (incorrect - correct)",
        ),
        (axes[1, 2], None, "signal_curve", "iteration", "fraction of units with signal"),
    ]
    colors = plt.cm.tab20(np.linspace(0, 1, 20))  # 10 would repeat across 14+ methods
    for i, (m, rs) in enumerate(by.items()):
        style = "-" if m.startswith("eqlen") or m == "truncate" else "--"
        for ax, xkey, ykey, _, _ in plots:
            ys = np.array([[_num(v) for v in r[ykey]] for r in rs], dtype=float)
            y = np.nanmean(ys, axis=0)
            x = np.mean([r[xkey] for r in rs], axis=0) if xkey else np.arange(len(y))
            ax.plot(x, y, style, label=m, lw=1.3, color=colors[i % 20])
    for ax, _, _, xlabel, ylabel in plots:
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
    axes[1, 1].axhline(0, color="grey", lw=0.8)
    axes[0, 0].set_title(f"task {task}: mean of {len(seeds)} seeds per method")
    axes[1, 2].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=110)
    plt.close(fig)
    kk = f"avg@{k}" if k else "avg@k (no held-out data)"
    text = (
        f"# Experiment results: task {task}\n\nSeeds: {', '.join(map(str, seeds))}; base "
        f"overrides: `{' '.join(base) or '(defaults)'}`. ± is the half-width of the 95% "
        "t-interval over seeds. final reward = mean training reward of the last two "
        f"iterations; held-out = {kk} on the held-out prompts after the last update; Δ len "
        "incorrect = mean length of incorrect responses at the last iteration minus the "
        "first (tokens); gap = mean length of incorrect minus correct responses to the same "
        "prompt (score metric `len_gap`), mean over the iterations after the first, and at "
        "the last; signal fraction = units whose members' rewards differ, mean over "
        "iterations; tokens = sampled by generate (eval excluded); compute s = every stage's "
        "own compute time, also when another run computed it first; reward at a budget = "
        "each run's reward curve read at the budget every run reached.\n\n"
        + "\n".join(lines)
        + "\n\nWelch's t-test, two-sided, p < 0.05 in bold (no correction for the number of "
        "comparisons):\n\n" + "\n".join(tests) + "\n\n![reward, lengths and signal](results.png)\n"
    )
    (out / "results.md").write_text(text)
    console.print(text, markup=False)
    return out / "results.md"
