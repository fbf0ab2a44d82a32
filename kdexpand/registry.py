"""A name-to-factory registry shared by models, losses, datasets and tasks."""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

__all__ = ["Registry", "closest_match"]

T = TypeVar("T")


def closest_match(name: str, choices: list[str]) -> str | None:
    """Return the choice closest to ``name``, or None when nothing is similar."""
    matches = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return matches[0] if matches else None


class Registry(Generic[T]):
    """Map names to factories, rejecting duplicates and explaining misses.

    Args:
        kind: What the registry contains, used in error messages ("loss", "model").
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Register the decorated factory under ``name``."""

        def decorator(factory: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = factory
            return factory

        return decorator

    def get(self, name: str) -> T:
        """Return the factory for ``name``, or raise a KeyError listing the choices."""
        if name in self._entries:
            return self._entries[name]
        raise KeyError(self.unknown_message(name))

    def unknown_message(self, name: str) -> str:
        """Build the one-line error for an unknown name, with the closest valid name."""
        choices = sorted(self._entries)
        hint = closest_match(name, choices)
        did_you_mean = f" Did you mean {hint!r}?" if hint else ""
        return f"unknown {self.kind} {name!r}.{did_you_mean} Valid choices: {', '.join(choices)}"

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))
