"""Reporting a leaked context: the one place that says it, whoever found it.

The middleware finds leaks at the start and end of requests, the threading
hooks at the end of a thread or an executor task; both report them here.
"""

from __future__ import annotations

import sys
from typing import Any

from . import frames, ledger, telemetry
from .ledger import OpenContext, Worker


def report(
    item: OpenContext, w: Worker, site: str, *, ambient: bool = False, origin: Any = None
) -> bool:
    """Count and report one leaked context, once; the span names its push site.

    Whoever finds a context first reports it; a second finder (a finaliser on
    another thread, the next request) gets False and reports nothing. A
    context pushed in a thread or an executor task is reported with the
    ``origin`` of the request that started that work, when there was one (an
    object with ``route``, ``http_method`` and ``span_context``). The span is
    linked to the span of the request the context belongs to.
    """
    if not ledger.claim(item):
        return False
    later = telemetry.stack_state(sys._getframe(1)) != telemetry.SAFE
    location = item.location
    request: Any = item.request if item.request is not None else origin
    attributes: dict[str, Any] = {
        telemetry.CONTEXT_KIND: item.kind,
        telemetry.LEAK_SITE: site,
        telemetry.CONTEXT_AGE: round(item.age, 6),
        telemetry.THREAD_ID: w.ident,
        telemetry.THREAD_NAME: w.name,
        **telemetry.code_attributes(location),
    }
    if request is not None:
        attributes[telemetry.HTTP_ROUTE] = request.route
        attributes[telemetry.HTTP_METHOD] = request.http_method
    telemetry.count(
        telemetry.LEAKS,
        {telemetry.CONTEXT_KIND: item.kind, telemetry.LEAK_SITE: site},
        later=later,
    )
    key = (item.kind, site, item.site if location is not None else request and request.route)
    telemetry.span(
        telemetry.SPAN_CONTEXT_LEAK,
        attributes,
        throttle_key=key,
        link=getattr(request, "span_context", None),
        root=True,
        later=later,
    )
    if ambient:
        reason = "pushed outside any request and shared by every request on this thread"
    elif request is not None and item.request is None:
        reason = f"pushed in work started by request {request.http_method} {request.route}"
    elif request is not None:
        reason = f"pushed during request {request.http_method} {request.route or '<unmatched>'}"
    else:
        reason = "never popped"
    telemetry.log_event(
        ("leak", key),
        lambda: (
            "ctxguard: %s context leaked (%s), %s; pushed at %s, %.3fs ago, thread %s",
            (
                item.kind,
                site,
                reason,
                frames.where(location, "a place Flask chose (no user code on the stack)"),
                item.age,
                w.name,
            ),
        ),
        later=later,
    )
    return True
