"""A small name -> function registry (after verl's `core_algos`).

Every swappable part (engines, reward functions, pair strategies, advantage estimators,
loss aggregations, algorithms) is a `Registry`: one signature per registry, registered with
a decorator, looked up by name. An unknown name fails listing the valid ones, so no
`if mode == ...` chain is needed anywhere else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from pipeline.errors import EqLenError

F = TypeVar("F", bound=Callable)


class UnknownName(EqLenError, KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return self.args[0]


# Every registry that a config key selects from, by that key, once its module is imported:
# how config validation learns the valid names without importing the stages (which import
# torch) from the foundation floor.
BY_KEY: dict[str, Registry] = {}


class Registry(Generic[F]):
    def __init__(self, kind: str, key: str | None = None):
        self.kind = kind  # e.g. "pair strategy"
        self.key = key  # the config key that selects from it, for error messages
        self._items: dict[str, F] = {}
        if key is not None:
            BY_KEY[key] = self

    def register(self, name: str) -> Callable[[F], F]:
        def deco(fn: F) -> F:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = fn
            return fn

        return deco

    def get(self, name: str) -> F:
        try:
            return self._items[name]
        except KeyError:
            where = f" ({self.key})" if self.key else ""
            raise UnknownName(
                f"unknown {self.kind} {name!r}{where}; valid: " + ", ".join(self.names())
            ) from None

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
