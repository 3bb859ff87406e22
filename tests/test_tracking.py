"""Experiment tracking (flows/tracking.py): a real one-iteration run with log.to set, and
what each tracker wrote read back with the tracker's own reader — TensorBoard's
EventAccumulator, MLflow's client on the local SQLite store, and W&B's offline run file
(its record log parsed with W&B's protobuf classes)."""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flows import runner, tracking

HAS_WANDB = importlib.util.find_spec("wandb") is not None


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, policy_dir):
    """One iteration plus the held-out eval, logged to every installed tracker."""
    from pipeline import config
    from pipeline.demo import make_demo_prompts

    tmp = tmp_path_factory.mktemp("tracked")
    held = tmp / "heldout.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in make_demo_prompts(4, seed=5).to_pylist()))
    to = ["tensorboard", "mlflow", *(["wandb"] if HAS_WANDB else [])]
    cfg = config.load(
        None,
        [
            "data.demo_size=64",
            "data.prompts_per_iteration=4",
            "generate.group_size=4",
            "generate.max_new_tokens=8",
            "iterations=1",
            f"model={policy_dir}",
            f"eval.data={held}",
            "eval.k=2",
            "eval.every=1",
            f"log.to=[{','.join(to)}]",
        ],
    )
    run_dir = tmp / "run-a"
    history = runner.online(cfg, run_dir, call=runner._direct)
    return cfg, run_dir, history


def _steps(history) -> list[dict]:
    return pq.read_table(Path(history[0]["update"].path) / "metrics.parquet").to_pylist()


