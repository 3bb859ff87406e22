"""Update-stage math: hand-worked weights, losses and advantages; gradient-level checks of
every aggregation; exact gradient accumulation; zero-signal skipping."""

import itertools
import math

import numpy as np
import pytest
import torch

from pipeline import config
from pipeline.models import load_policy
from stages import losses
from stages.update import lr_at, minibatch_backward, segment_logprobs, zero_signal

MASK = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)  # lengths 2 and 4
UNIT = torch.tensor([0, 1])


def agg(name, mask=MASK, unit=UNIT, **kw):
    return losses.LOSS_AGGS.get(name)(
        mask, unit, max_new_tokens=kw.get("L", 8), alpha=kw.get("alpha", 1.0)
    )


def rows(*vals):
    return torch.tensor([list(v) for v in vals], dtype=torch.float32)


@pytest.mark.parametrize(
    "name, expected, kw",
    [
        # B=2 members of lengths 2, 4.
        ("seq_mean_token_mean", rows([1 / 4] * 2 + [0, 0], [1 / 8] * 4), {}),  # 1/(B|o|)
        ("token_mean", rows([1 / 6] * 2 + [0, 0], [1 / 6] * 4), {}),  # 1/sum|o| = 1/6
        ("seq_mean_token_sum_norm", rows([1 / 16] * 2 + [0, 0], [1 / 16] * 4), {}),  # 1/(B*8)
        # |o|^-1 = 1/2, 1/4, sum 3/4 -> 2/3 and 1/3 per token.
        ("delta_l", rows([2 / 3] * 2 + [0, 0], [1 / 3] * 4), {}),
        # alpha 0.5: 0.70711, 0.5, sum 1.20711 -> 0.58579, 0.41421.
        ("delta_l", rows([0.58579] * 2 + [0, 0], [0.41421] * 4), {"alpha": 0.5}),
        # two units of one member each: U=2, unit tokens 2 and 4 -> 1/4, 1/8.
        ("unit_mean", rows([1 / 4] * 2 + [0, 0], [1 / 8] * 4), {}),
        ("token_sum_norm", rows([1 / 16] * 2 + [0, 0], [1 / 16] * 4), {}),  # 1/(U*8)
    ],
)
def test_aggregation_weights_by_hand(name, expected, kw):
    torch.testing.assert_close(agg(name, **kw), expected, atol=1e-5, rtol=0)


def test_unit_mean_with_shared_units_by_hand():
    """Members of lengths 2, 2 in unit 0 and 3 in unit 1: U=2, unit 0 has 4 tokens ->
    1/8 each, unit 1 has 3 tokens -> 1/6 each."""
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    w = agg("unit_mean", mask, torch.tensor([0, 0, 1]))
    torch.testing.assert_close(w, rows([1 / 8] * 2 + [0], [1 / 8] * 2 + [0], [1 / 6] * 3))


def test_grpo_clipped_surrogate_and_dual_clip_by_hand():
    """ratio 1.5, clip 0.2: A=+1 -> max(-1.5, -1.2) = -1.2 (clipped high); A=-1 ->
    max(1.5, 1.2) = 1.5. ratio 5, A=-1, dual clip c=3: max(5, 1.2) = 5 -> min(5, 3) = 3."""
    logp = torch.tensor([[math.log(1.5)], [math.log(1.5)], [math.log(5.0)]])
    adv = torch.tensor([1.0, -1.0, -1.0])
    mask = torch.ones(3, 1, dtype=torch.bool)
    loss, st = losses.ALGORITHMS.get("grpo")(
        logp, torch.zeros(3, 1), adv, mask, clip_low=0.2, clip_high=0.2, dual_clip=3.0
    )
    torch.testing.assert_close(loss, torch.tensor([[-1.2], [1.5], [3.0]]))
    assert st["clipfrac_high"] == pytest.approx(1 / 3) and st["clipfrac_low"] == 0


def test_gspo_sequence_ratio_is_exp_mean_log_ratio():
    """log-ratios ln 2 and 0 over two tokens (third masked): s = exp(ln2 / 2) = sqrt 2.
    Clip 0.2, A=+1: loss = max(-1.41421, -1.2) = -1.2 on every loss token."""
    logp = torch.tensor([[math.log(2.0), 0.0, 5.0]])
    mask = torch.tensor([[True, True, False]])
    s = losses.sequence_ratio(logp, torch.zeros(1, 3), mask)
    assert float(s) == pytest.approx(math.sqrt(2))
    loss, _ = losses.ALGORITHMS.get("gspo")(
        logp, torch.zeros(1, 3), torch.tensor([1.0]), mask, clip_low=0.2, clip_high=0.2
    )
    assert loss[0, :2].tolist() == pytest.approx([-1.2, -1.2])


