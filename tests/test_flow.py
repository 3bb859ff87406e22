"""The online flow against a real Prefect server (started once per test session)."""

import asyncio

import pytest

from pipeline import config

pytestmark = pytest.mark.flow


def _task_runs(flow_run_id, expect=8, timeout=30.0):
    """Task runs of a flow run, as the server recorded them (events arrive asynchronously)."""
    import time

    deadline = time.time() + timeout
    while True:
        runs = _read_task_runs(flow_run_id)
        done = [r for r in runs if r.state is not None and r.state.is_final()]
        if len(done) >= expect or time.time() > deadline:
            return runs
        time.sleep(0.5)


def _read_task_runs(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def fetch():
        async with get_client() as client:
            return await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )

    return asyncio.run(fetch())


def test_online_flow_runs_stages_as_tasks_and_shows_cache_hits(
    prefect_server, make_cfg, policy_dir, tmp_path
):
    from flows.online import online

    cfg = make_cfg(f"model={policy_dir}")
    state = online(config.to_dict(cfg), str(tmp_path), return_state=True)
    assert state.is_completed()
    first = state.result()
    assert [list(it) for it in first] == [["generate", "score", "pair", "update"]] * 2
    # Weight sync: iteration 1 generated from iteration 0's updated model.
    assert first[1]["generate"]["inputs"]["policy"].path == first[0]["update"]["path"] + "/model"
    runs = _task_runs(state.state_details.flow_run_id)
    names = sorted(r.name for r in runs)
    assert names == sorted(
        f"{s}-it{i}" for s in ("generate", "score", "pair", "update") for i in range(2)
    )
    assert all(r.state.name == "Completed" for r in runs)

    again = online(config.to_dict(cfg), str(tmp_path), return_state=True)
    runs = _task_runs(again.state_details.flow_run_id)
    assert len(runs) == 8
    assert all(r.name.endswith("(cached)") and r.state.name == "Cached" for r in runs)
    assert [it["update"]["key"] for it in again.result()] == [it["update"]["key"] for it in first]
