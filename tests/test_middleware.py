"""The middleware: stale, ambient and leaked contexts around each request."""

from __future__ import annotations

import gc
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from flask import Flask, g, stream_with_context
from helpers import call, environ, line_of, make_app

import ctxguard

LEAKS = "ctxguard.context.leaks"
HEALED = "ctxguard.context.healed"
LEAK_SPAN = "ctxguard.context_leak"
unraisable_ok = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def leaks(kind: str, site: str) -> dict[str, str]:
    return {"ctxguard.context.kind": kind, "ctxguard.leak.site": site}


def start_response(status: str, headers: list[Any], exc_info: Any = None) -> None:
    pass


def marking_app() -> Flask:
    """An app whose teardown records which request's ``g`` it tore down."""
    app = Flask("marking")
    app.torn_down = []  # type: ignore[attr-defined]

    @app.teardown_appcontext
    def teardown(exc: BaseException | None) -> None:
        app.torn_down.append(g.get("marker"))  # type: ignore[attr-defined]

    @app.route("/")
    def index() -> str:
        g.setdefault("marker", "index")
        return "hello"

    @app.route("/stream")
    def stream() -> Any:
        g.marker = "stream"

        def chunks() -> Any:
            yield "a"
            yield "b"
            yield "c"

        return app.response_class(stream_with_context(chunks()))

    return app


def test_a_clean_request_reports_nothing(telemetry):
    """Requests that push and pop their contexts normally produce no leak at all."""
    app = make_app()
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    for path in ("/", "/items/3", "/missing"):
        call(app, path)
    assert telemetry.value(LEAKS) == 0
    assert telemetry.spans() == []


def test_manual_push_without_pop_in_a_view_is_a_request_end_leak(telemetry):
    """A view that pushes an app context and never pops it is reported at the end of the
    request with the view's line; Flask's own error still reaches the server unchanged."""
    app = make_app()

    @app.route("/report")
    def report() -> str:
        app.app_context().push()  # push-site: view
        return "done"

    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    with pytest.raises(AssertionError, match="Popped wrong app context"):
        call(app, "/report")

    assert telemetry.value(LEAKS, leaks("app", "request_end")) == 1
    (span,) = telemetry.spans(LEAK_SPAN)
    attrs = dict(span.attributes)
    assert attrs["ctxguard.context.kind"] == "app"
    assert attrs["ctxguard.leak.site"] == "request_end"
    assert attrs["code.file.path"] == __file__
    assert attrs["code.line.number"] == line_of(__file__, "# push-site: " + "view")
    assert attrs["code.function.name"].endswith("report")
    assert attrs["http.route"] == "/report"
    assert attrs["http.request.method"] == "GET"
    assert attrs["thread.name"] == threading.current_thread().name
    assert span.status.status_code.name == "ERROR"
    # The next request on this worker is clean: nothing is reported twice.
    call(app, "/")
    assert telemetry.value(LEAKS) == 1


def test_manual_request_context_push_in_a_view(telemetry):
    """The same for a request context pushed by hand inside a view."""
    app = make_app()

    @app.route("/nested")
    def nested() -> str:
        app.test_request_context("/items/1").push()  # push-site: request
        return "done"

    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    with pytest.raises(AssertionError, match="Popped wrong request context"):
        call(app, "/nested")
    assert telemetry.value(LEAKS, leaks("request", "request_end")) == 1
    (span,) = telemetry.spans(LEAK_SPAN)
    assert span.attributes["code.line.number"] == line_of(__file__, "# push-site: " + "request")


def _abandon_stream_on_another_thread(app: Flask, pool: ThreadPoolExecutor) -> None:
    """Request 1 on the pooled thread reads one chunk; another thread drops the body."""
    holder: dict[str, Any] = {}

    def first() -> None:
        body = app(environ("/stream"), start_response)
        chunks = iter(body)  # a server holds the iterator it loops on, and the body
        assert next(chunks) == b"a"
        holder.update(body=body, chunks=chunks)

    pool.submit(first).result()
    dropper = threading.Thread(target=holder.clear, name="finaliser")
    dropper.start()
    dropper.join()


@unraisable_ok
def test_flask_6123_without_ctxguard_the_next_request_skips_teardown():
    """Control for the reproduction below: the bug is real on this Flask version."""
    app = marking_app()
    with ThreadPoolExecutor(1) as pool:
        _abandon_stream_on_another_thread(app, pool)
        app.torn_down.clear()
        _status, _, data = pool.submit(call, app, "/").result()
        assert data == b"hello"
        # The stuck context of request 1 is reused: request 2's teardown never runs.
        assert app.torn_down == []