def test_k3_kl_by_hand():
    """d = ref - logp = ln 2: exp(d) - d - 1 = 2 - 0.693147 - 1 = 0.306853; d = 0 -> 0."""
    kl = losses.k3_kl(torch.tensor([0.0, 0.3]), torch.tensor([math.log(2.0), 0.3]))
    assert kl.tolist() == pytest.approx([0.306853, 0.0], abs=1e-6)


@pytest.mark.parametrize("name", losses.LOSS_AGGS.names())
@pytest.mark.parametrize("algo", losses.ALGORITHMS.names())
def test_per_token_gradient_weight_matches_the_formula(name, algo):
    """At ratio 1, d loss / d logp[b,t] = -A_b * w[b,t] for the token-level surrogates. For
    gspo the sequence loss sits on every token: d/d logp[b,t] = -A_b * (sum_t' w[b,t']) /
    |o_b|; luspo scales that by |o_b| and rloo_trl's ratio is over the sum of log-ratios, so
    both give -A_b * sum_t' w[b,t'] on every token."""
    logp = torch.zeros(2, 4, requires_grad=True)
    adv = torch.tensor([1.0, -2.0])
    w = agg(name)
    tok, _ = losses.ALGORITHMS.get(algo)(
        logp, torch.zeros(2, 4), adv, MASK, clip_low=0.2, clip_high=0.2
    )
    (w * tok * MASK).sum().backward()
    W = w.sum(-1, keepdim=True)
    g = {"gspo": W / MASK.sum(-1, keepdim=True), "luspo": W, "rloo_trl": W}.get(algo, w)
    expected = -adv[:, None] * g * MASK
    torch.testing.assert_close(logp.grad, expected)


def test_grpo_and_rloo_advantages_by_hand():
    """Group unit rewards 1, 0, 0, 1: mean 0.5, unbiased std 0.57735 -> grpo +-0.86588;
    rloo: 1 - 1/3 = 0.66667, 0 - 2/3 = -0.66667. Pair units (eqlen) of one prompt with
    four tracks of rewards 1, 0 | 1, 1 (std 0.5): (1-0)/0.5001 = 1.99960; the (1, 1) unit gets 0;
    rloo pair form: R_l - R_r = 1."""
    r = np.array([1.0, 0, 0, 1])
    z = np.zeros(4, dtype=bool)
    g = losses.ADVANTAGES.get("grpo")(
        r, np.zeros(4), np.array(["p"] * 4), np.arange(4), z, scale="group", eps=1e-4
    )
    assert g == pytest.approx([0.86588, -0.86588, -0.86588, 0.86588], abs=1e-5)
    loo = losses.ADVANTAGES.get("rloo")(
        r, np.zeros(4), np.array(["p"] * 4), np.arange(4), z, scale="none"
    )
    assert loo == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3])
    unit, pair = np.array([0, 0, 1, 1]), np.ones(4, dtype=bool)
    pr = np.array([1.0, 0, 1, 1])
    g = losses.ADVANTAGES.get("grpo")(
        pr, unit, np.array(["p"] * 4), np.arange(4), pair, scale="group", eps=1e-4
    )
    assert g == pytest.approx([1.99960, -1.99960, 0, 0], abs=1e-5)
    loo = losses.ADVANTAGES.get("rloo")(pr, unit, np.array(["p"] * 4), np.arange(4), pair)
    assert loo == pytest.approx([1, -1, 0, 0])
    batch = losses.ADVANTAGES.get("grpo")(
        r, np.zeros(4), np.array(["p"] * 4), np.arange(4), z, scale="batch", eps=0.0
    )
    assert batch == pytest.approx([0.86603, -0.86603, -0.86603, 0.86603], abs=1e-5)


def test_lr_schedule_by_hand():
    """lr 1.0, warmup 2, then cosine over iterations*epochs*minibatches - warmup = 4 steps:
    steps 0,1 -> 0.5, 1.0; steps 2..5 -> 0.5(1+cos(pi*k/4)) = 1, 0.85355, 0.5, 0.14645."""
    cfg = config.load(
        None,
        [
            "iterations=3",
            "update.minibatches=2",
            "update.lr=1.0",
            "update.warmup_steps=2",
            "update.lr_schedule=cosine",
        ],
    )
    got = [lr_at(s, cfg) for s in range(6)]
    assert got == pytest.approx([0.5, 1.0, 1.0, 0.85355, 0.5, 0.14645], abs=1e-5)


