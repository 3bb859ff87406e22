"""The online loop as a Prefect flow: thin wiring over `flows.runner.run_stage`.

    for each iteration:  generate -> score -> pair -> update,  then policy <- update's model

Each stage is one task run named `<stage>-it<i>`; a stage served from the EqLen cache ends
in Prefect's `Cached` state (and its run name says so), so the UI shows which stages ran.
Prefect's own task cache is off (`NO_CACHE`): the pipeline keys its cache by content
itself (see `pipeline/cache.py` for why). Weight sync: the next iteration's generate takes
the update's `model/` folder as its policy input, so the rollout engine always samples
from the newest weights.

Runs against whatever Prefect API is configured (`PREFECT_API_URL`, e.g. a `prefect server
start`); with none, `eqlen run` starts (or reuses) eqlen's kept local server, flows/server.py.

User errors (`EqLenError`, and a stage's out-of-memory error turned into one) end the task
run and the flow run in Prefect's `Failed` state with the message, and the flow call raises
the error once, for the command line to print as one line. Prefect would also log each
failure with a traceback at ERROR level (task run, then flow run); for a user error those
console records are dropped (`_QuietUserErrors`): the message says it all, and the UI still
shows the failed states and their messages. Any other exception is a bug and keeps its
traceback.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State
from prefect.states import Completed, Failed

from flows import preflight, report, runner
from pipeline import config as config_mod
from pipeline.errors import EqLenError


class _QuietUserErrors(logging.Filter):
    """Drops Prefect's ERROR records of task and flow runs once a user error has ended the
    current flow (they repeat the message with a traceback of our own code)."""

    failed = False

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            self.failed
            and record.levelno >= logging.ERROR
            and record.name.startswith(("prefect.task_runs", "prefect.flow_runs"))
        )


_QUIET = _QuietUserErrors()


def _install_quiet_filter() -> None:
    """On the console handlers only (root's, where Prefect's run loggers propagate), so the
    API log handler still records everything."""
    for logger in (logging.getLogger(), logging.getLogger("prefect")):
        for h in logger.handlers:
            if isinstance(h, logging.StreamHandler) and _QUIET not in h.filters:
                h.addFilter(_QUIET)


def _user_failure(e: EqLenError) -> State:
    _QUIET.failed = True
    return Failed(message=str(e), data=e)


def _stage(
    name: str, cfg_json: str, run_dir: str, iteration: int, inputs: dict, force: bool
) -> runner.StageResult:
    cfg = config_mod.load(base=json.loads(cfg_json))
    try:
        res = runner.run_stage(name, cfg, run_dir, iteration, inputs, force=force)
    except EqLenError as e:
        return _user_failure(e)
    except Exception as e:
        if preflight.is_out_of_memory(e):
            return _user_failure(preflight.out_of_memory(name, e, cfg))
        raise
    if res.cached:
        return Completed(
            data=res, name="Cached", message=f"served from cache {res.key} ({res.path})"
        )
    return res


def _as_task(
    name: str, cfg: config_mod.Config, run_dir: Path, iteration: int, refs: dict, force: bool
) -> runner.StageResult:
    """Run one stage as a Prefect task run named `<stage>-it<i>` (plus ` (cached)`)."""
    cached = not force and runner.is_cached(name, cfg, run_dir, iteration, refs)
    label = f"{name}-it{iteration}" + (" (cached)" if cached else "")
    t = task(_stage, name=name, task_run_name=label, cache_policy=NO_CACHE, persist_result=False)
    # The config as one string: Prefect walks a task's arguments for futures to resolve,
    # and walking the ~150 values of a config dict cost ~2 ms per task run.
    cfg_json = json.dumps(config_mod.to_dict(cfg))
    res = t(name, cfg_json, str(run_dir), iteration, refs, force)
    return res.result() if isinstance(res, State) else res  # a hit returns its Cached state


@flow(name="eqlen-online", log_prints=False, persist_result=False)
def online(cfg_data: dict, run_dir: str, force: bool = False) -> list[dict]:
    _QUIET.failed = False
    _install_quiet_filter()
    try:
        cfg = config_mod.load(base=cfg_data)
        history = runner.online(
            cfg, run_dir, force=force, call=_as_task, on_iteration=report.iteration_line
        )
    except EqLenError as e:  # from a task (its Failed state re-raised) or the loop itself
        return _user_failure(e)
    return [{k: v.__dict__ for k, v in it.items()} for it in history]
