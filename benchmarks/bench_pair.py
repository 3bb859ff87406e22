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
the independent checker tests/invariants.py, and so are the units the stage builds for it.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import schemas  # noqa: E402
from pipeline import config, report  # noqa: E402
from pipeline.runner import Context  # noqa: E402
from stages import pair  # noqa: E402

EOS = 2  # token id of EOS in the synthetic vocabulary; ids 0-2 are special, never sampled


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + n) for each (s, n): the indices of many slices at once."""
    total = int(lengths.sum())
    ends = np.cumsum(lengths)
    idx = np.arange(total, dtype=np.int64)
    return idx + np.repeat(starts - (ends - lengths), lengths)


def _lengths(rng, n: int, max_new_tokens: int) -> np.ndarray:
    return np.minimum(rng.geometric(min(1.0, 3.0 / max_new_tokens), n), max_new_tokens)


def _lineage(rng, n_pairs: int, rounds: int, max_new_tokens: int) -> dict[str, np.ndarray]:
    """Lock-step lineage of every pair: per track its pair, response length, parent track
    (-1 for round-0 tracks), birth round and own_start. Tracks 2p, 2p+1 start pair p."""
    pair_of = np.repeat(np.arange(n_pairs), 2)
    length = _lengths(rng, 2 * n_pairs, max_new_tokens)
    parent = np.full(2 * n_pairs, -1)
    birth = np.zeros(2 * n_pairs, dtype=np.int64)
    own = np.zeros(2 * n_pairs, dtype=np.int64)
    a, b = np.arange(0, 2 * n_pairs, 2), np.arange(1, 2 * n_pairs, 2)
    cols = [pair_of, length, parent, birth, own]
    for k in range(1, rounds):
        la, lb = length[a], length[b]
        go = la != lb  # both ended on the same step: the pair is done
        a, b, la, lb = a[go], b[go], la[go], lb[go]
        survivor = np.where(la > lb, a, b)
        start = np.minimum(la, lb)  # the step the other track ended on
        if not len(survivor):
            break
        new_ids = len(length) + np.arange(len(survivor))
        # start < the survivor's length <= max_new_tokens, so the newcomer gets >= 1 own token.
        new_len = np.minimum(start + _lengths(rng, len(survivor), max_new_tokens), max_new_tokens)
        pair_of = np.concatenate([pair_of, pair_of[survivor]])
        length = np.concatenate([length, new_len])
        parent = np.concatenate([parent, survivor])
        birth = np.concatenate([birth, np.full(len(survivor), k)])
        own = np.concatenate([own, start])
        a, b = survivor, new_ids
    return {"pair": pair_of, "length": length, "parent": parent, "birth": birth, "own": own}


def synthetic_scored(n_rows: int, *, rounds: int, group_size: int = 8, max_new_tokens: int = 64,
                     prompt_len: tuple[int, int] = (16, 64), vocab: int = 32000,
                     seed: int = 0) -> pa.Table:
    """A valid `scored` table of whole prompts with at most n_rows rows (at least one prompt)."""
    rng = np.random.default_rng(seed)
    half = group_size // 2
    n_pairs = max(half, (n_rows // 2) // half * half)
    lin = _lineage(rng, n_pairs, rounds, max_new_tokens)
    # Keep the whole prompts whose tracks fit in n_rows.
    prompt_of_track = lin["pair"] // half
    per_prompt = np.bincount(prompt_of_track, minlength=n_pairs // half)
    n_prompts = max(1, int(np.searchsorted(np.cumsum(per_prompt), n_rows, side="right")))
    keep = prompt_of_track < n_prompts
    # Track ids as the engine numbers them: round-0 tracks in pair order, then newcomers by
    # the step they were born on.
    first = lin["birth"] == 0
    newcomers = np.flatnonzero(keep & ~first)
    order = np.concatenate([np.flatnonzero(keep & first),
                            newcomers[np.lexsort((lin["pair"][newcomers], lin["own"][newcomers]))]])
    track_id = np.full(len(keep), -1)
    track_id[order] = np.arange(len(order))
    lin = {k: v[order] for k, v in lin.items()}
    n = len(order)
    length, own, parent_old = lin["length"], lin["own"], lin["parent"]
    parent = np.where(parent_old >= 0, track_id[np.maximum(parent_old, 0)], -1)  # = its row

    # Tokens: fresh everywhere, then each newcomer's prefix copied from its survivor, round by
    # round (a survivor born in round k-1 is complete before round k's newcomers copy it).
    offsets = np.concatenate([[0], np.cumsum(length)])
    ids = rng.integers(EOS + 1, vocab, int(offsets[-1]), dtype=np.int32)
    logprobs = (-rng.exponential(1.0, int(offsets[-1]))).astype(np.float32)
    for k in range(1, rounds):
        rows = np.flatnonzero(lin["birth"] == k)
        dst = _ranges(offsets[rows], own[rows])
        src = _ranges(offsets[parent[rows]], own[rows])
        ids[dst], logprobs[dst] = ids[src], logprobs[src]
    ended_by_eos = (length < max_new_tokens) | (rng.random(n) < 0.3)
    ids[offsets[1:][ended_by_eos] - 1] = EOS

    # Prompts: token ids, text, answer and a 0/1 reward with a per-prompt success rate.
    p_len = rng.integers(prompt_len[0], prompt_len[1] + 1, n_prompts)
    p_off = np.concatenate([[0], np.cumsum(p_len)])
    p_ids = rng.integers(EOS + 1, vocab, int(p_off[-1]), dtype=np.int32)
    prompt_lists = pa.ListArray.from_arrays(pa.array(p_off, pa.int32()), pa.array(p_ids))
    prompt_text = pa.StringArray.from_buffers(
        n_prompts, pa.py_buffer(p_off.astype(np.int32)),
        pa.py_buffer((p_ids % 26 + 97).astype(np.uint8)))
    prompt_of_row = lin["pair"] // half
    take = pa.array(prompt_of_row)
    success = rng.beta(0.7, 0.7, n_prompts)[prompt_of_row]
    reward = (rng.random(n) < success).astype(np.float64)
    prompt_id = pa.array([f"p{i:07d}" for i in range(n_prompts)])
    answer = pa.array([str(i % 99991) for i in range(n_prompts)])
    text = pa.StringArray.from_buffers(
        n, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer((ids % 10 + 48).astype(np.uint8)))
    columns = {
        "prompt_id": prompt_id.take(take),
        "prompt": prompt_text.take(take),
        "iteration": pa.array(np.zeros(n, np.int32)),
        "prompt_ids": prompt_lists.take(take),
        "pair_id": pa.array(lin["pair"]),
        "track_id": pa.array(np.arange(n)),
        "parent_track_id": pa.array(parent, mask=parent < 0),
        "birth_round": pa.array(lin["birth"].astype(np.int32)),
        "own_start": pa.array(own.astype(np.int32)),
        "response_ids": pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(ids)),
        "logprobs": pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(logprobs)),
        "finish_reason": pa.array(np.where(ended_by_eos, "eos", "length")),
        "response": text,
        "reward": pa.array(reward),
        "answer": answer.take(take),
        "reward_exact_match": pa.array(reward),
    }
    return schemas.validate(pa.table(columns), schemas.SCORED)


def check_sample(table: pa.Table, units: pa.Table | None, *, rounds: int, max_new_tokens: int,
                 strategy: str | None = None, n_prompts: int = 200) -> int:
    """Check the rollouts of the first n_prompts prompts (and their units) with the independent
    checker of tests/invariants.py; returns the rows checked."""
    from invariants import check_rollouts, check_units

    prompts = pc.unique(table.column("prompt_id")).slice(0, n_prompts)
    rows = table.filter(pc.is_in(table.column("prompt_id"), prompts))
    rollouts = rows.to_pylist()
    check_rollouts(rollouts, rounds=rounds, max_new_tokens=max_new_tokens, eos_id=EOS)
    if units is not None:
        sample = units.filter(pc.is_in(units.column("track_id"), rows.column("track_id")))
        check_units(rollouts, sample.to_pylist(), strategy=strategy)
    return len(rollouts)


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def machine() -> str:
    return (f"{report.machine()}; python {platform.python_version()}, "
            f"pyarrow {version('pyarrow')}, polars {version('polars')}, numpy {np.__version__}, "
            f"torch {version('torch')}")


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
    print(f"pair stage VERSION {pair.VERSION}; {args.rows:,} rows asked, group {args.group}, "
          f"max_new_tokens {args.max_new_tokens}, median of {args.repeats} run(s)")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-pair-") as tmp:
        tmp = Path(tmp)
        datasets = [(1, [s for s in strategies if s != "eqlen"]),
                    (args.rounds, [s for s in strategies if s == "eqlen"])]
        for rounds, names in datasets:
            if not names:
                continue
            t0 = time.perf_counter()
            print(f"building rollouts, rounds={rounds} ...", end=" ", flush=True)
            table = synthetic_scored(args.rows, rounds=rounds, group_size=args.group,
                                     max_new_tokens=args.max_new_tokens, seed=args.seed)
            scored = tmp / f"scored-r{rounds}"
            scored.mkdir()
            pq.write_table(table, scored / "scored.parquet")
            inherit = pc.sum(pc.greater(table.column("birth_round"), 0)).as_py()
            tokens = pc.sum(pc.list_value_length(table.column("response_ids"))).as_py()
            mb = (scored / "scored.parquet").stat().st_size / 2**20
            print(f"{table.num_rows:,} rows ({inherit:,} inheriting), {tokens:,} response "
                  f"tokens, {mb:.0f} MiB Parquet, {time.perf_counter() - t0:.1f} s")
            checked = check_sample(table, None, rounds=rounds, max_new_tokens=args.max_new_tokens)
            print(f"  tests/invariants.py check_rollouts: {checked:,} rows of 200 prompts ok")
            del table

            def baseline():
                t = pq.read_table(scored / "scored.parquet")
                pq.write_table(t, tmp / "baseline.parquet")
            base_s, _ = timed(baseline, args.repeats)
            print(f"  baseline read + write: {base_s:.2f} s")
            for name in names:
                cfg = config.load(None, [f"pair.strategy={name}", f"generate.rounds={rounds}",
                                         f"generate.group_size={args.group}"])
                out = tmp / f"units-{name}"
                out.mkdir()
                print(f"  pair.strategy={name} ...", end=" ", flush=True)
                secs, res = timed(lambda: pair.run({"scored": scored}, out, cfg,
                                                   Context(iteration=0)), args.repeats)
                m = res["metrics"]
                print(f"{secs:.2f} s, {res['rows']:,} members in {m['units']:,} units, "
                      f"effective token ratio {m['effective_token_ratio']:.3f}")
                units = pq.read_table(out / "units.parquet")
                table = pq.read_table(scored / "scored.parquet")
                check_sample(table, units, rounds=rounds, max_new_tokens=args.max_new_tokens,
                             strategy=name)
                print("    tests/invariants.py check_units on the sample: ok")
                results.append((name, rounds, table.num_rows, secs, base_s, res["rows"]))
                del units, table
    print("\n| strategy | rounds | rows | pair stage s | rows/s | baseline s | stage / baseline "
          "| units rows |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rounds, rows, secs, base_s, members in results:
        print(f"| {name} | {rounds} | {rows:,} | {secs:.2f} | {rows / secs:,.0f} | {base_s:.2f} "
              f"| {secs / base_s:.1f}x | {members:,} |")


if __name__ == "__main__":
    main()
