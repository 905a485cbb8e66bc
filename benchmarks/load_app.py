"""The apps `benchmarks/load.py` serves: the same two-line view, bare and guarded.

Made by factories (``gunicorn 'load_app:make_app()'``), so the bare server's
process never imports ctxguard. ``make_guarded()`` wraps the app with
``CtxGuard`` and the OpenTelemetry SDK's providers (what a production process
has: a request with nothing wrong must not touch them).
"""

from __future__ import annotations

import os

from flask import Flask


def make_app() -> Flask:
    app = Flask(__name__)

    @app.route("/")
    def hello() -> str:
        return "Hello, World!"

    return app


def _providers() -> dict[str, object]:
    """The OpenTelemetry SDK's providers if installed (the API's no-op ones otherwise:
    the hot path is the same). With ``LOAD_EXPORT=1`` none: the global ones, which
    gunicorn_export.py sets up in each worker to export over OTLP."""
    if os.environ.get("LOAD_EXPORT") == "1":
        return {}
    try:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider

    except ImportError:
        return {}
    return {
        "tracer_provider": TracerProvider(),
        "meter_provider": MeterProvider(metric_readers=[InMemoryMetricReader()]),
    }


def make_installed() -> Flask:
    """The bare app with only ctxguard's process hooks (``ctxguard.install()``): what
    the hooks cost without the middleware."""
    import ctxguard

    ctxguard.install(**_providers())
    return make_app()


def make_guarded() -> Flask:
    import ctxguard

    app = make_app()
    ctxguard.CtxGuard(app, environment="production", **_providers())
    return app
