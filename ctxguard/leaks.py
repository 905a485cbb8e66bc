"""Reporting a leaked context: the one place that says it, whoever found it.

The middleware finds leaks at the start and end of requests, the threading
hooks at the end of a thread or an executor task, the Celery integration at
the end of a task; all report them here, and heal (pop) the stale ones here.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

from . import events, flaskmodel, frames, ledger, telemetry
from .ledger import OpenContext, Worker


def report(
    item: OpenContext,
    w: Worker,
    site: str,
    *,
    ambient: bool = False,
    origin: Any = None,
    attributes: Mapping[str, Any] | None = None,
) -> bool:
    """Count and report one leaked context, once; the span names its push site.

    Whoever finds a context first reports it; a second finder (a finaliser on
    another thread, the next request) gets False and reports nothing. A
    context pushed in a thread or an executor task is reported with the
    ``origin`` of the request that started that work, when there was one (an
    object with ``route``, ``http_method`` and ``span_context``). The span is
    linked to the span of the request the context belongs to, and carries
    ``attributes`` too (what the unit of work that leaked it was).
    """
    if not ledger.claim(item):
        return False
    later = telemetry.stack_state(sys._getframe(1)) != telemetry.SAFE
    location = item.location
    request: Any = item.request if item.request is not None else origin
    span_attributes: dict[str, Any] = {
        telemetry.CONTEXT_KIND: item.kind,
        telemetry.LEAK_SITE: site,
        telemetry.CONTEXT_AGE: round(item.age, 6),
        telemetry.THREAD_ID: w.ident,
        telemetry.THREAD_NAME: w.name,
        **telemetry.code_attributes(location),
    }
    if request is not None:
        span_attributes[telemetry.HTTP_ROUTE] = request.route
        span_attributes[telemetry.HTTP_METHOD] = request.http_method
    if attributes:
        span_attributes.update(attributes)
    telemetry.count(
        telemetry.LEAKS,
        {telemetry.CONTEXT_KIND: item.kind, telemetry.LEAK_SITE: site},
        later=later,
    )
    key = (item.kind, site, item.site if location is not None else request and request.route)
    telemetry.span(
        telemetry.SPAN_CONTEXT_LEAK,
        span_attributes,
        throttle_key=key,
        link=getattr(request, "span_context", None),
        root=True,
        later=later,
    )
    if ambient:
        reason = "pushed outside any request or task and shared by all later work on this thread"
    elif request is not None and item.request is None:
        reason = f"pushed in work started by request {request.http_method} {request.route}"
    elif request is not None:
        reason = f"pushed during request {request.http_method} {request.route or '<unmatched>'}"
    else:
        reason = "never popped"

    def message() -> tuple[str, tuple[Any, ...]]:
        return (
            "ctxguard: %s context leaked (%s), %s; pushed at %s, %.3fs ago, thread %s",
            (
                item.kind,
                site,
                reason,
                frames.where(location, "a place Flask chose (no user code on the stack)"),
                item.age,
                w.name,
            ),
        )

    telemetry.log_event(("leak", key), message, later=later)
    if events.listening():
        events.emit(telemetry.SPAN_CONTEXT_LEAK, span_attributes, message)
    return True


def heal(w: Worker, stale: Callable[[OpenContext], bool]) -> None:
    """Pop stale contexts from the top of this thread's stack so their teardown runs.

    Stale: already reported as leaked, and ``stale`` says so (its request, or
    the task that pushed it, has ended).

    Popping a request context may pop the app context it pushed too: every
    context that left the ledger is counted. A teardown function that raises
    is logged by its exception type only: its message can hold request data.
    """
    # Each context as first seen, with the push site it was reported with (a
    # context Flask pushed for a request borrows the site of the request's next
    # push, which may be healed first).
    seen: dict[int, OpenContext] = {}
    while True:
        item = ledger.top(w)
        if item is None or not item.current or not stale(item):
            return
        if not item.reported:
            return  # it went stale since the check above: reported and healed next time
        before = ledger.open_contexts(w, prune=False)
        for other in before:
            seen.setdefault(id(other.handle), other)
        try:
            item.context().pop()
        except Exception as exc:
            # A teardown function failed; Flask still popped the context.
            telemetry.log_event(
                ("heal", item.kind, item.site),
                "ctxguard: a teardown function raised %s while healing a stale %s context",
                flaskmodel.raised_names(exc),
                item.kind,
            )
        remaining = {id(other.handle) for other in ledger.open_contexts(w, prune=False)}
        healed = [seen[id(other.handle)] for other in before if id(other.handle) not in remaining]
        for other in healed:
            telemetry.count(telemetry.HEALED, {telemetry.CONTEXT_KIND: other.kind})
            telemetry.log_event(
                ("healed", other.kind, other.site),
                "ctxguard: popped a stale %s context (pushed at %s) so its teardown ran",
                other.kind,
                frames.where(other.location, "a place Flask chose (no user code on the stack)"),
            )
        if not healed:
            return  # Flask could not pop it; do not loop.
