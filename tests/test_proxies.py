"""Flask's proxies used outside their context: the span, the counter, the hint, and the user's
error left exactly as Flask raises it."""

from __future__ import annotations

import asyncio
import code
import copy
import importlib
import json
import logging
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from typing import Any

import flask
import flask.globals
import pytest
from flask import Flask, current_app, request
from flask_sqlalchemy import SQLAlchemy
from helpers import call, line_of, make_app
from opentelemetry.metrics import NoOpMeter, NoOpMeterProvider
from opentelemetry.sdk.trace import SpanProcessor
from sqlalchemy import text
from werkzeug.local import LocalProxy

import ctxguard
import ctxguard.telemetry

HERE = os.path.dirname(os.path.abspath(__file__))
ERRORS = "ctxguard.context.errors"
ERROR_SPAN = "ctxguard.context_error"
NO_APP = flask.globals._no_app_msg
NO_REQUEST = flask.globals._no_req_msg
#: The hint for an app proxy where no app context exists and no request started the work;
#: the other app hints also mention ``with app.app_context():``, so the whole is compared.
NO_APP_CONTEXT_HINT = (
    "No application context is pushed here: run this code inside"
    " `with app.app_context():` (for workers, scripts and CLI tasks)."
)

#: Each proxy, the context it needs, and an attribute to read through it.
CASES = [
    ("request", "request", "method"),
    ("session", "request", "get"),
    ("request_ctx", "request", "request"),
    ("g", "app", "user"),
    ("current_app", "app", "config"),
    ("app_ctx", "app", "app"),
]
NAMES = [name for name, _, _ in CASES]


def proxy(name: str) -> Any:
    return getattr(flask.globals, name)


def unguarded_error(name: str, attr: str) -> RuntimeError:
    """What Flask raises for this proxy when ctxguard is not installed."""
    with pytest.raises(RuntimeError) as info:
        getattr(proxy(name), attr)
    return info.value


def assert_same_error(error: BaseException, expected: BaseException) -> None:
    """The user's error is Flask's: same type, message and (suppressed) chaining."""
    assert type(error) is type(expected) is RuntimeError
    assert str(error) == str(expected)
    assert error.__cause__ is None
    assert error.__suppress_context__ is True
    assert type(error.__context__) is type(expected.__context__)


def one_error(telemetry: Any) -> dict[str, Any]:
    """The attributes of the only context_error span."""
    (span,) = telemetry.spans(ERROR_SPAN)
    return dict(span.attributes)


def marker_line(marker: str) -> int:
    return line_of(__file__, "# touch: " + marker)


def thread_error(target: Any, name: str = "proxy-worker") -> RuntimeError:
    """Run ``target`` in a real thread; the RuntimeError it hit."""
    caught: list[RuntimeError] = []

    def run() -> None:
        try:
            target()
        except RuntimeError as exc:
            caught.append(exc)

    worker = threading.Thread(target=run, name=name)
    worker.start()
    worker.join()
    (error,) = caught
    return error


class Clock:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """Freeze the clock ctxguard's rate limits read (``time`` as seen by ctxguard.telemetry).

    ctxguard offers no public way to set the span interval or the clock, and the promise
    "one span per site per second" cannot be tested without either a clock that does not
    move or a timed assertion; only ctxguard.telemetry's view of ``time`` is replaced.
    """
    frozen = Clock()
    monkeypatch.setattr(ctxguard.telemetry, "time", frozen)
    return frozen


# --------------------------------------------------------------------------
# 1. Each proxy outside its context.


