"""Celery: each task a unit of work, with the request that enqueued it as its origin.

``ctxguard.install()`` calls :func:`enable` when Celery is imported already
(call it yourself otherwise); ``uninstall()`` calls :func:`disable`. In a
worker every task execution then runs as a unit of work of kind ``celery``:
a Flask proxy used outside its context there is reported with worker kind
``celery``, the task's name (``celery.task_name``) and the fix for tasks; a
context the task pushed and left open is a leak at ``task_end``; and when the
next task starts on the same pool thread or process, such a context (stale
now) is reported if it was not yet, and popped when healing is on, so its
teardown functions run. (The gevent pool runs each task in a greenlet of its
own, which no later task shares: there it is popped when the task ends.) A
context pushed outside any task (an ``app.app_context().push()`` when the
worker imports the app) is not a task's: as for requests, it is reported once
per push site as ambient and never popped, since the tasks rely on it.

A task enqueued while a Flask request is handled carries that request's
origin in one message header, ``ctxguard_origin``: its route template, method,
Flask endpoint and the W3C ``traceparent`` of the span then active. Never the
path, the query string or anything the client sent. In the worker an error or
a leak of the task names that request and links to its span.

Why Celery's signals, and not a patch of ``celery.app.trace.build_tracer``
as Sentry's integration does. Sentry patches it so that its scope opens
before the ``task_prerun`` receivers and closes after the ``task_postrun``
ones, and because Celery 3 stopped at the first receiver that raised. Since
Celery 4 ``Signal.send`` catches and logs a receiver's exception, and these
receivers never raise anyway. What must come after every other receiver is
the check at the end of a task, since an older Flask recipe pushes an app
context in a ``task_prerun`` receiver and pops it in a ``task_postrun`` one:
so the ``task_postrun`` receiver here moves itself back to the end of the
receivers whenever one was connected after it. A context pushed by a
``task_prerun`` receiver that ran before this one is taken for one pushed
outside the task, which is right unless it is never popped. Signals touch
nothing of Celery's: no function is replaced, tasks built before
:func:`enable` are covered, and :func:`disable` disconnects everything. As
OpenTelemetry's Celery instrumentor does, the receivers are connected with
``weak=False`` and a ``dispatch_uid``, and what a task's start hands to its
end is kept by task id, on the thread (or greenlet) running it, so concurrent
tasks of a thread or gevent pool never mix.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from celery import signals

from .. import leaks, ledger, process, settings, telemetry, threads
from ..extension import CtxGuard
from ..ledger import OpenContext, Worker

__all__ = ["HEADER", "disable", "enable"]

#: The message header that carries the origin of a task enqueued in a request.
HEADER = "ctxguard_origin"

#: Longest route template or endpoint name taken from a message header.
_LONGEST = 512

_lock = threading.Lock()
_enabled = False


class _Run:
    """One task execution, from ``task_prerun`` to ``task_postrun``."""

    __slots__ = ("attributes", "eager", "origin", "task_id", "unit")

    def __init__(
        self,
        task_id: Any,
        unit: threads.Unit,
        origin: threads.Origin | None,
        attributes: Mapping[str, Any] | None,
        eager: bool,
    ) -> None:
        self.task_id = task_id
        self.unit = unit
        self.origin = origin
        self.attributes = attributes
        self.eager = eager


#: The tasks running on each thread (or greenlet), innermost last: a task run
#: eagerly (``apply()``) inside another runs on the same thread.
_runs: dict[int, list[_Run]] = {}
#: What the last task on a worker left open: the records (as ``ledger.mark``
#: knows them), with the origin and attributes of that task. Weak: a worker
#: whose thread or greenlet ended takes it along.
_left: weakref.WeakKeyDictionary[
    Worker, tuple[ledger.Mark, threads.Origin | None, Mapping[str, Any] | None]
] = weakref.WeakKeyDictionary()
#: Push sites of ambient contexts already reported (once per site in a process).
_ambient_reported: set[Any] = set()


def _after_fork_in_child() -> None:
    """A prefork pool's child starts with a copy of the parent: a lock another
    thread held at the fork would never be released here."""
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)


# --------------------------------------------------------------------------
# Switching on and off.


def enable() -> bool:
    """Connect the receivers (idempotent); returns whether they are connected. Never raises."""
    global _enabled
    try:
        with _lock:
            if _enabled:
                return True
            connected = []
            try:
                for signal, receiver, uid in _connections():
                    signal.connect(receiver, weak=False, dispatch_uid=uid)
                    connected.append((signal, receiver, uid))
            except Exception:
                for signal, receiver, uid in connected:
                    signal.disconnect(receiver, dispatch_uid=uid)
                raise
            _enabled = True
            return True
    except Exception as exc:
        telemetry.fault("celery enable", exc)
        return False


def disable() -> None:
    """Disconnect every receiver and forget every task (idempotent). Never raises."""
    global _enabled
    try:
        with _lock:
            for signal, receiver, uid in _connections():
                try:
                    signal.disconnect(receiver, dispatch_uid=uid)
                except Exception as exc:
                    telemetry.fault("celery disable", exc)
            _enabled = False
            _runs.clear()
            _left.clear()
            _ambient_reported.clear()
    except Exception as exc:
        telemetry.fault("celery disable", exc)


def _connections() -> list[tuple[Any, Callable[..., None], str]]:
    return [
        (signals.before_task_publish, _on_publish, "ctxguard.celery.publish"),
        (signals.task_prerun, _on_prerun, "ctxguard.celery.prerun"),
        (signals.task_postrun, _on_postrun, "ctxguard.celery.postrun"),
    ]


# --------------------------------------------------------------------------
# Publishing: the origin goes into the message's headers.


def _on_publish(sender: Any = None, headers: Any = None, **kwargs: Any) -> None:
    try:
        if not _enabled or not isinstance(headers, dict) or not process.installed():
            return
        origin = threads.current_origin() or _running_origin()
        if origin is not None:
            value = encode(origin)
            if value:
                headers[HEADER] = value
    except Exception as exc:
        telemetry.fault("celery publish", exc)


def _running_origin() -> threads.Origin | None:
    """The origin of the task running on this thread (a task enqueued by a task)."""
    stack = _runs.get(ledger.ident())
    return stack[-1].origin if stack else None


def encode(origin: threads.Origin) -> dict[str, str]:
    """The header's value: route template, method, endpoint and ``traceparent``, if known."""
    value: dict[str, str] = {}
    if isinstance(origin.route, str):
        value["route"] = origin.route
    if isinstance(origin.http_method, str):
        value["method"] = origin.http_method
    if isinstance(origin.endpoint, str):
        value["endpoint"] = origin.endpoint
    parent = telemetry.traceparent(origin.span_context)
    if parent is not None:
        value["traceparent"] = parent
    return value


