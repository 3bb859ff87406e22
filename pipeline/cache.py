"""Content-addressed stage cache (DESIGN.md invariants 5 and 6).

A stage output lives in `CACHE/<stage>/<key>/`, where

    key = sha256(stage, implementation, version, code digest, stage config, input digests)

and each input digest is the `output_digest` of the upstream folder's manifest (a hash of
its files' contents, computed once when it was written) or, for a folder that no stage
wrote (the initial model), a hash of its files. So the same inputs, config and code give
the same key, and the stored folder is served without running; any change gives a new
key, reruns the stage, and changes its output digest, which changes every later key.

Why not Prefect's task cache: it hashes a `Path` argument as text rather than content and
keeps serving an output that was deleted or overwritten (measured, ENVIRONMENT.md).

Writes are atomic: the stage writes into a temporary sibling folder, `manifest.json` is
written last, then one `rename` makes the folder visible. A folder without a manifest, or
whose files no longer match the manifest's names and sizes, is not a hit: it is rebuilt.
A killed run leaves at most a `.tmp-*` folder, which is ignored and cleared later.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


def _hash_file(h: "hashlib._Hash", path: Path) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def list_files(folder: Path) -> list[tuple[str, int]]:
    """(relative path, size) of every file under folder except the manifest, sorted."""
    out = []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            out.append((p.relative_to(folder).as_posix(), p.stat().st_size))
    return out


def folder_digest(folder: str | Path) -> str:
    """sha256 over the relative names and contents of every file in folder."""
    folder = Path(folder)
    h = hashlib.sha256()
    for rel, _ in list_files(folder):
        h.update(rel.encode() + b"\0")
        _hash_file(h, folder / rel)
        h.update(b"\0")
    return h.hexdigest()


def input_digest(path: str | Path) -> str:
    """Digest of a stage input: the writer's recorded output digest, else a content hash."""
    path = Path(path)
    for cand in (path / MANIFEST, path.parent / MANIFEST):
        if cand.is_file():
            m = json.loads(cand.read_text())
            if cand.parent == path:
                return m["output_digest"]
            return m["output_digest"] + ":" + path.name
    return folder_digest(path)


def source_digest(*files: str | Path) -> str:
    h = hashlib.sha256()
    for f in files:
        _hash_file(h, Path(f))
    return h.hexdigest()[:16]


def cache_key(parts: dict[str, Any]) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def read_manifest(folder: Path) -> dict | None:
    m = folder / MANIFEST
    if not m.is_file():
        return None
    try:
        return json.loads(m.read_text())
    except json.JSONDecodeError:
        return None


def lookup(folder: Path) -> dict | None:
    """The manifest of a complete, intact output folder, or None (missing or damaged)."""
    manifest = read_manifest(folder)
    if manifest is None:
        return None
    recorded = [tuple(x) for x in manifest.get("files", [])]
    if recorded != list_files(folder):
        return None
    return manifest


def write(folder: Path, produce: Callable[[Path], dict[str, Any]], manifest: dict[str, Any]) -> dict:
    """Run `produce(tmp_dir) -> {"rows": int, "metrics": {...}}` and publish atomically."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    for stale in folder.parent.glob(f".tmp-{folder.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = folder.parent / f".tmp-{folder.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        t0 = time.perf_counter()
        result = produce(tmp)
        manifest = dict(manifest, rows=int(result.get("rows", 0)),
                        metrics=result.get("metrics", {}),
                        seconds=round(time.perf_counter() - t0, 3),
                        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        files=list_files(tmp), output_digest=folder_digest(tmp))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        if folder.exists():
            # --force or a damaged folder: swap it out, then remove it.
            trash = folder.parent / f".trash-{folder.name}-{uuid.uuid4().hex[:8]}"
            os.rename(folder, trash)
            os.rename(tmp, folder)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
