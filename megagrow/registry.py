"""One registry per kind of thing (growth operators, stop rules, launchers, checkpoint formats).

Adding one is its module plus one `REGISTRY.register(...)` line; lookups of unknown names fail
with one line that lists the known ones.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, error: type[Exception] = ValueError):
        self.kind, self.error = kind, error
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = item
        return item

    def unregister(self, name: str) -> None:
        self._items.pop(name, None)

    def get(self, name: str, where: str = "") -> T:
        if name not in self._items:
            raise self.error(f"{where}unknown {self.kind} {name!r} (one of {', '.join(self._items)})")
        return self._items[name]

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self):
        return iter(self._items)

    def items(self):
        return self._items.items()

    def values(self):
        return self._items.values()

    def names(self) -> list[str]:
        return list(self._items)
