"""OTLP/HTTP on the wire for the tests: a receiver that decodes opentelemetry-proto
messages, and gunicorn serving tests/export's app with the docs' configuration.

Shared by tests/test_export.py and tests/test_prometheus_e2e.py.
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as metrics_service
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as trace_service

HERE = Path(__file__).resolve().parent / "export"


def value_of(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


def attributes_of(key_values: Any) -> dict[str, Any]:
    return {kv.key: value_of(kv.value) for kv in key_values}


@dataclass
class Received:
    """What the receiver decoded: spans with their resource, and metric points."""

    spans: list[tuple[dict[str, Any], Any]] = field(default_factory=list)
    # (instance, metric, attributes as a sorted tuple) -> (start time, last value)
    points: dict[tuple[str, str, tuple[Any, ...]], tuple[int, float]] = field(default_factory=dict)
    # metric -> (Prometheus type, unit), as the messages described it
    types: dict[str, tuple[str, str]] = field(default_factory=dict)
    # instance -> service.name
    jobs: dict[str, str] = field(default_factory=dict)
    content_types: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_traces(self, body: bytes) -> None:
        request = trace_service.ExportTraceServiceRequest.FromString(body)
        with self.lock:
            for resource_spans in request.resource_spans:
                resource = attributes_of(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append((resource, span))

    def add_metrics(self, body: bytes) -> None:
        request = metrics_service.ExportMetricsServiceRequest.FromString(body)
        with self.lock:
            for resource_metrics in request.resource_metrics:
                resource = attributes_of(resource_metrics.resource.attributes)
                instance = resource["service.instance.id"]
                self.jobs[instance] = resource.get("service.name", "")
                for scope_metrics in resource_metrics.scope_metrics:
                    if scope_metrics.scope.name != "ctxguard":
                        continue
                    for metric in scope_metrics.metrics:
                        kind = metric.WhichOneof("data")
                        data = getattr(metric, kind)
                        monotonic = kind == "sum" and data.is_monotonic
                        self.types[metric.name] = (
                            "counter" if monotonic else "gauge",
                            metric.unit,
                        )
                        for point in data.data_points:
                            key = tuple(sorted(attributes_of(point.attributes).items()))
                            value = getattr(point, point.WhichOneof("value"))
                            self.points[instance, metric.name, key] = (
                                point.start_time_unix_nano,
                                value,
                            )

    def exposition(self) -> bytes:
        """The latest points in Prometheus' text format, translated from OTLP as an
        OpenTelemetry Collector's Prometheus exporters translate them: every character
        that is not a letter, digit or underscore becomes ``_``; a monotonic sum is a
        counter named ``<name>_total``; a unit in curly braces is an annotation and adds
        nothing; ``service.name`` is ``job`` and ``service.instance.id`` is ``instance``.
        """
        lines = []
        with self.lock:
            for name in sorted(self.types):
                kind, unit = self.types[name]
                assert unit.startswith("{") or not unit, unit  # ctxguard's are annotations
                exposed = _prometheus_name(name) + ("_total" if kind == "counter" else "")
                lines.append(f"# TYPE {exposed} {kind}")
                for (instance, metric, key), (_, value) in sorted(self.points.items()):
                    if metric != name:
                        continue
                    labels = {"job": self.jobs[instance], "instance": instance}
                    labels.update({_prometheus_name(k): str(v) for k, v in key})
                    text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
                    lines.append(f"{exposed}{{{text}}} {float(value)!r}")
        return ("\n".join(lines) + "\n").encode()

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


def _prometheus_name(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


@contextmanager
def otlp_receiver(
    extra_get: Callable[[str, Received], bytes | None] | None = None,
) -> Iterator[tuple[str, Received]]:
    """An OTLP/HTTP receiver on 127.0.0.1; ``extra_get`` answers GET requests."""
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

        def do_GET(self) -> None:  # a scrape of what was received
            reply = extra_get(self.path, received) if extra_get is not None else None
            if reply is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
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
def gunicorn(
    endpoint: str,
    args: list[str],
    log_path: Path,
    extra_env: dict[str, str] | None = None,
    app_spec: str = "export_app:app",
    *,
    app_dir: Path = HERE,
    config: str | None = "python:ctxguard.integrations.gunicorn",
    workers: int = 2,
    wrapper: tuple[str, ...] = (),
) -> Iterator[int]:
    """gunicorn serving ``app_spec`` from ``app_dir`` (the export app, with the docs'
    configuration and two workers, by default), run by the ``wrapper`` command if one
    is given (``opentelemetry-instrument``); yields its port."""
    bin_dir = os.path.dirname(sys.executable)
    executable = shutil.which("gunicorn", path=bin_dir)
    if executable is None:
        pytest.fail("gunicorn is a test dependency: pip install -e '.[test]'")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    env = dict(os.environ)
    env.update(
        {
            "PATH": os.pathsep.join([bin_dir, env.get("PATH", "")]),
            "OTEL_SERVICE_NAME": "web",
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_METRIC_EXPORT_INTERVAL": "300",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "PYTHONPATH": os.pathsep.join([str(app_dir), env.get("PYTHONPATH", "")]),
            **(extra_env or {}),
        }
    )
    command = [*wrapper, executable]
    if config is not None:
        command += ["--config", config]
    command += ["--workers", str(workers), *args, "--bind", f"fd://{listener.fileno()}"]
    command += ["--graceful-timeout", "10", "--log-level", "warning", app_spec]
    with open(log_path, "wb") as log:
        try:
            process = subprocess.Popen(
                command,
                cwd=app_dir,
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
            stop(process, 30)


def stop(process: subprocess.Popen[Any], timeout: float) -> None:
    """SIGTERM (a graceful stop: gunicorn's workers export what they have left), then
    SIGKILL if it lingers past ``timeout`` seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
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


# What opentelemetry-distro is (a subclass of the SDK's configurator, registered as
# an entry point), written into a directory put on PYTHONPATH: the distro is not on
# every package index, and with no configurator `opentelemetry-instrument` sets up
# no SDK at all.
CONFIGURATOR = "ctxguard_test_configurator"
_CONFIGURATOR_MODULE = """\
from opentelemetry.sdk._configuration import _OTelSDKConfigurator


class Configurator(_OTelSDKConfigurator):
    pass
"""


def instrument_environment(root: Path, app_dir: Path) -> dict[str, str]:
    """The variables for `opentelemetry-instrument` to set up the SDK exporting over
    OTLP/HTTP (to OTEL_EXPORTER_OTLP_ENDPOINT), the configurator written under ``root``."""
    site = root / "configurator"
    info = site / f"{CONFIGURATOR}-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (site / f"{CONFIGURATOR}.py").write_text(_CONFIGURATOR_MODULE)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {CONFIGURATOR}\nVersion: 0\n")
    (info / "entry_points.txt").write_text(
        f"[opentelemetry_configurator]\n{CONFIGURATOR} = {CONFIGURATOR}:Configurator\n"
    )
    return {
        "PYTHONPATH": os.pathsep.join([str(app_dir), str(site), os.environ.get("PYTHONPATH", "")]),
        "OTEL_PYTHON_CONFIGURATOR": CONFIGURATOR,
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_METRICS_EXPORTER": "otlp",
        "OTEL_LOGS_EXPORTER": "none",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
    }
