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


def _uses(root: Path) -> dict[str, list[tuple[str, int, str]]]:
    """Output folder -> [(run dir, iteration, stage)] over the runs registered in root."""
    uses: dict[str, list[tuple[str, int, str]]] = {}
    for run_dir in registered_runs(root):
        try:
            entries = RunRecord(run_dir).entries()
        except Exception:  # a damaged run.json: that run's references are unknown
            continue
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
    uses = _uses(root)
    out = []
    for stage_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for folder in sorted(
            p for p in stage_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
        ):
            m = cache.read_manifest(folder)
            m = m if isinstance(m, dict) else {}
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
        f"{root} is not a cache directory (no such folder); give a run's cache "
        "(RUN_DIR/cache) or the cache_dir a config names"
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
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise cache_error(root)
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
    for d in datasets(root):
        folder = Path(d.path)
        if uses.get(str(folder)):
            in_use += 1
            continue
        if now - folder.stat().st_mtime < min_age_hours * 3600:
            young += 1
            continue
        fd = cache._acquire(cache.lock_file(folder), blocking=False)
        if fd is None:
            locked += 1
            continue
        try:
            if not dry_run:
                shutil.rmtree(folder)
            removed.append(str(folder))
            freed += d.bytes
        finally:
            os.close(fd)
    return Collected(removed, freed, in_use, young, locked)
