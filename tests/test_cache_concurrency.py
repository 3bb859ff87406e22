"""The cache under concurrent writers, killed writers and edited outputs.

Real processes on a real filesystem: writers are `python -c` subprocesses that call
pipeline.cache, are started together behind a file barrier, and are SIGKILLed for real.
The end-to-end tests run two `eqlen` commands at once on one cache.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from eqlen_testing.cli import SMALL, eqlen_proc
from pipeline import cache

ROOT = Path(__file__).resolve().parents[1]

# A writer process: waits for the barrier file, then get_or_write(folder) with a produce that
# notes its pid in LOG, touches INSIDE (so the test knows it is producing), sleeps, and writes
# one file. Prints {"manifest", "cached"} as JSON.
WRITER = r"""
import json, os, sys, time
from pathlib import Path
from pipeline import cache
folder, log, inside, go = map(Path, sys.argv[1:5])
sleep, force = float(sys.argv[5]), sys.argv[6] == "force"
while not go.exists():
    time.sleep(0.01)
def produce(tmp):
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    inside.touch()
    time.sleep(sleep)
    (tmp / "data.txt").write_text("payload " * 1000)
    (tmp / "sub").mkdir()
    (tmp / "sub" / "more.txt").write_text("x" * 4096)
    return {"rows": 7, "metrics": {"pid": os.getpid()}}
manifest, cached = cache.get_or_write(folder, produce, {"stage": "t", "key": folder.name},
                                      force=force)
