"""A garbage collection forced inside one of ctxguard's critical sections (run by test_gc.py).

``python gc_faults.py SECTION``: bodies of streamed responses are abandoned in
reference cycles, so only the cyclic collector finalises them, on this (main)
thread, while the thread that served them keeps their contexts (one leak each,
found by the finaliser). Then a collection is forced inside SECTION while
requests, proxy errors and metric collections go through ctxguard; a finaliser
run there re-enters ctxguard. Nothing may hang (the parent gives up after a
timeout) and the counters must be exact. Prints one JSON line with the counts.
"""

from __future__ import annotations

import gc
import json
import logging
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import flask
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics._internal import aggregation
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

ABANDONED = 20
ERRORS = 30
armed = False
collections = 0
#: Section "locks": every lock ctxguard makes runs a collection when acquired.
locks_collect = False


def collect() -> None:
    """A collection, at most once per entry into the section (it is re-entered by the
    finalisers it runs, which must not collect again)."""
    global armed, collections
    if armed:
        armed = False
        collections += 1
        gc.collect()


class CollectingLock:
    """A lock that runs a collection while held, as an allocation inside it may."""

    def __init__(self, lock: Any, always: bool = True) -> None:
        self._lock = lock
        self._always = always

    def acquire(self, *args: Any, **kwargs: Any) -> bool:
        got = self._lock.acquire(*args, **kwargs)
        if got and (self._always or locks_collect):
            collect()
        return bool(got)

    def _is_owned(self) -> bool:  # for threading.Condition over an RLock
        return bool(self._lock._is_owned())

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


