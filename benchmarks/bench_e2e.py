"""Benchmark: the whole demo end to end, and the share of it taken by Prefect.

    .venv/bin/python benchmarks/bench_e2e.py [--iterations 10] [--repeats 3] [--set KEY=VALUE ...]

Each measurement is a fresh subprocess, so interpreter start, imports and exit count as a
user sees them:
- flow: `eqlen run --run-dir D --iterations N` (the Prefect flow of flows/online.py, with
  Prefect's temporary local server, as the demo runs when no PREFECT_API_URL is set);
- plain: the same iterations without Prefect, `pipeline.runner.online(...)` called directly
  as flows/online.py wraps it, with the same config, thread count, progress lines and
  summary as `eqlen run` (a child of this script, `--plain D`);
- each run in a fresh run directory with a fresh cache (RUN_DIR/cache), then the same
  command again in that directory: the fully cached rerun.
Flow and plain alternate in order over --repeats; figures are medians.

Reported: wall time of each; the per-stage sums of `seconds` from run.json (what
`eqlen show` reports per stage); the time outside the stages (imports, start, Prefect);
Prefect's share = (flow wall - plain wall) / flow wall; that both computed the same thing
(every stage's cache key equal: keys chain the content digests of their inputs). The
temporary-server start is isolated by a probe child (`--probe`) that imports Prefect, runs
an empty flow twice and exits: server start ~ first flow call - second flow call, and the
exit (server shutdown) is timed too; a child that only imports the pipeline's modules
times what a run pays before any stage without Prefect. All children share one PREFECT_HOME made for this
benchmark (a user's kept ~/.prefect); the first probe, on the empty home, is reported
apart (database creation). PREFECT_API_URL is unset for the children.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("generate", "score", "pair", "update")


# ------------------------------------------------------------------ children

def plain_child(run_dir: str, iterations: int, sets: list[str]) -> None:
    """`eqlen run` without Prefect: the same steps as pipeline.cli.cmd_run, minus the flow."""
    sys.path.insert(0, str(ROOT))
    from pipeline import cli, config, report, runner

    cfg = config.load(None, sets)
    cfg = config.apply(cfg, overrides=[f"iterations={iterations}"])
    run_dir = Path(run_dir).resolve()
    cli._runtime()  # the same HF quieting and torch thread count as `eqlen run`
    report.console.print(f"plain run -> {run_dir}  ({cfg.iterations} iterations)")
    t0 = time.perf_counter()
    runner.online(cfg, run_dir, on_iteration=report.iteration_line)
    report.print_summary(run_dir)
    report.console.print(f"done in {time.perf_counter() - t0:.1f}s")


def probe_child() -> None:
    """Time Prefect's import, its temporary server's start and an empty flow run."""
    t0 = time.perf_counter()
    from prefect import flow
    t1 = time.perf_counter()

    @flow(name="bench-noop", persist_result=False)
    def noop() -> int:
        return 1

    noop()
    t2 = time.perf_counter()
    noop()
    t3 = time.perf_counter()
    print(json.dumps({"import": t1 - t0, "first_flow": t2 - t1, "second_flow": t3 - t2}))


# ------------------------------------------------------------------ parent

def child_env(prefect_home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(prefect_home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_LOGGING_LEVEL="WARNING", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return env


def timed(cmd: list[str], env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return wall, p.stdout


def run_record(run_dir: Path) -> dict:
    """Per-stage sums of seconds, the cache keys and how many stages were cached."""
    data = json.loads((run_dir / "run.json").read_text())
    sums = dict.fromkeys(STAGES, 0.0)
    keys, cached, n = [], 0, 0
    for it in data["iterations"]:
        for name, e in it["stages"].items():
            sums[name] += e["seconds"]
            keys.append((it["index"], name, e["key"]))
            cached += bool(e["cached"])
            n += 1
    return {"stages": sums, "keys": keys, "cached": f"{cached}/{n}"}


def measure(kind: str, run_dir: Path, args, env: dict) -> dict:
    sets = [x for s in args.set for x in ("--set", s)]
    if kind == "flow":
        cmd = [str(ROOT / ".venv/bin/eqlen"), "run", "--run-dir", str(run_dir),
               "--iterations", str(args.iterations), *sets]
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--plain", str(run_dir),
               "--iterations", str(args.iterations), *sets]
    wall, out = timed(cmd, env)
    m = re.search(r"done in ([0-9.]+)s", out)
    rec = run_record(run_dir)
    return {"wall": wall, "inproc": float(m.group(1)) if m else float("nan"), **rec}


def versions(env: dict) -> str:
    code = ("import torch, transformers, prefect, os; from pipeline import cli; cli._runtime(); "
            "print(f'torch {torch.__version__}, transformers {transformers.__version__}, prefect "
            "{prefect.__version__}; {torch.get_num_threads()} torch thread(s) in the stages')")
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iterations", type=int, default=10, help="demo iterations (default 10)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config overrides for both runs")
    ap.add_argument("--keep", action="store_true", help="keep the temporary run directories")
    ap.add_argument("--plain", metavar="RUN_DIR", help=argparse.SUPPRESS)
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain:
        return plain_child(args.plain, args.iterations, args.set)
    if args.probe:
        return probe_child()

    tmp = Path(tempfile.mkdtemp(prefix="bench_e2e_"))
    env = child_env(tmp / "prefect-home")
    sys.path.insert(0, str(ROOT))
    from pipeline.report import machine
    print(f"machine: {machine()}; {versions(env)}")
    probe_cmd = [sys.executable, str(Path(__file__).resolve()), "--probe"]

    def probe() -> dict:
        wall, out = timed(probe_cmd, env)
        p = json.loads(out.strip().splitlines()[-1])
        p["wall"] = wall
        p["exit"] = wall - p["import"] - p["first_flow"] - p["second_flow"]  # incl. start-up
        return p

    first = probe()  # creates the database in the empty PREFECT_HOME
    imports_cmd = [sys.executable, "-c", "import pipeline.cli, pipeline.runner, pipeline.report, "
                   "pipeline.demo, stages.generate, stages.score, stages.pair, stages.update"]
    imports = []
    runs: dict[str, list] = {"flow": [], "flow_cached": [], "plain": [], "plain_cached": []}
    probes = []
    for r in range(args.repeats):
        for kind in (("flow", "plain") if r % 2 == 0 else ("plain", "flow")):
            d = tmp / f"{kind}{r}"
            runs[kind].append(measure(kind, d, args, env))
            runs[f"{kind}_cached"].append(measure(kind, d, args, env))
            last = runs[kind][-1]
            print(f"  repeat {r} {kind}: {last['wall']:.1f}s (stages "
                  + ", ".join(f"{s} {v:.1f}" for s, v in last["stages"].items())
                  + f"), cached rerun {runs[kind + '_cached'][-1]['wall']:.1f}s", flush=True)
        probes.append(probe())
        imports.append(timed(imports_cmd, env)[0])

    same = all(f["keys"] == p["keys"] for f, p in zip(runs["flow"], runs["plain"]))

    def med(kind, key, stage=None):
        xs = [x[key][stage] if stage else x[key] for x in runs[kind]]
        return statistics.median(xs)

    print(f"\n{args.iterations} iterations, demo config{' + ' + ' '.join(args.set) if args.set else ''}"
          f"; medians over {args.repeats} repeats; seconds")
    print("| run | wall | in-process | " + " | ".join(STAGES) + " | stages sum | outside stages "
          "| cached |")
    print("|---|" + "---|" * (len(STAGES) + 5))
    labels = {"flow": "`eqlen run` (Prefect flow)", "plain": "plain runner (no Prefect)",
              "flow_cached": "`eqlen run`, rerun all cached",
              "plain_cached": "plain runner, rerun all cached"}
    for kind in ("flow", "plain", "flow_cached", "plain_cached"):
        stage_sum = statistics.median(sum(x["stages"].values()) for x in runs[kind])
        print(f"| {labels[kind]} | {med(kind, 'wall'):.1f} | {med(kind, 'inproc'):.1f} | "
              + " | ".join(f"{med(kind, 'stages', s):.1f}" for s in STAGES)
              + f" | {stage_sum:.1f} | {med(kind, 'wall') - stage_sum:.1f} | "
                f"{runs[kind][0]['cached']} |")
    for fresh in ("", "_cached"):
        shares = [(f["wall"] - p["wall"]) / f["wall"]
                  for f, p in zip(runs["flow" + fresh], runs["plain" + fresh])]
        print(f"Prefect's share{' of the cached rerun' if fresh else ''}: "
              f"{statistics.median(shares):.0%} (flow - plain = "
              f"{med('flow' + fresh, 'wall') - med('plain' + fresh, 'wall'):.1f}s; per repeat "
              + ", ".join(f"{s:.0%}" for s in shares) + ")")
    print(f"same stage outputs with and without Prefect (all cache keys equal): {same}")

    def pm(key):
        return statistics.median(p[key] for p in probes)
    print(f"\nPrefect probe (import, empty flow twice, exit), medians of {len(probes)}: import "
          f"{pm('import'):.1f}s, first flow call {pm('first_flow'):.1f}s, second "
          f"{pm('second_flow'):.1f}s -> temporary server start ~ "
          f"{pm('first_flow') - pm('second_flow'):.1f}s; interpreter start + exit (server "
          f"shutdown) {pm('exit'):.1f}s; whole probe {pm('wall'):.1f}s")
    print(f"interpreter start + the pipeline's imports (torch, transformers, stages), no "
          f"Prefect: {statistics.median(imports):.1f}s")
    print(f"first probe on an empty PREFECT_HOME (database created): first flow call "
          f"{first['first_flow']:.1f}s, whole {first['wall']:.1f}s")
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"kept {tmp}")


if __name__ == "__main__":
    main()
