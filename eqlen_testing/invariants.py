"""An independent checker of docs/method.md invariants 1-3 on rollouts and units rows.

Written from the design text, not from stages/pair.py, so it can catch the pair stage
disagreeing with the definition. Rows are dicts (as `Table.to_pylist()` gives them).
"""

from __future__ import annotations

from collections import defaultdict


def check_rollouts(rollouts: list[dict], *, rounds: int, max_new_tokens: int, eos_id: int):
    by_id = {r["track_id"]: r for r in rollouts}
    born = defaultdict(int)
    for r in rollouts:
        resp = r["response_ids"]
        assert 1 <= len(resp) <= max_new_tokens, r
        assert len(r["logprobs"]) == len(resp)
        ends_eos = resp[-1] == eos_id
        assert r["finish_reason"] == ("eos" if ends_eos else "length"), r
        if not ends_eos:
            assert len(resp) == max_new_tokens
        assert eos_id not in resp[:-1], "a track goes on after EOS"
        if r["parent_track_id"] is None:
            assert r["birth_round"] == 0 and r["own_start"] == 0
        else:
            parent = by_id[r["parent_track_id"]]
            assert parent["pair_id"] == r["pair_id"] and parent["prompt_id"] == r["prompt_id"]
            k = r["own_start"]
            assert 1 <= k < len(resp)
            assert resp[:k] == parent["response_ids"][:k], "inherited prefix is the survivor's"
            assert r["logprobs"][:k] == parent["logprobs"][:k]
            assert r["birth_round"] >= 1
            born[r["pair_id"]] += 1
    for pair, n in born.items():
        assert n <= rounds - 1, f"pair {pair}: {n} newcomers with rounds={rounds}"


def check_units(
    rollouts: list[dict], units: list[dict], metrics: dict | None = None, *, strategy: str
):
    tracks = {r["track_id"]: r for r in rollouts}
    by_unit = defaultdict(list)
    seen: dict[tuple[int, int], int] = {}
    for u in units:
        t = tracks[u["track_id"]]
        resp, off, m = t["response_ids"], u["offset"], u["segment_len"]
        assert m >= 1 and len(u["segment_ids"]) == m == len(u["old_logprobs"]) == len(
            u["loss_mask"]
        )
        assert u["segment_ids"] == resp[off : off + m], "segment is the slice it claims"
        assert u["old_logprobs"] == t["logprobs"][off : off + m]
        assert u["context_ids"] == t["prompt_ids"] + resp[:off], "context = prompt + prefix"
        assert u["reward"] == t["reward"]
        for j, keep in enumerate(u["loss_mask"]):
            if keep:
                pos = off + j
                assert pos >= t["own_start"], "an inherited token enters the loss"
                assert (t["track_id"], pos) not in seen, "a token enters the loss twice"
                seen[(t["track_id"], pos)] = u["unit_id"]
        by_unit[u["unit_id"]].append(u)
    for members in by_unit.values():
        if strategy in ("eqlen", "truncate"):
            assert len(members) == 2
            a, b = members
            assert a["segment_len"] == b["segment_len"], "invariant 1: equal lengths"
            assert a["context_ids"] == b["context_ids"], "invariant 1: same context"
            assert a["offset"] == b["offset"]
            assert abs(a["advantage"] + b["advantage"]) < 1e-9
            if a["reward"] == b["reward"]:
                assert a["advantage"] == 0
    own = sum(len(r["response_ids"]) - r["own_start"] for r in rollouts)
    if metrics is not None:
        assert metrics["tokens_in_units"] == len(seen)
        assert metrics["tokens_generated"] == own
        assert abs(metrics["effective_token_ratio"] - len(seen) / own) < 1e-12
        assert metrics["units"] == len(by_unit)
        zero = sum(len({m["reward"] for m in ms}) == 1 for ms in by_unit.values())
        assert metrics["zero_signal_units"] == zero
    return len(seen), own
