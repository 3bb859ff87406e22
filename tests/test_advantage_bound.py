"""Pair-unit advantages are bounded (issue: they exploded to +-8000 with shaped rewards).

The GRPO pair form divides R_l - R_r by the std of *all* the prompt's rewards, one per
track (docs/method.md). Both R_l and R_r are among those n rewards, and the sum of squared
deviations of n numbers two of which differ by d is at least d^2 / 2 (the other n - 2 at
the mean, the two at +-d/2), so with the unbiased std s: d^2 / 2 <= (n - 1) s^2, i.e.

    |A| = |R_l - R_r| / (s + eps) < sqrt(2 (n - 1)).
"""

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from test_pair_vectorised import R

from eqlen_testing.scripted_lm import EOS
from pipeline import config
from stages import losses, pair
from stages.update import advantages as update_advantages

REWARD_KINDS = {
    "binary": [0.0, 1.0],
    "shaped": [0.0, 0.2, 1.0],
    "all-equal": [0.2],
}


@st.composite
def prompts_with_pair_units(draw):
    """Prompts of 2..16 tracks with rewards of one kind (ties, all-equal round 0, shaped,
    binary, continuous); each unit pairs two tracks of its prompt, and a track may sit in
    several units, as an EqLen survivor does."""
    rewards, unit_id, prompt_id, track_id, n_tracks = [], [], [], [], {}
    next_track, next_unit = 0, 0
    for p in range(draw(st.integers(1, 4))):
        n = draw(st.integers(2, 16))
        kind = draw(st.sampled_from([*REWARD_KINDS, "continuous", "round-0 ties"]))
        if kind == "continuous":
            r = [round(x, 3) for x in draw(st.lists(st.floats(-5, 5), min_size=n, max_size=n))]
        elif kind == "round-0 ties":  # every track but the last ties; the last differs
            r = [0.2] * (n - 1) + [draw(st.sampled_from([0.0, 1.0]))]
        else:
            r = draw(st.lists(st.sampled_from(REWARD_KINDS[kind]), min_size=n, max_size=n))
        tracks = list(range(next_track, next_track + n))
        next_track += n
        n_tracks[f"q{p}"] = n
        for _ in range(draw(st.integers(1, 3 * n))):
            a, b = draw(st.lists(st.sampled_from(range(n)), min_size=2, max_size=2, unique=True))
            for t in (a, b):
                rewards.append(r[t])
                unit_id.append(next_unit)
                prompt_id.append(f"q{p}")
                track_id.append(tracks[t])
            next_unit += 1
    return (np.array(rewards), np.array(unit_id), np.array(prompt_id), np.array(track_id), n_tracks)


@settings(max_examples=300, deadline=None)
@given(data=prompts_with_pair_units(), eps=st.sampled_from([0.0, 1e-4, 1e-2]))
def test_pair_advantage_is_bounded_by_sqrt_2_n_minus_1(data, eps):
    rewards, unit_id, prompt_id, track_id, n_tracks = data
    pair_unit = np.ones(len(rewards), dtype=bool)
    adv = losses.ADVANTAGES.get("grpo")(
        rewards, unit_id, prompt_id, track_id, pair_unit, scale="group", eps=eps
    )
    bound = np.array([math.sqrt(2 * (n_tracks[p] - 1)) for p in prompt_id])
    assert np.all(np.isfinite(adv))
    assert np.all(np.abs(adv) <= bound * (1 + 1e-12))
    # Equal rewards in a unit (ties, all-equal prompts) give exactly 0, never 0/0.
    partner = {}
    for i, u in enumerate(unit_id):
        partner.setdefault(u, []).append(i)
    for members in partner.values():
        a, b = members
        if rewards[a] == rewards[b]:
            assert adv[a] == 0 and adv[b] == 0
        else:
            assert adv[a] == -adv[b] and np.sign(adv[a]) == np.sign(rewards[a] - rewards[b])


def test_shaped_rewards_with_tied_round_zero_stay_bounded():
    """The reported case: every round-0 track of the prompt scores 0.2 ("some number"), a
    round-1 newcomer scores 1.0 (the right one). Tracks 0, 1 | 3, 4 (round 0) and 2, born in
    round 1 from survivor 1. Rewards one per track: 0.2, 0.2, 1.0, 0.2, 0.2 -> mean 0.36,
    sum of squared deviations 4 * 0.16^2 + 0.64^2 = 0.512, unbiased std sqrt(0.128) =
    0.357771. Round-1 unit (survivor 1 vs newcomer 2): A = (0.2 - 1.0) / (0.357771 + 1e-4)
    = -2.23545 and +2.23545; every other unit ties: 0. The round-0 std was 0, which gave
    -0.8 / 1e-4 = -8000."""
    rows = [
        R(0, 0, [EOS], 0.2),
        R(1, 0, [3, 4, EOS], 0.2),
        R(2, 0, [3, 5, EOS], 1.0, parent=1, birth=1, own=1),
        R(3, 1, [3, EOS], 0.2),
        R(4, 1, [4, EOS], 0.2),
    ]
    cfg = config.load(
        None, ["pair.strategy=eqlen", "generate.rounds=4", "update.loss_agg=unit_mean"]
    )
    units = pair.build_units(rows, cfg)
    got = {(u["round"], u["track_id"]): u["advantage"] for u in units}
    assert abs(got[(1, 1)] + 2.23545) < 1e-5
    assert abs(got[(1, 2)] - 2.23545) < 1e-5
    assert all(a == 0 for (rnd, _), a in got.items() if rnd == 0)
    assert max(abs(a) for a in got.values()) < math.sqrt(2 * 4)
    # The update recomputes advantages with the same estimator (update.advantage=auto).
    cols = {k: [u[k] for u in units] for k in units[0]}
    again = update_advantages(cols, cfg)
    np.testing.assert_allclose(again, [u["advantage"] for u in units], rtol=0, atol=1e-12)
