"""benchmarks/bench_update.py: EqLen units become TRL's generation batch correctly, and on the
same rollouts the update stage and TRL's GRPOTrainer take the same first step (the claim of
docs/objectives.md that `seq_mean_token_mean` is TRL's `grpo` and `seq_mean_token_sum_norm`
its `dr_grpo`). Numbers only; nothing here is timed."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("trl")

_spec = importlib.util.spec_from_file_location(
    "bench_update", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_update.py"
)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_generation_batch_pads_like_trl():
    """Two members, rows in `order` [1, 0]: prompts left-padded to 3, completions
    right-padded to 3 (pad id 0), sampling log-probs on the completion tokens, zeros on
    padding; num_items_in_batch = 1 + 3 completion tokens."""
    cols = {
        "context_ids": [[5, 6], [7, 8, 9]],
        "segment_ids": [[10, 11, 1], [1]],
        "old_logprobs": [[-0.1, -0.2, -0.3], [-0.4]],
        "loss_mask": [[True] * 3, [True]],
    }
    b = bench.trl_generation_batch(cols, [1, 0], pad_id=0, advantages=[0.5, -2.0])
    assert b["prompt_ids"].tolist() == [[7, 8, 9], [0, 5, 6]]
    assert b["prompt_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    assert b["completion_ids"].tolist() == [[1, 0, 0], [10, 11, 1]]
    assert b["completion_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]
    assert torch.allclose(
        b["old_per_token_logps"], torch.tensor([[-0.4, 0, 0], [-0.1, -0.2, -0.3]])
    )
    assert b["advantages"].tolist() == [-2.0, 0.5]
    assert int(b["num_items_in_batch"]) == 4


def test_generation_batch_refuses_partial_loss_masks():
    cols = {
        "context_ids": [[5]],
        "segment_ids": [[1, 2]],
        "old_logprobs": [[0.0, 0.0]],
        "loss_mask": [[True, False]],
    }
    with pytest.raises(ValueError, match="mask_truncated"):
        bench.trl_generation_batch(cols, [0], pad_id=0, advantages=[1.0])


def test_trl_advantages_by_hand_and_equal_to_eqlen(make_cfg):
    """Unit 0 rewards 1, 0, 0, 0: mean 1/4, unbiased std sqrt((9/16 + 3/16) / 3) = 1/2, so
    A = (3/4) / (1/2 + 1e-4) = 1.49970 and -0.49990; unit 1 all equal: A = 0. EqLen's grpo
    estimator on group units gives the same numbers."""
    from stages.update import advantages

    rewards, unit = [1.0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1, 1]
    got = bench.trl_advantages(rewards, unit).numpy()
    want = [0.75 / 0.5001] + [-0.25 / 0.5001] * 3 + [0.0] * 4
    assert np.allclose(got, want, atol=1e-6)
    cols = {
        "reward": rewards,
        "unit_id": unit,
        "prompt_id": ["a"] * 4 + ["b"] * 4,
        "track_id": list(range(8)),
        "strategy": ["group"] * 8,
        "unit_size": [4] * 8,
    }
    assert np.allclose(advantages(cols, make_cfg()), want, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("loss_agg", ["seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_first_step_matches_trl(make_cfg, tmp_path, loss_agg):
    """4 prompts x 4 tracks, 4 mini-batches of 4, micro-batches of 2: the first optimizer
    step's loss and gradient norm agree with GRPOTrainer's to float32 rounding."""
    cfg = make_cfg(
        f"update.loss_agg={loss_agg}",
        "update.micro_batch_size=2",
        "update.skip_zero_signal=false",
        "data.max_prompt_tokens=64",
    )
    units = bench.make_rollouts(cfg, tmp_path / "run")
    cols = bench.load_members(units)
    order = np.concatenate(bench.minibatch_order(len(cols["unit_id"]), cfg))
    eq = bench.run_eqlen(cfg, units, tmp_path / "eqlen")
    trl = bench.run_trl(
        cfg,
        cols,
        order,
        bench.trl_advantages(cols["reward"], cols["unit_id"]),
        tmp_path / "trl",
        bench.TRL_LOSS_TYPE[loss_agg],
    )
    assert trl["loss0"] == pytest.approx(eq["loss0"], abs=1e-6)
    assert trl["grad_norm0"] == pytest.approx(eq["grad_norm0"], rel=1e-5)


def test_trl_rloo_advantages_by_hand_and_equal_to_eqlen(make_cfg):
    """RLOOTrainer's advantage, R - mean of the others: rewards 1, 0, 0, 0 -> 1, -1/3 x3;
    all equal -> 0. EqLen's rloo estimator (scale none) on group units gives the same."""
    from stages.update import advantages

    rewards, unit = [1.0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1, 1]
    want = [1.0] + [-1 / 3] * 3 + [0.0] * 4
    assert np.allclose(bench.trl_rloo_advantages(rewards, unit).numpy(), want, atol=1e-6)
    cols = {
        "reward": rewards,
        "unit_id": unit,
        "prompt_id": ["a"] * 4 + ["b"] * 4,
        "track_id": list(range(8)),
        "strategy": ["group"] * 8,
        "unit_size": [4] * 8,
    }
    got = advantages(cols, make_cfg("update.algorithm=rloo_trl"))
    assert np.allclose(got, want, atol=1e-6)


