"""Benchmark: the pair stage on synthetic rollouts, against plain Parquet read + write.

    .venv/bin/python benchmarks/bench_pair.py [--rows 1000000] [--rounds 4] [--repeats 1]

It writes a `scored` dataset of about --rows rows (whole prompts, `group_size` tracks each)
and runs the real stage, `stages.pair.run(inputs, out_dir, cfg, ctx)` as the runner calls
it: Parquet read, schema validation, units, default advantages, validation and Parquet
write of the units. Strategies `group` and `truncate` run on rollouts generated with
rounds = 1; `eqlen` on rollouts with --rounds > 1, whose inheriting tracks carry real
lineage (parent_track_id, birth_round, own_start, a response that starts with the
survivor's prefix and log-probs copied from it).

Baseline, measured in the same run on the same file: `pq.read_table` of the scored file
plus `pq.write_table` of that table (the same rows) to a new file. The ratio stage /
baseline is what the pair stage costs beyond moving the bytes.

The synthetic data follows the lock-step rules of docs/method.md (stages/hf_engine.py),
built with numpy: both tracks of a pair start together; when one ends and the pair has
rounds left, a newcomer inherits the survivor's prefix up to that step (own_start) and draws
a fresh continuation. Lengths are geometric with mean --max-new-tokens / 3, cut at
--max-new-tokens (about 5% end by `length`); rewards are 0/1 with a per-prompt success rate,
so many units carry no signal, as in real runs. A sample of whole prompts is checked with
the independent checker eqlen_testing/invariants.py, and so are the units the stage builds for it.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from eqlen_testing.synthetic import EOS, synthetic_scored  # noqa: F401  (EOS: re-exported)
from eqlen_testing.timing import timed
from flows import report
from flows.runner import Context
from pipeline import config
from stages import pair


def check_sample(
    table: pa.Table,
    units: pa.Table | None,
    *,
    rounds: int,
    max_new_tokens: int,
    strategy: str | None = None,
    n_prompts: int = 200,
) -> int:
    """Check the rollouts of the first n_prompts prompts (and their units) with the independent
    checker of eqlen_testing/invariants.py; returns the rows checked."""
    from eqlen_testing.invariants import check_rollouts, check_units

    prompts = pc.unique(table.column("prompt_id")).slice(0, n_prompts)
    rows = table.filter(pc.is_in(table.column("prompt_id"), prompts))
    rollouts = rows.to_pylist()
    check_rollouts(rollouts, rounds=rounds, max_new_tokens=max_new_tokens, eos_id=EOS)
    if units is not None:
        sample = units.filter(pc.is_in(units.column("track_id"), rows.column("track_id")))
        check_units(rollouts, sample.to_pylist(), strategy=strategy)
    return len(rollouts)


def machine() -> str:
    return (
        f"{report.machine()}; python {platform.python_version()}, "
        f"pyarrow {version('pyarrow')}, polars {version('polars')}, numpy {np.__version__}, "
        f"torch {version('torch')}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=4, help="rounds of the eqlen rollouts")
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--strategies", default="group,truncate,eqlen")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    strategies = args.strategies.split(",")
    print(f"machine: {machine()}")
    print(
        f"pair stage version {pair.STAGE.version}; {args.rows:,} rows asked, group {args.group}, "
        f"max_new_tokens {args.max_new_tokens}, median of {args.repeats} run(s)"
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-pair-") as tmp:
        tmp = Path(tmp)
        datasets = [
            (1, [s for s in strategies if s != "eqlen"]),
            (args.rounds, [s for s in strategies if s == "eqlen"]),
        ]
        for rounds, names in datasets:
            if not names:
                continue
            t0 = time.perf_counter()
            print(f"building rollouts, rounds={rounds} ...", end=" ", flush=True)
            table = synthetic_scored(
                args.rows,
                rounds=rounds,
                group_size=args.group,
                max_new_tokens=args.max_new_tokens,
                seed=args.seed,
            )
            scored = tmp / f"scored-r{rounds}"
            scored.mkdir()
            pq.write_table(table, scored / "scored.parquet")
            inherit = pc.sum(pc.greater(table.column("birth_round"), 0)).as_py()
            tokens = pc.sum(pc.list_value_length(table.column("response_ids"))).as_py()
            mb = (scored / "scored.parquet").stat().st_size / 2**20
            print(
                f"{table.num_rows:,} rows ({inherit:,} inheriting), {tokens:,} response "
                f"tokens, {mb:.0f} MiB Parquet, {time.perf_counter() - t0:.1f} s"
            )
            checked = check_sample(table, None, rounds=rounds, max_new_tokens=args.max_new_tokens)
            print(
                f"  eqlen_testing/invariants.py check_rollouts: {checked:,} rows of 200 prompts ok"
            )
            del table

            def baseline(scored=scored):  # bound now: the loop rebinds `scored`
                t = pq.read_table(scored / "scored.parquet")
                pq.write_table(t, tmp / "baseline.parquet")

            base_s, _ = timed(baseline, args.repeats)
            print(f"  baseline read + write: {base_s:.2f} s")
            for name in names:
                cfg = config.load(
                    None,
                    [
                        f"pair.strategy={name}",
                        f"generate.rounds={rounds}",
                        f"generate.group_size={args.group}",
                    ],
                )
                out = tmp / f"units-{name}"
                out.mkdir()
                print(f"  pair.strategy={name} ...", end=" ", flush=True)
                secs, res = timed(
                    # Defaults bind this iteration's values (the loop rebinds the names).
                    lambda scored=scored, out=out, cfg=cfg: pair.run(
                        {"scored": scored}, out, cfg, Context(iteration=0)
                    ),
                    args.repeats,
                )
                m = res["metrics"]
                print(
                    f"{secs:.2f} s, {res['rows']:,} members in {m['units']:,} units, "
                    f"effective token ratio {m['effective_token_ratio']:.3f}"
                )
                units = pq.read_table(out / "units.parquet")
                table = pq.read_table(scored / "scored.parquet")
                check_sample(
                    table, units, rounds=rounds, max_new_tokens=args.max_new_tokens, strategy=name
                )
                print("    eqlen_testing/invariants.py check_units on the sample: ok")
                results.append((name, rounds, table.num_rows, secs, base_s, res["rows"]))
                del units, table
    print(
        "\n| strategy | rounds | rows | pair stage s | rows/s | baseline s | stage / baseline "
        "| units rows |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, rounds, rows, secs, base_s, members in results:
        print(
            f"| {name} | {rounds} | {rows:,} | {secs:.2f} | {rows / secs:,.0f} | {base_s:.2f} "
            f"| {secs / base_s:.1f}x | {members:,} |"
        )


if __name__ == "__main__":
    main()
