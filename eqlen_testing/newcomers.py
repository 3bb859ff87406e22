"""A statistical check that a newcomer samples from its inherited context (docs/method.md,
"Prefix inheritance"), shared by both engines' tests."""

from __future__ import annotations

import numpy as np
import torch


def _pit(model, tok, context, token, u, temperature):
    """Randomised probability-integral transform of `token` under p(. | context)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([context])).logits[0, -1].float() / temperature
    p = torch.softmax(logits, -1).double()
    return float(p[:token].sum() + u * p[token])


def _ks_uniform(values):
    x = np.sort(values)
    n = len(x)
    return max(np.max(np.arange(1, n + 1) / n - x), np.max(x - np.arange(n) / n))


def assert_newcomers_sample_their_context(model, tok, prompts, tracks, temperature):
    """KS test at the 1% level (critical value 1.63 / sqrt(n)) that the newcomers' first own
    tokens have Uniform(0, 1) randomised PITs under p(. | prompt + survivor prefix), and that
    the same test with the prompt alone as context rejects."""
    newcomers = [t for t in tracks if t.parent_track_id is not None]
    assert len(newcomers) >= 60
    rng = np.random.default_rng(0)
    right, wrong = [], []
    for t in newcomers:
        tokn, u = t.response_ids[t.own_start], rng.random()
        ctx = prompts[t.prompt_index] + t.response_ids[: t.own_start]
        right.append(_pit(model, tok, ctx, tokn, u, temperature))
        wrong.append(_pit(model, tok, prompts[t.prompt_index], tokn, u, temperature))
    crit = 1.63 / np.sqrt(len(newcomers))
    assert _ks_uniform(right) < crit
    assert _ks_uniform(wrong) > crit
