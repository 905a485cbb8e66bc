"""Threads, Timers, executors and greenlets: where their work came from, what they left open.

Real threads and real executors; telemetry through the SDK's in-memory exporter and reader.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import os
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from types import FunctionType
from typing import Any

import flask.ctx
import flask.globals
import pytest
from flask import (
    Flask,
    appcontext_pushed,
    copy_current_request_context,
    current_app,
    g,
    make_response,
    request,
)
from helpers import MERGED, REQUEST_PUSHES, call, context_kind, line_of, read_and_close_streams

import ctxguard

ERRORS = "ctxguard.context.errors"
LEAKS = "ctxguard.context.leaks"
PUSHES = "ctxguard.context.pushes"
POPS = "ctxguard.context.pops"
OPEN = "ctxguard.context.open"
ERROR_SPAN = "ctxguard.context_error"
LEAK_SPAN = "ctxguard.context_leak"
ROUTE = "/items/<int:item_id>"
OUTSIDE_REQUEST = "Working outside of request context."
#: Flask 3.2's error for ``request`` in an app context that holds no request.
NO_REQUEST_IN_CONTEXT = "There is no request in this context."
HERE = os.path.dirname(os.path.abspath(__file__))


class ExportError(Exception):
    """The user's own error, raised in a worker between push and pop (seed 001)."""


# --------------------------------------------------------------------------
# Work that touches the request from another thread (seed 000), and how it is started.


def touch_request(seen: dict[str, Any]) -> None:
    """Read the request the way the seed's helper reads the Authorization header."""
    seen["thread"] = threading.current_thread().name
    try:
        seen["value"] = request.headers.get("Authorization", "")  # touch: request
    except RuntimeError as error:
        seen["error"] = error


class RequestReader(threading.Thread):
    """A Thread subclass that does its work in its own ``run``."""

    def __init__(self, seen: dict[str, Any]) -> None:
        super().__init__(name="reader")
        self.seen = seen

    def run(self) -> None:
        touch_request(self.seen)


def in_thread(seen: dict[str, Any]) -> None:
    thread = threading.Thread(target=touch_request, args=(seen,), name="background")
    thread.start()
    thread.join()


def in_executor(seen: dict[str, Any]) -> None:
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pool") as pool:
        pool.submit(touch_request, seen).result()


def in_timer(seen: dict[str, Any]) -> None:
    timer = threading.Timer(0, touch_request, args=(seen,))
    timer.start()
    timer.join()


def in_subclass(seen: dict[str, Any]) -> None:
    thread = RequestReader(seen)
    thread.start()
    thread.join()


SPAWNERS = {
    "thread": (in_thread, "thread"),
    "executor": (in_executor, "executor"),
    "timer": (in_timer, "thread"),
    "subclass": (in_subclass, "thread"),
}


def spawning_app(spawn: Callable[[dict[str, Any]], None], seen: dict[str, Any]) -> Flask:
    """An app whose item view hands work to ``spawn`` and waits for it."""
    app = Flask("spawning")

    @app.route(ROUTE)
    def show_item(item_id: int) -> str:
        spawn(seen)
        return f"item {item_id}"

    return app


def assert_outside_request_error(error: BaseException) -> None:
    """The user gets Werkzeug's very error: same type and message, no chained cause."""
    assert type(error) is RuntimeError
    assert str(error).startswith(OUTSIDE_REQUEST)
    assert error.__cause__ is None and error.__suppress_context__


def assert_no_request_in_app_context_error(error: BaseException) -> None:
    """``request`` read where an app context holds no request: the user gets Flask's very
    error. Up to Flask 3.1 no request context is found (Werkzeug's error); Flask 3.2 finds
    the app context, whose own ``request`` property raises."""
    if not MERGED:
        assert_outside_request_error(error)
        return
    assert type(error) is RuntimeError
    assert str(error) == NO_REQUEST_IN_CONTEXT
    assert error.__cause__ is None
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    assert tb is not None
    code = tb.tb_frame.f_code
    assert (code.co_filename, code.co_name) == (flask.ctx.__file__, "request")


# --------------------------------------------------------------------------
# 1. Origin: the request that spawned the work.


@pytest.mark.parametrize("how", list(SPAWNERS))
def test_work_started_in_a_view_names_the_request_that_started_it(telemetry, how):
    """A thread (plain, Timer, subclass with its own ``run``) or an executor task started in
    a view that touches ``request`` gets Werkzeug's error unchanged, and the error span names
    the user's line, the thread, the spawning request's route template, method and endpoint,
    and the worker kind; the counter carries the route."""
    spawn, worker_kind = SPAWNERS[how]
    seen: dict[str, Any] = {}
    app = spawning_app(spawn, seen)
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)

    response = app.test_client().get("/items/7", headers={"Authorization": "Bearer secret"})

    assert response.status_code == 200
    assert_outside_request_error(seen["error"])
    (span,) = telemetry.spans(ERROR_SPAN)
    attrs = dict(span.attributes)
    assert attrs["ctxguard.proxy"] == "request"
    assert attrs["ctxguard.context.kind"] == "request"
    assert attrs["ctxguard.worker.kind"] == worker_kind
    assert attrs["http.route"] == ROUTE
    assert attrs["http.request.method"] == "GET"
    assert attrs["ctxguard.origin.endpoint"] == "show_item"
    assert attrs["code.file.path"] == __file__
    assert attrs["code.line.number"] == line_of(__file__, "# touch: " + "request")
    assert attrs["code.function.name"].endswith("touch_request")
    assert attrs["thread.name"] == seen["thread"] != threading.current_thread().name
    assert "outlives the request" in attrs["ctxguard.hint"]
    assert span.status.status_code.name == "ERROR"
    assert [e.name for e in span.events] == ["exception"]
    # Never the raw path, the header's value or the query.
    flat = json.dumps(attrs)
    assert "/items/7" not in flat and "secret" not in flat

    counted = {
        "ctxguard.proxy": "request",
        "ctxguard.worker.kind": worker_kind,
        "http.route": ROUTE,
    }
    assert telemetry.value(ERRORS, counted) == 1
    assert telemetry.value(ERRORS) == 1


def test_threaded_server_thread_from_a_view_carries_the_origin(telemetry, serve):
    """Under Werkzeug's threaded server, a thread started by a view (itself on a server
    thread) that touches ``request`` is reported with the view's route, not its raw path."""
    seen: dict[str, Any] = {}
    app = spawning_app(in_thread, seen)
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    base = serve(app)

    with urllib.request.urlopen(base + "/items/42?token=secret", timeout=10) as response:
        assert response.status == 200
        assert response.read() == b"item 42"

    assert_outside_request_error(seen["error"])
    (span,) = telemetry.spans(ERROR_SPAN)
    attrs = dict(span.attributes)
    assert attrs["http.route"] == ROUTE
    assert attrs["http.request.method"] == "GET"
    assert attrs["ctxguard.origin.endpoint"] == "show_item"
    assert attrs["ctxguard.worker.kind"] == "thread"
    assert attrs["thread.name"] == "background"
    assert "/items/42" not in json.dumps(attrs) and "secret" not in json.dumps(attrs)
    assert telemetry.value(ERRORS, {"http.route": ROUTE, "ctxguard.worker.kind": "thread"}) == 1


# --------------------------------------------------------------------------
# 2. The span link back to the request's trace.


