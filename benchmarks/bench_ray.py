"""Benchmark: Ray's overhead per iteration, against the same iterations in process.

    .venv/bin/python benchmarks/bench_ray.py [--iterations 4] [--repeats 2] [--set KEY=VALUE ...]

Three kinds of the same demo run, each a fresh subprocess in a fresh run directory and
cache (`benchmarks/bench_e2e.py --plain`: `eqlen run`'s steps without Prefect, whose cost
bench_e2e measures; Ray's is what is measured here):
- in-process: `cluster.ray_address=""`, every stage in the driver (the default);
- ray 1+1: `cluster.ray_address=local`, `generate.workers=1`, `update.workers=1`: one
  rollout actor, one update rank, the driver only scores, pairs and writes;
- ray 2+2: `generate.workers=2`, `update.workers=2` (ddp): prompts sharded over two
  rollout actors, the update over two gloo ranks.

From each run's run.json (the seconds `eqlen show` reports per stage): the first
iteration, which pays the local Ray instance's start, the actors' start and each engine's
model load, and the steady iterations after it, whose median is the per-iteration cost;
the ratio to in-process is Ray's overhead per iteration (goal: at most 1.5x). On this
2-core machine two workers cannot run faster than one process: what they show is the cost
of the actors, the object store and the collectives. Engine start paid once per run shows
as first iteration minus steady iteration, and as each worker's engine load count
(`engine_loads`, from the rollouts' metrics: the actors keep their engines and only
reload weights after an update).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("generate", "score", "pair", "update")

KINDS = {
    "in-process": [],
    "ray 1+1": ["cluster.ray_address=local", "generate.workers=1", "update.workers=1"],
    "ray 2+2": ["cluster.ray_address=local", "generate.workers=2", "update.workers=2"],
}


def metrics(run_dir: Path, entry: dict) -> dict:
    """A stage's metrics, from the manifest of the dataset its run.json entry points to."""
    p = run_dir / entry["path"]
    for folder in (p, p.parent):
        if (folder / "manifest.json").is_file():
            return json.loads((folder / "manifest.json").read_text()).get("metrics", {})
    return {}


def run_kind(run_dir: Path, iterations: int, sets: list[str]) -> dict:
    """One fresh run of `iterations`; wall time and per-iteration stage seconds."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_e2e.py"), "--plain", str(run_dir)]
    cmd += ["--iterations", str(iterations)]
    for kv in sets:
        cmd += ["--set", kv]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    record = json.loads((run_dir / "run.json").read_text())
    its = [
        sum(it["stages"][s]["seconds"] for s in STAGES if s in it["stages"])
        for it in record["iterations"]
        if all(s in it["stages"] for s in STAGES)
    ]
    gen = [metrics(run_dir, it["stages"]["generate"]) for it in record["iterations"]]
    return {
        "wall": wall,
        "iterations": its,
        "workers": gen[0].get("workers", 1) if gen else None,
        "engine_loads": sum(int(g.get("engine_started", 0) or 0) for g in gen),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides for every kind")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from flows import report

    kinds = args.kinds.split(",")
    print(f"machine: {report.machine()}")
    print(f"demo, {args.iterations} iterations per run, {args.repeats} repeat(s), medians")
    got: dict[str, list[dict]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        for r in range(args.repeats):
            for kind in kinds:  # alternate, so a slow minute hits every kind alike
                res = run_kind(
                    Path(tmp) / f"{kind.replace(' ', '_')}-{r}",
                    args.iterations,
                    KINDS[kind] + args.set,
                )
                got[kind].append(res)
                its = ", ".join(f"{s:.1f}" for s in res["iterations"])
                print(
                    f"  {kind}: wall {res['wall']:.1f} s, iterations [{its}] s, "
                    f"vLLM engine starts {res['engine_loads']}"
                )

    def med(kind, f):
        return statistics.median(f(x) for x in got[kind])

    base = med(kinds[0], lambda x: statistics.median(x["iterations"][1:]))
    print(
        "\n| kind | wall s | first iteration s | steady iteration s | x in-process (steady) "
        "| vLLM engine starts per run |"
    )
    print("|---|---|---|---|---|---|")
    for kind in kinds:
        steady = med(kind, lambda x: statistics.median(x["iterations"][1:]))
        wall, first = med(kind, lambda x: x["wall"]), med(kind, lambda x: x["iterations"][0])
        starts = med(kind, lambda x: x["engine_loads"])
        print(
            f"| {kind} | {wall:.1f} | {first:.1f} | {steady:.2f} | {steady / base:.2f}x "
            f"| {starts:.0f} |"
        )


if __name__ == "__main__":
    main()
