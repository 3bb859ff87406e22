"""EqLen sample construction: engine lineage and pair strategies against docs/method.md.

Property tests drive the real lock-step engine with a scripted LM
(eqlen_testing/scripted_lm.py) over random length patterns and check invariants 1-3 with an
independent checker (eqlen_testing/invariants.py); hand-made cases pin the edge cases by name.
"""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eqlen_testing.invariants import check_rollouts, check_units
from eqlen_testing.scripted_lm import EOS, PAD, ScriptedLM, next_logprobs
from pipeline import config
from stages import hf_engine, pair


def cfg_with(*overrides):
    return config.load(None, list(overrides))


def to_rows(tracks, prompts, rewards):
    return [
        dict(t.row(prompts), reward=rewards[t.track_id % len(rewards)])
        for t in sorted(tracks, key=lambda t: t.track_id)
    ]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_prompts=st.integers(1, 3),
    half_group=st.integers(1, 2),
    rounds=st.integers(1, 4),
    max_new=st.integers(1, 8),
    eos_bias=st.floats(-2.0, 3.0),
    seed=st.integers(0, 2**31),
    prompt_len=st.integers(1, 4),
    rewards=st.lists(st.sampled_from([0.0, 1.0, 0.5]), min_size=1, max_size=6),
)
def test_engine_and_strategies_keep_invariants(
    n_prompts, half_group, rounds, max_new, eos_bias, seed, prompt_len, rewards
):
    rng = np.random.default_rng(seed)
    prompts = [
        rng.integers(2, 6, int(rng.integers(1, prompt_len + 1))).tolist() for _ in range(n_prompts)
    ]
    g = 2 * half_group
    tracks, stats = hf_engine.sample_tracks(
        ScriptedLM(eos_bias),
        prompts,
        group_size=g,
        rounds=rounds,
        max_new_tokens=max_new,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        eos_id=EOS,
        pad_id=PAD,
        generator=torch.Generator().manual_seed(seed),
    )
    rows = to_rows(tracks, prompts, rewards)
    check_rollouts(rows, rounds=rounds, max_new_tokens=max_new, eos_id=EOS)
    assert sum(r["birth_round"] == 0 for r in rows) == n_prompts * g
    assert stats.generated_tokens == sum(len(r["response_ids"]) - r["own_start"] for r in rows)

    # Every recorded log-prob is the model's, recomputed from the full context: in particular
    # a newcomer's own tokens were sampled from prompt + survivor prefix (the KV copy).
    for r in rows:
        for j, (tok, lp) in enumerate(zip(r["response_ids"], r["logprobs"])):
            expect = next_logprobs(r["prompt_ids"] + r["response_ids"][:j], eos_bias)[tok]
            assert abs(float(expect) - lp) < 1e-5

    # Refill rule: a round whose tracks differ in length has a successor iff budget remains.
    by_pair = {}
    for r in rows:
        by_pair.setdefault(r["pair_id"], []).append(r)
    for ts in by_pair.values():
        a, b = [t for t in ts if t["birth_round"] == 0]
        rnd = 0
        while True:
            la, lb = len(a["response_ids"]), len(b["response_ids"])
            surv = a if la > lb else b
            nxt = [
                t
                for t in ts
                if t["parent_track_id"] == surv["track_id"] and t["birth_round"] == rnd + 1
            ]
            if la == lb or rnd + 1 >= rounds:
                assert not nxt
                break
            assert len(nxt) == 1
            a, b, rnd = surv, nxt[0], rnd + 1

    for name in ("group", "truncate", "eqlen"):
        cfg = cfg_with(f"pair.strategy={name}")
        units = pair.build_units(rows, cfg)
        check_units(rows, units, pair.summarize(units, rows), strategy=name)

    # EqLen leaves untrained only the survivor's tail once the round budget is spent.
    units = pair.build_units(rows, cfg_with("pair.strategy=eqlen"))
    trained = {}
    for u in units:
        trained.setdefault(u["track_id"], set()).update(
            range(u["offset"], u["offset"] + u["segment_len"])
        )
    for r in rows:
        got = trained.get(r["track_id"], set())
        own = set(range(r["own_start"], len(r["response_ids"])))
        assert got <= own
        rest = sorted(own - got)
        assert rest == list(range(len(r["response_ids"]) - len(rest), len(r["response_ids"]))), (
            "untrained tokens form a tail"
        )
        if rounds == 1:
            continue
    if rounds >= 2:
        # With rounds left, only pairs that used their whole budget leave tokens untrained.
        for ts in by_pair.values():
            untrained = sum(
                len(t["response_ids"]) - t["own_start"] - len(trained.get(t["track_id"], ()))
                for t in ts
            )
            if untrained:
                assert sum(t["birth_round"] > 0 for t in ts) == rounds - 1


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
        "logprobs": [-0.5] * len(resp),
        "finish_reason": "eos" if resp[-1] == EOS else "length",
        "reward": reward,
    }


