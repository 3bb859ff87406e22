"""Advantage estimators, policy-gradient objectives and loss aggregations.

(Over 500 lines: one registry each for estimators, objectives and aggregations, each
function with its formula and source in the docstring.)

The update minimises, per mini-batch,

    L = sum_{b,t} w[b,t] * l[b,t]   (+ beta * sum_{b,t} w[b,t] * kl[b,t])

where `l` is the per-token surrogate of the algorithm and `w` the per-token weight of the
loss aggregation. Writing the aggregation as an explicit weight tensor, computed once over
the whole mini-batch before it is split into micro-batches, makes gradient accumulation
exact (micro-batch gradients sum to the full-batch gradient) and makes `w` a diagnostic:
it is what couples a token's gradient to the length of its response (docs/method.md and
docs/objectives.md).

Tensors: B sequences (unit members) of a mini-batch, L = its longest segment.
    mask        [B, L] bool   token enters the loss
    logp, old   [B, L] float  log-prob under the current / sampling policy
    adv         [B]    float  advantage of the member
    unit        [B]    long   dense index of the member's unit within the mini-batch

Names follow TRL / verl where they coincide: `seq_mean_token_mean` = TRL loss_type "grpo"
= verl "seq-mean-token-mean"; `token_mean` = TRL "dapo"/"bnpo" = verl "token-mean";
`seq_mean_token_sum_norm` = TRL "dr_grpo" = verl "seq-mean-token-sum-norm" (constant
L_max = generate.max_new_tokens). TRL's loss types that change the surrogate rather than
the aggregation are algorithms here: `luspo`, `cispo`, `sapo` (with the aggregation TRL
uses for each: seq_mean_token_mean, token_mean, seq_mean_token_mean); TRL's RLOOTrainer
objective is `rloo_trl`, while `rloo` (= `rloo_token`) is verl's token-level form.
benchmarks/bench_update.py and tests/test_trl_losses.py check each against TRL's code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeline.lazy import lazy_import
from pipeline.registry import Registry

torch = lazy_import("torch")  # loaded on first use: declarations and cache keys need none

LOSS_AGGS: Registry = Registry("loss aggregation", "update.loss_agg")
ALGORITHMS: Registry = Registry("algorithm", "update.algorithm")
ADVANTAGES: Registry = Registry("advantage estimator", "update.advantage")
# Strategies whose two-member units take the pair form of an advantage (docs/method.md).
PAIR_STRATEGIES = ("truncate", "eqlen")


@dataclass(frozen=True)
class Estimator:
    """An advantage estimator and the scaling it uses unless told otherwise
    (`update.scale_rewards=auto`). Called like its function."""

    fn: Callable[..., np.ndarray]
    scale: str

    def __call__(self, *args, **kw) -> np.ndarray:
        return self.fn(*args, **kw)


@dataclass(frozen=True)
class Algorithm:
    """A policy-gradient objective: its per-token surrogate `loss` and the advantage
    estimator it pairs with (`update.advantage=auto`; that estimator's default scaling goes
    with it). `options` maps the loss's own keyword arguments to the `update.*` keys that
    set them (e.g. SAPO's temperatures); `kwargs(u)` is everything the loss takes from the
    update config. Called like its loss."""

    loss: Callable[..., tuple[torch.Tensor, dict]]
    advantage: str
    options: tuple[tuple[str, str], ...] = ()

    def __call__(self, *args, **kw) -> tuple[torch.Tensor, dict]:
        return self.loss(*args, **kw)

    def kwargs(self, u) -> dict:
        """The loss's keyword arguments from the update config `u` (`cfg.update`): the clip
        settings every algorithm accepts, plus its `options`."""
        kw = {"clip_low": u.clip_low, "clip_high": u.clip_high, "dual_clip": u.dual_clip}
        kw.update({arg: getattr(u, key) for arg, key in self.options})
        return kw


def algorithm(name: str, *, advantage: str, options=(), aliases=()):
    """Register `fn` as algorithm `name` (and under each alias: the same record)."""

    def deco(fn):
        record = Algorithm(fn, advantage, tuple(options))
        for n in (name, *aliases):
            ALGORITHMS.register(n)(record)
        return fn

    return deco


def estimator(name: str, *, scale: str):
    def deco(fn):
        ADVANTAGES.register(name)(Estimator(fn, scale))
        return fn

    return deco


# ---------------------------------------------------------------- loss aggregations
# Signature: (mask, unit, *, max_new_tokens, alpha) -> w [B, L], zero where mask is False.


def _lengths(mask: torch.Tensor) -> torch.Tensor:
    return mask.float().sum(-1, keepdim=True).clamp(min=1)


def _n_seq(mask: torch.Tensor) -> torch.Tensor:
    return mask.any(-1).sum().clamp(min=1).float()


@LOSS_AGGS.register("seq_mean_token_mean")
def seq_mean_token_mean(mask, unit=None, **_) -> torch.Tensor:
    """GRPO (Shao et al. 2024): w[b,t] = 1 / (B |o_b|)."""
    return mask.float() / (_lengths(mask) * _n_seq(mask))


@LOSS_AGGS.register("token_mean")
def token_mean(mask, unit=None, **_) -> torch.Tensor:
    """DAPO (Yu et al. 2025): w[b,t] = 1 / sum_j |o_j|."""
    return mask.float() / mask.float().sum().clamp(min=1)


@LOSS_AGGS.register("seq_mean_token_sum_norm")
def seq_mean_token_sum_norm(mask, unit=None, *, max_new_tokens: int, **_) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025): w[b,t] = 1 / (B L_max), L_max = max_new_tokens."""
    return mask.float() / (_n_seq(mask) * max_new_tokens)


@LOSS_AGGS.register("delta_l")
def delta_l(mask, unit=None, *, alpha: float = 1.0, **_) -> torch.Tensor:
    """ΔL normalisation (He et al. 2025): w[b,t] = |o_b|^-alpha / sum_j |o_j|^-alpha.
    alpha=1 is the minimum-variance unbiased choice when Var(g_b) ∝ |o_b|; alpha=0 gives
    every sequence's token sum the weight 1/B."""
    inv = _lengths(mask).pow(-alpha) * mask.any(-1, keepdim=True)
    return mask.float() * inv / inv.sum().clamp(min=1e-12)


@LOSS_AGGS.register("unit_mean")
def unit_mean(mask, unit, **_) -> torch.Tensor:
    """EqLen default: every unit weighs the same, and within a unit every token the same:
    w[b,t] = 1 / (U * tokens of b's unit). For an EqLen unit of two m-token segments each
    token weighs 1 / (2 m U): both members equal, whatever m."""
    per_unit = torch.zeros(int(unit.max()) + 1, device=mask.device).index_add_(
        0, unit, mask.float().sum(-1)
    )
    n_units = (per_unit > 0).sum().clamp(min=1)
    return mask.float() / (per_unit[unit][:, None].clamp(min=1) * n_units)


@LOSS_AGGS.register("token_sum_norm")
def token_sum_norm(mask, unit, *, max_new_tokens: int, **_) -> torch.Tensor:
    """Dr. GRPO's constant normaliser for units: w[b,t] = 1 / (U * L_max)."""
    n_units = torch.unique(unit[mask.any(-1)]).numel() or 1
    return mask.float() / (n_units * max_new_tokens)


# ---------------------------------------------------------------- algorithms
# Signature: (logp, old, adv, mask, *, clip_low, clip_high, dual_clip) -> (l [B, L], stats)


def _clip_stats(ratio, adv_tok, mask, clip_low, clip_high, log_ratio) -> dict:
    m = mask.float()
    n = m.sum().clamp(min=1)
    lr = log_ratio.detach()
    low = (ratio < 1 - clip_low) & (adv_tok < 0)  # clipped at the lower bound
    high = (ratio > 1 + clip_high) & (adv_tok > 0)  # clipped at the upper bound
    return {
        "clipfrac_low": float((low.float() * m).sum() / n),
        "clipfrac_high": float((high.float() * m).sum() / n),
        "clipfrac": float(((low | high).float() * m).sum() / n),
        "ratio_mean": float((ratio.detach() * m).sum() / n),
        # k3 estimate of KL(old || new) per token: how far the policy moved.
        "approx_kl": float(((torch.exp(lr) - 1 - lr) * m).sum() / n),
    }


def _clipped(ratio, a, clip_low, clip_high, dual_clip):
    pg_loss1 = -a * ratio
    pg_loss2 = -a * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(pg_loss1, pg_loss2)
    if dual_clip > 1.0:
        # Dual-clip PPO (Ye et al. 2020): bound the loss of negative-advantage tokens
        # whose ratio exploded at -A * c.
        loss = torch.where(a < 0, torch.minimum(loss, -a * dual_clip), loss)
    return loss


@algorithm("grpo", advantage="grpo")
def grpo_token_loss(
    logp, old, adv, mask, *, clip_low: float, clip_high: float, dual_clip: float = 0.0, **_
) -> tuple[torch.Tensor, dict]:
    """PPO/GRPO clipped surrogate, token-level ratio r = exp(logp - old):
    l = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)) (dual-clip: min(l, -A c) for A<0)."""
    ratio = torch.exp(logp - old)
    a = adv[:, None].expand_as(ratio)
    loss = _clipped(ratio, a, clip_low, clip_high, dual_clip)
    return loss, _clip_stats(ratio.detach(), a, mask, clip_low, clip_high, logp - old)


@algorithm("rloo", advantage="rloo", aliases=("rloo_token",))
def rloo_token_loss(logp, old, adv, mask, **kw) -> tuple[torch.Tensor, dict]:
    """RLOO's advantage with PPO's token-level surrogate, as verl runs it (verl's `rloo`
    estimator with its `vanilla` policy loss): the same clipped token-level surrogate as
    grpo, l = max(-A r, -A clip(r)), r = exp(logp - old) per token; what differs is the
    advantage (leave-one-out, see ADVANTAGES). `rloo_token` is the same record under a name
    that says so. TRL's RLOOTrainer is not this form: see `rloo_trl`."""
    return grpo_token_loss(logp, old, adv, mask, **kw)


def sequence_ratio(logp, old, mask) -> torch.Tensor:
    """GSPO's s_b = exp(mean over the member's loss tokens of (logp - old)), shape [B]."""
    m = mask.float()
    return torch.exp(((logp - old) * m).sum(-1) / m.sum(-1).clamp(min=1))


@algorithm("gspo", advantage="grpo")
def gspo_loss(
    logp, old, adv, mask, *, clip_low: float, clip_high: float, dual_clip: float = 0.0, **_
) -> tuple[torch.Tensor, dict]:
    """GSPO (Zheng et al. 2025): sequence-level ratio s_b over the member's segment, clipped
    at the sequence level: l_b = max(-A s_b, -A clip(s_b)), placed on every loss token of b
    (so with seq_mean_token_mean the objective is GSPO's mean over sequences). Use GSPO's
    small clip ranges (e.g. clip_low=3e-4, clip_high=4e-4)."""
    s = sequence_ratio(logp, old, mask)
    seq_loss = _clipped(s, adv, clip_low, clip_high, dual_clip)
    loss = seq_loss[:, None].expand_as(logp)
    st = _clip_stats(
        s.detach()[:, None].expand_as(logp),
        adv[:, None].expand_as(logp),
        mask,
        clip_low,
        clip_high,
        logp - old,
    )
    return loss, st


def _seq_stats(ratio_b, adv, mask, clip_low, clip_high, logp, old) -> dict:
    """_clip_stats of a per-sequence ratio [B], broadcast over each member's tokens."""
    return _clip_stats(
        ratio_b.detach()[:, None].expand_as(logp),
        adv[:, None].expand_as(logp),
        mask,
        clip_low,
        clip_high,
        logp - old,
    )


@algorithm("luspo", advantage="grpo")
def luspo_loss(
    logp, old, adv, mask, *, clip_low: float, clip_high: float, dual_clip: float = 0.0, **_
) -> tuple[torch.Tensor, dict]:
    """LUSPO, length-unbiased sequence policy optimisation (arXiv 2602.05261; TRL
    loss_type="luspo" with importance_sampling_level="sequence"): GSPO's clipped sequence
    loss l_b (ratio s_b = exp(mean of the member's log-ratios)) scaled by the member's
    length, l[b,t] = |o_b| l_b on every loss token. With `seq_mean_token_mean` the
    objective is TRL's, (1/B) sum_b |o_b| l_b (TRL: `(per_token_loss * mask).sum(-1).mean()`),
    and d/d logp[b,t] = -A_b s_b / B for an unclipped member: every token of every member
    the same weight, where GSPO's falls as 1 / |o_b|. Meant for that aggregation; under
    another one, w[b,t] multiplies |o_b| l_b. Use GSPO's small clip ranges."""
    s = sequence_ratio(logp, old, mask)
    seq_loss = _clipped(s, adv, clip_low, clip_high, dual_clip) * mask.float().sum(-1)
    loss = seq_loss[:, None].expand_as(logp)
    return loss, _seq_stats(s, adv, mask, clip_low, clip_high, logp, old)


@algorithm("cispo", advantage="grpo")
def cispo_loss(logp, old, adv, mask, *, clip_high: float, **_) -> tuple[torch.Tensor, dict]:
    """CISPO (MiniMax-M1, arXiv 2506.13585; TRL loss_type="cispo"): the token ratio
    r = exp(logp - old), clipped from above and detached, weights a REINFORCE term:
    l = -sg(min(r, 1 + clip_high)) * A * logp. Every token keeps a gradient,
    -A min(r, 1 + clip_high) d logp: clipping bounds its size instead of zeroing it (PPO's
    clip drops the gradient of a clipped token). No lower bound (as TRL; MiniMax-M1 sets
    its lower bound out of reach), so clip_low and dual_clip are not used. TRL's
    `epsilon_high` is the bound itself (its epsilon_max; ScaleRL recommends 5), here it is
    1 + clip_high as for every other ratio bound: TRL epsilon_high = 1 + clip_high. TRL
    aggregates CISPO like dapo: use `token_mean`."""
    ratio = torch.exp(logp - old)
    bound = 1 + clip_high
    weight = ratio.clamp(max=bound).detach()
    a = adv[:, None].expand_as(ratio)
    loss = -weight * a * logp
    st = _clip_stats(ratio.detach(), a, mask, 0.0, clip_high, logp - old)
    m = mask.float()
    n = m.sum().clamp(min=1)
    clipped = float(((ratio.detach() > bound).float() * m).sum() / n)  # whatever the sign of A
    st.update(clipfrac=clipped, clipfrac_high=clipped, clipfrac_low=0.0)
    return loss, st


@algorithm(
    "sapo",
    advantage="grpo",
    options=(
        ("temperature_pos", "sapo_temperature_pos"),
        ("temperature_neg", "sapo_temperature_neg"),
    ),
)
def sapo_loss(
    logp, old, adv, mask, *, temperature_pos: float = 1.0, temperature_neg: float = 1.05, **_
) -> tuple[torch.Tensor, dict]:
    """SAPO, soft adaptive policy optimisation (arXiv 2511.20347; TRL loss_type="sapo",
    token-level ratio): a temperature-controlled soft gate instead of the hard clip,
    l = -A * (4 / tau) * sigmoid(tau (r - 1)), r = exp(logp - old), tau = temperature_pos
    (update.sapo_temperature_pos) where A > 0, else temperature_neg. d l / d r =
    -A * 4 sigmoid(x) (1 - sigmoid(x)), x = tau (r - 1): exactly grpo's -A at r = 1,
    shrinking smoothly as r leaves 1 instead of dropping to 0 at a clip bound (faster for
    the negative side, tau_neg > tau_pos). The value at r = 1 is -2A / tau (not grpo's -A).
    TRL aggregates it like grpo: use `seq_mean_token_mean`. No clip bounds are used; the
    stats report the mean gate 4 sigmoid (1 - sigmoid) (`sapo_gate`, 1 at r = 1)."""
    ratio = torch.exp(logp - old)
    a = adv[:, None].expand_as(ratio)
    tau = torch.where(a > 0, temperature_pos, temperature_neg).to(ratio.dtype)
    gate = torch.sigmoid(tau * (ratio - 1))
    loss = -a * gate * 4 / tau
    st = _clip_stats(ratio.detach(), a, mask, float("inf"), float("inf"), logp - old)
    m = mask.float()
    g = gate.detach()
    st["sapo_gate"] = float((4 * g * (1 - g) * m).sum() / m.sum().clamp(min=1))
    return loss, st


def sequence_sum_ratio(logp, old, mask) -> torch.Tensor:
    """rho_b = exp(sum over the member's loss tokens of (logp - old)): the ratio of the
    sequence's probabilities (TRL RLOOTrainer's), shape [B]."""
    return torch.exp(((logp - old) * mask.float()).sum(-1))


@algorithm("rloo_trl", advantage="rloo")
def rloo_trl_loss(
    logp, old, adv, mask, *, clip_low: float, clip_high: float, dual_clip: float = 0.0, **_
) -> tuple[torch.Tensor, dict]:
    """RLOO as TRL's RLOOTrainer runs it (Ahmadian et al. 2024): one ratio per sequence,
    rho_b = exp(sum_t (logp - old)) (GSPO takes the mean instead), clipped PPO-style:
    l_b = max(-A rho_b, -A clip(rho_b, 1 - clip_low, 1 + clip_high)), placed on every loss
    token of b. With `seq_mean_token_mean` the objective is TRL's mean over sequences,
    (1/B) sum_b l_b, with no per-token length normalisation: d/d logp[b,t] = -A rho_b / B
    for an unclipped member, the sequence's full weight on each of its tokens. The default
    advantage is the leave-one-out one, unscaled (TRL: normalize_advantages=False).
    rho_b multiplies the per-token drifts, so it leaves [1 - clip_low, 1 + clip_high] far
    sooner than a token ratio; dual_clip bounds the A < 0 side as for grpo."""
    rho = sequence_sum_ratio(logp, old, mask)
    seq_loss = _clipped(rho, adv, clip_low, clip_high, dual_clip)
    loss = seq_loss[:, None].expand_as(logp)
    return loss, _seq_stats(rho, adv, mask, clip_low, clip_high, logp, old)


def k3_kl(logp, ref_logp) -> torch.Tensor:
    """k3 estimator of KL(pi || ref) per token (Schulman 2020): exp(d) - d - 1, d = ref - logp."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


# ---------------------------------------------------------------- advantage estimators
# Signature: (rewards, unit_id, prompt_id, track_id, pair_unit, *, scale, eps) -> advantages [n]
# `pair_unit` marks members of two-member units of a pair strategy (truncate, eqlen): those
# get the pair forms of docs/method.md. A track can be a member of several units (an EqLen
# survivor is in one unit per round); `track_id` lets the pair form count each track once.


def _groups(codes: np.ndarray, n_groups: int):
    """Members ordered by group (stable: in their order within the group), each group's
    start in that order and its size. `codes` are dense group indices 0..n_groups-1."""
    order = np.argsort(codes, kind="stable")
    sizes = np.bincount(codes, minlength=n_groups)
    return order, np.cumsum(sizes) - sizes, sizes


def _per_group(values: np.ndarray, codes: np.ndarray, n_groups: int, fn) -> np.ndarray:
    """fn over each group's values, one value per group (0.0 for an empty group). Groups of
    one size are stacked as the rows of one matrix and reduced along its rows: numpy reduces
    each row exactly as it would the group alone (same pairwise summation), so the result
    has the bits of a loop over groups, in one numpy call per distinct group size."""
    order, starts, sizes = _groups(codes, n_groups)
    out = np.zeros(n_groups)
    for size in np.unique(sizes[sizes > 0]):
        g = np.flatnonzero(sizes == size)
        out[g] = fn(values[order[starts[g, None] + np.arange(size)]])
    return out


def _std(m: np.ndarray) -> np.ndarray | float:
    """Unbiased std of each row; 0 for rows of one value."""
    return np.std(m, axis=1, ddof=1) if m.shape[1] > 1 else 0.0


def _estimate(rewards, unit_id, prompt_id, track_id, pair_unit, *, scale, eps, loo: bool):
    """Every member's advantage, vectorised over units (a unit's form is decided by its first
    member's `pair_unit`). tests/test_pair_vectorised.py pins it to the loop over units."""
    rewards = np.asarray(rewards, dtype=np.float64)
    pair_unit = np.asarray(pair_unit, dtype=bool)
    n = len(rewards)
    if n == 0:
        return np.zeros(0)
    batch_std = float(np.std(rewards, ddof=1)) if n > 1 else 0.0
    unit_ids, unit = np.unique(unit_id, return_inverse=True)
    prompt_ids, prompt = np.unique(prompt_id, return_inverse=True)
    n_units, n_prompts = len(unit_ids), len(prompt_ids)
    order, starts, sizes = _groups(unit, n_units)
    size = sizes[unit]
    pos = np.empty(n, dtype=np.int64)  # position of each member within its unit
    pos[order] = np.arange(n) - np.repeat(starts, sizes)
    first = order[starts]  # first member of each unit
    is_pair = pair_unit[first][unit]

    # Pair units: R_l - R_r against the std of *all* the prompt's rewards, one per track
    # (docs/method.md, "Rewards and advantages"). Both R_l and R_r are among those rewards, so
    # |R_l - R_r| <= sqrt(2 (n - 1)) * std for a prompt of n tracks and |A| stays below that
    # bound. (A std over round-0 tracks only is 0 when they tie while a later round's pair
    # differs, and the advantage then explodes to (R_l - R_r) / eps.)
    partner = order[starts[unit] + size - 1 - pos]  # r[::-1] within the unit
    _, once = np.unique(
        np.stack([prompt, np.asarray(track_id, dtype=np.int64)]), axis=1, return_index=True
    )
    prompt_std = _per_group(rewards[once], prompt[once], n_prompts, _std)
    pair_centred, pair_std = rewards - rewards[partner], prompt_std[prompt[first]][unit]

    # Group units: R - mean (or leave-one-out mean) against the unit's own std.
    if loo:
        total = _per_group(rewards, unit, n_units, lambda m: m.sum(axis=1))[unit]
        group_centred = np.where(
            size > 1, rewards - (total - rewards) / np.maximum(size - 1, 1), rewards * 0
        )
    else:
        group_centred = rewards - _per_group(rewards, unit, n_units, lambda m: m.mean(axis=1))[unit]
    group_std = _per_group(rewards, unit, n_units, _std)[unit]

    centred = np.where(is_pair, pair_centred, group_centred)
    if scale == "none":
        return centred
    denom = (
        np.where(is_pair, pair_std, group_std) + eps
        if scale == "group"
        else np.full(n, batch_std + eps)
    )
    # A zero std means equal rewards, so a zero numerator: the advantage is 0 (not 0/0 when
    # eps = 0).
    return np.divide(centred, denom, out=np.zeros(n), where=denom > 0)


@estimator("grpo", scale="group")
def grpo_advantages(
    rewards, unit_id, prompt_id, track_id, pair_unit, *, scale="group", eps=1e-4
) -> np.ndarray:
    """Group: A_i = (R_i - mean_unit) / (std_unit + eps) (`scale`: group | batch | none;
    TRL's scale_rewards). Pair units: A_l = (R_l - R_r) / (std of all the prompt's rewards,
    one per track, + eps), A_r = -A_l; |A| < sqrt(2 (n - 1)) for n tracks."""
    return _estimate(
        rewards, unit_id, prompt_id, track_id, pair_unit, scale=scale, eps=eps, loo=False
    )


@estimator("rloo", scale="none")
def rloo_advantages(
    rewards, unit_id, prompt_id, track_id, pair_unit, *, scale="none", eps=1e-4
) -> np.ndarray:
    """Leave-one-out: A_i = R_i - mean of the other members = G/(G-1) (R_i - mean).
    Pair units: A_l = R_l - R_r. Unscaled unless `scale` says otherwise."""
    return _estimate(
        rewards, unit_id, prompt_id, track_id, pair_unit, scale=scale, eps=eps, loo=True
    )


def unit_advantages(
    rewards,
    unit_id,
    prompt_id,
    track_id,
    strategy,
    unit_size,
    *,
    estimator: str,
    scale: str = "auto",
    eps: float = 1e-4,
) -> np.ndarray:
    """Every unit member's advantage: the one place that decides it, for the pair stage's
    `advantage` column and for the update. A member of a two-member unit of a pair strategy
    gets the pair form; `scale="auto"` is the estimator's own default."""
    est = ADVANTAGES.get(estimator)
    pair_unit = np.isin(np.asarray(strategy), PAIR_STRATEGIES) & (np.asarray(unit_size) == 2)
    return est(
        np.asarray(rewards),
        np.asarray(unit_id),
        np.asarray(prompt_id),
        np.asarray(track_id),
        pair_unit,
        scale=est.scale if scale == "auto" else scale,
        eps=eps,
    )


def zero_signal(rewards, unit_id) -> np.ndarray:
    """True for the members of units whose members' rewards are all equal: every
    estimator gives them advantage 0, so they carry no policy-gradient signal."""
    rewards = np.asarray(rewards, dtype=np.float64)
    _, unit = np.unique(np.asarray(unit_id), return_inverse=True)
    n = int(unit.max()) + 1 if len(unit) else 0
    low = np.full(n, np.inf)
    high = np.full(n, -np.inf)
    np.minimum.at(low, unit, rewards)
    np.maximum.at(high, unit, rewards)
    return (low == high)[unit]