@pytest.mark.parametrize("how", ["thread", "executor"])
def test_error_span_links_to_the_span_active_when_the_work_was_started(telemetry, how):
    """Work started inside a traced request: its error span links to the span that was
    current in the view, so the trace of the request that spawned it is one click away."""
    spawn, _ = SPAWNERS[how]
    seen: dict[str, Any] = {}
    tracer = telemetry.tracer_provider.get_tracer("test")
    app = Flask("traced")

    @app.route(ROUTE)
    def show_item(item_id: int) -> str:
        with tracer.start_as_current_span("handler") as parent:
            seen["parent"] = parent.get_span_context()
            spawn(seen)
        return "ok"

    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    assert app.test_client().get("/items/1").status_code == 200

    (span,) = telemetry.spans(ERROR_SPAN)
    (link,) = span.links
    assert link.context.span_id == seen["parent"].span_id
    assert link.context.trace_id == seen["parent"].trace_id
    (handler,) = telemetry.spans("handler")
    assert handler.context.span_id == seen["parent"].span_id


def test_no_link_when_no_span_was_active(telemetry):
    """An untraced request spawns the same work: the error span has no link at all."""
    seen: dict[str, Any] = {}
    app = spawning_app(in_thread, seen)
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    assert app.test_client().get("/items/1").status_code == 200
    (span,) = telemetry.spans(ERROR_SPAN)
    assert list(span.links) == []
    assert span.attributes["http.route"] == ROUTE


def assert_origin_kept(telemetry: Any, worker_kind: str, request_span: Any) -> None:
    """The only error is the spawned work's, reported with the request that started it."""
    (span,) = telemetry.spans(ERROR_SPAN)
    attrs = dict(span.attributes)
    assert attrs["ctxguard.proxy"] == "request"
    assert attrs["ctxguard.context.kind"] == "request"
    assert attrs["ctxguard.worker.kind"] == worker_kind
    assert attrs["http.route"] == ROUTE
    assert attrs["http.request.method"] == "GET"
    assert attrs["code.line.number"] == line_of(__file__, "# touch: " + "request")
    assert "outlives the request" in attrs["ctxguard.hint"]
    (link,) = span.links
    assert link.context.trace_id == request_span.trace_id
    assert link.context.span_id == request_span.span_id
    counted = {
        "ctxguard.proxy": "request",
        "ctxguard.context.kind": "request",
        "ctxguard.worker.kind": worker_kind,
        "http.route": ROUTE,
    }
    assert telemetry.value(ERRORS, counted) == 1
    assert telemetry.value(ERRORS) == 1


def serve_under_a_server_span(app: Flask, telemetry: Any) -> Any:
    """Guard ``app`` and serve one request to it inside a span standing for the server's;
    that span's context."""
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    tracer = telemetry.tracer_provider.get_tracer("server")
    with tracer.start_as_current_span("GET " + ROUTE) as server:
        assert app.test_client().get("/items/7").status_code == 200
    return server.get_span_context()


@pytest.mark.parametrize("how", ["thread", "executor"])
def test_work_started_in_a_request_keeps_its_origin_on_either_context_model(telemetry, how):
    """A thread or an executor task started while a request is served keeps that request
    as its origin whichever context model Flask has (up to 3.1 the request has a request
    context of its own; on 3.2 it is held by the app context): its error has worker kind
    thread or executor, the request's route and method, the "outlives the request" hint,
    and a link to the request's span (the server span current while the app ran)."""
    spawn, worker_kind = SPAWNERS[how]
    seen: dict[str, Any] = {}
    app = spawning_app(spawn, seen)
    server = serve_under_a_server_span(app, telemetry)
    assert_outside_request_error(seen["error"])
    assert_origin_kept(telemetry, worker_kind, server)


@pytest.mark.parametrize("how", ["thread", "executor"])
def test_work_started_under_an_app_context_a_view_pushed_keeps_the_requests_origin(telemetry, how):
    """A view (or a helper it calls) that opens ``with app.app_context():`` and starts work
    in it: the work is still started by the request being served, and keeps it as its
    origin whichever context model Flask has (on 3.2 the app context on top holds no
    request; up to 3.1 the request's context stays current beneath it)."""
    spawn, worker_kind = SPAWNERS[how]
    seen: dict[str, Any] = {}
    app = Flask("nested")

    @app.route(ROUTE)
    def show_item(item_id: int) -> str:
        with app.app_context():
            spawn(seen)
        return "ok"

    server = serve_under_a_server_span(app, telemetry)
    assert_outside_request_error(seen["error"])
    assert_origin_kept(telemetry, worker_kind, server)


# --------------------------------------------------------------------------
# 3. Seed 001: a worker pushes an app context and raises before popping it.


@contextmanager
def thread_exceptions() -> Iterator[list[Any]]:
    """What reaches ``threading.excepthook`` while the block runs."""
    calls: list[Any] = []
    previous = threading.excepthook
    threading.excepthook = calls.append
    try:
        yield calls
    finally:
        threading.excepthook = previous


def export_report(app: Flask, raised: list[BaseException]) -> None:
    """Seed 001: push by hand, then fail before the pop."""
    ctx = app.app_context()
    ctx.push()  # push-site: seed worker
    error = ExportError("export failed: disk full")
    raised.append(error)
    if raised:  # always: the pop below is the one the seed never reaches
        raise error
    ctx.pop()


def test_thread_that_raises_between_push_and_pop_leaks_at_thread_exit(telemetry):
    """Seed 001 in a thread started by a view: one ``thread_exit`` leak of kind app, whose
    span names the push line and the spawning request; the user's exception reaches
    ``threading.excepthook`` as the very object raised."""
    app = Flask("seed001")
    raised: list[BaseException] = []
    started: list[threading.Thread] = []

    @app.route(ROUTE)
    def show_item(item_id: int) -> str:
        thread = threading.Thread(target=export_report, args=(app, raised), name="exporter")
        started.append(thread)
        thread.start()
        thread.join()
        return "ok"

    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    with thread_exceptions() as calls:
        assert app.test_client().get("/items/3").status_code == 200

    (hook,) = calls
    assert hook.exc_type is ExportError
    assert hook.exc_value is raised[0]
    assert str(hook.exc_value) == "export failed: disk full"
    assert hook.thread is started[0]

    assert telemetry.value(LEAKS, {"ctxguard.context.kind": "app"}) == 1
    assert telemetry.value(LEAKS, {"ctxguard.leak.site": "thread_exit"}) == 1
    assert telemetry.value(LEAKS) == 1
    (span,) = telemetry.spans(LEAK_SPAN)
    attrs = dict(span.attributes)
    assert attrs["ctxguard.context.kind"] == "app"
    assert attrs["ctxguard.leak.site"] == "thread_exit"
    assert attrs["code.file.path"] == __file__
    assert attrs["code.line.number"] == line_of(__file__, "# push-site: " + "seed worker")
    assert attrs["code.function.name"].endswith("export_report")
    assert attrs["thread.name"] == "exporter"
    assert attrs["http.route"] == ROUTE
    assert attrs["ctxguard.context.age"] >= 0


def leak_in_task(app: Flask) -> None:
    app.app_context().push()  # push-site: second task leak


def balanced_task(app: Flask) -> str:
    with app.app_context():
        g.value = "balanced"
        return g.value


