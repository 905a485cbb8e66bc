"""``ctxguard demo``: watch ctxguard catch real context leaks, in one process.

A small Flask app runs under Werkzeug's threaded server on 127.0.0.1 with the
OpenTelemetry SDK exporting to memory. The demo makes the mistakes users make
(a view that pushes a context and never pops it, a ``stream_with_context``
body abandoned mid-stream and finalised on another thread, an app context
pushed outside any request on a worker, a background thread that reads the
request's ``Authorization`` header, ``current_app`` in a script with no app
context, a worker that pushes an app context and raises before popping it),
then prints what ctxguard recorded.

Every figure printed is read back from the SDK's in-memory span exporter and
metric reader: nothing is assumed. The process exits 1 if a scenario did not
produce what it should. The ``Authorization`` value the client sends appears
nowhere in the output, and the demo checks that it is in no span, metric
point or log line either.
"""

from __future__ import annotations

import gc
import http.client
import logging
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any

from flask import (
    Flask,
    Response,
    current_app,
    g,
    has_app_context,
    request,
    stream_with_context,
)
from flask.ctx import AppContext
from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.test import create_environ

from . import settings, telemetry

SDK_MISSING = (
    "ctxguard demo needs the OpenTelemetry SDK to export in-process.\n"
    'Install it with:  pip install "flask-ctxguard[demo]"'
)

Teardowns = list[tuple[str, str]]
#: What the client sends as its ``Authorization`` header: a stand-in for a
#: real token, which must never reach the output, the spans, the metrics or
#: the log lines.
AUTHORIZATION = "Bearer demo-9f2c47e1b8a3-not-a-real-token"
#: Metric data points: (metric name, sorted attributes) -> value.
Totals = dict[tuple[str, tuple[tuple[str, Any], ...]], int]


# --------------------------------------------------------------------------
# The bundled app, as a user would write it (mistakes included).


@dataclass
class Background:
    """What the app's background work did, as its log would tell it."""

    threads: list[threading.Thread] = field(default_factory=list)
    #: (what failed, the exception it caught). Kept without its traceback, as a
    #: log handler keeps only the text: the frames would keep the dead thread's
    #: ledger alive.
    failures: list[tuple[str, BaseException]] = field(default_factory=list)
    #: Operation logs saved: (operation, order id, user id).
    saved: list[tuple[str, int, int]] = field(default_factory=list)


def current_user_id() -> int:
    """The user behind the request's token (a passport service's helper)."""
    auth_header = request.headers.get("Authorization", "")  # read where there is no request
    return zlib.crc32(auth_header.encode()) % 10_000


def save_operation_log(background: Background, operation: str, order_id: int) -> None:
    """Background work started by a view: it needs the user, so it asks the request."""
    try:
        background.saved.append((operation, order_id, current_user_id()))
    except RuntimeError as exc:  # what such an app finds in its logs
        background.failures.append(("Failed to save the operation log", exc.with_traceback(None)))


def nightly_report() -> str:
    """A script's entry point, run as ``python report.py`` would run it."""
    return str(current_app.config["REPORT_BUCKET"])  # no application context in a script


def process_data(job: dict[str, Any]) -> int:
    return len(job["rows"])  # a malformed job raises KeyError


def process_task(app: Flask, job: dict[str, Any]) -> int:
    """A worker's job: pushes an app context by hand, and a failure skips the pop."""
    app_ctx = app.app_context()
    app_ctx.push()  # popped only when process_data() succeeds
    result = process_data(job)
    app_ctx.pop()
    return result


def worker_loop(app: Flask, jobs: list[dict[str, Any]], background: Background) -> None:
    """A hand-written queue worker: logs a failed job and goes on to the next one."""
    for job in jobs:
        try:
            process_task(app, job)
        except Exception as exc:
            background.failures.append(("job failed", exc.with_traceback(None)))


