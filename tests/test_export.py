"""ctxguard's telemetry leaves a multi-worker gunicorn over OTLP, as docs/production.md
sets it up, and arrives right: decoded here from the real protobuf messages.

A receiver in the test accepts OTLP/HTTP (``/v1/traces``, ``/v1/metrics``) on
127.0.0.1 and decodes each request with opentelemetry-proto. gunicorn runs
tests/export/export_app.py with two workers and tests/export/gunicorn_conf.py
(the SDK per worker in ``post_fork``, a resource per process, a final export in
``worker_exit``), for each worker class, with and without ``--preload``, and with
workers restarted by ``--max-requests``.
"""

from __future__ import annotations

import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("gunicorn")
trace_service = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2")
metrics_service = pytest.importorskip(
    "opentelemetry.proto.collector.metrics.v1.metrics_service_pb2"
)

HERE = Path(__file__).resolve().parent / "export"
ERRORS = "ctxguard.context.errors"
LEAKS = "ctxguard.context.leaks"
PUSHES = "ctxguard.context.pushes"
ERROR_SPAN = "ctxguard.context_error"
LEAK_SPAN = "ctxguard.context_leak"


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


def _attributes(key_values: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in key_values}


@dataclass
class Received:
    """What the receiver decoded: spans with their resource, and metric points."""

    spans: list[tuple[dict[str, Any], Any]] = field(default_factory=list)
    # (instance, metric, attributes as a sorted tuple) -> (start time, last value)
    points: dict[tuple[str, str, tuple[Any, ...]], tuple[int, float]] = field(default_factory=dict)
    content_types: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_traces(self, body: bytes) -> None:
        request = trace_service.ExportTraceServiceRequest.FromString(body)
        with self.lock:
            for resource_spans in request.resource_spans:
                resource = _attributes(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append((resource, span))

    def add_metrics(self, body: bytes) -> None:
        request = metrics_service.ExportMetricsServiceRequest.FromString(body)
        with self.lock:
            for resource_metrics in request.resource_metrics:
                resource = _attributes(resource_metrics.resource.attributes)
                instance = resource["service.instance.id"]
                for scope_metrics in resource_metrics.scope_metrics:
                    if scope_metrics.scope.name != "ctxguard":
                        continue
                    for metric in scope_metrics.metrics:
                        data = getattr(metric, metric.WhichOneof("data"))
                        for point in data.data_points:
                            key = tuple(sorted(_attributes(point.attributes).items()))
                            value = getattr(point, point.WhichOneof("value"))
                            self.points[instance, metric.name, key] = (
                                point.start_time_unix_nano,
                                value,
                            )

    def total(self, metric: str, **attributes: Any) -> float:
        """The metric summed over every process that ever reported it (last values)."""
        with self.lock:
            return sum(
                value
                for (_, name, key), (_, value) in self.points.items()
                if name == metric and attributes.items() <= dict(key).items()
            )

    def instances(self, metric: str) -> set[str]:
        with self.lock:
            return {instance for instance, name, _ in self.points if name == metric}

    def named(self, name: str) -> list[tuple[dict[str, Any], Any]]:
        with self.lock:
            return [(r, s) for r, s in self.spans if s.name == name]


@contextmanager
def otlp_receiver() -> Iterator[tuple[str, Received]]:
    received = Received()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.content_types.add(self.headers.get("Content-Type", ""))
            if self.path == "/v1/traces":
                received.add_traces(body)
                reply = trace_service.ExportTraceServiceResponse().SerializeToString()
            elif self.path == "/v1/metrics":
                received.add_metrics(body)
                reply = metrics_service.ExportMetricsServiceResponse().SerializeToString()
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def gunicorn(endpoint: str, args: list[str], log_path: Path) -> Iterator[int]:
    """gunicorn serving the export app with two workers; yields its port."""
    executable = shutil.which("gunicorn", path=os.path.dirname(sys.executable))
    if executable is None:
        pytest.fail("gunicorn is a test dependency: pip install -e '.[test]'")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    env = dict(os.environ)
    env.update(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_METRIC_EXPORT_INTERVAL": "300",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "PYTHONPATH": os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]),
        }
    )
    command = [
        executable,
        "--config",
        str(HERE / "gunicorn_conf.py"),
        "--workers",
        "2",
        *args,
        "--bind",
        f"fd://{listener.fileno()}",
        "--graceful-timeout",
        "10",
        "--log-level",
        "warning",
        "export_app:app",
    ]
    with open(log_path, "wb") as log:
        try:
            process = subprocess.Popen(
                command,
                cwd=HERE,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(listener.fileno(),),
            )
        finally:
            listener.close()
        try:
            yield port
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def get(port: int, path: str) -> str:
    deadline = time.monotonic() + 30
    while True:
        try:
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}{path}", headers={"Connection": "close"}
            )
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.read().decode()
        except (ConnectionError, urllib.error.URLError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def wait_for(condition: Any, what: str, log_path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not received within {timeout} s: {what}\n{log_path.read_text()[-3000:]}")
        time.sleep(0.1)


SHAPES = {
    "sync": ["--worker-class", "sync"],
    "gthread": ["--worker-class", "gthread", "--threads", "4"],
    "gthread-preload": ["--worker-class", "gthread", "--threads", "4", "--preload"],
    "gevent": ["--worker-class", "gevent"],
    "gevent-preload": ["--worker-class", "gevent", "--preload"],
    "sync-max-requests": ["--worker-class", "sync", "--max-requests", "7"],
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_workers_telemetry_arrives_over_otlp_true_to_the_ground_truth(shape, tmp_path):
    """From every worker of a real gunicorn, ctxguard's counters arrive over OTLP equal to
    what the app really did (summed over the processes, each told apart by its
    service.instance.id, restarted workers included), and its spans arrive with their
    names and attributes, each error span linking to the trace of the request that
    started the thread."""
    if "gevent" in shape:
        pytest.importorskip("gevent")
    spawned, leaked = 24, 6
    log_path = tmp_path / "gunicorn.log"
    with otlp_receiver() as (endpoint, received):
        with gunicorn(endpoint, SHAPES[shape], log_path) as port:
            pids = set()
            for i in range(spawned):
                pids.add(get(port, "/spawn"))
                if i % 4 == 0:
                    pids.add(get(port, "/leak"))
            wait_for(
                lambda: (
                    received.total(ERRORS) == spawned
                    and received.total(LEAKS) == leaked
                    and len(received.named(ERROR_SPAN)) > 0
                ),
                f"{spawned} errors and {leaked} leaks in the metrics",
                log_path,
            )
            server_spans = {
                span.trace_id: span
                for _, span in received.spans
                if span.name == "GET /spawn" and span.kind == span.SPAN_KIND_SERVER
            }
        # After the server stopped (and each worker's last export): nothing more, nothing less.
        assert received.total(ERRORS) == spawned
        assert (
            received.total(
                ERRORS,
                **{
                    "ctxguard.proxy": "request",
                    "ctxguard.context.kind": "request",
                    "ctxguard.worker.kind": "thread",
                    "http.route": "/spawn",
                },
            )
            == spawned
        )
        assert (
            received.total(
                LEAKS, **{"ctxguard.context.kind": "app", "ctxguard.leak.site": "thread_exit"}
            )
            == leaked
        )
        assert received.content_types == {"application/x-protobuf"}

    # One series set per worker process: every pid that answered is an instance.
    instances = received.instances(PUSHES)
    assert {instance.rsplit(":", 1)[1] for instance in instances} >= pids
    if shape == "sync-max-requests":
        assert len(instances) > 2  # restarted workers reported as processes of their own

    error_spans = received.named(ERROR_SPAN)
    assert error_spans
    for resource, span in error_spans:
        attributes = _attributes(span.attributes)
        assert resource["service.name"] == "web"
        assert attributes["ctxguard.proxy"] == "request"
        assert attributes["ctxguard.worker.kind"] == "thread"
        assert attributes["http.route"] == "/spawn"
        assert attributes["http.request.method"] == "GET"
        assert attributes["code.function.name"] == "read_request"
        assert attributes["code.file.path"].endswith("export_app.py")
        assert "ctxguard.hint" in attributes
        assert span.status.code == span.status.STATUS_CODE_ERROR
        assert [event.name for event in span.events] == ["exception"]
        # The link back to the request that started the thread, as its server span says.
        (link,) = span.links
        assert link.trace_id in server_spans
        assert server_spans[link.trace_id].span_id == link.span_id
    leak_spans = received.named(LEAK_SPAN)
    assert leak_spans
    for _, span in leak_spans:
        attributes = _attributes(span.attributes)
        assert attributes["ctxguard.leak.site"] == "thread_exit"
        assert attributes["code.function.name"] == "push_and_forget"
