"""Held-out evaluation (stages/evaluate.py): the pass@k estimator against hand-worked numbers
and brute-force enumeration, the stage on the demo model and a held-out JSONL, `eqlen eval`,
and the eval inside the online loop (`eval.every`)."""

from __future__ import annotations

import itertools
import json
from fractions import Fraction
from math import comb
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eqlen_testing.cli import eqlen
from flows import runner
from flows.report import show_data
from pipeline.demo import make_demo_prompts
from stages import evaluate
from stages.evaluate import pass_at_k, summarize


def test_pass_at_k_hand_worked():
    """1 - C(n-c, k) / C(n, k):
    n=4, c=1, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6  = 0.5
    n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7
    n=6, c=2, k=3: 1 - C(4,3)/C(6,3) = 1 - 4/20 = 0.8
    k=1 is c/n; c=0 is 0; n-c < k is 1 (every k-subset holds a correct one)."""
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(6, 2, 3) == pytest.approx(0.8)
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)
    assert pass_at_k(8, 0, 4) == 0.0
    assert pass_at_k(3, 1, 3) == 1.0 and pass_at_k(4, 4, 1) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)  # k > n: no k-subset to draw


def test_pass_at_k_equals_the_fraction_of_k_subsets_with_a_correct_sample():
    """The independent reference: enumerate every k-subset of n samples (c correct) and count
    those holding a correct one — the definition the estimator is unbiased for."""
    for n in range(1, 9):
        for c in range(n + 1):
            outcomes = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(outcomes, k))
                want = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_where_binomials_overflow_floats():
    """n = 2000: C(2000, 1000) has ~600 digits; exact rational arithmetic as the reference."""
    for n, c, k in ((2000, 3, 1000), (2000, 1500, 100), (1024, 1, 32)):
        exact = 1 - Fraction(comb(n - c, k), comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-9)


def test_summarize_hand_worked():
    """Two prompts, k = 4. A: correct [1,0,0,0], lengths [2,4,6,8]; B: [1,1,0,0], [3,5,7,9].
    avg@4 = (1/4 + 2/4) / 2 = 0.375; pass@2 = ((1 - 3/6) + (1 - 1/6)) / 2 = 2/3;
    pass@4 = 1; lengths: correct (2+3+5)/3, incorrect (4+6+8+7+9)/5."""
    table = pa.table(
        {
            "prompt_id": ["a"] * 4 + ["b"] * 4,
            "correct": [True, False, False, False, True, True, False, False],
            "response_len": [2, 4, 6, 8, 3, 5, 7, 9],
            "reward": [1.0, 0, 0, 0, 1, 1, 0, 0],
            "finish_reason": ["eos"] * 7 + ["length"],
        }
    )
    m = summarize(table, 4)
    assert m["avg@4"] == pytest.approx(0.375) and m["pass@1"] == pytest.approx(0.375)
    assert m["pass@2"] == pytest.approx(2 / 3) and m["pass@4"] == 1.0
    assert m["mean_len_correct"] == pytest.approx(10 / 3)
    assert m["mean_len_incorrect"] == pytest.approx(34 / 5)
    assert (m["n_prompts"], m["n_samples"], m["truncated_fraction"]) == (2, 8, 1 / 8)
    assert evaluate.pass_ks(8) == [1, 2, 4, 8] and evaluate.pass_ks(6) == [1, 2, 4, 6]
    assert evaluate.pass_ks(1) == [1]


@pytest.fixture
def heldout(tmp_path) -> Path:
    """A demo-style held-out JSONL (prompt, answer; no ids), other prompts than training's."""
    f = tmp_path / "heldout.jsonl"
    rows = make_demo_prompts(6, seed=123).to_pylist()
    f.write_text(
        "".join(json.dumps({"prompt": r["prompt"], "answer": r["answer"]}) + "\n" for r in rows)
    )
    return f


def test_eval_stage_on_the_demo_model(make_cfg, policy_dir, heldout, tmp_path):
    """k = 3 (odd: 4 sampled, the last dropped), the first 5 of 6 prompts. Every row is
    rescored independently (exact match), the metrics recomputed from the rows; the same
    policy at another iteration is a cache hit."""
    cfg = make_cfg(f"model={policy_dir}", f"eval.data={heldout}", "eval.k=3", "eval.max_prompts=5")
    run_dir = tmp_path / "run"
    inputs = {
        "heldout": runner.heldout_input(cfg, runner.cache_root(cfg, run_dir)),
        "policy": runner.policy_input(cfg),
    }
    res = runner.run_stage("eval", cfg, run_dir, 0, inputs, log=lambda m: None)
    table = pq.read_table(Path(res.path) / "eval.parquet")
    rows = table.to_pylist()
    source = [json.loads(line) for line in heldout.read_text().splitlines()]
    assert res.rows == len(rows) == 15
    # The first five prompts in file order, three samples each, numbered 0..2.
    assert [r["prompt"] for r in rows[::3]] == [s["prompt"] for s in source[:5]]
    assert [r["sample"] for r in rows] == [0, 1, 2] * 5
    assert all(r["answer"] == s["answer"] for r, s in zip(rows[::3], source))
    for r in rows:
        assert r["response_len"] == len(r["response_ids"]) <= cfg.generate.max_new_tokens
        assert r["reward"] == r["reward_exact_match"] == float(r["response"].strip() == r["answer"])
        assert r["correct"] == (r["reward"] >= cfg.score.correct_threshold)
        assert r["finish_reason"] in ("eos", "length")
    ok = np.array([r["correct"] for r in rows]).reshape(5, 3)
    lens = np.array([r["response_len"] for r in rows]).reshape(5, 3)
    m = res.metrics
    assert m["k"] == 3 and m["n_prompts"] == 5
    assert m["avg@3"] == pytest.approx(ok.mean())
    assert m["pass@3"] == pytest.approx(ok.any(axis=1).mean())  # n = k: any correct
    assert m["pass@1"] == pytest.approx(ok.mean())
    assert m["pass@2"] == pytest.approx(np.mean([pass_at_k(3, int(c), 2) for c in ok.sum(1)]))
    if ok.any():
        assert m["mean_len_correct"] == pytest.approx(lens[ok].mean())
    if (~ok).any():
        assert m["mean_len_incorrect"] == pytest.approx(lens[~ok].mean())
    again = runner.run_stage("eval", cfg, run_dir, 7, inputs, log=lambda m: None)
    assert again.cached and again.key == res.key and again.digest == res.digest
    # What decides the samples is in the key: another temperature is another dataset.
    hotter = make_cfg(
        f"model={policy_dir}",
        f"eval.data={heldout}",
        "eval.k=3",
        "eval.max_prompts=5",
        "eval.temperature=0.5",
    )
    assert runner.stage_key("eval", hotter, inputs, 0)[0] != res.key


