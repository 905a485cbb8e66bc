"""A list of listeners that reporting code on any thread may call while it changes.

Replaced, never changed in place: a call running on another thread (or in a
finaliser on this one) iterates a tuple nobody changes under it, and no lock
is held while a listener runs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

L = TypeVar("L", bound=Callable[..., None])


class Listeners(Generic[L]):
    __slots__ = ("_current", "_lock")

    def __init__(self) -> None:
        self._current: tuple[L, ...] = ()
        self._lock = threading.Lock()

    def add(self, listener: L) -> Callable[[], None]:
        """Add ``listener``; returns the function that removes it (idempotent)."""
        with self._lock:
            self._current = (*self._current, listener)

        def remove() -> None:
            with self._lock:
                remaining = list(self._current)
                if listener in remaining:
                    remaining.remove(listener)
                self._current = tuple(remaining)

        return remove

    def __bool__(self) -> bool:
        return bool(self._current)

    def __iter__(self) -> Iterator[L]:
        return iter(self._current)