print(json.dumps({"manifest": manifest, "cached": cached}))
"""


def start_writer(
    tmp_path: Path, folder: Path, *, sleep: float = 1.0, force: bool = False, name: str = "w"
) -> tuple[subprocess.Popen, Path]:
    inside = tmp_path / f"inside-{name}"
    p = subprocess.Popen(
        [
            sys.executable,
            "-c",
            WRITER,
            str(folder),
            str(tmp_path / "log"),
            str(inside),
            str(tmp_path / "go"),
            str(sleep),
            "force" if force else "plain",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return p, inside


def finish(p: subprocess.Popen) -> dict:
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def leftovers(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob(".*") if p.name.startswith((cache.TMP, cache.TRASH)))


def produces(tmp_path: Path) -> int:
    log = tmp_path / "log"
    return len(log.read_text().split()) if log.exists() else 0


def test_same_key_at_once_produces_once(tmp_path):
    folder = tmp_path / "cache" / "t" / "k0000000000000000000000a"
    procs = [start_writer(tmp_path, folder, name=str(i))[0] for i in range(2)]
    (tmp_path / "go").touch()
    res = [finish(p) for p in procs]
    assert produces(tmp_path) == 1
    assert sorted(r["cached"] for r in res) == [False, True]
    assert res[0]["manifest"] == res[1]["manifest"] == cache.lookup(folder)
    assert cache.verify(folder)
    assert leftovers(tmp_path / "cache") == []


def test_same_key_forced_at_once_both_finish(tmp_path):
    folder = tmp_path / "cache" / "t" / "k0000000000000000000000b"
    procs = [start_writer(tmp_path, folder, force=True, name=str(i))[0] for i in range(2)]
    (tmp_path / "go").touch()
    res = [finish(p) for p in procs]
    assert produces(tmp_path) == 2  # force: each writer produces, one after the other
    assert not any(r["cached"] for r in res)
    final = cache.lookup(folder)
    assert final is not None and final in [r["manifest"] for r in res]
    assert cache.verify(folder)
    assert leftovers(tmp_path / "cache") == []


def test_killed_writer_leftover_is_swept(tmp_path):
    root = tmp_path / "cache"
    folder = root / "t" / "k0000000000000000000000c"
    (tmp_path / "go").touch()
    p, inside = start_writer(tmp_path, folder, sleep=120)
    wait_for(inside, p)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    left = leftovers(root)
    assert len(left) == 1 and left[0].name.startswith(f".tmp-{folder.name}-")
    assert not folder.exists()
    assert cache.sweep(root) == []
    assert leftovers(root) == [] and not folder.exists()
    assert cache.sweep(root) == [] and cache.sweep(tmp_path / "nowhere") == []


def test_sweep_spares_a_live_writer_and_reports_it(tmp_path):
    root = tmp_path / "cache"
    live = root / "t" / "k0000000000000000000000d"
    dead = root / "t" / "k0000000000000000000000e"
    # A killed writer of another key (and a forced swap killed before removing its trash).
    (dead.parent / f".tmp-{dead.name}-0badc0de").mkdir(parents=True)
    (dead.parent / f".tmp-{dead.name}-0badc0de" / "half.parquet").write_bytes(b"\0" * 100)
    (dead.parent / f".trash-{dead.name}-0ddba11a").mkdir()
    (tmp_path / "go").touch()
    p, inside = start_writer(tmp_path, live, sleep=120)
    try:
        wait_for(inside, p)
        [kept] = cache.sweep(root)
        assert kept.parent == live.parent and kept.name.startswith(f".tmp-{live.name}-")
        assert kept.is_dir()  # the live writer's folder is untouched
        assert leftovers(root) == [kept]
    finally:
        p.kill()
        p.wait(timeout=30)
    assert cache.sweep(root) == [] and leftovers(root) == []


def test_next_writer_of_a_key_clears_its_leftovers(tmp_path):
    folder = tmp_path / "cache" / "t" / "k0000000000000000000000f"
    (folder.parent / f".tmp-{folder.name}-deadbeef").mkdir(parents=True)
    (folder.parent / f".trash-{folder.name}-deadbeef").mkdir()
    other = folder.parent / f".tmp-{folder.name}0-deadbeef"  # another key: not ours to clear
    other.mkdir()
    cache.get_or_write(folder, lambda tmp: (tmp / "a").write_text("a") and {}, {})
    assert leftovers(tmp_path / "cache") == [other]


def write_sample(folder: Path, size: int = 4096) -> dict:
    def produce(tmp: Path) -> dict:
        (tmp / "units.parquet").write_bytes(b"a" * size)
        (tmp / "model").mkdir()
        (tmp / "model" / "weights.bin").write_bytes(os.urandom(size))
        return {"rows": 1}

    manifest, cached = cache.get_or_write(folder, produce, {"stage": "pair"})
    assert not cached
    return manifest


def bump_mtime(p: Path, seconds: int = 5) -> None:
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


def test_edit_with_same_size_is_detected(tmp_path):
    folder = tmp_path / "pair" / "k1"
    manifest = write_sample(folder)
    assert cache.intact(folder) and cache.verify(folder)
    f = folder / "units.parquet"
    f.write_bytes(b"b" * f.stat().st_size)
    bump_mtime(f)  # a coarse-clock filesystem could otherwise keep the old mtime
    assert not cache.intact(folder) and cache.lookup(folder) is None and not cache.verify(folder)
    assert cache.input_intact(folder / "model") is False
    # An edited input is hashed as it is now, so downstream keys change.
    assert cache.input_digest(folder) != manifest["output_digest"]
    # The next non-forced write rebuilds it.
    _, cached = cache.get_or_write(
        folder, lambda tmp: (tmp / "units.parquet").write_bytes(b"c") and {}, {}
    )
    assert not cached and (folder / "units.parquet").read_bytes() == b"c"
    assert cache.intact(folder) and leftovers(tmp_path) == []


def test_edit_with_other_size_and_added_file_are_detected(tmp_path):
    folder = tmp_path / "pair" / "k2"
    write_sample(folder)
    (folder / "units.parquet").write_bytes(b"a")
    assert not cache.intact(folder)
    folder2 = tmp_path / "pair" / "k3"
    write_sample(folder2)
    (folder2 / "extra.parquet").write_bytes(b"a")
    assert not cache.intact(folder2)


def test_touch_without_edit_stays_valid_and_is_remembered(tmp_path):
    folder = tmp_path / "pair" / "k4"
    write_sample(folder)
    bump_mtime(folder / "model" / "weights.bin")  # e.g. a copy that did not keep mtimes
    assert cache.intact(folder)  # re-hashed: content unchanged
    recorded = {f[0]: f[2] for f in cache.read_manifest(folder)["files"]}
    assert recorded["model/weights.bin"] == (folder / "model" / "weights.bin").stat().st_mtime_ns
    assert leftovers(tmp_path) == []


def test_edit_keeping_size_and_mtime_needs_verify(tmp_path):
    """The documented limit: only the full re-hash finds it."""
    folder = tmp_path / "pair" / "k5"
    write_sample(folder)
    f = folder / "units.parquet"
    st = f.stat()
    f.write_bytes(b"z" * st.st_size)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cache.intact(folder)
    assert not cache.verify(folder)


def test_unchanged_check_is_stat_only(tmp_path):
    folder = tmp_path / "update" / "k6"
    write_sample(folder, size=32 << 20)
    t0 = time.perf_counter()
    assert cache.verify(folder)
    full = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(5):
        assert cache.intact(folder)
    quick = (time.perf_counter() - t0) / 5
    assert quick < full / 10, (quick, full)


def test_manifest_of_previous_version_is_still_served(tmp_path):
    folder = tmp_path / "pair" / "k7"
    write_sample(folder)
    m = cache.read_manifest(folder)
    old = dict(m, files=[[name, size] for name, size, _ in m["files"]])
    (folder / cache.MANIFEST).write_text(json.dumps(old))
    assert cache.lookup(folder) == old and cache.verify(folder)
    (folder / "units.parquet").write_bytes(b"a")
    assert cache.lookup(folder) is None


def test_locked_excludes_threads_and_survives_a_deleted_lock_file(tmp_path):
    target = tmp_path / "run" / "run.json"
    events = []
    with cache.locked(target) as lock:
        assert lock == target.parent / ".lock-run.json" and lock.is_file()

        def second() -> None:
            with cache.locked(target):
                events.append("second")

        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.3)
        events.append("first done")
        lock.unlink()  # deleted by hand while held: the waiter must not be fooled
        with cache.locked(target):  # a newcomer gets the new file while the waiter waits
            events.append("newcomer")
    t.join(timeout=10)
    assert events == ["first done", "newcomer", "second"]


def test_write_keeps_its_callers_working(tmp_path):
    """`write` (prompts.materialize, the runner before get_or_write) still produces on an
    intact folder (what --force relied on), and returns a concurrent writer's output."""
    folder = tmp_path / "t" / "k8"
    m1 = cache.write(folder, lambda tmp: (tmp / "a").write_text("1") and {"rows": 1}, {"x": 1})
    assert cache.lookup(folder) == m1 and m1["rows"] == 1
    m2 = cache.write(folder, lambda tmp: (tmp / "a").write_text("2") and {"rows": 2}, {"x": 1})
    assert m2["rows"] == 2 and (folder / "a").read_text() == "2"
    m3 = cache.write(folder, lambda tmp: (tmp / "a").write_text("3") and {}, {}, force=True)
    assert (folder / "a").read_text() == "3" and cache.lookup(folder) == m3
    assert leftovers(tmp_path) == []


