"""Synthetic `scored` tables by the lock-step rules of docs/method.md, at any size: what the
pair stage's benchmark (benchmarks/bench_pair.py) and its tests run on. Made with numpy,
no model: token ids and log-probs are random, the lineage (pairs, rounds, inherited
prefixes, EOS, budget) is exactly what the dual-track engine produces."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

import schemas

EOS = 2  # token id of EOS in the synthetic vocabulary; ids 0-2 are special, never sampled


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + n) for each (s, n): the indices of many slices at once."""
    total = int(lengths.sum())
    ends = np.cumsum(lengths)
    idx = np.arange(total, dtype=np.int64)
    return idx + np.repeat(starts - (ends - lengths), lengths)


def _lengths(rng, n: int, max_new_tokens: int) -> np.ndarray:
    return np.minimum(rng.geometric(min(1.0, 3.0 / max_new_tokens), n), max_new_tokens)


def _lineage(rng, n_pairs: int, rounds: int, max_new_tokens: int) -> dict[str, np.ndarray]:
    """Lock-step lineage of every pair: per track its pair, response length, parent track
    (-1 for round-0 tracks), birth round and own_start. Tracks 2p, 2p+1 start pair p."""
    pair_of = np.repeat(np.arange(n_pairs), 2)
    length = _lengths(rng, 2 * n_pairs, max_new_tokens)
    parent = np.full(2 * n_pairs, -1)
    birth = np.zeros(2 * n_pairs, dtype=np.int64)
    own = np.zeros(2 * n_pairs, dtype=np.int64)
    a, b = np.arange(0, 2 * n_pairs, 2), np.arange(1, 2 * n_pairs, 2)
    for k in range(1, rounds):
        la, lb = length[a], length[b]
        go = la != lb  # both ended on the same step: the pair is done
        a, b, la, lb = a[go], b[go], la[go], lb[go]
        survivor = np.where(la > lb, a, b)
        start = np.minimum(la, lb)  # the step the other track ended on
        if not len(survivor):
            break
        new_ids = len(length) + np.arange(len(survivor))
        # start < the survivor's length <= max_new_tokens, so the newcomer gets >= 1 own token.
        new_len = np.minimum(start + _lengths(rng, len(survivor), max_new_tokens), max_new_tokens)
        pair_of = np.concatenate([pair_of, pair_of[survivor]])
        length = np.concatenate([length, new_len])
        parent = np.concatenate([parent, survivor])
        birth = np.concatenate([birth, np.full(len(survivor), k)])
        own = np.concatenate([own, start])
        a, b = survivor, new_ids
    return {"pair": pair_of, "length": length, "parent": parent, "birth": birth, "own": own}


def synthetic_scored(
    n_rows: int,
    *,
    rounds: int,
    group_size: int = 8,
    max_new_tokens: int = 64,
    prompt_len: tuple[int, int] = (16, 64),
    vocab: int = 32000,
    seed: int = 0,
) -> pa.Table:
    """A valid `scored` table of whole prompts with at most n_rows rows (at least one prompt)."""
    rng = np.random.default_rng(seed)
    half = group_size // 2
    n_pairs = max(half, (n_rows // 2) // half * half)
    lin = _lineage(rng, n_pairs, rounds, max_new_tokens)
    # Keep the whole prompts whose tracks fit in n_rows.
    prompt_of_track = lin["pair"] // half
    per_prompt = np.bincount(prompt_of_track, minlength=n_pairs // half)
    n_prompts = max(1, int(np.searchsorted(np.cumsum(per_prompt), n_rows, side="right")))
    keep = prompt_of_track < n_prompts
    # Track ids as the engine numbers them: round-0 tracks in pair order, then newcomers by
    # the step they were born on.
    first = lin["birth"] == 0
    newcomers = np.flatnonzero(keep & ~first)
    order = np.concatenate(
        [
            np.flatnonzero(keep & first),
            newcomers[np.lexsort((lin["pair"][newcomers], lin["own"][newcomers]))],
        ]
    )
    track_id = np.full(len(keep), -1)
    track_id[order] = np.arange(len(order))
    lin = {k: v[order] for k, v in lin.items()}
    n = len(order)
    length, own, parent_old = lin["length"], lin["own"], lin["parent"]
    parent = np.where(parent_old >= 0, track_id[np.maximum(parent_old, 0)], -1)  # = its row

    # Tokens: fresh everywhere, then each newcomer's prefix copied from its survivor, round by
    # round (a survivor born in round k-1 is complete before round k's newcomers copy it).
    offsets = np.concatenate([[0], np.cumsum(length)])
    ids = rng.integers(EOS + 1, vocab, int(offsets[-1]), dtype=np.int32)
    logprobs = (-rng.exponential(1.0, int(offsets[-1]))).astype(np.float32)
    for k in range(1, rounds):
        rows = np.flatnonzero(lin["birth"] == k)
        dst = _ranges(offsets[rows], own[rows])
        src = _ranges(offsets[parent[rows]], own[rows])
        ids[dst], logprobs[dst] = ids[src], logprobs[src]
    ended_by_eos = (length < max_new_tokens) | (rng.random(n) < 0.3)
    ids[offsets[1:][ended_by_eos] - 1] = EOS

    # Prompts: token ids, text, answer and a 0/1 reward with a per-prompt success rate.
    p_len = rng.integers(prompt_len[0], prompt_len[1] + 1, n_prompts)
    p_off = np.concatenate([[0], np.cumsum(p_len)])
    p_ids = rng.integers(EOS + 1, vocab, int(p_off[-1]), dtype=np.int32)
    prompt_lists = pa.ListArray.from_arrays(pa.array(p_off, pa.int32()), pa.array(p_ids))
    prompt_text = pa.StringArray.from_buffers(
        n_prompts,
        pa.py_buffer(p_off.astype(np.int32)),
        pa.py_buffer((p_ids % 26 + 97).astype(np.uint8)),
    )
    prompt_of_row = lin["pair"] // half
    take = pa.array(prompt_of_row)
    success = rng.beta(0.7, 0.7, n_prompts)[prompt_of_row]
    reward = (rng.random(n) < success).astype(np.float64)
    prompt_id = pa.array([f"p{i:07d}" for i in range(n_prompts)])
    answer = pa.array([str(i % 99991) for i in range(n_prompts)])
    text = pa.StringArray.from_buffers(
        n, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer((ids % 10 + 48).astype(np.uint8))
    )
    columns = {
        "prompt_id": prompt_id.take(take),
        "prompt": prompt_text.take(take),
        "iteration": pa.array(np.zeros(n, np.int32)),
        "prompt_ids": prompt_lists.take(take),
        "pair_id": pa.array(lin["pair"]),
        "track_id": pa.array(np.arange(n)),
        "parent_track_id": pa.array(parent, mask=parent < 0),
        "birth_round": pa.array(lin["birth"].astype(np.int32)),
        "own_start": pa.array(own.astype(np.int32)),
        "response_ids": pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(ids)),
        "logprobs": pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(logprobs)),
        "finish_reason": pa.array(np.where(ended_by_eos, "eos", "length")),
        "response": text,
        "reward": pa.array(reward),
        "answer": answer.take(take),
        "reward_exact_match": pa.array(reward),
    }
    return schemas.validate(pa.table(columns), schemas.SCORED)
