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

import importlib.util
import sys
from types import ModuleType


def lazy_import(name: str) -> ModuleType:
    if name in sys.modules:  # already loaded (or already lazily bound): share it
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