@pytest.mark.parametrize(("name", "kind", "attr"), CASES)
def test_each_proxy_outside_its_context_is_reported_and_raises_flasks_error(
    telemetry, name, kind, attr
):
    """Reading any of the six proxies with no context gives the user Flask's very error (same
    message, no chained cause), and emits one context_error span naming the proxy, its context
    kind, the worker, the user's own line and thread, a hint, and the exception; the counter
    moves by one with the proxy, kind and worker kind."""
    expected = unguarded_error(name, attr)
    ctxguard.install(**telemetry.providers)

    with pytest.raises(RuntimeError) as info:
        getattr(proxy(name), attr)  # touch: each proxy
    assert_same_error(info.value, expected)

    (span,) = telemetry.spans(ERROR_SPAN)
    assert span.kind.name == "INTERNAL"
    assert span.status.status_code.name == "ERROR"
    attrs = dict(span.attributes)
    assert set(attrs) == {
        "ctxguard.proxy",
        "ctxguard.context.kind",
        "ctxguard.worker.kind",
        "code.function.name",
        "code.file.path",
        "code.line.number",
        "thread.id",
        "thread.name",
        "ctxguard.hint",
    }
    assert attrs["ctxguard.proxy"] == name
    assert attrs["ctxguard.context.kind"] == kind
    assert attrs["ctxguard.worker.kind"] == "main"
    assert attrs["code.file.path"] == __file__
    assert attrs["code.line.number"] == marker_line("each proxy")
    assert attrs["code.function.name"] == (
        "test_each_proxy_outside_its_context_is_reported_and_raises_flasks_error"
    )
    assert attrs["thread.id"] == threading.get_ident()
    assert attrs["thread.name"] == threading.current_thread().name
    if kind == "request":
        assert attrs["ctxguard.hint"].startswith("No request is being handled here")
    else:
        assert attrs["ctxguard.hint"] == NO_APP_CONTEXT_HINT

    (event,) = span.events
    assert event.name == "exception"
    assert event.attributes["exception.type"] == "RuntimeError"
    assert event.attributes["exception.message"] == str(expected)
    stack = event.attributes["exception.stacktrace"]
    assert f'File "{__file__}", line {marker_line("each proxy")}' in stack
    assert stack.endswith(f"RuntimeError: {expected}")

    assert telemetry.points(ERRORS) == [
        (
            {
                "ctxguard.proxy": name,
                "ctxguard.context.kind": kind,
                "ctxguard.worker.kind": "main",
            },
            1,
        )
    ]


def test_inside_their_context_the_proxies_return_flasks_objects(telemetry, caplog_ctxguard):
    """With ctxguard installed, each proxy inside a request returns the very object Flask would
    (the request, its session, the contexts, ``g``, the app), and nothing is reported. On this
    Werkzeug the fast guard is used, not the plain wrapper."""
    app = make_app(SECRET_KEY="not-a-secret")
    originals = {
        name: object.__getattribute__(proxy(name), "_get_current_object") for name in NAMES
    }
    ctxguard.install(**telemetry.providers)
    assert all(
        object.__getattribute__(proxy(name), "_get_current_object") is not originals[name]
        for name in NAMES
    ), "the guard is not in place: this test would prove nothing"

    with app.test_request_context("/items/3", method="POST") as ctx:
        expected = {
            "request": ctx.request,
            "session": ctx.session,
            "request_ctx": ctx,
            "g": flask.globals._cv_app.get().g,
            "current_app": app,
            "app_ctx": flask.globals._cv_app.get(),
        }
        for name in NAMES:
            assert proxy(name)._get_current_object() is expected[name], name
            assert originals[name]() is expected[name], name
        assert request.method == "POST"
        assert request.path == "/items/3"
        assert current_app.name == app.name
        flask.g.user = "ada"
        assert flask.g.user == "ada"

    assert telemetry.value(ERRORS) == 0
    assert telemetry.spans() == []
    assert not [r for r in caplog_ctxguard.records if "plain wrapper" in r.getMessage()]


# --------------------------------------------------------------------------
# 2. Werkzeug's fallbacks are not errors.


