"""Flask's proxies used outside their context: the span, the counter, the hint, and the user's
error left exactly as Flask raises it."""

from __future__ import annotations

import _thread
import asyncio
import code
import copy
import gc
import importlib
import inspect
import json
import logging
import os
import subprocess
import sys
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from typing import Any

import flask
import flask.globals
import pytest
from flask import Flask, current_app, request, session
from flask.sessions import SecureCookieSessionInterface
from flask_sqlalchemy import SQLAlchemy
from helpers import MERGED, call, line_of, make_app
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
#: ``request`` or ``session`` inside an app context that holds no request: up to Flask 3.1
#: no request context is found (Werkzeug's unbound message); Flask 3.2 finds the app
#: context, whose own property raises.
NO_REQUEST_IN_APP_CONTEXT = "There is no request in this context." if MERGED else NO_REQUEST
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
if MERGED:  # Flask 3.2: request_ctx is a deprecated alias of app_ctx, not a proxy of its own
    CASES = [case for case in CASES if case[0] != "request_ctx"]
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


@pytest.mark.parametrize("installed", [False, True], ids=["bare", "guarded"])
def test_a_failing_proxy_access_frees_the_callers_locals_at_once(telemetry, installed):
    """A reported error leaves no reference cycle behind: the function that touched the
    proxy (and caught the error) frees its locals when it returns, as without ctxguard, not
    at some later garbage collection (their finalisers would run late, and every reported
    error would add work for the collector)."""
    if installed:
        ctxguard.install(**telemetry.providers)
    finalised: list[str] = []

    class Resource:
        pass

    def work() -> None:
        resource = Resource()
        weakref.finalize(resource, finalised.append, "freed")
        try:
            request.method  # noqa: B018
        except RuntimeError:
            pass

    gc.collect()
    gc.disable()
    try:
        work()
        assert finalised == ["freed"]
    finally:
        gc.enable()
    if installed:
        assert len(telemetry.spans(ERROR_SPAN)) == 1


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
    local = (
        vars(flask.globals).get("_cv_request")
        if name in ("request", "session", "request_ctx")
        else None
    )
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
    assert str(info.value) == NO_REQUEST_IN_APP_CONTEXT
    attrs = one_error(telemetry)
    assert attrs["ctxguard.proxy"] == "request"
    assert attrs["ctxguard.context.kind"] == "request"
    assert attrs["code.line.number"] == marker_line("app context only")
    assert "application context here but no request" in attrs["ctxguard.hint"]


def test_hint_for_a_request_hidden_by_an_app_context_pushed_in_the_view(telemetry):
    """On Flask 3.2 an app context pushed inside a view hides the request (``request``
    raises "There is no request in this context." there, though the request's own context
    is pushed beneath): the error names the view's line and the request, and the hint says
    the request's context is an app context already. Up to 3.1 the request shows through
    the app context: no error, nothing counted."""
    app = make_app()

    @app.route("/hidden")
    def hidden() -> str:
        with app.app_context():
            try:
                return request.path  # touch: request under the view's app context
            except RuntimeError as error:
                return f"error: {error}"

    ctxguard.CtxGuard(app, **telemetry.providers)
    status, _, body = call(app, "/hidden")
    assert status.startswith("200")
    if not MERGED:
        assert body == b"/hidden"
        assert telemetry.value(ERRORS) == 0
        assert telemetry.spans() == []
        return
    assert body == b"error: There is no request in this context."
    attrs = one_error(telemetry)
    assert attrs["ctxguard.proxy"] == "request"
    assert attrs["ctxguard.context.kind"] == "request"
    assert attrs["ctxguard.worker.kind"] == "request"
    assert attrs["http.route"] == "/hidden"
    assert attrs["code.line.number"] == marker_line("request under the view's app context")
    assert attrs["ctxguard.hint"] == (
        "An app context pushed during the request hides the request's own (Flask 3.2):"
        " the request's context is an app context already, so drop the"
        " `with app.app_context():`, or read `request` before pushing it."
    )


