"""What a run holds, for people (tables) and for scripts (`eqlen show --json`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from flows.runner import STAGE_NAMES, RunError, RunRecord
from pipeline import cache

console = Console(highlight=False, soft_wrap=True)


def _fmt(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def show_data(run_dir: str | Path) -> dict:
    """The `eqlen show --json` object (docs/method.md; README "Commands"). Per stage also
    `stale`: an upstream stage's output recorded now is not the one this stage was computed
    from (an offline rerun changed it); `leftovers`: temporary folders of killed writers
    that could not be removed (in use by a live writer, or undeletable)."""
    rec = RunRecord(run_dir)
    if not rec.path.is_file():
        raise RunError(
            f"{rec.run_dir} is not a run directory (no run.json); start one with "
            f"`eqlen run --run-dir {rec.run_dir}`"
        )
    entries, stale = rec.entries(), rec.stale()
    out = {"run_dir": str(rec.run_dir), "iterations": [], "leftovers": []}
    roots = set()
    for i, it in enumerate(entries):
        stages = {}
        for name in STAGE_NAMES:
            e = it.get(name)
            if e is None:
                continue
            roots.add(Path(e["path"]).parent.parent)
            manifest = cache.lookup(Path(e["path"]))
            stages[name] = {
                "key": e["key"],
                "path": e["path"],
                "cached": e["cached"],
                "rows": manifest["rows"] if manifest else None,
                "metrics": manifest["metrics"] if manifest else {},
                "seconds": e["seconds"],
                "present": manifest is not None,
                "stale": stale[i][name],
            }
        out["iterations"].append({"index": i, "stages": stages})
    for root in sorted(roots):
        out["leftovers"] += [str(p) for p in cache.sweep(root)]
    return out


def row_of(stages: dict) -> dict:
    def m(stage, key):
        return (stages.get(stage) or {}).get("metrics", {}).get(key)

    k = m("eval", "k")
    return {
        "eval_k": k,
        "avg_at_k": m("eval", f"avg@{k}"),
        "pass_at_k": m("eval", f"pass@{k}"),
        "reward": m("score", "reward_mean"),
        "accuracy": m("score", "accuracy"),
        "len_correct": m("score", "mean_len_correct"),
        "len_incorrect": m("score", "mean_len_incorrect"),
        "len_gap": m("score", "len_gap"),
        "units": m("pair", "units"),
        "eff": m("pair", "effective_token_ratio"),
        "seconds": sum((s.get("seconds") or 0.0) for s in stages.values()),
        "cached": sum(bool(s.get("cached")) for s in stages.values()),
    }


def iteration_line(i: int, results: dict) -> None:
    stages = {
        k: {"metrics": v.metrics, "seconds": v.seconds, "cached": v.cached}
        for k, v in results.items()
    }
    r = row_of(stages)
    k = r["eval_k"]
    held = f"avg@{k} {_fmt(r['avg_at_k'])}  pass@{k} {_fmt(r['pass_at_k'])}  " if k else ""
    train = (
        f"reward {_fmt(r['reward'])}  len ok {_fmt(r['len_correct'], '.2f')}  "
        f"len bad {_fmt(r['len_incorrect'], '.2f')}  "
        if "score" in stages or not k
        else "(final policy) "
    )
    console.print(
        f"[bold]it {i}[/]  {train}{held}{r['seconds']:.1f}s  cached {r['cached']}/{len(stages)}"
    )


def print_summary(run_dir: str | Path) -> None:
    data = show_data(run_dir)
    rows = [row_of(it["stages"]) for it in data["iterations"]]
    ks = sorted({r["eval_k"] for r in rows if r["eval_k"]})
    held = [f"avg@{ks[0]}", f"pass@{ks[0]}"] if len(ks) == 1 else ["avg@k", "pass@k"]
    t = Table(
        title=f"EqLen run {data['run_dir']}",
        caption="reward: mean over round-0 tracks; len ok / len bad: mean response length "
        "(tokens) of correct / incorrect responses; eff: effective token ratio"
        + (
            f"; {' / '.join(held)}: held-out eval of the policy the iteration starts from "
            "(a last row with only these: the final policy)"
            if ks
            else ""
        ),
    )
    cols = ["iter", "reward", "acc", "len ok", "len bad", "units", "eff"]
    for col in (*cols, *(held if ks else ()), "sec", "cached"):
        t.add_column(col, justify="right")
    for it, r in zip(data["iterations"], rows):
        t.add_row(
            str(it["index"]),
            _fmt(r["reward"]),
            _fmt(r["accuracy"]),
            _fmt(r["len_correct"], ".2f"),
            _fmt(r["len_incorrect"], ".2f"),
            _fmt(r["units"], "d"),
            _fmt(r["eff"]),
            *((_fmt(r["avg_at_k"]), _fmt(r["pass_at_k"])) if ks else ()),
            f"{r['seconds']:.1f}",
            f"{r['cached']}/{len(it['stages'])}",
        )
    console.print(t)


def print_show(run_dir: str | Path, as_json: bool) -> None:
    data = show_data(run_dir)
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
        return
    print_summary(run_dir)
    for it in data["iterations"]:
        for name, s in it["stages"].items():
            state = "cached" if s["cached"] else "ran"
            if not s["present"]:
                state = "MISSING (rerun it)"
            if s["stale"]:
                state += (
                    f"  STALE (an upstream stage was rerun: `eqlen stage {name} --run-dir "
                    f"{data['run_dir']} --iteration {it['index']}` recomputes it)"
                )
            console.print(
                f"  it{it['index']} {name:<8} {s['key']}  rows {s['rows']}  {state}  {s['path']}"
            )
    for p in data["leftovers"]:
        console.print(f"  leftover temporary folder (a live writer's, or not removable): {p}")


def machine() -> str:
    """The CPU's model name and core count, for the figures benchmarks print."""
    import os
    import platform
    import subprocess

    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(
            line.split(":", 1)[1].strip()
            for line in out.splitlines()
            if line.startswith("Model name")
        )
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores"