@pytest.mark.parametrize("name", NAMES)
def test_werkzeugs_fallbacks_outside_context_are_not_reported(telemetry, name):
    """``bool(proxy)``, ``if proxy:``, ``repr``, ``isinstance``, ``__class__``, ``dir()``,
    ``__doc__`` and ``__wrapped__`` answer with Werkzeug's fallback outside context: the user
    gets no error, so nothing is counted or traced. A real error right after is."""
    ctxguard.install(**telemetry.providers)
    p = proxy(name)
    local = flask.globals._cv_request if name in ("request", "session", "request_ctx") else None
    local = local or flask.globals._cv_app

    assert bool(p) is False
    assert ("truthy" if p else "falsy") == "falsy"
    assert repr(p) == "<LocalProxy unbound>"
    assert not isinstance(p, (flask.Request, Flask, dict))
    assert p.__class__ is LocalProxy
    assert dir(p) == []
    assert p.__doc__ == LocalProxy.__doc__
    assert p.__wrapped__ is local

    assert telemetry.value(ERRORS) == 0
    assert telemetry.spans() == []

    with pytest.raises(RuntimeError):
        p._get_current_object()
    assert telemetry.value(ERRORS) == 1
    assert len(telemetry.spans(ERROR_SPAN)) == 1


def test_a_log_line_formatting_repr_of_request_in_a_thread_is_not_an_error(telemetry):
    """A thread that logs ``%r`` of ``request`` gets ``<LocalProxy unbound>`` in its log line
    and no error: nothing is reported."""
    ctxguard.install(**telemetry.providers)
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    log = logging.getLogger("tests.proxies.worker")
    handler = Keep()
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        worker = threading.Thread(target=lambda: log.info("handling %r", request))
        worker.start()
        worker.join()
    finally:
        log.removeHandler(handler)

    assert lines == ["handling <LocalProxy unbound>"]
    assert telemetry.value(ERRORS) == 0
    assert telemetry.spans() == []


# --------------------------------------------------------------------------
# 3. Attribution through libraries.


def test_flask_sqlalchemy_in_a_thread_names_app_ctx_and_the_users_line(telemetry):
    """``db.session.execute`` in a thread started by a view fails deep inside Flask-SQLAlchemy
    and SQLAlchemy, in Flask's ``app_ctx`` proxy: the span names that proxy and the user's own
    line (not a library frame), the thread, the view's route, method and endpoint, and links to
    the span that was active in the view."""
    app = Flask("orders")
    app.config["SQLALCHEMY_DATABASE_URI"] = "sqlite://"
    db = SQLAlchemy(app)
    tracer = telemetry.tracer_provider.get_tracer("orders")
    errors: list[RuntimeError] = []
    view_span: list[Any] = []

    @app.route("/orders/<int:order_id>/export", methods=["POST"])
    def export(order_id: int) -> str:
        def work() -> None:
            db.session.execute(text("select 1"))  # touch: sqlalchemy

        with tracer.start_as_current_span("POST /orders/<int:order_id>/export") as span:
            view_span.append(span.get_span_context())
            errors.append(thread_error(work, name="exporter"))
        return "queued"

    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    status, _, body = call(app, "/orders/7/export", method="POST")
    assert (status, body) == ("200 OK", b"queued")

    (error,) = errors
    assert str(error) == NO_APP
    assert error.__cause__ is None
    attrs = one_error(telemetry)
    assert attrs["ctxguard.proxy"] == "app_ctx"
    assert attrs["ctxguard.context.kind"] == "app"
    assert attrs["ctxguard.worker.kind"] == "thread"
    assert attrs["code.file.path"] == __file__
    assert attrs["code.line.number"] == marker_line("sqlalchemy")
    assert attrs["code.function.name"].endswith("work")
    assert attrs["thread.name"] == "exporter"
    assert attrs["http.route"] == "/orders/<int:order_id>/export"
    assert attrs["http.request.method"] == "POST"
    assert attrs["ctxguard.origin.endpoint"] == "export"
    (span,) = telemetry.spans(ERROR_SPAN)
    (link,) = span.links
    assert link.context.trace_id == view_span[0].trace_id
    assert link.context.span_id == view_span[0].span_id
    assert telemetry.points(ERRORS) == [
        (
            {
                "ctxguard.proxy": "app_ctx",
                "ctxguard.context.kind": "app",
                "ctxguard.worker.kind": "thread",
                "http.route": "/orders/<int:order_id>/export",
            },
            1,
        )
    ]


