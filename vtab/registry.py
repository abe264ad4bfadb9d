"""Named registries: one entry point per concern, kinds registered by name."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

from vtab.errors import ConfigError

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

    def get(self, name: object) -> T:
        if not isinstance(name, str) or name not in self._entries:
            close = difflib.get_close_matches(str(name), self._entries, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(self.key, f"unknown {self.what} {name!r}{hint}; known: "
                                        f"{', '.join(sorted(self._entries))}")
        return self._entries[name]
