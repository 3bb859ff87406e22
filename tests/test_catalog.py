"""Stage datasets as a catalog: list a cache's outputs with the runs that use them, run a
stage on any dataset folder (`--input`), reuse one units dataset across algorithms, open it
with polars and `datasets`, and collect what no run needs."""

import json
from pathlib import Path

import pytest

from eqlen_testing.cli import SMALL, eqlen
from flows import catalog, runner


def _run(cfg, run_dir):
    return runner.online(
        cfg,
        run_dir,
        call=lambda n, c, d, i, r, f: runner.run_stage(n, c, d, i, r, force=f, log=lambda m: None),
    )


def test_datasets_lists_every_output_with_the_runs_that_use_it(make_cfg, tmp_path):
    shared = tmp_path / "cache"
    a, b = tmp_path / "a", tmp_path / "b"
    _run(make_cfg("iterations=1", f"cache_dir={shared}"), a)
    _run(make_cfg("iterations=1", f"cache_dir={shared}", "update.algorithm=gspo"), b)
    rows = catalog.datasets(shared)
    by_stage = {}
    for d in rows:
        by_stage.setdefault(d.stage, []).append(d)
    # Both runs share prompts, rollouts, scores and units; each has its own update.
    for stage in ("prompts", "generate", "score", "pair"):
        assert len(by_stage[stage]) == 1 and by_stage[stage][0].runs == sorted([str(a), str(b)])
    assert sorted(r for d in by_stage["update"] for r in d.runs) == sorted([str(a), str(b)])
    assert all(d.rows and d.bytes > 0 and d.present for d in rows)
    assert {d.implementation for d in by_stage["update"]} == {
        "update.grpo.seq_mean_token_mean",
        "update.gspo.seq_mean_token_mean",
    }


def test_gc_removes_only_what_no_run_needs(make_cfg, tmp_path):
    shared = tmp_path / "cache"
    keep, gone = tmp_path / "keep", tmp_path / "gone"
    _run(make_cfg("iterations=3", f"cache_dir={shared}"), keep)
    _run(make_cfg("iterations=1", f"cache_dir={shared}", "seed=5"), gone)
    import shutil

    shutil.rmtree(gone)  # a run deleted by its user: its outputs are unreferenced now
    before = {d.path for d in catalog.datasets(shared)}
    young = catalog.gc(shared)  # everything is minutes old: kept (a run may not have recorded)
    assert young.removed == [] and young.kept_young > 0
    res = catalog.gc(shared, min_age_hours=0)
    after = {d.path for d in catalog.datasets(shared)}
    assert res.removed and set(res.removed) == before - after and res.freed_bytes > 0
    # Every output the kept run records is still there and intact.
    for stages in runner.RunRecord(keep).entries():
        for e in stages.values():
            assert runner.cache.lookup(Path(e["path"])) is not None
    # --keep-last 1: the run's policies of iterations 0 and 1 go, its last one stays.
    res = catalog.gc(shared, keep_last=1, min_age_hours=0)
    gone_updates = [p for p in res.removed if Path(p).parent.name == "update"]
    assert len(gone_updates) == 2 and len(res.removed) == 2
    last = runner.RunRecord(keep).entry(2, "update")
    assert runner.cache.lookup(Path(last["path"])) is not None


def test_input_runs_a_stage_on_any_dataset_folder_and_checks_its_schema(make_cfg, tmp_path):
    cfg = make_cfg("iterations=1")
    _run(cfg, tmp_path / "made")
    units = runner.RunRecord(tmp_path / "made").entry(0, "pair")["path"]
    # A colleague's copy of the units folder, trained in a fresh run directory.
    copy = tmp_path / "from-colleague"
    import shutil

    shutil.copytree(units, copy)
    fresh = tmp_path / "fresh"
    refs = runner.resolve_inputs("update", cfg, fresh, 0, {"units": copy})
    res = runner.run_stage("update", cfg, fresh, 0, refs, log=lambda m: None)
    assert res.rows > 0 and refs["policy"].path == runner.policy_input(cfg).path
    # Schema checked before anything runs.
    (tmp_path / "bad").mkdir()
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"unit_id": [1]}), tmp_path / "bad" / "units.parquet")
    with pytest.raises(Exception, match="units.parquet.*column"):
        runner.resolve_inputs("update", cfg, fresh, 0, {"units": tmp_path / "bad"})
    with pytest.raises(runner.RunError, match="no input"):
        runner.resolve_inputs("update", cfg, fresh, 0, {"rollouts": copy})


