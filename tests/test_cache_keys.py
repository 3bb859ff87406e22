"""No stale cache hit: every stage's key covers exactly the config it reads and the code
it runs, derived from its one `STAGE` declaration (pipeline/stage.py); runs can be extended,
branched offline (with `stale` flags) and moved."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from eqlen_testing.cli import eqlen
from flows import runner
from flows.report import show_data
from pipeline import config, stage
from stages import pair, score

SPECS = {name: runner.stage_spec(name) for name in runner.STAGE_NAMES}
DIGESTS = {
    "prompts": "p",
    "heldout": "h",
    "policy": "m",
    "reference": "m",
    "rollouts": "r",
    "scored": "s",
    "units": "u",
}
SPECIAL = {  # a valid other value where "+1" or "not" would not be one
    "generate.group_size": 6,
    "generate.top_p": 0.9,
    "generate.vllm_max_model_len": 128,
    "generate.vllm_block_size": 64,
    "generate.vllm_gpu_memory_utilization": 0.5,
    "update.dual_clip": 3.0,
    "score.reward_funcs": ["numeric_match"],
    "score.reward_weights": [2.0],
    "data.prompts": "prompts.jsonl",
    "model": "some/folder",
    "cache_dir": "/tmp/elsewhere",
    "log.to": ["tensorboard"],
    "score.reward_models": ["some/reward_model"],
    "update.lora_target_modules": ["q_proj"],
    "cluster.ray_address": "auto",
}


# Keys read only under some settings (vLLM's settings by the vllm engine, batch_tracks by
# the hf engine, the run's length by a decaying lr schedule): one of the bases reads each.
# (On a Ray cluster, so that the workers keys have a valid other value.)
RAY = "cluster.ray_address=local"
BASES = ([RAY], ["generate.engine=vllm", "update.lr_schedule=cosine", RAY])
CONDITIONAL = {k for b in BASES for s in SPECS.values() for k in s.key_reads(config.load(None, b))}


def other_value(key, f, value):
    if key in SPECIAL:
        return SPECIAL[key]
    choices = config.choices_of(f, key)
    if choices:
        return next(c for c in choices if c != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 2
    if isinstance(value, float):
        return value * 2 if value else 0.5
    if isinstance(value, str):
        return value + "_x"
    raise AssertionError(f"no other value for {key}")  # a new kind of field: extend the test


def keys(cfg) -> dict[str, dict]:
    return {n: s.key_parts(cfg, {k: DIGESTS[k] for k in s.inputs}, 0) for n, s in SPECS.items()}


@pytest.mark.parametrize(
    "base",
    BASES,
    ids=["defaults", "vllm+cosine"],
)
def test_every_config_field_changes_the_key_of_exactly_the_stages_that_read_it(base):
    """Walk every config key. Changing it changes the key of every stage whose declaration
    reads it and of no other; a key no stage reads is a run-level field (an input of the
    run, or where/how long it runs) or declared as not affecting outputs (device, batch
    sizes). What a stage can read is enforced at run time (ConfigView), so "declares" and
    "reads" are the same set."""
    cfg0 = config.load(None, base)
    before = keys(cfg0)
    for key, f, value, _ in config.leaves(cfg0):
        cfg1 = config.apply(config.load(None, base), {key: other_value(key, f, value)})
        after = keys(cfg1)
        readers = {
            n for n, s in SPECS.items() if key in s.key_reads(cfg0) or key in s.key_reads(cfg1)
        }
        changed = {n for n in SPECS if before[n] != after[n]}
        assert changed == readers, (key, changed, readers)
        if not readers:
            ignored = any(key in stage.expand(s.ignores, cfg0) for s in SPECS.values())
            assert key in runner.RUN_FIELDS or ignored or key in CONDITIONAL, (
                f"{key} is read by no stage: declare it in a STAGE or in runner.RUN_FIELDS"
            )


def test_update_key_has_iterations_only_under_a_decaying_schedule():
    def k(*o):
        return keys(config.load(None, list(o)))["update"]

    assert k("iterations=4") == k("iterations=5")
    assert k("iterations=4", "update.lr_schedule=linear") != k(
        "iterations=5", "update.lr_schedule=linear"
    )
    assert k("score.correct_threshold=0.5") != k()  # its length diagnostics split by it


def test_a_stage_cannot_read_config_it_does_not_declare(make_cfg, tmp_path, monkeypatch):
    cfg = make_cfg()

    def sneaky(inputs, out, cfg, ctx):
        return {"rows": 0, "metrics": {"t": cfg.generate.temperature}}  # pair never declared it

    monkeypatch.setattr(pair, "STAGE", dataclasses.replace(pair.STAGE, run=sneaky))
    refs = {"scored": runner.Ref(str(tmp_path), "d")}
    with pytest.raises(stage.UndeclaredRead, match="generate.temperature"):
        runner.run_stage("pair", cfg, tmp_path / "run", 0, refs, log=lambda m: None)

    def reads_iteration(inputs, out, cfg, ctx):
        return {"rows": ctx.iteration, "metrics": {}}  # score's key leaves the iteration out

    monkeypatch.setattr(score, "STAGE", dataclasses.replace(score.STAGE, run=reads_iteration))
    with pytest.raises(stage.UndeclaredRead, match="uses_iteration"):
        runner.run_stage(
            "score", cfg, tmp_path / "run", 0, {"rollouts": refs["scored"]}, log=lambda m: None
        )


def test_code_digest_covers_every_project_module_a_stage_imports(monkeypatch):
    root = Path(runner.__file__).resolve().parents[1]
    files = {p.relative_to(root).as_posix() for p in stage.code_files("stages.update")}
    assert {
        "stages/update.py",
        "stages/losses.py",
        "pipeline/models.py",
        "schemas/__init__.py",
        "pipeline/registry.py",
    } <= files
    assert "pipeline/config.py" not in files  # its values are in the key instead
    gen = {p.relative_to(root).as_posix() for p in stage.code_files("stages.generate")}
    assert {"stages/hf_engine.py", "stages/vllm_engine.py", "pipeline/models.py"} <= gen
    # Editing any of them (here: pipeline/models.py's bytes) changes the digest.
    before = stage.code_digest("stages.update")
    real = stage.file_digest
    monkeypatch.setattr(
        stage, "file_digest", lambda p: real(p) + ("edited" if Path(p).name == "models.py" else "")
    )
    assert stage.code_digest("stages.update") != before
    assert stage.code_digest("stages.pair") == stage.code_digest("stages.pair")


def _run(cfg, run_dir):
    return runner.online(
        cfg,
        run_dir,
        call=lambda n, c, d, i, r, f: runner.run_stage(n, c, d, i, r, force=f, log=lambda m: None),
    )


def test_extending_a_run_serves_the_earlier_iterations_from_cache(make_cfg, tmp_path):
    _run(make_cfg("iterations=2"), tmp_path)
    h = _run(make_cfg("iterations=3"), tmp_path)
    assert all(r.cached for it in h[:2] for r in it.values())
    assert not any(r.cached for r in h[2].values())
    # A decaying schedule depends on the total: extending it retrains.
    _run(make_cfg("iterations=2", "update.lr_schedule=linear"), tmp_path / "lin")
    h = _run(make_cfg("iterations=3", "update.lr_schedule=linear"), tmp_path / "lin")
    assert h[0]["pair"].cached and not h[0]["update"].cached


def test_offline_rerun_marks_downstream_stale_and_show_says_so(make_cfg, tmp_path):
    cfg = make_cfg("iterations=2")
    _run(cfg, tmp_path)
    assert not any(
        s["stale"] for it in show_data(tmp_path)["iterations"] for s in it["stages"].values()
    )
    other = config.apply(
        config.load(None, base=runner.RunRecord(tmp_path).config()),
        overrides=["pair.strategy=truncate"],
    )
    runner.run_stage(
        "pair",
        other,
        tmp_path,
        0,
        runner.resolve_inputs("pair", other, tmp_path, 0),
        log=lambda m: None,
    )
    shown = show_data(tmp_path)["iterations"]
    flags = [{n: s["stale"] for n, s in it["stages"].items()} for it in shown]
    # update 0 trained on the group units; everything after it descends from that update.
    assert flags[0] == {"generate": False, "score": False, "pair": False, "update": True}
    assert all(flags[1].values())
    assert shown[0]["stages"]["pair"]["metrics"]["units"] != 4  # truncate: one unit per pair
    # Recomputing the update on the new units clears it for iteration 0.
    runner.run_stage(
        "update",
        other,
        tmp_path,
        0,
        runner.resolve_inputs("update", other, tmp_path, 0),
        log=lambda m: None,
    )
    flags = [
        {n: s["stale"] for n, s in it["stages"].items()} for it in show_data(tmp_path)["iterations"]
    ]
    assert not any(flags[0].values()) and flags[1]["generate"]


def test_negative_or_missing_iteration_is_a_clear_error(make_cfg, tmp_path):
    cfg = make_cfg("iterations=1")
    _run(cfg, tmp_path)
    with pytest.raises(runner.RunError, match="numbered from 0"):
        runner.resolve_inputs("generate", cfg, tmp_path, -1)
    with pytest.raises(runner.RunError, match="iteration 3 has no"):
        runner.resolve_inputs("score", cfg, tmp_path, 3)


def test_damaged_run_record_is_a_clear_error_and_run_rebuilds_it(make_cfg, tmp_path):
    cfg = make_cfg("iterations=1")
    _run(cfg, tmp_path)
    record = tmp_path / "run.json"
    for bad in ('{"iterations": [', "[1, 2]", '{"iterations": 3}'):
        record.write_text(bad)
        with pytest.raises(runner.RunError, match="damaged"):
            show_data(tmp_path)
    h = _run(cfg, tmp_path)  # re-records from the cache, nothing recomputed
    assert all(r.cached for r in h[0].values())
    assert (tmp_path / "run.json.damaged").read_text() == '{"iterations": 3}'
    assert len(show_data(tmp_path)["iterations"]) == 1


@pytest.mark.slow
def test_a_copied_and_moved_run_dir_still_works(make_cfg, tmp_path):
    run = tmp_path / "run"
    _run(make_cfg("iterations=1"), run)
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    run.rename(tmp_path / "moved-away")
    recorded = json.loads((copy / "run.json").read_text())
    assert not Path(recorded["iterations"][0]["stages"]["pair"]["path"]).is_absolute()
    shown = json.loads(eqlen("show", copy, "--json").stdout)
    assert shown["run_dir"] == str(copy) and all(
        s["present"] and s["path"].startswith(str(copy))
        for s in shown["iterations"][0]["stages"].values()
    )
    p = eqlen(
        "stage", "pair", "--run-dir", copy, "--iteration", "0", "--set", "pair.strategy=truncate"
    )
    assert p.returncode == 0, p.stderr
    root = Path(runner.__file__).resolve().parents[1]
    p = subprocess.run(
        [sys.executable, str(root / "scripts" / "check_run.py"), str(copy)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0 and "invariants hold" in p.stdout, p.stdout + p.stderr


@pytest.mark.slow
def test_editing_a_reward_module_constant_reruns_score(make_cfg, tmp_path):
    """The reward's whole module file is in the key: a constant or helper edited next to
    the function reruns scoring (each `eqlen stage` is a fresh process, as for a user)."""
    mods = tmp_path / "mods"
    mods.mkdir()
    src = textwrap.dedent("""
        PARTIAL = {partial}

        def _number(text):
            return any(ch.isdigit() for ch in text)

        def shaped(completions, answer, **kw):
            return [1.0 if c.strip() == a else PARTIAL if _number(c) else 0.0
                    for c, a in zip(completions, answer)]
    """)
    (mods / "myreward.py").write_text(src.format(partial=0.2))
    run = tmp_path / "run"
    _run(make_cfg("iterations=1"), run)
    env = {"PYTHONPATH": f"{mods}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = ("stage", "score", "--run-dir", run, "--set", "score.reward_funcs=[myreward:shaped]")

    def score_once():
        p = eqlen(*args, env=env)
        assert p.returncode == 0, p.stderr
        e = runner.RunRecord(run).entry(0, "score")
        return "served from cache" in p.stdout, json.loads(
            (Path(e["path"]) / "manifest.json").read_text()
        )["metrics"]["reward_mean"]

    cached, r02 = score_once()
    assert not cached
    assert score_once()[0]  # unchanged module: served from cache
    (mods / "myreward.py").write_text(src.format(partial=0.5))
    cached, r05 = score_once()
    assert not cached and r05 > r02


def test_a_tampered_input_is_never_trained_on_silently(make_cfg, tmp_path):
    """Someone edits units.parquet under a finished run. The offline rerun of the update
    refuses it, naming the file; `eqlen run` rebuilds the pair output (its files no longer
    match its manifest) and then serves the update computed from the genuine units."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    cfg = make_cfg("iterations=1")
    _run(cfg, tmp_path)
    units = Path(runner.RunRecord(tmp_path).entry(0, "pair")["path"]) / "units.parquet"
    t = pq.read_table(units)
    pq.write_table(
        t.set_column(
            t.schema.get_field_index("advantage"),
            "advantage",
            pc.multiply(t.column("advantage"), -1.0),
        ),
        units,
    )
    with pytest.raises(runner.RunError, match="units.*modified after it was written"):
        runner.run_stage(
            "update",
            cfg,
            tmp_path,
            0,
            runner.resolve_inputs("update", cfg, tmp_path, 0),
            log=lambda m: None,
        )
    h = _run(cfg, tmp_path)
    assert h[0]["score"].cached and not h[0]["pair"].cached and h[0]["update"].cached