@unraisable_ok
def test_flask_6123_abandoned_stream_is_reported_and_healed(telemetry):
    """pallets/flask#6123: a stream_with_context body abandoned mid-stream and finalised on
    another thread leaves the app context on the worker thread. ctxguard counts the leak with
    its push site, heals the worker, and the next request's teardown_appcontext runs."""
    app = marking_app()
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    with ThreadPoolExecutor(1, thread_name_prefix="pooled") as pool:
        _abandon_stream_on_another_thread(app, pool)

        assert telemetry.value(LEAKS, leaks("app", "request_end")) == 1
        spans = [
            s for s in telemetry.spans(LEAK_SPAN) if s.attributes["ctxguard.context.kind"] == "app"
        ]
        (span,) = spans
        assert span.attributes["ctxguard.leak.site"] == "request_end"
        assert span.attributes["code.file.path"] in (
            __file__,
            stream_with_context.__code__.co_filename,
        )
        assert span.attributes["http.route"] == "/stream"
        assert span.attributes["thread.name"].startswith("pooled")

        app.torn_down.clear()
        _status, _, data = pool.submit(call, app, "/").result()
        assert data == b"hello"
        # The stale context was popped first (its teardown ran), then request 2's own ran.
        assert app.torn_down == ["stream", "index"]
        assert telemetry.value(HEALED, {"ctxguard.context.kind": "app"}) == 1
        # Counted once, not again when found stale at the start of request 2.
        assert telemetry.value(LEAKS, {"ctxguard.context.kind": "app"}) == 1

        # The worker is clean: the next request needs no healing.
        app.torn_down.clear()
        pool.submit(call, app, "/").result()
        assert app.torn_down == ["index"]
        assert telemetry.value(HEALED, {"ctxguard.context.kind": "app"}) == 1


def test_a_request_whose_body_is_still_open_is_not_stale(telemetry):
    """A request whose response is still open when the next request starts on its thread is
    alive (an event-loop server interleaves requests this way): its contexts are neither
    reported nor healed then. Once its body is abandoned and finalised they are a leak
    (``request_end``), and the next request on that thread heals them."""
    app = marking_app()
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    kept: list[Any] = []
    with ThreadPoolExecutor(1) as pool:

        def first() -> None:
            body = app(environ("/stream"), start_response)
            next(iter(body))
            kept.append(body)  # the server still holds it

        pool.submit(first).result()
        assert pool.submit(call, app, "/").result()[2] == b"hello"
        assert telemetry.value(LEAKS) == 0
        assert telemetry.value(HEALED) == 0

        kept.clear()  # abandoned: finalised here, on another thread than the one serving it
        gc.collect()
        assert telemetry.value(LEAKS, leaks("app", "request_end")) == 1
        span = next(
            s for s in telemetry.spans(LEAK_SPAN) if s.attributes["ctxguard.context.kind"] == "app"
        )
        assert span.attributes["http.route"] == "/stream"
        pool.submit(call, app, "/").result()
    assert telemetry.value(HEALED, {"ctxguard.context.kind": "app"}) == 1
    # Found at the end and healed at the next start: counted once.
    assert telemetry.value(LEAKS, {"ctxguard.context.kind": "app"}) == 1


def test_heal_off_reports_but_leaves_the_context(telemetry):
    """With ``heal=False`` the stale context is reported and left alone."""
    app = marking_app()
    ctxguard.CtxGuard(app, environment="production", heal=False, **telemetry.providers)
    with ThreadPoolExecutor(1) as pool:
        _abandon_stream_on_another_thread(app, pool)
        app.torn_down.clear()
        pool.submit(call, app, "/").result()
    assert telemetry.value(LEAKS, {"ctxguard.context.kind": "app"}) == 1
    assert telemetry.value(HEALED) == 0
    assert app.torn_down == []  # exactly what Flask does without ctxguard


def test_streamed_body_consumed_and_closed_is_clean(telemetry):
    """A stream_with_context response read to the end and closed leaks nothing, even when
    its contexts stay pushed until close() (Flask 2.3/3.0) or are pushed while iterating (3.1)."""
    app = marking_app()
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    _status, _, data = call(app, "/stream")
    assert data == b"abc"
    assert telemetry.value(LEAKS) == 0
    assert ctxguard.snapshot()["workers"] == []


def test_body_closed_late_on_another_thread_after_full_read(telemetry):
    """Closing an exhausted body from another thread is fine: nothing is left behind."""
    app = marking_app()
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    body = app(environ("/stream"), start_response)
    assert b"".join(body) == b"abc"
    closer = threading.Thread(target=body.close)
    closer.start()
    closer.join()
    assert telemetry.value(LEAKS) == 0


def test_body_closed_mid_stream_on_another_thread_is_a_leak(telemetry):
    """close() called mid-stream from another thread cannot pop the contexts on the worker:
    Flask's error reaches the caller of close() unchanged, and the leak is reported at
    ``request_end``; the worker is healed at its next request."""
    app = marking_app()
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    errors: list[BaseException] = []

    def first() -> Any:
        body = app(environ("/stream"), start_response)
        next(iter(body))
        return body

    def close(body: Any) -> None:
        try:
            body.close()
        except BaseException as exc:
            errors.append(exc)

    with ThreadPoolExecutor(1) as pool:
        body = pool.submit(first).result()
        closer = threading.Thread(target=close, args=(body,))
        closer.start()
        closer.join()
        assert [type(e) for e in errors] in ([LookupError], [ValueError])
        assert telemetry.value(LEAKS, leaks("app", "request_end")) == 1
        app.torn_down.clear()
        pool.submit(call, app, "/").result()
        assert "index" in app.torn_down


