"""The stages chained through the run directory, without Prefect: cache semantics
(docs/method.md invariants 5 and 6) on real Parquet and a real transformers policy."""

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flows import runner
from flows.runner import RunRecord, resolve_inputs, run_stage
from pipeline import cache, config


def run_online(cfg, run_dir):
    return runner.online(cfg, run_dir, call=runner._direct)


def keys(history):
    return [{k: v.key for k, v in it.items()} for it in history]


def cached(history):
    return [{k: v.cached for k, v in it.items()} for it in history]


@pytest.fixture
def demo_cfg(make_cfg, policy_dir):
    return make_cfg(f"model={policy_dir}")


def test_same_inputs_are_served_from_cache(demo_cfg, tmp_path):
    first = run_online(demo_cfg, tmp_path)
    assert not any(any(c.values()) for c in cached(first))
    again = run_online(demo_cfg, tmp_path)
    assert all(all(c.values()) for c in cached(again))
    assert keys(first) == keys(again)
    # The cached outputs are the same bytes, and show reads them back.
    for it in again:
        for r in it.values():
            assert cache.lookup(Path(r.path))["output_digest"] == r.digest


def test_config_change_reruns_that_stage_and_later_ones_only(demo_cfg, tmp_path):
    base = run_online(demo_cfg, tmp_path)
    changed = config.apply(
        config.load(None, [], base=config.to_dict(demo_cfg)), overrides=["update.lr=0.01"]
    )
    h = run_online(changed, tmp_path)
    c = cached(h)
    # Iteration 0: generate/score/pair untouched, update reruns.
    assert c[0] == {"generate": True, "score": True, "pair": True, "update": False}
    assert keys(h)[0]["update"] != keys(base)[0]["update"]
    # Iteration 1 samples from a different policy: everything reruns.
    assert not any(c[1].values())
    # Reverting the config serves the original outputs again.
    back = run_online(demo_cfg, tmp_path)
    assert keys(back) == keys(base) and all(all(x.values()) for x in cached(back))
    assert [r["update"].digest for r in back] == [r["update"].digest for r in base]


def test_deleted_or_damaged_output_is_detected_and_rebuilt(demo_cfg, tmp_path):
    base = run_online(demo_cfg, tmp_path)
    shutil.rmtree(base[0]["pair"].path)  # deleted
    (Path(base[1]["score"].path) / "scored.parquet").write_bytes(b"junk")  # damaged
    h = run_online(demo_cfg, tmp_path)
    assert h[0]["pair"].cached is False and h[1]["score"].cached is False
    assert h[0]["generate"].cached and h[0]["update"].cached  # same bytes rebuilt -> same digest
    assert pq.read_table(Path(h[1]["score"].path) / "scored.parquet").num_rows > 0


def test_force_and_offline_stage_rerun(demo_cfg, tmp_path):
    base = run_online(demo_cfg, tmp_path)
    cfg = config.load(None, [], base=RunRecord(tmp_path).config())
    inputs = resolve_inputs("pair", cfg, tmp_path, 1)
    assert inputs["scored"].path == base[1]["score"].path
    forced = run_stage("pair", cfg, tmp_path, 1, inputs, force=True)
    assert not forced.cached and forced.key == base[1]["pair"].key
    hit = run_stage("pair", cfg, tmp_path, 1, inputs)
    assert hit.cached
    # Other stages' records are untouched by the rerun.
    rec = json.loads((tmp_path / "run.json").read_text())
    assert rec["iterations"][1]["stages"]["generate"]["cached"] is False


def test_killed_stage_leaves_nothing_visible(demo_cfg, tmp_path, monkeypatch):
    from stages import pair

    def boom(rows, cfg):
        raise KeyboardInterrupt  # as if the process were interrupted mid-stage

    monkeypatch.setitem(pair.STRATEGIES._items, "group", boom)
    with pytest.raises(KeyboardInterrupt):
        run_online(demo_cfg, tmp_path)
    # Nothing visible: no key folder (hidden names are the cache's lock and temp files).
    assert not (tmp_path / "cache" / "pair").exists() or not any(
        p for p in (tmp_path / "cache" / "pair").iterdir() if not p.name.startswith(".")
    )
    monkeypatch.undo()
    h = run_online(demo_cfg, tmp_path)  # resumes: earlier stages from cache
    assert h[0]["generate"].cached and h[0]["score"].cached and not h[0]["pair"].cached