def test_executor_task_that_raises_between_push_and_pop_leaks_at_task_end(telemetry):
    """Seed 001 in an executor task: one ``task_end`` leak naming the push line, and
    ``future.exception()`` is the user's own exception. A later task on the same pool thread
    does not report the old leak again, while a new leak there is still reported."""
    app = Flask("seed001pool")
    raised: list[BaseException] = []
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)

    with ThreadPoolExecutor(max_workers=1) as pool:
        failed = pool.submit(export_report, app, raised)
        assert failed.exception(timeout=10) is raised[0]
        assert type(failed.exception()) is ExportError
        assert str(failed.exception()) == "export failed: disk full"
        assert telemetry.value(LEAKS, {"ctxguard.leak.site": "task_end"}) == 1

        # The same pool thread runs a clean task: nothing new is reported.
        assert pool.submit(balanced_task, app).result(timeout=10) == "balanced"
        assert telemetry.value(LEAKS) == 1
        assert len(telemetry.spans(LEAK_SPAN)) == 1

        # A new leak on that thread is still found, with its own line.
        pool.submit(leak_in_task, app).result(timeout=10)

    assert telemetry.value(LEAKS, {"ctxguard.context.kind": "app"}) == 2
    assert telemetry.value(LEAKS, {"ctxguard.leak.site": "task_end"}) == 2
    first, second = telemetry.spans(LEAK_SPAN)
    assert first.attributes["code.line.number"] == line_of(
        __file__, "# push-site: " + "seed worker"
    )
    assert first.attributes["ctxguard.leak.site"] == "task_end"
    assert second.attributes["code.line.number"] == line_of(
        __file__, "# push-site: " + "second task leak"
    )


def test_balanced_threads_and_tasks_report_nothing(telemetry):
    """Workers that pop what they push, in a thread and in a task, in and out of a request,
    report nothing at all."""
    app = Flask("balanced")
    results: list[str] = []

    def work() -> None:
        results.append(balanced_task(app))

    def spawn_both() -> None:
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
        with ThreadPoolExecutor(max_workers=2) as pool:
            results.append(pool.submit(balanced_task, app).result())

    @app.route("/")
    def index() -> str:
        spawn_both()
        return "ok"

    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    assert app.test_client().get("/").status_code == 200
    spawn_both()

    assert results == ["balanced"] * 4
    assert telemetry.value(LEAKS) == 0
    assert telemetry.value(ERRORS) == 0
    assert telemetry.spans() == []


# --------------------------------------------------------------------------
# 4. No false reports.


def test_copied_request_context_in_an_executor_is_not_reported(telemetry):
    """The documented fix (seed method 3): a ``copy_current_request_context`` function run in
    a ThreadPoolExecutor from a view and waited on reads the request, and nothing is reported."""
    app = Flask("copied")

    @app.route(ROUTE)
    def show_item(item_id: int) -> str:
        @copy_current_request_context
        def read() -> str:
            return f"{request.args['q']} {threading.current_thread().name}"

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="copy") as pool:
            return pool.submit(read).result()

    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    response = app.test_client().get("/items/1?q=found")
    assert response.status_code == 200
    assert response.data.startswith(b"found copy")
    assert telemetry.spans() == []
    assert telemetry.value(ERRORS) == 0
    assert telemetry.value(LEAKS) == 0


def test_copied_request_context_in_a_close_callback_is_not_reported(telemetry):
    """A ``copy_current_request_context`` callback registered with ``call_on_close`` runs
    when the server closes the body, after the request's context was popped: it reads the
    request and nothing is reported."""
    app = Flask("closing")
    seen: list[str] = []

    @app.route(ROUTE)
    def show_item(item_id: int) -> Any:
        @copy_current_request_context
        def on_close() -> None:
            seen.append(request.url_rule.rule)

        response = make_response("ok")
        response.call_on_close(on_close)
        return response

    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    status, _, body = call(app, "/items/5")
    assert (status, body) == ("200 OK", b"ok")
    assert seen == [ROUTE]
    assert telemetry.spans() == []
    assert telemetry.value(ERRORS) == 0
    assert telemetry.value(LEAKS) == 0


def test_thread_started_outside_any_request_has_no_origin(telemetry):
    """A thread started by a script (no request) that touches ``request`` is reported as a
    thread with no route, method, endpoint or link; one that touches nothing reports nothing."""
    app = Flask("script")
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)

    quiet = threading.Thread(target=balanced_task, args=(app,))
    quiet.start()
    quiet.join()
    assert telemetry.spans() == []

    seen: dict[str, Any] = {}
    in_thread(seen)
    assert_outside_request_error(seen["error"])
    (span,) = telemetry.spans(ERROR_SPAN)
    attrs = dict(span.attributes)
    assert attrs["ctxguard.worker.kind"] == "thread"
    assert attrs["thread.name"] == "background"
    for key in ("http.route", "http.request.method", "ctxguard.origin.endpoint"):
        assert key not in attrs
    assert list(span.links) == []
    assert "No request is being handled here" in attrs["ctxguard.hint"]
    ((counted, value),) = telemetry.points(ERRORS)
    assert value == 1
    assert "http.route" not in counted
    assert counted["ctxguard.worker.kind"] == "thread"


def test_flask_async_view_is_not_reported(telemetry):
    """Flask's async views run on an event loop that asgiref starts on another thread: a
    view that awaits and then reads the request answers 200 and nothing is reported."""
    app = Flask("asyncapp")

    @app.route(ROUTE)
    async def show_item(item_id: int) -> str:
        await asyncio.sleep(0)
        g.item = item_id
        return f"{request.args['q']} {g.item} {current_app.name}"

    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    client = app.test_client()
    for _ in range(3):
        response = client.get("/items/9?q=async")
        assert response.status_code == 200
        assert response.data == b"async 9 asyncapp"
    assert telemetry.spans() == []
    assert telemetry.value(ERRORS) == 0
    assert telemetry.value(LEAKS) == 0


# --------------------------------------------------------------------------
# 5. propagate="app": an app context of the same app in spawned work.


def propagating_app(seen: dict[str, Any]) -> Flask:
    app = Flask("propagating")
    seen["torn_down"] = []

    @app.teardown_appcontext
    def teardown(exc: BaseException | None) -> None:
        seen["torn_down"].append((threading.current_thread().name, g.get("marker")))

    def app_name() -> Any:
        try:
            return current_app.name
        except RuntimeError as error:
            return error

    def background() -> None:
        try:
            seen["app"] = current_app._get_current_object()
        except RuntimeError as error:
            seen["app"] = error
        try:
            g.marker = "from thread"
            seen["g"] = g.marker
        except RuntimeError as error:
            seen["g"] = error
        try:
            seen["request"] = request.method  # touch: propagated
        except RuntimeError as error:
            seen["request"] = error

    @app.route(ROUTE)
    def show_item(item_id: int) -> str:
        g.marker = "from view"
        thread = threading.Thread(target=background, name="propagated")
        thread.start()
        thread.join()
        with ThreadPoolExecutor(max_workers=1) as pool:
            seen["task app"] = pool.submit(app_name).result()
        return "ok"

    return app


def test_propagate_app_gives_spawned_work_an_app_context(telemetry):
    """With ``propagate="app"``, a thread started in a view sees ``current_app`` as the app
    and can use ``g``; ``request`` still fails and is reported; the propagated context is
    popped when the thread ends (the app's teardown runs in the thread) and is no leak.
    Executor tasks get one too."""
    seen: dict[str, Any] = {}
    app = propagating_app(seen)
    ctxguard.CtxGuard(app, environment="production", propagate="app", **telemetry.providers)

    assert app.test_client().get("/items/2").status_code == 200

    assert seen["app"] is app
    assert seen["g"] == "from thread"
    assert seen["task app"] == "propagating"
    assert_no_request_in_app_context_error(seen["request"])
    assert ("propagated", "from thread") in seen["torn_down"]
    assert (threading.current_thread().name, "from view") in seen["torn_down"]

    (span,) = telemetry.spans(ERROR_SPAN)
    assert span.attributes["ctxguard.proxy"] == "request"
    assert span.attributes["http.route"] == ROUTE
    assert span.attributes["code.line.number"] == line_of(__file__, "# touch: " + "propagated")
    assert telemetry.value(ERRORS) == 1
    assert telemetry.value(LEAKS) == 0
    assert telemetry.spans(LEAK_SPAN) == []
    assert ctxguard.snapshot()["workers"] == []


