"""Shared fixtures: real OpenTelemetry SDK providers with in-memory readers.

Every test starts with ctxguard uninstalled and no Flask context current, and
ends the same way, so one test's deliberate leak cannot be seen by another.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask
from helpers import reset_contexts
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from werkzeug.serving import make_server

import ctxguard

pytest_plugins = ["pytester"]


class Telemetry:
    """What ctxguard exported during one test."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    @property
    def providers(self) -> dict[str, Any]:
        return {"tracer_provider": self.tracer_provider, "meter_provider": self.meter_provider}

    def spans(self, name: str | None = None) -> list[Any]:
        return [s for s in self.exporter.get_finished_spans() if name is None or s.name == name]

    def points(self, metric: str) -> list[tuple[dict[str, Any], int]]:
        """Data points of one metric as (attributes, value)."""
        data = self.reader.get_metrics_data()
        found = []
        for rm in data.resource_metrics if data else []:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name == metric:
                        found.extend((dict(p.attributes), p.value) for p in m.data.data_points)
        return found

    def value(self, metric: str, attributes: dict[str, Any] | None = None) -> int:
        """Sum of a metric over the points whose attributes include ``attributes``."""
        wanted = attributes or {}
        return sum(
            value
            for attrs, value in self.points(metric)
            if all(attrs.get(k) == v for k, v in wanted.items())
        )


class GlobalTelemetry(Telemetry):
    """The process's global OpenTelemetry providers, as one test sees them.

    What ctxguard emits with no provider of its own (after ``uninstall()``,
    which forgets the providers it was given, or when switched off) goes to
    the global providers. Assertions that nothing was reported then read
    these, so that they can fail. Set once per process (OpenTelemetry allows
    that only once); each test sees only what happened since it started.
    """

    def __init__(self) -> None:
        super().__init__()
        from opentelemetry import metrics, trace

        trace.set_tracer_provider(self.tracer_provider)
        metrics.set_meter_provider(self.meter_provider)
        self._baseline: list[tuple[str, dict[str, Any], int]] = []

    def start(self) -> None:
        self.exporter.clear()
        data = self.reader.get_metrics_data()
        self._baseline = [
            (m.name, dict(p.attributes), p.value)
            for rm in (data.resource_metrics if data else [])
            for sm in rm.scope_metrics
            for m in sm.metrics
            for p in m.data.data_points
        ]

    def points(self, metric: str) -> list[tuple[dict[str, Any], int]]:
        """Data points of one metric since the test started, as (attributes, value)."""
        found = super().points(metric)
        for name, attributes, value in self._baseline:
            if name == metric:
                found.append((attributes, -value))
        return found


_global_telemetry: GlobalTelemetry | None = None


@pytest.fixture
def global_telemetry() -> GlobalTelemetry:
    global _global_telemetry
    if _global_telemetry is None:
        _global_telemetry = GlobalTelemetry()
    _global_telemetry.start()
    return _global_telemetry


def _clear_flask_contexts() -> None:
    """Pop whatever a test left current, without ctxguard's hooks."""
    reset_contexts()


@pytest.fixture(autouse=True)
def clean_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in (
        "CTXGUARD_ENVIRONMENT",
        "CTXGUARD_POLICY",
        "CTXGUARD_HEAL",
        "CTXGUARD_DISABLED",
        "CTXGUARD_PROPAGATE",
    ):
        monkeypatch.delenv(name, raising=False)
    ctxguard.uninstall()
    _clear_flask_contexts()
    yield
    ctxguard.uninstall()
    _clear_flask_contexts()


@pytest.fixture
def telemetry() -> Telemetry:
    return Telemetry()


@pytest.fixture
def caplog_ctxguard(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING, logger="ctxguard")
    return caplog


@pytest.fixture
def serve() -> Iterator[Callable[[Flask], str]]:
    """Werkzeug's threaded development server on 127.0.0.1, on a free port.

    ``serve(app)`` starts one and returns its base URL; every server started
    is shut down when the test ends.
    """
    servers = []

    def start(app: Flask) -> str:
        server = make_server("127.0.0.1", 0, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.server_port}"

    yield start
    for server, thread in servers:
        server.shutdown()
        thread.join(10)
