"""`lazy_import(name)`: a stand-in for the module `name` that imports it on first attribute use.

The stage modules declare their contract (`STAGE`) and register their parts at import, but
only their `run` needs torch. Binding torch lazily lets the runner read every declaration,
compute every cache key and serve a fully cached rerun without paying torch's import
(about 1.7 s of a 2-3 s cached rerun on a 2-core CPU machine; docs/benchmarks.md).

The stand-in is not put in `sys.modules`: its first attribute use is a plain
`importlib.import_module`, under the import lock, so threads that reach it together wait for
one import, and anyone else's `import torch.utils.tensorboard` is an ordinary import. (The
standard library's `importlib.util.LazyLoader` registers the unloaded module instead; when
the first use of such a package is the import of one of its submodules, the import system
loads the package, whose `__init__` imports that submodule, then imports the submodule a
second time, and the package's other submodules lose their attributes: `torch.utils` without
`_pytree`, and transformers' generation code failing to import.)

`when_loaded(name, fn)` runs `fn(module)` once the module is really imported, by anyone,
through an import hook that wraps its loader for that one import.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import threading
from collections.abc import Callable
from types import ModuleType

# Callbacks to run once a module has really been imported (by when_loaded).
_ON_LOAD: dict[str, list[Callable[[ModuleType], None]]] = {}
_LOCK = threading.Lock()


class _Deferred(ModuleType):
    """Stands for the module of the same name; every attribute comes from the real one."""

    def __getattr__(self, attr: str):
        # Only reached for names the stand-in lacks, i.e. all but its own __name__ & co.
        return getattr(importlib.import_module(self.__name__), attr)

    def __dir__(self):
        return dir(importlib.import_module(self.__name__))

    def __reduce__(self):  # pickled (Ray, multiprocessing) as the real module's import
        return importlib.import_module, (self.__name__,)

    def __repr__(self) -> str:
        state = "imported" if is_loaded(self.__name__) else "not imported yet"
        return f"<lazy module {self.__name__!r} ({state})>"


def lazy_import(name: str) -> ModuleType:
    """`name` itself if it is imported already, else a stand-in that imports it on first use.

    Raises ModuleNotFoundError now if the module cannot be found, as `import name` would."""
    if name in sys.modules:
        return sys.modules[name]
    if importlib.util.find_spec(name) is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    return _Deferred(name)


def is_loaded(name: str) -> bool:
    """Whether `name` has been imported for real in this process."""
    return sys.modules.get(name) is not None


class _Hooked(importlib.abc.Loader):
    """The module's own loader, then the callbacks registered with `when_loaded`."""

    def __init__(self, spec) -> None:
        self.spec, self.loader = spec, spec.loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # The module keeps its own loader (inspect, importlib.resources and reload read it).
        self.spec.loader = module.__loader__ = self.loader
        self.loader.exec_module(module)
        with _LOCK:
            callbacks = _ON_LOAD.pop(module.__name__, [])
        for fn in callbacks:
            fn(module)


class _OnLoadFinder(importlib.abc.MetaPathFinder):
    """First on `sys.meta_path`: finds a watched module with the finders after it, and wraps
    its loader; every other import passes through untouched."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _ON_LOAD:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Hooked(spec)
                return spec
        return None


_FINDER = _OnLoadFinder()


def when_loaded(name: str, fn: Callable[[ModuleType], None]) -> None:
    """Run `fn(module)` now if `name` is imported, else right after its first real import.

    So process-wide settings of a heavy library (torch's thread pool) are applied by the
    entry point without importing the library in a run that never uses it (a fully cached
    rerun)."""
    with _LOCK:
        if not is_loaded(name):
            _ON_LOAD.setdefault(name, []).append(fn)
            if _FINDER not in sys.meta_path:
                sys.meta_path.insert(0, _FINDER)
            return
    fn(sys.modules[name])