class CollectingClock:
    """``time`` for ctxguard's throttles: a collection inside ``_Throttle.allow``."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def monotonic(self) -> float:
        collect()
        return float(self._real.monotonic())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class CollectingProcessor(SpanProcessor):
    """A span processor that collects while the SDK ends a span (ctxguard's own, too)."""

    def on_end(self, span: Any) -> None:
        collect()


class CollectingHandler(logging.Handler):
    """A log handler that collects while it holds its own lock (``handle`` takes it)."""

    def emit(self, record: logging.LogRecord) -> None:
        collect()


def _lock_factory(make: Any) -> Any:
    """``threading.Lock``/``RLock`` for ctxguard's modules: locks that collect when armed."""

    def factory(*args: Any, **kwargs: Any) -> Any:
        lock = make(*args, **kwargs)
        caller = sys._getframe(1).f_globals.get("__name__", "")
        return CollectingLock(lock, always=False) if caller.startswith("ctxguard") else lock

    return factory


# Every lock ctxguard makes, from import on, can run a collection while held.
threading.Lock = _lock_factory(threading.Lock)  # type: ignore[misc]
threading.RLock = _lock_factory(threading.RLock)  # type: ignore[misc]

from helpers import environ  # noqa: E402  (this script runs from tests/)

import ctxguard  # noqa: E402
from ctxguard import ledger, process, telemetry  # noqa: E402


def build() -> flask.Flask:
    app = flask.Flask("gcfaults")

    @app.route("/")
    def index() -> str:
        return "hello"

    @app.route("/stream")
    def stream() -> Any:
        def chunks() -> Any:
            app.app_context().push()  # never popped: the leak each abandoned body holds
            yield b"a"
            yield b"b"

        return flask.Response(chunks())

    return app


def serve(app: flask.Flask, path: str) -> bytes:
    body = app(environ(path), lambda status, headers, exc_info=None: None)
    try:
        return b"".join(body)
    finally:
        body.close()


def abandon(app: flask.Flask) -> None:
    """Start a streamed response, read one chunk, and drop it in a reference cycle."""
    body = app(environ("/stream"), lambda status, headers, exc_info=None: None)
    assert next(iter(body)) == b"a"
    cycle: list[Any] = [body]
    cycle.append(cycle)


def arm(section: str, providers: dict[str, Any]) -> None:
    """Make the next entry into ``section`` run a collection there."""
    global locks_collect
    if section == "locks":
        locks_collect = True
    elif section == "throttle":
        telemetry.time = CollectingClock(telemetry.time)  # type: ignore[attr-defined]
    elif section == "instruments":
        telemetry._state.lock = CollectingLock(telemetry._state.lock)  # type: ignore[assignment]
        # Providers given again make the instruments be made again, under the lock.
        telemetry._state.meter_key = None
    elif section == "install":
        process._lock = CollectingLock(process._lock)  # type: ignore[assignment]
    elif section == "sdk-aggregation":
        original = aggregation._SumAggregation.collect

        def collecting(self: Any, *args: Any, **kwargs: Any) -> Any:
            with self._lock:
                collect()
            return original(self, *args, **kwargs)

        aggregation._SumAggregation.collect = collecting  # type: ignore[method-assign]
    elif section == "sdk-span":
        providers["tracer_provider"].add_span_processor(CollectingProcessor())
    elif section == "logging":
        logging.getLogger("ctxguard").addHandler(CollectingHandler())
    elif section == "ledger-push":
        real = ledger._monotonic

        def monotonic() -> float:
            collect()
            return real()

        ledger._monotonic = monotonic
    elif section == "ledger-prune":
        real_dead = ledger._is_dead

        def is_dead(record: Any) -> bool:
            collect()
            return real_dead(record)

        ledger._is_dead = is_dead
    elif section == "workers":
        real_new = ledger.Worker.__init__

        def init(self: Any, serial: int) -> None:
            real_new(self, serial)
            collect()

        ledger.Worker.__init__ = init  # type: ignore[method-assign]
    else:
        raise SystemExit(f"unknown section {section}")


def exercise(app: flask.Flask, reader: InMemoryMetricReader) -> None:
    """Go through every ctxguard path once: requests, errors, threads, a collection."""
    global armed
    for _ in range(3):
        armed = True
        assert serve(app, "/") == b"hello"
    for _ in range(ERRORS):
        armed = True
        try:
            _ = flask.request.method
        except RuntimeError:
            pass
    armed = True
    worker = threading.Thread(target=lambda: serve(app, "/"))
    worker.start()
    worker.join()
    armed = True
    reader.get_metrics_data()
    armed = True
    ctxguard.install()


def main() -> None:
    section = sys.argv[1]
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    providers = {
        "tracer_provider": tracer_provider,
        "meter_provider": MeterProvider(metric_readers=[reader]),
    }
    logging.getLogger("ctxguard").addHandler(logging.NullHandler())
    logging.getLogger("ctxguard").propagate = False
    gc.disable()  # only the collections this script forces
    app = build()
    ctxguard.CtxGuard(app, environment="production", heal=False, **providers)
    with ThreadPoolExecutor(1) as pool:
        # The first leak makes the counter's series exist, so collecting it takes the
        # SDK's lock for it.
        pool.submit(abandon, app).result()
        gc.collect()
        for _ in range(ABANDONED - 1):
            pool.submit(abandon, app).result()
        arm(section, providers)
        if section == "instruments":
            ctxguard.install(meter_provider=providers["meter_provider"])
        exercise(app, reader)
        global armed
        armed = False
        gc.collect()  # whatever is left
        serve(app, "/")  # a safe point: anything kept for later is emitted now
    data = reader.get_metrics_data()
    values: dict[str, int] = {}
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name in (telemetry.LEAKS, telemetry.ERRORS):
                    values[metric.name] = sum(p.value for p in metric.data.data_points)
    print(
        json.dumps(
            {
                "section": section,
                "collections": collections,
                "leaks": values.get(telemetry.LEAKS, 0),
                "errors": values.get(telemetry.ERRORS, 0),
                "leak_spans": len(
                    [s for s in exporter.get_finished_spans() if s.name == "ctxguard.context_leak"]
                ),
            }
        )
    )


if __name__ == "__main__":
    main()