def create_app() -> tuple[Flask, Teardowns, Background]:
    """A few plain pages, and the context mistakes ctxguard is there to catch."""
    app = Flask(__name__)
    app.config["REPORT_BUCKET"] = "reports"
    teardowns: Teardowns = []  # (g.label, thread name) per teardown_appcontext
    background = Background()

    @app.teardown_appcontext
    def count_teardown(exc: BaseException | None) -> None:
        label = g.get("label", "-") if has_app_context() else "(no app context here)"
        teardowns.append((label, threading.current_thread().name))

    @app.route("/")
    def index() -> str:
        return "hello"

    @app.route("/items/<int:item_id>")
    def item(item_id: int) -> str:
        return f"item {item_id}"

    @app.route("/hits")
    def hits() -> str:
        g.hits = g.get("hits", 0) + 1
        return str(g.hits)

    @app.route("/stream")
    def stream() -> Response:
        def rows() -> Iterator[str]:
            for n in range(3):
                yield f"{request.method} row {n}\n"

        return Response(stream_with_context(rows()))

    @app.route("/report.csv")
    def report() -> Response:
        g.label = "report"

        def rows() -> Iterator[str]:
            for n in range(1000):
                yield f"{n},{request.method}\n"

        return Response(stream_with_context(rows()), mimetype="text/csv")

    @app.route("/after")
    def after() -> str:
        previous = g.get("label", "-")
        g.label = "after"
        return previous

    @app.route("/leaky")
    def leaky_view() -> str:
        app.app_context().push()  # pushed, never popped
        return "done"

    @app.route("/orders/<int:order_id>/export", methods=["POST"])
    def export_orders(order_id: int) -> str:
        user_id = current_user_id()  # fine here: this request is being handled
        log = threading.Thread(
            target=save_operation_log, args=(background, "export", order_id), name="oplog"
        )
        log.start()  # the operation log is saved in the background
        background.threads.append(log)
        return f"export of order {order_id} started for user {user_id}"

    return app, teardowns, background


def boot_worker(app: Flask, booted: list[AppContext]) -> None:
    """What ``app.app_context().push()`` at import time does on a sync worker."""
    ctx = app.app_context()
    ctx.push()  # pushed outside any request
    booted.append(ctx)


# --------------------------------------------------------------------------
# Reading back what ctxguard exported.


class Recorded:
    """The SDK's in-memory exporter and reader that ctxguard's providers feed."""

    def __init__(self) -> None:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
            InMemorySpanExporter,
        )

        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def totals(self) -> Totals:
        """Every ctxguard data point, as exported so far."""
        data = self.reader.get_metrics_data()
        found: Totals = {}
        for rm in data.resource_metrics if data else []:
            for sm in rm.scope_metrics:
                if sm.scope.name != telemetry.SCOPE:
                    continue
                for metric in sm.metrics:
                    for point in metric.data.data_points:
                        attrs = tuple(sorted(dict(point.attributes or {}).items()))
                        found[metric.name, attrs] = int(point.value)
        return found

    def spans(self, name: str) -> list[dict[str, Any]]:
        return [
            dict(span.attributes or {})
            for span in self.exporter.get_finished_spans()
            if span.name == name
        ]

    def leaks(self) -> list[dict[str, Any]]:
        return self.spans(telemetry.SPAN_CONTEXT_LEAK)

    def errors(self) -> list[dict[str, Any]]:
        return self.spans(telemetry.SPAN_CONTEXT_ERROR)

    def texts(self) -> Iterator[str]:
        """Every string exported so far: span names, attributes, events, links, metric points."""
        for span in self.exporter.get_finished_spans():
            yield span.name
            yield from map(str, dict(span.attributes or {}).values())
            for event in span.events:
                yield event.name
                yield from map(str, dict(event.attributes or {}).values())
            for link in span.links:
                yield from map(str, dict(link.attributes or {}).values())
        for (name, attrs), _ in self.totals().items():
            yield name
            yield from (str(v) for _, v in attrs)

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def _sum(totals: Totals, metric: str, **wanted: str) -> int:
    """Sum of ``metric`` over the points whose attributes include ``wanted``.

    Keyword names are the attribute keys without ``ctxguard.`` and with ``_``
    for ``.``: ``leak_site="request_end"``.
    """
    keys = {"ctxguard." + k.replace("_", "."): v for k, v in wanted.items()}
    return sum(
        value
        for (name, attrs), value in totals.items()
        if name == metric and all(dict(attrs).get(k) == v for k, v in keys.items())
    )


def _delta(before: Totals, after: Totals, metric: str, **wanted: str) -> int:
    return _sum(after, metric, **wanted) - _sum(before, metric, **wanted)