def test_eqlen_run_on_disk_passes_the_invariant_checker(make_cfg, policy_dir, tmp_path):
    """generate.rounds=4 + pair.strategy=eqlen through the real stages and Parquet files."""
    from eqlen_testing.invariants import check_rollouts, check_units

    cfg = make_cfg(
        f"model={policy_dir}",
        "generate.rounds=4",
        "pair.strategy=eqlen",
        "data.prompts_per_iteration=16",
        "generate.temperature=1.5",
        "iterations=1",
    )
    h = run_online(cfg, tmp_path)[0]
    scored = pq.read_table(Path(h["score"].path) / "scored.parquet").to_pylist()
    units = pq.read_table(Path(h["pair"].path) / "units.parquet").to_pylist()
    check_rollouts(scored, rounds=4, max_new_tokens=8, eos_id=1)
    assert h["generate"].metrics["kv_copies"] > 0
    trained, own = check_units(scored, units, h["pair"].metrics, strategy="eqlen")
    assert 0 < trained <= own


def test_swapping_the_strategy_reruns_pair_and_update_only_and_keeps_the_schema(
    make_cfg, policy_dir, tmp_path
):
    base = make_cfg(f"model={policy_dir}", "generate.rounds=2", "iterations=1")
    schemas_seen = {}
    first = None
    for strategy in ("group", "truncate", "eqlen"):
        cfg = config.apply(
            config.load(None, [], base=config.to_dict(base)),
            overrides=[f"pair.strategy={strategy}"],
        )
        h = run_online(cfg, tmp_path)[0]
        if first is None:
            first = h
        else:
            assert h["generate"].cached and h["score"].cached
            assert h["generate"].key == first["generate"].key
            assert not h["pair"].cached and not h["update"].cached
        schemas_seen[strategy] = pq.read_schema(Path(h["pair"].path) / "units.parquet")
    assert schemas_seen["group"].equals(schemas_seen["truncate"])
    assert schemas_seen["group"].equals(schemas_seen["eqlen"])


