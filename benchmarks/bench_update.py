"""Benchmark: the update stage against TRL's `GRPOTrainer`, on the same rollouts and loss.

(Over 500 lines: the EqLen-units-to-TRL conversion and the drivers of both TRL trainers
are one comparison; split they would be read side by side anyway.)

    .venv/bin/python benchmarks/bench_update.py [--loss-agg seq_mean_token_mean] [--repeats 7]
                                                [--threads 1] [--skip-zero-signal]
                                                [--algorithm grpo]

`--algorithm` picks the objective (default grpo; `trl_objective` maps each to TRL): gspo,
luspo, sapo, cispo and the rloo forms need the aggregation TRL uses for them (luspo, sapo,
gspo, rloo_trl: seq_mean_token_mean; cispo: token_mean). `rloo_trl` runs TRL's
`RLOOTrainer` instead (same fixed-rollout subclassing; its batch carries the sequence
sums of the sampling log-probs, `old_logps`, and RLOO's leave-one-out advantages).

Data. One demo iteration (128 prompts x 8 tracks sampled from the shipped policy) is
generated once by the project's own generate, score and pair stages (`pair.strategy=group`,
one unit per prompt: the unit TRL trains on) into a temporary run directory. Both trainers
then take one update step on exactly these completions, starting from the same weights.

- EqLen: `stages.update.run`, as the pipeline calls it: it loads the policy, splits the
  1024 members into `update.minibatches` (4) mini-batches, runs micro-batches of
  `update.micro_batch_size` (64), takes an AdamW step per mini-batch and saves the
  checkpoint, optimizer state and diagnostics.
- TRL: `GRPOTrainer.train()` with generation taken out: a subclass's `_prepare_inputs`
  hands the trainer the same rollouts as the tensors its generation phase would produce
  (prompt ids left-padded, completion ids right-padded, masks, the sampling log-probs as
  `old_per_token_logps`, advantages from TRL's formula), padded over the whole generation
  batch and cut into micro-batches with TRL's own `split_tensor_dict`, as its
  `_prepare_inputs` does. The one change is the order: TRL shuffles a generation batch
  with `torch.randperm`; here it keeps EqLen's mini-batch order, so both take the same
  four gradient steps on the same members and their first steps can be compared.

Matched settings: `loss_type` = the TRL name of `update.loss_agg` (`grpo` =
seq_mean_token_mean, `dapo` = token_mean, `dr_grpo` = seq_mean_token_sum_norm;
docs/objectives.md), `beta=0`, `epsilon` = clip_low, `epsilon_high` = clip_high,
`num_iterations` = epochs (1), `per_device_train_batch_size` = micro_batch_size,
`gradient_accumulation_steps` = members per mini-batch / micro_batch_size,
`steps_per_generation` = members / micro_batch_size, `max_steps` = minibatches, the same
constant learning rate, AdamW with weight decay 0, `max_grad_norm`, temperature,
`scale_rewards="group"`, fp32 on CPU (`bf16=False`, `gradient_checkpointing=False`: the
GRPOConfig defaults are True for both), the same torch thread count, in one process,
alternating EqLen and TRL over the repeats. TRL keeps its default optimizer
(`adamw_torch_fused`; EqLen uses `torch.optim.AdamW`). `--skip-zero-signal` lets EqLen skip
the forward pass of members of all-equal-reward units (its default; same gradient, less
work); by default it is off here, so both do the same work.

Timed (medians over --repeats, after one untimed warm-up of each):
- loop: EqLen's own update timer (first mini-batch to last optimizer step, per-token
  weight records included); TRL from the `on_train_begin` to the `on_train_end` callback
  (its training loop: data loader, micro-batch forward/backward, clipping, optimizer,
  logging every step);
- whole: the full call, model load to checkpoint saved (EqLen: `update.run`; TRL: load,
  `GRPOTrainer(...)`, `train()`, `save_model` and the optimizer state).
Not timed: generation and scoring, and TRL's extra no-grad forward for the old log-probs
(its generation phase runs it when gradient_accumulation_steps is not a multiple of
steps_per_generation; here the sampling log-probs are handed in, as EqLen uses them).

Trained tokens = completion tokens inside the loss mask of the batch, the same count for
both; tokens/s = trained tokens / loop seconds. Checked numerically: the first step's
loss and gradient norm (before clipping), the advantages, and the largest parameter
difference after all steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Offline and quiet before transformers / TRL are imported: no hub, no telemetry.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows import report, runner  # noqa: E402
from pipeline import config  # noqa: E402
from pipeline.models import load_policy, load_tokenizer  # noqa: E402
from stages.update import UNIT_COLUMNS  # noqa: E402  (the columns the update reads)

# EqLen's update.loss_agg -> TRL's loss_type with the same per-token weights
# (token_mean/dapo differ in the normaliser's scope: see trl_normaliser_note()).
TRL_LOSS_TYPE = {
    "seq_mean_token_mean": "grpo",
    "token_mean": "dapo",
    "seq_mean_token_sum_norm": "dr_grpo",
}
# EqLen algorithms that are a TRL loss_type of their own -> (that loss_type, the EqLen
# aggregation TRL's normaliser for it equals, TRL importance_sampling_level).
TRL_OWN_LOSS = {
    "luspo": ("luspo", "seq_mean_token_mean", "sequence"),
    "sapo": ("sapo", "seq_mean_token_mean", "token"),
    "cispo": ("cispo", "token_mean", "token"),
}
TRL_ALGORITHMS = ("grpo", "rloo", "rloo_token", "gspo", *TRL_OWN_LOSS, "rloo_trl")


# ------------------------------------------------------------------ EqLen units -> TRL


def minibatch_order(n: int, cfg, iteration: int = 0) -> list[np.ndarray]:
    """The members of each mini-batch, in the order `stages.update.run` draws them."""
    rng = np.random.default_rng(cfg.seed * 7919 + iteration)
    return np.array_split(rng.permutation(n), min(cfg.update.minibatches, n))


def trl_advantages(rewards, unit_id, eps: float = 1e-4) -> torch.Tensor:
    """Advantages as GRPOTrainer's generation phase computes them (`scale_rewards="group"`,
    float32): per group, (R - mean) / (std + 1e-4), std unbiased (TRL's `nanstd`, with no
    NaN rewards here). Groups are EqLen's group units (one per prompt)."""
    r = torch.as_tensor(np.asarray(rewards, dtype=np.float32))
    uid = np.asarray(unit_id)
    adv = torch.zeros_like(r)
    for u in np.unique(uid):
        sel = torch.as_tensor(uid == u)
        g = r[sel]
        adv[sel] = (g - g.mean()) / (g.std(unbiased=True) + eps)
    return adv


