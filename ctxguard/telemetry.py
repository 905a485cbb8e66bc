"""Everything ctxguard says to OpenTelemetry, and the only module that talks to it.

The names below are a public interface (dashboards and alert rules depend on
them, see docs/telemetry.md). Only rare events reach this module: the hot path keeps
plain integers in the ledger and the observable instruments read them at
collection time. Every function here swallows its own failures (a broken
provider, processor or exporter must never reach the user's request) and logs
them at most once per minute.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

logger = logging.getLogger("ctxguard")

SCOPE = "ctxguard"

# Metrics.
ERRORS = "ctxguard.context.errors"
LEAKS = "ctxguard.context.leaks"
PUSHES = "ctxguard.context.pushes"
POPS = "ctxguard.context.pops"
OPEN = "ctxguard.context.open"
HEALED = "ctxguard.context.healed"
VIOLATIONS = "ctxguard.policy.violations"

# Spans.
SPAN_CONTEXT_ERROR = "ctxguard.context_error"
SPAN_CONTEXT_LEAK = "ctxguard.context_leak"
SPAN_POLICY_VIOLATION = "ctxguard.policy_violation"

# Attribute keys.
PROXY = "ctxguard.proxy"
CONTEXT_KIND = "ctxguard.context.kind"
WORKER_KIND = "ctxguard.worker.kind"
LEAK_SITE = "ctxguard.leak.site"
POP_OUTCOME = "ctxguard.pop.outcome"
POLICY_RULE = "ctxguard.policy.rule"
POLICY_ACTION = "ctxguard.policy.action"
CONTEXT_AGE = "ctxguard.context.age"
HINT = "ctxguard.hint"
SUPPRESSED = "ctxguard.suppressed"
ORIGIN_ENDPOINT = "ctxguard.origin.endpoint"
CELERY_TASK_NAME = "celery.task_name"
CODE_FUNCTION = "code.function.name"
CODE_FILE = "code.file.path"
CODE_LINE = "code.line.number"
THREAD_ID = "thread.id"
THREAD_NAME = "thread.name"
HTTP_ROUTE = "http.route"
HTTP_METHOD = "http.request.method"
EXCEPTION_TYPE = "exception.type"
EXCEPTION_MESSAGE = "exception.message"
EXCEPTION_STACKTRACE = "exception.stacktrace"

# Attribute values.
KIND_APP = "app"
KIND_REQUEST = "request"
PROXY_REQUEST = "request"
PROXY_SESSION = "session"
PROXY_G = "g"
PROXY_CURRENT_APP = "current_app"
PROXY_REQUEST_CTX = "request_ctx"
PROXY_APP_CTX = "app_ctx"
WORKER_REQUEST = "request"
WORKER_THREAD = "thread"
WORKER_EXECUTOR = "executor"
WORKER_GREENLET = "greenlet"
WORKER_TASK = "task"
WORKER_CELERY = "celery"
WORKER_CLI = "cli"
WORKER_MAIN = "main"
SITE_REQUEST_START = "request_start"
SITE_REQUEST_END = "request_end"
SITE_THREAD_EXIT = "thread_exit"
SITE_TASK_END = "task_end"
OUTCOME_OK = "ok"
OUTCOME_WRONG = "wrong_context"
OUTCOME_CROSS = "cross_worker"
RULE_PRESERVE_CONFIG = "preserve_context_on_exception"
RULE_PRESERVE_ENVIRON = "preserve_context_environ"
RULE_DEBUG_MODE = "debug_mode"
RULE_DEBUGGER = "debugger_middleware"
RULE_DEV_SERVER = "development_server"
ACTION_ENFORCED = "enforced"
ACTION_REPORTED = "reported"
ACTION_REFUSED = "refused"

#: The attributes each metric's points carry (dashboards and alert rules group by them).
METRIC_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    ERRORS: (PROXY, CONTEXT_KIND, WORKER_KIND, HTTP_ROUTE),
    LEAKS: (CONTEXT_KIND, LEAK_SITE),
    PUSHES: (CONTEXT_KIND,),
    POPS: (CONTEXT_KIND, POP_OUTCOME),
    OPEN: (CONTEXT_KIND,),
    HEALED: (CONTEXT_KIND,),
    VIOLATIONS: (POLICY_RULE, POLICY_ACTION),
}

#: How often one fault or one event site may be logged.
LOG_INTERVAL = 60.0
#: Spans per code location per second; the counters stay exact.
SPAN_INTERVAL = 1.0


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("flask-ctxguard")
    except Exception:
        return "0.0.0"


VERSION = _version()

Observations = Callable[[], Mapping[str, Iterable[tuple[Mapping[str, str], int]]]]


class _Throttle:
    """Lets one event per key through per interval and counts the rest.

    No lock: ``allow`` is reachable from finalisers, which may run on a thread
    in the middle of this very method. Each step is one dict operation or one
    ``next()`` on a C counter, atomic under the GIL; two threads racing on one
    key may both be let through once, which only costs a span.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last: dict[Any, float] = {}
        self._dropped: dict[Any, Any] = {}

    def allow(self, key: Any) -> tuple[bool, int]:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            dropped = self._dropped.get(key)
            if dropped is None:
                dropped = self._dropped.setdefault(key, itertools.count())
            next(dropped)
            return False, 0
        if len(self._last) > 10_000:  # bounded, whatever the keys
            self._last.clear()
            self._dropped.clear()
        self._last[key] = now
        dropped = self._dropped.pop(key, None)
        return True, counted(dropped) if dropped is not None else 0

    def reset(self) -> None:
        self._last.clear()
        self._dropped.clear()


