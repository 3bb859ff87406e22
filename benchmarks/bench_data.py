"""Benchmark: the update's data path on 1M members, against a plain Parquet read.

    .venv/bin/python benchmarks/bench_data.py [--rows 1000000] [--strategy group] [--repeats 3]

It builds synthetic rollouts (eqlen_testing/synthetic.py, the lock-step rules of
docs/method.md), runs the real pair stage on them to get a units dataset of about --rows
members, and then times, on that file:

- baseline: `pq.read_table` of units.parquet (every column, Arrow's threads);
- the update's data path, everything the update does with the data before the model
  sees it: `stages.update.prepare` (read, schema validation, the algorithm's advantages,
  loss masks, zero-signal flags; stages/members.py keeps the columns as numpy), then one
  epoch's mini-batches as `train` makes them (seeded shuffle, `update.minibatches`), each
  mini-batch's padded loss mask and `update.loss_agg` weights, and each micro-batch's
  forward inputs (`update.micro_batches`: padded context + segment ids, attention mask,
  positions, targets, padded old log-probs and advantages).

The ratio data path / baseline is what the update's handling of the data costs beyond
reading the bytes; the goal (docs/benchmarks.md) is at most 2x. The first version of the
update turned every column into Python lists (`to_pylist`); `--lists` times that too.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from eqlen_testing.synthetic import synthetic_scored
from eqlen_testing.timing import timed
from flows import report
from flows.runner import Context
from pipeline import config
from stages import pair, update


def data_path(units_dir: Path, cfg, pad_id: int = 0, *, collate: bool = True) -> dict:
    """The update's data work on `units_dir` for one epoch, without a model: `prepare`,
    then the mini-batches as `train` makes them, each one's `minibatch_plan` (mask,
    loss-aggregation weights) and, with `collate`, every micro-batch's padded inputs."""
    u = cfg.update
    cols = update.prepare(units_dir, cfg)
    n = len(cols["unit_id"])
    rng = np.random.default_rng(cfg.seed)
    micro_batches, tokens = 0, 0
    for mb in np.array_split(rng.permutation(n), min(u.minibatches, n)):
        plan = update.minibatch_plan(cols, mb, cfg, "cpu")
        if not collate:
            continue
        for _, _, x in update.micro_batches(
            cols, mb, plan["active"], u.micro_batch_size, plan["count"], pad_id, plan["width"]
        ):
            micro_batches += 1
            tokens += int(x["attn"].sum())
    return {"members": n, "micro_batches": micro_batches, "tokens": tokens}


def lists_path(units_dir: Path) -> int:
    """The first version's conversion: every column the update reads as Python lists."""
    t = pq.read_table(units_dir / "units.parquet", columns=list(update.UNIT_COLUMNS))
    cols = {c: t.column(c).to_pylist() for c in update.UNIT_COLUMNS}
    return len(cols["unit_id"])


def make_units(tmp: Path, rows: int, strategy: str, rounds: int, seed: int = 0) -> Path:
    """A units dataset of about `rows` members, made by the real pair stage."""
    group = 8
    # group: one member per track; truncate / eqlen: about one per track too.
    table = synthetic_scored(rows, rounds=rounds, group_size=group, seed=seed)
    scored = tmp / "scored"
    scored.mkdir()
    pq.write_table(table, scored / "scored.parquet")
    cfg = config.load(
        None,
        [f"pair.strategy={strategy}", f"generate.rounds={rounds}", f"generate.group_size={group}"],
    )
    out = tmp / "units"
    out.mkdir()
    pair.run({"scored": scored}, out, cfg, Context(iteration=0))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="members, about")
    ap.add_argument("--strategy", default="group", choices=["group", "truncate", "eqlen"])
    ap.add_argument("--rounds", type=int, default=4, help="rounds of the eqlen rollouts")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lists", action="store_true", help="also time the to_pylist version")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides (update.*)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {report.machine()}")
    rounds = args.rounds if args.strategy == "eqlen" else 1
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        t0 = time.perf_counter()
        print(f"building units ({args.strategy}, about {args.rows:,} members) ...", flush=True)
        units = make_units(Path(tmp), args.rows, args.strategy, rounds)
        path = units / "units.parquet"
        meta = pq.read_metadata(path)
        print(
            f"  {meta.num_rows:,} members, {path.stat().st_size / 2**20:.0f} MiB Parquet, "
            f"{time.perf_counter() - t0:.1f} s"
        )
        cfg = config.load(None, [f"pair.strategy={args.strategy}", *args.set])
        base_s, _ = timed(lambda: pq.read_table(path), args.repeats)
        prep_s, _ = timed(lambda: update.prepare(units, cfg), args.repeats)
        plan_s, _ = timed(lambda: data_path(units, cfg, collate=False), args.repeats)
        ours_s, got = timed(lambda: data_path(units, cfg), args.repeats)
        print(f"  plain pq.read_table: {base_s:.2f} s")
        print(
            f"  update data path: {ours_s:.2f} s ({got['micro_batches']:,} micro-batches of "
            f"{cfg.update.micro_batch_size}, {got['tokens']:,} tokens)"
        )
        print(f"  update.prepare alone: {prep_s:.2f} s")
        rows = [
            ("update.prepare: read, validate, advantages, masks", prep_s),
            ("prepare + mini-batches (masks, loss-aggregation weights)", plan_s),
            ("prepare + mini-batches + every micro-batch's padded inputs", ours_s),
        ]
        if args.lists:
            lists_s, _ = timed(lambda: lists_path(units), 1)
            print(
                f"  to_pylist of the update's columns (first version, no batching): {lists_s:.2f} s"
            )
            rows.append(("to_pylist only (first version)", lists_s))
    print(f"\nmedian of {args.repeats}; {meta.num_rows:,} members\n")
    print("| path | s | x plain Parquet read |")
    print("|---|---|---|")
    print(f"| plain pq.read_table | {base_s:.2f} | 1.0x |")
    for name, secs in rows:
        print(f"| {name} | {secs:.2f} | {secs / base_s:.2f}x |")


if __name__ == "__main__":
    main()