def test_request_and_session_in_an_app_context_without_a_request(telemetry):
    """``request`` and ``session`` used inside ``with app.app_context():`` (no request) give
    the user Flask's own error unchanged (on Flask 3.2 the app context's own "There is no
    request in this context."; up to 3.1 "Working outside of request context"), and each
    is counted once as an error of kind ``request``, with the hint that there is an
    application context here but no request."""
    app = make_app(SECRET_KEY="not-a-secret")

    uses = {
        "request": lambda: request.args,  # touch: request without a request
        "session": lambda: session.get("user"),  # touch: session without a request
    }

    def use(name: str) -> RuntimeError:
        with app.app_context(), pytest.raises(RuntimeError) as info:
            uses[name]()
        return info.value

    expected = {name: use(name) for name in ("request", "session")}  # Flask alone
    ctxguard.install(**telemetry.providers)
    for name in ("request", "session"):
        error = use(name)
        assert type(error) is type(expected[name]) is RuntimeError
        assert str(error) == str(expected[name]) == NO_REQUEST_IN_APP_CONTEXT
        assert error.__cause__ is None
        assert error.__suppress_context__ is expected[name].__suppress_context__

    spans = telemetry.spans(ERROR_SPAN)
    assert [s.attributes["ctxguard.proxy"] for s in spans] == ["request", "session"]
    for span, name in zip(spans, ("request", "session"), strict=True):
        assert span.attributes["ctxguard.context.kind"] == "request"
        assert span.attributes["ctxguard.worker.kind"] == "main"
        assert span.attributes["code.line.number"] == marker_line(f"{name} without a request")
        assert "application context here but no request" in span.attributes["ctxguard.hint"]
        (event,) = span.events
        assert event.attributes["exception.message"] == NO_REQUEST_IN_APP_CONTEXT
    for name in ("request", "session"):
        counted = {
            "ctxguard.proxy": name,
            "ctxguard.context.kind": "request",
            "ctxguard.worker.kind": "main",
        }
        assert telemetry.value(ERRORS, counted) == 1
    assert telemetry.value(ERRORS) == 2


class FailingSessionStore(SecureCookieSessionInterface):
    """An app's session interface whose store is down: ``open_session`` raises a
    ``RuntimeError`` of the app's own."""

    def __init__(self) -> None:
        self.raised: list[RuntimeError] = []

    def open_session(self, app: Flask, request: Any) -> Any:
        error = RuntimeError("session store unavailable")
        self.raised.append(error)
        raise error


def test_a_session_interface_failing_inside_a_request_is_not_a_context_error(telemetry):
    """A ``RuntimeError`` that the app's own session interface raises while opening the
    session of a request is the app's error, not a context error: the app's error handler
    gets it (or Flask's own complaint) unchanged, the response is the handler's, and
    ctxguard counts and traces nothing (the session proxy is reported only where the
    context holds no request)."""
    app = make_app(SECRET_KEY="not-a-secret")
    store = FailingSessionStore()
    app.session_interface = store
    seen: list[BaseException] = []

    @app.errorhandler(500)
    def store_down(error: Any) -> Any:
        try:
            session.get("user")  # touch: failing session store
        except Exception as exc:
            seen.append(exc)
        return "store down", 503

    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    response = app.test_client().get("/")

    assert (response.status_code, response.data) == (503, b"store down")
    (error,) = seen
    if MERGED:
        # Flask 3.2 opens the session again when ``session`` is used after the open
        # at push failed: the store's very error reaches the handler through the proxy,
        # inside the request's context.
        assert error is store.raised[1]
        assert str(error) == "session store unavailable"
    else:
        # Up to 3.1 a failed open is never retried: ``session`` fails in Flask's own
        # way, without asking the store again.
        assert store.raised[1:] == []
        assert error not in store.raised
    assert telemetry.value(ERRORS) == 0
    assert telemetry.spans(ERROR_SPAN) == []


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
    assert str(error) == NO_REQUEST_IN_APP_CONTEXT
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
    assert str(result.exception) == NO_REQUEST_IN_APP_CONTEXT
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
    if MERGED:  # the real Flask 3.2: ``request_ctx`` is only a deprecated alias (it warns)
        del proxies["request_ctx"]
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


# --------------------------------------------------------------------------
# 10. Edges: no Python code below the lookup, deep or installed libraries, what counts as
# introspection, proxies and lookups not built as Werkzeug builds them, reports deferred
# out of the OpenTelemetry SDK, options and providers given later.


