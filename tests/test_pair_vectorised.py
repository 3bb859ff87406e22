"""The columnar pair stage and advantage estimators against the loops they replaced.

`ref_*` below is the pair stage as it was written first: a loop over rows as Python dicts,
slow (minutes on 1M rows) but obviously the definition of docs/method.md. The columnar
stage must give the same units: same rows, columns, values (advantages bit for bit) and
order, and the same metrics — on rollouts from the real lock-step engine (hypothesis), on
the benchmark's synthetic lineage (seeded) and on hand-made edge cases.
"""

from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import schemas
from eqlen_testing.invariants import check_units
from eqlen_testing.scripted_lm import EOS, PAD, ScriptedLM
from eqlen_testing.synthetic import synthetic_scored
from flows.runner import Context
from pipeline import config
from stages import hf_engine, losses, pair

# ----------------------------------------------------------------- reference: the dict loops


def ref_member(unit_id, strategy, rnd, idx, size, row, offset, length, reward):
    resp = row["response_ids"]
    return {
        "unit_id": unit_id,
        "prompt_id": row["prompt_id"],
        "strategy": strategy,
        "track_id": row["track_id"],
        "round": rnd,
        "member": idx,
        "unit_size": size,
        "offset": offset,
        "segment_len": length,
        "context_ids": list(row["prompt_ids"]) + list(resp[:offset]),
        "segment_ids": list(resp[offset : offset + length]),
        "old_logprobs": list(row["logprobs"][offset : offset + length]),
        "loss_mask": [True] * length,
        "reward": float(reward),
        "advantage": 0.0,
        "response_len": len(resp),
        "finish_reason": row["finish_reason"],
    }


def ref_group(rows):
    by_prompt = {}
    for r in rows:
        if r["birth_round"] == 0:
            by_prompt.setdefault(r["prompt_id"], []).append(r)
    out = []
    for unit_id, (_, members) in enumerate(sorted(by_prompt.items())):
        members.sort(key=lambda r: r["track_id"])
        for i, m in enumerate(members):
            out.append(
                ref_member(
                    unit_id, "group", 0, i, len(members), m, 0, len(m["response_ids"]), m["reward"]
                )
            )
    return out


def ref_pairs(rows):
    by_pair = {}
    for r in rows:
        by_pair.setdefault(r["pair_id"], []).append(r)
    return [sorted(v, key=lambda r: r["track_id"]) for _, v in sorted(by_pair.items())]


def ref_pair_unit(unit_id, strategy, rnd, a, b, offset, length):
    return [
        ref_member(unit_id, strategy, rnd, 0, 2, a, offset, length, a["reward"]),
        ref_member(unit_id, strategy, rnd, 1, 2, b, offset, length, b["reward"]),
    ]


