"""The surrogates that TRL names as loss types (luspo, cispo, sapo) and TRL's RLOOTrainer
objective (rloo_trl): numbers worked by hand, the awkward cases (zero advantage, empty loss
masks, one-token responses), the on-policy gradient of every algorithm, and agreement with
TRL's own loss code (`GRPOTrainer._compute_loss`, `RLOOTrainer._compute_loss`) on random
off-policy tensors. The trainer-level first-step comparisons are in
tests/test_bench_update.py."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline import config
from stages import losses

LN2, LN09 = math.log(2.0), math.log(0.9)

# Three members, sampling log-probs 0 (so logp is the log-ratio); 5.0 on padding, which
# must never count.
#   m0: two tokens, log-ratios ln 2, 0;  A = +1
#   m1: two tokens, log-ratios 0.05, 0.05; A = +1
#   m2: one token, log-ratio ln 0.9;    A = -1
LOGP = [[LN2, 0.0, 5.0], [0.05, 0.05, 5.0], [LN09, 5.0, 5.0]]
MASK = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 0, 0]], dtype=torch.bool)
ADV = torch.tensor([1.0, 1.0, -1.0])
CLIP = {"clip_low": 0.2, "clip_high": 0.2}


def run(algo, agg, logp=LOGP, mask=MASK, adv=ADV, **kw):
    """(per-token loss on the mask, aggregated loss, d loss / d logp, stats)."""
    lp = torch.tensor(logp, requires_grad=True)
    tok, st = losses.ALGORITHMS.get(algo)(lp, torch.zeros_like(lp), adv, mask, **{**CLIP, **kw})
    unit = torch.arange(len(mask))
    w = losses.LOSS_AGGS.get(agg)(mask, unit, max_new_tokens=8, alpha=1.0)
    loss = (w * tok * mask).sum()
    loss.backward()
    return (tok * mask).detach(), float(loss), lp.grad, st


def close(got, want, atol=1e-5):
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32), atol=atol, rtol=0)


# ------------------------------------------------------------------ hand-worked


def test_luspo_by_hand():
    """GSPO's sequence ratios s = exp(mean log-ratio): m0 exp(ln2 / 2) = 1.41421 > 1.2, A>0:
    clipped, l_b = -1.2; m1 exp(0.05) = 1.051271, l_b = -1.051271; m2 0.9 (>= 0.8), A<0:
    l_b = 0.9. LUSPO scales by |o_b|: -2.4, -2.102542 (two tokens), 0.9 (one token) on every
    loss token. seq_mean_token_mean: L = (2(-1.2) + 2(-1.051271) + 0.9) / 3 = -1.200847
    (TRL: mean over sequences of each one's token sum). Gradient: m0 clipped -> 0; m1
    -A s / B = -1.051271 / 3 = -0.350424 per token (GSPO's is half that, /|o_b|); m2
    0.9 / 3 = 0.3."""
    tok, loss, grad, st = run("luspo", "seq_mean_token_mean")
    close(tok, [[-2.4, -2.4, 0], [-2.102542, -2.102542, 0], [0.9, 0, 0]])
    assert loss == pytest.approx(-1.200847, abs=1e-6)
    close(grad, [[0, 0, 0], [-0.350424, -0.350424, 0], [0.3, 0, 0]])
    assert st["clipfrac_high"] == pytest.approx(2 / 5)  # m0's two tokens
    _, gspo_loss, gspo_grad, _ = run("gspo", "seq_mean_token_mean")
    assert gspo_loss == pytest.approx(-0.450424, abs=1e-6)  # (-1.2 - 1.051271 + 0.9) / 3
    close(gspo_grad[1], [-0.175212, -0.175212, 0])


def test_cispo_by_hand():
    """Token ratios 2, 1 | 1.051271, 1.051271 | 0.9; weights sg(min(r, 1 + 0.2)) = 1.2, 1 |
    1.051271 x2 | 0.9. l = -w A logp: -1.2 ln2 = -0.831777, 0 | -0.052564 x2 |
    -0.9 * (-1) * ln 0.9 = -0.094824. token_mean (5 tokens): L = -1.031729 / 5 = -0.206346.
    Gradient -w A / 5: -0.24, -0.2 | -0.210254 x2 | +0.18 -- the clipped token (r = 2)
    keeps the gradient 1.2 / 5, where PPO's clip would zero it. clipfrac 1/5."""
    tok, loss, grad, st = run("cispo", "token_mean")
    close(tok, [[-0.831777, 0, 0], [-0.052564, -0.052564, 0], [-0.094824, 0, 0]])
    assert loss == pytest.approx(-0.206346, abs=1e-6)
    close(grad, [[-0.24, -0.2, 0], [-0.210254, -0.210254, 0], [0.18, 0, 0]])
    assert st["clipfrac"] == st["clipfrac_high"] == pytest.approx(1 / 5)
    assert st["clipfrac_low"] == 0
    # clip_high = 1: the bound is 2, nothing is clipped and the weight is r itself.
    _, _, grad2, st2 = run("cispo", "token_mean", clip_high=1.0)
    close(grad2[0], [-2 / 5, -1 / 5, 0])
    assert st2["clipfrac"] == 0


def test_sapo_by_hand():
    """l = -A (4 / tau) sigmoid(tau (r - 1)), tau = 1 for A > 0, 1.05 for A < 0.
    m0: r = 2: sigmoid(1) = 0.731059, l = -2.924234; r = 1: l = -4 * 0.5 = -2.
    m1: r = 1.051271: sigmoid(0.051271) = 0.512815, l = -2.051260 (x2).
    m2: r = 0.9, tau 1.05: sigmoid(-0.105) = 0.473774, l = +4 * 0.473774 / 1.05 = 1.804854.
    d l / d logp = -A 4 sigmoid (1 - sigmoid) r: m0 -0.786448 * 2 = -1.572895, -1;
    m1 -0.999343 * 1.051271 = -1.050580; m2 +0.997244 * 0.9 = 0.897520.
    seq_mean_token_mean weights 1/6, 1/6, 1/3: gradient -0.262149, -0.166667 | -0.175097 x2
    | 0.299173; L = (-4.924234 - 4.102520) / 6 + 1.804854 / 3 = -0.902841."""
    tok, loss, grad, st = run("sapo", "seq_mean_token_mean")
    close(tok, [[-2.924234, -2.0, 0], [-2.05126, -2.05126, 0], [1.804854, 0, 0]])
    assert loss == pytest.approx(-0.902841, abs=1e-6)
    close(grad, [[-0.262149, -0.166667, 0], [-0.175097, -0.175097, 0], [0.299173, 0, 0]])
    assert st["clipfrac"] == 0
    # mean gate 4 sigmoid (1 - sigmoid): (0.786448 + 1 + 2 * 0.999343 + 0.997244) / 5
    assert st["sapo_gate"] == pytest.approx(0.956476, abs=1e-5)


def test_sapo_temperatures():
    """tau_pos = 2 on m0's r = 2 token: l = -(4/2) sigmoid(2) = -2 * 0.880797 = -1.761594;
    tau_neg = 0.5 on m2: l = 8 sigmoid(-0.05) = 8 * 0.487503 = 3.900025."""
    tok, *_ = run("sapo", "token_mean", temperature_pos=2.0, temperature_neg=0.5)
    assert float(tok[0, 0]) == pytest.approx(-1.761594, abs=1e-5)
    assert float(tok[2, 0]) == pytest.approx(3.900025, abs=1e-5)


def test_rloo_trl_by_hand():
    """One ratio per sequence, rho = exp(sum of log-ratios): m0 exp(ln 2) = 2 > 1.2, A>0:
    clipped, l_b = -1.2; m1 exp(0.1) = 1.105171: l_b = -1.105171; m2 0.9: l_b = 0.9; on every
    loss token. seq_mean_token_mean: L = (-1.2 - 1.105171 + 0.9) / 3 = -0.468390 (TRL's mean
    over sequences). Gradient -A rho / B on every token, no 1/|o_b|: m1 -0.368390 per token,
    m2 0.3, m0 (clipped) 0."""
    tok, loss, grad, st = run("rloo_trl", "seq_mean_token_mean")
    close(tok, [[-1.2, -1.2, 0], [-1.105171, -1.105171, 0], [0.9, 0, 0]])
    assert loss == pytest.approx(-0.468390, abs=1e-6)
    close(grad, [[0, 0, 0], [-0.368390, -0.368390, 0], [0.3, 0, 0]])
    assert st["ratio_mean"] == pytest.approx((2 * 2 + 2 * 1.105171 + 0.9) / 5, abs=1e-5)


def test_rloo_token_is_rloo_and_stays_verls_form():
    """`rloo` and `rloo_token` are one record: grpo's token surrogate, leave-one-out
    advantage."""
    assert losses.ALGORITHMS.get("rloo") is losses.ALGORITHMS.get("rloo_token")
    assert losses.ALGORITHMS.get("rloo").advantage == "rloo"
    assert losses.ALGORITHMS.get("rloo_trl").advantage == "rloo"
    for name in ("rloo", "rloo_token"):
        tok, loss, grad, _ = run(name, "seq_mean_token_mean")
        g_tok, g_loss, g_grad, _ = run("grpo", "seq_mean_token_mean")
        torch.testing.assert_close(tok, g_tok)
        torch.testing.assert_close(grad, g_grad)


# ------------------------------------------------------------------ awkward cases

NEW = ("luspo", "cispo", "sapo", "rloo_trl")


@pytest.mark.parametrize("algo", NEW)
def test_zero_advantage_gives_zero_loss_and_gradient(algo):
    """All-equal rewards: every estimator gives A = 0 (the rloo one: R - mean of the others
    = 0), so each surrogate is 0 and so is its gradient, even off-policy."""
    rloo = losses.ADVANTAGES.get("rloo")(
        np.ones(3), np.zeros(3), np.array(["p"] * 3), np.arange(3), np.zeros(3, bool)
    )
    assert rloo.tolist() == [0.0, 0.0, 0.0]
    tok, loss, grad, st = run(algo, "seq_mean_token_mean", adv=torch.zeros(3))
    assert loss == 0 and float(tok.abs().sum()) == 0 and float(grad.abs().sum()) == 0
    assert all(math.isfinite(v) for v in st.values())


@pytest.mark.parametrize("agg", ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"])
@pytest.mark.parametrize("algo", [*NEW, "grpo", "gspo"])
def test_empty_loss_mask_member_is_inert_and_not_counted(algo, agg):
    """A fourth member whose loss mask is empty (e.g. mask_truncated): no NaN, no loss, no
    gradient, and -- since the seq_mean_* normalisers count members with a loss token only --
    the other members' loss and gradients are exactly those of the three-member batch.
    (TRL's `.mean()` / `size(0)` would count it: see test_trl_counts_empty_members.)"""
    _, loss3, grad3, _ = run(algo, agg)
    logp = [*LOGP, [0.3, -0.2, 0.1]]
    mask = torch.cat([MASK, torch.zeros(1, 3, dtype=torch.bool)])
    tok, loss4, grad4, st = run(algo, agg, logp=logp, mask=mask, adv=torch.tensor([1, 1, -1, 2.0]))
    assert loss4 == pytest.approx(loss3, abs=1e-7)
    torch.testing.assert_close(grad4[:3], grad3)
    assert float(grad4[3].abs().sum()) == 0 and float(tok[3].abs().sum()) == 0
    assert all(math.isfinite(v) for v in st.values())


def test_all_masks_empty():
    """Nothing in the loss at all: every algorithm gives loss 0 and finite stats."""
    mask = torch.zeros(2, 3, dtype=torch.bool)
    for algo in losses.ALGORITHMS.names():
        _, loss, grad, st = run(algo, "seq_mean_token_mean", logp=LOGP[:2], mask=mask, adv=ADV[:2])
        assert loss == 0 and float(grad.abs().sum()) == 0
        assert all(math.isfinite(v) for v in st.values()), algo


def test_one_token_responses():
    """With one loss token per member the sequence ratios are the token ratio (mean = sum =
    the one log-ratio) and |o_b| = 1: luspo = gspo = rloo_trl = grpo, token by token.
    Ratios e^0.3 = 1.349859 (A=+1: clipped, -1.2), e^-0.3 = 0.740818 (A=-1: clipped, 0.8),
    e^0.1 = 1.105171 (A=+2: -2.210342)."""
    logp = [[0.3, 9.0], [-0.3, 9.0], [0.1, 9.0]]
    mask = torch.tensor([[1, 0], [1, 0], [1, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0, 2.0])
    want, *_ = run("grpo", "seq_mean_token_mean", logp=logp, mask=mask, adv=adv)
    close(want, [[-1.2, 0], [0.8, 0], [-2.210342, 0]])
    for algo in ("gspo", "luspo", "rloo_trl"):
        tok, loss, grad, _ = run(algo, "seq_mean_token_mean", logp=logp, mask=mask, adv=adv)
        torch.testing.assert_close(tok, want)
    # cispo's and sapo's gradients on the one token: -A min(r, 1.2) / 3 and
    # -A 4 sigmoid (1 - sigmoid) r / 3.
    _, _, grad, _ = run("cispo", "seq_mean_token_mean", logp=logp, mask=mask, adv=adv)
    close(grad[:, 0], [-1.2 / 3, 0.740818 / 3, -2 * 1.105171 / 3])


# ------------------------------------------------------------------ on-policy gradient


@pytest.mark.parametrize("agg", losses.LOSS_AGGS.names())
@pytest.mark.parametrize("algo", losses.ALGORITHMS.names())
def test_on_policy_gradient_of_every_algorithm(algo, agg):
    """At ratio 1 (logp = old), d L / d logp[b,t] = -A_b g[b,t] with
    - token-level algorithms (grpo, rloo, rloo_token, cispo, sapo): g = w[b,t];
    - gspo (mean over the member's tokens): g = W_b / |o_b|, W_b = sum_t w[b,t];
    - luspo (gspo x |o_b|) and rloo_trl (sum of log-ratios): g = W_b.
    So under seq_mean_token_mean (W_b = 1/B) luspo and rloo_trl give every token 1/B."""
    m = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    adv = torch.tensor([1.0, -2.0])
    lp = torch.zeros(2, 4, requires_grad=True)
    w = losses.LOSS_AGGS.get(agg)(m, torch.tensor([0, 1]), max_new_tokens=8, alpha=1.0)
    tok, _ = losses.ALGORITHMS.get(algo)(lp, torch.zeros(2, 4), adv, m, **CLIP)
    (w * tok * m).sum().backward()
    W = w.sum(-1, keepdim=True)
    g = {"gspo": W / m.sum(-1, keepdim=True), "luspo": W, "rloo_trl": W}.get(algo, w)
    torch.testing.assert_close(lp.grad, -adv[:, None] * g * m)


# ------------------------------------------------------------------ config hook


def test_algorithm_kwargs_from_the_config():
    """Every algorithm takes the clip settings; sapo also its two temperatures."""
    u = config.load(
        None,
        [
            "update.clip_low=0.1",
            "update.clip_high=0.3",
            "update.sapo_temperature_pos=2",
            "update.sapo_temperature_neg=0.5",
        ],
    ).update
    base = {"clip_low": 0.1, "clip_high": 0.3, "dual_clip": 0.0}
    assert losses.ALGORITHMS.get("grpo").kwargs(u) == base
    assert losses.ALGORITHMS.get("sapo").kwargs(u) == {
        **base,
        "temperature_pos": 2.0,
        "temperature_neg": 0.5,
    }
    for name in losses.ALGORITHMS.names():  # every record's kwargs are accepted by its loss
        algo, lp = losses.ALGORITHMS.get(name), torch.zeros(1, 2)
        algo(lp, lp, torch.ones(1), torch.ones(1, 2, dtype=torch.bool), **algo.kwargs(u))


def test_update_stage_passes_sapo_temperatures(random_model_dir):
    """minibatch_backward with update.sapo_temperature_pos/neg = 2 / 0.5 gives the loss of
    sapo_loss called with those temperatures, not with the defaults."""
    from pipeline.models import load_policy
    from stages.update import minibatch_backward, segment_logprobs

    cols = {
        "context_ids": [[1, 2], [3, 4]],
        "segment_ids": [[5, 6, 7], [8, 9]],
        "loss_mask": [[True] * 3, [True] * 2],
        "advantage": [1.0, -1.0],
        "unit_id": [0, 0],
    }
    model = load_policy(random_model_dir, torch.device("cpu"))
    with torch.no_grad():
        lp, _ = segment_logprobs(model, cols["context_ids"], cols["segment_ids"], 0, 1.0, "cpu")
    # off-policy by 0.2 nats per token, so the temperatures matter for the value
    cols["old_logprobs"] = [
        (lp[i, : len(s)] - 0.2).tolist() for i, s in enumerate(cols["segment_ids"])
    ]
    cfg = config.load(
        None,
        [
            "update.algorithm=sapo",
            "update.sapo_temperature_pos=2",
            "update.sapo_temperature_neg=0.5",
        ],
    )
    st = minibatch_backward(model, cols, np.arange(2), cfg, 0, "cpu")
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    old = torch.tensor([cols["old_logprobs"][0], cols["old_logprobs"][1] + [0.0]])
    tok, _ = losses.sapo_loss(
        lp, old, torch.tensor([1.0, -1.0]), mask, temperature_pos=2.0, temperature_neg=0.5
    )
    w = losses.seq_mean_token_mean(mask)
    assert st["loss"] == pytest.approx(float((w * tok * mask).sum()), rel=1e-5)


# ------------------------------------------------------------------ TRL's loss code

trl = pytest.importorskip("trl")


class _Acc:
    num_processes = 1

    @staticmethod
    def reduce(x, reduction="sum"):
        return x

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather


def _fake_trainer(logp, **attrs):
    """The attributes TRL's `_compute_loss` reads, with the policy's per-token log-probs
    fixed to `logp` (a leaf we take gradients to), one process, no accumulation."""
    from collections import defaultdict

    args = SimpleNamespace(
        delta=None,
        sapo_temperature_pos=1.0,
        sapo_temperature_neg=1.05,
        steps_per_generation=1,
        use_bias_correction_kl=True,
    )
    for k in ("sapo_temperature_pos", "sapo_temperature_neg"):
        if k in attrs:
            setattr(args, k, attrs.pop(k))
    ns = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=0.0,
        epsilon_low=0.2,
        epsilon_high=0.2,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        accelerator=_Acc(),
        max_completion_length=8,
        _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list)},
        args=args,
    )
    for k, v in attrs.items():
        setattr(ns, k, v)
    return ns


def _random_batch(seed, B=6, T=8, empty=()):
    """Random off-policy log-probs (log-ratios ~ N(0, 0.3)), right-padded masks of random
    lengths 1..T (rows in `empty` have none), advantages ~ N(0, 1) with one exact 0."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 3
    logp = old + 0.3 * torch.randn(B, T, generator=g)
    lens = torch.randint(1, T + 1, (B,), generator=g)
    lens[0], lens[1] = 1, T  # a one-token and a full-length member always
    for i in empty:
        lens[i] = 0
    mask = torch.arange(T)[None] < lens[:, None]
    adv = torch.randn(B, generator=g)
    adv[2] = 0.0
    return logp, old, mask, adv


def _trl_inputs(old, mask, adv):
    B, T = mask.shape
    return {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long),
        "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": adv,
        "old_per_token_logps": old,
        "num_items_in_batch": mask.sum(),
    }


def _trl_grpo_loss(loss_type, logp, old, mask, adv, **attrs):
    from trl import GRPOTrainer

    lp = logp.clone().requires_grad_(True)
    fake = _fake_trainer(lp, loss_type=loss_type, **attrs)
    loss = GRPOTrainer._compute_loss(fake, None, _trl_inputs(old, mask, adv))
    loss.backward()
    return float(loss), lp.grad * mask


def _trl_rloo_loss(logp, old, mask, adv):
    from trl import RLOOTrainer

    lp = logp.clone().requires_grad_(True)
    fake = _fake_trainer(lp)
    inputs = _trl_inputs(old, mask, adv)
    inputs["old_logps"] = (inputs.pop("old_per_token_logps") * mask).sum(1)
    loss = RLOOTrainer._compute_loss(fake, None, inputs)
    loss.backward()
    return float(loss), lp.grad * mask


def _eqlen_loss(algo, agg, logp, old, mask, adv, **kw):
    lp = logp.clone().requires_grad_(True)
    tok, _ = losses.ALGORITHMS.get(algo)(lp, old, adv, mask, **{**CLIP, **kw})
    w = losses.LOSS_AGGS.get(agg)(mask, torch.arange(len(mask)), max_new_tokens=8, alpha=1.0)
    loss = (w * tok * mask).sum()
    loss.backward()
    return float(loss), lp.grad * mask


# (EqLen algorithm, EqLen aggregation, TRL loss_type, extra TRL attributes, EqLen kwargs)
TRL_CASES = [
    ("grpo", "seq_mean_token_mean", "grpo", {}, {}),
    ("grpo", "seq_mean_token_sum_norm", "dr_grpo", {}, {}),
    ("gspo", "seq_mean_token_mean", "grpo", {"importance_sampling_level": "sequence"}, {}),
    ("luspo", "seq_mean_token_mean", "luspo", {"importance_sampling_level": "sequence"}, {}),
    ("cispo", "token_mean", "cispo", {"epsilon_high": 1.2}, {}),
    ("cispo", "token_mean", "cispo", {"epsilon_high": 1.05}, {"clip_high": 0.05}),
    ("sapo", "seq_mean_token_mean", "sapo", {}, {}),
    (
        "sapo",
        "seq_mean_token_mean",
        "sapo",
        {"sapo_temperature_pos": 2.0, "sapo_temperature_neg": 0.5},
        {"temperature_pos": 2.0, "temperature_neg": 0.5},
    ),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("algo, agg, loss_type, attrs, kw", TRL_CASES)
def test_matches_trl_compute_loss(algo, agg, loss_type, attrs, kw, seed):
    """Random off-policy batches (ratios well outside the clip range, a one-token member, a
    zero advantage): the loss and the gradient to every log-prob agree with TRL's own
    `GRPOTrainer._compute_loss` to float32 rounding. TRL's cispo bound is epsilon_high
    itself = 1 + clip_high."""
    logp, old, mask, adv = _random_batch(seed)
    want_loss, want_grad = _trl_grpo_loss(loss_type, logp, old, mask, adv, **attrs)
    got_loss, got_grad = _eqlen_loss(algo, agg, logp, old, mask, adv, **kw)
    assert got_loss == pytest.approx(want_loss, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rloo_trl_matches_trl_rloo_compute_loss(seed):
    """TRL's RLOOTrainer loss: ratio exp(sum logp - sum old) per sequence, clipped, mean over
    the sequences; equal to rloo_trl with seq_mean_token_mean (loss and gradient). Its
    log-ratios are drawn small (N(0, 0.05) per token) so that not every sum leaves the
    clip range."""
    logp, old, mask, adv = _random_batch(seed)
    logp = old + (logp - old) / 6
    want_loss, want_grad = _trl_rloo_loss(logp, old, mask, adv)
    got_loss, got_grad = _eqlen_loss("rloo_trl", "seq_mean_token_mean", logp, old, mask, adv)
    assert got_loss == pytest.approx(want_loss, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)
    assert float(want_grad.abs().sum()) > 0


@pytest.mark.parametrize(
    "algo, agg, loss_type, attrs",
    [
        ("grpo", "seq_mean_token_mean", "grpo", {}),
        ("grpo", "seq_mean_token_sum_norm", "dr_grpo", {}),
        ("luspo", "seq_mean_token_mean", "luspo", {"importance_sampling_level": "sequence"}),
        ("sapo", "seq_mean_token_mean", "sapo", {}),
        ("rloo_trl", "seq_mean_token_mean", "rloo", {}),
    ],
)
def test_trl_counts_empty_members(algo, agg, loss_type, attrs):
    """Two of six members have an empty loss mask. TRL's per-sequence normalisers
    (`.mean()` over the rows, `per_token_loss.size(0)`) count all six; EqLen's seq_mean_*
    count the four with a loss token. So TRL's gradient is EqLen's times exactly 4/6.
    (The loss values differ by more for rloo: TRL's empty rows have ratio exp(0) = 1 and add
    -A each to its mean; their gradient is 0.)"""
    logp, old, mask, adv = _random_batch(3, empty=(3, 4))
    if loss_type == "rloo":
        logp = old + (logp - old) / 6
        want_loss, want_grad = _trl_rloo_loss(logp, old, mask, adv)
    else:
        want_loss, want_grad = _trl_grpo_loss(loss_type, logp, old, mask, adv, **attrs)
    got_loss, got_grad = _eqlen_loss(algo, agg, logp, old, mask, adv)
    torch.testing.assert_close(want_grad, got_grad * 4 / 6, rtol=1e-5, atol=1e-7)
    if loss_type != "rloo":
        assert want_loss == pytest.approx(got_loss * 4 / 6, rel=1e-5, abs=1e-7)
    else:
        empty_rows = -adv[[3, 4]].sum() / 6
        assert want_loss == pytest.approx(got_loss * 4 / 6 + float(empty_rows), rel=1e-5)