def test_tensorboard_event_files_hold_every_stage_and_optimizer_step(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, run_dir, history = tracked_run
    ea = EventAccumulator(str(run_dir / "logs" / "tensorboard" / "run-a"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    for stage in ("generate", "score", "pair", "update", "eval"):
        assert f"{stage}/seconds" in tags
    (ev,) = ea.Scalars("score/reward_mean")
    assert ev.step == 0 and ev.value == pytest.approx(history[0]["score"].metrics["reward_mean"])
    evals = ea.Scalars("eval/avg@2")  # the initial model at 0, the final policy at 1
    assert [e.step for e in evals] == [0, 1]
    assert [e.value for e in evals] == pytest.approx(
        [history[0]["eval"].metrics["avg@2"], history[1]["eval"].metrics["avg@2"]]
    )
    steps = _steps(history)
    losses = ea.Scalars("update_step/loss")
    assert [e.step for e in losses] == [s["step"] for s in steps] == list(range(len(steps)))
    assert [e.value for e in losses] == pytest.approx([s["loss"] for s in steps])
    assert "update/device" not in tags  # strings are not scalars
    text = ea.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| generate.group_size | 4 |" in text


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # SQLAlchemy's, inside MLflow
def test_mlflow_store_holds_the_run_its_config_and_metrics(tracked_run):
    from mlflow import MlflowClient

    cfg, run_dir, history = tracked_run
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'logs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("eqlen")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "run-a" and run.info.status == "FINISHED"
    assert run.data.tags["eqlen.run_dir"] == str(run_dir.resolve())
    assert run.data.params["generate.group_size"] == "4"
    assert run.data.params["log.to"].startswith("['tensorboard', 'mlflow'")
    (m,) = client.get_metric_history(run.info.run_id, "pair/units")
    assert (m.step, m.value) == (0, history[0]["pair"].metrics["units"])
    evals = client.get_metric_history(run.info.run_id, "eval/avg_at_2")  # '@' spelled out
    assert sorted((e.step, e.value) for e in evals) == [
        (0, history[0]["eval"].metrics["avg@2"]),
        (1, history[1]["eval"].metrics["avg@2"]),
    ]
    steps = _steps(history)
    grad = client.get_metric_history(run.info.run_id, "update_step/grad_norm")
    assert sorted((g.step, g.value) for g in grad) == [
        (s["step"], pytest.approx(s["grad_norm"])) for s in steps
    ]


def _wandb_records(path: Path):
    """The records of a W&B run file: a LevelDB-style log (7-byte file header, 32 KiB
    blocks, each record chunk with a 7-byte header: crc32, length, type FULL/FIRST/MIDDLE/
    LAST), each record a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, buf = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        buf += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            r = pb.Record()
            r.ParseFromString(buf)
            buf = b""
            yield r


@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed (the track extra)")
def test_wandb_offline_run_holds_config_and_history(tracked_run):
    cfg, run_dir, history = tracked_run
    (f,) = (run_dir / "logs" / "wandb").glob("offline-run-*/run-*.wandb")
    rows, config, name = [], {}, None
    for r in _wandb_records(f):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            rows.append(
                {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            )
        elif kind == "run":
            name = r.run.display_name
            config.update({u.key: json.loads(u.value_json) for u in r.run.config.update})
        elif kind == "config":
            config.update({u.key: json.loads(u.value_json) for u in r.config.update})
    assert name == "run-a"
    assert config["generate.group_size"] == 4
    score = [row for row in rows if "score/reward_mean" in row]
    assert [(row["iteration"], row["score/reward_mean"]) for row in score] == [
        (0, pytest.approx(history[0]["score"].metrics["reward_mean"]))
    ]
    steps = _steps(history)
    loss = [
        (row["optimizer_step"], row["update_step/loss"])
        for row in rows
        if "update_step/loss" in row
    ]
    assert loss == [(s["step"], pytest.approx(s["loss"])) for s in steps]
    assert [row["eval/avg@2"] for row in rows if "eval/avg@2" in row] == pytest.approx(
        [history[0]["eval"].metrics["avg@2"], history[1]["eval"].metrics["avg@2"]]
    )


class Recorder:
    def __init__(self, fail=False):
        self.calls, self.fail, self.closed = [], fail, None

    def log_params(self, params):
        self.calls.append(("params", params))

    def log_metrics(self, step, metrics, prefix):
        if self.fail:
            raise OSError("disk full")
        self.calls.append((prefix, step, metrics))

    def close(self, ok=True):
        self.closed = ok


def test_per_step_metrics_from_a_steps_list_and_a_failing_tracker_is_dropped(capsys):
    """An update whose metrics carry `steps` (one dict per optimizer step) is logged per
    step at its global step; numbers only. A tracker that raises is dropped with a warning,
    the others go on."""
    res = runner.StageResult(
        stage="update",
        iteration=3,
        key="k",
        path="/nonexistent",
        cached=False,
        rows=8,
        metrics={
            "loss": 0.5,
            "device": "cpu",
            "len_correct": None,
            "global_step": 12,
            "steps": [{"step": 10, "loss": 0.7, "lr": 1e-3}, {"step": 11, "loss": 0.3, "lr": 1e-3}],
        },
        digest="d",
        seconds=1.5,
    )
    good, bad = Recorder(), Recorder(fail=True)
    trackers = tracking.Trackers({"good": good, "bad": bad})
    trackers.log_stage(res)
    assert good.calls == [
        ("update", 3, {"loss": 0.5, "global_step": 12.0, "seconds": 1.5}),
        ("update_step", 10, {"loss": 0.7, "lr": 1e-3}),
        ("update_step", 11, {"loss": 0.3, "lr": 1e-3}),
    ]
    assert list(trackers.opened) == ["good"]
    assert "tracker bad failed" in capsys.readouterr().err
    trackers.close(False)
    assert good.closed is False


def test_unknown_or_missing_tracker_fails_before_the_run(make_cfg, tmp_path):
    from pipeline.registry import UnknownName

    with pytest.raises(UnknownName, match="tensorboard, mlflow, wandb"):
        tracking.check(make_cfg("log.to=[tensorbored]"))
    # A tracker whose package cannot be imported: exit 2 from `eqlen run`, before Prefect
    # starts and before anything is written, naming the package and the install command.
    code = (
        "import sys; sys.modules['mlflow'] = None; from flows.cli import main; "
        f"sys.exit(main(['run', '--run-dir', {str(tmp_path / 'run')!r}, '--set', "
        "'log.to=[mlflow]', '--set', 'data.demo_size=64']))"
    )
    p = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"},
        timeout=300,
    )
    assert p.returncode == 2, p.stderr
    assert "mlflow" in p.stderr and "pip install -e '.[track]'" in p.stderr
    assert not (tmp_path / "run" / "run.json").exists()
