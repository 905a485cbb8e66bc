"""What ctxguard reported, handed to listeners in the same process.

Spans are rate limited and go wherever the tracer provider sends them; a test
(or the pytest plugin) needs every event, at once, in the process that made
it. A listener gets each context error, leak and policy violation as an
:class:`Event`, unthrottled, on the thread that found it. With no listener
(production) the reporting paths pay one truth test of a list.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import telemetry
from .listeners import Listeners

__all__ = ["Event", "subscribe"]


@dataclass(frozen=True)
class Event:
    """One report, as its span would carry it.

    ``name`` is the span name (``ctxguard.context_error``,
    ``ctxguard.context_leak`` or ``ctxguard.policy_violation``) and
    ``attributes`` the span's attributes, with the same keys and values (see
    the telemetry reference); ``message`` is the log line ctxguard writes for
    it (written at most once a minute per site; the event comes every time).
    ``thread_id`` is the thread the event was found on, which for a leak
    found by the next request may not be the thread that pushed the context.
    """

    name: str
    attributes: Mapping[str, Any] = field(default_factory=dict)
    message: str = ""
    thread_id: int = 0

    @property
    def location(self) -> str | None:
        """``file:line`` of the user's code the event points at, when known."""
        path = self.attributes.get(telemetry.CODE_FILE)
        line = self.attributes.get(telemetry.CODE_LINE)
        if path is None:
            return None
        return f"{path}:{line}" if line is not None else str(path)


Listener = Callable[[Event], None]

_listeners: Listeners[Listener] = Listeners()


def subscribe(listener: Listener) -> Callable[[], None]:
    """Call ``listener`` with every event from now on; returns the function that stops it.

    A listener runs on the thread that found the event, possibly inside a
    finaliser or while the OpenTelemetry SDK is busy on that thread: keep it
    to appending to a list. What it raises is logged and swallowed.
    """
    return _listeners.add(listener)


def listening() -> bool:
    """Is anyone listening? (Reporters build an event only then.)"""
    return bool(_listeners)


def emit(
    name: str,
    attributes: Mapping[str, Any] | Callable[[], Mapping[str, Any]],
    message: tuple[str, tuple[Any, ...]] | Callable[[], tuple[str, tuple[Any, ...]]],
) -> None:
    """Hand one event to every listener; ``attributes`` and ``message`` may be
    functions, called only when someone listens. Never raises."""
    if not _listeners:
        return
    try:
        attrs = attributes() if callable(attributes) else attributes
        text, args = message() if callable(message) else message
        event = Event(
            name=name,
            attributes={k: v for k, v in attrs.items() if v is not None},
            message=text % args if args else text,
            thread_id=threading.get_ident(),
        )
    except Exception as exc:
        telemetry.fault("event", exc)
        return
    for listener in _listeners:
        try:
            listener(event)
        except Exception as exc:
            telemetry.fault("event listener", exc)