@pytest.mark.slow
@pytest.mark.flow
def test_the_readme_round_trip(prefect_server, tmp_path):
    """Make units once; train GRPO, GSPO and RLOO on the same units in three runs; open them
    in polars and `datasets`; list and collect the cache (the README's commands)."""
    made = tmp_path / "runs" / "made"
    eqlen(
        "run",
        "--run-dir",
        made,
        "--iterations",
        1,
        "--set",
        "pair.strategy=eqlen",
        "--set",
        "generate.rounds=4",
        *SMALL,
    )
    units = json.loads(eqlen("show", made, "--json").stdout)["iterations"][0]["stages"]["pair"][
        "path"
    ]
    keys = set()
    for algo in ("grpo", "gspo", "rloo"):
        out = eqlen(
            "stage",
            "update",
            "--run-dir",
            tmp_path / "runs" / algo,
            "--input",
            f"units={units}",
            "--set",
            f"update.algorithm={algo}",
            "--set",
            "update.loss_agg=unit_mean",
            *SMALL,
        ).stdout
        assert "update (iteration 0) ran" in out
        shown = json.loads(eqlen("show", tmp_path / "runs" / algo, "--json").stdout)
        upd = shown["iterations"][0]["stages"]["update"]
        keys.add(upd["key"])
        assert upd["metrics"]["optimizer_steps"] >= 1
    assert len(keys) == 3

    import datasets
    import polars as pl

    df = pl.read_parquet(Path(units) / "units.parquet")
    assert df["segment_len"].to_list() == [len(s) for s in df["segment_ids"].to_list()]
    ds = datasets.load_dataset(
        "parquet", data_files=str(Path(units) / "units.parquet"), split="train"
    )
    assert ds.num_rows == df.height and "advantage" in ds.column_names

    listed = json.loads(eqlen("datasets", made / "cache", "--json").stdout)
    pair_rows = [d for d in listed if d["stage"] == "pair"]
    assert len(pair_rows) == 1 and pair_rows[0]["path"] == units
    out = eqlen("gc", made / "cache", "--min-age-hours", "0").stdout
    assert "removed 0" in out  # every output is still used by the run that made it


def test_gc_never_touches_what_it_cannot_vouch_for(make_cfg, tmp_path):
    """The run dir given instead of its cache, a folder that is no cache, a copied and moved
    run, a damaged run.json, --keep-last 0: gc removes nothing it cannot vouch for."""
    import shutil

    run = tmp_path / "runs" / "a"
    _run(make_cfg("iterations=2"), run)
    with pytest.raises(runner.RunError, match="not a cache directory"):
        catalog.gc(run, min_age_hours=0)  # RUN instead of RUN/cache
    (tmp_path / "mydata" / "notes" / "2024").mkdir(parents=True)
    with pytest.raises(runner.RunError, match="not a cache directory"):
        catalog.gc(tmp_path / "mydata", min_age_hours=0)
    with pytest.raises(runner.RunError, match="N >= 1"):
        catalog.gc(run / "cache", keep_last=0, min_age_hours=0)
    # A copy moved elsewhere: its own cache is still in use by it.
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.copytree(run, moved)
    shutil.rmtree(run)
    res = catalog.gc(moved / "cache", min_age_hours=0)
    assert res.removed == [] and res.kept_in_use == len(catalog.datasets(moved / "cache"))
    (moved / "run.json").write_text('{"iterations": [')
    with pytest.raises(runner.RunError, match="damaged"):
        catalog.gc(moved / "cache", min_age_hours=0)


def test_a_run_trained_on_another_caches_units_is_listed_there(make_cfg, tmp_path):
    cfg = make_cfg("iterations=1")
    _run(cfg, tmp_path / "made")
    units = runner.RunRecord(tmp_path / "made").entry(0, "pair")["path"]
    user = tmp_path / "user"
    refs = runner.resolve_inputs("update", cfg, user, 0, {"units": units})
    runner.run_stage("update", cfg, user, 0, refs, log=lambda m: None)
    pair_rows = [d for d in catalog.datasets(tmp_path / "made" / "cache") if d.stage == "pair"]
    assert pair_rows[0].runs == sorted([str(tmp_path / "made"), str(user)])