def test_update_writes_a_loadable_checkpoint_and_a_plot(demo_cfg, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from flows.plot import plot_run

    h = run_online(demo_cfg, tmp_path)
    new = AutoModelForCausalLM.from_pretrained(Path(h[0]["update"].path) / "model")
    old = AutoModelForCausalLM.from_pretrained(demo_cfg.model)
    diff = sum(
        float((a - b).detach().abs().sum()) for a, b in zip(new.parameters(), old.parameters())
    )
    assert diff > 0, "the update changed the weights"
    steps = pq.read_table(Path(h[0]["update"].path) / "metrics.parquet").to_pylist()
    assert steps and {"loss", "grad_norm", "clipfrac", "approx_kl", "entropy"} <= set(steps[0])
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in steps)
    png = plot_run(tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_algorithm_and_loss_agg_runs_from_the_cli(make_cfg, policy_dir, tmp_path, capsys):
    """The offline rerun of update swept over every algorithm x aggregation name, on EqLen
    units, through the `eqlen stage` entry point (in-process)."""
    from flows.cli import main
    from stages import losses

    cfg = make_cfg(
        f"model={policy_dir}",
        "generate.rounds=2",
        "pair.strategy=eqlen",
        "iterations=1",
        "generate.temperature=1.5",
    )
    run_online(cfg, tmp_path)
    keys = set()
    for algo in losses.ALGORITHMS.names():
        for agg in losses.LOSS_AGGS.names():
            rc = main(
                [
                    "stage",
                    "update",
                    "--run-dir",
                    str(tmp_path),
                    "--set",
                    f"update.algorithm={algo}",
                    "--set",
                    f"update.loss_agg={agg}",
                ]
            )
            assert rc == 0, (algo, agg)
            e = RunRecord(tmp_path).entry(0, "update")
            m = cache.lookup(Path(e["path"]))
            assert m["implementation"] == f"update.{algo}.{agg}"
            tw = pq.read_table(Path(e["path"]) / "token_weights.parquet")
            assert tw.num_rows == m["rows"]
            keys.add(e["key"])
    assert len(keys) == len(losses.ALGORITHMS.names()) * len(losses.LOSS_AGGS.names())
    rc = main(["stage", "update", "--run-dir", str(tmp_path), "--set", "update.loss_agg=median"])
    assert rc == 2 and "valid values: seq_mean_token_mean" in capsys.readouterr().err


def test_reported_token_weights_recompute_independently(make_cfg, policy_dir, tmp_path):
    """From token_weights.parquet alone: per mini-batch, seq_mean_token_mean's weight is
    1 / (B |o_b|); in the first mini-batch the policy is still the sampling one (ratio 1,
    no clipping), so grad_weight = -A * w there (later ones carry the ratio too)."""
    import numpy as np

    cfg = make_cfg(
        f"model={policy_dir}",
        "iterations=1",
        "update.minibatches=2",
        "update.skip_zero_signal=false",
    )
    h = run_online(cfg, tmp_path)[0]
    tw = pq.read_table(Path(h["update"].path) / "token_weights.parquet").to_pylist()
    assert {r["minibatch"] for r in tw} == {0, 1}
    for mb in (0, 1):
        rows = [r for r in tw if r["minibatch"] == mb]
        B = sum(any(r["loss_mask"]) for r in rows)
        for r in rows:
            n = sum(r["loss_mask"])
            expect = [1 / (B * n) if m else 0.0 for m in r["loss_mask"]]
            np.testing.assert_allclose(r["agg_weight"], expect, rtol=1e-6)
            if mb == 0:
                np.testing.assert_allclose(
                    r["grad_weight"], -r["advantage"] * np.array(expect), rtol=1e-3, atol=1e-7
                )


def test_experiment_shares_rollouts_and_writes_results(policy_dir, tmp_path):
    from flows.experiment import run_experiment

    base = [
        f"model={policy_dir}",
        "data.demo_size=64",
        "data.prompts_per_iteration=4",
        "generate.group_size=4",
        "generate.max_new_tokens=8",
        "iterations=2",
    ]
    res = run_experiment(
        tmp_path,
        methods=["grpo", "dapo", "eqlen_rloo"],
        seeds=[0, 1],
        base=[*base, "eval.every=1", "eval.k=2", "eval.max_prompts=8"],
    )
    assert [(r["method"], r["seed"]) for r in res] == [
        (m, s) for m in ("grpo", "dapo", "eqlen_rloo") for s in (0, 1)
    ]
    # dapo starts from grpo's iteration-0 rollouts, scores and units (same keys, cached).
    g = RunRecord(tmp_path / "runs" / "grpo-s0").load()["iterations"][0]["stages"]
    d = RunRecord(tmp_path / "runs" / "dapo-s0").load()["iterations"][0]["stages"]
    for stage in ("generate", "score", "pair"):
        assert d[stage]["key"] == g[stage]["key"] and d[stage]["cached"]
    assert d["update"]["key"] != g["update"]["key"]
    # dapo reuses grpo's iteration 0 (generate, score, pair, and the eval of the initial policy)
    assert [r["cached"] for r in res[:4]] == [0, 0, 4, 4]
    text = (tmp_path / "results.md").read_text()
    for m in ("grpo", "dapo", "eqlen_rloo"):
        assert f"| {m} |" in text
    assert "| gap mean after | gap last | signal fraction |" in text
    assert "eqlen_rloo vs rloo" not in text  # no rloo run, no test
    assert all(r["tokens"] > 0 and r["compute_s"] > 0 for r in res)
    # dapo is charged the compute of the iteration 0 it took from grpo's cache.
    assert res[2]["compute_s"] > 0.5 * res[0]["compute_s"]
    assert 0 <= res[0]["signal"] <= 1 and len(res[0]["signal_curve"]) == 2
    # The held-out split: the demo's generator with another seed, no training prompt in it.
    held = pq.read_table(tmp_path / "heldout-demo.parquet").column("prompt").to_pylist()
    from pipeline import prompts as prompts_mod

    train = prompts_mod.load_table(config.load(None, base)).column("prompt").to_pylist()
    assert held and not set(held) & set(train)
    assert res[0]["heldout"] == res[0]["heldout"]  # evaluated (not NaN)
    from flows.report import show_data

    score0 = show_data(tmp_path / "runs" / "grpo-s0")["iterations"][0]["stages"]["score"]
    assert score0["metrics"]["len_gap_prompts"] > 0  # 4 prompts x 4 tracks, reward ~0.5
    assert res[0]["gap_first"] == score0["metrics"]["len_gap"]
    score1 = show_data(tmp_path / "runs" / "grpo-s0")["iterations"][1]["stages"]["score"]
    assert res[0]["gap_mean"] == score1["metrics"]["len_gap"]  # iterations=2: only iteration 1
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_kl_to_the_initial_policy(make_cfg, policy_dir, tmp_path):
    """beta > 0 loads the initial policy as reference: KL is 0 on the first mini-batch (same
    weights) and positive once the policy has moved; zero-signal members are forwarded."""
    cfg = make_cfg(
        f"model={policy_dir}",
        "iterations=1",
        "update.beta=0.1",
        "update.minibatches=2",
        "update.lr=5e-3",
    )
    h = run_online(cfg, tmp_path)[0]
    steps = pq.read_table(Path(h["update"].path) / "metrics.parquet").to_pylist()
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-7)
    assert steps[1]["kl"] > 0
    assert h["update"].metrics["skipped_members"] == 0


