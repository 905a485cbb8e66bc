"""The app served by tests/test_export.py: work started by requests that goes wrong.

``/spawn`` starts a thread that reads ``request`` (a context error linked to the
request's trace); ``/leak`` starts one that pushes an app context and never pops
it (a ``thread_exit`` leak). Each answers with the worker's process id. Traced
by OpenTelemetry's Flask instrumentation, as a production app would be.
"""

from __future__ import annotations

import os
import threading

from flask import Flask, request
from opentelemetry.instrumentation.flask import FlaskInstrumentor

from ctxguard import CtxGuard

app = Flask("export_app")


def read_request() -> None:
    try:
        request.method  # noqa: B018 (the bug: request data read in a thread)
    except RuntimeError:
        pass


def push_and_forget() -> None:
    app.app_context().push()  # the bug: never popped


def run(target) -> str:  # type: ignore[no-untyped-def]
    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    return str(os.getpid())


@app.route("/spawn")
def spawn() -> str:
    return run(read_request)


@app.route("/leak")
def leak() -> str:
    return run(push_and_forget)


@app.route("/pid")
def pid() -> str:
    return str(os.getpid())


FlaskInstrumentor().instrument_app(app)
CtxGuard(app, environment="production")
