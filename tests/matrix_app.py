"""The app that test_server_matrix.py serves under every server, bare or guarded.

One module, so that the bare run and the guarded run serve exactly the same
views and the only difference between them is ``CtxGuard(app)`` (default
arguments, production environment), switched on by ``MATRIX_GUARD=1``.

Importing it has no side effect: the test imports it for the body of a
stream it must check (``chunk``). ``create_app()`` (gunicorn's target is
``matrix_app:create_app()``; ``python -m matrix_app werkzeug|bjoern PORT_FILE`` serves
it for the servers gunicorn does not run) sets real OpenTelemetry SDK
providers globally, in-memory, the way a user's set-up would, and
``/_telemetry`` returns what ctxguard exported, as JSON, with what the app
itself saw (no ctxguard needed): the contexts Flask pushed and tore down, by
kind, and how many leaky requests were followed by another request on the same
worker (thread or greenlet). A request to it is
a clean request like any other: if ctxguard reported something when it
started, that report is in the numbers it returns.

Views:

- clean: ``/text``, ``/json/<n>``, ``/swc/<chunks>`` and ``/swc-large/<mib>``
  (``stream_with_context``, reading ``request`` and ``g`` in every chunk, as a
  stream that needs its context does), ``/gen/<chunks>`` and
  ``/gen-large/<mib>`` (plain generators), ``/file`` (``send_file``), a 404,
  ``/handled/<n>`` (an exception turned into a 409 by an error handler);
- leaky: ``/leak/request-end/<n>`` pushes an app context and never pops it
  (Flask's own pop then fails, so the server answers 500 with or without
  ctxguard; up to Flask 3.1 that pop happens anyway and the view's context
  becomes unreachable: one ``request_end`` leak per request; Flask 3.2 refuses
  it, so the view's context and the request's own stay current on that worker:
  two ``request_end`` leaks, stale for the worker's next request),
  ``/leak/thread-exit/<n>``
  starts a thread that pushes an app context and ends without popping it (one
  ``thread_exit`` leak), ``/error/thread-request/<n>`` starts a thread that
  reads ``flask.request`` outside any context (one error, proxy ``request``).
"""

from __future__ import annotations

import contextvars
import itertools
import json
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flask import (
    Flask,
    Response,
    appcontext_pushed,
    current_app,
    g,
    jsonify,
    request,
    send_file,
    stream_with_context,
)
from flask.globals import _cv_app