# --- end to end: two `eqlen` commands at once on one cache -------------------------------


def all_ok(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, f"{p.args} failed:\n{out}\n{err}"


def output_of(run_dir: Path, iteration: int, stage: str) -> Path:
    """A stage's output folder as run.json records it (relative to the run directory when
    it lies inside it)."""
    e = json.loads((run_dir / "run.json").read_text())["iterations"][iteration]["stages"][stage]
    return run_dir / e["path"]  # an absolute recorded path replaces run_dir


def keys_of(run_dir: Path) -> list[dict[str, str]]:
    data = json.loads((run_dir / "run.json").read_text())
    return [{s: e["key"] for s, e in it["stages"].items()} for it in data["iterations"]]


@pytest.mark.flow
@pytest.mark.slow
def test_two_runs_share_one_cache_at_once(prefect_server, tmp_path):
    shared = tmp_path / "shared-cache"
    runs = [tmp_path / "a", tmp_path / "b"]
    all_ok(
        [
            eqlen_proc(
                "run", "--run-dir", d, "--iterations", 2, *SMALL, "--set", f"cache_dir={shared}"
            )
            for d in runs
        ]
    )
    ka, kb = keys_of(runs[0]), keys_of(runs[1])
    assert ka == kb and len(ka) == 2 and all(len(it) == 4 for it in ka)
    # Each key was computed once: for every stage, one of the two runs served it from cache.
    recs = [json.loads((d / "run.json").read_text())["iterations"] for d in runs]
    for ita, itb in zip(*recs):
        for stage in ita["stages"]:
            assert ita["stages"][stage]["cached"] or itb["stages"][stage]["cached"], stage
    for d in runs:
        for i, it in enumerate(ka):
            for stage in it:
                folder = output_of(d, i, stage)
                assert folder.parent.parent == shared.resolve() and cache.verify(folder)
    assert leftovers(shared) == [] and cache.sweep(shared) == []

    # An edited cached output (same size) is not served: the next run rebuilds it.
    units = output_of(runs[0], 0, "pair") / "units.parquet"
    original = units.read_bytes()
    units.write_bytes(original[:-9] + b"\0" * 5 + original[-4:])  # keep Parquet's footer magic
    all_ok(
        [
            eqlen_proc(
                "run",
                "--run-dir",
                runs[0],
                "--iterations",
                1,
                *SMALL,
                "--set",
                f"cache_dir={shared}",
            )
        ]
    )
    stages = json.loads((runs[0] / "run.json").read_text())["iterations"][0]["stages"]
    assert stages["score"]["cached"] and not stages["pair"]["cached"]
    assert units.read_bytes() == original and cache.verify(units.parent)


@pytest.mark.flow
@pytest.mark.slow
def test_two_forced_stage_reruns_at_once(prefect_server, tmp_path):
    d = tmp_path / "run"
    all_ok([eqlen_proc("run", "--run-dir", d, "--iterations", 1, *SMALL)])
    before = keys_of(d)
    all_ok(
        [eqlen_proc("stage", "pair", "--force", "--run-dir", d, "--iteration", 0) for _ in range(2)]
    )
    assert keys_of(d) == before
    assert cache.verify(output_of(d, 0, "pair"))
    assert leftovers(d / "cache") == [] and cache.sweep(d / "cache") == []