def test_a_proxy_read_with_no_python_code_below_it_is_reported_at_an_unknown_place(
    telemetry, clock, caplog_ctxguard, monkeypatch
):
    """A thread that C code starts straight on ``getattr`` or ``len`` (as a C extension's
    callback thread does) uses a proxy with no line of Python below it: the user still gets
    Flask's error, and the error is counted, traced and logged "at an unknown place", rate
    limited per proxy: two such uses of ``request`` within a second make one span and one log
    line, ``g`` its own."""
    errors: list[BaseException] = []
    done = threading.Event()

    def unraisable(info: Any) -> None:  # where a C-started thread's uncaught error goes
        errors.append(info.exc_value)
        done.set()

    monkeypatch.setattr(sys, "unraisablehook", unraisable)
    ctxguard.install(**telemetry.providers)
    for function, args in (
        (getattr, (request, "user")),
        (len, (request,)),
        (getattr, (flask.g, "user")),
    ):
        done.clear()
        _thread.start_new_thread(function, args)
        assert done.wait(60), "the thread did not finish"

    assert [str(error) for error in errors] == [NO_REQUEST, NO_REQUEST, NO_APP]
    spans = telemetry.spans(ERROR_SPAN)
    assert [s.attributes["ctxguard.proxy"] for s in spans] == ["request", "g"]
    for span in spans:
        assert span.attributes["ctxguard.worker.kind"] == "thread"
        assert "code.line.number" not in span.attributes
    assert telemetry.value(ERRORS, {"ctxguard.proxy": "request"}) == 2
    assert telemetry.value(ERRORS, {"ctxguard.proxy": "g"}) == 1
    logged = [r.getMessage() for r in caplog_ctxguard.records if "used outside" in r.getMessage()]
    assert logged == [
        "ctxguard: request used outside a request context at an unknown place (thread worker)."
        " No request is being handled here: pass the values from `request` in as arguments"
        " from the view that has them, or use `app.test_request_context()` in tests.",
        "ctxguard: g used outside an application context at an unknown place (thread worker). "
        + NO_APP_CONTEXT_HINT,
    ]


def installed_library(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``deepserializer``, a module of an installed distribution (in a ``site-packages``
    directory): ``dump(value, depth)`` recurses ``depth`` times, then reads
    ``value.method``."""
    installed = tmp_path / "site-packages"
    installed.mkdir()
    (installed / "deepserializer.py").write_text(
        "def dump(value, depth):\n"
        "    if depth:\n"
        "        return dump(value, depth - 1)\n"
        "    return value.method\n"
    )
    monkeypatch.syspath_prepend(str(installed))
    monkeypatch.setitem(sys.modules, "deepserializer", None)  # forgotten again at the end
    monkeypatch.delitem(sys.modules, "deepserializer")
    return importlib.import_module("deepserializer")


def test_a_proxy_touched_deep_inside_a_library_names_the_users_line(
    telemetry, tmp_path, monkeypatch
):
    """A library that reaches the proxy many calls deep (a recursive serializer walking nested
    data, 30 frames of an installed distribution) still has the span name the user's line
    that called it, not a frame of the library."""
    deepserializer = installed_library(tmp_path, monkeypatch)
    ctxguard.install(**telemetry.providers)

    with pytest.raises(RuntimeError) as info:
        deepserializer.dump(request, 30)  # touch: deep library
    assert str(info.value) == NO_REQUEST
    attrs = one_error(telemetry)
    assert attrs["code.file.path"] == __file__
    assert attrs["code.line.number"] == marker_line("deep library")


def test_a_proxy_used_by_a_library_a_thread_runs_is_reported_at_the_librarys_line(
    telemetry, tmp_path, monkeypatch, caplog_ctxguard
):
    """A thread whose target is a library's function (no line of the user's code on its
    stack) that uses a proxy is reported at the library's line that used it, the first
    frame that is not Flask's, Werkzeug's or ctxguard's, not "at an unknown place"."""
    deepserializer = installed_library(tmp_path, monkeypatch)
    errors: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    ctxguard.install(**telemetry.providers)

    worker = threading.Thread(target=deepserializer.dump, args=(request, 3), name="exporter")
    worker.start()
    worker.join()

    assert [str(error) for error in errors] == [NO_REQUEST]
    attrs = one_error(telemetry)
    assert attrs["code.file.path"] == deepserializer.__file__
    assert attrs["code.line.number"] == 4
    assert attrs["code.function.name"] == "dump"
    (line,) = [r.getMessage() for r in caplog_ctxguard.records if "used outside" in r.getMessage()]
    assert f"at {deepserializer.__file__}:4 in dump (thread worker)" in line


def test_only_dunder_shaped_names_are_introspection(telemetry, caplog_ctxguard):
    """Introspection (a ``__name__``-shaped lookup) is silent: no count, no span, no log
    line. A name that only starts or ends with two underscores, or is made of underscores
    only, is the user's code using the proxy, and is reported."""
    ctxguard.install(**telemetry.providers)
    for name in ("__test__", "__custom_hook__"):
        with pytest.raises(RuntimeError):
            getattr(flask.g, name)
    assert telemetry.value(ERRORS) == 0
    assert telemetry.spans() == []
    assert [r.getMessage() for r in caplog_ctxguard.records if r.name == "ctxguard"] == []

    for name in ("__private", "private__", "____"):
        with pytest.raises(RuntimeError):
            getattr(flask.g, name)  # touch: not dunder
    assert telemetry.value(ERRORS, {"ctxguard.proxy": "g"}) == 3
    assert one_error(telemetry)["code.line.number"] == marker_line("not dunder")


