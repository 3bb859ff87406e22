"""Stage 3, pair: build comparison units from scored rollouts.

A comparison unit is the set of segments whose rewards are compared with each other. The
strategy (`pair.strategy`, a registry) decides what they are:

- `group`: the ordinary GRPO group — one unit per prompt whose members are its round-0
  tracks, whole responses of unequal length. Default advantage: GRPO's
  (R - mean) / (std + eps) over the group (`std` unbiased, as TRL and verl compute it;
  `pair.scale_rewards=none` leaves R - mean).

- `truncate`: the post-hoc end of the framework. Each pair's two round-0 tracks are cut to
  their common length m = min(|a|, |b|); the tails are masked (left out of the unit). Default
  advantage: the pair difference R_a - R_b (and R_b - R_a), divided by the std of all the
  prompt's rewards in the units (one per track) + eps under `pair.scale_rewards=group`;
  |A| < sqrt(2 (n - 1)) for n tracks (docs/method.md).
- `eqlen`: the full method (docs/method.md). The pair's lineage is replayed round by
  round: in round k the two current tracks continue from the same context c_k at offset o_k;
  m_k = min of their remaining lengths; the unit holds both segments [o_k, o_k + m_k).
  If one track ended there and a track born in round k+1 inherited the survivor's prefix,
  round k+1 compares the survivor with that newcomer from o_k + m_k. Inherited tokens are
  never in the inheriting track's units (its segments start at own_start); a survivor's
  tokens after the last round are masked. Same default advantage as `truncate`.

`group` and `truncate` use the round-0 tracks only; with `generate.rounds > 1` the
inheriting tracks are left out of them (they show up as a lower effective token ratio).

Every strategy writes one row per unit member (schema `units`), self-contained: context
ids, segment ids, old log-probs, loss mask, reward, default advantage, lengths. So a units
dataset can be trained on, inspected or reused without the rollouts it came from, and
swapping the strategy changes no schema (docs/method.md invariant 4).

Metrics: `units`, `tokens_in_units` (loss-mask tokens), `tokens_generated` (tracks' own
tokens), `effective_token_ratio` (their quotient) and `zero_signal_units` (units whose
members all have equal rewards: kept, counted, they carry no gradient).

The stage is columnar: the scored rows are read once into numpy arrays of their lineage
(`Lineage`), a strategy returns which segment of which row each member is (`Members`, in
output order), and the units' list columns are gathered from the rollouts' token buffers
in a few numpy calls. No Python object is made per row, so the stage runs at a small
multiple of a plain Parquet read + write (benchmarks/bench_pair.py, docs/bench_pair.md:
1M rows in 6-20 s on 2 cores; the loop over row dicts it replaced took 20-28 s for 100k
rows and grew quadratically). `build_units` and `summarize` give the same on
rows as Python dicts, for tests and small in-memory uses; tests/test_pair_vectorised.py
pins the columnar code to the original loop over dicts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import schemas
from pipeline.config import Config
from pipeline.registry import Registry
from pipeline.stage import Stage
from stages.losses import unit_advantages, zero_signal

STRATEGIES: Registry = Registry("pair strategy", "pair.strategy")
READS = (
    "prompt_id",
    "prompt_ids",
    "pair_id",
    "track_id",
    "parent_track_id",
    "birth_round",
    "own_start",
    "response_ids",
    "logprobs",
    "finish_reason",
    "reward",
)
CHUNK_TOKENS = 1 << 24  # list values per output record batch: bounds the gather's memory


@dataclass
class Lineage:
    """What the strategies decide on, one entry per scored row (track); int64 arrays [n]."""

    prompt: np.ndarray  # rank of prompt_id among the sorted distinct ids
    pair_id: np.ndarray
    track_id: np.ndarray
    parent_track_id: np.ndarray  # 0 where has_parent is False
    has_parent: np.ndarray  # bool
    birth_round: np.ndarray
    own_start: np.ndarray
    response_len: np.ndarray

    @classmethod
    def of(cls, table: pa.Table) -> Lineage:
        def ints(name: str) -> np.ndarray:
            return table.column(name).to_numpy().astype(np.int64)

        parent = table.column("parent_track_id")
        return cls(
            prompt=_rank(table.column("prompt_id")),
            pair_id=ints("pair_id"),
            track_id=ints("track_id"),
            parent_track_id=pc.fill_null(parent, 0).to_numpy().astype(np.int64),
            has_parent=pc.is_valid(parent).to_numpy(zero_copy_only=False),
            birth_round=ints("birth_round"),
            own_start=ints("own_start"),
            response_len=pc.list_value_length(table.column("response_ids"))
            .to_numpy()
            .astype(np.int64),
        )


@dataclass
class Members:
    """Unit members in output order: member i is the segment
    response_ids[offset[i] : offset[i] + length[i]] of scored row row[i]. int64 arrays [M]."""

    row: np.ndarray
    unit_id: np.ndarray
    round: np.ndarray
    member: np.ndarray
    unit_size: np.ndarray
    offset: np.ndarray
    length: np.ndarray


def _rank(strings: pa.ChunkedArray) -> np.ndarray:
    """Dense rank of each string in sorted order (Arrow compares UTF-8 bytes: the code point
    order Python's sort uses)."""
    if len(strings) == 0:
        return np.zeros(0, dtype=np.int64)
    rank = pc.rank(strings, sort_keys="ascending", tiebreaker="dense")
    return rank.to_numpy().astype(np.int64) - 1


def _runs(sorted_keys: np.ndarray) -> np.ndarray:
    """Index of the run of equal values each entry of a sorted array is in: 0, 0, 1, 2, 2..."""
    if len(sorted_keys) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.cumsum(np.r_[False, sorted_keys[1:] != sorted_keys[:-1]])


def _pair_members(a, b, unit_id, rnd, offset, length) -> Members:
    """Two-member units (a[i], b[i]) sharing unit id, round, offset and length."""

    def two(x):
        return np.repeat(np.broadcast_to(np.asarray(x, dtype=np.int64), a.shape), 2)

    return Members(
        row=np.stack([a, b], axis=1).ravel(),
        unit_id=two(unit_id),
        round=two(rnd),
        member=np.tile(np.array([0, 1]), len(a)),
        unit_size=two(2),
        offset=two(offset),
        length=two(length),
    )


@STRATEGIES.register("group")
def group_units(lin: Lineage, cfg: Config) -> Members:
    """One unit per prompt (in prompt_id order): its round-0 tracks in track_id order."""
    rows = np.flatnonzero(lin.birth_round == 0)
    rows = rows[np.lexsort((lin.track_id[rows], lin.prompt[rows]))]
    unit = _runs(lin.prompt[rows])
    sizes = np.bincount(unit)
    zero = np.zeros(len(rows), dtype=np.int64)
    return Members(
        row=rows,
        unit_id=unit,
        round=zero,
        member=np.arange(len(rows)) - (np.cumsum(sizes) - sizes)[unit],
        unit_size=sizes[unit],
        offset=zero,
        length=lin.response_len[rows],
    )


def _first_pairs(lin: Lineage) -> tuple[np.ndarray, np.ndarray]:
    """Rows of each pair's two round-0 tracks (lower track_id first), pairs in pair_id order."""
    pairs = np.unique(lin.pair_id)
    rows = np.flatnonzero(lin.birth_round == 0)
    rows = rows[np.lexsort((lin.track_id[rows], lin.pair_id[rows]))]
    count = np.bincount(np.searchsorted(pairs, lin.pair_id[rows]), minlength=len(pairs))
    if (count != 2).any():
        i = int(np.flatnonzero(count != 2)[0])
        raise schemas.SchemaError(
            f"pair {pairs[i]}: {count[i]} round-0 tracks (birth_round 0), expected 2; the "
            "rollouts' lineage is inconsistent. Regenerate them."
        )
    return rows[0::2], rows[1::2]


@STRATEGIES.register("truncate")
def truncate_units(lin: Lineage, cfg: Config) -> Members:
    """One unit per pair: both round-0 tracks cut to their common length."""
    a, b = _first_pairs(lin)
    m = np.minimum(lin.response_len[a], lin.response_len[b])
    return _pair_members(a, b, np.arange(len(a)), 0, 0, m)


def _newcomer_finder(lin: Lineage, pair_of_row: np.ndarray):
    """A function (round k, pairs, survivor rows) -> row of the track born in round k of that
    pair that inherited from that survivor, or -1."""
    n = len(lin.track_id)
    by_id = np.argsort(lin.track_id, kind="stable")
    ids = lin.track_id[by_id]
    if n > 1 and (dup := np.flatnonzero(ids[1:] == ids[:-1])).size:
        raise schemas.SchemaError(
            f"track_id {ids[dup[0]]} appears more than once; track ids "
            "must be unique in the dataset. Regenerate the rollouts."
        )
    at = np.minimum(np.searchsorted(ids, lin.parent_track_id), max(n - 1, 0))
    parent_row = np.where(lin.has_parent & (ids[at] == lin.parent_track_id), by_id[at], -1)

    def find(k: int, pairs: np.ndarray, survivors: np.ndarray) -> np.ndarray:
        born = np.flatnonzero((lin.birth_round == k) & (parent_row >= 0))
        keys = pair_of_row[born] * n + parent_row[born]
        order = np.argsort(keys, kind="stable")
        keys, born = keys[order], born[order]
        if len(keys) > 1 and (dup := np.flatnonzero(keys[1:] == keys[:-1])).size:
            t = lin.track_id[born[dup[0]]]
            raise schemas.SchemaError(
                f"track {t}: another track of its pair also inherited from survivor "
                f"{lin.parent_track_id[born[dup[0]]]} in round {k}; the rollouts' lineage is "
                "inconsistent"
            )
        query = pairs * n + survivors
        at = np.minimum(np.searchsorted(keys, query), max(len(keys) - 1, 0))
        hit = (keys[at] == query) if len(keys) else np.zeros(len(query), dtype=bool)
        return np.where(hit, born[at] if len(keys) else -1, -1)

    return find


@STRATEGIES.register("eqlen")
def eqlen_units(lin: Lineage, cfg: Config) -> Members:
    """Every pair's lineage replayed, all pairs at once, one round per pass."""
    a, b = _first_pairs(lin)
    pair_of_row = np.searchsorted(np.unique(lin.pair_id), lin.pair_id)
    find = _newcomer_finder(lin, pair_of_row)
    pairs, offset = np.arange(len(a)), np.zeros(len(a), dtype=np.int64)
    rounds = []
    rnd = 0
    while len(pairs):
        la, lb = lin.response_len[a], lin.response_len[b]
        m = np.minimum(la, lb) - offset
        if (m < 0).any():
            t = lin.track_id[b[np.flatnonzero(m < 0)[0]]]
            raise schemas.SchemaError(
                f"track {t}: response_ids is shorter than its own_start; "
                "the rollouts' lineage is inconsistent"
            )
        rounds.append((pairs, np.full(len(pairs), rnd), a, b, offset, m))
        go = la != lb  # both ended on the same step: the pair is done
        survivor = np.where(la > lb, a, b)[go]
        pairs, offset = pairs[go], (offset + m)[go]
        newcomer = find(rnd + 1, pairs, survivor)
        found = newcomer >= 0  # none: round budget spent, the survivor's tail stays masked
        survivor, newcomer = survivor[found], newcomer[found]
        pairs, offset = pairs[found], offset[found]
        bad = lin.own_start[newcomer] != offset
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise schemas.SchemaError(
                f"track {lin.track_id[newcomer[i]]}: own_start {lin.own_start[newcomer[i]]} but "
                f"it inherited at offset {offset[i]}; the rollouts' lineage is inconsistent"
            )
        a, b, rnd = survivor, newcomer, rnd + 1
    pair, rnd, a, b, offset, m = (
        [np.concatenate(c) for c in zip(*rounds)] if rounds else [np.zeros(0, dtype=np.int64)] * 6
    )
    order = np.lexsort((rnd, pair))  # units numbered pair by pair, round by round
    return _pair_members(
        a[order], b[order], np.arange(len(order)), rnd[order], offset[order], m[order]
    )


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + n) over (starts, lengths): many slices' indices at once."""
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if len(ends) else 0
    return np.arange(total) + np.repeat(starts - (ends - lengths), lengths)