def test_eval_settings_that_cannot_work_are_clear_errors(make_cfg, tmp_path):
    with pytest.raises(evaluate.EvalError, match="eval.data"):
        runner.online(make_cfg("eval.every=1"), tmp_path / "run")
    assert not (tmp_path / "run" / "run.json").exists()
    with pytest.raises(evaluate.EvalError, match="eval.k"):
        evaluate.check_config(make_cfg("eval.k=0"))


def test_eval_schedule():
    """At 0, every, 2*every, ... below `iterations`, and at `iterations` (the final policy)."""
    from pipeline import config

    def at(every, iterations):
        cfg = config.load(None, [f"eval.every={every}", f"iterations={iterations}"])
        return [i for i in range(iterations + 1) if runner.eval_due(cfg, i)]

    assert at(1, 3) == [0, 1, 2, 3]
    assert at(2, 3) == [0, 2, 3]
    assert at(5, 3) == [0, 3]
    assert at(0, 3) == []


def test_online_loop_evaluates_each_policy_and_eqlen_eval_reuses_it(
    make_cfg, policy_dir, heldout, tmp_path
):
    """eval.every=1, 2 iterations: evals at 0 (the initial model), 1 (after one update) and
    2 (the final policy, a record of its own); each eval's policy is what that iteration's
    generate samples from. `show` and `plot` carry them; a rerun is all cache hits, and
    `eqlen eval RUN_DIR --json` on the run's latest policy is the loop's final eval."""
    cfg = make_cfg(f"model={policy_dir}", f"eval.data={heldout}", "eval.k=2", "eval.every=1")
    run_dir = tmp_path / "run"
    history = runner.online(cfg, run_dir, call=runner._direct)
    assert [list(h) for h in history] == [list(runner.STAGE_NAMES)] * 2 + [["eval"]]
    its = runner.RunRecord(run_dir).entries()
    assert [sorted(st) for st in its][-1] == ["eval"]
    assert its[0]["eval"]["inputs"]["policy"]["path"] == str(policy_dir.resolve())
    for i in (1, 2):
        want = str(Path(its[i - 1]["update"]["path"]) / "model")
        assert its[i]["eval"]["inputs"]["policy"]["path"] == want
        if i < 2:
            assert its[i]["generate"]["inputs"]["policy"]["path"] == want
    data = show_data(run_dir)
    assert [it["stages"]["eval"]["metrics"]["n_prompts"] for it in data["iterations"]] == [6] * 3
    assert not any(s["stale"] for it in data["iterations"] for s in it["stages"].values())
    # Offline: `eqlen stage eval` resolves the same inputs from the record.
    refs = runner.resolve_inputs("eval", cfg, run_dir, 2, None)
    assert {k: r.digest for k, r in refs.items()} == {
        k: v["digest"] for k, v in its[2]["eval"]["inputs"].items()
    }
    again = runner.online(cfg, run_dir, call=runner._direct)
    assert all(r.cached for it in again for r in it.values())

    from flows.plot import plot_run

    assert plot_run(run_dir).stat().st_size > 0

    p = eqlen("eval", run_dir, "--json")
    out = json.loads(p.stdout)
    final = data["iterations"][2]["stages"]["eval"]
    assert out["cached"] is True and out["dataset"] == final["path"]
    assert out["avg@2"] == final["metrics"]["avg@2"] and out["n_prompts"] == 6
    assert out["pass@2"] == final["metrics"]["pass@2"]


def test_eqlen_eval_on_a_model_folder(policy_dir, heldout, tmp_path, capsys):
    """`eqlen eval MODEL --data F --k K --json`: the keys scripts read; a rerun is a hit."""
    args = [
        "eval", str(policy_dir), "--data", str(heldout), "--k", "2", "--max-prompts", "4",
        "--run-dir", str(tmp_path / "ev"), "--set", "generate.max_new_tokens=8", "--json",
    ]  # fmt: skip
    first = json.loads(eqlen(*args).stdout)
    assert {"avg@2", "pass@2", "n_prompts"} <= set(first)
    assert first["n_prompts"] == 4 and first["cached"] is False
    assert 0 <= first["avg@2"] <= first["pass@2"] <= 1
    from flows import cli

    assert cli.main(args) == 0  # in-process: the second call needs no new interpreter
    second = json.loads(capsys.readouterr().out)
    assert second["cached"] is True and second["avg@2"] == first["avg@2"]
    # No held-out data: a clear error, exit 2.
    assert cli.main(["eval", str(policy_dir), "--run-dir", str(tmp_path / "ev")]) == 2
    assert "--data" in capsys.readouterr().err