def test_a_run_that_fails_leaves_the_last_good_record(make_cfg, tmp_path, monkeypatch):
    """A typo is caught before anything is written (preflight); a failure found only once
    stages run (here a reward that raises on the rollouts, after generate ran) puts
    config.yaml and run.json back as the last good run left them."""
    from pipeline.errors import EqLenError

    run = tmp_path / "run"
    _run(make_cfg("iterations=1"), run)
    before = {f: (run / f).read_bytes() for f in ("config.yaml", "run.json")}
    (tmp_path / "bad_reward.py").write_text(
        "def fn(completions, **kw):\n    raise RuntimeError('reward service down')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(EqLenError, match="reward service down"):
        _run(make_cfg("iterations=2", "seed=3", "score.reward_funcs=[bad_reward:fn]"), run)
    assert {f: (run / f).read_bytes() for f in before} == before


def test_prompts_key_covers_the_code_that_makes_them():
    root = Path(runner.__file__).resolve().parents[1]
    files = {p.relative_to(root).as_posix() for p in stage.code_files("pipeline.prompts")}
    assert {"pipeline/prompts.py", "pipeline/demo.py", "schemas/__init__.py"} <= files


def test_restore_undoes_only_this_runs_entries(make_cfg, tmp_path):
    """A concurrent `eqlen stage` recorded between a failed run's start and its failure keeps
    its entry; the failed run's own entries and config go back to what they were."""
    _run(make_cfg("iterations=1"), tmp_path)
    rec = runner.RunRecord(tmp_path)
    snap = rec.snapshot()
    data = rec.load()
    data["config"]["seed"] = 99  # the failed run's start
    data["iterations"][0]["stages"]["update"]["key"] = "written-by-the-failed-run"
    data["iterations"][0]["stages"]["pair"]["key"] = "written-by-a-concurrent-stage"
    rec.save(data)
    rec.restore(snap, [(0, "generate"), (0, "update")])
    after = rec.load()
    assert after["config"] == snap["data"]["config"]
    assert (
        after["iterations"][0]["stages"]["update"]
        == snap["data"]["iterations"][0]["stages"]["update"]
    )
    assert after["iterations"][0]["stages"]["pair"]["key"] == "written-by-a-concurrent-stage"


def test_extending_a_run_offline_from_its_last_policy(make_cfg, tmp_path):
    cfg = make_cfg("iterations=2")
    _run(cfg, tmp_path)
    refs = runner.resolve_inputs("generate", cfg, tmp_path, 2)
    assert refs["policy"].path == str(
        Path(runner.RunRecord(tmp_path).entry(1, "update")["path"]) / "model"
    )
    res = runner.run_stage("generate", cfg, tmp_path, 2, refs, log=lambda m: None)
    assert res.rows > 0
