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
    ctxguard.integrations.gunicorn sets up in each worker to export over OTLP."""
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


def make_soak() -> Flask:
    """For soak.py: ``/`` clean, ``/fail`` starts a thread that reads ``request``,
    ``/leak`` one that pushes an app context and never pops it; ``/truth`` is the app's
    own count of each (the ground truth ctxguard's counters must equal)."""
    import itertools
    import json
    import threading

    from flask import request

    import ctxguard

    app = make_app()
    counts = {name: itertools.count() for name in ("requests", "failed", "leaked")}

    def read_request() -> None:
        try:
            request.method  # noqa: B018 (the bug)
        except RuntimeError:
            next(counts["failed"])

    def push_and_forget() -> None:
        app.app_context().push()  # the bug: never popped
        next(counts["leaked"])

    def run(target: object) -> str:
        thread = threading.Thread(target=target)  # type: ignore[arg-type]
        thread.start()
        thread.join()
        return "ok"

    @app.before_request
    def count() -> None:
        if request.path != "/truth":
            next(counts["requests"])

    @app.route("/fail")
    def fail() -> str:
        return run(read_request)

    @app.route("/leak")
    def leak() -> str:
        return run(push_and_forget)

    @app.route("/truth")
    def truth() -> str:
        done = {name: int(repr(c)[6:-1]) for name, c in counts.items()}
        return json.dumps({**done, "pid": os.getpid()})

    ctxguard.CtxGuard(app, environment="production", **_providers())
    return app