def ref_truncate(rows):
    out = []
    for tracks in ref_pairs(rows):
        a, b = [t for t in tracks if t["birth_round"] == 0]
        m = min(len(a["response_ids"]), len(b["response_ids"]))
        out += ref_pair_unit(len(out) // 2, "truncate", 0, a, b, 0, m)
    return out


def ref_eqlen(rows):
    out = []
    for tracks in ref_pairs(rows):
        born = {(t["birth_round"], t["parent_track_id"]): t for t in tracks if t["birth_round"]}
        a, b = [t for t in tracks if t["birth_round"] == 0]
        offset, rnd = 0, 0
        while True:
            la, lb = len(a["response_ids"]), len(b["response_ids"])
            m = min(la, lb) - offset
            out += ref_pair_unit(len(out) // 2, "eqlen", rnd, a, b, offset, m)
            if la == lb:
                break
            survivor = a if la > lb else b
            newcomer = born.get((rnd + 1, survivor["track_id"]))
            if newcomer is None:
                break
            offset += m
            if newcomer["own_start"] != offset:
                raise schemas.SchemaError("lineage is inconsistent")
            a, b, rnd = survivor, newcomer, rnd + 1
    return out


def ref_prompt_std(rewards, prompt_id, track_id):
    """Unbiased std of each prompt's rewards, one per track (tracks in id order)."""
    out = {}
    for p in np.unique(prompt_id):
        sel = np.flatnonzero(prompt_id == p)
        first = {}
        for i in sel:
            first.setdefault(int(track_id[i]), i)
        v = rewards[[first[t] for t in sorted(first)]]
        out[p] = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
    return out


def ref_estimate(rewards, unit_id, prompt_id, track_id, pair_unit, *, scale, eps, loo):
    rewards = np.asarray(rewards, dtype=np.float64)
    adv = np.zeros_like(rewards)
    batch_std = float(np.std(rewards, ddof=1)) if len(rewards) > 1 else 0.0
    pstd = ref_prompt_std(rewards, prompt_id, track_id)
    for u in np.unique(unit_id):
        idx = np.flatnonzero(unit_id == u)
        r = rewards[idx]
        n = len(idx)
        if pair_unit[idx[0]]:
            centred = r - r[::-1]
            std = pstd[prompt_id[idx[0]]]
        elif loo:
            centred = (r - (r.sum() - r) / max(n - 1, 1)) if n > 1 else r * 0
            std = float(np.std(r, ddof=1)) if n > 1 else 0.0
        else:
            centred = r - r.mean()
            std = float(np.std(r, ddof=1)) if n > 1 else 0.0
        denom = std + eps if scale == "group" else batch_std + eps
        if scale != "none":
            centred = centred / denom if denom > 0 else centred * 0
        adv[idx] = centred
    return adv


REF = {"group": ref_group, "truncate": ref_truncate, "eqlen": ref_eqlen}


def ref_build_units(rows, cfg):
    units = REF[cfg.pair.strategy](rows)
    if units:
        col = {
            k: np.array([u[k] for u in units])
            for k in ("reward", "unit_id", "prompt_id", "track_id", "strategy", "unit_size")
        }
        pair_unit = (col["unit_size"] == 2) & np.isin(col["strategy"], ["truncate", "eqlen"])
        adv = ref_estimate(
            col["reward"],
            col["unit_id"],
            col["prompt_id"],
            col["track_id"],
            pair_unit,
            scale=cfg.pair.scale_rewards,
            eps=cfg.pair.eps,
            loo=False,
        )
        for u, a in zip(units, adv):
            u["advantage"] = float(a)
    return units


def ref_summarize(units, rows):
    tokens_generated = sum(len(r["response_ids"]) - r["own_start"] for r in rows)
    tokens_in_units = sum(sum(u["loss_mask"]) for u in units)
    rewards_by_unit = defaultdict(set)
    for u in units:
        rewards_by_unit[u["unit_id"]].add(u["reward"])
    return {
        "units": len(rewards_by_unit),
        "members": len(units),
        "tokens_in_units": int(tokens_in_units),
        "tokens_generated": int(tokens_generated),
        "effective_token_ratio": tokens_in_units / tokens_generated if tokens_generated else 0.0,
        "zero_signal_units": sum(len(s) == 1 for s in rewards_by_unit.values()),
    }


# ----------------------------------------------------------------- comparison


def cfg_with(strategy, scale="group"):
    return config.load(None, [f"pair.strategy={strategy}", f"pair.scale_rewards={scale}"])


def assert_same(rows, strategy, scale="group"):
    """The columnar stage equals the reference on `rows`: table, metrics, bits of advantages."""
    cfg = cfg_with(strategy, scale)
    ref = ref_build_units(rows, cfg)
    table = pair.build_table(pair._rows_table(rows), cfg)
    want = pa.Table.from_pylist(ref, schema=schemas.UNITS.arrow())
    assert table.schema.equals(want.schema)
    for name in want.column_names:  # column by column, so a failure names the column
        assert table.column(name).combine_chunks().equals(want.column(name).combine_chunks()), name
    adv = table.column("advantage").to_numpy()
    assert adv.tobytes() == want.column("advantage").to_numpy().tobytes()
    assert pair.metrics(table, pair._rows_table(rows)) == ref_summarize(ref, rows)
    assert pair.summarize(pair.build_units(rows, cfg), rows) == ref_summarize(ref, rows)
    return ref


def engine_rows(seed, n_prompts, group, rounds, max_new, eos_bias, rewards, ids):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(2, 6, int(rng.integers(1, 4))).tolist() for _ in range(n_prompts)]
    tracks, _ = hf_engine.sample_tracks(
        ScriptedLM(eos_bias),
        prompts,
        group_size=group,
        rounds=rounds,
        max_new_tokens=max_new,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        eos_id=EOS,
        pad_id=PAD,
        generator=torch.Generator().manual_seed(seed),
    )
    order = rng.permutation(len(tracks))  # the stage must not depend on row order
    return [
        dict(
            tracks[i].row(prompts),
            prompt_id=ids[tracks[i].prompt_index % len(ids)],
            reward=rewards[tracks[i].track_id % len(rewards)],
        )
        for i in order
    ]


PROMPT_IDS = ["9", "10", "a", "B", "é", "ab", "", "z9", "Z", "10a"]  # orders unlike numbers


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31),
    n_prompts=st.integers(1, 4),
    half_group=st.integers(1, 3),
    rounds=st.sampled_from([1, 2, 4]),
    max_new=st.integers(1, 8),
    eos_bias=st.floats(-2.0, 3.0),
    rewards=st.lists(
        st.one_of(
            st.sampled_from([0.0, 1.0, 0.5]),
            st.floats(-10, 10, allow_nan=False, allow_subnormal=False),
        ),
        min_size=1,
        max_size=9,
    ),
    ids=st.permutations(PROMPT_IDS),
)
def test_engine_rollouts_give_the_reference_units(
    seed, n_prompts, half_group, rounds, max_new, eos_bias, rewards, ids
):
    rows = engine_rows(seed, n_prompts, 2 * half_group, rounds, max_new, eos_bias, rewards, ids)
    for strategy in ("group", "truncate", "eqlen"):
        for scale in ("group", "none"):
            ref = assert_same(rows, strategy, scale)
        check_units(rows, ref, ref_summarize(ref, rows), strategy=strategy)