def test_both_tracks_end_on_the_same_step_gives_one_unit():
    rows = [R(0, 0, [3, 4, EOS], 1.0), R(1, 0, [4, 3, EOS], 0.0)]
    units = pair.build_units(rows, cfg_with("pair.strategy=eqlen", "pair.scale_rewards=none"))
    assert len(units) == 2 and {u["segment_len"] for u in units} == {3}
    assert [u["advantage"] for u in units] == [1.0, -1.0]
    check_units(rows, units, pair.summarize(units, rows), strategy="eqlen")


def test_first_token_end_then_inheritance_and_budget_spent():
    """Track 0 ends at its first token (EOS). Survivor 1 = [3,4,5,6,EOS]; newcomer 2 inherits
    [3] (own_start 1) and ends [3,5,EOS]; round 1 compares 1[1:3] with 2[1:3]; survivor 1 goes
    on, newcomer 3 would be round 2 but rounds=2: 1's tail [6, EOS] stays masked.
    Units: (0:[EOS] vs 1:[3]) , (1:[4,5] vs 2:[5,EOS]).  trained 1+1+2+2 = 6 of 1+5+2 = 8."""
    rows = [
        R(0, 0, [EOS], 0.0),
        R(1, 0, [3, 4, 5, 6, EOS], 1.0),
        R(2, 0, [3, 5, EOS], 0.0, parent=1, birth=1, own=1),
    ]
    units = pair.build_units(rows, cfg_with("pair.strategy=eqlen", "pair.scale_rewards=none"))
    segs = [(u["track_id"], u["offset"], u["segment_ids"], u["round"]) for u in units]
    assert segs == [(0, 0, [EOS], 0), (1, 0, [3], 0), (1, 1, [4, 5], 1), (2, 1, [5, EOS], 1)]
    assert units[2]["context_ids"] == units[3]["context_ids"] == [7, 8, 3]
    assert [u["advantage"] for u in units] == [-1.0, 1.0, 1.0, -1.0]
    m = pair.summarize(units, rows)
    assert (m["tokens_in_units"], m["tokens_generated"]) == (6, 8)
    assert m["effective_token_ratio"] == pytest.approx(0.75)
    check_units(rows, units, m, strategy="eqlen")
    t = pair.build_units(rows, cfg_with("pair.strategy=truncate"))
    assert [u["segment_len"] for u in t] == [1, 1]


def test_track_reaching_max_new_tokens_and_equal_rewards_carry_no_signal():
    """max_new_tokens=4: track 1 is cut at 4 tokens ('length'). Equal rewards: zero
    advantage, counted as zero-signal units, still kept."""
    rows = [
        R(0, 0, [3, EOS], 1.0),
        R(1, 0, [3, 4, 5, 6], 1.0),
        R(2, 0, [3, 4, 5, EOS], 1.0, parent=1, birth=1, own=2),
    ]
    units = pair.build_units(rows, cfg_with("pair.strategy=eqlen"))
    assert all(u["advantage"] == 0.0 for u in units)
    m = pair.summarize(units, rows)
    assert m["units"] == 2 and m["zero_signal_units"] == 2
    assert m["tokens_in_units"] == m["tokens_generated"] == 2 + 4 + 2  # own tokens, all in units
    check_units(rows, units, m, strategy="eqlen")


def test_grpo_scaling_by_prompt_reward_std():
    """Round-0 rewards of the prompt: 1, 0, 1, 1 -> unbiased std = 0.5; pair (1, 0) gets
    +-(1 - 0) / (0.5 + 1e-4)."""
    rows = [
        R(0, 0, [3, EOS], 1.0),
        R(1, 0, [4, EOS], 0.0),
        R(2, 1, [3, EOS], 1.0),
        R(3, 1, [3, EOS], 1.0),
    ]
    units = pair.build_units(rows, cfg_with("pair.strategy=eqlen"))
    assert units[0]["advantage"] == pytest.approx(1 / 0.5001)
    assert units[1]["advantage"] == pytest.approx(-1 / 0.5001)
    assert units[2]["advantage"] == units[3]["advantage"] == 0.0


def test_group_advantages_by_hand():
    """Group rewards 1, 0, 0, 1: mean 0.5, unbiased std = sqrt(1/3) = 0.57735;
    A = +-0.5 / (0.57735 + 1e-4) = +-0.86588; with scale_rewards=none: +-0.5."""
    rows = [R(i, i // 2, [3, EOS], r) for i, r in enumerate([1.0, 0.0, 0.0, 1.0])]
    units = pair.build_units(rows, cfg_with("pair.strategy=group"))
    assert [u["advantage"] for u in units] == pytest.approx(
        [0.86588, -0.86588, -0.86588, 0.86588], abs=1e-4
    )
    units = pair.build_units(rows, cfg_with("pair.strategy=group", "pair.scale_rewards=none"))
    assert [u["advantage"] for u in units] == pytest.approx([0.5, -0.5, -0.5, 0.5])