# --------------------------------------------------------------------------
# Keeping the output to the summary.


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class Quiet:
    """Route ctxguard's and the server's log lines, and the interpreter's
    "Exception ignored in generator" reports, into counts for the summary.

    They are all expected here (the demo leaks on purpose); the tables say
    the same thing more readably. Everything is put back on exit.
    """

    LOGGERS = ("ctxguard", "werkzeug")

    def __init__(self) -> None:
        self.logs = {name: _Capture() for name in self.LOGGERS}
        self.unraisable = 0
        self._saved: list[tuple[logging.Logger, list[logging.Handler], bool, int]] = []
        self._hook: Any = None

    def __enter__(self) -> Quiet:
        for name, capture in self.logs.items():
            logger = logging.getLogger(name)
            self._saved.append((logger, logger.handlers[:], logger.propagate, logger.level))
            logger.handlers = [capture]
            logger.propagate = False
            logger.setLevel(logging.WARNING)
        self._hook = sys.unraisablehook
        sys.unraisablehook = self._unraisable
        return self

    def __exit__(self, *exc_info: Any) -> None:
        sys.unraisablehook = self._hook
        for logger, handlers, propagate, level in self._saved:
            logger.handlers = handlers
            logger.propagate = propagate
            logger.setLevel(level)

    def _unraisable(self, unraisable: Any) -> None:
        # Count only: holding the exception or object would keep frames alive.
        self.unraisable += 1

    def faults(self) -> list[str]:
        """ctxguard's own internal errors (none expected)."""
        return [r.getMessage() for r in self.logs["ctxguard"].records if "internal error" in r.msg]

    def server_errors(self) -> int:
        return sum(1 for r in self.logs["werkzeug"].records if r.levelno >= logging.ERROR)

    def texts(self) -> Iterator[str]:
        """Every log line captured, formatted as a handler would write it."""
        for capture in self.logs.values():
            for record in capture.records:
                yield record.getMessage()


# --------------------------------------------------------------------------
# Driving requests.


def _handler(finished: threading.Semaphore) -> type[WSGIRequestHandler]:
    class Handler(WSGIRequestHandler):
        """Signals when a connection is done: the body closed and checked."""

        def handle(self) -> None:
            try:
                super().handle()
            finally:
                finished.release()

    return Handler


class Client:
    """urllib against the demo server, waiting until the server is done with each request."""

    def __init__(self, base: str, finished: threading.Semaphore) -> None:
        self.base = base
        self.finished = finished
        # No proxy, whatever the environment says: the server is on 127.0.0.1.
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def get(self, path: str, method: str = "GET", headers: dict[str, str] | None = None) -> str:
        sent = urllib.request.Request(
            self.base + path,
            data=b"" if method == "POST" else None,
            headers=headers or {},
            method=method,
        )
        try:
            with self.opener.open(sent, timeout=10) as response:
                response.read()
                status = str(response.status)
        except urllib.error.HTTPError as exc:
            exc.close()
            status = str(exc.code)
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError):
            status = "connection dropped"
        self.finished.acquire(timeout=10)
        return status


def _ignore_start_response(status: str, headers: Any, exc_info: Any = None) -> None:
    pass


def serve(app: Any, path: str) -> bytes:
    """One request run to the end in-process, as a sync or gthread worker does."""
    body = app(create_environ(path, "http://127.0.0.1/"), _ignore_start_response)
    try:
        return b"".join(body)
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()


def _drop(holder: list[Any]) -> None:
    holder.clear()
    gc.collect()


def abandon_stream(app: Any, path: str) -> bytes:
    """Read one chunk, then let another thread drop the body (flask#6123).

    A server that gives up on a slow client leaves the generator to be
    finalised wherever its last reference goes: here, a different thread.
    """
    body = app(create_environ(path, "http://127.0.0.1/"), _ignore_start_response)
    first = next(iter(body))
    holder = [body]
    del body
    finaliser = threading.Thread(target=_drop, args=(holder,), name="finaliser")
    finaliser.start()
    finaliser.join(10)
    return first


# --------------------------------------------------------------------------
# The scenarios.


@dataclass
class Outcome:
    label: str
    text: str
    ok: bool


def _where(span: dict[str, Any] | None) -> str:
    if span is None or telemetry.CODE_FILE not in span:
        return "(pushed by Flask itself)"
    file = str(span[telemetry.CODE_FILE])
    if "site-packages" in file:
        file = file.rsplit("site-packages", 1)[1].lstrip("/\\")
    else:
        file = file.replace("\\", "/").rsplit("/", 1)[-1]
    function = str(span.get(telemetry.CODE_FUNCTION, "?")).rsplit("<locals>.", 1)[-1]
    return f"{file}:{span.get(telemetry.CODE_LINE, '?')} {function}"