def test_a_lookup_made_in_any_module_of_pytest_is_not_an_error(telemetry):
    """Any lookup made by pytest's own code is a tool's, in whichever of its modules:
    reading marks off an object (``_pytest.mark.structures``) through a proxy is not the
    user's code using it."""
    from _pytest.mark.structures import get_unpacked_marks

    ctxguard.install(**telemetry.providers)
    with pytest.raises(RuntimeError):
        get_unpacked_marks(request)
    assert telemetry.value(ERRORS) == 0
    assert telemetry.spans() == []


def test_flask_32_request_outside_any_context_is_reported_as_before(telemetry, flask32):
    """With Flask 3.2's shape, ``request`` outside any context is reported as with earlier
    Flask: context kind ``request``, its hint, and Flask's error in the span's exception
    event."""
    _, p = flask32
    ctxguard.install(**telemetry.providers)
    with pytest.raises(RuntimeError) as info:
        _ = p["request"].method  # touch: merged shape, no context
    assert str(info.value) == NO_REQUEST

    (span,) = telemetry.spans(ERROR_SPAN)
    assert span.attributes["ctxguard.context.kind"] == "request"
    assert span.attributes["code.line.number"] == marker_line("merged shape, no context")
    assert span.attributes["ctxguard.hint"].startswith("No request is being handled here")
    (event,) = span.events
    assert event.attributes["exception.type"] == "RuntimeError"
    assert event.attributes["exception.message"] == NO_REQUEST
    assert telemetry.points(ERRORS) == [
        (
            {
                "ctxguard.proxy": "request",
                "ctxguard.context.kind": "request",
                "ctxguard.worker.kind": "main",
            },
            1,
        )
    ]


def test_a_streamed_body_error_links_to_the_span_active_at_the_requests_first_traced_push(
    telemetry,
):
    """A request's code that pushes a context before its span starts and again inside it:
    an error in its streamed body (after its context was popped) links to that span, the
    request's trace, not to nothing."""
    app = make_app()
    tracer = telemetry.tracer_provider.get_tracer("reports")
    traced: list[Any] = []

    @app.route("/report")
    def report() -> Any:
        with app.app_context():  # before the span: no trace to link to yet
            pass
        with tracer.start_as_current_span("GET /report") as span:
            traced.append(span.get_span_context())
            with app.app_context():
                pass

        def body() -> Any:
            try:
                yield request.args.get("page", "")  # touch: streamed, traced
            except RuntimeError:
                yield "no request"

        return app.response_class(body())

    ctxguard.CtxGuard(app, **telemetry.providers)
    status, _, data = call(app, "/report")
    assert (status, data) == ("200 OK", b"no request")

    (span,) = telemetry.spans(ERROR_SPAN)
    assert span.attributes["ctxguard.worker.kind"] == "request"
    assert span.attributes["code.line.number"] == marker_line("streamed, traced")
    (link,) = span.links
    assert (link.context.trace_id, link.context.span_id) == (
        traced[0].trace_id,
        traced[0].span_id,
    )


def test_a_localproxy_getattr_not_werkzeugs_is_left_alone_and_said_so(
    telemetry, monkeypatch, caplog_ctxguard
):
    """When another library has replaced ``LocalProxy.__getattr__``, ctxguard leaves that
    replacement in place, says once on its logger that introspection may then be reported,
    and still reports the user's errors."""
    calls: list[str] = []

    def other_librarys_getattr(self: Any, name: str) -> Any:
        calls.append(name)
        return getattr(self._get_current_object(), name)

    monkeypatch.setattr(LocalProxy, "__getattr__", other_librarys_getattr)
    ctxguard.install(**telemetry.providers)
    assert vars(LocalProxy)["__getattr__"] is other_librarys_getattr

    shape = [r.getMessage() for r in caplog_ctxguard.records if "LocalProxy" in r.getMessage()]
    assert shape == [
        "ctxguard: werkzeug.local.LocalProxy.__getattr__ is not Werkzeug 2.3-3.1's;"
        " introspection through a proxy (pytest's collection, inspect) may be reported as a"
        " context error"
    ]
    with pytest.raises(RuntimeError) as info:
        _ = request.method
    assert str(info.value) == NO_REQUEST
    assert calls == ["method"]
    assert telemetry.value(ERRORS, {"ctxguard.proxy": "request"}) == 1
    ctxguard.uninstall()
    assert vars(LocalProxy)["__getattr__"] is other_librarys_getattr


