"""`lazy_import(name)`: the module `name`, bound now and loaded on its first attribute use.

The stage modules declare their contract (`STAGE`) and register their parts at import, but
only their `run` needs torch. Binding torch lazily lets the runner read every declaration,
compute every cache key and serve a fully cached rerun without paying torch's import
(about 1.7 s of a 2-3 s cached rerun on a 2-core CPU machine; docs/benchmarks.md).
This is the standard library's `importlib.util.LazyLoader`, as `lazy_loader` and
transformers' lazy modules use it. Submodules (`torch.nn.functional`) are reached through
the parent (`torch.nn.functional.pad`), which loads it on use.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from collections.abc import Callable
from types import ModuleType

# Callbacks to run once a module bound by lazy_import has really been loaded.
_ON_LOAD: dict[str, list[Callable[[ModuleType], None]]] = {}


class _Hooked(importlib.abc.Loader):
    """The module's own loader, then the callbacks registered with `when_loaded`."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        for fn in _ON_LOAD.pop(module.__name__, []):
            fn(module)


def lazy_import(name: str) -> ModuleType:
    if name in sys.modules:  # already loaded (or already lazily bound): share it
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    spec.loader = importlib.util.LazyLoader(_Hooked(spec.loader))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def is_loaded(name: str) -> bool:
    """Whether `name` has been imported for real (not only bound by `lazy_import`)."""
    module = sys.modules.get(name)
    return module is not None and not isinstance(module, importlib.util._LazyModule)


def when_loaded(name: str, fn: Callable[[ModuleType], None]) -> None:
    """Run `fn(module)` now if `name` is loaded, else right after its first real load.

    So process-wide settings of a heavy library (torch's thread pool) are applied by the
    entry point without importing the library in a run that never uses it (a fully cached
    rerun)."""
    if is_loaded(name):
        fn(sys.modules[name])
        return
    lazy_import(name)
    _ON_LOAD.setdefault(name, []).append(fn)
