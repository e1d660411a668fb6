"""Name -> object registries with aliases and "did you mean" errors.

Every user-facing vocabulary (activations, initializers, losses, optimizers,
layers, metrics, callbacks, data sources...) is one Registry, so lookups and
their error messages behave the same everywhere.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


def split_named(spec: str | dict) -> tuple[str, dict]:
    """A vocabulary entry as params.yaml writes it, a name or {name: ..., **arguments}, as
    (name, arguments)."""
    if isinstance(spec, str):
        return spec, {}
    return spec["name"], {k: v for k, v in spec.items() if k != "name"}


def did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind                    # e.g. "activation", used in messages
        self._items: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def add(self, name: str, item: T, aliases: tuple[str, ...] = ()) -> T:
        if name in self._items:
            raise KeyError(f"{self.kind} '{name}' registered twice")
        self._items[name] = item
        for alias in aliases:
            self._aliases[alias] = name
        return item

    def alias(self, alias: str, name: str) -> None:
        self._aliases[alias] = name

    def register(self, name: str, *aliases: str) -> Callable[[T], T]:
        def deco(item: T) -> T:
            return self.add(name, item, aliases)
        return deco

    def canonical(self, name: str) -> str:
        key = str(name).strip().lower()
        key = self._aliases.get(key, key)
        if key not in self._items:
            hint = did_you_mean(key, [*self._items, *self._aliases])
            raise ValueError(
                f"unknown {self.kind} '{name}'{hint}; allowed: {', '.join(sorted(self._items))}"
            )
        return key

    def __getitem__(self, name: str) -> T:
        return self._items[self.canonical(name)]

    def get(self, name: str, default: T | None = None) -> T | None:
        return self[name] if name in self else default

    def __contains__(self, name: object) -> bool:
        try:
            self.canonical(str(name))
            return True
        except ValueError:
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self):
        return self._items.items()

    def values(self):
        return self._items.values()
