"""Update-stage math: hand-worked weights and losses, and exact gradient accumulation."""

import math

import numpy as np
import pytest
import torch

from pipeline.models import load_policy
from stages import losses
from stages.update import minibatch_backward


def test_seq_mean_token_mean_weights_by_hand():
    """Two members of lengths 2 and 4 (B=2): w = 1/(B*|o|) = 1/4 and 1/8 per token."""
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    w = losses.LOSS_AGGS.get("seq_mean_token_mean")(mask=mask)
    assert torch.allclose(w, torch.tensor([[0.25, 0.25, 0, 0], [0.125] * 4]))


def test_token_mean_weights_by_hand():
    """Six loss tokens in all: every token weighs 1/6, whatever its response's length."""
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    w = losses.LOSS_AGGS.get("token_mean")(mask=mask)
    assert torch.allclose(w, mask.float() / 6)


def test_grpo_clipped_surrogate_by_hand():
    """ratio 1.5 (logp - old = ln 1.5), clip 0.2:
    A=+1: max(-1.5, -1.2) = -1.2 (clipped);  A=-1: max(1.5, 1.2) = 1.5 (not clipped);
    ratio 1: loss = -A."""
    logp = torch.tensor([[math.log(1.5), 0.0], [math.log(1.5), 0.0]])
    old = torch.zeros(2, 2)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 2, dtype=torch.bool)
    loss, st = losses.ALGORITHMS.get("grpo")(logp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    assert torch.allclose(loss, torch.tensor([[-1.2, -1.0], [1.5, 1.0]]))
    assert st["clipfrac"] == pytest.approx(0.25)


def test_per_token_gradient_weight_is_minus_advantage_times_agg_weight():
    """At ratio 1, d loss / d logp[b,t] = -A_b * w[b,t]: for seq_mean_token_mean a token of a
    length-2 response weighs 1/4, one of a length-4 response 1/8 (the GRPO length coupling)."""
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    logp = torch.zeros(2, 4, requires_grad=True)
    adv = torch.tensor([1.0, -2.0])
    w = losses.LOSS_AGGS.get("seq_mean_token_mean")(mask=mask)
    tok, _ = losses.ALGORITHMS.get("grpo")(logp, torch.zeros(2, 4), adv, mask,
                                            clip_low=0.2, clip_high=0.2)
    (w * tok * mask).sum().backward()
    expected = torch.tensor([[-0.25, -0.25, 0, 0], [0.25, 0.25, 0.25, 0.25]])
    assert torch.allclose(logp.grad, expected)


def test_micro_batches_give_the_full_batch_gradient(random_model_dir, make_cfg):
    rng = np.random.default_rng(0)
    n = 6
    cols = {"context_ids": [], "segment_ids": [], "old_logprobs": [], "loss_mask": [],
            "advantage": []}
    for i in range(n):
        c, s = int(rng.integers(2, 6)), int(rng.integers(1, 7))
        cols["context_ids"].append(rng.integers(3, 200, c).tolist())
        cols["segment_ids"].append(rng.integers(3, 200, s).tolist())
        cols["old_logprobs"].append((-rng.random(s) * 6).tolist())
        cols["loss_mask"].append([bool(b) for b in rng.random(s) > 0.2])
        cols["advantage"].append(float(rng.normal()))
    grads = []
    for micro in (1, 4, n):
        cfg = make_cfg(f"update.micro_batch_size={micro}")
        model = load_policy(random_model_dir, torch.device("cpu"))
        model.zero_grad()
        minibatch_backward(model, cols, np.arange(n), cfg, 0, torch.device("cpu"))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert grads[0].abs().sum() > 0
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], rtol=1e-4, atol=1e-6)