def normal_requests(client: Client, recorded: Recorded) -> Outcome:
    before = recorded.totals()
    paths = ["/", "/items/7", "/hits", "/stream", "/", "/stream"]
    statuses = [client.get(p) for p in paths]
    leaks = _delta(before, recorded.totals(), telemetry.LEAKS)
    ok = leaks == 0 and all(s == "200" for s in statuses)
    return Outcome(
        "normal",
        f"{len(paths)} requests through the server (pages and fully read"
        f" stream_with_context streams), all {'200' if ok else statuses}: {leaks} leaks.",
        ok,
    )


def view_leak(client: Client, recorded: Recorded, quiet: Quiet) -> Outcome:
    before, spans_before = recorded.totals(), len(recorded.leaks())
    errors_before = quiet.server_errors()
    status = client.get("/leaky")
    after = recorded.totals()
    leaks = _delta(before, after, telemetry.LEAKS, leak_site="request_end")
    wrong = _delta(before, after, telemetry.POPS, pop_outcome="wrong_context")
    span = next(
        (
            s
            for s in recorded.leaks()[spans_before:]
            if str(s.get(telemetry.CODE_FUNCTION, "")).endswith("leaky_view")
        ),
        None,
    )
    answered = f"HTTP {status}" if status.isdigit() else status
    logged = quiet.server_errors() - errors_before
    ok = leaks >= 1 and wrong >= 1 and span is not None
    # Up to Flask 3.1 only the view's context stays open; Flask 3.2 refuses to pop the
    # request's own context over it, so that one stays too.
    return Outcome(
        "1 view",
        f"GET /leaky pushed an app context and returned without popping it. Flask's pop"
        f" at the end of the request failed, the view's context being on top (client got"
        f" {answered}, server logged {logged} error); ctxguard counted {_counted(leaks, 'leak')}"
        f" at request_end pushed at {_where(span)} and {wrong} pop with outcome wrong_context.",
        ok,
    )


