"""eqlen's own Prefect server (flows/server.py), with real processes.

No process of an `eqlen run` may outlive it, even when the run is SIGKILLed (as the OOM
killer does), except the documented kept server, which `eqlen server status` reports and
`eqlen server stop` removes. Every test uses its own PREFECT_HOME and stops what it starts.
Processes are found through /proc: each test tags its `eqlen` commands with a unique
environment variable, which every process they start inherits.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from eqlen_testing import cli
from eqlen_testing.cli import SMALL

pytestmark = [
    pytest.mark.flow,
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc"),
]

EXE = str(cli.EXE)


def tagged(tag: str) -> dict[int, list[str]]:
    """pid -> cmdline of every live process whose environment carries `tag`."""
    out = {}
    for p in Path("/proc").glob("[0-9]*"):
        try:
            if f"EQLEN_TEST_TAG={tag}".encode() not in (p / "environ").read_bytes().split(b"\0"):
                continue
            if (p / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # a zombie is dead; its parent (the test) reaps it
            out[int(p.name)] = (p / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
    return out


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def servers(procs: dict[int, list[str]]) -> list[int]:
    """Server processes; not their children between fork and exec, which still show the
    server's command line (the server runs `file -b python` at start-up, through
    platform.architecture)."""
    found = {pid for pid, cmd in procs.items() if "flows.server" in cmd and "serve" in cmd}
    return [pid for pid in found if _ppid(pid) not in found]


def wait_until(cond, timeout: float, what: str):
    deadline = time.time() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def env(tmp_path):
    """Environment for `eqlen`: own PREFECT_HOME, no PREFECT_API_URL, a unique tag; on
    teardown, stop the kept server and kill (by pid) anything tagged that is left."""
    tag = uuid.uuid4().hex
    home = tmp_path / "prefect-home"
    e = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    e.update(
        PREFECT_HOME=str(home),
        EQLEN_THREADS="1",
        EQLEN_TEST_TAG=tag,
        PREFECT_UI_ENABLED="false",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    e.pop("EQLEN_PREFECT_SERVER", None)
    e.pop("EQLEN_SERVER_IDLE_MINUTES", None)
    yield e
    subprocess.run([EXE, "server", "stop"], env=e, capture_output=True, timeout=60, check=False)
    for pid in tagged(tag):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def eqlen(env, *args, check=True, timeout=600):
    return cli.eqlen(*args, full_env=env, check=check, timeout=timeout)


def start_run(env, run_dir: Path, iterations: int, log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen(
            [EXE, "run", "--run-dir", str(run_dir), "--iterations", str(iterations), *SMALL],
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
        )


def sigkill_mid_run(env, tmp_path) -> int:
    """Start a long small run, SIGKILL only the `eqlen` process once a stage has finished;
    returns the server pid that was up during the run."""
    log = tmp_path / "run.log"
    proc = start_run(env, tmp_path / "run", 200, log)
    try:
        wait_until(
            lambda: "it 0" in log.read_text() or proc.poll() is not None, 300, "the first iteration"
        )
        assert proc.poll() is None, f"the run ended before it could be killed:\n{log.read_text()}"
        up = servers(tagged(env["EQLEN_TEST_TAG"]))
        assert len(up) == 1, f"expected one Prefect server during the run, found {up}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        return up[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_per_run_server_dies_with_a_sigkilled_run(env, tmp_path):
    env["EQLEN_PREFECT_SERVER"] = "run"
    server = sigkill_mid_run(env, tmp_path)
    try:
        wait_until(lambda: not tagged(env["EQLEN_TEST_TAG"]), 10, "every process of the run to end")
    except AssertionError:
        raise AssertionError(
            f"left after the kill: {tagged(env['EQLEN_TEST_TAG'])} (server was {server})"
        ) from None
    assert not (Path(env["PREFECT_HOME"]) / "eqlen-server.json").exists()


def test_kept_server_is_the_only_survivor_and_server_stop_removes_it(env, tmp_path):
    server = sigkill_mid_run(env, tmp_path)
    time.sleep(2)
    left = tagged(env["EQLEN_TEST_TAG"])
    assert list(left) == [server], f"only the kept server may survive the run, found {left}"
    state = json.loads((Path(env["PREFECT_HOME"]) / "eqlen-server.json").read_text())
    assert state["pid"] == server and state["url"].startswith("http://127.0.0.1:")

    st = eqlen(env, "server", "status")
    assert f"pid {server}" in st.stdout and "running" in st.stdout and state["url"] in st.stdout
    js = json.loads(eqlen(env, "server", "status", "--json").stdout)
    assert js["running"] and js["healthy"] and js["pid"] == server

    out = eqlen(env, "server", "stop").stdout
    assert f"pid {server}" in out
    wait_until(lambda: not tagged(env["EQLEN_TEST_TAG"]), 10, "the server to exit")
    assert not (Path(env["PREFECT_HOME"]) / "eqlen-server.json").exists()
    st = eqlen(env, "server", "status", check=False)
    assert st.returncode == 1 and "no eqlen Prefect server running" in st.stdout


def test_run_killed_while_the_server_starts_leaves_a_stoppable_server(env, tmp_path):
    log = tmp_path / "run.log"
    proc = start_run(env, tmp_path / "run", 2, log)
    try:
        # Killed as soon as the server process is recorded, long before it answers.
        state = Path(env["PREFECT_HOME"]) / "eqlen-server.json"
        wait_until(lambda: state.exists() or proc.poll() is not None, 120, "the server process")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    (server,) = servers(tagged(env["EQLEN_TEST_TAG"]))
    # It comes up on its own and is the recorded one; the next run reuses it.
    wait_until(
        lambda: eqlen(env, "server", "status", check=False).returncode == 0,
        90,
        "the orphaned start to answer",
    )
    out = eqlen(env, "run", "--run-dir", tmp_path / "run2", "--iterations", 1, *SMALL).stdout
    assert f"reused eqlen's kept server, pid {server}" in out
    assert "no eqlen Prefect server" not in eqlen(env, "server", "stop").stdout
    wait_until(lambda: not tagged(env["EQLEN_TEST_TAG"]), 10, "the server to exit")


def test_two_runs_at_once_share_one_server(env, tmp_path):
    tag = env["EQLEN_TEST_TAG"]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [start_run(env, tmp_path / f"run{i}", 2, log) for i, log in enumerate(logs)]
    seen: set[int] = set()
    try:
        while any(p.poll() is None for p in procs):
            seen.update(servers(tagged(tag)))
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    outs = [log.read_text() for log in logs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
        assert "it 1" in out
    assert len(seen) == 1, f"two runs started {len(seen)} servers: {seen}"
    (pid,) = seen
    state = json.loads((Path(env["PREFECT_HOME"]) / "eqlen-server.json").read_text())
    assert state["pid"] == pid
    assert all(state["url"] in out for out in outs)
    assert sum("started eqlen's kept server" in out for out in outs) == 1


def test_server_start_status_stop_and_restart_after_death(env):
    first = eqlen(env, "server", "start").stdout
    assert "eqlen server started" in first
    pid = json.loads(eqlen(env, "server", "status", "--json").stdout)["pid"]
    assert "already running" in eqlen(env, "server", "start").stdout
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: pid not in tagged(env["EQLEN_TEST_TAG"]), 10, "the kill")
    st = eqlen(env, "server", "status", check=False)
    assert st.returncode == 1 and "no eqlen Prefect server running" in st.stdout
    assert "eqlen server started" in eqlen(env, "server", "start").stdout  # a dead one is replaced
    new = json.loads(eqlen(env, "server", "status", "--json").stdout)["pid"]
    assert new != pid
    eqlen(env, "server", "stop")
    wait_until(lambda: not tagged(env["EQLEN_TEST_TAG"]), 10, "the server to exit")


def test_idle_server_stops_itself(env):
    eqlen(env, "server", "start", "--idle-minutes", "0.05")  # 3 s
    pid = json.loads(eqlen(env, "server", "status", "--json").stdout)["pid"]
    wait_until(lambda: pid not in tagged(env["EQLEN_TEST_TAG"]), 30, "the idle stop")
    assert not (Path(env["PREFECT_HOME"]) / "eqlen-server.json").exists()


def test_server_stop_when_none_runs(env):
    p = eqlen(env, "server", "stop")
    assert p.returncode == 0 and "no eqlen Prefect server running" in p.stdout
    assert "nothing to stop" in p.stdout


def test_a_users_prefect_api_url_wins(env, prefect_server, tmp_path):
    env = dict(env, PREFECT_API_URL=prefect_server)
    out = eqlen(env, "run", "--run-dir", tmp_path / "run", "--iterations", 1, *SMALL).stdout
    assert f"Prefect API: {prefect_server} (PREFECT_API_URL)" in out
    assert not servers(tagged(env["EQLEN_TEST_TAG"]))
    assert not (Path(env["PREFECT_HOME"]) / "eqlen-server.json").exists()