def test_rloo_batch_carries_sequence_sums():
    """RLOOTrainer's batch: old_logps = each row's sum of sampling log-probs (-0.4 and
    -0.6), no per-token old log-probs, no token count."""
    cols = {
        "context_ids": [[5, 6], [7, 8, 9]],
        "segment_ids": [[10, 11, 1], [1]],
        "old_logprobs": [[-0.1, -0.2, -0.3], [-0.4]],
        "loss_mask": [[True] * 3, [True]],
    }
    b = bench.trl_rloo_batch(cols, [1, 0], pad_id=0, advantages=[0.5, -2.0])
    assert torch.allclose(b["old_logps"], torch.tensor([-0.4, -0.6]))
    assert "old_per_token_logps" not in b and "num_items_in_batch" not in b


def test_trl_objective_mapping(make_cfg):
    """Which TRL trainer / loss_type runs each EqLen objective, with which clip bounds."""
    obj = lambda *s: bench.trl_objective(make_cfg(*s))  # noqa: E731
    assert obj("update.algorithm=luspo") == (
        "grpo",
        {
            "epsilon": 0.2,
            "epsilon_high": 0.2,
            "loss_type": "luspo",
            "importance_sampling_level": "sequence",
        },
    )
    kind, kw = obj("update.algorithm=cispo", "update.loss_agg=token_mean", "update.clip_high=4")
    assert (kind, kw["loss_type"], kw["epsilon_high"]) == ("grpo", "cispo", 5.0)
    kind, kw = obj("update.algorithm=sapo", "update.sapo_temperature_neg=2")
    assert kw["sapo_temperature_neg"] == 2.0 and kw["loss_type"] == "sapo"
    assert obj("update.algorithm=rloo_trl")[0] == "rloo"
    with pytest.raises(ValueError, match="token_mean"):
        obj("update.algorithm=cispo")  # TRL's cispo normalises as token_mean


