"""Smoke tests of the `eqlen` console script, as a user runs it (subprocesses, real Prefect)."""

import json
from pathlib import Path

import pytest

from eqlen_testing.cli import SMALL, eqlen

pytestmark = pytest.mark.flow


def test_run_stage_show(prefect_server, tmp_path):
    d = tmp_path / "run"
    out = eqlen("run", "--run-dir", d, "--iterations", 2, *SMALL).stdout
    assert "it 0" in out and "it 1" in out and "cached 0/4" in out
    again = eqlen("run", "--run-dir", d, "--iterations", 2, *SMALL).stdout
    assert again.count("cached 4/4") == 2

    shown = json.loads(eqlen("show", d, "--json").stdout)
    assert shown["run_dir"] == str(d.resolve())
    assert [it["index"] for it in shown["iterations"]] == [0, 1]
    for it in shown["iterations"]:
        assert set(it["stages"]) == {"generate", "score", "pair", "update"}
        for s in it["stages"].values():
            assert {"key", "path", "cached", "rows", "metrics"} <= set(s)
            assert Path(s["path"], "manifest.json").is_file()
    pair_metrics = shown["iterations"][1]["stages"]["pair"]["metrics"]
    for k in (
        "units",
        "tokens_in_units",
        "tokens_generated",
        "effective_token_ratio",
        "zero_signal_units",
    ):
        assert k in pair_metrics

    # Offline rerun of one stage: only pair runs, others keep their records.
    before = {k: v["key"] for k, v in shown["iterations"][1]["stages"].items()}
    rerun = eqlen("stage", "pair", "--run-dir", d, "--iteration", 1, "--force").stdout
    assert "pair (iteration 1) ran" in rerun
    after = json.loads(eqlen("show", d, "--json").stdout)["iterations"][1]["stages"]
    assert {k: v["key"] for k, v in after.items()} == before
    assert after["pair"]["cached"] is False and after["generate"]["cached"] is True
    cached = eqlen("stage", "pair", "--run-dir", d, "--iteration", 1).stdout
    assert "served from cache" in cached


def test_bad_input_is_a_clear_error(tmp_path):
    p = eqlen("run", "--run-dir", tmp_path, "--set", "pair.strategy=zigzag", check=False)
    assert p.returncode == 2 and "valid values: group" in p.stderr
    p = eqlen("stage", "pair", "--run-dir", tmp_path / "nowhere", check=False)
    assert p.returncode == 2 and "no recorded config" in p.stderr
    p = eqlen("show", tmp_path / "nowhere", check=False)
    assert p.returncode == 2 and "not a run directory" in p.stderr
