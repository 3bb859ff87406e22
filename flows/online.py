"""The online loop as a Prefect flow: thin wiring over `pipeline.runner.run_stage`.

    for each iteration:  generate -> score -> pair -> update,  then policy <- update's model

Each stage is one task run named `<stage>-it<i>`; a stage served from the EqLen cache ends
in Prefect's `Cached` state (and its run name says so), so the UI shows which stages ran.
Prefect's own task cache is off (`NO_CACHE`): the pipeline keys its cache by content
itself (see `pipeline/cache.py` for why). Weight sync: the next iteration's generate takes
the update's `model/` folder as its policy input, so the rollout engine always samples
from the newest weights.

Runs against whatever Prefect API is configured (`PREFECT_API_URL`, e.g. a `prefect server
start`); with none, Prefect starts a temporary local server for the run.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State
from prefect.states import Completed

from pipeline import config as config_mod
from pipeline import report, runner


def _stage(name: str, cfg_data: dict, run_dir: str, iteration: int, inputs: dict,
           force: bool) -> runner.StageResult:
    cfg = config_mod.load(base=cfg_data)
    res = runner.run_stage(name, cfg, run_dir, iteration, inputs, force=force)
    if res.cached:
        return Completed(data=res, name="Cached",
                         message=f"served from cache {res.key} ({res.path})")
    return res


def _as_task(name: str, cfg: config_mod.Config, run_dir: Path, iteration: int, refs: dict,
             force: bool) -> runner.StageResult:
    """Run one stage as a Prefect task run named `<stage>-it<i>` (plus ` (cached)`)."""
    cached = not force and runner.is_cached(name, cfg, run_dir, iteration, refs)
    label = f"{name}-it{iteration}" + (" (cached)" if cached else "")
    t = task(_stage, name=name, task_run_name=label, cache_policy=NO_CACHE, persist_result=False)
    res = t(name, config_mod.to_dict(cfg), str(run_dir), iteration, refs, force)
    return res.result() if isinstance(res, State) else res  # a hit returns its Cached state


@flow(name="eqlen-online", log_prints=False, persist_result=False)
def online(cfg_data: dict, run_dir: str, force: bool = False) -> list[dict]:
    cfg = config_mod.load(base=cfg_data)
    history = runner.online(cfg, run_dir, force=force, call=_as_task,
                            on_iteration=report.iteration_line)
    return [{k: v.__dict__ for k, v in it.items()} for it in history]