def decode(value: Any) -> threads.Origin | None:
    """The origin carried by a header's value; anything malformed is left out."""
    if not isinstance(value, Mapping) or not value:
        return None
    return threads.Origin.of(
        _name(value.get("route")),
        ledger.http_method(value.get("method")),
        _name(value.get("endpoint")),
        telemetry.span_context_from(value.get("traceparent")),
    )


def _name(value: Any) -> str | None:
    return value if isinstance(value, str) and len(value) <= _LONGEST else None


def _origin_of(request: Any) -> threads.Origin | None:
    """The origin in a running task's message headers (``task.request``)."""
    value = getattr(request, HEADER, None)
    if value is None:
        headers = getattr(request, "headers", None)
        if isinstance(headers, Mapping):
            value = headers.get(HEADER)
    return decode(value)


# --------------------------------------------------------------------------
# A task's start and end.


def _on_prerun(sender: Any = None, task_id: Any = None, task: Any = None, **kwargs: Any) -> None:
    try:
        task = task if task is not None else sender
        if not _enabled or task is None or task_id is None or not process.installed():
            return
        if threading.get_ident is not ledger.ident:
            process.rebind()  # gevent patched threading after ctxguard was installed
        _keep_postrun_last()
        request = getattr(task, "request", None)
        eager = getattr(request, "is_eager", False) is True
        ident = ledger.ident()
        stack = _runs.setdefault(ident, [])
        if eager:
            # Run inline by the caller (``apply()``, ``task_always_eager``): the
            # contexts open here are the caller's, its request's or its test's.
            origin = threads.current_origin() or (stack[-1].origin if stack else None)
        else:
            # A worker runs one task at a time on a thread: any run still listed
            # here lost its ``task_postrun`` (disconnected meanwhile). End it now.
            while stack:
                stack.pop().unit.end(telemetry.SITE_TASK_END)
            origin = _origin_of(request)
            w = ledger.existing()
            if w is not None and w.open:
                _check_start(w)
        name = getattr(task, "name", None)
        attributes = {telemetry.CELERY_TASK_NAME: name} if isinstance(name, str) else None
        unit = threads.begin(telemetry.WORKER_CELERY, origin, attributes)
        stack.append(_Run(task_id, unit, origin, attributes, eager))
    except Exception as exc:
        telemetry.fault("celery task start", exc)


