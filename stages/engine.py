"""The rollout engine contract: what every engine returns, and the registry of engines.

An engine samples `generate.group_size` tracks per prompt as pairs with up to
`generate.rounds` rounds each (docs/method.md) and returns them as `Track`s with its counters.
Each engine module registers one `Engine` record:

    generate(policy_dir, prompt_ids, cfg, ctx, *, tokenizer, check_ids, prompt_offset=0)
        -> (tracks, metrics)
    reads     config keys that decide its rollouts beyond the generate stage's own (in the key)
    ignores   config keys it reads that only change where or how fast (not in the key)
    packages  installed packages whose versions are in the key

`metrics` is a flat dict of numbers the generate stage adds to its own (the engine's
counters, vLLM's weight-sync figures, ...), so `stages/generate.py` knows no engine.
`prompt_offset` is the position of the first prompt in the iteration's batch (a rollout
worker gets a shard): pair ids start at prompt_offset * group_size / 2, so they are the
same however the prompts are sharded. Track ids are then made canonical by `canonical`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline.registry import Registry


@dataclass
class Track:
    track_id: int
    pair_id: int
    prompt_index: int
    parent_track_id: int | None
    birth_round: int
    own_start: int
    response_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = ""

    def row(self, prompt_ids: list[list[int]]) -> dict:
        """The track as a rollouts-style dict (lineage, ids, log-probs), keyed by prompt index."""
        return {
            "prompt_id": str(self.prompt_index),
            "prompt_ids": prompt_ids[self.prompt_index],
            "pair_id": self.pair_id,
            "track_id": self.track_id,
            "parent_track_id": self.parent_track_id,
            "birth_round": self.birth_round,
            "own_start": self.own_start,
            "response_ids": self.response_ids,
            "logprobs": self.logprobs,
            "finish_reason": self.finish_reason,
        }


@dataclass
class Stats:
    """Counters every engine keeps; engines add their own in a subclass."""

    steps: int = 0
    forward_tokens: int = 0  # tokens fed through the model (prefill + decode, incl. idle rows)
    prefill_tokens: int = 0  # prompt tokens prefilled (once per distinct prompt)
    generated_tokens: int = 0  # tokens sampled for tracks (own tokens)
    inherited_tokens: int = 0  # prefix tokens newcomers got without sampling them again

    def add(self, other: Stats) -> None:
        for k, v in vars(other).items():
            setattr(self, k, getattr(self, k) + v)


@dataclass(frozen=True)
class Engine:
    generate: Callable[..., tuple[list[Track], dict]]
    reads: tuple[str, ...] = ()
    ignores: tuple[str, ...] = ()
    packages: tuple[str, ...] = ()


ENGINES: Registry = Registry("rollout engine", "generate.engine")


def engine(name: str, **kw):
    """Register `fn` as the generate function of engine `name` (see the module docstring)."""

    def deco(fn):
        ENGINES.register(name)(Engine(fn, **kw))
        return fn

    return deco


def canonical(tracks: list[Track]) -> list[Track]:
    """The tracks renumbered in one order that does not depend on batching or sharding:
    round-0 tracks by (pair, slot), then newcomers by (round, pair); parents remapped.
    Track ids must be unique on entry. The hf engine's lock-step batches and a vLLM
    engine's request rounds both come out numbered the same way."""
    order = sorted(tracks, key=lambda t: (t.birth_round, t.pair_id, t.track_id))
    new = {t.track_id: i for i, t in enumerate(order)}
    for t in order:
        t.track_id = new[t.track_id]
        if t.parent_track_id is not None:
            t.parent_track_id = new[t.parent_track_id]
    return order
