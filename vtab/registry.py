"""Named registries: one entry point per concern, kinds registered by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from vtab.errors import ConfigError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to implementations; an unknown name is a `ConfigError` on `key`."""

    def __init__(self, what: str, key: str) -> None:
        self.what = what
        self.key = key
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.what} {name!r} is registered twice")
            self._entries[name] = entry
            return entry

        return add

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def get(self, name: object) -> T:
        if not isinstance(name, str) or name not in self._entries:
            hint = did_you_mean(name, self._entries)
            raise ConfigError(self.key, f"unknown {self.what} {name!r}{hint}; known: "
                                        f"{', '.join(sorted(self._entries))}")
        return self._entries[name]
