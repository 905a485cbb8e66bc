"""Real servers on 127.0.0.1: Werkzeug's threaded server and gunicorn's sync worker."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from flask import Flask, g, stream_with_context
from helpers import MERGED, line_of

import ctxguard

LEAKS = "ctxguard.context.leaks"


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def server_app() -> Flask:
    app = Flask("served")
    app.torn_down = []  # type: ignore[attr-defined]

    @app.teardown_appcontext
    def teardown(exc: BaseException | None) -> None:
        app.torn_down.append(g.get("marker"))  # type: ignore[attr-defined]

    @app.route("/")
    def index() -> str:
        g.marker = "index"
        return "hello"

    @app.route("/leak")
    def leak() -> str:
        app.app_context().push()  # push-site: served
        return "leaked"

    @app.route("/slow-stream")
    def slow_stream() -> Any:
        g.marker = "stream"

        def chunks() -> Iterator[bytes]:
            for _ in range(300):
                yield b"x" * 1024
                time.sleep(0.01)

        return app.response_class(stream_with_context(chunks()))

    return app


def test_werkzeug_threaded_server_reports_a_leaking_view(telemetry, serve):
    """Under a real threaded server, a view that pushes without popping is reported with its
    line and the server thread's name; normal requests around it report nothing."""
    app = server_app()
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    base = serve(app)
    assert get(base + "/") == (200, b"hello")
    status, _ = get(base + "/leak")
    # Flask's complaint about the request's pop reached the server, as without ctxguard (an
    # AssertionError up to 3.1, a RuntimeError on 3.2).
    assert status == 500
    assert get(base + "/") == (200, b"hello")

    # Up to 3.1 the view's app context is left; on 3.2 Flask refuses to pop the request's
    # own context from under it, and that one is left too (with the view's line).
    kinds = ["app", "request"] if MERGED else ["app"]
    assert telemetry.value(LEAKS, {"ctxguard.leak.site": "request_end"}) == len(kinds)
    assert telemetry.value(LEAKS) == len(kinds)
    spans = telemetry.spans("ctxguard.context_leak")
    assert sorted(span.attributes["ctxguard.context.kind"] for span in spans) == kinds
    for span in spans:
        assert span.attributes["code.line.number"] == line_of(__file__, "# push-site: " + "served")
        assert span.attributes["http.route"] == "/leak"
        assert span.attributes["thread.name"] != threading.current_thread().name


def test_client_disconnect_mid_stream_is_not_a_leak(telemetry, serve):
    """A client that hangs up mid-stream: Werkzeug closes the body on its own thread, the
    contexts are popped and torn down, and ctxguard reports nothing."""
    app = server_app()
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    base = serve(app)
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET /slow-stream HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(4096)
    deadline = time.monotonic() + 15
    while "stream" not in app.torn_down and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "stream" in app.torn_down
    assert telemetry.value(LEAKS) == 0


GUNICORN_APP = """
import json
from flask import Flask, g
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
import ctxguard

exporter = InMemorySpanExporter()
tracer_provider = TracerProvider()
tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
reader = InMemoryMetricReader()
app = Flask(__name__)
ctxguard.CtxGuard(
    app,
    environment="production",
    tracer_provider=tracer_provider,
    meter_provider=MeterProvider(metric_readers=[reader]),
)
app.app_context().push()  # import-time push: every request on this worker shares g


@app.route("/")
def index():
    g.hits = g.get("hits", 0) + 1
    return str(g.hits)


@app.route("/_report")
def report():
    spans = [dict(s.attributes) for s in exporter.get_finished_spans()]
    points = []
    for rm in reader.get_metrics_data().resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                points += [[m.name, dict(p.attributes), p.value] for p in m.data.data_points]
    return json.dumps({"spans": spans, "points": points})
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gunicorn_sync_worker_import_time_push(tmp_path):
    """gunicorn's sync worker serves requests on the thread that imported the app: an
    import-time ``app.app_context().push()`` stays under every request (up to Flask 3.1
    every request shares it and its ``g``). ctxguard reports it once, naming the import
    line, and does not heal it."""
    (tmp_path / "served_app.py").write_text(textwrap.dedent(GUNICORN_APP))
    port = _free_port()
    gunicorn = os.path.join(os.path.dirname(sys.executable), "gunicorn")
    process = subprocess.Popen(
        [gunicorn, "-w", "1", "-k", "sync", "-b", f"127.0.0.1:{port}", "served_app:app"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                get(base + "/_report")
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.1)
        hits = [get(base + "/")[1] for _ in range(3)]
        if MERGED:
            # 3.2: each request pushes a context of its own over it, with its own g.
            assert [int(h) for h in hits] == [1, 1, 1]
        else:
            # The bug itself, left in place: g survives across requests.
            assert [int(h) for h in hits] == [1, 2, 3]
        report = json.loads(get(base + "/_report")[1])
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0].decode(errors="replace")

    leaks = [s for s in report["spans"] if s.get("ctxguard.leak.site") == "request_start"]
    assert len(leaks) == 1, output
    assert leaks[0]["code.file.path"].endswith("served_app.py")
    assert leaks[0]["code.line.number"] == line_of(
        str(tmp_path / "served_app.py"), "# import-time push"
    )
    counted = [p for p in report["points"] if p[0] == LEAKS]
    assert sum(p[2] for p in counted) == 1
    assert not [p for p in report["points"] if p[0] == "ctxguard.context.healed"]