def counted(counter: Any) -> int:
    """How many times ``next()`` was called on a fresh ``itertools.count()``."""
    text = repr(counter)  # "count(N)"
    return int(text[text.index("(") + 1 : -1])


_faults = _Throttle(LOG_INTERVAL)
_logs = _Throttle(LOG_INTERVAL)
_spans = _Throttle(SPAN_INTERVAL)


# --------------------------------------------------------------------------
# When it is not safe to emit now.
#
# A finaliser (an abandoned response body, a generator closed by a garbage
# collection) can run in the middle of any code on its thread: inside the
# OpenTelemetry SDK while it holds one of its locks (an aggregation's, while a
# collection allocates), or inside ctxguard's own emission. Emitting from there
# could wait for ever on a lock the same thread holds, so such events are kept
# in a queue (``deque.append`` takes no lock) and emitted at the next safe point:
# the next request, the end of a thread or task, ``snapshot()``, or the next
# event emitted from a safe place. Counters stay exact; they are only later.

SAFE = 0
#: OpenTelemetry's SDK or an exporter is running on this thread: emit later.
INSIDE_SDK = 1
#: ctxguard itself is emitting on this thread (a span processor, exporter or log
#: filter it called touched a proxy): what happens there is not the user's.
INSIDE_CTXGUARD = 2

_STACK_LIMIT = 48
_SDK_MODULES = ("opentelemetry.sdk", "opentelemetry.exporter")
_sdk_files: dict[str, bool] = {}
_pending: deque[tuple[Callable[..., None], tuple[Any, ...]]] = deque()
#: Events kept for the next safe point; empty (false) nearly always.
pending = _pending
_emitters: frozenset[Any] = frozenset()


def stack_state(frame: Any) -> int:
    """Where this thread is, looking outwards from ``frame``: ``SAFE``,
    ``INSIDE_SDK`` or ``INSIDE_CTXGUARD``."""
    state = SAFE
    limit = _STACK_LIMIT
    emitters, sdk_files, own = _emitters, _sdk_files, _OWN_FILE
    while frame is not None and limit:
        code = frame.f_code
        filename = code.co_filename
        # By file first: hashing a code object (for the set) walks its bytecode.
        if filename == own and code in emitters:
            return INSIDE_CTXGUARD
        if state == SAFE:
            inside = sdk_files.get(filename)
            if inside is None:
                name = frame.f_globals.get("__name__")
                inside = isinstance(name, str) and name.startswith(_SDK_MODULES)
                if len(sdk_files) > 10_000:
                    sdk_files.clear()
                sdk_files[filename] = inside
            if inside:
                state = INSIDE_SDK
        frame = frame.f_back
        limit -= 1
    return state


def _later(frame: Any) -> bool:
    return stack_state(frame) != SAFE


def drain() -> None:
    """Emit what was kept for later; call only from a safe place."""
    while _pending:
        try:
            func, args = _pending.popleft()
        except IndexError:
            return
        func(*args)


def drain_if_safe(frame: Any) -> None:
    """Emit what was kept for later, unless this thread is in an unsafe place."""
    try:
        if stack_state(frame) == SAFE:
            drain()
    except Exception as exc:
        fault("deferred events", exc)


