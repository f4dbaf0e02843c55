"""A name -> factory registry filled by a decorator.

One registry exists per kind of thing (compressors, collectives). An unknown name
fails with the list of valid ones.
"""

from __future__ import annotations

from typing import Callable, Dict, Generic, List, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories; ``@registry.register("name")`` adds one."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = item
            return item

        return decorator

    def get(self, name: str) -> T:
        if not isinstance(name, str) or name not in self._items:
            raise ValueError(f"unknown {self.kind} {name!r}; expected one of {self.names()}")
        return self._items[name]

    def names(self) -> List[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
