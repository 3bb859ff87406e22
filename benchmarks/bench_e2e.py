"""Benchmark: the whole demo end to end, and the share of it taken by Prefect.

    .venv/bin/python benchmarks/bench_e2e.py [--iterations 10] [--repeats 3] [--set KEY=VALUE ...]

Each measurement is a fresh subprocess, so interpreter start, imports and exit count as a
user sees them:
- flow: `eqlen run --run-dir D --iterations N` (the Prefect flow of flows/online.py) as the
  demo runs when no PREFECT_API_URL is set: against eqlen's kept local server
  (flows/server.py), started once before the repeats by `eqlen server start` (timed apart)
  and reused by every run, as a user's second and later runs do;
- flow_run: the same with `EQLEN_PREFECT_SERVER=run`, a server started for that run only
  and dying with it;
- flow_temp: the same flow as `eqlen run` ran it before flows/server.py, with Prefect's own
  temporary server started (and stopped) in every run (a child of this script);
- plain: the same iterations without Prefect, `flows.runner.online(...)` called directly
  as flows/online.py wraps it, with the same config, preflight checks, thread count,
  progress lines and summary as `eqlen run` (a child of this script, `--plain D`);
(`--kinds` picks a subset.)
- each run in a fresh run directory with a fresh cache (RUN_DIR/cache), then the same
  command again in that directory: the fully cached rerun.
The kinds alternate in order over --repeats; figures are medians. After the repeats,
the kept server is stopped and one more `eqlen run` (fresh directory) starts it: the first
run after a reboot or an idle stop. The kept server is stopped at the end.

Reported: wall time of each; the per-stage sums of `seconds` from run.json (what
`eqlen show` reports per stage); the time outside the stages (imports, start, Prefect);
Prefect's share = (flow wall - plain wall) / flow wall; that both computed the same thing
(every stage's cache key equal: keys chain the content digests of their inputs). Prefect's
own cost is isolated by a probe child (`--probe`) that imports Prefect, runs an empty flow
twice, then a flow of 40 empty tasks, and exits: once against the kept server (what is left
of Prefect once no server starts: import, flow run, per-task cost, exit) and once with no
API URL, Prefect's own temporary server (the pre-flows/server.py default): server start ~
first flow call - second flow call. A child that only imports the pipeline's modules times
what a run pays before any stage without Prefect. All children share one PREFECT_HOME made
for this benchmark (a user's kept ~/.prefect); the first probe, on the empty home, is
reported apart (database creation). PREFECT_API_URL is unset for the children.
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


def _preflight(cfg, run_dir: Path) -> None:
    try:
        from flows import preflight
    except ImportError:  # a tree without the preflight checks
        return
    preflight.check(cfg, run_dir)


def plain_child(run_dir: str, iterations: int, sets: list[str]) -> None:
    """`eqlen run` without Prefect: the same steps as flows.cli.cmd_run, minus the flow."""
    sys.path.insert(0, str(ROOT))
    from flows import cli, report, runner
    from pipeline import config

    cli.arm_quick_exit()  # as `eqlen` ends (no interpreter teardown)
    cli._runtime()  # as `eqlen run`: HF quieting, torch thread count, GC thresholds
    cfg = config.load(None, sets)
    cfg = config.apply(cfg, overrides=[f"iterations={iterations}"])
    run_dir = Path(run_dir).resolve()
    _preflight(cfg, run_dir)  # as `eqlen run`
    report.console.print(f"plain run -> {run_dir}  ({cfg.iterations} iterations)")
    t0 = time.perf_counter()
    runner.online(cfg, run_dir, on_iteration=report.iteration_line)
    report.print_summary(run_dir)
    report.console.print(f"done in {time.perf_counter() - t0:.1f}s")
    cli.quick_exit(0)  # as `eqlen` ends


def prefect_temp_child(run_dir: str, iterations: int, sets: list[str]) -> None:
    """`eqlen run` as it was before flows/server.py: the same flow, with no PREFECT_API_URL,
    so Prefect starts its own temporary server in the process (and stops it at exit)."""
    sys.path.insert(0, str(ROOT))
    from flows import cli, report
    from pipeline import config

    cli.arm_quick_exit()
    cli._runtime()
    cfg = config.load(None, sets)
    cfg = config.apply(cfg, overrides=[f"iterations={iterations}"])
    run_dir = Path(run_dir).resolve()
    _preflight(cfg, run_dir)
    cli._prefect_env()
    from flows.online import online

    report.console.print(f"flow, Prefect's temporary server -> {run_dir}")
    t0 = time.perf_counter()
    online(config.to_dict(cfg), str(run_dir))
    report.print_summary(run_dir)
    report.console.print(f"done in {time.perf_counter() - t0:.1f}s")
    cli.quick_exit(0)  # as `eqlen` ends


def probe_child() -> None:
    """Time Prefect's import, an empty flow run (the first one starts Prefect's temporary
    server when no PREFECT_API_URL is set) and a flow of 40 empty task runs."""
    t0 = time.perf_counter()
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    t1 = time.perf_counter()

    @flow(name="bench-noop", persist_result=False)
    def noop(n: int) -> int:
        for i in range(n):
            task(
                lambda i: i,
                name="noop",
                task_run_name=f"noop-{i}",
                cache_policy=NO_CACHE,
                persist_result=False,
            )(i)
        return n

    with temporary_settings(set_defaults={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):  # as eqlen
        noop(0)
        t2 = time.perf_counter()
        noop(0)
        t3 = time.perf_counter()
        noop(40)
        t4 = time.perf_counter()
    print(
        json.dumps(
            {"import": t1 - t0, "first_flow": t2 - t1, "second_flow": t3 - t2, "tasks40": t4 - t3}
        )
    )


# ------------------------------------------------------------------ parent


def child_env(prefect_home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(
        PREFECT_HOME=str(prefect_home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_LEVEL="WARNING",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(ROOT),
    )
    return env


def timed(cmd: list[str], env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(
            f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        )
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
    if kind == "flow_run":
        env = dict(env, EQLEN_PREFECT_SERVER="run")
    if kind == "flow_temp":
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--prefect-temp",
            str(run_dir),
            "--iterations",
            str(args.iterations),
            *sets,
        ]
    elif kind.startswith("flow"):
        cmd = [
            str(ROOT / ".venv/bin/eqlen"),
            "run",
            "--run-dir",
            str(run_dir),
            "--iterations",
            str(args.iterations),
            *sets,
        ]
    else:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--plain",
            str(run_dir),
            "--iterations",
            str(args.iterations),
            *sets,
        ]
    wall, out = timed(cmd, env)
    m = re.search(r"done in ([0-9.]+)s", out)
    rec = run_record(run_dir)
    return {"wall": wall, "inproc": float(m.group(1)) if m else float("nan"), **rec}


def versions(env: dict) -> str:
    code = (
        "import torch, transformers, prefect, os; from flows import cli; cli._runtime(); "
        "print(f'torch {torch.__version__}, transformers {transformers.__version__}, prefect "
        "{prefect.__version__}; {torch.get_num_threads()} torch thread(s) in the stages')"
    )
    return subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iterations", type=int, default=10, help="demo iterations (default 10)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides for both runs",
    )
    ap.add_argument(
        "--kinds",
        default="flow,plain,flow_run,flow_temp",
        help="what to measure (default all): flow (`eqlen run`, kept server), "
        "plain (no Prefect), flow_run (EQLEN_PREFECT_SERVER=run), flow_temp "
        "(the flow with Prefect's own temporary server, as before "
        "flows/server.py)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temporary run directories")
    ap.add_argument("--plain", metavar="RUN_DIR", help=argparse.SUPPRESS)
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--prefect-temp", metavar="RUN_DIR", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain:
        return plain_child(args.plain, args.iterations, args.set)
    if args.prefect_temp:
        return prefect_temp_child(args.prefect_temp, args.iterations, args.set)
    if args.probe:
        return probe_child()

    tmp = Path(tempfile.mkdtemp(prefix="bench_e2e_"))
    env = child_env(tmp / "prefect-home")
    sys.path.insert(0, str(ROOT))
    from flows.report import machine

    print(f"machine: {machine()}; {versions(env)}")
    probe_cmd = [sys.executable, str(Path(__file__).resolve()), "--probe"]
    eqlen = str(ROOT / ".venv/bin/eqlen")

    def probe(url: str | None) -> dict:
        wall, out = timed(probe_cmd, dict(env, PREFECT_API_URL=url) if url else env)
        p = json.loads(out.strip().splitlines()[-1])
        p["wall"] = wall
        p["exit"] = wall - p["import"] - p["first_flow"] - p["second_flow"] - p["tasks40"]
        return p

    try:
        first = probe(None)  # Prefect's temporary server; creates the database (empty home)
        server_start = timed([eqlen, "server", "start"], env)[0]
        url = json.loads(timed([eqlen, "server", "status", "--json"], env)[1])["url"]
        print(f"eqlen's kept server: `eqlen server start` {server_start:.1f}s ({url})", flush=True)
        imports_cmd = [
            sys.executable,
            "-c",
            (
                "import flows.cli, flows.runner, "
                "flows.report, pipeline.demo, stages.generate, stages.score, "
                "stages.pair, stages.update"
            ),
        ]
        imports = []
        kinds = tuple(args.kinds.split(","))
        assert "plain" in kinds and set(kinds) <= {"flow", "plain", "flow_run", "flow_temp"}
        runs: dict[str, list] = {k + c: [] for k in kinds for c in ("", "_cached")}
        probes_kept, probes_temp = [], []
        for r in range(args.repeats):
            order = kinds if r % 2 == 0 else tuple(reversed(kinds))
            for kind in order:
                d = tmp / f"{kind}{r}"
                runs[kind].append(measure(kind, d, args, env))
                runs[f"{kind}_cached"].append(measure(kind, d, args, env))
                last = runs[kind][-1]
                print(
                    f"  repeat {r} {kind}: {last['wall']:.1f}s (stages "
                    + ", ".join(f"{s} {v:.1f}" for s, v in last["stages"].items())
                    + f"), cached rerun {runs[kind + '_cached'][-1]['wall']:.1f}s",
                    flush=True,
                )
            probes_kept.append(probe(url))
            probes_temp.append(probe(None))
            imports.append(timed(imports_cmd, env)[0])
        # The first run after a reboot or an idle stop: it starts the kept server.
        timed([eqlen, "server", "stop"], env)
        cold = measure("flow", tmp / "cold", args, env) if "flow" in kinds else None
    finally:
        subprocess.run(
            [eqlen, "server", "stop"], env=env, cwd=ROOT, capture_output=True, check=False
        )

    same = all(
        f["keys"] == p["keys"]
        for k in kinds
        if k != "plain"
        for f, p in zip(runs[k], runs["plain"])
    )

    def med(kind, key, stage=None):
        xs = [x[key][stage] if stage else x[key] for x in runs[kind]]
        return statistics.median(xs)

    print(
        f"\n{args.iterations} iterations, demo config"
        f"{' + ' + ' '.join(args.set) if args.set else ''}"
        f"; medians over {args.repeats} repeats; seconds"
    )
    print(
        "| run | wall | in-process | " + " | ".join(STAGES) + " | stages sum | outside stages "
        "| cached |"
    )
    print("|---|" + "---|" * (len(STAGES) + 5))
    labels = {
        "flow": "`eqlen run` (Prefect flow, kept server)",
        "flow_run": "`eqlen run`, per-run server (`EQLEN_PREFECT_SERVER=run`)",
        "flow_temp": "flow with Prefect's temporary server (before)",
        "plain": "plain runner (no Prefect)",
    }
    for kind in [k + c for c in ("", "_cached") for k in kinds]:
        base = kind.removesuffix("_cached")
        label = labels[base] + (", rerun all cached" if kind != base else "")
        stage_sum = statistics.median(sum(x["stages"].values()) for x in runs[kind])
        print(
            f"| {label} | {med(kind, 'wall'):.1f} | {med(kind, 'inproc'):.1f} | "
            + " | ".join(f"{med(kind, 'stages', s):.1f}" for s in STAGES)
            + f" | {stage_sum:.1f} | {med(kind, 'wall') - stage_sum:.1f} | "
            f"{runs[kind][0]['cached']} |"
        )
    for kind in kinds:
        if kind == "plain":
            continue
        for fresh in ("", "_cached"):
            shares = [
                (f["wall"] - p["wall"]) / f["wall"]
                for f, p in zip(runs[kind + fresh], runs["plain" + fresh])
            ]
            print(
                f"Prefect's share ({labels[kind]}{', cached rerun' if fresh else ''}): "
                f"{statistics.median(shares):.0%} (flow - plain = "
                f"{med(kind + fresh, 'wall') - med('plain' + fresh, 'wall'):.1f}s; per repeat "
                + ", ".join(f"{s:.0%}" for s in shares)
                + ")"
            )
        ratios = [c["wall"] / f["wall"] for f, c in zip(runs[kind], runs[kind + "_cached"])]
        print(
            f"  fully cached rerun / first run: {statistics.median(ratios):.2f} (per repeat "
            + ", ".join(f"{x:.2f}" for x in ratios)
            + ")"
        )
    if cold:
        print(
            f"first `eqlen run` after the kept server stopped (starts it): {cold['wall']:.1f}s "
            f"wall, {cold['inproc']:.1f}s in process"
        )
    print(
        f"same stage outputs with and without Prefect (all cache keys equal): {same}"
        + (
            ""
            if same
            else " (the keys include the stages' source: was the tree edited during the benchmark?)"
        )
    )

    for name, probes in (
        ("against the kept server", probes_kept),
        ("no API URL: Prefect's own temporary server", probes_temp),
    ):

        def pm(key, probes=probes):
            return statistics.median(p[key] for p in probes)

        print(
            f"\nPrefect probe {name} (import, empty flow twice, 40 empty tasks, exit), "
            f"medians of {len(probes)}: import {pm('import'):.2f}s, first flow call "
            f"{pm('first_flow'):.2f}s, second {pm('second_flow'):.2f}s, flow of 40 tasks "
            f"{pm('tasks40'):.2f}s ({(pm('tasks40') - pm('second_flow')) / 40 * 1000:.0f} ms "
            f"per task run), interpreter start + exit {pm('exit'):.2f}s; whole probe "
            f"{pm('wall'):.1f}s"
        )
    pt = statistics.median(p["first_flow"] - p["second_flow"] for p in probes_temp)
    print(f"Prefect's temporary server start (first flow call - second): {pt:.1f}s")
    print(
        f"interpreter start + the pipeline's imports (stages; torch bound lazily, loaded "
        f"only by a stage that computes), no Prefect: {statistics.median(imports):.1f}s"
    )
    print(
        f"first probe on an empty PREFECT_HOME (database created, temporary server): first "
        f"flow call {first['first_flow']:.1f}s, whole {first['wall']:.1f}s"
    )
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"kept {tmp}")


if __name__ == "__main__":
    main()
