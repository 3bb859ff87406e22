"""Experiment tracking: every stage's metrics copied to TensorBoard, MLflow or W&B.

    log.to       any of tensorboard, mlflow, wandb (empty = none)
    log.dir      where their files go (empty = RUN_DIR/logs)
    log.project  the MLflow experiment and W&B project (TensorBoard: not used)

`open_trackers(run_dir, cfg)` opens the trackers named in `log.to` once per run, tagged by
the run (the run directory's name; its path as a tag) with the flattened config as their
parameters. Then, as each stage ends (`Trackers.log_stage`):

- its metrics at step = the iteration, named `<stage>/<metric>` (`eval/avg@8`, ...);
- for the update, its metrics per optimizer step at step = the global optimizer step,
  named `update_step/<metric>` (from the stage's `steps` metric when it has one, else its
  `metrics.parquet`, one row per optimizer step).

Where the files go (LOG_DIR = `log.dir`, or RUN_DIR/logs):

    tensorboard  LOG_DIR/tensorboard/<run name>/   `tensorboard --logdir LOG_DIR/tensorboard`
    mlflow       LOG_DIR/mlflow.db                  `mlflow ui --backend-store-uri
                                                    sqlite:///LOG_DIR/mlflow.db`
    wandb        LOG_DIR/wandb/offline-run-*/       `wandb sync LOG_DIR/wandb/offline-run-*`

MLflow's store is a local SQLite file: MLflow 3 keeps its old `./mlruns` file store in
maintenance mode and refuses to open it unless MLFLOW_ALLOW_FILE_STORE is set; SQLite is
what it recommends instead, needs no server and works offline. W&B runs offline unless
WANDB_MODE says otherwise (these machines have no network; `wandb sync` uploads later).
Metric names MLflow does not accept (`@`) are spelled out there: `eval/avg_at_8`.

Trackers never break a run: a tracker whose package is missing is an error when the run
starts (exit 2, naming the package and `pip install -e '.[track]'`), before any stage; a
tracker that fails while logging is reported once on stderr and dropped, and the run goes
on. Each tracker is one function in `TRACKERS` with one signature,

    open(run_dir: Path, cfg: Config) -> tracker with log_params(dict),
                                         log_metrics(step, dict, prefix), close(ok)
"""

from __future__ import annotations

import importlib
import math
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Protocol

from pipeline.config import Config, leaves
from pipeline.errors import EqLenError
from pipeline.registry import Registry

INSTALL = "pip install -e '.[track]'"


class TrackingError(EqLenError, RuntimeError):
    """A tracker named in log.to that cannot be used; the message says what to install."""


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, step: int, metrics: dict[str, float], prefix: str) -> None: ...
    def close(self, ok: bool = True) -> None: ...


TRACKERS: Registry = Registry("experiment tracker", "log.to")
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
# Per-step metrics of a stage: the file its output folder holds them in (when its metrics
# carry no `steps` list), and the step key of each row.
PER_STEP = {"update": "metrics.parquet"}


def log_dir(cfg: Config, run_dir: Path) -> Path:
    return Path(cfg.log.dir).expanduser().resolve() if cfg.log.dir else Path(run_dir) / "logs"


def run_name(run_dir: Path) -> str:
    return Path(run_dir).resolve().name


def _need(package: str, tracker: str):
    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise TrackingError(
            f"log.to names {tracker}, but {package} cannot be imported ({e}). Install the "
            f"trackers with `{INSTALL}`, or remove {tracker} from log.to."
        ) from None


def check(cfg: Config) -> None:
    """Before the run starts: every name in log.to is a tracker whose package imports (the
    import is the tracker's own, done early: the run imports it anyway)."""
    for name in cfg.log.to:
        TRACKERS.get(name)  # an unknown name fails listing the valid ones
        _need(PACKAGES[name], name)


def flat_config(cfg: Config) -> dict[str, Any]:
    """{dotted key: value} of every config key: the run's parameters in the trackers."""
    return {key: value for key, _, value, _ in leaves(cfg)}