def _counted(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def abandoned_stream(app: Flask, teardowns: Teardowns, recorded: Recorded, quiet: Quiet) -> Outcome:
    before = recorded.totals()
    unraisable_before = quiet.unraisable
    with ThreadPoolExecutor(1, thread_name_prefix="gthread-worker") as pool:
        pool.submit(abandon_stream, app, "/report.csv").result(timeout=10)
        middle = recorded.totals()
        previous = pool.submit(serve, app, "/after").result(timeout=10).decode()
        worker = pool.submit(lambda: threading.current_thread().name).result(timeout=10)
    after = recorded.totals()
    leaks = _delta(before, middle, telemetry.LEAKS, leak_site="request_end")
    cross = _delta(before, middle, telemetry.POPS, pop_outcome="cross_worker")
    healed = _delta(middle, after, telemetry.HEALED)
    teardown_ran = ("after", worker) in teardowns
    ignored = quiet.unraisable - unraisable_before
    ok = leaks >= 1 and healed >= 1 and teardown_ran and previous == "-"
    return Outcome(
        "2 flask#6123",
        f"on pooled thread {worker}, GET /report.csv read one chunk, then another thread"
        f" dropped the body. Flask's pops failed there ({cross} pops with outcome"
        f' cross_worker; {ignored} "Exception ignored in generator" silenced), so the'
        f" contexts stayed current on {worker}; ctxguard counted {leaks} leaks at"
        f" request_end. At the next request on {worker} it found them stale and healed"
        f" {healed}, so GET /after got a fresh g (previous label {previous!r}) and its"
        f" teardown_appcontext ran: {'yes' if teardown_ran else 'NO'}.",
        ok,
    )


def ambient_context(app: Flask, recorded: Recorded) -> Outcome:
    before = recorded.totals()
    booted: list[AppContext] = []
    # The pool's initializer runs when its thread starts, before any task: the
    # worker's boot, not a task that leaks.
    with ThreadPoolExecutor(
        1, thread_name_prefix="sync-worker", initializer=boot_worker, initargs=(app, booted)
    ) as worker:
        seen = [worker.submit(serve, app, "/hits").result(timeout=10).decode() for _ in range(3)]
        worker.submit(booted[0].pop).result(timeout=10)
    after = recorded.totals()
    reported = _delta(before, after, telemetry.LEAKS, leak_site="request_start")
    healed = _delta(before, after, telemetry.HEALED)
    ok = reported == 1 and healed == 0
    # Up to Flask 3.1 a request reuses the app context it finds (its g counts on);
    # Flask 3.2 pushes its own over it, and the boot context just stays pushed.
    shared = len(set(seen)) > 1
    how = "shared its g" if shared else "each got a g of its own over it"
    return Outcome(
        "3 ambient",
        f"boot_worker() pushed an app context outside any request on a sync worker thread"
        f" (like a push at import time), then {len(seen)} requests ran there and {how}"
        f" (g.hits seen: {', '.join(seen)}); ctxguard reported it {reported} time at"
        f" request_start (once per push site) and healed {healed}: it is not a request's"
        f" to pop.",
        ok,
    )


def _by_function(spans: list[dict[str, Any]], function: str) -> list[dict[str, Any]]:
    return [s for s in spans if str(s.get(telemetry.CODE_FUNCTION, "")).endswith(function)]


def _first_line(exc: BaseException | None) -> str:
    if exc is None:
        return "no exception"
    lines = str(exc).splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _error_text(span: dict[str, Any] | None) -> str:
    """Proxy, user code site, origin route and hint of one ``ctxguard.context_error`` span."""
    if span is None:
        return "no ctxguard.context_error span"
    route = span.get(telemetry.HTTP_ROUTE)
    origin = (
        f"route {route} ({span.get(telemetry.HTTP_METHOD)}, endpoint"
        f" {span.get(telemetry.ORIGIN_ENDPOINT)})"
        if route
        else "route - (no request started this work)"
    )
    return (
        f"proxy {span.get(telemetry.PROXY)}, at {_where(span)}, worker"
        f' {span.get(telemetry.WORKER_KIND)}, {origin}, hint: "{span.get(telemetry.HINT)}"'
    )


def background_thread(
    client: Client, recorded: Recorded, background: Background, path: str = "/orders/7/export"
) -> Outcome:
    """A view starts a thread that reads the request's Authorization header."""
    before, seen = recorded.totals(), len(recorded.errors())
    status = client.get(path, "POST", {"Authorization": AUTHORIZATION})
    for thread in background.threads:
        thread.join(10)
    errors = _delta(before, recorded.totals(), telemetry.ERRORS, proxy=telemetry.PROXY_REQUEST)
    found = _by_function(recorded.errors()[seen:], "current_user_id")
    span = found[0] if found else None
    failure = next(
        (exc for what, exc in background.failures if what.startswith("Failed to save")), None
    )
    ok = (
        status == "200"
        and errors == 1
        and len(found) == 1
        and span is not None
        and span.get(telemetry.HTTP_ROUTE) == "/orders/<int:order_id>/export"
        and span.get(telemetry.WORKER_KIND) == telemetry.WORKER_THREAD
        and bool(span.get(telemetry.HINT))
        and isinstance(failure, RuntimeError)
        and not background.saved
    )
    return Outcome(
        "4 thread",
        f"POST {path} (with an Authorization header) answered HTTP {status} and started"
        f" thread oplog, where save_operation_log() called current_user_id(), which read"
        f' request.headers. The thread logged "Failed to save the operation log:'
        f' {_first_line(failure)}"; ctxguard counted {errors} error, and its span says:'
        f" {_error_text(span)}",
        ok,
    )


def script_without_context(recorded: Recorded) -> Outcome:
    """A script-like function reads ``current_app.config`` with no app context."""
    before, seen = recorded.totals(), len(recorded.errors())
    failure: RuntimeError | None = None
    try:
        nightly_report()
    except RuntimeError as exc:
        failure = exc
    errors = _delta(before, recorded.totals(), telemetry.ERRORS, proxy=telemetry.PROXY_CURRENT_APP)
    found = _by_function(recorded.errors()[seen:], "nightly_report")
    span = found[0] if found else None
    ok = (
        failure is not None
        and errors == 1
        and len(found) == 1
        and span is not None
        and telemetry.HTTP_ROUTE not in span
        and bool(span.get(telemetry.HINT))
    )
    return Outcome(
        "5 script",
        f"nightly_report(), a script's entry point called outside any context (on the"
        f" demo's thread {threading.current_thread().name}), read"
        f' current_app.config["REPORT_BUCKET"] and got "{_first_line(failure)}"; ctxguard'
        f" counted {errors} error, and its span says: {_error_text(span)}",
        ok,
    )


def worker_leak(app: Flask, recorded: Recorded, background: Background) -> Outcome:
    """A worker pushes an app context by hand and raises before popping it."""
    before, seen = recorded.totals(), len(recorded.leaks())
    failed = len(background.failures)
    # A job without "rows" makes process_data() raise between the push and the pop.
    thread = threading.Thread(
        target=worker_loop, args=(app, [{"id": 1}], background), name="queue-worker"
    )
    thread.start()
    thread.join(10)
    with ThreadPoolExecutor(1, thread_name_prefix="task-worker") as pool:
        task_error = pool.submit(process_task, app, {"id": 2}).exception(timeout=10)
        stale = pool.submit(has_app_context).result(timeout=10)
        pool_thread = pool.submit(lambda: threading.current_thread().name).result(timeout=10)
    after = recorded.totals()
    at_exit = _delta(before, after, telemetry.LEAKS, leak_site=telemetry.SITE_THREAD_EXIT)
    at_end = _delta(before, after, telemetry.LEAKS, leak_site=telemetry.SITE_TASK_END)
    spans = _by_function(recorded.leaks()[seen:], "process_task")
    sites = sorted(str(s.get(telemetry.LEAK_SITE)) for s in spans)
    logged = [exc for _, exc in background.failures[failed:]]
    ok = (
        at_exit == 1
        and at_end == 1
        and sites == [telemetry.SITE_TASK_END, telemetry.SITE_THREAD_EXIT]
        and len(logged) == 1
        and isinstance(logged[0], KeyError)
        and isinstance(task_error, KeyError)
    )
    return Outcome(
        "6 worker",
        f"process_task() pushed app.app_context() by hand and process_data() raised"
        f' "{_first_line(task_error)}" before the pop, once on thread queue-worker (its loop'
        f" logged the failed job and went on) and once as a ThreadPoolExecutor task on"
        f" {pool_thread}. ctxguard counted {at_exit} leak at thread_exit and {at_end} leak"
        f" at task_end, both pushed at {_where(spans[0] if spans else None)}. The pooled"
        f" thread kept the context: the next task there still had an application context"
        f" (has_app_context() = {stale}).",
        ok,
    )


def header_privacy(recorded: Recorded, quiet: Quiet) -> Outcome:
    """The Authorization value is in no span, metric point or log line."""
    exported = list(recorded.texts())
    logged = list(quiet.texts())
    found = sum(1 for text in [*exported, *logged] if _SECRET in text)
    return Outcome(
        "privacy",
        f"the Authorization value sent in scenario 4 appears in {found} of the"
        f" {len(exported)} exported strings (span names, attributes, events, metric points)"
        f" and {len(logged)} log lines, and nowhere in this output.",
        found == 0,
    )


#: The token without its scheme: what must not appear anywhere.
_SECRET = AUTHORIZATION.split(" ", 1)[1]


# --------------------------------------------------------------------------
# Printing.


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return [
        "  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]


_METRIC_ORDER = {
    name: i
    for i, name in enumerate(
        [
            telemetry.PUSHES,
            telemetry.POPS,
            telemetry.OPEN,
            telemetry.LEAKS,
            telemetry.HEALED,
            telemetry.ERRORS,
            telemetry.VIOLATIONS,
        ]
    )
}


def metrics_table(totals: Totals) -> list[str]:
    rows = []
    for (name, attrs), value in sorted(
        totals.items(),
        key=lambda item: (_METRIC_ORDER.get(item[0][0], 99), item[0][1]),
    ):
        if value == 0 and name != telemetry.OPEN:
            continue
        shown = " ".join(f"{k.removeprefix('ctxguard.')}={v}" for k, v in attrs)
        rows.append([name, shown, str(value)])
    return _table(rows, ["metric", "attributes", "value"])


def leaks_table(spans: list[dict[str, Any]]) -> list[str]:
    rows = [
        [
            str(s.get(telemetry.CONTEXT_KIND, "?")),
            str(s.get(telemetry.LEAK_SITE, "?")),
            _where(s),
            str(s.get(telemetry.HTTP_ROUTE) or "-"),
            str(s.get(telemetry.THREAD_NAME, "?")),
        ]
        for s in spans
    ]
    return _table(rows, ["kind", "site", "pushed at", "route", "thread"])


def errors_table(spans: list[dict[str, Any]]) -> list[str]:
    rows = [
        [
            str(s.get(telemetry.PROXY, "?")),
            str(s.get(telemetry.WORKER_KIND, "?")),
            _where(s),
            str(s.get(telemetry.HTTP_ROUTE) or "-"),
            str(s.get(telemetry.THREAD_NAME, "?")),
        ]
        for s in spans
    ]
    return _table(rows, ["proxy", "worker", "used at", "route", "thread"])


def _paragraph(label: str, text: str, ok: bool) -> str:
    head = f"  {label + ':':<14}"
    body = text if ok else f"UNEXPECTED: {text}"
    return textwrap.fill(body, width=100, initial_indent=head, subsequent_indent=" " * 16)


# --------------------------------------------------------------------------


def run() -> int:
    """Run the demo; 0 when every scenario showed what it should."""
    started = time.monotonic()
    try:
        recorded = Recorded()
    except ImportError:
        print(SDK_MISSING, file=sys.stderr)
        return 1
    try:
        if settings.disabled():
            print("CTXGUARD_DISABLED is set: ctxguard is off, so there is nothing to show.")
            return 1
    except settings.ConfigError as exc:
        print(f"ctxguard demo: {exc}", file=sys.stderr)
        return 1

    import ctxguard

    app, teardowns, background = create_app()
    ctxguard.CtxGuard(
        app,
        environment="production",
        policy="enforce",
        heal=True,
        tracer_provider=recorded.tracer_provider,
        meter_provider=recorded.meter_provider,
    )
    finished = threading.Semaphore(0)
    with Quiet() as quiet:
        server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=_handler(finished))
        thread = threading.Thread(target=server.serve_forever, name="demo-server", daemon=True)
        thread.start()
        base = f"http://127.0.0.1:{server.server_port}"
        try:
            client = Client(base, finished)
            outcomes = [
                normal_requests(client, recorded),
                view_leak(client, recorded, quiet),
                abandoned_stream(app, teardowns, recorded, quiet),
                ambient_context(app, recorded),
                background_thread(client, recorded, background),
                script_without_context(recorded),
                worker_leak(app, recorded, background),
            ]
        finally:
            server.shutdown()
            server.server_close()
            thread.join(5)
        gc.collect()
        totals = recorded.totals()
        spans = recorded.leaks()
        errors = recorded.errors()
        outcomes.append(header_privacy(recorded, quiet))
        open_left = sum(len(w["contexts"]) for w in ctxguard.snapshot()["workers"])
        ctxguard.uninstall()
        recorded.shutdown()

    lines = [
        f"ctxguard {telemetry.VERSION} demo: Flask {version('flask')} app under Werkzeug"
        f" {version('werkzeug')}'s threaded server at {base}, OpenTelemetry SDK in-process,"
        " environment=production",
        "",
        "Metrics (InMemoryMetricReader):",
        *metrics_table(totals),
        "",
        "Leaks (ctxguard.context_leak spans, InMemorySpanExporter):",
        *leaks_table(spans),
        "",
        "Errors (ctxguard.context_error spans, InMemorySpanExporter):",
        *errors_table(errors),
        "",
        "What happened:",
        *(_paragraph(o.label, o.text, o.ok) for o in outcomes),
    ]
    faults = quiet.faults()
    ok = all(o.ok for o in outcomes) and not faults
    footer = (
        f"ctxguard also logged {len(quiet.logs['ctxguard'].records)} warnings (one per event"
        f" and site per minute; silenced here, the tables carry the same facts);"
        f" {open_left} contexts still open; finished in {time.monotonic() - started:.1f} s."
    )
    lines += ["", textwrap.fill(footer, width=100)]
    if faults:
        lines += ["UNEXPECTED: ctxguard reported internal errors:", *faults]
    text = "\n".join(lines)
    if _SECRET in text:  # never print it, even when something went wrong
        ok = False
        text = text.replace(_SECRET, "<the Authorization value>")
        text += "\nUNEXPECTED: the Authorization value was about to be printed."
    if not ok:
        text += "\nSome results were not as expected (marked UNEXPECTED above)."
    print(text)
    return 0 if ok else 1
