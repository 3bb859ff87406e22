"""A scripted stand-in for a causal LM, for property tests of the lock-step engine's logic.

Its next-token distribution is a deterministic function of the row's whole history
(prompt + response so far), held in a fake KV cache that supports `reorder_cache` like
transformers' caches. So a newcomer that got the survivor's cache rows sees exactly the
survivor's history, and `next_logprobs(history)` recomputes any recorded log-prob from
scratch. The real-model tests (test_engine.py) check the same engine on a transformers model.
"""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import torch

V, PAD, EOS = 6, 0, 1


class FakeCache:
    def __init__(self, hist: torch.Tensor):
        self.hist = hist

    def reorder_cache(self, idx: torch.Tensor) -> None:
        self.hist = self.hist.index_select(0, idx)


def next_logprobs(history: list[int], eos_bias: float) -> torch.Tensor:
    h = hashlib.sha256(bytes(str([t for t in history if t != PAD]), "ascii")).digest()
    g = torch.Generator().manual_seed(int.from_bytes(h[:8], "little"))
    logits = torch.randn(V, generator=g)
    logits[PAD] = float("-inf")
    logits[EOS] += eos_bias
    return torch.log_softmax(logits, -1)


class ScriptedLM(torch.nn.Module):
    def __init__(self, eos_bias: float = 0.0):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.eos_bias = eos_bias

    def forward(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        use_cache=True,
    ):
        hist = (
            input_ids
            if past_key_values is None
            else torch.cat([past_key_values.hist, input_ids], dim=1)
        )
        last = torch.stack([next_logprobs(row.tolist(), self.eos_bias) for row in hist])
        logits = last[:, None, :].expand(-1, input_ids.shape[1], -1)
        return SimpleNamespace(logits=logits, past_key_values=FakeCache(hist))
