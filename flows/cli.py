"""The `eqlen` command line (docs/method.md, "Interfaces").

(Over 500 lines: one small function per subcommand plus the argument parser; each is
short, and splitting the parser from its handlers would separate what is read together.)

eqlen run   [--config FILE] [--run-dir DIR] [--iterations N] [--set KEY=VALUE ...] [--force]
eqlen stage NAME --run-dir DIR [--iteration I] [--set KEY=VALUE ...] [--force]
            [--input LABEL=PATH ...] [--config FILE]
eqlen show  DIR [--json]
eqlen plot  DIR [--out PNG]
eqlen eval  MODEL_OR_RUN_DIR [--data FILE] [--k K] [--max-prompts N] [--temperature T]
            [--max-new-tokens N] [--run-dir DIR] [--set KEY=VALUE ...] [--config FILE]
            [--force] [--json]
eqlen export RUN_DIR OUT [--iteration I] [--force]
eqlen example chat OUT   (a tiny chat model, word problems and a config, offline)
eqlen experiment [--task demo|pad] [--out DIR] [--methods a,b] [--seeds 0,1,2,3,4] [--set ...]
eqlen config            (every config key with its type, default and meaning)
eqlen datasets [CACHE_DIR] [--json]      (every stage output in a cache, the runs using it)
eqlen gc [CACHE_DIR] [--keep-last N] [--min-age-hours H] [--dry-run]
eqlen server start|status|stop   (the local Prefect server `eqlen run` keeps and reuses)
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import os
import sys
import time
from pathlib import Path

from pipeline import lazy


def _prefect_env() -> None:
    # Offline machines: Prefect's analytics would log an error on every start.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    # Server start-up needs longer than Prefect's 20 s default on a busy 2-core machine
    # (eqlen's own server, flows/server.py, waits as long).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")


def _quiet_hf() -> None:
    # Per-call "Loading weights" bars would drown the per-iteration progress lines. Set
    # through the environment, which transformers reads at import, so that a run that never
    # loads a model (a fully cached rerun) does not import it.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if lazy.is_loaded("transformers"):  # imported already (in-process callers, tests)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


GC_YOUNG_THRESHOLD = 10_000


def _runtime() -> None:
    """Quiet HF progress bars, size torch's thread pool and space out garbage collections,
    before any stage runs; neither library is imported here (torch's pool is sized when
    torch is first loaded)."""
    _quiet_hf()
    # CPython's default (a young collection every 700 new objects, a full one as the heap
    # grows by a quarter) walks the ~0.5M objects of Prefect, torch and transformers over and
    # over while they are imported: 1.1 s of a 12 s demo run on 2 cores, 0.3 s at 10,000.
    # Collections still run, and cyclic garbage is still freed, only in larger steps.
    if gc.get_threshold()[0] < GC_YOUNG_THRESHOLD:
        gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)
    # One core is left to Prefect's API client and server: with every core given to
    # torch's OpenMP pool, the pool's spin-waits fight them and a stage runs ~20x slower
    # (measured on 2 cores: update 8.3 s vs 0.24 s).
    n = int(os.environ.get("EQLEN_THREADS", "0")) or max(1, (os.cpu_count() or 2) - 1)
    lazy.when_loaded("torch", lambda torch: torch.set_num_threads(n))


def cmd_run(args) -> int:
    _runtime()
    from flows import report, runner
    from pipeline import config

    runner.load_stages()  # so the config's registry choices (strategy, ...) are checked
    cfg = config.load(args.config, args.set)
    if args.iterations is not None:
        cfg = config.apply(cfg, overrides=[f"iterations={args.iterations}"])
    run_dir = Path(args.run_dir).resolve()
    # Inputs that need no model are checked before Prefect starts: seconds, not 20 s.
    from flows import preflight

    preflight.check(cfg, run_dir)
    _check_eval_and_tracking(cfg)
    _prefect_env()
    from flows.server import ForRun

    api = ForRun().begin()  # reuses or starts the server; waited for in api.ready()
    from flows.online import online

    report.console.print(
        f"EqLen run -> {run_dir}  ({cfg.iterations} iterations, strategy "
        f"{cfg.pair.strategy}, {cfg.update.algorithm}/{cfg.update.loss_agg})"
    )
    report.console.print(api.ready())
    t0 = time.perf_counter()
    with api.settings():
        online(config.to_dict(cfg), str(run_dir), force=args.force)
    report.print_summary(run_dir)
    report.console.print(
        f"done in {time.perf_counter() - t0:.1f}s; inspect with `eqlen show {run_dir}`"
    )
    return 0


def _check_eval_and_tracking(cfg) -> None:
    """Before Prefect starts: trackers installed (log.to), held-out prompts readable."""
    from flows import tracking

    tracking.check(cfg)
    if cfg.eval.every > 0:
        from flows.runner import heldout_config
        from pipeline import prompts
        from stages.evaluate import check_config

        check_config(cfg)
        prompts.load_table(heldout_config(cfg))


def cmd_eval(args) -> int:
    """eqlen eval MODEL_OR_RUN_DIR: avg@k and pass@k of a model folder (or hub id), or of a
    run's latest policy with the run's config, on held-out prompts; a cached stage output."""
    import json

    from flows import report, runner
    from pipeline import config
    from stages.evaluate import check_config

    runner.load_stages()
    target = Path(args.target).expanduser()
    is_run = (target / "run.json").is_file()
    overrides = list(args.set)
    for key, value in (
        ("eval.data", args.data),
        ("eval.k", args.k),
        ("eval.max_prompts", args.max_prompts),
        ("eval.temperature", args.temperature),
        ("eval.max_new_tokens", args.max_new_tokens),
    ):
        if value is not None:
            overrides.append(f"{key}={value}")
    if is_run:
        run_dir = target.resolve()
        cfg = config.load(args.config, overrides, base=runner.RunRecord(run_dir).config())
        policy, updates = runner.latest_policy(run_dir)
        what = f"{run_dir} after {updates} update{'s' * (updates != 1)}"
    else:
        run_dir = Path(args.run_dir).resolve()
        cfg = config.load(args.config, [*overrides, f"model={args.target}"])
        policy = runner.policy_input(cfg)
        what = args.target
    if not cfg.eval.data:
        raise runner.RunError(
            "eqlen eval needs held-out prompts: --data FILE (a .jsonl/.json/.parquet file or "
            "folder, as data.prompts takes)"
        )
    check_config(cfg)
    heldout = runner.heldout_input(cfg, runner.cache_root(cfg, run_dir))
    _runtime()
    res = runner.run_stage(
        "eval",
        cfg,
        run_dir,
        0,
        {"heldout": heldout, "policy": policy},
        force=args.force,
        log=lambda m: None,
        record=False,
    )
    m, k = res.metrics, res.metrics["k"]
    out = {
        f"avg@{k}": m[f"avg@{k}"],
        f"pass@{k}": m[f"pass@{k}"],
        "n_prompts": m["n_prompts"],
        "k": k,
        **{key: v for key, v in m.items() if key.startswith("pass@")},
        "mean_len_correct": m["mean_len_correct"],
        "mean_len_incorrect": m["mean_len_incorrect"],
        "model": policy.path,
        "dataset": res.path,
        "cached": res.cached,
    }
    if args.json:
        print(json.dumps(out))
        return 0
    state = "served from cache" if res.cached else f"ran in {res.seconds:.1f}s"
    passes = "  ".join(f"{key} {v:.3f}" for key, v in m.items() if key.startswith("pass@"))
    report.console.print(
        f"eval of {what} on {m['n_prompts']} held-out prompts x {k} samples ({state}):\n"
        f"  avg@{k} {m[f'avg@{k}']:.3f}  {passes}\n"
        f"  mean length: correct {report._fmt(m['mean_len_correct'], '.1f')}, incorrect "
        f"{report._fmt(m['mean_len_incorrect'], '.1f')} tokens\n"
        f"  rows (one per prompt and sample): {res.path}/eval.parquet"
    )
    return 0


def cmd_export(args) -> int:
    from flows.export import export

    out = export(args.run_dir, args.out, iteration=args.iteration, force=args.force)
    print(
        f"exported the policy of iteration {out.iteration} ({out.source}) -> {out.path} "
        f"({out.files} files, {out.bytes / 1e6:.1f} MB)"
    )
    return 0


def cmd_server(args) -> int:
    """eqlen server start|status|stop: the kept Prefect server of flows/server.py."""
    from flows import server

    _prefect_env()
    d = server.home()
    if args.action == "start":
        h = server.ensure(d, port=args.port, idle_minutes=args.idle_minutes)
        info = h.wait()
        print(
            f"eqlen server {'started' if h.started_now else 'already running'}: {info.describe()}"
        )
        if os.environ.get("PREFECT_API_URL") and os.environ["PREFECT_API_URL"] != info.url:
            print(
                f"note: PREFECT_API_URL={os.environ['PREFECT_API_URL']} is set, so `eqlen "
                "run` uses that, not this server"
            )
        return 0
    if args.action == "status":
        info, ok = server.status(d)
        if args.json:
            import json
            from dataclasses import asdict

            print(
                json.dumps(
                    {
                        "running": info is not None,
                        "healthy": ok,
                        **(asdict(info) if info else {"home": str(d)}),
                    }
                )
            )
        elif info is None:
            print(f"no eqlen Prefect server running (PREFECT_HOME {d})")
        else:
            print(f"eqlen server {'running' if ok else 'NOT ANSWERING'}: {info.describe()}")
        if not args.json and (extra := server.unrecorded(d)):
            print(
                f"unrecorded eqlen server process(es): pid {', '.join(map(str, extra))}; "
                "`eqlen server stop` stops them"
            )
        return 0 if info is not None and ok else 1
    pids = server.stop(d)
    if pids:
        print(f"eqlen server stopped (pid {', '.join(map(str, pids))}, PREFECT_HOME {d})")
    else:
        print(f"no eqlen Prefect server running (PREFECT_HOME {d}); nothing to stop")
    return 0


def _inputs(pairs: list[str]) -> dict[str, str]:
    from flows.runner import RunError

    out = {}
    for text in pairs:
        label, sep, path = text.partition("=")
        if not sep or not label or not path:
            raise RunError(
                f"--input expects LABEL=PATH (e.g. units=runs/a/cache/pair/KEY), got {text!r}"
            )
        out[label.strip()] = path
    return out


def cmd_stage(args) -> int:
    from flows import report, runner
    from pipeline import cache, config

    run_dir = Path(args.run_dir).resolve()
    rec = runner.RunRecord(run_dir)
    # A new run directory (e.g. to train on another run's units, --input) starts from the
    # defaults and --config; a recorded run from its recorded config.
    fresh = not rec.path.is_file()
    runner.load_stages()
    cfg = config.load(args.config, args.set, base=None if fresh else rec.config())
    cache.sweep(runner.cache_root(cfg, run_dir))  # leftovers of killed writers
    inputs = runner.resolve_inputs(args.name, cfg, run_dir, args.iteration, _inputs(args.input))
    from flows import preflight

    preflight.check(cfg, run_dir, stage=args.name, inputs=inputs)
    _runtime()
    try:
        res = runner.run_stage(args.name, cfg, run_dir, args.iteration, inputs, force=args.force)
    except Exception as e:
        if preflight.is_out_of_memory(e):
            raise preflight.out_of_memory(args.name, e, cfg) from None
        raise
    finally:
        if cfg.cluster.ray_address:
            runner.end_workers()
    if fresh:
        rec.start(cfg, args.iteration + 1)  # so later `eqlen stage` commands know the config
    state = "served from cache" if res.cached else f"ran in {res.seconds:.1f}s"
    report.console.print(
        f"{args.name} (iteration {args.iteration}) {state}: {res.rows} rows -> {res.path}"
    )
    # An offline rerun changes the lineage: say which recorded stages now descend from an
    # output that is no longer the recorded one.
    stale = [
        f"{name} it{i}"
        for i, flags in enumerate(rec.stale())
        for name, flag in flags.items()
        if flag
    ]
    if stale:
        report.console.print(
            f"now stale (computed from the previous output): "
            f"{', '.join(stale)}; `eqlen stage NAME --run-dir {run_dir} "
            "--iteration I` recomputes each on the new lineage, in the order listed (same "
            "--set as this command)"
        )
    return 0


def cmd_show(args) -> int:
    from flows import report

    report.print_show(args.dir, args.json)
    return 0


def cmd_datasets(args) -> int:
    import json
    from dataclasses import asdict

    from flows import catalog, report

    rows = catalog.datasets(args.cache_dir)
    if args.json:
        print(json.dumps([asdict(d) for d in rows], indent=2))
        return 0
    from rich.table import Table

    t = Table(title=f"datasets in {Path(args.cache_dir).resolve()}")
    for col in ("stage", "implementation", "key", "it", "rows", "created", "size", "runs"):
        t.add_column(col)
    for d in rows:
        t.add_row(
            d.stage + ("" if d.present else " (damaged)"),
            d.implementation,
            d.key,
            "-" if d.iteration is None else str(d.iteration),
            "-" if d.rows is None else f"{d.rows:,}",
            d.created[:19],
            f"{d.bytes / 1e6:.1f} MB",
            ", ".join(Path(r).name for r in d.runs) or "-",
        )
    report.console.print(t)
    return 0


def cmd_gc(args) -> int:
    from flows import catalog

    res = catalog.gc(
        args.cache_dir,
        keep_last=args.keep_last,
        min_age_hours=args.min_age_hours,
        dry_run=args.dry_run,
    )
    verb = "would remove" if args.dry_run else "removed"
    for p in res.removed:
        print(f"{verb} {p}")
    print(
        f"{verb} {len(res.removed)} outputs, {res.freed_bytes / 1e6:.1f} MB; kept "
        f"{res.kept_in_use} in use by a run, {res.kept_young} younger than "
        f"{args.min_age_hours} h, {res.kept_locked} being written"
    )
    return 0


def cmd_plot(args) -> int:
    from flows.plot import plot_run

    print(plot_run(args.dir, args.out))
    return 0


def cmd_example(args) -> int:
    """eqlen example chat OUT: the offline GSM8K-style chat example (pipeline/chat_example.py)."""
    from pipeline.chat_example import write_example

    out = write_example(args.out)
    print(
        f"wrote {out}/model (tiny chat model), train.jsonl, test.jsonl and config.yaml; run:\n"
        f"  eqlen run --config {out}/config.yaml --run-dir runs/chat"
    )
    return 0


def cmd_experiment(args) -> int:
    from flows.experiment import DEFAULT_METHODS, run_experiment
    from flows.runner import load_stages

    load_stages()
    _runtime()
    methods = args.methods.split(",") if args.methods else list(DEFAULT_METHODS)
    seeds = [int(x) for x in args.seeds.split(",")]
    out = args.out or f"runs/experiment-{args.task}"
    run_experiment(
        out,
        methods=methods,
        seeds=seeds,
        base=args.set,
        config_file=args.config,
        task=args.task,
    )
    return 0


def cmd_config(args) -> int:
    from flows.runner import load_stages
    from pipeline.config import describe

    load_stages()
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
    r.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set generate.rounds=4",
    )
    r.add_argument("--force", action="store_true", help="rerun every stage, ignoring the cache")
    r.set_defaults(fn=cmd_run)

    s = sub.add_parser("stage", help="run one stage on the inputs recorded in a run directory")
    s.add_argument("name", help="eval, generate, score, pair or update")
    s.add_argument("--run-dir", required=True)
    s.add_argument("--iteration", type=int, default=0)
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--force", action="store_true", help="rerun even if cached")
    s.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="LABEL=PATH",
        help="take input LABEL (rollouts, scored, units, prompts, heldout, policy, reference) "
        "from a dataset folder anywhere, e.g. another run's units",
    )
    s.add_argument("--config", help="YAML config file, for a run directory with no record yet")
    s.set_defaults(fn=cmd_stage)

    w = sub.add_parser("show", help="what a run directory holds")
    w.add_argument("dir")
    w.add_argument("--json", action="store_true", help="one JSON object (stable interface)")
    w.set_defaults(fn=cmd_show)

    pl = sub.add_parser("plot", help="plot reward and lengths per iteration to a PNG")
    pl.add_argument("dir")
    pl.add_argument("--out", help="PNG path (default DIR/progress.png)")
    pl.set_defaults(fn=cmd_plot)

    ev = sub.add_parser(
        "eval",
        help="avg@k and pass@k of a model, or of a run's latest policy, on held-out prompts",
    )
    ev.add_argument(
        "target",
        metavar="MODEL_OR_RUN_DIR",
        help="a model folder, a hub id in the local HF cache, `demo`, or a run directory (its "
        "latest policy, with its config)",
    )
    ev.add_argument("--data", help="held-out prompts (eval.data): .jsonl/.json/.parquet")
    ev.add_argument("--k", type=int, help="samples per prompt (eval.k)")
    ev.add_argument("--max-prompts", type=int, help="first N prompts only (eval.max_prompts)")
    ev.add_argument("--temperature", type=float, help="sampling temperature (eval.temperature)")
    ev.add_argument(
        "--max-new-tokens", type=int, help="token budget per response (eval.max_new_tokens)"
    )
    ev.add_argument(
        "--run-dir",
        default="runs/eval",
        help="for a model: where the eval's cache lives (default runs/eval; a run directory "
        "target uses its own cache)",
    )
    ev.add_argument("--config", help="YAML config file (rewards, engine, ...)")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ev.add_argument("--force", action="store_true", help="rerun even if cached")
    ev.add_argument("--json", action="store_true", help='one JSON object: {"avg@K": .., ...}')
    ev.set_defaults(fn=cmd_eval)

    ex = sub.add_parser("export", help="write a run's trained model as a clean Hugging Face folder")
    ex.add_argument("run_dir", metavar="RUN_DIR")
    ex.add_argument("out", metavar="OUT", help="folder to write (must be empty or absent)")
    ex.add_argument(
        "--iteration",
        type=int,
        help="the model of this iteration's update (default: the last recorded update)",
    )
    ex.add_argument("--force", action="store_true", help="overwrite a non-empty OUT")
    ex.set_defaults(fn=cmd_export)

    xa = sub.add_parser("example", help="write a ready example: `chat` (GSM8K-style, offline)")
    xa.add_argument("name", choices=["chat"])
    xa.add_argument("out", metavar="OUT", help="folder to write the model, data and config to")
    xa.set_defaults(fn=cmd_example)

    e = sub.add_parser("experiment", help="baselines and EqLen on the same task, seeds, budget")
    e.add_argument(
        "--task",
        default="demo",
        choices=["demo", "pad"],
        help="built-in task whose settings the runs start from (default demo)",
    )
    e.add_argument("--out", help="output folder (results.md, runs/); default runs/experiment-TASK")
    e.add_argument(
        "--methods",
        help="comma-separated subset of the methods (default: all but the signal variants "
        "eqlen_grpo_g16, eqlen_grpo_r8, eqlen_grpo_t13)",
    )
    e.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds (default 0-4)")
    e.add_argument("--config", help="YAML base config")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    e.set_defaults(fn=cmd_experiment)

    ds = sub.add_parser("datasets", help="every stage output in a cache, with the runs using it")
    ds.add_argument(
        "cache_dir",
        nargs="?",
        default="runs/demo/cache",
        help="a cache folder (RUN_DIR/cache or a shared cache_dir)",
    )
    ds.add_argument("--json", action="store_true", help="a JSON list, one object per output")
    ds.set_defaults(fn=cmd_datasets)

    g = sub.add_parser("gc", help="remove cache outputs no run references")
    g.add_argument("cache_dir", nargs="?", default="runs/demo/cache")
    g.add_argument(
        "--keep-last",
        type=int,
        default=None,
        metavar="N",
        help="also remove each run's policy checkpoints older than its last N",
    )
    g.add_argument(
        "--min-age-hours",
        type=float,
        default=1.0,
        help="keep outputs younger than this (a running run may not have recorded "
        "them yet; default 1)",
    )
    g.add_argument("--dry-run", action="store_true", help="list what would go, remove nothing")
    g.set_defaults(fn=cmd_gc)

    c = sub.add_parser("config", help="list every config key")
    c.set_defaults(fn=cmd_config)

    sv = sub.add_parser(
        "server",
        help="the local Prefect server that `eqlen run` keeps and "
        "reuses (when PREFECT_API_URL is not set): start, status or stop",
    )
    sv.add_argument("action", choices=("start", "status", "stop"))
    sv.add_argument(
        "--port", type=int, default=0, help="start: port on 127.0.0.1 (default: a free one)"
    )
    sv.add_argument(
        "--idle-minutes",
        type=float,
        default=None,
        help="start: stop after this long with no request (default "
        "EQLEN_SERVER_IDLE_MINUTES or 60; 0 = never)",
    )
    sv.add_argument("--json", action="store_true", help="status: one JSON object")
    sv.set_defaults(fn=cmd_server)
    return p


# The process's exit code once `main` has returned (not when it raised: a traceback, a
# Ctrl-C and their exit codes take Python's normal way out).
_EXIT_CODE: list[int] = []


def _exit_without_teardown() -> None:
    """Registered first, so it runs after every other atexit handler (Prefect's log and
    event workers drain, Ray, W&B, temporary folders, logging's own flush): then the
    process ends without the interpreter's teardown.

    That teardown is garbage collection and module cleanup over the ~0.5M objects of
    Prefect, torch and transformers: 1.0-1.2 s at the end of a demo run that computed, and
    0.35-0.5 s after a fully cached one (2 cores). Nothing is left for it to do that
    anyone would see: the pipeline closes its files with `with`, its trackers in the run's
    `finally`. (Freezing the heap instead leaves objects that extension modules count as
    leaked: nanobind prints 30 lines of them for triton at exit.)"""
    if not _EXIT_CODE:
        return
    if "logging" in sys.modules:
        sys.modules["logging"].shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(_EXIT_CODE[0])


def arm_quick_exit() -> None:
    """For a process's entry point: end without the teardown once `quick_exit(code)` has
    been called (see `_exit_without_teardown`). Call before importing Prefect or torch.

    Not armed when another atexit handler is registered already (`coverage run`, a
    sitecustomize): it would run after ours, that is never; nor with EQLEN_FULL_EXIT=1.
    logging's own handler (registered when logging is imported) is allowed: ours calls
    `logging.shutdown()` itself."""
    if os.environ.get("EQLEN_FULL_EXIT", "").strip() not in ("", "0"):
        return
    ncallbacks = getattr(atexit, "_ncallbacks", None)  # CPython's count of registered handlers
    if ncallbacks is None or ncallbacks() > ("logging" in sys.modules):
        return
    atexit.register(_exit_without_teardown)


def quick_exit(code: int) -> int:
    _EXIT_CODE[:] = [code]
    return code


def main(argv: list[str] | None = None) -> int:
    from pipeline.errors import EqLenError

    if argv is None:  # the `eqlen` process itself, not a caller in its own process
        arm_quick_exit()
    args = build_parser().parse_args(argv)
    try:
        rc = args.fn(args)
    except EqLenError as e:
        print(f"eqlen: error: {e}", file=sys.stderr)
        rc = 2
    return quick_exit(rc) if argv is None else rc


if __name__ == "__main__":
    sys.exit(main())
