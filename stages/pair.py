"""Stage 3, pair: build comparison units from scored rollouts.

A comparison unit is the set of segments whose rewards are compared with each other. The
strategy (`pair.strategy`, a registry) decides what they are:

- `group`: the ordinary GRPO group — one unit per prompt whose members are its round-0
  tracks, whole responses of unequal length. Default advantage: GRPO's
  (R - mean) / (std + eps) over the group (`std` unbiased, as TRL and verl compute it;
  `pair.scale_rewards=none` leaves R - mean).

- `truncate`: the post-hoc end of the framework. Each pair's two round-0 tracks are cut to
  their common length m = min(|a|, |b|); the tails are masked (left out of the unit). Default
  advantage: the pair difference R_a - R_b (and R_b - R_a), divided by the std of the
  prompt's round-0 rewards + eps under `pair.scale_rewards=group`.
- `eqlen`: the full method (DESIGN.md section 2). The pair's lineage is replayed round by
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
swapping the strategy changes no schema (DESIGN.md invariant 4).

Metrics: `units`, `tokens_in_units` (loss-mask tokens), `tokens_generated` (tracks' own
tokens), `effective_token_ratio` (their quotient) and `zero_signal_units` (units whose
members all have equal rewards: kept, counted, they carry no gradient).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import schemas
from pipeline.config import Config
from pipeline.registry import Registry
from stages.losses import ADVANTAGES

NAME, VERSION = "pair", 1
INPUTS = ("scored",)
CODE_DEPS = (str(Path(__file__).with_name("losses.py")),)
STRATEGIES: Registry = Registry("pair strategy", "pair.strategy")


def implementation(cfg: Config) -> str:
    return f"pair.{cfg.pair.strategy}"


def key_config(cfg: Config, iteration: int) -> dict:
    return {"pair": vars(cfg.pair)}


def member(unit_id: int, strategy: str, rnd: int, idx: int, size: int, row: dict, offset: int,
           length: int, reward: float) -> dict:
    """One units row: the segment response_ids[offset:offset+length] of the track in `row`."""
    resp = row["response_ids"]
    return {
        "unit_id": unit_id, "prompt_id": row["prompt_id"], "strategy": strategy,
        "track_id": row["track_id"], "round": rnd, "member": idx, "unit_size": size,
        "offset": offset, "segment_len": length,
        "context_ids": list(row["prompt_ids"]) + list(resp[:offset]),
        "segment_ids": list(resp[offset:offset + length]),
        "old_logprobs": list(row["logprobs"][offset:offset + length]),
        "loss_mask": [True] * length,
        "reward": float(reward), "advantage": 0.0,  # set by default_advantages
        "response_len": len(resp), "finish_reason": row["finish_reason"],
    }


@STRATEGIES.register("group")
def group_units(rows: list[dict], cfg: Config) -> list[dict]:
    by_prompt: dict[str, list[dict]] = {}
    for r in rows:
        if r["birth_round"] == 0:
            by_prompt.setdefault(r["prompt_id"], []).append(r)
    out = []
    for unit_id, (_, members) in enumerate(sorted(by_prompt.items())):
        members.sort(key=lambda r: r["track_id"])
        for i, m in enumerate(members):
            out.append(member(unit_id, "group", 0, i, len(members), m, 0,
                              len(m["response_ids"]), m["reward"]))
    return out


def _pairs(rows: list[dict]) -> list[list[dict]]:
    by_pair: dict[int, list[dict]] = {}
    for r in rows:
        by_pair.setdefault(r["pair_id"], []).append(r)
    return [sorted(v, key=lambda r: r["track_id"]) for _, v in sorted(by_pair.items())]


def _pair_unit(unit_id: int, strategy: str, rnd: int, a: dict, b: dict, offset: int,
               length: int) -> list[dict]:
    return [member(unit_id, strategy, rnd, 0, 2, a, offset, length, a["reward"]),
            member(unit_id, strategy, rnd, 1, 2, b, offset, length, b["reward"])]


@STRATEGIES.register("truncate")
def truncate_units(rows: list[dict], cfg: Config) -> list[dict]:
    out = []
    for tracks in _pairs(rows):
        a, b = [t for t in tracks if t["birth_round"] == 0]
        m = min(len(a["response_ids"]), len(b["response_ids"]))
        out += _pair_unit(len(out) // 2, "truncate", 0, a, b, 0, m)
    return out


@STRATEGIES.register("eqlen")
def eqlen_units(rows: list[dict], cfg: Config) -> list[dict]:
    out = []
    for tracks in _pairs(rows):
        born = {(t["birth_round"], t["parent_track_id"]): t for t in tracks if t["birth_round"]}
        a, b = [t for t in tracks if t["birth_round"] == 0]
        offset, rnd = 0, 0
        while True:
            la, lb = len(a["response_ids"]), len(b["response_ids"])
            m = min(la, lb) - offset
            out += _pair_unit(len(out) // 2, "eqlen", rnd, a, b, offset, m)
            if la == lb:
                break  # both ended on the same step: the pair is done
            survivor = a if la > lb else b
            newcomer = born.get((rnd + 1, survivor["track_id"]))
            if newcomer is None:
                break  # round budget spent: the survivor's tail stays masked
            offset += m
            if newcomer["own_start"] != offset:
                raise schemas.SchemaError(
                    f"track {newcomer['track_id']}: own_start {newcomer['own_start']} but it "
                    f"inherited at offset {offset}; the rollouts' lineage is inconsistent")
            a, b, rnd = survivor, newcomer, rnd + 1
    return out


def build_units(rows: list[dict], cfg: Config) -> list[dict]:
    """The strategy's units with their default advantage: the `grpo` estimator of
    stages/losses.py (group form for `group`, pair form for `truncate`/`eqlen`), scaled as
    `pair.scale_rewards` says."""
    units = STRATEGIES.get(cfg.pair.strategy)(rows, cfg)
    if units:
        col = {k: np.array([u[k] for u in units]) for k in
               ("reward", "unit_id", "prompt_id", "round", "strategy", "unit_size")}
        pair_unit = (col["unit_size"] == 2) & np.isin(col["strategy"], ["truncate", "eqlen"])
        adv = ADVANTAGES.get("grpo")(col["reward"], col["unit_id"], col["prompt_id"],
                                     col["round"], pair_unit, scale=cfg.pair.scale_rewards,
                                     eps=cfg.pair.eps)
        for u, a in zip(units, adv):
            u["advantage"] = float(a)
    return units


def summarize(units: list[dict], rows: list[dict]) -> dict:
    tokens_generated = sum(len(r["response_ids"]) - r["own_start"] for r in rows)
    tokens_in_units = sum(sum(u["loss_mask"]) for u in units)
    rewards_by_unit: dict[int, set] = {}
    for u in units:
        rewards_by_unit.setdefault(u["unit_id"], set()).add(u["reward"])
    return {
        "units": len(rewards_by_unit),
        "members": len(units),
        "tokens_in_units": int(tokens_in_units),
        "tokens_generated": int(tokens_generated),
        "effective_token_ratio": tokens_in_units / tokens_generated if tokens_generated else 0.0,
        "zero_signal_units": sum(len(s) == 1 for s in rewards_by_unit.values()),
    }


def run(inputs: dict[str, Path], out_dir: Path, cfg: Config, ctx) -> dict:
    path = inputs["scored"] / "scored.parquet"
    table = schemas.validate(pq.read_table(path), schemas.SCORED, path)
    rows = table.select([c.name for c in schemas.SCORED.columns]).to_pylist()
    units = build_units(rows, cfg)
    out_path = out_dir / "units.parquet"
    if not units:
        raise schemas.SchemaError(f"file {path}: strategy {cfg.pair.strategy!r} built no units "
                                  "from these rollouts. Check generate.group_size and the data.")
    out = pa.Table.from_pylist(units, schema=schemas.UNITS.arrow())
    out = schemas.validate(out, schemas.UNITS, out_path)
    pq.write_table(out, out_path)
    return {"rows": out.num_rows, "metrics": summarize(units, rows)}
