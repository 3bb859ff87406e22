"""The stage datasets of a cache as a catalog: list them, and remove what no run needs.

A cache root (`RUN_DIR/cache`, or a shared `cache_dir`) holds one folder per stage output,
`<stage>/<key>/`, with its manifest; every run directory that records an output from it
leaves a note under `.runs/` (flows/runner.py), so the catalog can say which runs use
which dataset without the user listing them.

    eqlen datasets [CACHE_DIR] [--json]     every output: stage, implementation, key, rows,
                                            created, size, the runs that use it
    eqlen gc [CACHE_DIR] [--keep-last N] [--min-age-hours H] [--dry-run]
                                            remove outputs no run references; with
                                            --keep-last, also each run's policy checkpoints
                                            older than its last N iterations

`gc` never removes an output that a recorded run's iteration still points to (apart from
the old policies `--keep-last` asks for), nor one written in the last `--min-age-hours`
(default 1: a running run may have written an output it has not recorded yet), nor one
whose key another process holds locked (a writer at work).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from flows.runner import STAGE_NAMES, RunRecord, registered_runs
from pipeline import cache


@dataclass
class Dataset:
    stage: str
    implementation: str
    key: str
    path: str
    rows: int | None
    created: str
    bytes: int
    iteration: int | None
    runs: list[str] = field(default_factory=list)
    present: bool = True


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


STAGE_FOLDERS = ("prompts", *STAGE_NAMES)  # the only folders of a cache root holding outputs


def _runs_of(root: Path) -> list[Path]:
    """The runs known to use cache root `root`: those registered in it, and the run whose
    own cache it is (RUN/cache), wherever that run was copied or moved to."""
    runs = registered_runs(root)
    if root.name == "cache" and (root.parent / "run.json").is_file() and root.parent not in runs:
        runs.append(root.parent)
    return runs


def _uses(root: Path) -> dict[str, list[tuple[str, int, str]]]:
    """Output folder -> [(run dir, iteration, stage)] over the runs known to use root. A run
    whose record cannot be read is an error: its references are unknown, so nothing could
    be removed safely."""
    uses: dict[str, list[tuple[str, int, str]]] = {}
    for run_dir in _runs_of(root):
        entries = RunRecord(run_dir).entries()  # RunError naming the damaged run.json
        for i, stages in enumerate(entries):
            for name, e in stages.items():
                uses.setdefault(str(Path(e["path"]).resolve()), []).append((str(run_dir), i, name))
                for ref in e.get("inputs", {}).values():
                    # Inputs recorded by path: the prompts dataset, a policy checkpoint.
                    p = Path(ref["path"]).resolve()
                    owner = p if (p / cache.MANIFEST).is_file() else p.parent
                    uses.setdefault(str(owner), []).append((str(run_dir), i, name + "-input"))
    return uses


def datasets(root: str | Path) -> list[Dataset]:
    """Every output folder under cache root `root`, newest first."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise cache_error(root)
    stage_dirs = [root / s for s in STAGE_FOLDERS if (root / s).is_dir()]
    if not stage_dirs:
        raise cache_error(root)
    uses = _uses(root)
    out = []
    for stage_dir in stage_dirs:
        for folder in sorted(
            p for p in stage_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
        ):
            m = cache.read_manifest(folder)
            if not isinstance(m, dict) or m.get("key") != folder.name:
                continue  # not an output the cache wrote: never listed, never removed
            out.append(
                Dataset(
                    stage=m.get("stage", stage_dir.name),
                    implementation=m.get("implementation", ""),
                    key=folder.name,
                    path=str(folder),
                    rows=m.get("rows"),
                    created=m.get("created", ""),
                    bytes=_size(folder),
                    iteration=m.get("iteration"),
                    runs=sorted({r for r, _, _ in uses.get(str(folder), [])}),
                    present=cache.lookup(folder) is not None,
                )
            )
    order = {n: i for i, n in enumerate(("prompts", *STAGE_NAMES))}
    return sorted(out, key=lambda d: (order.get(d.stage, 99), d.created), reverse=False)


def cache_error(root: Path):
    from flows.runner import RunError

    return RunError(
        f"{root} is not a cache directory (no prompts/generate/score/pair/update folders); "
        "give a run's cache (RUN_DIR/cache) or the cache_dir a config names"
    )


@dataclass
class Collected:
    removed: list[str]
    freed_bytes: int
    kept_in_use: int
    kept_young: int
    kept_locked: int


def gc(
    root: str | Path,
    *,
    keep_last: int | None = None,
    min_age_hours: float = 1.0,
    dry_run: bool = False,
) -> Collected:
    """Remove the outputs of cache root `root` that no registered run needs (see module)."""
    from flows.runner import RunError

    if keep_last is not None and keep_last < 1:
        raise RunError(f"--keep-last {keep_last}: keep at least the last policy (N >= 1)")
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise cache_error(root)
    found = datasets(root)
    if not _runs_of(root):
        raise RunError(
            f"{root}: no run is known to use this cache (no CACHE/.runs notes, no RUN/run.json "
            "beside it), so gc cannot tell what is needed and removes nothing. Record a run "
            "into it first (any `eqlen run` or `eqlen stage` on a run using it)."
        )
    uses = _uses(root)
    if keep_last is not None:
        # A run still needs its last `keep_last` policies (to resume, extend or branch);
        # older update outputs are checkpoints it can do without.
        last: dict[str, int] = {}
        for refs in uses.values():
            for run, i, _ in refs:
                last[run] = max(last.get(run, -1), i)
        for folder, refs in uses.items():
            if Path(folder).parent.name != "update":
                continue
            made = [(run, i) for run, i, st in refs if st == "update"]
            if made and all(i <= last[run] - keep_last for run, i in made):
                uses[folder] = []
    now, removed, freed = time.time(), [], 0
    in_use = young = locked = 0
    for d in found:
        folder = Path(d.path)
        if uses.get(str(folder)):
            in_use += 1
            continue
        try:
            age = now - folder.stat().st_mtime
        except FileNotFoundError:  # removed meanwhile (another gc, a forced writer's swap)
            continue
        if age < min_age_hours * 3600:
            young += 1
            continue
        fd = cache._acquire(cache.lock_file(folder), blocking=False)
        if fd is None:
            locked += 1
            continue
        try:
            if not dry_run:
                try:
                    shutil.rmtree(folder)
                except OSError as e:
                    raise RunError(
                        f"gc: cannot remove {folder} ({e}); fix its permissions, or remove it "
                        "by hand"
                    ) from None
            removed.append(str(folder))
            freed += d.bytes
        finally:
            os.close(fd)
    return Collected(removed, freed, in_use, young, locked)
