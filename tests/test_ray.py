"""Scale-out on a real local Ray cluster (cluster.ray_address=local): rollout workers give
the same rollouts as one process (vLLM: identical; hf: the same prompts and row counts,
invariants kept), a local instance listens on loopback only, a worker killed mid-stage is a
clear error naming it, and the next run resumes from the cache."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from eqlen_testing import invariants
from flows import runner
from pipeline import cluster, config
from pipeline.cluster import ClusterError
from pipeline.models import load_tokenizer
from stages import workers

pytest.importorskip("ray")
pytestmark = [pytest.mark.slow]

SMALL = [
    "data.demo_size=64",
    "data.prompts_per_iteration=6",
    "generate.group_size=4",
    "generate.max_new_tokens=8",
]


@pytest.fixture
def ray_local():
    yield "cluster.ray_address=local"
    runner.end_workers()


def generate_once(tmp_path: Path, name: str, *overrides: str):
    cfg = config.load(None, [*SMALL, "iterations=1", *overrides])
    out = tmp_path / name
    res = runner.run_stage(
        "generate",
        cfg,
        out,
        0,
        runner.resolve_inputs("generate", cfg, out, 0, None),
        log=lambda m: None,
    )
    return pq.read_table(Path(res.path) / "rollouts.parquet"), res


@pytest.mark.vllm
def test_vllm_rollouts_on_two_workers_equal_one_process(tmp_path, ray_local):
    pytest.importorskip("vllm")
    opts = ["generate.engine=vllm", "generate.rounds=3", "generate.vllm_sync_check=false"]
    alone, _ = generate_once(tmp_path, "alone", *opts)
    two, res = generate_once(tmp_path, "two", *opts, ray_local, "generate.workers=2")
    assert not res.cached  # generate.workers is not in the vLLM key: force a real run
    assert res.metrics["workers"] == 2 and len(res.metrics["worker_nodes"]) == 2
    cols = ["prompt_id", "pair_id", "track_id", "parent_track_id", "birth_round", "own_start"]
    for c in [*cols, "response_ids", "finish_reason"]:
        assert two.column(c).to_pylist() == alone.column(c).to_pylist(), c
    for a, b in zip(alone.column("logprobs").to_pylist(), two.column("logprobs").to_pylist()):
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5


def test_hf_rollouts_on_two_workers_keep_prompts_rows_and_invariants(
    tmp_path, policy_dir, ray_local
):
    alone, _ = generate_once(tmp_path, "alone")
    two, res = generate_once(tmp_path, "two", ray_local, "generate.workers=2")
    assert res.metrics["workers"] == 2 and not res.cached  # in the hf key: other chunks
    assert two.num_rows == alone.num_rows == 6 * 4
    assert sorted(two.column("prompt_id").to_pylist()) == sorted(
        alone.column("prompt_id").to_pylist()
    )
    # With prefix inheritance: the lineage invariants, ids 0..n-1, every group complete.
    eos = load_tokenizer(policy_dir).eos_token_id
    three, _ = generate_once(
        tmp_path, "three", ray_local, "generate.workers=2", "generate.rounds=3"
    )
    rows = three.to_pylist()
    invariants.check_rollouts(rows, rounds=3, max_new_tokens=8, eos_id=eos)
    assert sorted(r["track_id"] for r in rows) == list(range(len(rows)))
    assert sum(r["birth_round"] == 0 for r in rows) == 6 * 4


def test_a_local_instance_listens_on_loopback_only(ray_local):
    cluster.connect("local")
    out = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True).stdout
    ray_lines = [
        line
        for line in out.splitlines()
        if any(k in line for k in ('"gcs_server"', '"raylet"', '"ray::'))
    ]
    assert any("gcs_server" in line for line in ray_lines), out
    for line in ray_lines:
        host = line.split()[3].rpartition(":")[0]
        assert host in ("127.0.0.1", "[::ffff:127.0.0.1]", "[::1]"), line
    # Ray's token authentication is on for the instance we start.
    from ray._raylet import AuthenticationMode, get_authentication_mode

    assert get_authentication_mode() == AuthenticationMode.TOKEN
    assert (Path.home() / ".ray" / "auth_token").is_file()


def test_a_worker_killed_mid_stage_is_a_clear_error_and_the_rerun_resumes(tmp_path, ray_local):
    cfg = config.load(
        None,
        [*SMALL, "iterations=2", "generate.max_new_tokens=16", ray_local, "generate.workers=2"],
    )
    run_dir = tmp_path / "run"
    armed = threading.Event()

    def killer():
        armed.wait(120)
        pool = next(iter(workers._POOLS.values()))
        time.sleep(0.05)  # inside iteration 1's generate call
        os.kill(pool[1]["where"]["pid"], signal.SIGKILL)

    threading.Thread(target=killer, daemon=True).start()

    def call(name, c, d, i, refs, force):
        if name == "generate" and i == 1:
            armed.set()
            time.sleep(0)
        return runner._direct(name, c, d, i, refs, force)

    with pytest.raises(ClusterError) as e:
        runner.online(cfg, run_dir, call=call)
    msg = str(e.value)
    assert "rollout worker 1 on" in msg and "pid" in msg and "died" in msg, msg
    again = runner.online(cfg, run_dir, call=runner._direct)
    assert all(r.cached for r in again[0].values())  # iteration 0 from the cache
    assert not again[1]["generate"].cached


# --- data-parallel update ----------------------------------------------------------------


@pytest.fixture(scope="module")
def dp_units(tmp_path_factory):
    """Group units of 12 synthetic prompts x 4 tracks (rewards vary within units; some
    units all-equal, so zero-signal members are skipped on some ranks and not others)."""
    from eqlen_testing.synthetic import synthetic_scored
    from stages import pair

    root = tmp_path_factory.mktemp("dp-units")
    cfg = config.load(None, ["generate.group_size=4", "generate.max_new_tokens=8"])
    scored = synthetic_scored(
        48, rounds=1, group_size=4, max_new_tokens=8, prompt_len=(3, 6), vocab=261, seed=5
    )
    (root / "scored").mkdir()
    pq.write_table(scored, root / "scored" / "scored.parquet")
    (root / "units").mkdir()
    pair.run({"scored": root / "scored"}, root / "units", cfg, runner.Context(iteration=0))
    return root / "units"


def update_once(tmp_path, name, units, policy, reference, *overrides, iteration=0):
    from stages import update

    cfg = config.load(
        None,
        [
            "generate.group_size=4",
            "generate.max_new_tokens=8",
            "update.lr=0.01",
            "update.minibatches=2",
            "update.micro_batch_size=3",
            "update.device=cpu",
            *overrides,
        ],
    )
    out = tmp_path / name
    out.mkdir()
    res = update.run(
        {"units": units, "policy": policy, "reference": reference},
        out,
        cfg,
        runner.Context(iteration=iteration, log=lambda m: None),
    )
    return out / "model", res


def assert_params_close(a: Path, b: Path, rel=1e-5):
    import torch
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        d = (wa[k] - wb[k]).norm() / wa[k].norm().clamp_min(1e-12)
        assert d < rel, (k, float(d))
    oa, ob = torch.load(a / "optimizer.pt"), torch.load(b / "optimizer.pt")
    assert oa["state"].keys() == ob["state"].keys()
    for i in oa["state"]:
        for key in ("exp_avg", "exp_avg_sq"):
            x, y = oa["state"][i][key], ob["state"][i][key]
            d = (x - y).norm() / x.norm().clamp_min(1e-30)
            assert d < 1e-4, (i, key, float(d))  # second moments: float noise squared


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_mean"])
def test_two_ranks_take_the_step_of_one_process(
    tmp_path, policy_dir, dp_units, ray_local, sharding, loss_agg
):
    """token_mean's weights depend on the whole mini-batch (1 / its token count): the
    ranks see halves of it and still take one process's step; the optimizer state too."""
    agg = f"update.loss_agg={loss_agg}"
    one, _ = update_once(tmp_path, "one", dp_units, policy_dir, policy_dir, agg)
    two, res = update_once(
        tmp_path,
        "two",
        dp_units,
        policy_dir,
        policy_dir,
        agg,
        ray_local,
        "update.workers=2",
        f"update.sharding={sharding}",
    )
    assert res["metrics"]["workers"] == 2 and len(res["metrics"]["worker_nodes"]) == 2
    assert_params_close(one, two)
    # Every member's per-token gradient weight, gathered from the ranks, is one process's.
    ta = pq.read_table(one.parent / "token_weights.parquet").to_pylist()
    tb = pq.read_table(two.parent / "token_weights.parquet").to_pylist()
    assert [r["unit_id"] for r in ta] == [r["unit_id"] for r in tb]
    for ra_, rb_ in zip(ta, tb):
        assert ra_["agg_weight"] == pytest.approx(rb_["agg_weight"], abs=1e-9)
        assert ra_["grad_weight"] == pytest.approx(rb_["grad_weight"], rel=1e-4, abs=1e-7)
    # The next iteration resumes the optimizer written by two ranks, on one or two.
    a, ra = update_once(tmp_path, "a", dp_units, two, policy_dir, agg, iteration=1)
    b, rb = update_once(
        tmp_path,
        "b",
        dp_units,
        two,
        policy_dir,
        agg,
        ray_local,
        "update.workers=2",
        f"update.sharding={sharding}",
        iteration=1,
    )
    assert ra["metrics"]["global_step"] == rb["metrics"]["global_step"] == 4
    assert_params_close(a, b)