def test_import_time_push_is_reported_once_per_site_and_not_healed(telemetry):
    """An app context pushed outside any request (at import time) is shared by every request
    on that worker: reported once with its push site, and left in place."""
    app = marking_app()
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    ambient = app.app_context()
    ambient.push()  # push-site: import
    try:
        for _ in range(3):
            call(app, "/")
        assert telemetry.value(LEAKS, leaks("app", "request_start")) == 1
        assert telemetry.value(HEALED) == 0
        (span,) = telemetry.spans(LEAK_SPAN)
        assert span.attributes["code.line.number"] == line_of(__file__, "# push-site: " + "import")
        assert "http.route" not in span.attributes
        # Every request shared the ambient context's g and never tore it down: the bug shown.
        assert app.torn_down == []
    finally:
        ambient.pop()


def test_push_before_ctxguard_is_still_seen(telemetry):
    """A context pushed before ``CtxGuard(app)`` (site unknown) is still reported."""
    app = marking_app()
    ambient = app.app_context()
    ambient.push()
    try:
        ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
        call(app, "/")
        call(app, "/")
        assert telemetry.value(LEAKS, leaks("app", "request_start")) == 1
    finally:
        ambient.pop()


def test_ambient_context_in_testing_is_normal(telemetry):
    """In tests an app context around the test client is normal: nothing is reported."""
    app = make_app()
    app.testing = True
    ctxguard.CtxGuard(app, **telemetry.providers)
    with app.app_context():
        client = app.test_client()
        assert client.get("/").status_code == 200
        assert client.get("/items/2").status_code == 200
    assert telemetry.value(LEAKS) == 0
    assert telemetry.spans() == []


def test_with_client_keeps_the_preserved_context_in_testing(telemetry):
    """The test client's ``with client:`` still preserves the request context."""
    from flask import request

    app = make_app()
    app.testing = True
    ctxguard.CtxGuard(app, **telemetry.providers)
    with app.test_client() as client:
        client.get("/items/5")
        assert request.path == "/items/5"
        client.get("/")
        assert request.path == "/"
    assert telemetry.value(LEAKS) == 0


def test_a_plain_wsgi_app_passes_through(telemetry):
    """A WSGI app that is not Flask gets exactly its own response back."""

    def plain(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"plain ", environ.get("PATH_INFO", "").encode()]

    guarded = ctxguard.CtxGuardMiddleware(plain, **telemetry.providers)
    env = {"PATH_INFO": "/x"}
    result = guarded(env, start_response)
    assert result == [b"plain ", b"/x"]
    assert env == {"PATH_INFO": "/x"}
    assert telemetry.value(LEAKS) == 0


@unraisable_ok
def test_body_dropped_on_its_own_thread_is_not_a_leak(telemetry):
    """A server that drops the body without close() on the thread that served it: the
    body is finalised there, as without ctxguard, and nothing is reported as leaked."""
    app = marking_app()
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    for path in ("/", "/stream"):
        body = app(environ(path), start_response)
        next(iter(body))
        del body
    assert telemetry.value(LEAKS) == 0
    app.torn_down.clear()
    call(app, "/")
    assert app.torn_down == ["index"]
    assert telemetry.value(HEALED) == 0


def test_threads_that_come_and_go_leave_nothing_behind(telemetry):
    """Many short-lived worker threads (Werkzeug's server starts one per request): the
    ledger keeps no trace of the ended ones, and the counts stay exact."""
    app = make_app()
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    for _ in range(50):
        t = threading.Thread(target=call, args=(app, "/"))
        t.start()
        t.join()
    assert telemetry.value("ctxguard.context.pushes", {"ctxguard.context.kind": "request"}) == 50
    assert telemetry.value(LEAKS) == 0
    gc.collect()
    workers = [o for o in gc.get_objects() if type(o).__name__ == "Worker"]
    assert len(workers) <= 2  # this thread's, and at most one not yet collected


def test_copied_request_contexts_are_not_leaks(telemetry):
    """Work handed to a thread or to a close callback with copy_current_request_context
    pushes and pops its own copy: nothing is reported, the thread sees the request."""
    from flask import copy_current_request_context, request

    app = make_app()
    seen: list[str] = []

    @app.route("/spawn")
    def spawn() -> Any:
        @copy_current_request_context
        def in_thread() -> None:
            seen.append(request.path)

        worker = threading.Thread(target=in_thread)
        worker.start()
        worker.join()

        @copy_current_request_context
        def on_close() -> None:
            seen.append("closed " + request.path)

        response = app.make_response("spawned")
        response.call_on_close(on_close)
        return response

    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    for _ in range(2):
        assert call(app, "/spawn")[2] == b"spawned"
        call(app, "/")
    assert seen == ["/spawn", "closed /spawn"] * 2
    assert telemetry.value(LEAKS) == 0
    assert telemetry.value("ctxguard.context.pops", {"ctxguard.pop.outcome": "cross_worker"}) == 0
