"""Stage 4, update: one policy-optimisation step on comparison units.

Reads the units dataset and the policy the iteration started from; for `update.epochs`
passes, splits the unit members (seeded shuffle) into `update.minibatches` mini-batches,
and for each mini-batch

1. computes the per-token weights of `update.loss_agg` over the whole mini-batch,
2. runs micro-batches of `update.micro_batch_size` members: forward on context + segment,
   log-probs of the segment tokens at the sampling temperature, the algorithm's per-token
   surrogate (`update.algorithm`), loss = sum(weight * surrogate), backward (accumulate),
3. clips the global gradient norm and takes an AdamW step.

Because the weights are fixed per mini-batch before it is split, the accumulated gradient
equals the full-batch gradient whatever the micro-batch size (tested).

Writes `model/` (a Hugging Face checkpoint with its tokenizer; `from_pretrained` loads it)
plus `model/optimizer.pt` (AdamW state, picked up by the next iteration's update, as a
long-running trainer would keep it), and `metrics.parquet` (one row per optimizer step).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

import schemas
from pipeline.config import Config
from pipeline.models import load_policy, load_tokenizer, resolve_device
from stages import losses
from stages.losses import ALGORITHMS, LOSS_AGGS

NAME, VERSION = "update", 1
INPUTS = ("units", "policy")
CODE_DEPS = (losses.__file__,)
OPTIMIZER_FILE = "optimizer.pt"


def implementation(cfg: Config) -> str:
    return f"update.{cfg.update.algorithm}.{cfg.update.loss_agg}"


def key_config(cfg: Config, iteration: int) -> dict:
    u = {k: v for k, v in vars(cfg.update).items() if k not in ("device",)}
    return {"update": u, "seed": cfg.seed, "iteration": iteration,
            "temperature": cfg.generate.temperature}


def pad(seqs: list[list], value, dtype) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=dtype)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s, dtype=dtype)
    return out


def segment_logprobs(model, context: list[list[int]], segment: list[list[int]], pad_id: int,
                     temperature: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs [B, Lseg] (right-padded) of each segment given its context, and entropy."""
    seqs = [c + s for c, s in zip(context, segment)]
    ids = pad(seqs, pad_id, torch.long).to(device)
    attn = pad([[1] * len(s) for s in seqs], 0, torch.long).to(device)
    logits = model(input_ids=ids, attention_mask=attn).logits.float() / temperature
    width = max(len(s) for s in segment)
    # Token j of the segment sits at position len(c)+j and is predicted at len(c)+j-1.
    pos = torch.stack([torch.arange(width) + len(c) - 1 for c in context]).to(device)
    pos = pos.clamp(max=ids.shape[1] - 2)
    seg_logits = logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1]))
    logp_all = torch.log_softmax(seg_logits, -1)
    targets = pad(segment, pad_id, torch.long).to(device)
    logp = logp_all.gather(-1, targets[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def minibatch_backward(model, cols: dict[str, list], mb, cfg: Config, pad_id: int,
                       device) -> dict:
    """Accumulate the gradient of one mini-batch (member indices `mb`) into model.grad.

    The loss aggregation's per-token weights are computed over the whole mini-batch first,
    so the sum over micro-batches is exactly the full-batch loss and gradient.
    """
    u = cfg.update
    agg, algo = LOSS_AGGS.get(u.loss_agg), ALGORITHMS.get(u.algorithm)
    mask = pad([cols["loss_mask"][i] for i in mb], False, torch.bool).to(device)
    weights = agg(mask=mask, max_new_tokens=cfg.generate.max_new_tokens)
    width = mask.shape[1]
    total, ent_sum, stat_sums = 0.0, 0.0, {}
    for s in range(0, len(mb), u.micro_batch_size):
        idx = mb[s:s + u.micro_batch_size]
        sl = slice(s, s + len(idx))
        logp, entropy = segment_logprobs(model, [cols["context_ids"][i] for i in idx],
                                         [cols["segment_ids"][i] for i in idx], pad_id,
                                         cfg.generate.temperature, device)
        # Pad to the mini-batch width so the precomputed weights line up.
        logp = F.pad(logp, (0, width - logp.shape[1]))
        entropy = F.pad(entropy, (0, width - entropy.shape[1]))
        old = F.pad(pad([cols["old_logprobs"][i] for i in idx], 0.0, torch.float32),
                    (0, width - max(len(cols["old_logprobs"][i]) for i in idx))).to(device)
        adv = torch.tensor([cols["advantage"][i] for i in idx], dtype=torch.float32, device=device)
        m = mask[sl]
        tok_loss, st = algo(logp, old, adv, m, clip_low=u.clip_low, clip_high=u.clip_high)
        loss = (weights[sl] * tok_loss * m).sum()
        loss.backward()
        total += float(loss.detach())
        k = float(m.sum())
        ent_sum += float((entropy.detach() * m).sum())
        for key, v in st.items():
            stat_sums[key] = stat_sums.get(key, 0.0) + v * k
    n_tok = float(mask.sum()) or 1.0
    return {"loss": total, "entropy": ent_sum / n_tok, "members": len(mb), "tokens": int(n_tok),
            **{k: v / n_tok for k, v in stat_sums.items()}}


def run(inputs: dict[str, Path], out_dir: Path, cfg: Config, ctx) -> dict:
    u = cfg.update
    path = inputs["units"] / "units.parquet"
    units = schemas.validate(pq.read_table(path), schemas.UNITS, path)
    cols = {c: units.column(c).to_pylist() for c in
            ("context_ids", "segment_ids", "old_logprobs", "loss_mask", "advantage")}
    n = units.num_rows

    device = resolve_device(u.device)
    torch.manual_seed(cfg.seed * 7919 + ctx.iteration)
    model = load_policy(inputs["policy"], device)
    model.train()
    tokenizer = load_tokenizer(inputs["policy"])
    opt = torch.optim.AdamW(model.parameters(), lr=u.lr, weight_decay=u.weight_decay)
    opt_file = inputs["policy"] / OPTIMIZER_FILE
    if opt_file.is_file():
        opt.load_state_dict(torch.load(opt_file, map_location=device))
        for g in opt.param_groups:  # config wins over the stored hyper-parameters
            g["lr"], g["weight_decay"] = u.lr, u.weight_decay

    rng = np.random.default_rng(cfg.seed * 7919 + ctx.iteration)
    steps, tokens, t0 = [], 0, time.perf_counter()
    for epoch in range(u.epochs):
        for mb in np.array_split(rng.permutation(n), min(u.minibatches, n)):
            opt.zero_grad(set_to_none=True)
            st = minibatch_backward(model, cols, mb, cfg, tokenizer.pad_token_id, device)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), u.max_grad_norm if u.max_grad_norm > 0 else float("inf"))
            opt.step()
            tokens += st["tokens"]
            steps.append({"epoch": epoch, "step": len(steps), "grad_norm": float(grad_norm), **st})
            ctx.log(f"  update: step {len(steps)} loss {st['loss']:+.4f} "
                    f"grad_norm {float(grad_norm):.3f}")
    seconds = time.perf_counter() - t0

    model.eval()
    model.save_pretrained(out_dir / "model")
    tokenizer.save_pretrained(out_dir / "model")
    torch.save(opt.state_dict(), out_dir / "model" / OPTIMIZER_FILE)
    pq.write_table(pa.Table.from_pylist(steps), out_dir / "metrics.parquet")
    last = steps[-1]
    metrics = {"optimizer_steps": len(steps), "loss": last["loss"],
               "grad_norm": float(np.mean([s["grad_norm"] for s in steps])),
               "entropy": float(np.mean([s["entropy"] for s in steps])),
               "clipfrac": float(np.mean([s["clipfrac"] for s in steps])),
               "approx_kl": float(np.mean([s["approx_kl"] for s in steps])),
               "tokens_trained": tokens, "tokens_per_s": tokens / max(seconds, 1e-9),
               "device": str(device)}
    return {"rows": n, "metrics": metrics}