def perturbed_units(units: Path, out: Path, seed: int = 0, scale: float = 0.3) -> Path:
    """A copy of the units with their sampling log-probs moved by N(0, scale) per token, so
    that the first step is off-policy: ratios leave the clip range, SAPO's gate and CISPO's
    cap act. Both trainers read the same copy."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pq.read_table(units / "units.parquet")
    rng = np.random.default_rng(seed)
    old = [
        (np.asarray(o) + scale * rng.standard_normal(len(o))).tolist()
        for o in t["old_logprobs"].to_pylist()
    ]
    i = t.schema.get_field_index("old_logprobs")
    t = t.set_column(i, t.schema.field(i), pa.array(old, t.schema.field(i).type))
    out.mkdir(parents=True)
    pq.write_table(t, out / "units.parquet")
    return out


GSPO_CLIP = ("update.clip_low=3e-4", "update.clip_high=4e-4")  # GSPO's ranges: clips here


@pytest.mark.slow
@pytest.mark.parametrize(
    "algorithm, loss_agg, clip",
    [
        ("grpo", "seq_mean_token_mean", ()),
        ("gspo", "seq_mean_token_mean", GSPO_CLIP),
        ("luspo", "seq_mean_token_mean", ()),
        ("luspo", "seq_mean_token_mean", GSPO_CLIP),
        ("sapo", "seq_mean_token_mean", ()),
        ("cispo", "token_mean", ()),
        ("rloo_token", "seq_mean_token_mean", ()),
        ("rloo_trl", "seq_mean_token_mean", ()),
    ],
)
def test_first_step_matches_trl_off_policy(make_cfg, tmp_path, algorithm, loss_agg, clip):
    """As test_first_step_matches_trl, for every objective TRL runs, with the sampling
    log-probs perturbed (N(0, 0.3) per token) so the first step is off-policy and the clip,
    gate or cap is active: EqLen's update stage and TRL's trainer (GRPOTrainer with the
    loss_type of `trl_objective`, RLOOTrainer for rloo_trl) on the same rollouts, each with
    its own advantage formula (GRPO's, or the leave-one-out one for the rloo forms; equal
    to EqLen's, tested above). The first step's loss and pre-clip gradient norm agree to
    float32 rounding, except cispo's, whose TRL normaliser is the generation batch's mean
    tokens per mini-batch (EqLen: the mini-batch's own tokens), so TRL = EqLen x
    tokens(mini-batch 0) / (all tokens / 4), exactly. gspo and luspo also run with GSPO's
    clip ranges (3e-4 / 4e-4), under which their sequence ratios are clipped."""
    cfg = make_cfg(
        f"update.algorithm={algorithm}",
        f"update.loss_agg={loss_agg}",
        "update.micro_batch_size=2",
        "update.skip_zero_signal=false",
        "data.max_prompt_tokens=64",
        *clip,
    )
    units = perturbed_units(bench.make_rollouts(cfg, tmp_path / "run"), tmp_path / "units")
    cols = bench.load_members(units)
    n = len(cols["unit_id"])
    order = np.concatenate(bench.minibatch_order(n, cfg))
    loo = algorithm.startswith("rloo")
    adv = (
        bench.trl_rloo_advantages(cols["reward"], cols["unit_id"])
        if loo
        else bench.trl_advantages(cols["reward"], cols["unit_id"])
    )
    eq = bench.run_eqlen(cfg, units, tmp_path / "eqlen")
    trl = bench.run_trl(cfg, cols, order, adv, tmp_path / "trl")
    factor = 1.0
    if algorithm == "cispo":
        mb0 = bench.minibatch_order(n, cfg)[0]
        tokens = sum(map(sum, cols["loss_mask"]))
        factor = sum(sum(cols["loss_mask"][i]) for i in mb0) / (tokens / cfg.update.minibatches)
    assert trl["loss0"] == pytest.approx(eq["loss0"] * factor, rel=1e-5, abs=1e-6)
    assert trl["grad_norm0"] == pytest.approx(eq["grad_norm0"] * factor, rel=1e-5)
    assert eq["grad_norm0"] > 0
    import pyarrow.parquet as pq

    first = pq.read_table(tmp_path / "eqlen" / "metrics.parquet").to_pylist()[0]
    if algorithm != "sapo":  # the off-policy regime is reached: something is clipped
        assert first["clipfrac"] > 0 or algorithm == "luspo" and not clip