def trl_rloo_advantages(rewards, unit_id) -> torch.Tensor:
    """Advantages as RLOOTrainer's generation phase computes them (float32, its default
    `normalize_advantages=False`, `beta=0` so no KL in the reward): per group,
    R - (sum of the group - R) / (G - 1)."""
    r = torch.as_tensor(np.asarray(rewards, dtype=np.float32))
    uid = np.asarray(unit_id)
    adv = torch.zeros_like(r)
    for u in np.unique(uid):
        sel = torch.as_tensor(uid == u)
        g = r[sel]
        adv[sel] = g - (g.sum() - g) / (len(g) - 1)
    return adv


def trl_objective(cfg) -> tuple[str, dict]:
    """The TRL trainer ("grpo" or "rloo") and its config arguments that run the objective
    of EqLen's `update.algorithm` with `update.loss_agg`: loss_type, importance-sampling
    level, clip bounds, SAPO's temperatures. ValueError for a pairing TRL does not run.

    Clip bounds: TRL's `epsilon` / `epsilon_high` are EqLen's clip_low / clip_high, except
    for cispo, whose TRL `epsilon_high` is the bound on the ratio itself (1 + clip_high)."""
    u = cfg.update
    algo, agg = u.algorithm, u.loss_agg
    kw = {"epsilon": u.clip_low, "epsilon_high": u.clip_high}
    if algo not in TRL_ALGORITHMS:
        raise ValueError(f"no TRL counterpart for update.algorithm={algo}")
    if algo == "rloo_trl":
        if agg != "seq_mean_token_mean":
            raise ValueError("TRL's RLOOTrainer averages over sequences: seq_mean_token_mean")
        return "rloo", kw
    if algo in TRL_OWN_LOSS:
        loss_type, need, level = TRL_OWN_LOSS[algo]
        if agg != need:
            raise ValueError(f"TRL's {loss_type} normalises as EqLen's {need}, not {agg}")
        kw.update(loss_type=loss_type, importance_sampling_level=level)
        if algo == "cispo":
            kw["epsilon_high"] = 1 + u.clip_high
        if algo == "sapo":
            kw.update(
                sapo_temperature_pos=u.sapo_temperature_pos,
                sapo_temperature_neg=u.sapo_temperature_neg,
            )
        return "grpo", kw
    if agg not in TRL_LOSS_TYPE:
        raise ValueError(f"no TRL loss_type aggregates as {agg}")
    kw["loss_type"] = TRL_LOSS_TYPE[agg]
    if algo == "gspo":
        if agg != "seq_mean_token_mean":
            raise ValueError("TRL runs GSPO with loss_type grpo: seq_mean_token_mean")
        kw["importance_sampling_level"] = "sequence"
    return "grpo", kw


