"""Name registries for pluggable parts (models, losses, metrics, transforms, phase kinds).

A registry maps a short name to a callable. Any name of the form ``pkg.mod:Attr``
is imported instead, so user code plugs into the same config slot as built-ins.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T", bound=Callable[..., Any])


class RegistryError(KeyError):
    """Unknown name or unimportable dotted path; the message says what exists."""

    def __str__(self) -> str:
        return str(self.args[0])


def import_dotted(path: str) -> Any:
    """Import ``pkg.mod:Attr`` (or ``pkg.mod.Attr``) and return the attribute."""
    if ":" in path:
        mod_name, _, attr = path.partition(":")
    else:
        mod_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise RegistryError(
            f"cannot import module {mod_name!r} from {path!r}: {exc}. "
            "Is the package installed or on PYTHONPATH?"
        ) from exc
    try:
        return getattr(module, attr)
    except AttributeError as exc:
        raise RegistryError(f"module {mod_name!r} has no attribute {attr!r} (from {path!r})") from exc


class Registry(Generic[T]):
    """A name -> callable table with helpful errors."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(fn: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = fn
            return fn

        return deco

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items or ":" in name

    def get(self, name: str) -> T:
        if name in self._items:
            return self._items[name]
        if ":" in name:
            return import_dotted(name)  # type: ignore[no-any-return]
        close = difflib.get_close_matches(name, self._items, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise RegistryError(
            f"unknown {self.kind} {name!r}.{hint} Known: {', '.join(self.names())}; "
            "or give a dotted path 'pkg.module:Name'."
        )