def test_without_propagate_current_app_fails_in_the_thread(telemetry):
    """Off by default: the same thread gets Flask's "outside of application context" error
    for ``current_app`` (reported), and no teardown runs in the thread."""
    seen: dict[str, Any] = {}
    app = propagating_app(seen)
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)

    assert app.test_client().get("/items/2").status_code == 200

    assert type(seen["app"]) is RuntimeError
    assert "application context" in str(seen["app"])
    assert type(seen["g"]) is RuntimeError
    assert type(seen["task app"]) is RuntimeError
    assert [name for name, _ in seen["torn_down"]] == [threading.current_thread().name]
    assert telemetry.value(ERRORS, {"ctxguard.proxy": "current_app"}) == 2
    assert telemetry.value(ERRORS, {"ctxguard.proxy": "request"}) == 1


def test_propagate_app_pushes_an_app_context_on_either_context_model(telemetry):
    """``propagate="app"`` works whichever context model Flask has: the context a spawned
    thread gets holds the app and no request, and is counted as a push and an ``ok`` pop
    of kind ``app`` (next to the request's own pushes); the leak check at the thread's end
    reports nothing for it, nothing stays open, and the app's teardown runs in the thread
    with the thread's ``g``."""
    app = Flask("propagating")
    seen: dict[str, Any] = {"torn_down": []}

    @app.teardown_appcontext
    def teardown(exc: BaseException | None) -> None:
        seen["torn_down"].append((threading.current_thread().name, g.get("marker")))

    def background() -> None:
        ctx = flask.globals._cv_app.get()
        seen["context"] = (context_kind(ctx), ctx.app)
        g.marker = "from thread"

    @app.route(ROUTE)
    def show_item(item_id: int) -> str:
        thread = threading.Thread(target=background, name="propagated")
        thread.start()
        thread.join()
        return "ok"

    ctxguard.CtxGuard(app, environment="production", propagate="app", **telemetry.providers)
    assert app.test_client().get("/items/2").status_code == 200

    assert seen["context"] == ("app", app)
    assert ("propagated", "from thread") in seen["torn_down"]
    expected = dict(REQUEST_PUSHES)  # the request's own pushes differ by model
    expected["app"] = expected.get("app", 0) + 1  # and the thread's
    for kind in ("app", "request"):
        counted = {"ctxguard.context.kind": kind}
        assert telemetry.value(PUSHES, counted) == expected.get(kind, 0), kind
        assert telemetry.value(POPS, {**counted, "ctxguard.pop.outcome": "ok"}) == expected.get(
            kind, 0
        ), kind
        assert telemetry.value(OPEN, counted) == 0, kind
    assert telemetry.value(POPS) == sum(expected.values())
    assert telemetry.value(LEAKS) == 0
    assert telemetry.spans() == []
    assert ctxguard.snapshot()["workers"] == []


def test_propagate_from_the_environment(telemetry, monkeypatch):
    """``CTXGUARD_PROPAGATE=app`` turns the same behaviour on without code changes."""
    monkeypatch.setenv("CTXGUARD_PROPAGATE", "app")
    seen: dict[str, Any] = {}
    app = propagating_app(seen)
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    assert app.test_client().get("/items/2").status_code == 200
    assert seen["app"] is app
    assert seen["g"] == "from thread"
    assert telemetry.value(LEAKS) == 0


def test_bad_propagate_value_names_the_variable(telemetry, monkeypatch, caplog_ctxguard):
    """A typo in ``CTXGUARD_PROPAGATE`` is logged with the variable's name and the values
    allowed, and propagation stays off (the default); a typo in code fails where it was
    written."""
    monkeypatch.setenv("CTXGUARD_PROPAGATE", "request")
    seen: dict[str, Any] = {}
    app = propagating_app(seen)
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    assert app.test_client().get("/items/2").status_code == 200
    assert type(seen["app"]) is RuntimeError  # no app context was propagated
    messages = [r.getMessage() for r in caplog_ctxguard.records]
    (line,) = [m for m in messages if "CTXGUARD_PROPAGATE" in m]
    assert "'request'" in line and "off, app" in line
    with pytest.raises(ctxguard.ConfigError, match=r"^propagate='yes'"):
        ctxguard.CtxGuard(Flask("typo"), environment="production", propagate="yes")


# --------------------------------------------------------------------------
# 6. Identity, uninstall, and a start that fails.


def test_hooks_keep_identity_and_uninstall_restores_the_originals(telemetry):
    """Installed, ``Thread.start`` and ``ThreadPoolExecutor.submit`` still look like
    themselves and point at what they wrap; uninstalled, the very original objects are back."""
    start = vars(threading.Thread)["start"]
    submit = vars(ThreadPoolExecutor)["submit"]
    timer_had_own = "start" in vars(threading.Timer)
    ctxguard.install(**telemetry.providers)

    assert vars(threading.Thread)["start"] is not start
    assert threading.Thread.start.__name__ == "start"
    assert threading.Thread.start.__qualname__ == start.__qualname__
    assert threading.Thread.start.__doc__ == start.__doc__
    assert threading.Thread.start.__wrapped__ is start
    assert vars(ThreadPoolExecutor)["submit"] is not submit
    assert ThreadPoolExecutor.submit.__name__ == "submit"
    assert ThreadPoolExecutor.submit.__wrapped__ is submit
    assert ("start" in vars(threading.Timer)) is timer_had_own

    ctxguard.uninstall()
    assert vars(threading.Thread)["start"] is start
    assert vars(ThreadPoolExecutor)["submit"] is submit
    assert ("start" in vars(threading.Timer)) is timer_had_own


def test_timer_with_its_own_start_is_wrapped_and_restored(telemetry, monkeypatch):
    """When something gave ``Timer`` its own ``start`` before ctxguard, that one is wrapped
    too (one report, with the origin, however many wrappers) and restored by identity."""

    def timer_start(self: threading.Timer) -> None:
        threading.Thread.start(self)

    monkeypatch.setattr(threading.Timer, "start", timer_start)
    seen: dict[str, Any] = {}
    app = spawning_app(in_timer, seen)
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    assert vars(threading.Timer)["start"] is not timer_start
    assert threading.Timer.start.__wrapped__ is timer_start

    assert app.test_client().get("/items/4").status_code == 200
    assert_outside_request_error(seen["error"])
    (span,) = telemetry.spans(ERROR_SPAN)
    assert span.attributes["http.route"] == ROUTE
    assert span.attributes["ctxguard.worker.kind"] == "thread"
    assert telemetry.value(ERRORS) == 1

    ctxguard.uninstall()
    assert vars(threading.Timer)["start"] is timer_start