def test_a_localproxy_getattr_with_a_fallback_is_left_alone(
    telemetry, monkeypatch, caplog_ctxguard
):
    """A ``LocalProxy.__getattr__`` that answers outside a context with a fallback (a
    library's lenient proxies) is not Werkzeug's either: ctxguard leaves it in place and says
    so, and a read answered by the fallback is not an error."""
    from werkzeug.local import _ProxyLookup

    lenient = _ProxyLookup(getattr, fallback=lambda self, name: None)
    monkeypatch.setattr(LocalProxy, "__getattr__", lenient)
    ctxguard.install(**telemetry.providers)
    assert vars(LocalProxy)["__getattr__"] is lenient

    shape = [r.getMessage() for r in caplog_ctxguard.records if "LocalProxy" in r.getMessage()]
    assert len(shape) == 1
    assert request.method is None
    assert telemetry.value(ERRORS) == 0
    assert telemetry.spans() == []


def test_a_werkzeug_without_its_proxy_lookup_class_still_gets_guarded_proxies(
    telemetry, monkeypatch, caplog_ctxguard
):
    """On a Werkzeug that no longer has ``_ProxyLookup`` (a future version), installing still
    works: ``LocalProxy.__getattr__`` is left alone with a log line saying so, and the user's
    errors are still reported."""
    import werkzeug.local

    getattr_before = vars(LocalProxy)["__getattr__"]
    monkeypatch.delattr(werkzeug.local, "_ProxyLookup")
    ctxguard.install(**telemetry.providers)
    assert vars(LocalProxy)["__getattr__"] is getattr_before

    shape = [r.getMessage() for r in caplog_ctxguard.records if "LocalProxy" in r.getMessage()]
    assert len(shape) == 1
    assert not [r for r in caplog_ctxguard.records if "internal error" in r.getMessage()]
    with pytest.raises(RuntimeError) as info:
        _ = current_app.config
    assert str(info.value) == NO_APP
    assert telemetry.value(ERRORS, {"ctxguard.proxy": "current_app"}) == 1


def test_a_request_proxy_not_built_by_werkzeug_reports_only_flasks_request_error(
    telemetry, monkeypatch, caplog_ctxguard
):
    """A ``request`` proxy whose lookup is not Werkzeug's is guarded by the plain wrapper,
    which one log line says, with Flask's own request message: Flask's "outside of request
    context" error is reported as ``request``, another RuntimeError from the same lookup (the
    app's own bug) is not."""
    message = [NO_REQUEST]

    def lookup() -> Any:
        raise RuntimeError(message[0])

    custom_request = LocalProxy(lookup)
    monkeypatch.setattr(flask.globals, "request", custom_request)
    with caplog_ctxguard.at_level(logging.WARNING, logger="ctxguard"):
        ctxguard.install(**telemetry.providers)
    assert [r.getMessage() for r in caplog_ctxguard.records] == [
        "ctxguard: flask.request is not built as Werkzeug 2.3-3.1 builds its proxies;"
        " guarding it with a plain wrapper (correct, a little slower)"
    ]

    with pytest.raises(RuntimeError, match="Working outside of request context"):
        _ = custom_request.method
    message[0] = NO_APP  # the right words for another proxy, not for this one
    with pytest.raises(RuntimeError, match="Working outside of application context"):
        _ = custom_request.method
    assert telemetry.points(ERRORS) == [
        (
            {
                "ctxguard.proxy": "request",
                "ctxguard.context.kind": "request",
                "ctxguard.worker.kind": "main",
            },
            1,
        )
    ]


def test_a_proxy_with_its_own_unbound_message_raises_that_message(telemetry, monkeypatch):
    """A proxy made with its own ``unbound_message`` (``LocalProxy(var, unbound_message=...)``
    put in place of one of Flask's) raises that very message outside its context, as it does
    without ctxguard, and the error is reported."""
    tenant: ContextVar[Any] = ContextVar("tenant")
    custom_g = LocalProxy(tenant, "g", unbound_message="No tenant is selected.")
    monkeypatch.setattr(flask.globals, "g", custom_g)
    ctxguard.install(**telemetry.providers)

    with pytest.raises(RuntimeError) as info:
        _ = custom_g.user
    assert str(info.value) == "No tenant is selected."
    assert info.value.__cause__ is None
    assert telemetry.value(ERRORS, {"ctxguard.proxy": "g"}) == 1


def test_the_guarded_lookup_looks_like_werkzeugs_to_tools(telemetry):
    """Tools that look at a proxy's lookup function (a debugger's variables view,
    ``inspect.unwrap``) see Werkzeug's: the same qualified name, and unwrapping it gives
    Werkzeug's own function."""
    originals = {
        name: object.__getattribute__(proxy(name), "_get_current_object") for name in NAMES
    }
    ctxguard.install(**telemetry.providers)
    for name in NAMES:
        guarded = object.__getattribute__(proxy(name), "_get_current_object")
        assert guarded is not originals[name]
        assert guarded.__qualname__ == originals[name].__qualname__
        assert inspect.unwrap(guarded) is originals[name]