def test_a_proxy_touched_through_the_standard_library_names_the_users_line(telemetry):
    """``copy.copy(request)`` fails inside the ``copy`` module: the span still names the
    user's line that called it, not the standard library's."""
    ctxguard.install(**telemetry.providers)
    with pytest.raises(RuntimeError) as info:
        copy.copy(request)  # touch: through copy
    assert str(info.value) == NO_REQUEST
    attrs = one_error(telemetry)
    assert attrs["code.file.path"] == __file__
    assert attrs["code.line.number"] == marker_line("through copy")


# --------------------------------------------------------------------------
# 4. Rate limiting.


def test_one_line_failing_ten_thousand_times_makes_one_span_and_an_exact_count(
    telemetry, clock, caplog_ctxguard
):
    """10,000 errors from one line within one second give one span and one log line, and the
    counter says exactly 10,000. Once the interval has passed (the clock ctxguard reads is moved
    forward by ``SPAN_INTERVAL``; see the ``clock`` fixture), the next span from that line says
    how many were dropped in ``ctxguard.suppressed``."""
    ctxguard.install(**telemetry.providers)

    def handler() -> None:
        try:
            _ = request.method  # touch: hot loop
        except RuntimeError:
            pass

    for _ in range(10_000):
        handler()

    (first,) = telemetry.spans(ERROR_SPAN)
    assert "ctxguard.suppressed" not in first.attributes
    assert first.attributes["code.line.number"] == marker_line("hot loop")
    assert telemetry.value(ERRORS) == 10_000
    logged = [r for r in caplog_ctxguard.records if "used outside" in r.getMessage()]
    assert len(logged) == 1

    clock.now += ctxguard.telemetry.SPAN_INTERVAL
    handler()

    first, second = telemetry.spans(ERROR_SPAN)
    assert second.attributes["ctxguard.suppressed"] == 9_999
    assert second.attributes["code.line.number"] == marker_line("hot loop")
    assert telemetry.value(ERRORS) == 10_001


def test_two_lines_each_get_their_own_span(telemetry, clock):
    """The rate limit is per code location: two lines touching the same proxy in the same
    second each get a span; the counter counts every error."""
    ctxguard.install(**telemetry.providers)
    for _ in range(100):
        try:
            _ = request.method  # touch: first line
        except RuntimeError:
            pass
        try:
            _ = request.method  # touch: second line
        except RuntimeError:
            pass

    lines = sorted(s.attributes["code.line.number"] for s in telemetry.spans(ERROR_SPAN))
    assert lines == [marker_line("first line"), marker_line("second line")]
    assert telemetry.value(ERRORS, {"ctxguard.proxy": "request"}) == 200


# --------------------------------------------------------------------------
# 5. Hints.


def test_hint_for_a_thread_started_by_a_request_reading_request(telemetry):
    """A thread started in a view that reads ``request`` is told to take the values as
    arguments or to use ``copy_current_request_context``."""
    app = make_app()
    errors: list[RuntimeError] = []

    @app.route("/audit")
    def audit() -> str:
        errors.append(thread_error(lambda: request.headers.get("Authorization")))
        return "ok"

    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    call(app, "/audit")

    (error,) = errors
    assert str(error) == NO_REQUEST
    attrs = one_error(telemetry)
    assert attrs["ctxguard.proxy"] == "request"
    assert attrs["ctxguard.worker.kind"] == "thread"
    assert attrs["http.route"] == "/audit"
    assert "copy_current_request_context" in attrs["ctxguard.hint"]
    assert "as arguments" in attrs["ctxguard.hint"]