def fault(where: str, exc: BaseException) -> None:
    """Log one of ctxguard's own failures, at most once per minute per place.

    The exception's type and where it was raised are logged, not its message:
    an exception raised around a request can carry the request's data.
    """
    try:
        if _later(sys._getframe(1)):
            _pending.append((_fault, (where, exc)))
        else:
            _fault(where, exc)
    except Exception:
        pass


def _fault(where: str, exc: BaseException) -> None:
    try:
        allowed, dropped = _faults.allow(where)
        if allowed:
            stack = "".join(traceback.format_tb(exc.__traceback__)).rstrip()
            logger.warning(
                "ctxguard: internal error in %s (ignored, the application is not affected;"
                " %d more since the last report): %s\n%s",
                where,
                dropped,
                type(exc).__qualname__,
                stack,
            )
    except Exception:
        pass


def log_event(
    key: Any,
    message: str | Callable[[], tuple[str, tuple[Any, ...]]],
    *args: Any,
    later: bool | None = None,
) -> None:
    """Log an event once per key per minute on the ``ctxguard`` logger.

    ``message`` may be a function returning the message and its arguments,
    called only when the line is let through. ``later`` is as for ``count``.
    """
    try:
        if later is None:
            later = _later(sys._getframe(1))
        if later:
            if callable(message):
                message, args = message()
            _pending.append((_log, (key, message, args)))
            return
        if _pending:
            drain()
        _log(key, message, args)
    except Exception as exc:
        fault("log", exc)


def _log(
    key: Any, message: str | Callable[[], tuple[str, tuple[Any, ...]]], args: tuple[Any, ...]
) -> None:
    try:
        allowed, dropped = _logs.allow(key)
        if allowed:
            if callable(message):
                message, args = message()
            if dropped:
                message += " (%d more like this in the last minute)"
                args = (*args, dropped)
            logger.warning(message, *args)
    except Exception as exc:
        fault("log", exc)


class _State:
    """The providers in use and the instruments made from them."""

    def __init__(self) -> None:
        self.tracer_provider: Any = None
        self.meter_provider: Any = None
        self.observations: Observations | None = None
        self.lock = threading.Lock()
        self.meter_key: Any = None
        self.counters: dict[str, Any] = {}
        self.tracer_key: Any = None
        self.tracer: Any = None


_state = _State()
_GLOBAL = object()


def _after_fork_in_child() -> None:
    """A forked worker (gunicorn's, after ``--preload``) starts with a copy of the
    master's state: a lock another thread of the master held while it made the
    instruments would never be released here, and the events the master kept for
    later are the master's to emit. Counts made before any SDK was set up stay: the
    master exports nothing, and each worker reports the app it inherited (a policy
    violation found when the app was made)."""
    _state.lock = threading.Lock()
    _pending.clear()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)


def configure(
    tracer_provider: Any = None,
    meter_provider: Any = None,
    observations: Observations | None = None,
) -> None:
    """Use these providers from now on (``None`` keeps the one already chosen).

    With no explicit provider the global ones are used, looked up when the
    first event happens rather than at import, so a provider set after
    ``import ctxguard`` is still used (before it is set, the API's proxy
    provider forwards to it once it is).
    """
    with _state.lock:
        if tracer_provider is not None:
            _state.tracer_provider = tracer_provider
        if meter_provider is not None:
            _state.meter_provider = meter_provider
        if observations is not None:
            _state.observations = observations
    # Register the observable instruments now, so the first collection sees them.
    _instruments()


def reset() -> None:
    """Forget explicit providers and throttles (for tests and ``uninstall``)."""
    with _state.lock:
        _state.tracer_provider = None
        _state.meter_provider = None
        _state.meter_key = None
        _state.counters = {}
        _state.tracer_key = None
        _state.tracer = None
    _faults.reset()
    _logs.reset()
    _spans.reset()
    _pending.clear()
    _unsent.clear()