def random_cols(n, seed=0, unit_size=2, equal_pairs=False):
    rng = np.random.default_rng(seed)
    cols = {
        k: []
        for k in (
            "context_ids",
            "segment_ids",
            "old_logprobs",
            "loss_mask",
            "advantage",
            "unit_id",
            "reward",
        )
    }
    for i in range(n):
        c = int(rng.integers(2, 6))
        s = int(rng.integers(1, 7)) if not (equal_pairs and i % 2) else len(cols["segment_ids"][-1])
        cols["context_ids"].append(rng.integers(3, 200, c).tolist())
        cols["segment_ids"].append(rng.integers(3, 200, s).tolist())
        cols["old_logprobs"].append((-rng.random(s) * 6).tolist())
        cols["loss_mask"].append(
            [bool(b) for b in rng.random(s) > 0.2] if not equal_pairs else [True] * s
        )
        cols["advantage"].append(float(rng.normal()))
        cols["unit_id"].append(i // unit_size)
        cols["reward"].append(float(rng.integers(0, 2)))
    return cols


def grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize(
    "name, algo",
    list(
        itertools.product(
            ["seq_mean_token_mean", "token_mean", "delta_l", "unit_mean"], ["grpo", "gspo"]
        )
    ),
)
def test_micro_batches_give_the_full_batch_gradient(random_model_dir, name, algo):
    cols = random_cols(6)
    out = []
    for micro in (1, 4, 6):
        cfg = config.load(
            None,
            [
                f"update.micro_batch_size={micro}",
                f"update.loss_agg={name}",
                f"update.algorithm={algo}",
            ],
        )
        model = load_policy(random_model_dir, torch.device("cpu"))
        minibatch_backward(model, cols, np.arange(6), cfg, 0, "cpu")
        out.append(grads(model))
    assert out[0].abs().sum() > 0
    for g in out[1:]:
        torch.testing.assert_close(g, out[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", losses.LOSS_AGGS.names())
def test_eqlen_unit_members_get_equal_magnitude_weights(random_model_dir, name):
    """Two-member units of equal-length segments (lengths differ across units), opposite
    advantages, at ratio 1: both members' per-token gradient weights have equal magnitude,
    whatever the unit's length."""
    cols = random_cols(8, seed=1, equal_pairs=True)
    cols["advantage"] = [
        a if i % 2 == 0 else -cols["advantage"][i - 1] for i, a in enumerate(cols["advantage"])
    ]
    model = load_policy(random_model_dir, torch.device("cpu"))
    with torch.no_grad():
        lp, _ = segment_logprobs(model, cols["context_ids"], cols["segment_ids"], 0, 1.0, "cpu")
    cols["old_logprobs"] = [lp[i, : len(s)].tolist() for i, s in enumerate(cols["segment_ids"])]
    cfg = config.load(None, [f"update.loss_agg={name}"])
    record = []
    minibatch_backward(model, cols, np.arange(8), cfg, 0, "cpu", record=record)
    g = {i: np.abs(gw) for i, _, gw in record}
    assert len({len(cols["segment_ids"][i]) for i in range(0, 8, 2)}) > 1, "lengths vary"
    for i in range(0, 8, 2):
        np.testing.assert_allclose(g[i], g[i + 1], rtol=1e-4)
        assert g[i].min() > 0


def test_zero_signal_units_are_skipped_without_moving_anyone_elses_weight(random_model_dir):
    """Units 0 and 2 have equal rewards (advantage 0). Skipping them leaves the gradient
    and every other member's aggregation weight exactly as when they are forwarded."""
    cols = random_cols(6)
    cols["reward"] = [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    cols["advantage"] = [0.0, 0.0, 0.7, -0.7, 0.0, 0.0]
    assert zero_signal(cols).tolist() == [True, True, False, False, True, True]
    out, recs = [], []
    for skip in (None, zero_signal(cols).tolist()):
        c = dict(cols, **({"skip": skip} if skip else {}))
        cfg = config.load(None, ["update.loss_agg=token_mean"])
        model = load_policy(random_model_dir, torch.device("cpu"))
        rec = []
        st = minibatch_backward(model, c, np.arange(6), cfg, 0, "cpu", record=rec)
        out.append(grads(model))
        recs.append({i: w for i, w, _ in rec})
    torch.testing.assert_close(out[0], out[1])
    assert recs[0] == recs[1]
    assert st["forwarded"] == 2


def test_gradient_checkpointing_gives_the_same_gradient(random_model_dir):
    cols = random_cols(4)
    cfg = config.load(None, ["update.micro_batch_size=2"])
    out = []
    for ckpt in (False, True):
        model = load_policy(random_model_dir, torch.device("cpu"))
        if ckpt:
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
        model.train()
        minibatch_backward(model, cols, np.arange(4), cfg, 0, "cpu")
        out.append(grads(model))
    torch.testing.assert_close(out[0], out[1], rtol=1e-4, atol=1e-6)
