"""Lock-step dual-track sampler over a transformers causal LM (the `hf` rollout engine).

All tracks of a batch are decoded together, one token per step, with one shared KV cache.
A prompt owns `group_size` batch slots, organised as pairs of two adjacent slots. Both
tracks of a pair start from the same context (the prompt), so after `s` steps both hold
`s` response tokens unless one has ended (EOS, or `max_new_tokens` over the whole response).

Prefix inheritance (docs/method.md): when one track of a pair ends while the other,
the survivor, goes on, and the pair has rounds left, the ended track is emitted and its
slot is refilled by a newcomer that inherits the survivor's prefix. Because both slots
share the prompt, the left padding and the step count, the newcomer's state is exactly a
copy of the survivor's KV-cache rows: we copy them (`Cache.reorder_cache` with an index
that maps the slot to the survivor's row) and feed the newcomer the survivor's last token,
so its next token is sampled from the same distribution as the survivor's, independently.
No prefix is recomputed. With `rounds=1` slots are never refilled: plain independent pairs.

Rows of slots that have finished are dropped from the batch (the same index-select) once
they make up half of it, so long stragglers do not pay for finished tracks.

Log-probs recorded are of the temperature-scaled, unfiltered distribution — what the update
recomputes (as TRL does); with top_p/top_k < off the sampler draws from the filtered one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from pipeline import progress
from pipeline.lazy import lazy_import
from pipeline.models import load_policy, resolve_device
from stages.engine import Stats, Track, engine

torch = lazy_import("torch")  # loaded on first use: declarations and cache keys need none


@dataclass
class HFStats(Stats):
    kv_copies: int = 0  # newcomers that copied their survivor's KV-cache rows


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass before it already reaches top_p (keeps at least one).
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def _no_grad(fn):
    # torch.no_grad() as a decorator would load torch at import; this enters it per call.
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper


@_no_grad
def sample_tracks(
    model,
    prompt_ids: list[list[int]],
    *,
    group_size: int,
    rounds: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    eos_id: int,
    pad_id: int,
    generator: torch.Generator,
    first_track_id: int = 0,
    first_pair_id: int = 0,
) -> tuple[list[Track], HFStats]:
    """Sample `group_size` tracks per prompt in lock-step pairs; returns finished tracks."""
    device = next(model.parameters()).device
    n_prompts, stats = len(prompt_ids), HFStats()
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((n_prompts, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n_prompts, width), dtype=torch.long)
    for i, p in enumerate(prompt_ids):  # left padding: every row ends at the same column
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)

    # Prefill each distinct prompt once, then give each of its slots a copy of its rows.
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
        use_cache=True,
    )
    stats.prefill_tokens = int(mask.sum())
    stats.forward_tokens = ids.numel()
    cache = out.past_key_values
    rows = torch.arange(n_prompts, device=device).repeat_interleave(group_size)
    cache.reorder_cache(rows)
    mask = mask[rows]
    logits = out.logits[:, -1, :].float()[rows]
    positions = mask.sum(-1) - 1  # position of the last prompt token per row

    n_slots = n_prompts * group_size
    next_id, next_pair = first_track_id, first_pair_id
    slot_track: list[Track] = []
    for pi in range(n_prompts):
        for _ in range(group_size // 2):
            for _ in range(2):
                slot_track.append(Track(next_id, next_pair, pi, None, 0, 0))
                next_id += 1
            next_pair += 1
    pair_round = [0] * (n_slots // 2)
    live = [True] * n_slots  # slot holds a track still generating
    row_of_slot = list(range(n_slots))  # batch row of each slot (changes on compaction)
    finished: list[Track] = []

    while any(live):
        scaled = logits / temperature
        logp_all = torch.log_softmax(scaled, dim=-1)
        probs = torch.softmax(_filter_logits(scaled, top_k, top_p), dim=-1)
        tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        tok_lp = logp_all.gather(-1, tok[:, None]).squeeze(-1)
        tok_l, lp_l = tok.tolist(), tok_lp.tolist()
        stats.steps += 1

        ended = []
        for slot in range(n_slots):
            if not live[slot]:
                continue
            t, r = slot_track[slot], row_of_slot[slot]
            t.response_ids.append(tok_l[r])
            t.logprobs.append(lp_l[r])
            stats.generated_tokens += 1
            if tok_l[r] == eos_id or len(t.response_ids) >= max_new_tokens:
                t.finish_reason = "eos" if tok_l[r] == eos_id else "length"
                ended.append(slot)

        # End of step: emit ended tracks; refill a slot whose partner survives, if rounds remain.
        copy_src: dict[int, int] = {}  # row -> row whose KV it takes
        for slot in ended:
            live[slot] = False
            finished.append(slot_track[slot])
        for slot in ended:
            partner = slot ^ 1
            pair = slot // 2
            if live[partner] and pair_round[pair] + 1 < rounds:
                survivor = slot_track[partner]
                pair_round[pair] += 1
                slot_track[slot] = Track(
                    next_id,
                    survivor.pair_id,
                    survivor.prompt_index,
                    survivor.track_id,
                    pair_round[pair],
                    len(survivor.response_ids),
                    list(survivor.response_ids),
                    list(survivor.logprobs),
                )
                next_id += 1
                live[slot] = True
                copy_src[row_of_slot[slot]] = row_of_slot[partner]
                stats.kv_copies += 1
                stats.inherited_tokens += len(survivor.response_ids)
        if not any(live):
            break

        # One index-select does both the KV copies and the dropping of finished rows.
        n_rows = mask.shape[0]
        live_rows = {row_of_slot[s] for s in range(n_slots) if live[s]}
        compact = len(live_rows) <= n_rows // 2
        keep = sorted(live_rows) if compact else list(range(n_rows))
        src = [copy_src.get(r, r) for r in keep]
        if copy_src or compact:
            idx = torch.tensor(src, device=device)
            cache.reorder_cache(idx)
            mask, positions = mask[idx], positions[idx]
            if compact:
                new_row = {r: i for i, r in enumerate(keep)}
                row_of_slot = [new_row.get(r, -1) for r in row_of_slot]

        feed = torch.full((mask.shape[0],), pad_id, dtype=torch.long, device=device)
        for slot in range(n_slots):
            if live[slot]:
                feed[row_of_slot[slot]] = slot_track[slot].response_ids[-1]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions + 1
        out = model(
            input_ids=feed[:, None],
            attention_mask=mask,
            position_ids=positions[:, None],
            past_key_values=cache,
            use_cache=True,
        )
        cache = out.past_key_values
        logits = out.logits[:, -1, :].float()
        stats.forward_tokens += feed.numel()

    return finished, stats


# batch_tracks and workers are read: the sampler draws from one generator row by row over
# the batch, so how prompts are chunked (and sharded over rollout workers, each with its
# own generator) decides which random numbers a track gets.
@engine("hf", reads=("generate.batch_tracks", "generate.workers"), ignores=("generate.device",))
def generate(
    policy_dir: Path,
    prompt_ids: list[list[int]],
    cfg,
    ctx,
    *,
    tokenizer,
    check_ids: list[int],
    prompt_offset: int = 0,
) -> tuple[list[Track], dict]:
    """The engine contract (stages/engine.py) over `sample_tracks`, in chunks of
    `generate.batch_tracks` tracks."""
    g = cfg.generate
    device = resolve_device(g.device)
    model = load_policy(policy_dir, device, trust_remote_code=cfg.model_trust_remote_code)
    # The sampler draws on the model's device; one seeded stream per (seed, iteration).
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + ctx.iteration)
    per_chunk = max(1, g.batch_tracks // g.group_size)
    tracks, totals = [], HFStats()
    shown = progress.bar(len(prompt_ids) * g.group_size, "generate", "track", ctx)
    for start in range(0, len(prompt_ids), per_chunk):
        chunk = prompt_ids[start : start + per_chunk]
        got, st = sample_tracks(
            model,
            chunk,
            group_size=g.group_size,
            rounds=g.rounds,
            max_new_tokens=g.max_new_tokens,
            temperature=g.temperature,
            top_p=g.top_p,
            top_k=g.top_k,
            eos_id=tokenizer.eos_token_id,
            pad_id=tokenizer.pad_token_id,
            generator=gen,
            first_track_id=len(tracks),
            first_pair_id=(prompt_offset + start) * g.group_size // 2,
        )
        for t in got:
            t.prompt_index += start
        tracks += got
        shown.update(len(chunk) * g.group_size)
        totals.add(st)
        ctx.log(
            f"  generate: {min(start + per_chunk, len(prompt_ids))}/{len(prompt_ids)} prompts, "
            f"{len(tracks)} tracks"
        )
    shown.close()
    return tracks, vars(totals)