def _offsets(lengths: np.ndarray) -> pa.Array:
    return pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))


def _flat(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A list column's values and each row's start in them."""
    arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    return arr.values.to_numpy(), arr.offsets.to_numpy()[:-1].astype(np.int64)


def units_table(scored: pa.Table, m: Members, strategy: str, advantage: np.ndarray) -> pa.Table:
    """The units rows of `m`, in record batches of about CHUNK_TOKENS list values."""
    prompt_vals, prompt_start = _flat(scored.column("prompt_ids"))
    prompt_len = pc.list_value_length(scored.column("prompt_ids")).to_numpy().astype(np.int64)
    resp_vals, resp_start = _flat(scored.column("response_ids"))
    lp_vals, _ = _flat(scored.column("logprobs"))
    resp_len = pc.list_value_length(scored.column("response_ids")).to_numpy()
    reward = scored.column("reward").to_numpy()
    track_id = scored.column("track_id").to_numpy()
    schema = schemas.UNITS.arrow()
    tokens = np.cumsum(prompt_len[m.row] + m.offset + m.length)
    total = int(tokens[-1]) if len(tokens) else 0
    cuts = np.unique(
        np.r_[0, np.searchsorted(tokens, np.arange(CHUNK_TOKENS, total, CHUNK_TOKENS)), len(m.row)]
    )
    batches = []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        row, off, length = m.row[lo:hi], m.offset[lo:hi], m.length[lo:hi]
        # context = prompt + response[:offset]: two gathers into one buffer.
        ctx_len = prompt_len[row] + off
        ctx_start = np.concatenate([[0], np.cumsum(ctx_len)])[:-1]
        ctx = np.empty(int(ctx_len.sum()), dtype=resp_vals.dtype)
        ctx[_ranges(ctx_start, prompt_len[row])] = prompt_vals[
            _ranges(prompt_start[row], prompt_len[row])
        ]
        ctx[_ranges(ctx_start + prompt_len[row], off)] = resp_vals[_ranges(resp_start[row], off)]
        seg = _ranges(resp_start[row] + off, length)
        seg_offsets = _offsets(length)
        take = pa.array(row)
        arrays = [
            pa.array(m.unit_id[lo:hi]),
            scored.column("prompt_id").take(take).combine_chunks(),
            pa.repeat(strategy, hi - lo),
            pa.array(track_id[row]),
            pa.array(m.round[lo:hi].astype(np.int32)),
            pa.array(m.member[lo:hi].astype(np.int32)),
            pa.array(m.unit_size[lo:hi].astype(np.int32)),
            pa.array(off.astype(np.int32)),
            pa.array(length.astype(np.int32)),
            pa.ListArray.from_arrays(_offsets(ctx_len), pa.array(ctx)),
            pa.ListArray.from_arrays(seg_offsets, pa.array(resp_vals[seg])),
            pa.ListArray.from_arrays(seg_offsets, pa.array(lp_vals[seg])),
            pa.ListArray.from_arrays(seg_offsets, pa.array(np.ones(len(seg), dtype=bool))),
            pa.array(reward[row]),
            pa.array(advantage[lo:hi]),
            pa.array(resp_len[row].astype(np.int32)),
            scored.column("finish_reason").take(take).combine_chunks(),
        ]
        batches.append(
            pa.RecordBatch.from_arrays(
                [a.cast(f.type) for a, f in zip(arrays, schema)], schema=schema
            )
        )
    return pa.Table.from_batches(batches, schema=schema)


def default_advantages(scored: pa.Table, lin: Lineage, m: Members, cfg: Config) -> np.ndarray:
    """The `grpo` estimator of stages/losses.py (group form for `group`, pair form for
    `truncate`/`eqlen`), scaled as `pair.scale_rewards` says."""
    reward = scored.column("reward").to_numpy()[m.row]
    return unit_advantages(
        reward,
        m.unit_id,
        lin.prompt[m.row],
        lin.track_id[m.row],
        np.full(len(m.row), cfg.pair.strategy),
        m.unit_size,
        estimator="grpo",
        scale=cfg.pair.scale_rewards,
        eps=cfg.pair.eps,
    )


def build_table(scored: pa.Table, cfg: Config) -> pa.Table:
    """The units of the strategy with their default advantage, as a `units` table."""
    lin = Lineage.of(scored)
    m = STRATEGIES.get(cfg.pair.strategy)(lin, cfg)
    return units_table(scored, m, cfg.pair.strategy, default_advantages(scored, lin, m, cfg))


def metrics(units: pa.Table, scored: pa.Table) -> dict:
    own = (
        pc.list_value_length(scored.column("response_ids")).to_numpy().astype(np.int64)
        - scored.column("own_start").to_numpy()
    )
    tokens_generated = int(own.sum())
    tokens_in_units = int(
        np.count_nonzero(pc.list_flatten(units.column("loss_mask")).to_numpy(zero_copy_only=False))
    )
    unit_id = units.column("unit_id").to_numpy()
    silent = zero_signal(units.column("reward").to_numpy(), unit_id)
    return {
        "units": len(np.unique(unit_id)),
        "members": units.num_rows,
        "tokens_in_units": tokens_in_units,
        "tokens_generated": tokens_generated,
        "effective_token_ratio": tokens_in_units / tokens_generated if tokens_generated else 0.0,
        "zero_signal_units": len(np.unique(unit_id[silent])),
    }


# The same on rows as Python dicts (`Table.to_pylist()` rows; tests, small in-memory uses).
def _rows_table(rows: list[dict]) -> pa.Table:
    fields = {f.name: f for f in schemas.SCORED.arrow()}
    return pa.Table.from_pylist(rows, schema=pa.schema([fields[n] for n in READS]))


def build_units(rows: list[dict], cfg: Config) -> list[dict]:
    return build_table(_rows_table(rows), cfg).to_pylist()


def summarize(units: list[dict], rows: list[dict]) -> dict:
    return metrics(pa.Table.from_pylist(units, schema=schemas.UNITS.arrow()), _rows_table(rows))


def run(inputs: dict[str, Path], out_dir: Path, cfg: Config, ctx) -> dict:
    path = inputs["scored"] / "scored.parquet"
    table = schemas.validate(pq.read_table(path), schemas.SCORED, path).select(list(READS))
    out_path = out_dir / "units.parquet"
    out = build_table(table, cfg)
    if out.num_rows == 0:
        raise schemas.SchemaError(
            f"file {path}: strategy {cfg.pair.strategy!r} built no units "
            "from these rollouts. Check generate.group_size and the data."
        )
    out = schemas.validate(out, schemas.UNITS, out_path)
    pq.write_table(out, out_path)
    return {"rows": out.num_rows, "metrics": metrics(out, table)}


STAGE = Stage(
    name="pair",
    version=1,
    inputs=("scored",),
    output="units",
    reads=lambda cfg: ("pair.*",),
    implementation=lambda cfg: f"pair.{cfg.pair.strategy}",
    run=run,
    module=__name__,
)