def test_hint_for_current_app_with_no_app_context(telemetry):
    """``current_app`` in a thread that no request started, or in a plain function, is told to
    run inside ``with app.app_context():``."""
    ctxguard.install(**telemetry.providers)

    def job() -> Any:
        return current_app.config["SQLALCHEMY_DATABASE_URI"]  # touch: thread, no origin

    def script_function() -> Any:
        return current_app.config["SQLALCHEMY_DATABASE_URI"]  # touch: plain function

    assert str(thread_error(job)) == NO_APP
    with pytest.raises(RuntimeError, match="Working outside of application context"):
        script_function()

    spans = telemetry.spans(ERROR_SPAN)
    assert [
        (s.attributes["ctxguard.worker.kind"], s.attributes["code.line.number"]) for s in spans
    ] == [("thread", marker_line("thread, no origin")), ("main", marker_line("plain function"))]
    for span in spans:
        assert "http.route" not in span.attributes
        assert span.attributes["ctxguard.hint"] == NO_APP_CONTEXT_HINT


def test_hint_for_a_module_reading_current_app_at_import_time(telemetry):
    """A module whose top level reads ``current_app.config`` is told to move that code into a
    function; the span names the module's line and ``<module>``."""
    ctxguard.install(**telemetry.providers)
    sys.modules.pop("proxy_import_time", None)
    try:
        module = importlib.import_module("proxy_import_time")
    finally:
        sys.modules.pop("proxy_import_time", None)

    assert str(module.error) == NO_APP
    attrs = one_error(telemetry)
    path = os.path.join(HERE, "proxy_import_time.py")
    assert attrs["ctxguard.proxy"] == "current_app"
    assert attrs["code.function.name"] == "<module>"
    assert attrs["code.file.path"] == module.__file__
    assert os.path.samefile(attrs["code.file.path"], path)
    assert attrs["code.line.number"] == line_of(path, "# touch: import time")
    assert "import time" in attrs["ctxguard.hint"]
    assert "move this code into a function" in attrs["ctxguard.hint"]


def test_hint_for_request_inside_an_app_context_without_a_request(telemetry):
    """``request`` inside ``with app.app_context():`` is told there is no request there."""
    app = make_app()
    ctxguard.install(**telemetry.providers)
    with app.app_context(), pytest.raises(RuntimeError) as info:
        _ = request.args  # touch: app context only
    assert str(info.value) == NO_REQUEST
    attrs = one_error(telemetry)
    assert attrs["ctxguard.proxy"] == "request"
    assert attrs["ctxguard.context.kind"] == "request"
    assert attrs["code.line.number"] == marker_line("app context only")
    assert "application context here but no request" in attrs["ctxguard.hint"]


@pytest.mark.parametrize("how", ["file", "-c"])
def test_hint_for_a_script_reading_current_app_at_its_top_level(how):
    """A script run as ``__main__`` (``python script.py``, or its text with ``python -c``) that
    reads ``current_app`` at its top level is not an import: it is told to use
    ``with app.app_context():``, not to move code into a function."""
    script = os.path.join(HERE, "proxy_script.py")
    if how == "file":
        argv, path = [sys.executable, script], script
    else:
        with open(script, encoding="utf-8") as f:
            argv, path = [sys.executable, "-c", f.read()], "<string>"
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["message"] == NO_APP
    (attrs,) = out["spans"]
    assert attrs["ctxguard.proxy"] == "current_app"
    assert attrs["ctxguard.worker.kind"] == "main"
    assert attrs["code.function.name"] == "<module>"
    assert attrs["code.file.path"] == path
    assert attrs["code.line.number"] == line_of(script, "# touch: script")
    assert "used outside an application context" in done.stderr
    assert attrs["ctxguard.hint"] == NO_APP_CONTEXT_HINT


def test_hint_for_request_typed_in_an_interactive_shell(telemetry):
    """``flask shell`` runs each line typed as ``<module>`` code inside an app context: reading
    ``request`` there is told that there is an app context but no request, not that the code
    runs at import time. The user gets Flask's error."""
    app = make_app()
    ctxguard.install(**telemetry.providers)

    shell = code.InteractiveInterpreter({"request": request, "caught": []})
    with app.app_context():
        incomplete = shell.runsource(
            "try:\n    request.args\nexcept RuntimeError as exc:\n    caught.append(exc)\n\n"
        )
    assert incomplete is False
    (error,) = shell.locals["caught"]
    assert str(error) == NO_REQUEST
    attrs = one_error(telemetry)
    assert attrs["ctxguard.proxy"] == "request"
    assert attrs["code.function.name"] == "<module>"
    assert attrs["code.file.path"] == "<input>"
    assert "import time" not in attrs["ctxguard.hint"]
    assert "application context here but no request" in attrs["ctxguard.hint"]