def _on_postrun(sender: Any = None, task_id: Any = None, **kwargs: Any) -> None:
    try:
        ident = ledger.ident()
        stack = _runs.get(ident)
        if not stack:
            return
        for index in range(len(stack) - 1, -1, -1):
            if stack[index].task_id == task_id:
                break
        else:
            return
        # Runs above it (eager tasks that lost their end) end first, innermost first.
        while len(stack) > index + 1:
            stack.pop().unit.end(telemetry.SITE_TASK_END)
        run = stack.pop()
        if not stack:
            _runs.pop(ident, None)
        run.unit.end(telemetry.SITE_TASK_END)
        if not run.eager and process.installed():
            w = ledger.existing()
            if w is not None and w.open and ledger.known(w):
                _check_end(w, run)
                if w in _left and threads.kind_of(w) == telemetry.WORKER_GREENLET:
                    # The gevent pool runs each task in a greenlet of its own: no
                    # later task will find what this one left, which is stale now.
                    _check_start(w)
    except Exception as exc:
        telemetry.fault("celery task end", exc)


def _keep_postrun_last() -> None:
    """Move the ``task_postrun`` receiver back to the end if one was connected after it.

    So the check at the end of a task runs after a receiver that pops what a
    ``task_prerun`` receiver pushed.
    """
    receivers = signals.task_postrun.receivers
    if not receivers or receivers[-1][1] is _on_postrun:
        return
    with _lock:
        uid = "ctxguard.celery.postrun"
        if _enabled and signals.task_postrun.disconnect(_on_postrun, dispatch_uid=uid):
            signals.task_postrun.connect(_on_postrun, weak=False, dispatch_uid=uid)


def _check_end(w: Worker, run: _Run) -> None:
    """After the task (and every ``task_postrun`` receiver): what it left open
    becomes stale for the next task; a context open across the whole task that
    no task pushed is ambient."""
    since = ledger.opened_since(w, run.unit.before)
    pushed = {id(item.handle) for item in since}
    left = {id(item.handle) for item in since if item.request is None and not item.nested}
    if left:
        _left[w] = (
            {key: at for key, at in ledger.mark(w).items() if key in left},
            run.origin,
            run.attributes,
        )
    else:
        _left.pop(w, None)
    for item in ledger.open_contexts(w):
        if (
            id(item.handle) in pushed
            or item.reported
            or item.request is not None
            or item.nested
            or _environment_and_heal(item)[0] == "testing"
        ):
            continue
        if item.site not in _ambient_reported:
            _ambient_reported.add(item.site)
            leaks.report(item, w, telemetry.SITE_TASK_END, ambient=True)
        else:
            ledger.claim(item)  # reported once per push site


def _check_start(w: Worker) -> None:
    """Before a task: contexts an earlier task left open on this worker are stale;
    report any not reported yet, and heal them where healing is on."""
    left = _left.pop(w, None)
    if left is None:
        return
    marks, origin, attributes = left
    now = ledger.mark(w)
    stale = {key for key, at in marks.items() if now.get(key) == at}
    if not stale:
        return
    heal = set()
    for item in ledger.open_contexts(w):
        key = id(item.handle)
        if key not in stale:
            continue
        if not item.reported:
            leaks.report(item, w, telemetry.SITE_TASK_END, origin=origin, attributes=attributes)
        if _environment_and_heal(item)[1]:
            heal.add(key)
    if heal:
        leaks.heal(w, lambda item: id(item.handle) in heal)


def _environment_and_heal(item: OpenContext) -> tuple[str, bool]:
    """The environment of the context's app and whether to heal, as its guard has them.

    The app's ``CtxGuard`` options if it has one (``heal``, ``environment``);
    else the ``CTXGUARD_*`` variables, the environment following the app's
    ``debug`` and ``testing``.
    """
    ctx = item.context()
    app = getattr(ctx, "app", None) if ctx is not None else None
    guard = CtxGuard.middleware(app) if app is not None else None
    if guard is not None:
        environment = guard.environment()
        return environment, guard.options.heal_for(environment)
    options = settings.resolve()
    environment = options.environment_for(
        bool(getattr(app, "debug", False)), bool(getattr(app, "testing", False))
    )
    return environment, options.heal_for(environment)
