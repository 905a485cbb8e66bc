"""Every Flask app the process makes, as it is made.

Code that runs before the application is imported (``opentelemetry-instrument``
loads its instrumentors from ``sitecustomize``; a pytest plugin starts before
the tests) has no app to hand to ``CtxGuard``. ``Flask.__init__`` is wrapped
on the class that defines it, so apps of every subclass and every factory are
seen, and the listeners are called with each app once its ``__init__``
returns. Making an app is rare: the wrapper costs nothing on the hot path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from types import FunctionType
from typing import Any

from . import telemetry
from .listeners import Listeners

Listener = Callable[[Any], None]

_listeners: Listeners[Listener] = Listeners()


def subscribe(listener: Listener) -> Callable[[], None]:
    """Call ``listener(app)`` for every Flask app made from now on, while the
    process hooks are installed; returns the function that stops it.

    What the listener raises is logged and swallowed: the app is made anyway.
    """
    return _listeners.add(listener)


def _made(app: Any) -> None:
    for listener in _listeners:
        try:
            listener(app)
        except Exception as exc:
            telemetry.fault("app listener", exc)


def _make_init(original: Any) -> Callable[..., None]:
    plain = type(original) is FunctionType

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if plain:
            original(self, *args, **kwargs)
        else:
            original.__get__(self, type(self))(*args, **kwargs)
        # A subclass's ``__init__`` calls this one through ``super()``: the
        # listeners see the app when the outermost ``__init__`` of Flask's
        # own class returns, before the subclass's remaining lines run.
        if _listeners:
            _made(self)

    return functools.wraps(original)(__init__)


def hooks() -> Iterator[tuple[Any, str, Callable[..., Any]]]:
    """``Flask.__init__``, with its replacement."""
    import flask

    owner = next(c for c in flask.Flask.__mro__ if "__init__" in vars(c))
    yield owner, "__init__", _make_init(vars(owner)["__init__"])
