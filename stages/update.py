"""Stage 4, update: one policy-optimisation step on comparison units.

(Over 500 lines: the one-process loop and its data-parallel form are one `train`; the
rank machinery itself lives in stages/distributed.py, LoRA in stages/lora.py.)

Reads the units dataset and the policy the iteration started from, then

1. computes each member's advantage (`update.advantage`: the algorithm's estimator, or the
   pair stage's `advantage` column) and its loss mask (`update.mask_truncated`);
2. for `update.epochs` passes, splits the members (seeded shuffle) into
   `update.minibatches` mini-batches; per mini-batch it computes the per-token weights of
   `update.loss_agg` over the whole mini-batch, runs micro-batches of
   `update.micro_batch_size` members (forward on context + segment, log-probs at the
   sampling temperature, the algorithm's per-token surrogate, plus beta * k3 KL to the
   frozen initial policy), accumulates gradients, clips their norm and takes an AdamW step
   (learning rate from `update.lr_schedule` with warmup, over the run's global step).

Because the weights are fixed per mini-batch before it is split, the accumulated gradient
equals the full-batch gradient whatever the micro-batch size (tested). Members of units
whose rewards are all equal carry no policy-gradient signal: with `skip_zero_signal` they
are not forwarded, but still counted in the normalisers, so nobody else's weight moves.

With `update.lora_r > 0` (stages/lora.py) only a LoRA adapter trains (PEFT; the
optimizer holds the adapter's parameters alone): its base is the `reference` (initial)
model, the adapter is fresh (seeded) at the first iteration and the previous update's
`model/adapter/` afterwards, with its optimizer state and global step; a policy that is
neither the reference nor carries an adapter trained on it becomes the base of a fresh
adapter. When the base is the reference, the KL reference is the same model with the
adapter disabled, so no second copy is loaded. peft is imported, and its version is in
the cache key, only then.

Writes `model/` (Hugging Face checkpoint + tokenizer, `from_pretrained` loads it; with
LoRA the merged weights W + (alpha / r) * B @ A, plus the PEFT adapter in
`model/adapter/`) with `optimizer.pt` and `trainer_state.json` (global step; with LoRA
also the adapter's base), `metrics.parquet` (one row per optimizer step), and
`token_weights.parquet`: per member, on the first epoch, the mini-batch it fell in, the
advantage used, the aggregation weight w[b,t] and the exact per-token gradient weight
d loss / d logp[b,t] — the length diagnostics, open to independent recomputation. A tqdm
bar over the optimizer steps (rate, ETA) shows on a terminal only.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import schemas
from pipeline import progress
from pipeline.config import Config
from pipeline.lazy import lazy_import
from pipeline.models import load_policy, load_tokenizer, resolve_device
from pipeline.stage import Stage, expand
from stages import losses
from stages.losses import ALGORITHMS, LOSS_AGGS, k3_kl
from stages.members import Ragged, as_columns, from_table, gather_pad

torch = lazy_import("torch")  # loaded on first use: declarations and cache keys need none

OPTIMIZER_FILE, STATE_FILE = "optimizer.pt", "trainer_state.json"


# Where the step runs, not what it is: N data-parallel ranks take the same step as one
# (tested to 1e-5 relative), on CPU or GPU.
# (generate.workers: with update.workers, how many CPUs a local Ray instance offers.)
WHERE = (
    "update.device",
    "update.workers",
    "update.sharding",
    "cluster.ray_address",
    "generate.workers",
)


def reads(cfg: Config) -> tuple[str, ...]:
    keys = [k for k in expand(("update.*",), cfg) if k not in WHERE]
    keys += [
        "seed",
        "generate.temperature",
        "generate.max_new_tokens",
        "score.correct_threshold",
    ]  # the length diagnostics split by correctness
    if cfg.update.lr_schedule != "constant":
        # Only a decaying schedule depends on the run's length; with `constant` an extended
        # run (--iterations 4 -> 5) serves iterations 0-3 from the cache.
        keys.append("iterations")
    return tuple(keys)


def pad(seqs, value, dtype) -> torch.Tensor:
    """Rows (a `Ragged` or lists) as one right-padded [rows, width] tensor."""
    return as_ragged(seqs).pad(value, dtype)


def as_ragged(rows) -> Ragged:
    return rows if isinstance(rows, Ragged) else Ragged.from_lists(rows)


def segment_logprobs(
    model,
    context,
    segment,
    pad_id: int,
    temperature: float,
    device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs [B, Lseg] (right-padded) of each segment given its context, and entropy.
    `context` and `segment`: token-id rows, a `Ragged` or lists."""
    return forward(
        model, micro(segment_batch(context, segment, pad_id), 0, None), temperature, device
    )