#: Size of one chunk of a large stream.
CHUNK = 64 * 1024
MIB = 1024 * 1024
_PATTERN = bytes(range(256)) * (CHUNK // 256)

#: The instrumentation scope whose telemetry /_telemetry returns.
SCOPE = "ctxguard"

# Set by create_app(): the in-memory exporter and reader behind the global providers.
_exporter: Any = None
_reader: Any = None
_guarded = False
#: The process that created the app (gunicorn's master under ``--preload``).
_created_pid = 0

# Interleaving seen by the app itself (no ctxguard needed): how many requests
# started on a thread (or greenlet) that had a stream_with_context body open.
_streams_open: dict[int, int] = {}
_interleaved = 0
_lock = threading.Lock()
# Every context Flask pushed (its own ``appcontext_pushed`` signal, no ctxguard), by
# what it holds: up to Flask 3.1 the signal is sent for app contexts only (and on a
# server that interleaves requests on one thread, a request started while a streamed
# body holds an app context reuses that one instead of pushing its own); Flask 3.2
# sends it for every context, a request's own (which holds the request) included.
_app_pushes = 0
_request_pushes = 0
# Flask's ``teardown_appcontext`` calls, by what the context torn down holds.
_teardowns = {"app": 0, "request": 0}

# Which worker serves a request: a thread or a greenlet, told by its own context
# variables (where Flask keeps its contexts, so what one request leaves current is
# met by the next request on the same worker, and by no other).
_worker: contextvars.ContextVar[int] = contextvars.ContextVar("matrix_app_worker")
_workers = itertools.count(1)
# /leak/request-end requests whose worker has not started another request since.
_leaks_pending: dict[int, int] = {}
# /leak/request-end requests whose worker started another request afterwards.
_leaks_followed = 0


def count_push(sender: Any, **kwargs: Any) -> None:
    """Receiver of Flask's ``appcontext_pushed``: the ground truth of context pushes.

    The context just pushed is the current one when Flask sends the signal; only
    Flask 3.2's contexts can hold a request (``has_request``).
    """
    global _app_pushes, _request_pushes
    holds_request = getattr(_cv_app.get(None), "has_request", False)
    with _lock:
        if holds_request:
            _request_pushes += 1
        else:
            _app_pushes += 1


def count_teardown(error: BaseException | None) -> None:
    """``teardown_appcontext`` of the app: the ground truth of contexts torn down.

    Flask runs it before it resets its context variable: the context torn down is
    the current one, except up to Flask 3.1 for the request's app context popped
    under a context the view never popped (it holds no request either way).
    """
    kind = "request" if getattr(_cv_app.get(None), "has_request", False) else "app"
    with _lock:
        _teardowns[kind] += 1


def this_worker() -> int:
    """A number for the worker (thread or greenlet) running this code, the same for
    every request it serves."""
    serial = _worker.get(None)
    if serial is None:
        with _lock:
            serial = next(_workers)
        _worker.set(serial)
    return serial


def chunk(tag: str, index: int) -> bytes:
    """Chunk ``index`` of a large stream tagged ``tag``: 64 KiB, unique per stream and index."""
    head = f"{tag}:{index:06d}:".encode()
    return head + _PATTERN[len(head) :]


def large_body(tag: str, mib: int, trailer: bytes = b"") -> bytes:
    """The whole body a large stream must deliver."""
    return b"".join(chunk(tag, i) for i in range(mib * MIB // CHUNK)) + trailer


def swc_trailer(tag: str, chunks: int) -> bytes:
    """The last line of a stream_with_context body: its g counted every chunk."""
    return f"end {tag} {chunks}\n".encode()


class Refused(Exception):
    """Raised by /handled and turned into a response by the app's error handler."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.n = n


def _enter_stream() -> None:
    ident = threading.get_ident()
    with _lock:
        _streams_open[ident] = _streams_open.get(ident, 0) + 1


def _leave_stream() -> None:
    ident = threading.get_ident()
    with _lock:
        left = _streams_open.get(ident, 0) - 1
        if left > 0:
            _streams_open[ident] = left
        else:
            _streams_open.pop(ident, None)


def push_and_exit(app: Flask, n: int) -> None:
    """Thread body of /leak/thread-exit: push an app context and end without popping it."""
    app.app_context().push()
    g.n = n


def read_request(messages: list[str]) -> None:
    """Thread body of /error/thread-request: read ``request`` with no context."""
    try:
        messages.append(request.method)
    except RuntimeError as error:
        messages.append(str(error).splitlines()[0])


def build_app() -> Flask:
    """The views; no telemetry, no ctxguard."""
    app = Flask("matrix_app")
    data_file = Path(__file__)
    appcontext_pushed.connect(count_push, app)
    app.teardown_appcontext(count_teardown)

    @app.before_request
    def note_interleaving() -> None:
        global _interleaved
        if _streams_open.get(threading.get_ident()):
            with _lock:
                _interleaved += 1

    @app.before_request
    def note_worker() -> None:
        global _leaks_followed
        worker = this_worker()
        with _lock:
            _leaks_followed += _leaks_pending.pop(worker, 0)

    @app.errorhandler(Refused)
    def refused(error: Refused) -> tuple[Response, int]:
        return jsonify(refused=error.n, reason="handled by the app"), 409

    @app.route("/text")
    def text() -> Response:
        return Response("plain text, nothing to see\n", mimetype="text/plain")

    @app.route("/json/<int:n>")
    def as_json(n: int) -> Response:
        return jsonify(n=n, squares=[i * i for i in range(n % 17)], name=current_app.name)

    @app.route("/swc/<int:chunks>")
    def swc(chunks: int) -> Response:
        tag = request.args.get("tag", "")

        def generate() -> Iterator[bytes]:
            _enter_stream()
            try:
                for i in range(chunks):
                    g.chunks = g.get("chunks", 0) + 1
                    yield f"{request.args['tag']} {i} {request.method}\n".encode()
                yield swc_trailer(tag, g.chunks)
            finally:
                _leave_stream()

        return Response(stream_with_context(generate()), mimetype="text/plain")

    @app.route("/swc-large/<int:mib>")
    def swc_large(mib: int) -> Response:
        tag = request.args.get("tag", "")

        def generate() -> Iterator[bytes]:
            _enter_stream()
            try:
                for i in range(mib * MIB // CHUNK):
                    # A stream that needs its context: the request and g, every chunk.
                    g.chunks = g.get("chunks", 0) + 1
                    yield chunk(request.args["tag"], i)
                yield swc_trailer(tag, g.chunks)
            finally:
                _leave_stream()

        return Response(stream_with_context(generate()), mimetype="application/octet-stream")

    @app.route("/gen/<int:chunks>")
    def gen(chunks: int) -> Response:
        tag = request.args.get("tag", "")

        def generate() -> Iterator[bytes]:
            for i in range(chunks):
                yield f"{tag} {i}\n".encode()

        return Response(generate(), mimetype="text/plain")

    @app.route("/gen-large/<int:mib>")
    def gen_large(mib: int) -> Response:
        tag = request.args.get("tag", "")

        def generate() -> Iterator[bytes]:
            for i in range(mib * MIB // CHUNK):
                yield chunk(tag, i)

        return Response(generate(), mimetype="application/octet-stream")

    @app.route("/file")
    def file() -> Response:
        return send_file(data_file, mimetype="text/plain")

    @app.route("/handled/<int:n>")
    def handled(n: int) -> Response:
        raise Refused(n)

    @app.route("/leak/request-end/<int:n>")
    def leak_request_end(n: int) -> str:
        current_app.app_context().push()  # never popped: a request_end leak
        worker = this_worker()
        with _lock:
            _leaks_pending[worker] = _leaks_pending.get(worker, 0) + 1
        return f"pushed {n}\n"

    @app.route("/leak/thread-exit/<int:n>")
    def leak_thread_exit(n: int) -> str:
        thread = threading.Thread(target=push_and_exit, args=(current_app._get_current_object(), n))
        thread.start()
        thread.join()
        return f"thread pushed {n}\n"

    @app.route("/error/thread-request/<int:n>")
    def error_thread_request(n: int) -> str:
        messages: list[str] = []
        thread = threading.Thread(target=read_request, args=(messages,))
        thread.start()
        thread.join()
        return f"{n}: {messages}\n"

    @app.route("/_telemetry")
    def telemetry() -> Response:
        return Response(json.dumps(telemetry_report()), mimetype="application/json")

    return app


def telemetry_report() -> dict[str, Any]:
    """ctxguard's metric points and spans so far, and what the app saw, as JSON data."""
    points = []
    data = _reader.get_metrics_data() if _reader is not None else None
    for resource_metrics in data.resource_metrics if data else []:
        for scope_metrics in resource_metrics.scope_metrics:
            if scope_metrics.scope.name != SCOPE:
                continue
            for metric in scope_metrics.metrics:
                for point in metric.data.data_points:
                    points.append(
                        {
                            "name": metric.name,
                            "attributes": dict(point.attributes),
                            "value": point.value,
                        }
                    )
    spans = [
        {"name": span.name, "attributes": dict(span.attributes)}
        for span in (_exporter.get_finished_spans() if _exporter is not None else ())
        if span.instrumentation_scope is not None and span.instrumentation_scope.name == SCOPE
    ]
    snapshot = where = None
    if _guarded:
        import ctxguard

        snapshot = ctxguard.snapshot()
        where = f"ctxguard {ctxguard.__version__} from {os.path.dirname(ctxguard.__file__)}"
    monkey = sys.modules.get("gevent.monkey")
    return {
        "pid": os.getpid(),
        "created_pid": _created_pid,
        "gevent_patched": bool(monkey and monkey.is_module_patched("threading")),
        "guarded": _guarded,
        "points": points,
        "spans": spans,
        "interleaved": _interleaved,
        "app_pushes": _app_pushes,
        "request_pushes": _request_pushes,
        "teardowns": dict(_teardowns),
        "leaks_followed": _leaks_followed,
        "snapshot": snapshot,
        "ctxguard": where,
    }


def create_app() -> Flask:
    """The app with global in-memory SDK providers, guarded if ``MATRIX_GUARD=1``.

    Called once per server process (under ``--preload``, in gunicorn's master).
    """
    global _exporter, _reader, _guarded, _created_pid
    _created_pid = os.getpid()
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    _exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(_exporter))
    trace.set_tracer_provider(tracer_provider)
    _reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[_reader]))

    app = build_app()
    _guarded = os.environ.get("MATRIX_GUARD") == "1"
    if _guarded:
        from ctxguard import CtxGuard

        CtxGuard(app)
    return app


def serve(kind: str, port_file: str) -> None:
    """Serve on 127.0.0.1, on a port the OS picks, written to ``port_file`` once listening."""
    app = create_app()
    if kind == "werkzeug":
        import logging

        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log
        server = make_server("127.0.0.1", 0, app, threaded=True)
        _announce(port_file, server.server_port)
        server.serve_forever()
    elif kind == "bjoern":
        import bjoern

        sock = bjoern.bind_and_listen("127.0.0.1", 0)
        _announce(port_file, sock.getsockname()[1])
        bjoern.server_run(sock, app)
    else:
        raise SystemExit(f"unknown server {kind!r}")


def _announce(port_file: str, port: int) -> None:
    partial = port_file + ".partial"
    Path(partial).write_text(str(port))
    os.replace(partial, port_file)  # the reader never sees a half-written file


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2])