def _instruments() -> dict[str, Any]:
    try:
        # The global provider is looked up once: before the application sets
        # one it is the API's proxy, which forwards to the real one later.
        key = _state.meter_provider or _GLOBAL
        if key is _state.meter_key:
            return _state.counters
        with _state.lock:
            if key is _state.meter_key:
                return _state.counters
            provider = _state.meter_provider or metrics.get_meter_provider()
            meter = provider.get_meter(SCOPE, VERSION)
            counters = {
                ERRORS: meter.create_counter(
                    ERRORS, unit="{error}", description="Flask proxies used outside their context."
                ),
                LEAKS: meter.create_counter(
                    LEAKS, unit="{context}", description="Contexts pushed and never popped."
                ),
                HEALED: meter.create_counter(
                    HEALED,
                    unit="{context}",
                    description="Stale contexts popped by ctxguard so their teardown ran.",
                ),
                VIOLATIONS: meter.create_counter(
                    VIOLATIONS, unit="{violation}", description="Production policy violations."
                ),
            }
            meter.create_observable_counter(
                PUSHES,
                callbacks=[_observe(PUSHES)],
                unit="{context}",
                description="Application and request contexts pushed.",
            )
            meter.create_observable_counter(
                POPS,
                callbacks=[_observe(POPS)],
                unit="{context}",
                description="Application and request contexts popped, by outcome.",
            )
            meter.create_observable_up_down_counter(
                OPEN,
                callbacks=[_observe(OPEN)],
                unit="{context}",
                description="Contexts pushed and not yet popped.",
            )
            _state.meter_key = key
            _state.counters = counters
            return counters
    except Exception as exc:
        fault("metrics", exc)
        return {}


def _observe(name: str) -> Callable[[Any], Iterable[metrics.Observation]]:
    def callback(options: Any) -> Iterable[metrics.Observation]:
        if _unsent:
            # An SDK is collecting: what was counted before it was set up goes out at
            # the next safe point (not from inside its collection).
            _pending.append((_send_unsent, ()))
        source = _state.observations
        if source is None:
            return []
        try:
            return [metrics.Observation(value, dict(attrs)) for attrs, value in source()[name]]
        except Exception as exc:
            fault("metrics collection", exc)
            return []

    return callback


def _tracer() -> Any:
    key = _state.tracer_provider or _GLOBAL
    if key is not _state.tracer_key:
        provider = _state.tracer_provider or trace.get_tracer_provider()
        _state.tracer = provider.get_tracer(SCOPE, VERSION)
        _state.tracer_key = key
    return _state.tracer


def count(name: str, attributes: Mapping[str, Any], *, later: bool | None = None) -> None:
    """Add one to a synchronous counter, now or at the next safe point; never raises.

    ``later`` says whether this thread is somewhere emitting is not safe (see
    ``stack_state``); None works it out.
    """
    try:
        if later is None:
            later = _later(sys._getframe(1))
        if later:
            _pending.append((_count, (name, dict(attributes))))
            return
        if _pending:
            drain()
        _count(name, attributes)
    except Exception as exc:
        fault(f"counter {name}", exc)


def _count(name: str, attributes: Mapping[str, Any]) -> None:
    try:
        if _sdk_missing():
            _keep_unsent(name, attributes)
            return
        if _unsent:
            _send_unsent()
        counter = _instruments().get(name)
        if counter is not None:
            counter.add(1, attributes)
    except Exception as exc:
        fault(f"counter {name}", exc)


#: Counts made while no OpenTelemetry SDK was set up yet: the API's stand-in
#: provider drops them, and a policy violation found when the app is made (at
#: import, before gunicorn's ``post_worker_init`` sets the SDK up) must still be
#: counted. (metric, attributes) -> a C counter; bounded like every other key set.
_unsent: dict[tuple[str, tuple[tuple[str, Any], ...]], Any] = {}
_UNSENT_LIMIT = 1_000


def _sdk_missing() -> bool:
    """Is the global meter provider still the API's stand-in (no SDK set up yet)?"""
    if _state.meter_provider is not None:
        return False
    return type(metrics.get_meter_provider()).__name__ == "_ProxyMeterProvider"


def _keep_unsent(name: str, attributes: Mapping[str, Any]) -> None:
    key = (name, tuple(sorted(attributes.items())))
    counter = _unsent.get(key)
    if counter is None:
        if len(_unsent) >= _UNSENT_LIMIT:
            return
        counter = _unsent.setdefault(key, itertools.count())
    next(counter)


def _send_unsent() -> None:
    """Add what was counted before the SDK was set up, now that it is."""
    instruments = _instruments()
    for key in list(_unsent):
        counter = _unsent.pop(key, None)
        if counter is None:
            continue
        name, attributes = key
        instrument = instruments.get(name)
        if instrument is not None:
            instrument.add(counted(counter), dict(attributes))


def code_attributes(location: Any) -> dict[str, Any]:
    """``code.*`` attributes of a place in the user's code (anything with
    ``function``, ``file`` and ``line``), or none when it is not known."""
    if location is None:
        return {}
    return {
        CODE_FUNCTION: location.function,
        CODE_FILE: location.file,
        CODE_LINE: location.line,
    }


