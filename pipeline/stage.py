"""The stage contract: what a stage declares, and the cache key derived from it.

A stage module (`stages/generate.py`, ...) ends with one `STAGE = Stage(...)` record:

    name, version     bump `version` when the output format changes without a code change
    inputs            labels of the datasets it reads (`rollouts`, `policy`, ...)
    output            label of the dataset it writes (`output_sub`: the sub-folder that
                      label points at, e.g. the update's `model/`)
    reads(cfg)        the dotted config keys whose values can change its output
    ignores           config keys it reads that cannot change its output (device, batch
                      sizes of the engine): allowed, and left out of the key
    uses_iteration    whether it reads the iteration index (seeds, prompt selection); only
                      then is the index in the key, so an identical input at another
                      iteration is the same dataset
    packages(cfg)     installed packages whose version is in the key (torch, transformers)
    implementation    cfg -> the name of the implementation chosen (recorded, in the key)
    key_extra         cfg -> anything else that decides the output but is not config or
                      the stage's own code (e.g. the source files of user reward modules)
    run(inputs, out_dir, cfg, ctx) -> {"rows", "metrics"}

The key is derived from this one declaration (`key_parts`): the values of `reads(cfg)`,
the digest of the code the stage runs (its module and every project module it imports,
found by reading their `import` statements, so a helper edited in `pipeline/models.py` or
`schemas/` reruns what uses it), the versions of the packages that compute its numbers,
`key_extra` and the inputs' content digests.

The declaration is enforced, not trusted: the runner hands the stage a read-only view of
the config (`ConfigView`) that raises when the stage reads a key it did not declare. So a
stage cannot depend on config that is not in its key, and every test that runs a stage
checks its declaration.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

# Project packages whose modules count as "the code a stage runs".
PROJECT_PACKAGES = ("pipeline", "stages", "schemas")
# Modules left out of the code digest, with the reason: their effect is already in the key.
CODE_EXEMPT = {
    "pipeline.config": "the config's values are in the key (reads), not its help texts",
    "pipeline.stage": "this module: the declaration mechanism, not a computation",
    "pipeline.errors": "error classes only",
}


class UndeclaredRead(AttributeError):
    """A stage read a config key it does not declare: a bug in the stage's declaration."""


@dataclass(frozen=True)
class Stage:
    name: str
    version: int
    inputs: tuple[str, ...]
    output: str
    reads: Callable[[Any], Iterable[str]]
    implementation: Callable[[Any], str]
    run: Callable[..., dict]
    module: str
    ignores: tuple[str, ...] = ()
    packages: Callable[[Any], Iterable[str]] = lambda cfg: ()
    key_extra: Callable[[Any], dict] = lambda cfg: {}
    uses_iteration: bool = False  # reads ctx.iteration (seeds, prompt selection)
    output_sub: str = ""  # sub-folder the output label points at (update: model/)

    def key_reads(self, cfg) -> dict[str, Any]:
        """{dotted key: value} of the config that decides the output."""
        keys = sorted(set(expand(self.reads(cfg), cfg)))
        return {k: get(cfg, k) for k in keys}

    def allowed(self, cfg) -> frozenset[str]:
        return frozenset(expand(self.reads(cfg), cfg)) | frozenset(expand(self.ignores, cfg))

    def key_parts(self, cfg, inputs: dict[str, str], iteration: int) -> dict:
        """Everything the key hashes; `inputs` maps labels to content digests."""
        return {
            "stage": self.name,
            "implementation": self.implementation(cfg),
            "version": self.version,
            "code": code_digest(self.module),
            "packages": {p: package_version(p) for p in sorted(self.packages(cfg))},
            "config": self.key_reads(cfg),
            "extra": self.key_extra(cfg),
            "iteration": iteration if self.uses_iteration else None,
            "inputs": dict(sorted(inputs.items())),
        }


# ------------------------------------------------------------------------ config access