def scalars(metrics: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a metrics dict (nested dicts flattened with `/`); strings
    (the update's device), lists (per-step records) and None are left out."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out.update(scalars(v, f"{prefix}{k}/"))
        elif isinstance(v, (bool, int, float)) and math.isfinite(float(v)):
            out[f"{prefix}{k}"] = float(v)
    return out


def optimizer_steps(result) -> list[tuple[int, dict[str, float]]]:
    """(global optimizer step, metrics) per optimizer step of a stage result that has them."""
    rows = result.metrics.get("steps")
    if not isinstance(rows, list):
        f = Path(result.path) / PER_STEP.get(result.stage, "")
        if result.stage not in PER_STEP or not f.is_file():
            return []
        import pyarrow.parquet as pq

        rows = pq.read_table(f).to_pylist()
    first = int(result.metrics.get("global_step", len(rows))) - len(rows)
    out = []
    for i, row in enumerate(rows):
        step = row.get("step", first + i) if isinstance(row, dict) else first + i
        values = (
            scalars({k: v for k, v in row.items() if k != "step"}) if isinstance(row, dict) else {}
        )
        out.append((int(step), values))
    return out


class Trackers:
    """The open trackers of one run; a tracker that fails is reported and dropped."""

    def __init__(self, opened: dict[str, Tracker]):
        self.opened = opened

    def _each(self, what: str, fn) -> None:
        for name, t in list(self.opened.items()):
            try:
                fn(t)
            except Exception as e:  # noqa: BLE001 - a tracker must never break the run
                del self.opened[name]
                print(
                    f"eqlen: warning: tracker {name} failed while {what} ({type(e).__name__}: "
                    f"{e}); it is dropped, the run goes on",
                    file=sys.stderr,
                )

    def log_params(self, params: dict[str, Any]) -> None:
        self._each("logging the config", lambda t: t.log_params(params))

    def log_stage(self, result) -> None:
        """A stage result's metrics at step = iteration, and its per-step metrics."""
        if not self.opened:
            return
        values = {**scalars(result.metrics), "seconds": float(result.seconds)}
        self._each(
            f"logging {result.stage}",
            lambda t: t.log_metrics(result.iteration, values, result.stage),
        )
        steps = optimizer_steps(result)
        if steps:

            def per_step(t):
                for step, m in steps:
                    t.log_metrics(step, m, f"{result.stage}_step")

            self._each(f"logging {result.stage}'s optimizer steps", per_step)

    def close(self, ok: bool = True) -> None:
        self._each("closing", lambda t: t.close(ok))
        self.opened = {}


def open_trackers(run_dir: str | Path, cfg: Config) -> Trackers:
    """Open every tracker of log.to for this run and log the config (see the module)."""
    run_dir = Path(run_dir).resolve()
    opened: dict[str, Tracker] = {}
    try:
        for name in dict.fromkeys(cfg.log.to):
            opened[name] = TRACKERS.get(name)(run_dir, cfg)
    except TrackingError:
        Trackers(opened).close(False)
        raise
    except Exception as e:  # noqa: BLE001 - a store that cannot be opened, at run start
        Trackers(opened).close(False)
        raise TrackingError(
            f"log.to: tracker {name} could not be opened under {log_dir(cfg, run_dir)} "
            f"({type(e).__name__}: {e}); fix log.dir, or remove {name} from log.to"
        ) from None
    trackers = Trackers(opened)
    trackers.log_params(flat_config(cfg))
    return trackers


# ----------------------------------------------------------------------------- trackers


@TRACKERS.register("tensorboard")
class TensorBoard:
    """Event files by torch's SummaryWriter, one folder per run."""

    def __init__(self, run_dir: Path, cfg: Config):
        _need("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir(cfg, run_dir) / "tensorboard" / run_name(run_dir)))
        self.writer.add_text("run", f"`{run_dir}`")

    def log_params(self, params: dict[str, Any]) -> None:
        # As a table in the Text tab (add_hparams would write a second run folder).
        rows = "\n".join(f"| {k} | {v!r} |" for k, v in params.items())
        self.writer.add_text("config", "| key | value |\n|---|---|\n" + rows)

    def log_metrics(self, step: int, metrics: dict[str, float], prefix: str) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(f"{prefix}/{k}", v, step)
        self.writer.flush()

    def close(self, ok: bool = True) -> None:
        self.writer.close()


_MLFLOW_BAD = re.compile(r"[^0-9A-Za-z_\-. :/]")


@TRACKERS.register("mlflow")
class MLflow:
    """One MLflow run per `eqlen run`, in experiment `log.project` of a local SQLite store."""

    def __init__(self, run_dir: Path, cfg: Config):
        import logging

        _need("mlflow", "mlflow")
        from mlflow import MlflowClient

        # MLflow logs its database set-up at INFO on every new store.
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
        d = log_dir(cfg, run_dir)
        d.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=f"sqlite:///{d / 'mlflow.db'}")
        with warnings.catch_warnings():
            # SQLAlchemy's deprecation notes about MLflow's own mappings, on store set-up.
            warnings.simplefilter("ignore", DeprecationWarning)
            exp = self.client.get_experiment_by_name(cfg.log.project)
        exp_id = (
            exp.experiment_id
            if exp is not None
            else self.client.create_experiment(
                cfg.log.project, artifact_location=(d / "mlartifacts").as_uri()
            )
        )
        self.run_id = self.client.create_run(
            exp_id,
            run_name=run_name(run_dir),
            tags={"eqlen.run_dir": str(run_dir), "eqlen.run": run_name(run_dir)},
        ).info.run_id

    @staticmethod
    def key(name: str) -> str:
        return _MLFLOW_BAD.sub("_", name.replace("@", "_at_"))

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(self.key(k), str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, step: int, metrics: dict[str, float], prefix: str) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(self.key(f"{prefix}/{k}"), v, now, step) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def close(self, ok: bool = True) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")


@TRACKERS.register("wandb")
class WandB:
    """A W&B run, offline unless WANDB_MODE says otherwise. Stage metrics are plotted over
    `iteration`, per-step metrics over `optimizer_step` (W&B's own step only increases)."""

    def __init__(self, run_dir: Path, cfg: Config):
        wandb = _need("wandb", "wandb")
        d = log_dir(cfg, run_dir)
        d.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            mode=os.environ.get("WANDB_MODE", "offline"),
            dir=str(d),
            project=cfg.log.project,
            name=run_name(run_dir),
            notes=str(run_dir),
            tags=["eqlen"],
            reinit="create_new",
            settings=wandb.Settings(silent=True, console="off"),
        )
        self.axes: set[str] = set()

    def log_params(self, params: dict[str, Any]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log_metrics(self, step: int, metrics: dict[str, float], prefix: str) -> None:
        axis = "optimizer_step" if prefix.endswith("_step") else "iteration"
        if prefix not in self.axes:
            self.run.define_metric(axis)
            self.run.define_metric(f"{prefix}/*", step_metric=axis)
            self.axes.add(prefix)
        self.run.log({axis: step, **{f"{prefix}/{k}": v for k, v in metrics.items()}})

    def close(self, ok: bool = True) -> None:
        self.run.finish(exit_code=0 if ok else 1)