def test_check_run_script_passes_a_run_and_names_a_broken_dataset(make_cfg, policy_dir, tmp_path):
    """scripts/check_run.py on a rounds=4 eqlen run at T=1.5: every iteration passes and the
    recomputed log-probs agree; after one unit member's segment is cut short on disk, it
    fails with the invariant's message."""
    import subprocess
    import sys

    import pyarrow as pa

    cfg = make_cfg(
        f"model={policy_dir}",
        "generate.rounds=4",
        "pair.strategy=eqlen",
        "generate.temperature=1.5",
        "iterations=2",
    )
    h = run_online(cfg, tmp_path)
    script = Path(__file__).resolve().parents[1] / "scripts" / "check_run.py"
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("iteration")]
    assert [ln.split(":")[0] for ln in lines] == ["iteration 0", "iteration 1"]
    assert all(float(ln.rsplit(" ", 1)[1]) < 1e-4 for ln in lines)

    units_file = Path(h[1]["pair"].path) / "units.parquet"
    units = pq.read_table(units_file)
    seg = units.column("segment_ids").to_pylist()
    i = next(k for k, s in enumerate(seg) if len(s) > 1)
    seg[i] = seg[i][:-1]
    units = units.set_column(
        units.schema.get_field_index("segment_ids"),
        "segment_ids",
        pa.array(seg, units.schema.field("segment_ids").type),
    )
    pq.write_table(units, units_file)
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path), "--iterations", "1"],
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0
    assert "iteration 1: invariant failed" in out.stderr and "segment_ids" in out.stderr


def test_experiment_tests_eqlen_against_its_baseline_and_the_rest_against_grpo():
    from flows.experiment import comparisons

    methods = ["grpo", "dr_grpo", "eqlen_grpo", "gspo", "eqlen_gspo", "truncate"]
    assert comparisons(methods) == [
        ("eqlen_grpo", "grpo"),
        ("eqlen_gspo", "gspo"),
        ("truncate", "grpo"),
        ("dr_grpo", "grpo"),
        ("gspo", "grpo"),
    ]
    assert comparisons(["dapo", "eqlen_rloo"]) == []  # neither rloo nor grpo ran