def get(cfg, dotted: str) -> Any:
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def expand(patterns: Iterable[str], cfg) -> list[str]:
    """`section.*` -> every key of the section; other patterns as they are."""
    out = []
    for p in patterns:
        if p.endswith(".*"):
            section = get(cfg, p[:-2])
            out += [f"{p[:-2]}.{f.name}" for f in dataclasses.fields(section)]
        else:
            out.append(p)
    return out


class ConfigView:
    """Read-only view of a Config that allows only the declared keys.

    Sections are views too, so `cfg.generate.group_size` checks `generate.group_size`."""

    __slots__ = ("_obj", "_allowed", "_prefix", "_stage")

    def __init__(self, obj, allowed: frozenset[str], stage: str, prefix: str = ""):
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_allowed", allowed)
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "_stage", stage)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._obj, name)
        key = self._prefix + name
        if dataclasses.is_dataclass(value):
            return ConfigView(value, self._allowed, self._stage, key + ".")
        if key not in self._allowed:
            raise UndeclaredRead(
                f"stage {self._stage!r} read config key '{key}' that its STAGE declaration "
                "does not list (reads or ignores): add it there, so that the cache key "
                "covers it"
            )
        return value

    def __setattr__(self, name, value):
        raise AttributeError(f"the config is read-only inside stage {self._stage!r}")

    def __reduce__(self):
        # Pickled whole (to a Ray worker), so the worker enforces the same declaration.
        return (ConfigView, (self._obj, self._allowed, self._stage, self._prefix))

    def __repr__(self) -> str:
        return f"ConfigView({self._stage}: {self._prefix or 'config'})"


# ------------------------------------------------------------------------ code digest


# The folder holding the project packages (the repository, or site-packages).
_ROOT = Path(__file__).resolve().parents[1]


def _module_file(name: str) -> Path | None:
    """The source file of project module `name`, found on disk without importing anything
    (find_spec of `a.b.NAME` would import `a.b` to look for a submodule NAME, running a
    module, and its registries, that nobody asked for)."""
    base = _ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path, module: str) -> set[str]:
    """Project modules named by the `import` statements of one file, anywhere in it (lazy
    imports inside functions included)."""
    st = path.stat()
    return _imports_of(str(path), module, st.st_mtime_ns, st.st_size)


@functools.cache
def _imports_of(path_s: str, module: str, mtime_ns: int, size: int) -> frozenset[str]:
    # Memoised per file version: every key computation walks the same few files.
    path = Path(path_s)
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")
                parent = parent[: len(parent) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for n in names:
            if n.split(".")[0] in PROJECT_PACKAGES and _module_file(n) is not None:
                found.add(n)
    return frozenset(found)


def code_files(*modules: str) -> list[Path]:
    """The files of `modules` and of every project module they import, transitively."""
    seen: dict[str, Path] = {}
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name in seen or name in CODE_EXEMPT:
            continue
        path = _module_file(name)
        if path is None:
            continue
        seen[name] = path
        # A submodule runs its package's __init__ too.
        parent = name.rpartition(".")[0]
        todo += [parent] if parent else []
        todo += sorted(_imports(path, name))
    return sorted(set(seen.values()))


@functools.cache
def _file_digest(path: str, mtime_ns: int, size: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (memoised per mtime and size: a rerun's keys cost stat calls)."""
    st = Path(path).stat()
    return _file_digest(str(path), st.st_mtime_ns, st.st_size)


def code_digest(*modules: str) -> str:
    h = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]
    for path in code_files(*modules):
        rel = path.resolve().relative_to(root) if path.resolve().is_relative_to(root) else path
        h.update(str(rel).encode() + b"\0" + file_digest(path).encode() + b"\0")
    return h.hexdigest()[:16]


# Cached: importlib.metadata parses the package's METADATA file on every call (~1.5 ms),
# every stage key asks, and the installed versions hold for the life of a process.
@functools.cache
def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"