# --------------------------------------------------------------------------
# 6. Worker kinds.


def test_worker_kind_thread(telemetry):
    """An error in a plain thread says worker kind ``thread`` and names the thread."""
    ctxguard.install(**telemetry.providers)
    error = thread_error(lambda: flask.g.get("user"), name="nightly")
    assert str(error) == NO_APP
    attrs = one_error(telemetry)
    assert attrs["ctxguard.worker.kind"] == "thread"
    assert attrs["thread.name"] == "nightly"
    assert attrs["thread.id"] != threading.get_ident()
    assert telemetry.value(ERRORS, {"ctxguard.worker.kind": "thread"}) == 1


def test_worker_kind_executor(telemetry):
    """An error in a ``ThreadPoolExecutor`` task says worker kind ``executor``; the error
    reaches the future unchanged."""
    ctxguard.install(**telemetry.providers)

    def task() -> Any:
        return current_app.name  # touch: executor

    with ThreadPoolExecutor(1, thread_name_prefix="pool") as pool:
        future = pool.submit(task)
        with pytest.raises(RuntimeError) as info:
            future.result()
    assert str(info.value) == NO_APP
    assert info.value.__cause__ is None
    attrs = one_error(telemetry)
    assert attrs["ctxguard.worker.kind"] == "executor"
    assert attrs["code.line.number"] == marker_line("executor")
    assert attrs["thread.name"].startswith("pool")
    assert telemetry.value(ERRORS, {"ctxguard.worker.kind": "executor"}) == 1


def test_worker_kind_cli(telemetry):
    """A Flask CLI command (which runs inside an app context) that reads ``request`` says
    worker kind ``cli``; click sees Flask's own error."""
    app = make_app()

    @app.cli.command("export")
    def export() -> None:
        print(request.args)  # touch: cli

    ctxguard.install(**telemetry.providers)
    result = app.test_cli_runner().invoke(args=["export"])

    assert isinstance(result.exception, RuntimeError)
    assert str(result.exception) == NO_REQUEST
    attrs = one_error(telemetry)
    assert attrs["ctxguard.worker.kind"] == "cli"
    assert attrs["ctxguard.proxy"] == "request"
    assert attrs["code.line.number"] == marker_line("cli")
    assert "application context here but no request" in attrs["ctxguard.hint"]
    assert telemetry.value(ERRORS, {"ctxguard.worker.kind": "cli"}) == 1


def test_worker_kind_task(telemetry):
    """An asyncio task that reads ``current_app`` says worker kind ``task``."""
    ctxguard.install(**telemetry.providers)

    async def refresh() -> Any:
        return current_app.config  # touch: task

    with pytest.raises(RuntimeError) as info:
        asyncio.run(refresh())
    assert str(info.value) == NO_APP
    attrs = one_error(telemetry)
    assert attrs["ctxguard.worker.kind"] == "task"
    assert attrs["code.line.number"] == marker_line("task")
    assert attrs["code.function.name"].endswith("refresh")
    assert telemetry.value(ERRORS, {"ctxguard.worker.kind": "task"}) == 1


# --------------------------------------------------------------------------
# 7. Fail open.


class BrokenOnStart(SpanProcessor):
    def on_start(self, span: Any, parent_context: Any = None) -> None:
        raise ValueError("span processor is broken")


class BrokenCounter:
    def add(self, amount: Any, attributes: Any = None, context: Any = None) -> None:
        raise ValueError("counter is broken")


class BrokenMeter(NoOpMeter):
    def create_counter(self, name: str, unit: str = "", description: str = "") -> Any:
        return BrokenCounter()