def test_a_link_aware_sampler_is_given_only_real_links(telemetry):
    """A sampler that decides by a span's links (as link-aware samplers do) is given only
    real links: none for an error that no request started, the request's span for an error
    in a thread a traced view started."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, Sampler

    class LinkAwareSampler(Sampler):
        def __init__(self) -> None:
            self.seen: list[tuple[str, list[Any]]] = []

        def should_sample(
            self, parent_context: Any, trace_id: int, name: str, *args: Any, **kwargs: Any
        ) -> Any:
            links = kwargs.get("links", args[2] if len(args) > 2 else None)
            self.seen.append((name, [link.context for link in links or ()]))
            return ALWAYS_ON.should_sample(parent_context, trace_id, name, *args, **kwargs)

        def get_description(self) -> str:
            return "link-aware"

    sampler = LinkAwareSampler()
    provider = TracerProvider(sampler=sampler)
    tracer = provider.get_tracer("reports")
    app = make_app()
    traced: list[Any] = []

    @app.route("/export")
    def export() -> str:
        with tracer.start_as_current_span("GET /export") as span:
            traced.append(span.get_span_context())
            thread_error(lambda: request.args)
        return "ok"

    ctxguard.CtxGuard(app, tracer_provider=provider, meter_provider=telemetry.meter_provider)
    with pytest.raises(RuntimeError):
        _ = request.method
    call(app, "/export")

    errors = [links for name, links in sampler.seen if name == ERROR_SPAN]
    assert errors == [[], [traced[0]]]


def test_code_laid_out_over_several_lines_is_reported_where_pythons_traceback_says(telemetry):
    """A failing call or attribute chain spread over several lines (as code formatters lay
    them out) is reported at the line Python's own traceback shows for the user's frame, not
    at a neighbouring line nor the function's first line."""
    import traceback

    ctxguard.install(**telemetry.providers)
    expected = []
    with pytest.raises(RuntimeError) as info:
        copy.copy(  # touch: multi-line call
            request
        )
    expected.append(info)
    with pytest.raises(RuntimeError) as info:
        # fmt: off
        _ = (
            request
            .method  # touch: chained attribute
        )
        # fmt: on
    expected.append(info)

    lines = []
    for info in expected:
        tb = traceback.extract_tb(info.value.__traceback__)
        (own,) = [f for f in tb if f.filename == __file__]
        lines.append(own.lineno)
    assert lines == [marker_line("multi-line call"), marker_line("chained attribute")]
    reported = [s.attributes["code.line.number"] for s in telemetry.spans(ERROR_SPAN)]
    assert reported == lines


def test_a_library_using_a_proxy_when_imported_names_the_users_import_line(
    telemetry, tmp_path, monkeypatch
):
    """An installed extension whose module body reads ``current_app`` is reported at the
    user's line that imported it, looking through the import machinery's own frames."""
    installed = tmp_path / "site-packages"
    installed.mkdir()
    (installed / "configext.py").write_text(
        "from flask import current_app\n\n"
        "try:\n"
        "    DEBUG = current_app.config['DEBUG']\n"
        "except RuntimeError as exc:\n"
        "    error = exc\n"
    )
    monkeypatch.syspath_prepend(str(installed))
    monkeypatch.setitem(sys.modules, "configext", None)  # forgotten again at the end
    monkeypatch.delitem(sys.modules, "configext")
    ctxguard.install(**telemetry.providers)

    import configext  # type: ignore[import-not-found]  # touch: import an extension

    assert str(configext.error) == NO_APP
    attrs = one_error(telemetry)
    assert attrs["code.file.path"] == __file__
    assert attrs["code.line.number"] == marker_line("import an extension")


def test_flask_and_werkzeug_frames_are_never_the_users_line(telemetry):
    """Flask's and Werkzeug's own frames are never the user's line, even when
    ``in_app_include`` names them (or they are installed from a checkout, outside
    ``site-packages``): ``url_for`` outside a context names the user's line."""
    ctxguard.install(in_app_include=["flask", "werkzeug"], **telemetry.providers)
    with pytest.raises(RuntimeError) as info:
        flask.url_for("index")  # touch: url_for
    assert str(info.value) == NO_APP
    attrs = one_error(telemetry)
    assert attrs["code.file.path"] == __file__
    assert attrs["code.line.number"] == marker_line("url_for")


def test_an_app_factory_run_by_gunicorn_is_reported_at_the_factorys_line(
    telemetry, tmp_path, monkeypatch
):
    """``gunicorn 'shopfactory:create_app()'`` with the app's package installed into
    ``site-packages`` (a container image), whose factory reads ``current_app`` before any
    app context: gunicorn's frames end the search for the user's line, so the error is
    reported at the factory's own line, never at a line below the server."""
    import_app = pytest.importorskip("gunicorn.util").import_app  # POSIX only
    installed = tmp_path / "site-packages"
    (installed / "shopfactory").mkdir(parents=True)
    factory = installed / "shopfactory" / "__init__.py"
    factory.write_text(
        "from flask import Flask, current_app\n\n\n"
        "def create_app():\n"
        "    app = Flask(__name__)\n"
        "    try:\n"
        "        app.config['BASE'] = current_app.config['BASE']\n"
        "    except RuntimeError as exc:\n"
        "        app.config['ERROR'] = exc\n"
        "    return app\n"
    )
    monkeypatch.syspath_prepend(str(installed))
    monkeypatch.setitem(sys.modules, "shopfactory", None)  # forgotten again at the end
    monkeypatch.delitem(sys.modules, "shopfactory")
    ctxguard.install(**telemetry.providers)

    app = import_app("shopfactory:create_app()")

    assert str(app.config["ERROR"]) == NO_APP
    attrs = one_error(telemetry)
    assert attrs["code.file.path"] == str(factory)
    assert attrs["code.line.number"] == 7
    assert attrs["code.function.name"] == "create_app"


def test_a_context_entered_by_a_thread_target_is_never_placed_in_flasks_context_code(telemetry):
    """A thread started straight on a context's ``__enter__`` (no line of the user's code
    on its stack) leaks it: the leak is placed at the first frame outside Flask's context
    machinery (the thread's own ``run``), never inside ``flask/ctx.py``."""
    import flask.ctx

    app = make_app()
    ctxguard.install(**telemetry.providers)
    worker = threading.Thread(target=app.app_context().__enter__)
    worker.start()
    worker.join()

    (span,) = telemetry.spans("ctxguard.context_leak")
    assert span.attributes["ctxguard.leak.site"] == "thread_exit"
    assert span.attributes["code.file.path"] != flask.ctx.__file__
    assert span.attributes["code.file.path"] == threading.__file__
    assert span.attributes["code.function.name"].endswith("run")


def write_installed(tmp_path: Any, monkeypatch: pytest.MonkeyPatch, name: str) -> Any:
    """Package ``name`` in a ``site-packages`` directory on ``sys.path``: ``token()`` reads
    ``request.headers`` on line 5 of its ``__init__.py``."""
    package = tmp_path / "site-packages" / name
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "from flask import request\n\n\ndef token():\n    return request.headers.get('X-Token')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site-packages"))
    monkeypatch.setitem(sys.modules, name, None)  # forgotten again at the end
    monkeypatch.delitem(sys.modules, name)
    return importlib.import_module(name)


def error_lines(telemetry: Any, clock: Clock, call_token: Any) -> tuple[str, int]:
    """Where one more error from ``call_token()`` is reported (file, line); the clock is
    moved on first, so that a span from the same line is not held back by the rate limit."""
    clock.now += ctxguard.telemetry.SPAN_INTERVAL
    telemetry.exporter.clear()
    with pytest.raises(RuntimeError):
        call_token()  # touch: token
    attrs = one_error(telemetry)
    return attrs["code.file.path"], attrs["code.line.number"]


def test_in_app_include_given_later_takes_effect_at_once(telemetry, clock, tmp_path, monkeypatch):
    """``in_app_include`` passed to a later ``install()`` makes that module the user's from
    then on, even after its lines were already seen as a library's."""
    tokens = write_installed(tmp_path, monkeypatch, "laterext")
    ctxguard.install(**telemetry.providers)
    assert error_lines(telemetry, clock, tokens.token) == (__file__, marker_line("token"))
    ctxguard.install(in_app_include=["laterext"])
    assert error_lines(telemetry, clock, tokens.token) == (tokens.__file__, 5)


@pytest.mark.parametrize("known_by", ["package", "root path"])
def test_an_app_registered_later_makes_its_installed_code_the_users_at_once(
    telemetry, clock, tmp_path, monkeypatch, known_by
):
    """``CtxGuard(app)`` for an app whose code is installed (known by its package, or by its
    root path) makes that code the user's from then on, even after its lines were already
    seen as a library's. The other distributions installed beside it stay libraries."""
    tokens = write_installed(tmp_path, monkeypatch, "laterapp")
    neighbour = write_installed(tmp_path, monkeypatch, "neighbourlib")
    ctxguard.install(**telemetry.providers)
    assert error_lines(telemetry, clock, tokens.token) == (__file__, marker_line("token"))
    if known_by == "package":  # its root path is site-packages itself: not the app's own
        app = Flask("laterapp", root_path=str(tmp_path / "site-packages"))
    else:
        app = Flask("__main__", root_path=str(tmp_path / "site-packages" / "laterapp"))
    ctxguard.CtxGuard(app, **telemetry.providers)
    assert error_lines(telemetry, clock, tokens.token) == (tokens.__file__, 5)
    assert error_lines(telemetry, clock, neighbour.token) == (__file__, marker_line("token"))


def test_an_error_in_the_apps_own_span_processor_is_reported_once_it_is_safe(
    telemetry, caplog_ctxguard
):
    """The app's own span processor that reads ``request`` while the OpenTelemetry SDK ends
    a background job's span gets Flask's error. ctxguard does not emit from inside the SDK
    (which may hold its locks there): the error is counted, traced and logged at the next
    safe point, here the end of the job's thread, at the processor's line."""
    errors: list[RuntimeError] = []

    class AuditProcessor(SpanProcessor):
        def on_end(self, span: Any) -> None:
            try:
                _ = request.path  # touch: span processor
            except RuntimeError as exc:
                errors.append(exc)

    telemetry.tracer_provider.add_span_processor(AuditProcessor())
    ctxguard.install(**telemetry.providers)
    tracer = telemetry.tracer_provider.get_tracer("jobs")
    while_running: list[list[Any]] = []

    def job() -> None:
        with tracer.start_as_current_span("nightly job"):
            pass
        while_running.append(telemetry.spans(ERROR_SPAN))

    worker = threading.Thread(target=job, name="nightly")
    worker.start()
    worker.join()

    # (the processor meets the same error again while ctxguard's own span ends: not counted)
    assert errors and {str(error) for error in errors} == {NO_REQUEST}
    assert while_running == [[]]
    attrs = one_error(telemetry)
    assert attrs["code.line.number"] == marker_line("span processor")
    assert attrs["thread.name"] == "nightly"
    assert telemetry.value(ERRORS, {"ctxguard.worker.kind": "thread"}) == 1
    logged = [r.getMessage() for r in caplog_ctxguard.records if "used outside" in r.getMessage()]
    assert len(logged) == 1
    assert f"{__file__}:{marker_line('span processor')} in " in logged[0]


def test_providers_given_to_a_later_install_are_used_from_then_on(telemetry):
    """``install()`` again with other providers (a second app's ``CtxGuard(app, ...)``)
    sends what happens from then on to those providers, and nothing more to the first."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    later = {"tracer_provider": tracer_provider, "meter_provider": MeterProvider([reader])}

    ctxguard.install(**telemetry.providers)
    with pytest.raises(RuntimeError):
        _ = request.method
    ctxguard.install(**later)
    with pytest.raises(RuntimeError):
        _ = current_app.config

    assert [s.attributes["ctxguard.proxy"] for s in telemetry.spans(ERROR_SPAN)] == ["request"]
    assert telemetry.value(ERRORS) == 1
    assert [s.attributes["ctxguard.proxy"] for s in exporter.get_finished_spans()] == [
        "current_app"
    ]
    data = reader.get_metrics_data()
    points = [
        (dict(p.attributes), p.value)
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == ERRORS
        for p in m.data.data_points
    ]
    assert [(attrs["ctxguard.proxy"], value) for attrs, value in points] == [("current_app", 1)]


def test_a_proxy_lookup_another_tool_wrapped_in_a_callable_object_is_still_guarded(telemetry):
    """A proxy whose lookup another tool replaced with a callable object (here a
    ``functools.partial``, which has no code of its own) is still guarded, by the plain
    wrapper: the user gets Flask's error and it is reported."""
    import functools

    g_proxy = flask.globals.g
    original = object.__getattribute__(g_proxy, "_get_current_object")
    object.__setattr__(g_proxy, "_get_current_object", functools.partial(original))
    try:
        assert ctxguard.install(**telemetry.providers) is True
        with pytest.raises(RuntimeError) as info:
            _ = g_proxy.user
        assert str(info.value) == NO_APP
        assert telemetry.value(ERRORS, {"ctxguard.proxy": "g"}) == 1
    finally:
        ctxguard.uninstall()
        object.__setattr__(g_proxy, "_get_current_object", original)


def test_each_proxy_not_built_by_werkzeug_gets_its_own_log_line(
    telemetry, monkeypatch, caplog_ctxguard
):
    """When several of Flask's proxies are not built as Werkzeug builds them, each gets its
    own log line naming it."""

    def lookup() -> Any:
        raise RuntimeError(NO_APP)

    monkeypatch.setattr(flask.globals, "g", LocalProxy(lookup))
    monkeypatch.setattr(flask.globals, "current_app", LocalProxy(lookup))
    ctxguard.install(**telemetry.providers)
    lines = [r.getMessage() for r in caplog_ctxguard.records if "plain wrapper" in r.getMessage()]
    named = sorted(line.split(" is not built")[0] for line in lines)
    assert named == ["ctxguard: flask.current_app", "ctxguard: flask.g"]