@pytest.mark.parametrize(
    "seed,rounds,group,max_new",
    [(0, 1, 8, 64), (1, 2, 4, 8), (2, 4, 8, 4), (3, 4, 2, 2), (4, 8, 6, 16), (5, 3, 16, 1)],
)
def test_synthetic_lineage_gives_the_reference_units(seed, rounds, group, max_new):
    table = synthetic_scored(
        1500, rounds=rounds, group_size=group, max_new_tokens=max_new, seed=seed
    )
    rows = table.select(list(pair.READS)).to_pylist()
    rng = np.random.default_rng(seed)
    float_rewards = [dict(r, reward=float(np.round(rng.normal(), 3))) for r in rows]
    for strategy in ("group", "truncate", "eqlen"):
        assert_same(rows, strategy)
        assert_same(float_rewards, strategy)


def R(track_id, pair_id, resp, reward, parent=None, birth=0, own=0, prompt="a"):
    return {
        "prompt_id": prompt,
        "prompt_ids": [7, 8],
        "pair_id": pair_id,
        "track_id": track_id,
        "parent_track_id": parent,
        "birth_round": birth,
        "own_start": own,
        "response_ids": resp,
        "logprobs": [-0.25 * i for i in range(len(resp))],
        "finish_reason": "eos" if resp and resp[-1] == EOS else "length",
        "reward": reward,
    }


EDGE_CASES = {
    "same-step ends, equal rewards": [R(0, 0, [3, EOS], 1.0), R(1, 0, [4, EOS], 1.0)],
    "empty responses": [
        R(0, 0, [], 0.0),
        R(1, 0, [], 1.0),
        R(2, 1, [3, EOS], 0.0),
        R(3, 1, [], 0.0),
    ],
    "one prompt, one member": [R(0, 0, [3, EOS], 1.0, prompt="b")],
    "survivor at max length, budget spent": [
        R(0, 0, [3, EOS], 1.0),
        R(1, 0, [3, 4, 5, 6], 0.0),
        R(2, 0, [3, 4, EOS], 1.0, parent=1, birth=1, own=2),
    ],
    "four rounds, survivor switches": [
        R(10, 5, [EOS], 0.0),
        R(11, 5, [3, 4, 5, 6, 7, 8, EOS], 1.0),
        R(12, 5, [3, 4, 5, 6, 7, 8, 9, 9, EOS], 0.5, parent=11, birth=1, own=1),
        R(13, 5, [3, 4, 5, 6, 7, 8, 9, 9, 9, EOS], 0.5, parent=12, birth=2, own=7),
        R(14, 5, [3, 4, 5, 6, 7, 8, 9, 9, 9, 9, EOS], 0.0, parent=13, birth=3, own=9),
        R(1, 7, [3, EOS], 1.0, prompt="B"),
        R(0, 7, [3, 4, EOS], 0.0, prompt="B"),
    ],
    "newcomer whose parent is missing is ignored": [
        R(0, 0, [EOS], 0.0),
        R(1, 0, [3, 4, EOS], 1.0),
        R(2, 0, [3, 4, EOS], 1.0, parent=99, birth=1, own=1),
    ],
}


