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