def forward(model, x: dict, temperature: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """`segment_logprobs` on the inputs `micro` gives."""
    x = {k: x[k].to(device) for k in ("ids", "attn", "pos", "targets")}
    logits = model(input_ids=x["ids"], attention_mask=x["attn"]).logits.float() / temperature
    seg_logits = logits.gather(1, x["pos"][..., None].expand(-1, -1, logits.shape[-1]))
    logp_all = torch.log_softmax(seg_logits, -1)
    logp = logp_all.gather(-1, x["targets"][..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def segment_batch(context, segment, pad_id: int, rows=None) -> dict:
    """Rows (default: all) of context and segment ids gathered and right-padded together
    (CPU): `ids` (context + segment) with their `attn` mask, `targets` (segment) and the
    `pos` whose logits predict them, and each row's lengths (numpy). A micro-batch is a
    slice of it (`micro`); `micro_batches` makes one per chunk of micro-batches."""
    context, segment = as_ragged(context), as_ragged(segment)
    rows = np.arange(len(segment)) if rows is None else rows
    ids, seq_len = gather_pad([context, segment], rows, pad_id, np.int64)
    targets, seg_len = gather_pad([segment], rows, pad_id, np.int64)
    # Token j of the segment sits at position len(c)+j and is predicted at len(c)+j-1.
    pos = np.arange(targets.shape[1])[None] + (seq_len - seg_len)[:, None] - 1
    return {
        "ids": torch.from_numpy(ids),
        "attn": torch.from_numpy(np.arange(ids.shape[1])[None] < seq_len[:, None]).long(),
        "targets": torch.from_numpy(targets),
        "pos": torch.from_numpy(pos),
        "seq_len": seq_len,
        "seg_len": seg_len,
    }


def micro(x: dict, start: int, stop: int | None) -> dict[str, torch.Tensor]:
    """Rows start:stop of a `segment_batch`, cut to their own widths."""
    width = int(x["seq_len"][start:stop].max())
    seg_width = int(x["seg_len"][start:stop].max())
    return {
        "ids": x["ids"][start:stop, :width],
        "attn": x["attn"][start:stop, :width],
        # Positions past a row's own segment (padding) stay inside the cut.
        "pos": x["pos"][start:stop, :seg_width].clamp(max=width - 2),
        "targets": x["targets"][start:stop, :seg_width],
    }


# Micro-batches gathered at a time: one gather per micro-batch costs more in numpy calls
# than the Parquet read, one per mini-batch pages in matrices of hundreds of MB
# (benchmarks/bench_data.py); a chunk stays in cache.
CHUNK = 16


def micro_batches(
    cols: dict, mb: np.ndarray, active: np.ndarray, size: int, count: int, pad_id: int, width: int
):
    """The micro-batches of mini-batch `mb` (member indices) this rank forwards: positions
    `active` of `mb`, `size` at a time, then as many repeats as make `count` (member 0 of
    `mb` at weight 0: FSDP's collectives need every rank to run as many). Yields
    (positions in `mb`, weight scale, `micro` inputs plus `old` log-probs padded to
    `width` and `adv`)."""

    def gather(pos):
        rows = mb[pos]
        x = segment_batch(cols["context_ids"], cols["segment_ids"], pad_id, rows)
        x["old"] = cols["old_logprobs"].pad(0.0, torch.float32, width, rows)
        x["adv"] = torch.as_tensor(cols["advantage"][rows], dtype=torch.float32)
        return x

    made = 0
    for c in range(0, len(active), size * CHUNK):
        chunk = active[c : c + size * CHUNK]
        x = gather(chunk)
        for s in range(0, len(chunk), size):
            m = micro(x, s, s + size)
            made += 1
            yield (
                chunk[s : s + size],
                1.0,
                {**m, "old": x["old"][s : s + size], "adv": x["adv"][s : s + size]},
            )
    if count > made:
        x = gather(np.array([0]))
        rep = {**micro(x, 0, 1), "old": x["old"], "adv": x["adv"]}
        for _ in range(count - made):
            yield np.array([0]), 0.0, rep


def advantages(cols: dict[str, list], cfg: Config) -> np.ndarray:
    """Each member's advantage under `update.advantage` (see stages/losses.py)."""
    u = cfg.update
    name = ALGORITHMS.get(u.algorithm).advantage if u.advantage == "auto" else u.advantage
    if name == "units":
        return np.asarray(cols["advantage"], dtype=np.float64)
    return losses.unit_advantages(
        cols["reward"],
        cols["unit_id"],
        cols["prompt_id"],
        cols["track_id"],
        cols["strategy"],
        cols["unit_size"],
        estimator=name,
        scale=u.scale_rewards,
        eps=u.eps,
    )


def zero_signal(cols: dict[str, list]) -> np.ndarray:
    """True for members of units whose members' rewards are all equal."""
    return losses.zero_signal(cols["reward"], cols["unit_id"])


def minibatch_backward(
    model,
    cols: dict[str, list],
    mb,
    cfg: Config,
    pad_id: int,
    device,
    *,
    ref_model=None,
    record: list | None = None,
) -> dict:
    """Accumulate the gradient of one mini-batch (member indices `mb`) into model.grad.

    `cols` holds per-member lists: context_ids, segment_ids, old_logprobs, loss_mask,
    advantage (used as is), unit_id, and optionally `skip` (members not forwarded).
    The aggregation's weights are computed over the whole mini-batch first, so the sum over
    micro-batches is exactly the full-batch loss and gradient. With `record`, appends per
    member (index, w[b,:n], d loss / d logp[b,:n]).
    """
    sums = backward_sums(model, cols, mb, cfg, pad_id, device, ref_model=ref_model, record=record)
    return step_stats(sums)


def minibatch_plan(
    cols: dict, mb: np.ndarray, cfg: Config, device, *, rank=0, world=1, even=False
) -> dict:
    """What is decided on the whole mini-batch `mb` before any member is forwarded: its
    padded loss `mask`, the `weights` of `update.loss_agg`, the members not skipped
    (`forwarded`, positions in `mb`), this rank's share of them (`active`) and how many
    micro-batches it runs (`count`; with `even`, as many as the busiest rank)."""
    u = cfg.update
    mask = cols["loss_mask"].pad(False, torch.bool, rows=mb).to(device)
    _, unit = np.unique(cols["unit_id"][mb], return_inverse=True)
    weights = LOSS_AGGS.get(u.loss_agg)(
        mask,
        torch.as_tensor(unit, device=device),
        max_new_tokens=cfg.generate.max_new_tokens,
        alpha=u.delta_l_alpha,
    )
    skip = cols.get("skip")
    forwarded = (
        np.arange(len(mb)) if skip is None else np.flatnonzero(~np.asarray(skip, dtype=bool)[mb])
    )
    active = forwarded[rank::world]
    count = math.ceil(len(active) / u.micro_batch_size)
    if even:
        count = max(math.ceil(len(forwarded[r::world]) / u.micro_batch_size) for r in range(world))
    return {
        "mask": mask,
        "weights": weights,
        "width": mask.shape[1],
        "forwarded": forwarded,
        "active": active,
        "count": count,
    }


def backward_sums(
    model,
    cols: dict[str, list],
    mb,
    cfg: Config,
    pad_id: int,
    device,
    *,
    ref_model=None,
    record: list | None = None,
    rank: int = 0,
    world: int = 1,
    even: bool = False,
) -> dict:
    """`minibatch_backward`'s work, returning sums (loss, token-weighted statistics, token
    and member counts) instead of means, so data-parallel ranks can add theirs up.

    With `world` > 1 the mini-batch's weights are still computed over all of `mb`; rank r
    forwards only every world-th forwarded member from the r-th, so the ranks' gradients
    add up to the one-process gradient. `even`: every rank runs as many micro-batches as
    the busiest one (zero-weight repeats of a member), as FSDP's collectives need."""
    u = cfg.update
    algo = ALGORITHMS.get(u.algorithm)
    cols = as_columns(cols)
    mb = np.asarray(mb, dtype=np.int64)
    plan = minibatch_plan(cols, mb, cfg, device, rank=rank, world=world, even=even)
    mask, weights, active, width = plan["mask"], plan["weights"], plan["active"], plan["width"]
    forwarded = plan["forwarded"]
    total, ent_sum, kl_sum = 0.0, 0.0, 0.0
    stat_sums = dict.fromkeys(
        ("clipfrac", "clipfrac_low", "clipfrac_high", "ratio_mean", "approx_kl"), 0.0
    )
    autocast = torch.autocast(
        "cuda", dtype=torch.bfloat16, enabled=bool(u.bf16 and torch.device(device).type == "cuda")
    )
    temp = cfg.generate.temperature
    batches = micro_batches(cols, mb, active, u.micro_batch_size, plan["count"], pad_id, width)
    for pos, scale, x in batches:
        # scale 0: a repeat (even), for the collectives only: no gradient, no statistics.
        idx = mb[pos]
        with autocast:
            logp, entropy = forward(model, x, temp, device)
        # Pad to the mini-batch width so the precomputed weights line up.
        logp = torch.nn.functional.pad(logp, (0, width - logp.shape[1]))
        if record is not None:
            logp.retain_grad()
        entropy = torch.nn.functional.pad(entropy, (0, width - entropy.shape[1]))
        old, adv = x["old"].to(device), x["adv"].to(device)
        m, w = mask[pos], weights[pos] * scale
        tok_loss, st = algo(logp, old, adv, m, **algo.kwargs(u))
        loss = (w * tok_loss * m).sum()
        if ref_model is not None and u.beta > 0:
            with torch.no_grad(), autocast:
                ref, _ = forward(ref_model, x, temp, device)
            kl = k3_kl(logp, torch.nn.functional.pad(ref, (0, width - ref.shape[1])))
            loss = loss + u.beta * (w * kl * m).sum()
            kl_sum += float((kl.detach() * m).sum()) * scale
        # (FSDP averages gradients over ranks: `even` ranks scale theirs to make it a sum.)
        grad_scale = world if even else 1
        (loss * grad_scale).backward()
        if scale == 0:
            continue
        total += float(loss.detach())
        k = float(m.sum())
        ent_sum += float((entropy.detach() * m).sum())
        for key, v in st.items():
            stat_sums[key] = stat_sums.get(key, 0.0) + v * k
        if record is not None:
            for j, (i, n) in enumerate(zip(idx.tolist(), cols["segment_ids"].lengths_of(idx))):
                record.append((i, w[j, :n].tolist(), (logp.grad[j, :n] / grad_scale).tolist()))
    if record is not None and rank == 0:  # skipped members: weight counted, gradient zero
        for p in np.setdiff1d(np.arange(len(mb)), forwarded):
            n = len(cols["segment_ids"][mb[p]])
            record.append((int(mb[p]), weights[p, :n].tolist(), [0.0] * n))
    return {
        "loss": total,
        "entropy": ent_sum,
        "kl": kl_sum,
        "members": len(mb) if rank == 0 else 0,
        "forwarded": len(active),
        "tokens": float(mask[active].sum()) if len(active) else 0.0,
        **stat_sums,
    }


def step_stats(sums: dict) -> dict:
    """Means per trained token of `backward_sums`' sums (of one rank, or all ranks')."""
    d = sums["tokens"] or 1.0
    return {
        "loss": sums["loss"],
        "entropy": sums["entropy"] / d,
        "kl": sums["kl"] / d,
        "members": int(sums["members"]),
        "forwarded": int(sums["forwarded"]),
        "tokens": int(sums["tokens"]),
        **{k: v / d for k, v in sums.items() if k not in NOT_MEANS},
    }


NOT_MEANS = ("loss", "entropy", "kl", "members", "forwarded", "tokens")


def lr_at(step: int, cfg: Config) -> float:
    u = cfg.update
    if u.warmup_steps and step < u.warmup_steps:
        return u.lr * (step + 1) / u.warmup_steps
    if u.lr_schedule == "constant":
        return u.lr
    total = max(1, cfg.iterations * u.epochs * u.minibatches - u.warmup_steps)
    frac = min(1.0, max(0, step - u.warmup_steps) / total)
    if u.lr_schedule == "linear":
        return u.lr * (1 - frac)
    if u.lr_schedule == "cosine":
        return u.lr * 0.5 * (1 + math.cos(math.pi * frac))
    return u.lr


def diagnostics(cols, adv, record, correct) -> dict:
    """Length diagnostics of the first epoch's per-token gradient weights."""
    by_member = {i: np.abs(np.asarray(g)) for i, _, g in record}
    toks, lens, corr_w, inc_w = [], [], [], []
    for i, g in by_member.items():
        live = g[np.asarray(cols["loss_mask"][i], dtype=bool)]
        if adv[i] == 0 or live.size == 0:
            continue
        toks.append(live)
        lens.append(np.full(live.size, cols["response_len"][i], dtype=float))
        (corr_w if correct[i] else inc_w).append(live)
    out = {"grad_weight_len_corr": None, "grad_weight_correct": None, "grad_weight_incorrect": None}
    if toks:
        w, length = np.concatenate(toks), np.concatenate(lens)
        if w.std() > 0 and length.std() > 0:
            out["grad_weight_len_corr"] = float(np.corrcoef(w, length)[0, 1])
    if corr_w:
        out["grad_weight_correct"] = float(np.concatenate(corr_w).mean())
    if inc_w:
        out["grad_weight_incorrect"] = float(np.concatenate(inc_w).mean())
    return out


UNIT_COLUMNS = (
    "unit_id",
    "prompt_id",
    "strategy",
    "track_id",
    "round",
    "member",
    "unit_size",
    "context_ids",
    "segment_ids",
    "old_logprobs",
    "loss_mask",
    "reward",
    "advantage",
    "response_len",
    "finish_reason",
    "segment_len",
)


def prepare(units_dir: Path, cfg: Config) -> dict:
    """The units' columns as the training loop reads them (stages/members.py: numpy
    arrays and `Ragged` rows, never a Python object per token): each member's advantage
    (`update.advantage`), loss mask (`update.mask_truncated`) and `skip` flag."""
    u = cfg.update
    path = units_dir / "units.parquet"
    # The schema's columns only: a user's extra columns are neither checked nor read.
    names = set(pq.read_schema(path).names)
    table = pq.read_table(path, columns=[c.name for c in schemas.UNITS.columns if c.name in names])
    cols = from_table(schemas.validate(table, schemas.UNITS, path), UNIT_COLUMNS)
    cols["advantage"] = advantages(cols, cfg)
    if u.mask_truncated:
        cols["loss_mask"] = cols["loss_mask"].where_rows(cols["finish_reason"] == "length", False)
    if u.skip_zero_signal and u.beta == 0:
        cols["skip"] = zero_signal(cols)
    return cols


def train(
    cols: dict[str, list],
    inputs: dict[str, Path],
    out_dir: Path,
    cfg: Config,
    iteration: int,
    *,
    log,
    ctx=None,
    ranks=None,
) -> dict:
    """The optimisation loop of the module docstring, then `model/` written (by rank 0).
    `ranks` (stages/distributed.py): this process's place among data-parallel ranks; None
    in process. Returns the steps, this rank's token-weight records, the mini-batch of each
    member, the tokens trained, the seconds and the trainable parameter count."""
    from stages import distributed

    u = cfg.update
    n = len(cols["unit_id"])
    rank, world = (ranks.rank, ranks.world) if ranks else (0, 1)
    fsdp = bool(ranks and ranks.fsdp)
    device = resolve_device(u.device)
    torch.manual_seed(cfg.seed * 7919 + iteration)
    policy_dir = inputs["policy"]
    state = (
        json.loads((policy_dir / STATE_FILE).read_text())
        if (policy_dir / STATE_FILE).is_file()
        else {}
    )
    lora_record = None
    if u.lora_r > 0:
        from stages import lora

        model, ref_model, resume_opt, lora_record = lora.build(
            policy_dir,
            inputs["reference"],
            u,
            device,
            load=load_policy,
            log=log,
            state=state,
            checkpointing=u.gradient_checkpointing,
        )
    else:
        model = load_policy(policy_dir, device)
        if u.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
        ref_model = load_policy(inputs["reference"], device) if u.beta > 0 else None
        # A policy written by a LoRA update keeps its optimizer state for the adapter only.
        resume_opt = not (policy_dir / "adapter").is_dir()
    if fsdp:
        model = distributed.shard(model, ranks)
    model.train()
    tokenizer = load_tokenizer(policy_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=u.lr, weight_decay=u.weight_decay)
    if resume_opt and (policy_dir / OPTIMIZER_FILE).is_file():
        if fsdp:
            distributed.load_optimizer(model, opt, policy_dir / OPTIMIZER_FILE, ranks, device)
        else:
            opt.load_state_dict(torch.load(policy_dir / OPTIMIZER_FILE, map_location=device))
    step0 = int(state.get("global_step", 0))

    rng = np.random.default_rng(cfg.seed * 7919 + iteration)
    steps, record, minibatch_of, t0 = [], [], {}, time.perf_counter()
    tokens = 0
    n_mb = min(u.minibatches, n)
    with progress.bar(u.epochs * n_mb, "update", "step", ctx if rank == 0 else None) as bar:
        for epoch in range(u.epochs):
            for mbi, mb in enumerate(np.array_split(rng.permutation(n), n_mb)):
                lr = lr_at(step0 + len(steps), cfg)
                for g in opt.param_groups:  # config wins over the stored hyper-parameters
                    g["lr"], g["weight_decay"] = lr, u.weight_decay
                opt.zero_grad(set_to_none=True)
                sums = backward_sums(
                    model,
                    cols,
                    mb,
                    cfg,
                    tokenizer.pad_token_id,
                    device,
                    ref_model=ref_model,
                    record=record if epoch == 0 else None,
                    rank=rank,
                    world=world,
                    even=fsdp,
                )
                if world > 1:
                    sums = distributed.all_reduce_sums(sums)
                    if not fsdp:
                        distributed.all_reduce_grads(params)
                st = step_stats(sums)
                if epoch == 0:
                    minibatch_of.update({int(i): mbi for i in mb})
                grad_norm = distributed.full_norm(
                    torch.nn.utils.clip_grad_norm_(
                        params, u.max_grad_norm if u.max_grad_norm > 0 else float("inf")
                    )
                )
                opt.step()
                tokens += st["tokens"]
                steps.append(
                    {
                        "epoch": epoch,
                        "minibatch": mbi,
                        "step": step0 + len(steps),
                        "lr": lr,
                        "grad_norm": grad_norm,
                        **st,
                    }
                )
                bar.update(1)
                bar.set_postfix(loss=f"{st['loss']:+.4f}", refresh=False)
                log(f"  update: step {len(steps)} loss {st['loss']:+.4f} grad_norm {grad_norm:.3f}")
    seconds = time.perf_counter() - t0

    model.eval()
    folder = out_dir / "model"
    if fsdp:
        weights, opt_state = distributed.full_state(model, opt)  # collective
    else:
        weights, opt_state = None, (opt.state_dict() if rank == 0 else None)
    if rank == 0:
        if lora_record is not None:
            lora.save(model, folder)  # merged weights, and the adapter in model/adapter/
        else:
            model.save_pretrained(folder, state_dict=weights)
        tokenizer.save_pretrained(folder)
        torch.save(opt_state, folder / OPTIMIZER_FILE)
        new_state = {"global_step": step0 + len(steps)}
        if lora_record is not None:
            new_state["lora"] = lora_record
        (folder / STATE_FILE).write_text(json.dumps(new_state))
    return {
        "steps": steps,
        "record": record,
        "minibatch_of": minibatch_of,
        "tokens": tokens,
        "seconds": seconds,
        "trainable_params": sum(p.numel() for p in params) * (world if fsdp else 1),
        "device": str(device),
    }


def run(inputs: dict[str, Path], out_dir: Path, cfg: Config, ctx) -> dict:
    u = cfg.update
    cols = prepare(inputs["units"], cfg)
    n = len(cols["unit_id"])
    adv = np.asarray(cols["advantage"])
    correct = np.asarray(cols["reward"]) >= cfg.score.correct_threshold
    if cfg.cluster.ray_address:
        from stages import distributed

        res = distributed.train_on_ranks(inputs, out_dir, cfg, ctx)
    else:
        res = train(cols, inputs, out_dir, cfg, ctx.iteration, log=ctx.log, ctx=ctx)
    steps, record, minibatch_of = res["steps"], res["record"], res["minibatch_of"]
    pq.write_table(pa.Table.from_pylist(steps), out_dir / "metrics.parquet")
    record.sort(key=lambda r: r[0])
    order = np.asarray([i for i, _, _ in record], dtype=np.int64)
    skip = cols.get("skip", np.zeros(n, dtype=bool))
    pq.write_table(
        pa.table(
            {
                **{k: cols[k][order].astype(np.int64) for k in ("unit_id", "track_id", "member")},
                "minibatch": [minibatch_of[i] for i in order.tolist()],
                "forwarded": ~skip[order],
                "segment_len": cols["segment_len"][order].astype(np.int64),
                "response_len": cols["response_len"][order].astype(np.int64),
                "reward": cols["reward"][order],
                "advantage": adv[order].astype(np.float64),
                "loss_mask": cols["loss_mask"].take(order).to_arrow(),
                "agg_weight": pa.array([w for _, w, _ in record], pa.list_(pa.float64())),
                "grad_weight": pa.array([g for _, _, g in record], pa.list_(pa.float64())),
            }
        ),
        out_dir / "token_weights.parquet",
    )

    def mean(key):
        return float(np.mean([s[key] for s in steps]))

    lens = np.asarray(cols["response_len"])
    metrics = {
        "optimizer_steps": len(steps),
        "global_step": steps[-1]["step"] + 1,
        "lr": steps[-1]["lr"],
        "loss": steps[-1]["loss"],
        "grad_norm": mean("grad_norm"),
        "entropy": mean("entropy"),
        "kl": mean("kl"),
        "clipfrac": mean("clipfrac"),
        "clipfrac_low": mean("clipfrac_low"),
        "clipfrac_high": mean("clipfrac_high"),
        "approx_kl": mean("approx_kl"),
        "skipped_members": int(skip.sum()),
        "len_correct": float(lens[correct].mean()) if correct.any() else None,
        "len_incorrect": float(lens[~correct].mean()) if (~correct).any() else None,
        **diagnostics(cols, adv, record, correct),
        "trainable_params": res["trainable_params"],
        "lora_r": u.lora_r,
        "tokens_trained": res["tokens"],
        "tokens_per_s": res["tokens"] / max(res["seconds"], 1e-9),
        "device": res["device"],
        **({k: res[k] for k in ("workers", "worker_nodes")} if "workers" in res else {}),
    }
    return {"rows": n, "metrics": metrics}


STAGE = Stage(
    name="update",
    version=2,
    inputs=("units", "policy", "reference"),
    output="policy",
    output_sub="model",
    reads=reads,
    ignores=WHERE,
    # peft computes the numbers only with LoRA, so only then is its version in the key.
    packages=lambda cfg: ("torch", "transformers") + (("peft",) if cfg.update.lora_r > 0 else ()),
    implementation=lambda cfg: f"update.{cfg.update.algorithm}.{cfg.update.loss_agg}",
    run=run,
    module=__name__,
    uses_iteration=True,
)
