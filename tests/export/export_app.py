"""The apps served by tests/test_export.py and tests/test_prometheus_e2e.py.

``create_app()`` serves work that goes wrong, as users have met it:

- ``/spawn``: a thread started by the request reads ``request`` (a context error
  linked to the request's trace);
- ``/leak``: a thread pushes an app context and never pops it (``thread_exit``);
- ``/stream``: a streamed body pushes an app context and never pops it, leaving it
  on the serving thread (``request_end``; the worker's next request heals it);
- ``/hold``: a background thread that lives on pushes an app context and keeps it
  (contexts open keep growing);
- ``/``: nothing wrong.

Each answers with the worker's process id. ``debug=True`` makes a production
deployment with debug mode on (a policy violation found at start-up).
``create_app(clean=True)`` serves only ``/``. Traced by OpenTelemetry's Flask
instrumentation, as a production app would be.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator

from flask import Flask, Response, request
from opentelemetry.instrumentation.flask import FlaskInstrumentor

from ctxguard import CtxGuard


def _run(target: Callable[[], None]) -> str:
    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    return str(os.getpid())


def read_request() -> None:
    try:
        request.method  # noqa: B018 (the bug: request data read in a thread)
    except RuntimeError:
        pass


def create_app(*, clean: bool = False, debug: bool = False) -> Flask:
    app = Flask("export_app")
    app.debug = debug

    @app.route("/")
    def index() -> str:
        return str(os.getpid())

    if not clean:

        def push_and_forget() -> None:
            app.app_context().push()  # the bug: never popped

        def hold() -> None:
            app.app_context().push()  # the bug: a long-lived thread keeps it
            threading.Event().wait()

        @app.route("/spawn")
        def spawn() -> str:
            return _run(read_request)

        @app.route("/leak")
        def leak() -> str:
            return _run(push_and_forget)

        @app.route("/stream")
        def stream() -> Response:
            def body() -> Iterator[bytes]:
                app.app_context().push()  # the bug: never popped, left on this thread
                yield str(os.getpid()).encode()

            return Response(body())

        @app.route("/hold")
        def hold_route() -> str:
            threading.Thread(target=hold, daemon=True).start()
            return str(os.getpid())

    FlaskInstrumentor().instrument_app(app)
    CtxGuard(app, environment="production")
    return app


app = create_app()