def test_an_update_rank_killed_mid_stage_is_a_clear_error_and_the_rerun_works(
    tmp_path, policy_dir, dp_units, ray_local, monkeypatch
):
    """Rank 1 SIGKILLed while the ranks train: the error names it (not rank 0's broken
    collective), nothing is written, and the next call starts fresh ranks and succeeds."""
    dp = [ray_local, "update.workers=2", "update.sharding=ddp"]
    in_use: list = []
    check_paths = workers.check_paths

    def spy(pool, paths, what):  # called by the update with the very pool it then uses
        check_paths(pool, paths, what)
        if what == "update" and not in_use:
            in_use.append(pool)
            threading.Thread(target=killer, daemon=True).start()

    def killer():
        time.sleep(1.0)  # the ranks load the model and train (20 epochs: ~10 s here)
        os.kill(in_use[0][1]["where"]["pid"], signal.SIGKILL)

    monkeypatch.setattr(workers, "check_paths", spy)
    t0 = time.monotonic()
    with pytest.raises(ClusterError) as e:
        update_once(tmp_path, "killed", dp_units, policy_dir, policy_dir, *dp, "update.epochs=20")
    msg = str(e.value)
    assert "update worker 1 on" in msg and "pid" in msg and "died" in msg, msg
    assert time.monotonic() - t0 < 120
    assert not (tmp_path / "killed" / "model").exists()
    assert not [k for k in workers._POOLS if k[0] == "update"], "the broken pool is dropped"
    again, res = update_once(tmp_path, "again", dp_units, policy_dir, policy_dir, *dp)
    assert res["metrics"]["workers"] == 2 and (again / "model.safetensors").is_file()