def current_span_context() -> Any:
    """The active span's context if it is a real (sampled or not) span, else None.

    Taken when work is handed to a thread, so the error span there can link
    back to the request that spawned it.
    """
    try:
        context = trace.get_current_span().get_span_context()
        return context if context.is_valid else None
    except Exception as exc:
        fault("span context", exc)
        return None


_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def traceparent(span_context: Any) -> str | None:
    """A span context as W3C ``traceparent`` text, to carry it in a task's message."""
    if span_context is None or not span_context.is_valid:
        return None
    return (
        f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}"
        f"-{int(span_context.trace_flags):02x}"
    )


def span_context_from(text: Any) -> Any:
    """The (remote) span context in ``traceparent`` text, for a link; None if malformed."""
    if not isinstance(text, str):
        return None
    match = _TRACEPARENT.fullmatch(text)
    if match is None:
        return None
    context = trace.SpanContext(
        trace_id=int(match.group(1), 16),
        span_id=int(match.group(2), 16),
        is_remote=True,
        trace_flags=trace.TraceFlags(int(match.group(3), 16)),
    )
    return context if context.is_valid else None


def span(
    name: str,
    attributes: Mapping[str, Any] | Callable[[], Mapping[str, Any]],
    *,
    throttle_key: Any = None,
    exception: BaseException | None = None,
    stacktrace: Callable[[], str] | None = None,
    link: Any = None,
    root: bool = False,
    later: bool | None = None,
) -> None:
    """Emit one finished ERROR span, at most once per second per ``throttle_key``.

    The next span let through for the same key carries how many were dropped
    in ``ctxguard.suppressed``. ``attributes`` may be a function, called only
    when the span is let through. With ``exception`` an ``exception`` event is
    added, its stack trace built from what ``stacktrace`` returns (cheap: no
    source lines are read, unlike ``record_exception``). ``link`` is a span
    context to link to (the request the event belongs to). ``root`` starts a
    trace of its own instead of a child of the current span: the span of the
    request a leak belongs to has usually ended by the time it is found.
    ``later`` is as for ``count``. Never raises.
    """
    try:
        if later is None:
            later = _later(sys._getframe(1))
        if later:
            # Resolved now: the frames they read may be gone by the safe point.
            if callable(attributes):
                attributes = attributes()
            trace_text = stacktrace() if stacktrace is not None else None
            _pending.append(
                (
                    _span,
                    (name, attributes, throttle_key, exception, lambda: trace_text, link, root),
                )
            )
            return
        if _pending:
            drain()
        _span(name, attributes, throttle_key, exception, stacktrace, link, root)
    except Exception as exc:
        fault(f"span {name}", exc)


def _span(
    name: str,
    attributes: Mapping[str, Any] | Callable[[], Mapping[str, Any]],
    throttle_key: Any,
    exception: BaseException | None,
    stacktrace: Callable[[], str | None] | None,
    link: Any,
    root: bool,
) -> None:
    try:
        if throttle_key is not None:
            allowed, dropped = _spans.allow((name, throttle_key))
            if not allowed:
                return
        else:
            dropped = 0
        if callable(attributes):
            attributes = attributes()
        if dropped:
            attributes = {**attributes, SUPPRESSED: dropped}
        tracer = _tracer()
        clean = {k: v for k, v in attributes.items() if v is not None}
        links = (Link(link),) if link is not None else None
        parent = _ROOT if root else None
        sp = tracer.start_span(
            name, context=parent, kind=SpanKind.INTERNAL, attributes=clean, links=links
        )
        try:
            if exception is not None:
                kind = type(exception).__qualname__
                text = stacktrace() if stacktrace is not None else None
                event = {EXCEPTION_TYPE: kind, EXCEPTION_MESSAGE: str(exception)}
                if text is not None:
                    event[EXCEPTION_STACKTRACE] = f"{text}\n{kind}: {exception}"
                sp.add_event("exception", event)
            sp.set_status(Status(StatusCode.ERROR))
        finally:
            sp.end()
    except Exception as exc:
        fault(f"span {name}", exc)


#: A context with no span in it: the parent of a span that starts its own trace.
_ROOT = trace.set_span_in_context(trace.INVALID_SPAN)

#: This module's file: every emitting function below is in it.
_OWN_FILE = count.__code__.co_filename
#: ctxguard's emitting functions: a proxy touched while one of them is on the
#: stack was touched by something ctxguard called (see ``stack_state``).
_emitters = frozenset(
    func.__code__
    for func in (count, _count, span, _span, log_event, _log, fault, _fault, drain, _instruments)
)