class BrokenMeterProvider(NoOpMeterProvider):
    def get_meter(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return BrokenMeter(name)


@pytest.mark.parametrize("broken", ["span processor", "counter"])
def test_a_broken_provider_leaves_the_users_error_alone(telemetry, clock, caplog_ctxguard, broken):
    """When the tracer's span creation or the counter raises, the user still gets Flask's very
    error and nothing else, and ctxguard logs its own fault once; what still works still
    reports (the counter when spans fail, the span when the counter fails)."""
    expected = unguarded_error("request", "method")
    providers = telemetry.providers
    if broken == "span processor":
        telemetry.tracer_provider.add_span_processor(BrokenOnStart())
    else:
        providers = {**providers, "meter_provider": BrokenMeterProvider()}
    ctxguard.install(**providers)

    for _ in range(3):
        with pytest.raises(RuntimeError) as info:
            _ = request.method
        assert_same_error(info.value, expected)

    faults = [r for r in caplog_ctxguard.records if "internal error" in r.getMessage()]
    assert len(faults) == 1
    if broken == "span processor":
        assert "span ctxguard.context_error" in faults[0].getMessage()
        assert telemetry.spans(ERROR_SPAN) == []
        assert telemetry.value(ERRORS) == 3
    else:
        assert "counter ctxguard.context.errors" in faults[0].getMessage()
        assert len(telemetry.spans(ERROR_SPAN)) == 1


# --------------------------------------------------------------------------
# 8. Uninstall.


def test_uninstall_restores_every_proxy_and_stops_reporting(
    telemetry, global_telemetry, caplog_ctxguard
):
    """``uninstall()`` puts back each proxy's own ``_get_current_object`` (the very object), and
    errors after it are Flask's, not reported or logged. (A report after ``uninstall()``
    could only go to the global providers: those are read for it.)"""
    originals = {
        name: object.__getattribute__(proxy(name), "_get_current_object") for name in NAMES
    }
    ctxguard.install(**telemetry.providers)
    for name in NAMES:
        assert object.__getattribute__(proxy(name), "_get_current_object") is not originals[name]
    with pytest.raises(RuntimeError):
        _ = request.method
    assert telemetry.value(ERRORS) == 1
    assert len([r for r in caplog_ctxguard.records if "used outside" in r.getMessage()]) == 1

    ctxguard.uninstall()
    for name in NAMES:
        assert object.__getattribute__(proxy(name), "_get_current_object") is originals[name]
    with pytest.raises(RuntimeError):
        _ = request.method
    with pytest.raises(RuntimeError):
        _ = current_app.config
    assert telemetry.value(ERRORS) == 1
    assert len(telemetry.spans(ERROR_SPAN)) == 1
    assert global_telemetry.value(ERRORS) == 0
    assert global_telemetry.spans() == []
    assert len([r for r in caplog_ctxguard.records if "used outside" in r.getMessage()]) == 1


# --------------------------------------------------------------------------
# 9. Flask 3.2, and proxies that are not built as Werkzeug builds them.


class MergedContext:
    """Flask 3.2's app context: the request lives in it, behind a property."""

    def __init__(self, app: Flask, request: Any = None) -> None:
        self.app = app
        self.g = flask.ctx._AppCtxGlobals()
        self._request = request
        self.raised: list[RuntimeError] = []

    @property
    def request(self) -> Any:
        if self._request is None:
            error = RuntimeError("There is no request in this context.")
            self.raised.append(error)
            raise error
        return self._request

    @property
    def session(self) -> Any:
        if self._request is None:
            raise RuntimeError("There is no request in this context.")
        return {}


@pytest.fixture
def flask32(monkeypatch: pytest.MonkeyPatch) -> tuple[ContextVar[Any], dict[str, Any]]:
    """``flask.globals`` shaped as in Flask 3.2: every proxy over the app's ContextVar."""
    cv: ContextVar[Any] = ContextVar("flask.app_ctx (3.2 shape)")
    proxies = {
        "app_ctx": LocalProxy(cv, unbound_message=NO_APP),
        "current_app": LocalProxy(cv, "app", unbound_message=NO_APP),
        "g": LocalProxy(cv, "g", unbound_message=NO_APP),
        "request_ctx": LocalProxy(cv, unbound_message=NO_REQUEST),
        "request": LocalProxy(cv, "request", unbound_message=NO_REQUEST),
        "session": LocalProxy(cv, "session", unbound_message=NO_REQUEST),
    }
    for name, value in proxies.items():
        monkeypatch.setattr(flask.globals, name, value)
    return cv, proxies


def test_flask_32_request_in_an_app_context_without_request(telemetry, flask32, caplog_ctxguard):
    """With Flask 3.2's shape (the request inside the app context), reading ``request`` in an
    app context that has none fails in the context's property: that is reported as the
    ``request`` proxy, and the property's own error reaches the user unchanged. Werkzeug's
    fallbacks are still not reported, and with a request everything works."""
    cv, p = flask32
    app = make_app()
    ctxguard.install(**telemetry.providers)
    assert not [r for r in caplog_ctxguard.records if "plain wrapper" in r.getMessage()]

    ctx = MergedContext(app)
    token = cv.set(ctx)
    try:
        assert p["current_app"]._get_current_object() is app
        assert bool(p["request"]) is False
        assert telemetry.value(ERRORS) == 0
        with pytest.raises(RuntimeError) as info:
            _ = p["request"].method  # touch: flask 3.2
    finally:
        cv.reset(token)

    assert len(ctx.raised) == 2  # bool() met the property too, and fell back
    assert info.value is ctx.raised[-1]
    assert str(info.value) == "There is no request in this context."
    attrs = one_error(telemetry)
    assert attrs["ctxguard.proxy"] == "request"
    assert attrs["ctxguard.context.kind"] == "request"
    assert attrs["code.line.number"] == marker_line("flask 3.2")
    assert telemetry.value(ERRORS, {"ctxguard.proxy": "request"}) == 1

    # Outside any context: Flask's message, reported.
    with pytest.raises(RuntimeError) as info:
        _ = p["request"].method
    assert str(info.value) == NO_REQUEST
    assert info.value.__cause__ is None
    assert telemetry.value(ERRORS, {"ctxguard.proxy": "request"}) == 2

    # With a request: the request, nothing reported.
    with app.test_request_context("/items/1") as real:
        token = cv.set(MergedContext(app, real.request))
        try:
            assert p["request"]._get_current_object() is real.request
        finally:
            cv.reset(token)
    assert telemetry.value(ERRORS) == 2


def test_a_proxy_not_built_by_werkzeug_is_guarded_by_the_plain_wrapper(
    telemetry, monkeypatch, caplog_ctxguard
):
    """A proxy whose lookup is not Werkzeug's (here ``g`` over a callable) is still guarded:
    its outside-context error is reported and the very same exception object reaches the
    user; other RuntimeErrors pass through unreported; a log line says which guard is used."""
    raised: list[RuntimeError] = []
    other = [False]

    def lookup() -> Any:
        error = RuntimeError("something else went wrong" if other[0] else NO_APP)
        raised.append(error)
        raise error

    custom_g = LocalProxy(lookup)
    monkeypatch.setattr(flask.globals, "g", custom_g)
    ctxguard.install(**telemetry.providers)

    plain = [r.getMessage() for r in caplog_ctxguard.records if "plain wrapper" in r.getMessage()]
    assert len(plain) == 1
    assert "flask.g " in plain[0]

    with pytest.raises(RuntimeError) as info:
        _ = custom_g.user  # touch: plain wrapper
    assert info.value is raised[-1]
    attrs = one_error(telemetry)
    assert attrs["ctxguard.proxy"] == "g"
    assert attrs["ctxguard.context.kind"] == "app"
    assert attrs["code.line.number"] == marker_line("plain wrapper")
    assert telemetry.value(ERRORS, {"ctxguard.proxy": "g"}) == 1

    assert bool(custom_g) is False
    other[0] = True
    with pytest.raises(RuntimeError) as info:
        _ = custom_g.user
    assert info.value is raised[-1]
    assert str(info.value) == "something else went wrong"
    assert telemetry.value(ERRORS) == 1
    assert len(telemetry.spans(ERROR_SPAN)) == 1
