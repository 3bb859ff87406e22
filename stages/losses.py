"""Policy-gradient objectives and loss aggregations, as small pure functions.

The update minimises   L = sum_{b,t} w[b,t] * l[b,t]

where `l` is the per-token surrogate of the algorithm and `w` the per-token weight of
the loss aggregation. Writing the aggregation as an explicit weight tensor, computed once
over the whole mini-batch before it is split into micro-batches, makes gradient
accumulation exact (the micro-batch gradients sum to the full-batch gradient) and makes
`w` itself a diagnostic: it is the weight that couples a token's gradient to the length
of its response (DESIGN.md section 1).

Tensors: B sequences (unit members), L = longest segment in the mini-batch.
    mask        [B, L] bool   token enters the loss
    logp, old   [B, L] float  log-prob under the current / sampling policy
    adv         [B]    float  advantage of the member
"""

from __future__ import annotations

import torch

from pipeline.registry import Registry

LOSS_AGGS: Registry = Registry("loss aggregation", "update.loss_agg")
ALGORITHMS: Registry = Registry("algorithm", "update.algorithm")


@LOSS_AGGS.register("seq_mean_token_mean")
def seq_mean_token_mean(mask: torch.Tensor, **_) -> torch.Tensor:
    """GRPO (Shao et al. 2024; TRL loss_type='grpo', verl 'seq-mean-token-mean'):
    w[b,t] = 1 / (B * |o_b|), |o_b| = tokens of member b in the loss."""
    m = mask.float()
    n_seq = mask.any(-1).sum().clamp(min=1)
    return m / (m.sum(-1, keepdim=True).clamp(min=1) * n_seq)


@LOSS_AGGS.register("token_mean")
def token_mean(mask: torch.Tensor, **_) -> torch.Tensor:
    """DAPO (Yu et al. 2025; TRL 'dapo'/'bnpo', verl 'token-mean'): w = 1 / sum_b |o_b|."""
    m = mask.float()
    return m / m.sum().clamp(min=1)


@ALGORITHMS.register("grpo")
def grpo_token_loss(logp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                    *, clip_low: float, clip_high: float, **_) -> tuple[torch.Tensor, dict]:
    """PPO/GRPO clipped surrogate with a token-level ratio r = exp(logp - old):
    l = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))."""
    ratio = torch.exp(logp - old)
    a = adv[:, None]
    pg_loss1 = -a * ratio
    pg_loss2 = -a * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(pg_loss1, pg_loss2)
    with torch.no_grad():
        m = mask.float()
        n = m.sum().clamp(min=1)
        stats = {
            "clipfrac": float(((pg_loss2 > pg_loss1).float() * m).sum() / n),
            "approx_kl": float((((ratio - 1) - (logp - old)) * m).sum() / n),  # k3 of old vs new
            "ratio_mean": float((ratio * m).sum() / n),
        }
    return loss, stats
