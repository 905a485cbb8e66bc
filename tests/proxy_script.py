"""A script run as ``python proxy_script.py``: its top level reads ``current_app.config``
with no application context, as seed 002's maintenance scripts do.

It installs ctxguard with the SDK's in-memory exporter and prints, as one JSON object,
the message the script got and the attributes of every ``ctxguard.context_error`` span.
"""

from __future__ import annotations

import json

from flask import current_app
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import ctxguard

if __name__ == "__main__":
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    ctxguard.install(tracer_provider=provider)
    message = None
    try:
        config = current_app.config  # touch: script
    except RuntimeError as exc:
        message = str(exc)
    spans = [
        dict(span.attributes)
        for span in exporter.get_finished_spans()
        if span.name == "ctxguard.context_error"
    ]
    print(json.dumps({"message": message, "spans": spans}))
