"""gunicorn hooks that give each worker its own OpenTelemetry SDK, exporting over OTLP.

Use as the configuration (``gunicorn -c python:ctxguard.integrations.gunicorn app:app``)
or import the hooks into your own ``gunicorn.conf.py``::

    from ctxguard.integrations.gunicorn import post_worker_init, worker_exit

Needs the SDK and the OTLP/HTTP exporter (``pip install "flask-ctxguard[otlp]"``);
the endpoint, the export intervals and the service name come from the standard
``OTEL_*`` variables. Why these two hooks, and not the master or ``post_fork``:
docs/production.md.
"""

from __future__ import annotations

import os
import socket
from typing import Any


def post_worker_init(worker: Any) -> None:
    """Set the SDK up in this worker, once it is ready (after gevent's patching).

    Every worker process is its own ``service.instance.id`` (host:pid), so its
    series stay apart from its siblings' and a restarted worker starts new ones.
    """
    from opentelemetry import metrics, trace
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # service.name: OTEL_SERVICE_NAME (or OTEL_RESOURCE_ATTRIBUTES), read by the SDK.
    resource = Resource.create({"service.instance.id": f"{socket.gethostname()}:{os.getpid()}"})
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(
        MeterProvider(
            resource=resource,
            metric_readers=[PeriodicExportingMetricReader(OTLPMetricExporter())],
        )
    )


def worker_exit(server: Any, worker: Any) -> None:
    """Export what the worker counted since its last export before it goes
    (``max_requests``, a reload, shutdown), so no event is lost."""
    from opentelemetry import metrics, trace

    for provider in (trace.get_tracer_provider(), metrics.get_meter_provider()):
        shutdown = getattr(provider, "shutdown", None)
        if shutdown is not None:
            shutdown()