@pytest.mark.parametrize("name", list(EDGE_CASES))
@pytest.mark.parametrize("strategy", ["group", "truncate", "eqlen"])
def test_edge_cases_give_the_reference_units(name, strategy):
    rows = EDGE_CASES[name]
    try:
        ref_build_units(rows, cfg_with(strategy))
    except ValueError:  # the loop fails on a pair without two round-0 tracks (an unpacking
        with pytest.raises(schemas.SchemaError, match="round-0 tracks"):  # error); we name it
            pair.build_units(rows, cfg_with(strategy))
        return
    assert_same(rows, strategy)
    assert_same(rows, strategy, "none")


def test_inconsistent_lineage_fails_naming_the_track():
    rows = [
        R(0, 0, [EOS], 0.0),
        R(1, 0, [3, 4, EOS], 1.0),
        R(2, 0, [3, 4, EOS], 1.0, parent=1, birth=1, own=2),
    ]  # inherited at 1, not 2
    with pytest.raises(
        schemas.SchemaError, match="track 2: own_start 2 but it inherited at offset 1"
    ):
        pair.build_units(rows, cfg_with("eqlen"))
    with pytest.raises(schemas.SchemaError, match="pair 0: 3 round-0 tracks"):
        pair.build_units(rows[:2] + [R(3, 0, [3, EOS], 0.0)], cfg_with("truncate"))
    with pytest.raises(schemas.SchemaError, match="track_id 1 appears more than once"):
        pair.build_units(rows + [R(1, 1, [3, EOS], 0.0), R(4, 1, [EOS], 0.0)], cfg_with("eqlen"))


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 9), min_size=1, max_size=30),
    seed=st.integers(0, 2**31),
    n_prompts=st.integers(1, 5),
    scale=st.sampled_from(["group", "batch", "none"]),
    loo=st.booleans(),
    ties=st.booleans(),
)
def test_advantage_estimators_equal_the_loop_over_units(sizes, seed, n_prompts, scale, loo, ties):
    """Units of every size in any order (also as update gets them, prompt ids as strings),
    pair flag decided by the unit's first member: the bits of the loop over units."""
    rng = np.random.default_rng(seed)
    unit_id = rng.permutation(np.repeat(rng.permutation(len(sizes)) * 7 - 3, sizes))
    n = len(unit_id)
    # Members share tracks (an EqLen survivor is in several units): one reward per track.
    track_id = rng.integers(0, max(1, n // 2), n)
    per_track = rng.integers(0, 2, n).astype(float) if ties else rng.normal(size=n) * 10
    rewards = per_track[track_id]
    prompt_id = np.array([f"p{i}" for i in rng.integers(0, n_prompts, n)])
    pair_unit = rng.random(n) < 0.5
    got = losses._estimate(
        rewards, unit_id, prompt_id, track_id, pair_unit, scale=scale, eps=1e-4, loo=loo
    )
    want = ref_estimate(
        rewards, unit_id, prompt_id, track_id, pair_unit, scale=scale, eps=1e-4, loo=loo
    )
    assert got.tobytes() == want.tobytes()


def test_stage_run_in_small_batches_writes_the_reference(tmp_path, monkeypatch):
    """The real stage through Parquet, its output cut into many record batches."""
    table = synthetic_scored(800, rounds=4, group_size=4, max_new_tokens=12, seed=7)
    (tmp_path / "scored").mkdir()
    pq.write_table(table, tmp_path / "scored" / "scored.parquet")
    rows = table.select(list(pair.READS)).to_pylist()
    monkeypatch.setattr(pair, "CHUNK_TOKENS", 97)
    for strategy in ("group", "truncate", "eqlen"):
        out = tmp_path / strategy
        out.mkdir()
        result = pair.run({"scored": tmp_path / "scored"}, out, cfg_with(strategy), Context(0))
        ref = ref_build_units(rows, cfg_with(strategy))
        got = pq.read_table(out / "units.parquet")
        assert got.equals(pa.Table.from_pylist(ref, schema=schemas.UNITS.arrow()))
        assert result == {"rows": len(ref), "metrics": ref_summarize(ref, rows)}
