"""The `eqlen` command line (docs/method.md, "Interfaces").

    eqlen run   [--config FILE] [--run-dir DIR] [--iterations N] [--set KEY=VALUE ...] [--force]
    eqlen stage NAME --run-dir DIR [--iteration I] [--set KEY=VALUE ...] [--force]
    eqlen show  DIR [--json]
    eqlen plot  DIR [--out PNG]
    eqlen experiment [--out DIR] [--methods a,b] [--seeds 0,1,2] [--set KEY=VALUE ...]
    eqlen config            (every config key with its type, default and meaning)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def _prefect_env() -> None:
    # Offline machines: Prefect's analytics would log an error on every start.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    # The temporary server needs longer than Prefect's 20 s default on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")


def _quiet_hf() -> None:
    # Per-call "Loading weights" bars would drown the per-iteration progress lines.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _runtime() -> None:
    """Quiet HF progress bars and size torch's thread pool, before any stage runs."""
    _quiet_hf()
    import torch
    # One core is left to Prefect's API client and server: with every core given to
    # torch's OpenMP pool, the pool's spin-waits fight them and a stage runs ~20x slower
    # (measured on 2 cores: update 8.3 s vs 0.24 s).
    n = int(os.environ.get("EQLEN_THREADS", "0")) or max(1, (os.cpu_count() or 2) - 1)
    torch.set_num_threads(n)


def cmd_run(args) -> int:
    from pipeline import config, report
    cfg = config.load(args.config, args.set)
    if args.iterations is not None:
        cfg = config.apply(cfg, overrides=[f"iterations={args.iterations}"])
    run_dir = Path(args.run_dir).resolve()
    _prefect_env()
    _runtime()
    from flows.online import online
    report.console.print(f"EqLen run -> {run_dir}  ({cfg.iterations} iterations, strategy "
                         f"{cfg.pair.strategy}, {cfg.update.algorithm}/{cfg.update.loss_agg})")
    t0 = time.perf_counter()
    online(config.to_dict(cfg), str(run_dir), force=args.force)
    report.print_summary(run_dir)
    report.console.print(f"done in {time.perf_counter() - t0:.1f}s; inspect with "
                         f"`eqlen show {run_dir}`")
    return 0


def cmd_stage(args) -> int:
    from pipeline import config, report, runner
    run_dir = Path(args.run_dir).resolve()
    rec = runner.RunRecord(run_dir)
    cfg = config.load(None, args.set, base=rec.config())
    _runtime()
    inputs = runner.resolve_inputs(args.name, cfg, run_dir, args.iteration)
    res = runner.run_stage(args.name, cfg, run_dir, args.iteration, inputs, force=args.force)
    state = "served from cache" if res.cached else f"ran in {res.seconds:.1f}s"
    report.console.print(f"{args.name} (iteration {args.iteration}) {state}: {res.rows} rows -> "
                         f"{res.path}")
    return 0


def cmd_show(args) -> int:
    from pipeline import report
    report.print_show(args.dir, args.json)
    return 0


def cmd_plot(args) -> int:
    from pipeline.plot import plot_run
    print(plot_run(args.dir, args.out))
    return 0


def cmd_experiment(args) -> int:
    from pipeline.experiment import METHODS, run_experiment
    _runtime()
    methods = args.methods.split(",") if args.methods else list(METHODS)
    seeds = [int(x) for x in args.seeds.split(",")]
    run_experiment(args.out, methods=methods, seeds=seeds, base=args.set,
                   config_file=args.config)
    return 0


def cmd_config(args) -> int:
    from pipeline.config import describe
    for key, tp, default, help_ in describe():
        print(f"{key} ({tp}, default {default}): {help_}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eqlen", description="Equal-length paired RL pipeline.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run the online loop (the built-in CPU demo by default)")
    r.add_argument("--config", help="YAML config file")
    r.add_argument("--run-dir", default="runs/demo", help="run directory (default runs/demo)")
    r.add_argument("--iterations", type=int, help="online iterations (config key iterations)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set generate.rounds=4")
    r.add_argument("--force", action="store_true", help="rerun every stage, ignoring the cache")
    r.set_defaults(fn=cmd_run)

    s = sub.add_parser("stage", help="run one stage on the inputs recorded in a run directory")
    s.add_argument("name", help="generate, score, pair or update")
    s.add_argument("--run-dir", required=True)
    s.add_argument("--iteration", type=int, default=0)
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--force", action="store_true", help="rerun even if cached")
    s.set_defaults(fn=cmd_stage)

    w = sub.add_parser("show", help="what a run directory holds")
    w.add_argument("dir")
    w.add_argument("--json", action="store_true", help="one JSON object (stable interface)")
    w.set_defaults(fn=cmd_show)

    pl = sub.add_parser("plot", help="plot reward and lengths per iteration to a PNG")
    pl.add_argument("dir")
    pl.add_argument("--out", help="PNG path (default DIR/progress.png)")
    pl.set_defaults(fn=cmd_plot)

    e = sub.add_parser("experiment", help="baselines and EqLen on the same task, seeds, budget")
    e.add_argument("--out", default="runs/experiment", help="output folder (results.md, runs/)")
    e.add_argument("--methods", help="comma-separated subset of the methods (default: all)")
    e.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    e.add_argument("--config", help="YAML base config")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    e.set_defaults(fn=cmd_experiment)

    c = sub.add_parser("config", help="list every config key")
    c.set_defaults(fn=cmd_config)
    return p


def main(argv: list[str] | None = None) -> int:
    from pipeline.errors import EqLenError

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except EqLenError as e:
        print(f"eqlen: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
