"""An app with no line of ctxguard or OpenTelemetry in it, for ``opentelemetry-instrument``.

``/spawn`` starts a thread that reads ``request`` after the request that
started it (the classic bug: the thread swallows the error, the client gets
200); ``/leak`` starts a thread that pushes an app context and never pops it;
``/`` does nothing wrong. Each answers with the worker's process id.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from flask import Flask, request

app = Flask(__name__)


def _run(target: Callable[[], None]) -> str:
    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    return str(os.getpid())


def _read_request() -> None:
    try:
        request.method  # noqa: B018 (the bug: request data read in a thread)
    except RuntimeError:
        pass


@app.route("/")
def index() -> str:
    return str(os.getpid())


@app.route("/spawn")
def spawn() -> str:
    return _run(_read_request)


@app.route("/leak")
def leak() -> str:
    return _run(lambda: app.app_context().push())  # the bug: never popped