class _DescriptorStart:
    """Another library's ``Thread.start`` that is not a plain function: an object that
    binds itself like a method (as a class-based wrapper or a C-level descriptor does)."""

    def __init__(self, original: Any) -> None:
        self.original = original
        self.calls = 0
        self.owners: list[Any] = []

    def __get__(self, instance: Any, owner: Any = None) -> Any:
        if instance is None:
            return self
        self.owners.append(owner)

        def start(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return self.original(instance, *args, **kwargs)

        return start


def test_a_start_that_is_not_a_function_is_wrapped_and_restored(telemetry, monkeypatch):
    """When ``Thread.start`` is already some other library's descriptor object, ctxguard
    calls it bound to the thread as Python would (once per start), the thread still
    carries its origin, and uninstall puts that very object back."""
    foreign = _DescriptorStart(vars(threading.Thread)["start"])
    monkeypatch.setattr(threading.Thread, "start", foreign)
    seen: dict[str, Any] = {}
    app = spawning_app(in_thread, seen)
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    assert vars(threading.Thread)["start"] is not foreign

    assert app.test_client().get("/items/4").status_code == 200
    assert_outside_request_error(seen["error"])
    assert foreign.calls == 1
    assert foreign.owners == [threading.Thread]
    (span,) = telemetry.spans(ERROR_SPAN)
    assert span.attributes["http.route"] == ROUTE
    assert span.attributes["ctxguard.worker.kind"] == "thread"

    ctxguard.uninstall()
    assert vars(threading.Thread)["start"] is foreign


def test_submitted_function_keeps_its_identity(telemetry, monkeypatch):
    """A wrapper installed before ctxguard (as Sentry's or OpenTelemetry's are) receives
    ctxguard's task wrapper: it still carries the function's name, qualname, doc and module,
    and ``__wrapped__`` is the function itself, its annotations and attributes as
    ``functools.update_wrapper`` would give them. Uninstall puts that wrapper back."""
    received: list[Any] = []
    original = vars(ThreadPoolExecutor)["submit"]

    def recording_submit(self: ThreadPoolExecutor, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        received.append(fn)
        return original(self, fn, *args, **kwargs)

    monkeypatch.setattr(ThreadPoolExecutor, "submit", recording_submit)
    ctxguard.install(**telemetry.providers)

    def build_report(n: int) -> int:
        """Build the nightly report."""
        return n * 2

    build_report.schedule = "nightly"  # type: ignore[attr-defined]
    with ThreadPoolExecutor(max_workers=1) as pool:
        assert pool.submit(build_report, 21).result() == 42
    (task,) = received
    assert task is not build_report  # ctxguard's wrapper, handed down the chain
    assert task.__name__ == "build_report"
    assert task.__qualname__ == build_report.__qualname__
    assert task.__doc__ == "Build the nightly report."
    assert task.__module__ == __name__
    assert task.__wrapped__ is build_report
    reference = functools.update_wrapper(lambda: None, build_report)
    for name in (*functools.WRAPPER_ASSIGNMENTS, "schedule"):
        assert getattr(task, name) == getattr(reference, name), name
    assert inspect.signature(task) == inspect.signature(build_report)

    ctxguard.uninstall()
    assert vars(ThreadPoolExecutor)["submit"] is recording_submit


def late_work(app: Flask, seen: dict[str, Any]) -> None:
    """Work that would be reported, and would get an app context, if ctxguard acted."""
    try:
        seen["app"] = current_app.name
    except RuntimeError as error:
        seen["app"] = error
    app.app_context().push()  # never popped: nobody is watching any more
    touch_request(seen)


@contextmanager
def held_before_run(gate: threading.Event) -> Iterator[None]:
    """Threads started in the block wait for ``gate`` before their ``run`` begins.

    ``threading.settrace`` installs a trace function in each new thread just before it calls
    ``run``; its first call event is ``run`` itself, so the thread is held between ``start()``
    and the first line of ``run``: the window where ``uninstall()`` can land.
    """
    previous = threading.gettrace()

    def hold(frame: Any, event: str, arg: Any) -> None:
        sys.settrace(None)
        gate.wait(10)

    threading.settrace(hold)
    try:
        yield
    finally:
        threading.settrace(previous)  # type: ignore[arg-type]


def test_thread_started_while_installed_and_run_after_uninstall_reports_nothing(
    global_telemetry, caplog_ctxguard
):
    """A thread started in a request while ctxguard was installed, whose ``run`` begins
    after ``uninstall()``: ctxguard steps aside (no propagated app context, no report, no
    log), and the thread still does its work. A report made after ``uninstall()`` would go
    to the global providers, which are read here."""
    app = Flask("stepaside")
    gate = threading.Event()
    seen: dict[str, Any] = {}
    started: list[threading.Thread] = []

    @app.route("/")
    def index() -> str:
        with held_before_run(gate):
            thread = threading.Thread(target=late_work, args=(app, seen))
            thread.start()
        started.append(thread)
        return "ok"

    ctxguard.CtxGuard(app, environment="production", propagate="app")
    assert app.test_client().get("/").status_code == 200
    assert seen == {}  # held before its run
    ctxguard.uninstall()
    gate.set()
    started[0].join(10)

    assert not started[0].is_alive()
    assert type(seen["app"]) is RuntimeError
    assert_no_request_in_app_context_error(seen["error"])  # late_work pushed an app context
    assert global_telemetry.spans() == []
    assert global_telemetry.value(ERRORS) == 0
    assert global_telemetry.value(LEAKS) == 0
    assert caplog_ctxguard.records == []


def test_task_queued_while_installed_and_run_after_uninstall_reports_nothing(
    global_telemetry, caplog_ctxguard
):
    """The same for an executor task submitted in a request, queued behind a busy worker,
    and run after ``uninstall()``."""
    app = Flask("stepaside")
    gate = threading.Event()
    seen: dict[str, Any] = {}
    queued: list[Any] = []

    with ThreadPoolExecutor(max_workers=1) as pool:

        @app.route("/")
        def index() -> str:
            queued.append(pool.submit(late_work, app, seen))
            return "ok"

        ctxguard.CtxGuard(app, environment="production", propagate="app")
        busy = pool.submit(gate.wait, 10)  # the only worker is busy until the gate opens
        assert app.test_client().get("/").status_code == 200
        assert seen == {}
        ctxguard.uninstall()
        gate.set()
        assert busy.result(10) is True
        assert queued[0].result(10) is None

    assert type(seen["app"]) is RuntimeError
    assert_no_request_in_app_context_error(seen["error"])  # late_work pushed an app context
    assert global_telemetry.spans() == []
    assert global_telemetry.value(ERRORS) == 0
    assert global_telemetry.value(LEAKS) == 0
    assert caplog_ctxguard.records == []


def balanced_across(app: Flask, inside: threading.Event, gate: threading.Event) -> str:
    """Balanced work that is inside its app context when ``uninstall()`` lands."""
    with app.app_context():
        inside.set()
        gate.wait(10)
        return current_app.name


@pytest.mark.parametrize("how", ["thread", "executor"])
def test_balanced_work_running_across_uninstall_is_not_reported(
    global_telemetry, caplog_ctxguard, how
):
    """Work started in a request that pushes a context, sees ``uninstall()`` land, then pops
    it and ends: it was balanced, so nothing is reported or logged as a leak when the thread
    (or the pool's thread) ends. With ``propagate="app"`` the task's own propagated context
    is popped after the uninstall too."""
    app = Flask("across")
    inside, gate = threading.Event(), threading.Event()
    results: list[str] = []
    workers: list[Any] = []
    pool = ThreadPoolExecutor(max_workers=1)

    @app.route("/")
    def index() -> str:
        if how == "thread":
            thread = threading.Thread(
                target=lambda: results.append(balanced_across(app, inside, gate))
            )
            thread.start()
            workers.append(thread)
        else:
            workers.append(pool.submit(balanced_across, app, inside, gate))
        return "ok"

    ctxguard.CtxGuard(app, environment="production", propagate="app")
    try:
        assert app.test_client().get("/").status_code == 200
        assert inside.wait(10)
        ctxguard.uninstall()
        gate.set()
        if how == "thread":
            workers[0].join(10)
        else:
            results.append(workers[0].result(10))
    finally:
        gate.set()
        pool.shutdown(wait=True)  # the pool's thread ends here

    assert results == ["across"]
    assert global_telemetry.spans() == []
    assert [r.getMessage() for r in caplog_ctxguard.records] == []


def test_failed_start_raises_the_same_error_and_leaves_no_run_behind(telemetry):
    """Starting a finished thread again fails exactly as without ctxguard, and the thread is
    left without a ctxguard ``run`` of its own."""
    plain = threading.Thread(target=lambda: None)
    plain.start()
    plain.join()
    with pytest.raises(RuntimeError) as without:
        plain.start()

    ctxguard.install(**telemetry.providers)
    ran: list[str] = []
    thread = threading.Thread(target=ran.append, args=("once",))
    thread.start()
    thread.join()
    assert ran == ["once"]
    assert "run" not in vars(thread)
    with pytest.raises(RuntimeError) as with_ctxguard:
        thread.start()
    assert str(with_ctxguard.value) == str(without.value) == "threads can only be started once"
    assert "run" not in vars(thread)
    assert ran == ["once"]


# --------------------------------------------------------------------------
# 7. gevent: every greenlet is a worker (in a subprocess: monkey-patching is for good).


@pytest.mark.parametrize("import_first", [False, True], ids=["patch-first", "import-first"])
def test_gevent_greenlets_are_workers(import_first):
    """Under ``monkey.patch_all()``: a greenlet spawned by a view (``gevent.spawn``,
    ``spawn_later``, a pool's ``spawn``) that touches ``request`` is a "greenlet" worker
    carrying the view's origin and linked to its span; one that leaks a context is reported
    at ``thread_exit`` with the view's route; a greenlet spawned outside any request has no
    origin; two greenlets pushing app contexts have separate ledgers; a
    ``threading.Thread`` (a greenlet now) started in a view carries the view's origin. The
    same when ctxguard was imported before gevent patched, as long as it is installed after."""
    script = os.path.join(HERE, "threads_gevent.py")
    env = dict(os.environ)
    env.pop("CTXGUARD_TEST_IMPORT_FIRST", None)
    if import_first:
        env["CTXGUARD_TEST_IMPORT_FIRST"] = "1"
    done = subprocess.run(
        [sys.executable, script], capture_output=True, text=True, timeout=120, cwd=HERE, env=env
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])

    assert report["patched"] is True
    assert report["installed"] is True, done.stderr
    assert report["status"] == 200
    spans = report["error_spans"]
    names = [s["code.function.name"].rsplit(".", 1)[-1] for s in spans]
    assert sorted(names) == sorted(
        ["touch_in_greenlet", "touch_in_thread", "touch_later", "touch_in_pool", "touch_outside"]
    )
    errors = dict(zip(names, spans, strict=True))
    in_request = [s for s in spans if "http.route" in s]
    assert len(in_request) == 4
    for span in in_request:
        assert span["http.route"] == ROUTE
        assert span["ctxguard.origin.endpoint"] == "show_item"
        assert span["links"] == [report["request_span_id"]]
    greenlets = [s for s in spans if s["ctxguard.worker.kind"] == "greenlet"]
    assert len(greenlets) == 4
    for name, marker in [
        ("touch_in_greenlet", "greenlet"),
        ("touch_later", "spawn_later"),
        ("touch_in_pool", "pool"),
        ("touch_outside", "outside"),
    ]:
        assert errors[name]["ctxguard.worker.kind"] == "greenlet"
        assert errors[name]["code.line.number"] == line_of(script, "# touch: " + marker)
    outside = errors["touch_outside"]
    assert "http.route" not in outside
    assert outside["links"] == []
    (leak,) = report["leak_spans"]
    assert leak["ctxguard.leak.site"] == "thread_exit"
    assert leak["http.route"] == ROUTE
    assert leak["code.line.number"] == line_of(script, "# push: greenlet, never popped")
    thread = errors["touch_in_thread"]
    assert thread["ctxguard.worker.kind"] == "thread"
    assert thread["http.route"] == ROUTE
    assert thread["ctxguard.origin.endpoint"] == "show_item"
    assert thread["code.line.number"] == line_of(script, "# touch: " + "thread")
    assert report["messages"] == [OUTSIDE_REQUEST] * 5

    # Two greenlets, two workers, each with its own app context and push line.
    workers = report["snapshot"]["workers"]
    assert len(workers) == 2
    assert len({w["thread_id"] for w in workers}) == 2
    lines = sorted(c["line"] for w in workers for c in w["contexts"])
    assert lines == sorted(
        [line_of(script, "# push: " + "first"), line_of(script, "# push: " + "second")]
    )
    assert all(len(w["contexts"]) == 1 for w in workers)
    assert report["own_app"] == {"first": "first", "second": "second"}
    assert report["errors"] == 5
    assert report["leaks"] == 1
    # uninstall() puts back gevent's own spawn functions, the very objects.
    assert (report["spawn_hooked"], report["spawn_restored"]) == (True, True)


# --------------------------------------------------------------------------
# 8. Worker kinds at the edges (docs/telemetry.md, Worker kinds).


def test_an_asyncio_task_created_in_a_request_sees_the_requests_contexts(telemetry):
    """asyncio tasks copy the context variables of the code that makes them: a task made
    during a request (here by ``asyncio.run`` in a view, and by ``create_task`` in that
    coroutine) reads ``request`` and ``current_app`` as the view would, and nothing is
    reported (docs/index.md, Threads)."""
    app = Flask(__name__)
    ctxguard.CtxGuard(app, **telemetry.providers)

    async def read() -> str:
        return f"{request.method} {current_app.name}"

    async def main() -> str:
        return await asyncio.get_running_loop().create_task(read())

    @app.route("/")
    def view() -> str:
        return asyncio.run(main())

    assert app.test_client().get("/").data == f"GET {app.name}".encode()
    assert telemetry.value("ctxguard.context.errors") == 0
    assert telemetry.value("ctxguard.context.leaks") == 0


def test_an_event_loop_callback_is_not_an_asyncio_task(telemetry):
    """``task`` means an asyncio task: a plain callback that an event loop on the main thread
    runs (``loop.call_soon``), outside any task, and that reads ``current_app`` is reported
    as the main thread; the same read in a coroutine on that loop is a task."""
    ctxguard.install(**telemetry.providers)
    seen: list[Any] = []

    def read_app() -> None:
        try:
            seen.append(current_app.name)
        except RuntimeError as error:
            seen.append(error)

    async def in_a_task() -> None:
        read_app()

    loop = asyncio.new_event_loop()
    try:
        loop.call_soon(read_app)
        loop.call_soon(loop.stop)
        loop.run_forever()
        (span,) = telemetry.spans(ERROR_SPAN)
        assert span.attributes["ctxguard.worker.kind"] == "main"
        loop.run_until_complete(in_a_task())
    finally:
        loop.close()

    assert [type(error) for error in seen] == [RuntimeError, RuntimeError]
    assert telemetry.value(ERRORS, {"ctxguard.worker.kind": "main"}) == 1
    assert telemetry.value(ERRORS, {"ctxguard.worker.kind": "task"}) == 1


# --------------------------------------------------------------------------
# 9. A second start() of a thread that has started.


def test_a_failed_second_start_leaves_the_started_thread_watched(telemetry):
    """Calling ``start()`` again on a thread that has started but not yet begun its work (a
    programming error) raises Python's own error, and the thread that is running is left as
    it was: its error still names the request that started it."""
    seen: dict[str, Any] = {}
    gate = threading.Event()
    errors: list[BaseException] = []
    started: list[threading.Thread] = []
    app = Flask("twice")

    @app.route(ROUTE)
    def show_item(item_id: int) -> str:
        with held_before_run(gate):
            thread = threading.Thread(target=touch_request, args=(seen,), name="started twice")
            thread.start()
        started.append(thread)
        try:
            thread.start()
        except RuntimeError as error:
            errors.append(error)
        return "ok"

    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    try:
        assert app.test_client().get("/items/6").status_code == 200
    finally:
        gate.set()
    started[0].join(10)

    assert [str(e) for e in errors] == ["threads can only be started once"]
    assert_outside_request_error(seen["error"])
    (span,) = telemetry.spans(ERROR_SPAN)
    assert span.attributes["thread.name"] == "started twice"
    assert span.attributes["ctxguard.worker.kind"] == "thread"
    assert span.attributes["http.route"] == ROUTE
    assert span.attributes["ctxguard.origin.endpoint"] == "show_item"


def test_starting_a_finished_thread_again_logs_nothing(telemetry, caplog_ctxguard):
    """Starting a thread that has finished fails with Python's own error, and ctxguard has
    nothing to say about it: no line is logged."""
    ctxguard.install(**telemetry.providers)
    thread = threading.Thread(target=lambda: None)
    thread.start()
    thread.join()

    with pytest.raises(RuntimeError, match=r"^threads can only be started once$"):
        thread.start()
    assert caplog_ctxguard.records == []


# --------------------------------------------------------------------------
# 10. A start wrapper that replaces the thread's ``run`` (Sentry's threading integration).


def run_replacing_start(original: Any, ran: list[str]) -> Any:
    """A ``Thread.start`` installed before ctxguard that, as Sentry's threading integration
    does, sets the thread's ``run`` to a plain function calling what ``run`` was."""

    def start(self: threading.Thread, *args: Any, **kwargs: Any) -> Any:
        old_run = getattr(self.run, "__func__", self.run)

        def run(*a: Any, **kw: Any) -> Any:
            ran.append(self.name)
            return old_run(self, *a, **kw)

        self.run = run  # type: ignore[method-assign]
        return original(self, *args, **kwargs)

    return start


def test_a_start_that_replaces_run_keeps_working_under_ctxguard(telemetry, monkeypatch):
    """With a library's ``start`` that replaces the thread's ``run`` by its own function
    (Sentry's threading integration), a thread started in a view runs through both: its error
    names the request, it ends without an exception of ctxguard's, and the library's ``run``
    is left on the thread as it would be without ctxguard."""
    ran: list[str] = []
    monkeypatch.setattr(
        threading.Thread, "start", run_replacing_start(vars(threading.Thread)["start"], ran)
    )
    seen: dict[str, Any] = {}
    started: list[threading.Thread] = []
    app = Flask("replaced")

    @app.route(ROUTE)
    def show_item(item_id: int) -> str:
        thread = threading.Thread(target=touch_request, args=(seen,), name="replaced run")
        started.append(thread)
        thread.start()
        thread.join()
        return "ok"

    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    with thread_exceptions() as calls:
        assert app.test_client().get("/items/8").status_code == 200

    assert calls == []
    assert ran == ["replaced run"]
    assert_outside_request_error(seen["error"])
    (span,) = telemetry.spans(ERROR_SPAN)
    assert span.attributes["http.route"] == ROUTE
    assert span.attributes["thread.name"] == "replaced run"
    library_run = vars(started[0])["run"]
    assert type(library_run) is FunctionType and library_run.__name__ == "run"
    assert library_run.__qualname__.startswith("run_replacing_start.")


def test_a_thread_run_again_after_it_ended_runs_its_own_run(telemetry, monkeypatch):
    """A thread whose ``run`` a library replaced at start, called again directly after it
    ended (as code re-running its work in place does): its own ``run`` runs again in the
    caller, as it would without ctxguard."""
    ran: list[str] = []
    monkeypatch.setattr(
        threading.Thread, "start", run_replacing_start(vars(threading.Thread)["start"], ran)
    )
    ctxguard.install(**telemetry.providers)
    runs: list[str] = []

    class Refresher(threading.Thread):
        def run(self) -> None:
            runs.append(f"{self.name} in {threading.current_thread().name}")

    thread = Refresher(name="refresher")
    thread.start()
    thread.join()
    thread.run()

    assert ran == ["refresher", "refresher"]
    assert runs == ["refresher in refresher", f"refresher in {threading.current_thread().name}"]


# --------------------------------------------------------------------------
# 11. A ``run`` set on the thread itself, and a ``submit`` that is not a function.


class Job:
    """An object whose bound method is handed to a thread as its ``run``."""

    def __init__(self, seen: dict[str, Any]) -> None:
        self.seen = seen

    def work(self) -> None:
        self.seen["job"] = self
        touch_request(self.seen)


@pytest.mark.parametrize("kind", ["function", "method"])
def test_a_run_set_on_the_thread_runs_and_names_the_request(telemetry, kind):
    """A thread whose ``run`` the user set on the thread itself (a function, or another
    object's method) and that is started in a view runs exactly that ``run`` (the method
    with its own object), and its error names the request that started it."""
    seen: dict[str, Any] = {}
    job = Job(seen)
    app = Flask("ownrun")

    @app.route(ROUTE)
    def show_item(item_id: int) -> str:
        thread = threading.Thread(name="own run")
        if kind == "function":
            thread.run = lambda: job.work()  # type: ignore[method-assign]
        else:
            thread.run = job.work  # type: ignore[method-assign]
        thread.start()
        thread.join()
        return "ok"

    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    with thread_exceptions() as calls:
        assert app.test_client().get("/items/9").status_code == 200

    assert calls == []
    assert seen["job"] is job
    assert_outside_request_error(seen["error"])
    (span,) = telemetry.spans(ERROR_SPAN)
    assert span.attributes["thread.name"] == "own run"
    assert span.attributes["ctxguard.worker.kind"] == "thread"
    assert span.attributes["http.route"] == ROUTE


def labelled_touch(seen: dict[str, Any], *, label: str) -> None:
    seen["label"] = label
    touch_request(seen)


def test_a_submit_that_is_not_a_function_is_wrapped_and_restored(telemetry, monkeypatch):
    """When ``ThreadPoolExecutor.submit`` is already some other library's descriptor object,
    ctxguard calls it bound to the pool as Python would (once per submit, with the task's
    arguments), the task still carries its origin, and uninstall puts that very object
    back."""
    foreign = _DescriptorStart(vars(ThreadPoolExecutor)["submit"])
    monkeypatch.setattr(ThreadPoolExecutor, "submit", foreign)
    seen: dict[str, Any] = {}
    app = Flask("foreignsubmit")

    @app.route(ROUTE)
    def show_item(item_id: int) -> str:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pool") as pool:
            pool.submit(labelled_touch, seen, label="nightly").result(10)
        return "ok"

    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    assert vars(ThreadPoolExecutor)["submit"] is not foreign

    assert app.test_client().get("/items/3").status_code == 200
    assert seen["label"] == "nightly"
    assert_outside_request_error(seen["error"])
    assert foreign.calls == 1
    assert foreign.owners == [ThreadPoolExecutor]
    (span,) = telemetry.spans(ERROR_SPAN)
    assert span.attributes["ctxguard.worker.kind"] == "executor"
    assert span.attributes["http.route"] == ROUTE

    ctxguard.uninstall()
    assert vars(ThreadPoolExecutor)["submit"] is foreign


class _Job:
    def __init__(self) -> None:
        self.ran: list[str] = []

    def work(self) -> None:
        self.ran.append(threading.current_thread().name)


@pytest.mark.parametrize("kind", ["function", "other-objects-method", "threads-own-method"])
def test_a_run_set_on_the_thread_is_left_on_it(telemetry, kind):
    """Whatever the user set as a thread's ``run`` (a function, a method of another object,
    a method bound to the thread itself) runs once, and is still the thread's ``run`` after
    the thread ended, as without ctxguard."""
    import types

    ctxguard.install(**telemetry.providers)
    thread = threading.Thread(name="own run")
    job = _Job()
    if kind == "function":
        own_run: Any = lambda: job.work()  # noqa: E731
    elif kind == "other-objects-method":
        own_run = job.work
    else:
        own_run = types.MethodType(lambda self: job.work(), thread)
    thread.run = own_run  # type: ignore[method-assign]
    thread.start()
    thread.join()

    assert job.ran == ["own run"]
    assert vars(thread)["run"] is own_run


# --------------------------------------------------------------------------
# 12. propagate="app" when the app's own push fails.


class ReceiverFailed(Exception):
    """Raised by the app's ``appcontext_pushed`` receiver in spawned threads."""


def test_a_failing_propagated_push_is_logged_and_the_work_still_runs(telemetry, caplog_ctxguard):
    """With ``propagate="app"``, an ``appcontext_pushed`` receiver of the app that raises
    when ctxguard pushes the thread's app context: ctxguard keeps the error to itself (one
    line naming where and the exception's type) and the thread's work runs. The context
    Flask pushed before the receiver raised is popped when the work ends: its teardown runs
    there, and it is not reported as a leak of the thread."""
    app = Flask("failingpush")
    done: list[str] = []
    torn_down: list[str] = []

    @app.teardown_appcontext
    def teardown(exc: BaseException | None) -> None:
        torn_down.append(threading.current_thread().name)

    def receiver(sender: Any, **extra: Any) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise ReceiverFailed("receiver failed")

    @app.route(ROUTE)
    def show_item(item_id: int) -> str:
        thread = threading.Thread(target=lambda: done.append("work"), name="failing push")
        thread.start()
        thread.join()
        return "ok"

    ctxguard.CtxGuard(app, environment="production", propagate="app", **telemetry.providers)
    appcontext_pushed.connect(receiver, app)
    try:
        with thread_exceptions() as calls:
            assert app.test_client().get("/items/1").status_code == 200
    finally:
        appcontext_pushed.disconnect(receiver, app)

    assert calls == []
    assert done == ["work"]
    (line,) = [
        r.getMessage() for r in caplog_ctxguard.records if "internal error" in r.getMessage()
    ]
    assert line.startswith("ctxguard: internal error in propagated app context (ignored,")
    assert "ReceiverFailed" in line
    assert "failing push" in torn_down
    assert telemetry.value(LEAKS) == 0


class TeardownFailed(Exception):
    """Raised by the app's teardown in spawned threads."""


def test_failing_propagated_teardowns_are_logged_once_per_site(telemetry, caplog_ctxguard):
    """With ``propagate="app"`` and a teardown that raises in spawned work: the line saying
    so is limited per site, so two threads give one line, and an executor task (another
    site) in the same minute gives its own."""
    app = Flask("failingteardown")

    @app.teardown_appcontext
    def fail(exc: BaseException | None) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise TeardownFailed("teardown failed")

    @app.route(ROUTE)
    def show_item(item_id: int) -> str:
        for _ in range(2):
            thread = threading.Thread(target=lambda: None)
            thread.start()
            thread.join()
        with ThreadPoolExecutor(max_workers=1) as pool:
            pool.submit(lambda: None).result(10)
        return "ok"

    ctxguard.CtxGuard(app, environment="production", propagate="app", **telemetry.providers)
    assert app.test_client().get("/items/1").status_code == 200

    lines = [r.getMessage() for r in caplog_ctxguard.records if "propagated" in r.getMessage()]
    assert (
        lines
        == [
            "ctxguard: a teardown function raised TeardownFailed while popping the propagated"
            " app context"
        ]
        * 2
    )


# --------------------------------------------------------------------------
# 13. A future's done callback, on the pool's thread after the task.


def test_a_done_callback_on_the_pool_thread_is_executor_work(telemetry):
    """A future's done callback runs on the pool's thread once the task has ended: a read of
    ``current_app`` there is reported as work of the executor's thread (no origin), as
    ``executor`` and not as some other thread."""
    ctxguard.install(**telemetry.providers)
    seen: list[Any] = []

    def read_app(future: Any) -> None:
        seen.append(threading.current_thread().name)
        try:
            seen.append(current_app.name)
        except RuntimeError as error:
            seen.append(error)

    gate = threading.Event()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="callbacks") as pool:
        future = pool.submit(gate.wait, 10)
        future.add_done_callback(read_app)  # added while the task waits: runs on its thread
        gate.set()
        assert future.result(10) is True

    thread_name, error = seen
    assert thread_name.startswith("callbacks")
    assert type(error) is RuntimeError
    (span,) = telemetry.spans(ERROR_SPAN)
    assert span.attributes["ctxguard.worker.kind"] == "executor"
    assert span.attributes["thread.name"] == thread_name
    assert "http.route" not in span.attributes
    assert telemetry.value(ERRORS, {"ctxguard.worker.kind": "executor"}) == 1