@pytest.mark.flow
def test_a_run_on_ray_with_two_rollout_workers_and_two_ranks(prefect_server, tmp_path):
    """`eqlen run` as a user runs it: a local Ray instance, 2 rollout workers and 2 update
    ranks for 2 iterations of EqLen; it says where each worker runs, `show` records them,
    and scripts/check_run.py finds every invariant held and every log-prob recomputed."""
    import json
    import sys

    from eqlen_testing.cli import SMALL as CLI_SMALL
    from eqlen_testing.cli import eqlen

    run_dir = tmp_path / "run"
    ray_opts = ["cluster.ray_address=local", "generate.workers=2", "update.workers=2"]
    method = ["generate.rounds=2", "pair.strategy=eqlen", "update.loss_agg=unit_mean"]
    sets = [a for kv in (*ray_opts, *method) for a in ("--set", kv)]
    p = eqlen("run", "--run-dir", run_dir, "--iterations", 2, *CLI_SMALL, *sets)
    assert p.stdout.count("rollout worker") == 2 and p.stdout.count("update: rank") == 2
    data = json.loads(eqlen("show", run_dir, "--json").stdout)
    for it in data["iterations"]:
        assert it["stages"]["generate"]["metrics"]["workers"] == 2
        assert len(it["stages"]["update"]["metrics"]["worker_nodes"]) == 2
    root = Path(__file__).resolve().parents[1]
    check = subprocess.run(
        [sys.executable, str(root / "scripts" / "check_run.py"), str(run_dir)],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr
