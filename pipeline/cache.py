"""Content-addressed stage cache (docs/method.md invariants 5 and 6).

A stage output lives in `CACHE/<stage>/<key>/`, where

    key = sha256(stage, implementation, version, code digest, stage config, input digests)

and each input digest is the `output_digest` of the upstream folder's manifest (a hash of
its files' contents, computed once when it was written) or, for a folder that no stage
wrote (the initial model), a hash of its files. So the same inputs, config and code give
the same key, and the stored folder is served without running; any change gives a new
key, reruns the stage, and changes its output digest, which changes every later key.

Why not Prefect's task cache: it hashes a `Path` argument as text rather than content and
keeps serving an output that was deleted or overwritten (measured, ENVIRONMENT.md).

Writes are atomic: the stage writes into a temporary sibling `.tmp-<key>-<random>`,
`manifest.json` is written last, then one `rename` makes the folder visible; `force`
renames the old folder to `.trash-<key>-<random>` first and removes it after the swap.

Concurrency (several runs sharing one cache, which is what `cache_dir` is for): every
writer of a key takes an exclusive `flock` on `<stage>/.lock-<key>`, looks again for a
finished folder, and holds the lock until it has published its own. A second writer of the
same key therefore waits, finds the first one's output and serves it (unless forced), and
never touches the first one's temporary folder. Because only the lock holder creates
`.tmp-<key>-*` / `.trash-<key>-*`, any such entry found while holding the lock is garbage
from a killed writer and is removed; `sweep` does the same for a whole cache root, skipping
keys whose writer is alive. Lock files are empty, one per key, and are never deleted here
(deleting a lock file that another process is about to lock would let two processes hold
"the" lock); `locked` re-checks the file after locking, so one deleted by hand is harmless.
flock makes this Linux/POSIX only, on a local filesystem or one with working flock (NFSv4
has it; some network filesystems do not). Readers take no lock: `force` on an output that
another run is reading at that moment can make that reader fail, and it must be rerun.

Tamper detection: the manifest records every file's name, size and `mtime_ns`. A folder is
served only if its files have the recorded names and sizes; if any mtime differs, the folder
is re-hashed and served only if the hash still equals `output_digest` (the new mtimes are
then recorded, so a copy that did not keep mtimes costs one re-hash, not one per check).
Checking an unchanged folder thus costs one stat per file, and an edited file is found by
the re-hash. An edit that keeps both size and mtime (`touch -d` back to the old time) is
found only by `verify`, a full re-hash. Manifests of the previous version (files as
[name, size]) are checked by name and size only.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
LOCK, TMP, TRASH = ".lock-", ".tmp-", ".trash-"


def _hash_file(h: hashlib._Hash, path: Path) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def _file_stats(folder: Path) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime_ns) of every file under folder except the manifest, sorted."""
    out = []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            st = p.stat()
            out.append((p.relative_to(folder).as_posix(), st.st_size, st.st_mtime_ns))
    return out


def list_files(folder: Path) -> list[tuple[str, int]]:
    """(relative path, size) of every file under folder except the manifest, sorted."""
    return [(rel, size) for rel, size, _ in _file_stats(folder)]


def folder_digest(folder: str | Path) -> str:
    """sha256 over the relative names and contents of every file in folder."""
    folder = Path(folder)
    h = hashlib.sha256()
    for rel, _ in list_files(folder):
        h.update(rel.encode() + b"\0")
        _hash_file(h, folder / rel)
        h.update(b"\0")
    return h.hexdigest()


def _owner(path: Path) -> Path | None:
    """The cache output folder that holds path (itself or its parent), if any."""
    for cand in (path, path.parent):
        if (cand / MANIFEST).is_file():
            return cand
    return None


def input_digest(path: str | Path) -> str:
    """Digest of a stage input: the writer's recorded output digest, else a content hash.

    An output whose files changed since it was written is hashed as it is now, so an edited
    input gives new keys downstream instead of serving results computed from the old one."""
    path = Path(path)
    owner = _owner(path)
    if owner is not None:
        m = lookup(owner)
        if m is not None:
            return m["output_digest"] if owner == path else m["output_digest"] + ":" + path.name
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
    except (json.JSONDecodeError, OSError):
        # OSError: the folder was swapped out by a forced writer between the check and the read.
        return None


# --- locks -------------------------------------------------------------------------------


def lock_file(path: Path) -> Path:
    """The lock file that guards path (a key folder, run.json, ...): `.lock-<name>` beside it."""
    return path.parent / f"{LOCK}{path.name}"


def _acquire(lock: Path, blocking: bool) -> int | None:
    """An fd holding an exclusive flock on lock, or None if busy and not blocking."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            raise
        # If the file was deleted or replaced while we waited, our lock is on an inode no one
        # else will open: start again on the file that is there now.
        try:
            st = os.stat(lock)
        except FileNotFoundError:
            st = None
        own = os.fstat(fd)
        if st is not None and (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino):
            return fd
        os.close(fd)


@contextmanager
def locked(path: Path) -> Iterator[Path]:
    """Hold the exclusive lock that guards path (blocking until it is free).

    The lock is taken on the sibling file `.lock-<name>` (see lock_file), never on path
    itself, so path may be replaced by rename while locked (run.json, a key folder). All
    processes and threads that use locked(path) for the same path exclude each other; the
    lock is released on exit, or by the kernel when the process dies. Not re-entrant: a
    second locked(path) in the same process while the first is held waits forever."""
    fd = _acquire(lock_file(Path(path)), blocking=True)
    assert fd is not None
    try:
        yield lock_file(Path(path))
    finally:
        os.close(fd)  # closing the only fd of this open file releases the flock


# --- leftovers ---------------------------------------------------------------------------


def _leftover_key(name: str) -> str | None:
    """The key of a `.tmp-<key>-<random>` / `.trash-<key>-<random>` name, else None."""
    for prefix in (TMP, TRASH):
        if name.startswith(prefix) and "-" in name[len(prefix) :]:
            return name[len(prefix) :].rsplit("-", 1)[0]
    return None


def _remove(p: Path) -> bool:
    """Remove a leftover folder or file; True if it is gone."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            p.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            return False
    return not os.path.lexists(p)


def _clear_leftovers(folder: Path) -> None:
    """Remove the key's temporary and trash entries; only call while holding its lock."""
    for p in folder.parent.iterdir():
        if _leftover_key(p.name) == folder.name:
            _remove(p)


def sweep(root: Path) -> list[Path]:
    """Remove the `.tmp-*` / `.trash-*` leftovers of killed writers under a cache root.

    A leftover is removed only if its key's lock can be taken without waiting (no live
    writer of that key). Returns the leftovers that remain: in use by a live writer, or
    not removable (permissions)."""
    root = Path(root)
    if not root.is_dir():
        return []
    kept: list[Path] = []
    for stage_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        by_key: dict[str, list[Path]] = {}
        try:
            entries = sorted(stage_dir.iterdir())
        except OSError:
            continue
        for p in entries:
            key = _leftover_key(p.name)
            if key is not None:
                by_key.setdefault(key, []).append(p)
        for key, paths in by_key.items():
            try:
                fd = _acquire(lock_file(stage_dir / key), blocking=False)
            except OSError:  # e.g. a read-only cache: nothing here can be removed either
                fd = None
            if fd is None:
                kept += paths
                continue
            try:
                kept += [p for p in paths if not _remove(p)]
            finally:
                os.close(fd)
    return kept


# --- checks ------------------------------------------------------------------------------


def _refresh_mtimes(folder: Path, manifest: dict, now: list[tuple[str, int, int]]) -> None:
    """Record the current mtimes after a re-hash confirmed the content (e.g. a copy that did
    not keep mtimes), so later checks are stats again. Best effort: skipped if a writer holds
    the key or the cache is read-only."""
    try:
        fd = _acquire(lock_file(folder), blocking=False)
    except OSError:
        return
    if fd is None:
        return
    try:
        if read_manifest(folder) != manifest:
            return
        # The temporary file is a `.tmp-<key>-*` sibling, so a kill here leaves sweepable
        # garbage outside the folder rather than a stray file inside it.
        tmp = folder.parent / f"{TMP}{folder.name}-{uuid.uuid4().hex[:8]}"
        tmp.write_text(json.dumps(dict(manifest, files=now), indent=2, default=str))
        os.replace(tmp, folder / MANIFEST)
    except OSError:
        pass
    finally:
        os.close(fd)


def lookup(folder: Path) -> dict | None:
    """The manifest of a complete, unmodified output folder, or None (missing, damaged or
    edited since it was written). Cheap (one stat per file) unless a file's mtime changed."""
    manifest = read_manifest(folder)
    if manifest is None:
        return None
    recorded = [tuple(x) for x in manifest.get("files", [])]
    try:
        now = _file_stats(folder)
    except OSError:
        return None
    if [r[:2] for r in recorded] != [n[:2] for n in now]:
        return None
    if all(len(r) < 3 for r in recorded):
        return manifest  # written by the previous version: names and sizes only
    if [r[2] for r in recorded] == [n[2] for n in now]:
        return manifest
    try:
        if folder_digest(folder) != manifest.get("output_digest"):
            return None
    except OSError:
        return None
    _refresh_mtimes(folder, manifest, now)
    return manifest


def intact(folder: Path) -> bool:
    """Whether folder is a complete output whose files are unmodified (see lookup)."""
    return lookup(folder) is not None


def input_intact(path: Path) -> bool:
    """Whether a stage input is unmodified: True for a path outside any cache output (the
    initial model), else whether its owning output folder is intact."""
    owner = _owner(Path(path))
    return owner is None or intact(owner)


def verify(folder: Path) -> bool:
    """Full check: names match the manifest and the content re-hashes to `output_digest`.
    Reads every byte; finds edits that kept both size and mtime, which lookup cannot."""
    manifest = read_manifest(folder)
    if manifest is None:
        return False
    try:
        if [tuple(x)[:2] for x in manifest.get("files", [])] != list_files(folder):
            return False
        return folder_digest(folder) == manifest.get("output_digest")
    except OSError:
        return False


# --- writes ------------------------------------------------------------------------------


def _produce_and_publish(
    folder: Path, produce: Callable[[Path], dict[str, Any]], manifest: dict[str, Any]
) -> dict:
    """Run produce into a temporary sibling and publish it; caller holds the key's lock."""
    _clear_leftovers(folder)
    tmp = folder.parent / f"{TMP}{folder.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        t0 = time.perf_counter()
        result = produce(tmp)
        manifest = dict(
            manifest,
            rows=int(result.get("rows", 0)),
            metrics=result.get("metrics", {}),
            seconds=round(time.perf_counter() - t0, 3),
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            files=_file_stats(tmp),
            output_digest=folder_digest(tmp),
        )
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        if os.path.lexists(folder):
            # force, or a damaged/edited folder: swap it out, then remove it.
            trash = folder.parent / f"{TRASH}{folder.name}-{uuid.uuid4().hex[:8]}"
            os.rename(folder, trash)
            os.rename(tmp, folder)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # JSON round trip so a fresh manifest and one read from disk compare equal.
    return json.loads(json.dumps(manifest, default=str))


def get_or_write(
    folder: Path,
    produce: Callable[[Path], dict[str, Any]],
    manifest: dict[str, Any],
    *,
    force: bool = False,
) -> tuple[dict, bool]:
    """Serve folder if it is intact, else run `produce(tmp_dir) -> {"rows", "metrics"}` and
    publish it atomically. Returns (manifest, served_from_cache).

    Safe for concurrent callers of the same key: they are serialised by the key's lock and
    the later ones serve the first one's output; with force each one produces and replaces
    the output in turn."""
    folder = Path(folder)
    if not force:
        found = lookup(folder)  # the common hit needs no lock
        if found is not None:
            return found, True
    folder.parent.mkdir(parents=True, exist_ok=True)
    with locked(folder):
        if not force:
            found = lookup(folder)  # another process may have published it while we waited
            if found is not None:
                return found, True
        return _produce_and_publish(folder, produce, manifest), False


def write(
    folder: Path,
    produce: Callable[[Path], dict[str, Any]],
    manifest: dict[str, Any],
    *,
    force: bool = False,
) -> dict:
    """Run `produce(tmp_dir) -> {"rows": int, "metrics": {...}}` and publish atomically.

    Callers call this after a lookup missed (or to replace an output), so it produces even
    if folder is intact on entry. Without force it returns, instead of producing, an output
    that another process published while this call waited for the key's lock."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    before = lookup(folder)
    with locked(folder):
        if not force:
            found = lookup(folder)
            if found is not None and found != before:
                return found
        return _produce_and_publish(folder, produce, manifest)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