@pytest.mark.parametrize("how", ["CtxGuard", "install"])
def test_an_async_view_streaming_with_context_reports_nothing(telemetry, caplog_ctxguard, how):
    """An async view (asgiref runs it in an executor thread, with the request's context
    variables) returns a ``stream_with_context`` body, read or closed unread, also inside
    ``with client:``, as in Flask's own ``test_async_view``. On Flask 3.2 the stream's push
    of the request's context in that thread only counts one more push of a context current
    on the serving thread, popped there when the body (or the ``with`` block) ends: no leak
    at the task's end, no warning, and every push counted is popped; with the middleware
    and with the process hooks alone (no request is known to ctxguard then). (Up to 3.1
    the push and its pop stay in the executor.)"""
    app = flask.Flask("asyncstream")
    app.secret_key = "not-a-secret"

    @app.route("/")
    async def index() -> Any:
        flask.session["test"] = "flask"

        @flask.stream_with_context
        def gen() -> Iterator[str]:
            yield flask.session["test"]

        return flask.Response(gen())

    try:
        read_and_close_streams(app.test_client())  # without ctxguard first
    except ValueError:
        pytest.skip("Flask before 3.1 cannot stream with context from an async view")
    if how == "CtxGuard":
        ctxguard.CtxGuard(app, **telemetry.providers)
    else:
        ctxguard.install(**telemetry.providers)
    read_and_close_streams(app.test_client())
    assert telemetry.points("ctxguard.context.leaks") == []
    assert telemetry.spans() == []
    assert [r.getMessage() for r in caplog_ctxguard.records if r.levelname == "WARNING"] == []
    pushed = sum(n for _, n in telemetry.points("ctxguard.context.pushes"))
    popped = sum(n for _, n in telemetry.points("ctxguard.context.pops"))
    assert pushed == popped > 0
    assert telemetry.value("ctxguard.context.open") == 0
    assert ctxguard.snapshot()["workers"] == []