def trl_generation_batch(
    cols: dict[str, list], order, pad_id: int, advantages
) -> dict[str, torch.Tensor]:
    """What GRPOTrainer's generation phase returns, built from EqLen group-unit members.

    `order` lists member indices (the rows of the batch, in that order). Prompt ids are
    left-padded and completion ids right-padded over the whole batch, as TRL pads them;
    `old_per_token_logps` are the sampling log-probs (0 on padding); `num_items_in_batch`
    counts the completion tokens of the whole batch (TRL's `dapo` normaliser).
    """
    order = [int(i) for i in order]
    ctx = [cols["context_ids"][i] for i in order]
    seg = [cols["segment_ids"][i] for i in order]
    if any(not all(cols["loss_mask"][i]) for i in order):
        raise ValueError(
            "a member masks part of its segment; TRL's completion_mask would also "
            "hide those tokens from attention, so this comparison needs "
            "update.mask_truncated=false and group units"
        )
    B, P, C = len(order), max(map(len, ctx)), max(map(len, seg))
    prompt_ids = torch.full((B, P), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((B, P), dtype=torch.long)
    completion_ids = torch.full((B, C), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((B, C), dtype=torch.long)
    old = torch.zeros((B, C), dtype=torch.float32)
    for b, (c, s, i) in enumerate(zip(ctx, seg, order)):
        prompt_ids[b, P - len(c) :] = torch.tensor(c)
        prompt_mask[b, P - len(c) :] = 1
        completion_ids[b, : len(s)] = torch.tensor(s)
        completion_mask[b, : len(s)] = 1
        old[b, : len(s)] = torch.tensor(cols["old_logprobs"][i])
    adv = torch.as_tensor(np.asarray(advantages, dtype=np.float32))[order]
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": adv,
        "old_per_token_logps": old,
        "num_items_in_batch": completion_mask.sum(),
    }


def trl_rloo_batch(cols: dict[str, list], order, pad_id: int, advantages) -> dict:
    """What RLOOTrainer's generation phase returns: the GRPO batch's prompt and completion
    tensors, the advantages, and `old_logps`, each row's sum of sampling log-probs over its
    completion mask (RLOO's sequence-level ratio is exp(sum logp - old_logps))."""
    b = trl_generation_batch(cols, order, pad_id, advantages)
    old = (b.pop("old_per_token_logps") * b["completion_mask"]).sum(1)
    b.pop("num_items_in_batch")
    return {**b, "old_logps": old}


# TRL loss types whose normaliser is the generation batch's token count (dapo-like).
TRL_TOKEN_NORMALISED = ("dapo", "cispo")


def trl_normaliser_note(loss_type: str) -> str:
    per_seq = (
        "exact: TRL's per-micro-batch mean over sequences / accumulation steps is the "
        "mini-batch mean when micro-batches are equal in size"
    )
    per_tok = (
        "not exact: TRL divides by the generation batch's tokens x accumulation steps / "
        "steps_per_generation (the mean tokens per mini-batch), EqLen by the tokens of "
        "the mini-batch itself"
    )
    return {
        "grpo": per_seq,
        "sapo": per_seq,
        "luspo": per_seq + " (TRL: mean over sequences of each one's token sum)",
        "rloo": per_seq + " (RLOOTrainer's mean over sequences; HF Trainer divides by "
        "accumulation steps)",
        "dr_grpo": "exact: 1 / (sequences per micro-batch x L_max x accumulation steps)",
        "dapo": per_tok,
        "cispo": per_tok,
    }[loss_type]


# ------------------------------------------------------------------ the two trainers


def make_rollouts(cfg, run_dir: Path) -> Path:
    """Generate, score and pair iteration 0 with the project's stages; the units folder."""
    from pipeline.prompts import materialize

    prompts = runner.Ref.of(materialize(cfg, runner.cache_root(cfg, run_dir)))
    policy = runner.policy_input(cfg)
    refs = {"prompts": prompts, "policy": policy, "reference": policy}
    for name in ("generate", "score", "pair"):
        res = runner.run_stage(name, cfg, run_dir, 0, refs, log=lambda s: None)
        refs[runner.stage_spec(name).output] = res.output()
    return Path(refs["units"].path)


def load_members(units_dir: Path) -> dict[str, list]:
    table = pq.read_table(Path(units_dir) / "units.parquet")
    return {c: table.column(c).to_pylist() for c in UNIT_COLUMNS}


def run_eqlen(cfg, units_dir: Path, out_dir: Path) -> dict:
    from stages import update

    policy = Path(runner.policy_input(cfg).path)
    t0 = time.perf_counter()
    res = update.run(
        {"units": units_dir, "policy": policy, "reference": policy},
        out_dir,
        cfg,
        runner.Context(iteration=0, log=lambda s: None),
    )
    whole = time.perf_counter() - t0
    m = res["metrics"]
    steps = pq.read_table(out_dir / "metrics.parquet").to_pylist()
    return {
        "loop": m["tokens_trained"] / m["tokens_per_s"],
        "whole": whole,
        "loss0": steps[0]["loss"],
        "grad_norm0": steps[0]["grad_norm"],
        "model_dir": out_dir / "model",
    }


def run_trl(cfg, cols, order, advantages, out_dir: Path, loss_type: str | None = None) -> dict:
    """TRL's trainer for `trl_objective(cfg)` on the fixed rollouts (`loss_type`, when
    given, overrides the objective's: the loss_agg comparisons of grpo)."""
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer
    from trl.trainer.utils import split_tensor_dict

    trainer_kind, objective = trl_objective(cfg)
    if loss_type is not None:
        objective["loss_type"] = loss_type
    TrlConfig, Trainer = (
        (GRPOConfig, GRPOTrainer) if trainer_kind == "grpo" else (RLOOConfig, RLOOTrainer)
    )
    u, n = cfg.update, len(order)
    per_minibatch = n // u.minibatches
    times, captured = {}, []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            times["begin"] = time.perf_counter()

        def on_train_end(self, *a, **k):
            times["end"] = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **k):
            if logs and "grad_norm" in logs:
                captured.append(dict(logs))

    class FixedRolloutTrainer(Trainer):
        """GRPOTrainer (RLOOTrainer) whose generation phase is replaced by fixed rollouts,
        unshuffled."""

        def __init__(self, *a, micro_batches, **kw):
            super().__init__(*a, **kw)
            self._fixed = micro_batches

        def _prepare_inputs(self, generation_batch):
            # TRL: generate + score the generation batch every steps_per_generation
            # micro-steps, shuffle it, split it, then serve slice _step % steps_per_generation.
            return self._fixed[self._step % len(self._fixed)]

    policy = Path(runner.policy_input(cfg).path)
    t0 = time.perf_counter()
    tok = load_tokenizer(policy)
    model = load_policy(policy, torch.device("cpu"))
    t_prep = time.perf_counter()
    make_batch = trl_generation_batch if trainer_kind == "grpo" else trl_rloo_batch
    batch = make_batch(cols, order, tok.pad_token_id, advantages)
    micro = split_tensor_dict(batch, n // u.micro_batch_size)
    t_prep = time.perf_counter() - t_prep
    prompts = sorted(set(cols["prompt_id"]))
    args = TrlConfig(
        output_dir=str(out_dir),
        report_to=[],
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        seed=cfg.seed,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        per_device_train_batch_size=u.micro_batch_size,
        gradient_accumulation_steps=per_minibatch // u.micro_batch_size,
        steps_per_generation=n // u.micro_batch_size,
        num_generations=cols["unit_size"][0],
        max_steps=u.minibatches,
        num_iterations=u.epochs,
        max_completion_length=cfg.generate.max_new_tokens,
        temperature=cfg.generate.temperature,
        learning_rate=u.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=u.weight_decay,
        max_grad_norm=u.max_grad_norm,
        beta=0.0,
        shuffle_dataset=False,
        log_completions=False,
        **objective,
        **({"scale_rewards": "group"} if trainer_kind == "grpo" else {}),
    )
    trainer = FixedRolloutTrainer(
        model=model,
        reward_funcs=_never_called,
        args=args,
        processing_class=tok,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        callbacks=[Clock()],
        micro_batches=micro,
    )
    trainer.remove_callback(PrinterCallback)  # disable_tqdm adds it: a print per step
    trainer.train()
    trainer.save_model(str(out_dir / "model"))
    torch.save(trainer.optimizer.state_dict(), out_dir / "model" / "optimizer.pt")
    whole = time.perf_counter() - t0
    return {
        "loop": times["end"] - times["begin"],
        "whole": whole,
        "loss0": captured[0]["loss"],
        "grad_norm0": captured[0]["grad_norm"],
        "prep": t_prep,
        "model": trainer.model,
        "optim": str(trainer.args.optim),
        "objective": {"trainer": trainer_kind, **objective},
    }


def _never_called(completions, **kw):
    raise AssertionError("generation is replaced by fixed rollouts; rewards are not recomputed")


# ------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--loss-agg",
        default="seq_mean_token_mean",
        choices=sorted({*TRL_LOSS_TYPE, *(a for _, a, _ in TRL_OWN_LOSS.values())}),
    )
    ap.add_argument("--algorithm", default="grpo", choices=TRL_ALGORITHMS)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--skip-zero-signal",
        action="store_true",
        help="let EqLen skip members of all-equal-reward units (its default)",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra EqLen config overrides (the demo config otherwise)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    import transformers
    import trl

    cfg = config.load(
        None,
        [
            f"update.loss_agg={args.loss_agg}",
            f"update.algorithm={args.algorithm}",
            "pair.strategy=group",
            f"update.skip_zero_signal={str(args.skip_zero_signal).lower()}",
            *args.set,
        ],
    )
    trainer_kind, objective = trl_objective(cfg)
    loss_type = objective.get("loss_type", "rloo")
    if cfg.update.epochs != 1 or cfg.update.beta != 0 or cfg.update.lr_schedule != "constant":
        raise SystemExit("this comparison covers epochs=1, beta=0, a constant lr")
    tmp = Path(tempfile.mkdtemp(prefix="bench_update_"))
    t0 = time.perf_counter()
    units_dir = make_rollouts(cfg, tmp / "run")
    print(f"rollouts: {time.perf_counter() - t0:.1f}s -> {units_dir}")

    from stages import update

    cols = load_members(units_dir)
    n = len(cols["unit_id"])
    if n % (cfg.update.minibatches * cfg.update.micro_batch_size):
        raise SystemExit(
            f"{n} members do not split into {cfg.update.minibatches} mini-batches "
            f"of whole {cfg.update.micro_batch_size}-member micro-batches"
        )
    order = np.concatenate(minibatch_order(n, cfg))
    adv_eqlen = update.advantages(cols, cfg)
    if cfg.update.advantage != "auto":
        raise SystemExit("this comparison hands TRL its own advantages: update.advantage=auto")
    if update.ALGORITHMS.get(cfg.update.algorithm).advantage == "rloo":
        adv_trl = trl_rloo_advantages(cols["reward"], cols["unit_id"])
    else:
        adv_trl = trl_advantages(cols["reward"], cols["unit_id"], eps=cfg.update.eps)
    tokens = sum(sum(m) for m in cols["loss_mask"])

    print(
        f"machine: {report.machine()}; torch {torch.__version__}, transformers "
        f"{transformers.__version__}, trl {trl.__version__}; {torch.get_num_threads()} torch "
        f"thread(s)"
    )
    print(
        f"batch: {n} members ({len(set(cols['unit_id']))} prompts x {cols['unit_size'][0]}), "
        f"{tokens} trained tokens, {cfg.update.minibatches} mini-batches x "
        f"{n // cfg.update.minibatches} members, micro-batch {cfg.update.micro_batch_size}; "
        f"algorithm {args.algorithm}, loss_agg {args.loss_agg} = TRL {trainer_kind} trainer "
        f"{objective}; skip_zero_signal {cfg.update.skip_zero_signal}"
    )

    runs = {"eqlen": [], "trl": []}
    for r in range(args.repeats + 1):  # repeat 0 is the warm-up, also used for the check
        for side in ("eqlen", "trl") if r % 2 == 0 else ("trl", "eqlen"):
            torch.set_num_threads(args.threads)
            out = Path(tempfile.mkdtemp(dir=tmp, prefix=f"{side}{r}_"))
            if side == "eqlen":
                res = run_eqlen(cfg, units_dir, out)
            else:
                res = run_trl(cfg, cols, order, adv_trl, out)
            runs[side].append(res)
    e0, t0_ = runs["eqlen"][0], runs["trl"][0]
    assert torch.get_num_threads() == args.threads

    eq_model = load_policy(e0["model_dir"], torch.device("cpu"))
    init = load_policy(runner.policy_input(cfg).path, torch.device("cpu"))
    ps_e, ps_t, ps_0 = (m.state_dict() for m in (eq_model, t0_["model"], init))
    diff = max(float((ps_e[k] - ps_t[k]).abs().max()) for k in ps_e)
    moved = max(float((ps_e[k] - ps_0[k]).abs().max()) for k in ps_e)

    def med(side, key):
        return statistics.median(x[key] for x in runs[side][1:])

    print("\nnumerical check (warm-up run):")
    print(
        f"  advantages: max |EqLen - TRL formula| = "
        f"{float(np.abs(adv_eqlen - adv_trl.double().numpy()).max()):.2e}"
    )
    print(
        f"  first-step loss: EqLen {e0['loss0']:+.8f}  TRL {t0_['loss0']:+.8f}  "
        f"(|diff| {abs(e0['loss0'] - t0_['loss0']):.1e})"
    )
    print(
        f"  first-step grad norm: EqLen {e0['grad_norm0']:.8f}  TRL {t0_['grad_norm0']:.8f}  "
        f"(rel diff {abs(e0['grad_norm0'] - t0_['grad_norm0']) / t0_['grad_norm0']:.1e})"
    )
    print(
        f"  after {cfg.update.minibatches} steps: max |param EqLen - param TRL| = {diff:.1e} "
        f"(max |param change| {moved:.1e})"
    )
    print(f"  normaliser: {trl_normaliser_note(loss_type)}")
    if loss_type in TRL_TOKEN_NORMALISED:
        mb0 = minibatch_order(n, cfg)[0]
        expect = sum(sum(cols["loss_mask"][i]) for i in mb0) / (tokens / cfg.update.minibatches)
        print(
            f"  expected first-step TRL/EqLen from that: {expect:.5f}; measured loss "
            f"{t0_['loss0'] / e0['loss0']:.5f}, grad norm "
            f"{t0_['grad_norm0'] / e0['grad_norm0']:.5f}"
        )
    print(f"  TRL optimizer: {t0_['optim']}; EqLen: torch.optim.AdamW")
    print(f"\nmedians over {args.repeats} repeats:")
    print("| trainer | loop s | trained tokens/s | whole call s |")
    print("|---|---|---|---|")
    trl_label = "TRL GRPOTrainer" if trainer_kind == "grpo" else "TRL RLOOTrainer"
    for side, label in (("eqlen", "EqLen update stage"), ("trl", trl_label)):
        print(
            f"| {label} | {med(side, 'loop'):.3f} | {tokens / med(side, 'loop'):,.0f} | "
            f"{med(side, 'whole'):.2f} |"
        )
    print(
        f"(TRL's batch tensors were built outside its loop, as its generation phase builds "
        f"them: {med('trl', 'prep'):.3f}s; EqLen pads its micro-batches inside the loop)"
    )
    ratios = [t["loop"] / e["loop"] for e, t in zip(runs["eqlen"][1:], runs["trl"][1:])]
    print(
        f"\nEqLen/TRL trained tokens/s: {statistics.median(ratios):.2f}x (median of per-repeat "
        f"ratios; range {min(ratios):.2f}-{max(ratios):.2f}); whole call "
        f"{med('trl', 'whole') / med('eqlen', 'whole'):.2f}x"
    )


if __name__ == "__main__":
    main()
