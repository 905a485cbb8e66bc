"""The middleware: stale, ambient and leaked contexts around each request."""

from __future__ import annotations

import gc
import logging
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from flask import Flask, g, request, stream_with_context
from helpers import (
    CONTEXT_VARS,
    MERGED,
    REQUEST_PUSHES,
    call,
    context_kind,
    environ,
    line_of,
    make_app,
    without_ids,
    wrong_pop,
)

import ctxguard

LEAKS = "ctxguard.context.leaks"
HEALED = "ctxguard.context.healed"
LEAK_SPAN = "ctxguard.context_leak"
unraisable_ok = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def leaks(kind: str, site: str) -> dict[str, str]:
    return {"ctxguard.context.kind": kind, "ctxguard.leak.site": site}


def by_kind(telemetry: Any, metric: str, site: str | None = None) -> dict[str, int]:
    """A counter's non-zero totals by context kind (of leaks: only those found at ``site``)."""
    totals: Counter[str] = Counter()
    for attrs, value in telemetry.points(metric):
        if site is None or attrs.get("ctxguard.leak.site") == site:
            totals[attrs["ctxguard.context.kind"]] += value
    return {kind: n for kind, n in totals.items() if n}


#: What ctxguard finds left by a view that pushes an app context and never pops it, by
#: kind. Up to Flask 3.1 wsgi_app pops the request's contexts anyway (the view's becomes
#: unreachable); Flask 3.2 refuses to pop the request's own context, which is not the
#: current one: it stays pushed too, and is reported with the view's line.
LEFT_BY_A_VIEW = {"app": 1, "request": 1} if MERGED else {"app": 1}


def start_response(status: str, headers: list[Any], exc_info: Any = None) -> None:
    pass


def current_on(pool: ThreadPoolExecutor) -> list[Any]:
    """The Flask contexts current on the pool's (single) thread, innermost first."""

    def current() -> list[Any]:
        return [ctx for ctx in (var.get(None) for var in CONTEXT_VARS) if ctx is not None]

    return pool.submit(current).result()


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
    request with the view's line; Flask's own error still reaches the server unchanged.
    On Flask 3.2, where Flask refuses to pop the request's own context from under it, that
    one is reported too, with the same line. Nothing is reported twice."""
    app = make_app()

    @app.route("/report")
    def report() -> str:
        app.app_context().push()  # push-site: view
        return "done"

    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    with wrong_pop():
        call(app, "/report")

    assert by_kind(telemetry, LEAKS, "request_end") == LEFT_BY_A_VIEW
    spans = sorted(telemetry.spans(LEAK_SPAN), key=lambda s: s.attributes["ctxguard.context.kind"])
    assert [s.attributes["ctxguard.context.kind"] for s in spans] == sorted(LEFT_BY_A_VIEW)
    for span in spans:
        attrs = dict(span.attributes)
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
    assert telemetry.value(LEAKS) == sum(LEFT_BY_A_VIEW.values())


def test_manual_request_context_push_in_a_view(telemetry):
    """The same for a request context pushed by hand inside a view (on Flask 3.2 the
    request's own context is left too, and it is a request context as well)."""
    app = make_app()

    @app.route("/nested")
    def nested() -> str:
        app.test_request_context("/items/1").push()  # push-site: request
        return "done"

    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    with wrong_pop("request"):
        call(app, "/nested")
    # Up to 3.1 the request context pushed in the view reuses the current app context and is
    # jumped over by Flask's pop; 3.2 refuses to pop the request's own context: both stay.
    left = 2 if MERGED else 1
    assert by_kind(telemetry, LEAKS, "request_end") == {"request": left}
    # One span: the second leak has the same kind and push site (spans are throttled per site).
    (span,) = telemetry.spans(LEAK_SPAN)
    assert span.attributes["code.line.number"] == line_of(__file__, "# push-site: " + "request")


SECRET_PATH = "alice-4471"
SECRET_QUERY = "token=s3cr3t-9b2e"


def account_app() -> Flask:
    """An app whose view pushes an app context and never pops it."""
    app = make_app()

    @app.route("/account/<name>")
    def account(name: str) -> str:
        app.app_context().push()  # push-site: account
        return name

    return app


def exported_texts(telemetry: Any, records: list[logging.LogRecord]) -> list[str]:
    """Every text a log record or the telemetry carries: messages, span names, attribute
    values, events, statuses and metric attributes."""
    texts = [r.getMessage() for r in records]
    texts += [str(r.exc_info[1]) for r in records if r.exc_info and r.exc_info[1]]
    for span in telemetry.spans():
        texts.append(span.name)
        texts += [str(v) for v in span.attributes.values()]
        texts.append(str(span.status.description))
        for event in span.events:
            texts.append(event.name)
            texts += [str(v) for v in (event.attributes or {}).values()]
    data = telemetry.reader.get_metrics_data()
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for point in metric.data.data_points:
                    texts += [str(v) for v in point.attributes.values()]
    return texts


def test_a_view_that_never_pops_gets_flasks_own_error_and_no_url_is_reported(telemetry, caplog):
    """A view that pushes an app context and never pops it, in production: the server gets
    exactly the error it gets without ctxguard (Flask's complaint about the request's pop,
    same type and message: a ``RuntimeError`` refusing the pop on Flask 3.2, an
    ``AssertionError`` after it up to 3.1). ctxguard reports what stays pushed at the
    request's end, at the view's line: on 3.2 the view's app context and the request's own
    context, still current on the thread; up to 3.1 the view's context, which Flask's pop
    made unreachable. Flask's message holds the request's URL: no log record, span or metric
    attribute does. On 3.2 the next request on that thread heals both (their teardown
    runs) and leaves the thread clean."""
    caplog.set_level(logging.DEBUG)
    path = f"/account/{SECRET_PATH}"

    def serve(app: Flask) -> BaseException:
        with pytest.raises(BaseException) as raised:
            call(app, path, QUERY_STRING=SECRET_QUERY)
        return raised.value

    with ThreadPoolExecutor(1) as pool:  # a thread of its own, which leaves nothing here
        unguarded = pool.submit(serve, account_app()).result()

    app = account_app()
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    error = serve(app)
    assert type(error) is type(unguarded)
    assert without_ids(str(error)) == without_ids(str(unguarded))
    with wrong_pop():
        raise error
    if MERGED:
        # 3.2's message names the request's context by its URL, query string included.
        assert SECRET_PATH in str(error)
        assert SECRET_QUERY in str(error)
        assert len(app.teardowns) == 0  # type: ignore[attr-defined]  # nothing was popped
    else:
        assert len(app.teardowns) == 1  # type: ignore[attr-defined]  # the request's own

    assert by_kind(telemetry, LEAKS, "request_end") == LEFT_BY_A_VIEW
    spans = telemetry.spans(LEAK_SPAN)
    assert sorted(s.attributes["ctxguard.context.kind"] for s in spans) == sorted(LEFT_BY_A_VIEW)
    for span in spans:
        assert span.attributes["code.line.number"] == line_of(__file__, "# push-site: " + "account")
        assert span.attributes["http.route"] == "/account/<name>"

    teardowns = len(app.teardowns)  # type: ignore[attr-defined]
    assert call(app, "/")[2] == b"hello"
    if MERGED:
        # Both were still current on this thread: popped before the request ran.
        assert by_kind(telemetry, HEALED) == {"app": 1, "request": 1}
    else:
        # Flask's pop reset its variables past the view's context: nothing can pop it.
        assert by_kind(telemetry, HEALED) == {}
    healed = sum(by_kind(telemetry, HEALED).values())
    assert len(app.teardowns) == teardowns + healed + 1  # type: ignore[attr-defined]
    assert [var.get(None) for var in CONTEXT_VARS] == [None] * len(CONTEXT_VARS)
    assert telemetry.value(LEAKS) == sum(LEFT_BY_A_VIEW.values())  # not again when healed

    texts = exported_texts(telemetry, caplog.records)
    assert any(text.startswith("ctxguard: app context leaked") for text in texts)
    for text in texts:
        assert SECRET_PATH not in text
        assert SECRET_QUERY.split("=")[1] not in text
        assert "http://localhost" not in text


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


#: The contexts a request served with a ``stream_with_context`` body keeps pushed on its
#: thread while the body is open, by kind: the request's contexts, that is its own on Flask
#: 3.2 (it holds the request), its request context and the app context under it up to 3.1.
STREAM_CONTEXTS = REQUEST_PUSHES


@unraisable_ok
def test_flask_6123_without_ctxguard_the_stale_context_is_never_torn_down():
    """Control for the reproduction below: the bug is real on this Flask version. A
    stream_with_context body abandoned mid-stream on a pooled worker thread, and finalised
    on another thread, leaves its request's context current on the worker, where nothing
    pops it: the requests that follow on that thread never tear it down. Up to Flask 3.1
    they reuse its app context, so their own teardown_appcontext never runs either; Flask
    3.2 pushes each one a context of its own over the stale one, torn down as usual."""
    app = marking_app()
    with ThreadPoolExecutor(1) as pool:
        _abandon_stream_on_another_thread(app, pool)
        stale = current_on(pool)
        assert Counter(context_kind(ctx) for ctx in stale) == STREAM_CONTEXTS
        app.torn_down.clear()
        for _ in range(3):
            _status, _, data = pool.submit(call, app, "/").result()
            assert data == b"hello"
        if MERGED:
            # Each request pushed and tore down its own context; the stale one's never ran.
            assert app.torn_down == ["index", "index", "index"]
        else:
            # The stuck context of request 1 is reused: no request's teardown ever runs.
            assert app.torn_down == []
        # Still current on the worker, with the g of the abandoned request.
        assert current_on(pool) == stale
        assert pool.submit(lambda: g.get("marker")).result() == "stream"


@unraisable_ok
def test_flask_6123_abandoned_stream_is_reported_and_healed(telemetry):
    """pallets/flask#6123: a stream_with_context body abandoned mid-stream and finalised on
    another thread leaves its request's contexts on the pooled worker thread (the request's
    own on Flask 3.2; its request and app contexts up to 3.1). ctxguard reports each one at
    the request's end with its route, push site and thread; at the next request on that
    thread it pops them (healed, counted once per context popped), so their teardown runs
    before the new request's own, and the worker is clean from then on."""
    app = marking_app()
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    with ThreadPoolExecutor(1, thread_name_prefix="pooled") as pool:
        _abandon_stream_on_another_thread(app, pool)
        stale = current_on(pool)
        assert Counter(context_kind(ctx) for ctx in stale) == STREAM_CONTEXTS

        assert by_kind(telemetry, LEAKS, "request_end") == STREAM_CONTEXTS
        spans = telemetry.spans(LEAK_SPAN)
        assert Counter(s.attributes["ctxguard.context.kind"] for s in spans) == STREAM_CONTEXTS
        for span in spans:
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
        assert current_on(pool) == []
        # Healed: exactly the stale contexts, each once.
        assert by_kind(telemetry, HEALED) == Counter(context_kind(ctx) for ctx in stale)
        # Counted once, not again when found stale at the start of request 2.
        assert by_kind(telemetry, LEAKS) == STREAM_CONTEXTS

        # The worker is clean: the next request needs no healing.
        app.torn_down.clear()
        pool.submit(call, app, "/").result()
        assert app.torn_down == ["index"]
        assert by_kind(telemetry, HEALED) == STREAM_CONTEXTS


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
        assert by_kind(telemetry, LEAKS, "request_end") == STREAM_CONTEXTS
        spans = telemetry.spans(LEAK_SPAN)
        assert [s.attributes["http.route"] for s in spans] == ["/stream"] * len(spans)
        pool.submit(call, app, "/").result()
    assert by_kind(telemetry, HEALED) == STREAM_CONTEXTS
    # Found at the end and healed at the next start: counted once.
    assert by_kind(telemetry, LEAKS) == STREAM_CONTEXTS


def test_heal_off_reports_but_leaves_the_context(telemetry):
    """With ``heal=False`` the stale context is reported and left alone."""
    app = marking_app()
    ctxguard.CtxGuard(app, environment="production", heal=False, **telemetry.providers)
    with ThreadPoolExecutor(1) as pool:
        _abandon_stream_on_another_thread(app, pool)
        stale = current_on(pool)
        app.torn_down.clear()
        pool.submit(call, app, "/").result()
        assert current_on(pool) == stale  # still there
    assert by_kind(telemetry, LEAKS) == STREAM_CONTEXTS
    assert telemetry.value(HEALED) == 0
    # Exactly what Flask does without ctxguard: up to 3.1 the request reused the stale app
    # context and tore nothing down; on 3.2 it tore down its own context, not the stale one.
    assert app.torn_down == (["index"] if MERGED else [])


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
        if MERGED:
            # 3.2 refuses to pop a context that is not current on the calling thread.
            (error,) = errors
            assert type(error) is RuntimeError
            assert "there is no active context" in str(error)
        else:
            # Up to 3.1 the pop fails resetting the context variable of another thread.
            assert [type(e) for e in errors] in ([LookupError], [ValueError])
        assert by_kind(telemetry, LEAKS, "request_end") == STREAM_CONTEXTS
        app.torn_down.clear()
        pool.submit(call, app, "/").result()
        assert app.torn_down == ["stream", "index"]
        assert by_kind(telemetry, HEALED) == STREAM_CONTEXTS


def test_import_time_push_is_reported_once_per_site_and_not_healed(telemetry):
    """An app context pushed outside any request (at import time) stays under every request
    on that worker: reported once with its push site, and left in place. Up to Flask 3.1
    every request shares it (and its ``g``); on 3.2 each pushes its own context over it."""
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
        if MERGED:
            # Each request tore down its own context; the ambient one's teardown never ran.
            assert app.torn_down == ["index", "index", "index"]
        else:
            # Every request shared the ambient context's g and never tore it down: the bug shown.
            assert app.torn_down == []
        assert CONTEXT_VARS[-1].get(None) is ambient  # the app context, left in place
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


# --------------------------------------------------------------------------
# Found by mutation testing: what the middleware decides at the start and the end
# of a request (stale, ambient, test client, healing), bodies that are iterables or
# run code late, what is handed back untouched, and how the guard is set up.


def leaky_stream_app() -> Flask:
    """An app whose streamed body pushes an app context and never pops it."""
    app = make_app()

    @app.route("/stream")
    def stream() -> Any:
        def chunks() -> Any:
            app.app_context().push()  # push-site: stream body
            yield b"a"

        return app.response_class(chunks())

    @app.route("/leak")
    def leak() -> str:
        app.app_context().push()
        return "leaked"

    return app


def test_ambient_context_in_a_testing_app_served_without_the_test_client(telemetry):
    """In a testing app, an app context the test pushed around requests that do not come
    from the test client (a live server, WebTest) is normal: nothing is reported."""
    app = make_app()
    app.testing = True
    ctxguard.CtxGuard(app, **telemetry.providers)
    with app.app_context():
        for _ in range(2):
            assert call(app, "/")[2] == b"hello"
    assert telemetry.value(LEAKS) == 0


def test_test_client_in_production_ambient_context_is_not_reported_stale_one_is(telemetry):
    """Tests that set ``environment="production"``, send a request without the test client
    first (a warm-up call of the WSGI app), then push an app context around test-client
    requests: that context is not ambient (the test client makes the requests), while a
    context left behind by an earlier request is still reported as stale."""
    app = leaky_stream_app()
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    assert call(app, "/")[2] == b"hello"  # not the test client
    app.app_context().push()  # the test's own context, around the test client's requests
    client = app.test_client()
    response = client.get("/stream", buffered=False)  # one chunk read, then abandoned
    del response
    gc.collect()
    for _ in range(2):
        assert client.get("/").data == b"hello"
    assert telemetry.value(LEAKS) == 1
    (span,) = telemetry.spans(LEAK_SPAN)
    assert span.attributes["ctxguard.leak.site"] == "request_start"
    assert span.attributes["http.route"] == "/stream"
    assert span.attributes["code.line.number"] == line_of(__file__, "# push-site: " + "stream body")


def test_test_client_in_production_stale_context_is_reported_not_healed(telemetry):
    """Under the test client nothing is healed, even with ``environment="production"`` and
    after a request that did not come from the test client: a stale context is reported and
    left where the test put it."""
    app = leaky_stream_app()
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    assert call(app, "/")[2] == b"hello"  # not the test client
    client = app.test_client()
    response = client.get("/stream", buffered=False)
    del response
    gc.collect()
    teardowns = len(app.teardowns)  # type: ignore[attr-defined]
    for _ in range(2):
        assert client.get("/").data == b"hello"
    assert telemetry.value(LEAKS, leaks("app", "request_start")) == 1
    assert telemetry.value(HEALED) == 0
    # The stale context is still current, and its teardown never ran. Up to 3.1 the two
    # requests reused it (no teardown at all); on 3.2 each tore down a context of its own.
    assert len(app.teardowns) == teardowns + (2 if MERGED else 0)  # type: ignore[attr-defined]
    (worker,) = ctxguard.snapshot()["workers"]
    assert [c["leaked"] for c in worker["contexts"]] == [True]


def test_a_context_not_current_on_the_worker_is_not_healed(telemetry):
    """A context pushed inside another ``contextvars`` context during a request is reported
    as leaked, but healing does not pop it: it is not the worker's current context, and
    popping it would run its teardown while code in that context may still use it."""
    import contextvars

    app = make_app()

    @app.route("/elsewhere")
    def elsewhere() -> str:
        contextvars.copy_context().run(app.app_context().push)
        return "done"

    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    call(app, "/elsewhere")
    assert telemetry.value(LEAKS, leaks("app", "request_end")) == 1
    call(app, "/")
    assert telemetry.value(HEALED) == 0
    assert len(app.teardowns) == 2  # type: ignore[attr-defined]  # each request's own


def test_context_stuck_by_a_failing_appcontext_pushed_receiver_is_healed(
    telemetry, caplog_ctxguard
):
    """A receiver of ``appcontext_pushed`` that raises. Up to Flask 3.1 it leaves the
    request's app context pushed on the worker (Flask never pops it, and its request-end
    pop fails): the next request heals it, and the log line says Flask pushed it, as there
    is no line of the user's code to name. Flask 3.2 handles the error like any other (a
    500 response) and pops the context itself: nothing is left, reported or healed."""
    from flask import appcontext_pushed

    app = marking_app()
    failures = [ConnectionError("database down")]

    def connect(sender: Flask, **extra: Any) -> None:
        if failures:
            g.marker = "failed push"
            raise failures.pop()

    appcontext_pushed.connect(connect, app)
    try:
        ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
        if MERGED:
            assert call(app, "/")[0] == "500 INTERNAL SERVER ERROR"
            assert app.torn_down == ["failed push"]  # popped by Flask at the request's end
            assert telemetry.value(LEAKS) == 0
        else:
            with pytest.raises(LookupError):
                call(app, "/")  # Flask's own request-end pop fails: nothing to pop
            assert telemetry.value(LEAKS, leaks("app", "request_end")) == 1
        assert call(app, "/")[2] == b"hello"
    finally:
        appcontext_pushed.disconnect(connect, app)
    assert app.torn_down == ["failed push", "index"]
    healed = [r.getMessage() for r in caplog_ctxguard.records if "popped a stale" in r.message]
    if MERGED:
        assert telemetry.value(HEALED) == 0
        assert healed == []
    else:
        assert telemetry.value(HEALED, {"ctxguard.context.kind": "app"}) == 1
        assert healed == [
            "ctxguard: popped a stale app context (pushed at a place Flask chose (no user code"
            " on the stack)) so its teardown ran"
        ]


def test_teardown_errors_while_healing_are_logged_per_push_site(telemetry, caplog_ctxguard):
    """Two stale contexts from two push sites whose teardown raises while they are healed:
    one log line each, within the same minute."""
    app = make_app()

    class TeardownBroke(Exception):
        pass

    @app.teardown_appcontext
    def broken(exc: BaseException | None) -> None:
        if g.get("broken"):
            raise TeardownBroke()

    @app.route("/one")
    def one() -> Any:
        def chunks() -> Any:
            app.app_context().push()  # one push site
            g.broken = True
            yield b"x"

        return app.response_class(chunks())

    @app.route("/two")
    def two() -> Any:
        def chunks() -> Any:
            app.app_context().push()  # another push site
            g.broken = True
            yield b"x"

        return app.response_class(chunks())

    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    for path in ("/one", "/two"):
        body = app.wsgi_app(environ(path), start_response)
        assert next(iter(body)) == b"x"
        del body  # dropped on the thread that served it
        call(app, "/")
    assert telemetry.value(HEALED, {"ctxguard.context.kind": "app"}) == 2
    lines = [r for r in caplog_ctxguard.records if "a teardown function raised" in r.message]
    assert len(lines) == 2


class IterableBody:
    """A response body that is iterable but not an iterator, as many WSGI middlewares
    return (``iter()`` gives a fresh iterator; ``next()`` does not work on it)."""

    def __init__(self, body: Any) -> None:
        self.body = body

    def __iter__(self) -> Any:
        return iter(self.body)

    def close(self) -> None:
        close = getattr(self.body, "close", None)
        if close is not None:
            close()


def iterable_body_app() -> Flask:
    """An app behind a WSGI middleware whose bodies are ``IterableBody`` objects."""
    app = leaky_stream_app()
    inner = app.wsgi_app

    def wrapped(environ: Any, start_response: Any) -> Any:
        return IterableBody(inner(environ, start_response))

    @app.route("/chunks")
    def chunks() -> Any:
        def generate() -> Any:
            yield b"one"
            yield b"two " + request.path.encode()  # outside the request's context

        return app.response_class(generate())

    app.wsgi_app = wrapped  # type: ignore[method-assign]
    return app


def test_requests_next_to_an_iterable_body_are_guarded(telemetry):
    """An event-loop server runs another request on the thread while a body is half read,
    and the next request once it is done: both are guarded like any other (a leak in them
    is reported at their end)."""
    app = iterable_body_app()
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    body = app(environ("/chunks"), start_response)
    chunks = iter(body)
    assert next(chunks) == b"one"
    with wrong_pop():
        call(app, "/leak")  # interleaved, while the body above is half read
    assert by_kind(telemetry, LEAKS, "request_end") == LEFT_BY_A_VIEW
    # The second chunk uses ``request`` outside the request's context. On 3.2 the contexts
    # /leak left are current here, the view's on top, which holds no request.
    outside = "no request in this context" if MERGED else "outside of request context"
    with pytest.raises(RuntimeError, match=outside):
        next(chunks)
    body.close()
    with wrong_pop():
        call(app, "/leak")  # after the body was read and closed
    assert by_kind(telemetry, LEAKS, "request_end") == {k: 2 * n for k, n in LEFT_BY_A_VIEW.items()}


def test_proxy_error_in_a_later_chunk_of_an_iterable_body_names_the_request(telemetry):
    """``request`` used in the second chunk of a streamed body (a body that is iterable, not
    an iterator): the error is counted for the request being streamed, with its route, like
    one in the first chunk."""
    app = iterable_body_app()
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    with pytest.raises(RuntimeError, match="outside of request context"):
        call(app, "/chunks")
    errors = "ctxguard.context.errors"
    assert telemetry.value(errors) == 1
    attributes = {"ctxguard.worker.kind": "request", "http.route": "/chunks"}
    assert telemetry.value(errors, attributes) == 1


def test_a_wsgi_app_bound_to_an_object_that_is_not_flask_is_not_an_app(telemetry):
    """A plain WSGI app that is a bound method of some object (not a Flask app): its
    ``debug`` and ``config`` are not Flask's, so the environment stays production (the
    default without ``app=``), the preserve key is removed, and its config is untouched."""

    class Framework:
        def __init__(self) -> None:
            self.debug = True
            self.config = {"PRESERVE_CONTEXT_ON_EXCEPTION": True}
            self.seen: list[bool] = []

        def wsgi(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
            self.seen.append("werkzeug.debug.preserve_context" in environ)
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"plain"]

    framework = Framework()
    guarded = ctxguard.CtxGuardMiddleware(framework.wsgi, **telemetry.providers)
    assert guarded.app is None
    preserved: list[Any] = []
    env = {"werkzeug.debug.preserve_context": preserved.append}
    assert guarded(env, start_response) == [b"plain"]
    assert framework.seen == [False]
    assert framework.config == {"PRESERVE_CONTEXT_ON_EXCEPTION": True}
    violations = "ctxguard.policy.violations"
    assert telemetry.value(violations, {"ctxguard.policy.rule": "debug_mode"}) == 0


def test_ambient_contexts_pushed_at_one_line_are_reported_once(telemetry, caplog_ctxguard):
    """Each app context pushed outside any request by the same line of code (a helper that
    sets up every worker, a loop) is one problem: reported once, and every such context is
    marked as reported in ``snapshot()``."""
    app = make_app()
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)

    def set_up() -> Any:
        ctx = app.app_context()
        ctx.push()  # the same line for every context
        return ctx

    for _ in range(2):
        ctx = set_up()
        try:
            assert call(app, "/")[2] == b"hello"
            (worker,) = ctxguard.snapshot()["workers"]
            assert [c["leaked"] for c in worker["contexts"]] == [True]
        finally:
            ctx.pop()
    assert telemetry.value(LEAKS, leaks("app", "request_start")) == 1
    assert [r.message for r in caplog_ctxguard.records if "internal error" in r.message] == []


def test_werkzeug_test_client_on_the_plain_middleware_heals_nothing(telemetry):
    """Werkzeug's own test ``Client`` around a ``CtxGuardMiddleware`` (plain WSGI, no
    ``CtxGuard``) makes test requests too: a stale context is reported, not healed."""
    from werkzeug.test import Client

    app = leaky_stream_app()
    guarded = ctxguard.CtxGuardMiddleware(
        app.wsgi_app, app=app, environment="production", **telemetry.providers
    )
    assert call(guarded, "/")[2] == b"hello"  # not the test client
    body = guarded(environ("/stream"), start_response)
    assert next(iter(body)) == b"a"
    del body  # dropped on the thread that served it: its context is stale
    assert Client(guarded).get("/").data == b"hello"
    assert telemetry.value(LEAKS, leaks("app", "request_start")) == 1
    assert telemetry.value(HEALED) == 0


def test_a_context_popped_by_another_thread_in_its_contextvars_context_is_not_a_leak(telemetry):
    """A view pushes an app context inside a ``contextvars.Context`` and another thread
    pops it in that same Context (``Context.run``, as some task runners do): Flask accepts
    the pop, so nothing is left open and the request's end reports no leak."""
    import contextvars

    app = make_app()

    @app.route("/handoff")
    def handoff() -> str:
        shared = contextvars.copy_context()
        ctx = app.app_context()
        shared.run(ctx.push)
        popper = threading.Thread(target=shared.run, args=(ctx.pop,))
        popper.start()
        popper.join()
        return "handed off"

    @app.route("/handoff-stream")
    def handoff_stream() -> Any:
        handoff()
        return app.response_class(chunk for chunk in [b"streamed"])

    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    assert call(app, "/handoff")[2] == b"handed off"
    pops = "ctxguard.context.pops"
    assert telemetry.value(pops, {"ctxguard.pop.outcome": "cross_worker"}) == 1
    assert telemetry.value(LEAKS) == 0
    assert ctxguard.snapshot()["workers"] == []

    # The same, with the streamed body read and closed by a third thread (a server
    # writing the response elsewhere): the context Flask popped is not a leak either.
    body = app(environ("/handoff-stream"), start_response)
    written: list[bytes] = []

    def write() -> None:
        written.append(b"".join(body))
        body.close()

    writer = threading.Thread(target=write)
    writer.start()
    writer.join()
    assert written == [b"streamed"]
    assert telemetry.value(pops, {"ctxguard.pop.outcome": "cross_worker"}) == 2
    assert telemetry.value(LEAKS) == 0


@pytest.mark.parametrize("ambient", [False, True], ids=["nothing-open", "ambient-context"])
def test_a_context_a_body_pushed_on_the_thread_writing_it_is_a_request_end_leak(telemetry, ambient):
    """A server that writes the response on another thread than the one that ran the app: a
    context the streamed body pushed there and never popped is reported when the body is
    closed (``request_end``), on that thread, whether or not anything is open on the app's
    thread (there, optionally, an app context pushed at start-up)."""
    app = make_app()

    @app.route("/stream")
    def stream() -> Any:
        def chunks() -> Any:
            app.app_context().push()  # push-site: writer thread
            yield b"a"

        return app.response_class(chunks())

    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    if ambient:
        app.app_context().push()  # at start-up, on the app's thread
    body = app(environ("/stream"), start_response)
    written: list[bytes] = []
    done, finish = threading.Event(), threading.Event()

    def write() -> None:
        try:
            written.append(b"".join(body))
            body.close()
        finally:
            done.set()
        finish.wait()  # the writer thread lives on, as a pooled one does

    writer = threading.Thread(target=write, name="writer")
    writer.start()
    done.wait()
    try:
        assert written == [b"a"]
        assert telemetry.value(LEAKS, leaks("app", "request_end")) == 1
    finally:
        finish.set()
        writer.join()
    (span,) = [
        s for s in telemetry.spans(LEAK_SPAN) if s.attributes["ctxguard.leak.site"] == "request_end"
    ]
    assert span.attributes["thread.name"] == "writer"
    assert span.attributes["http.route"] == "/stream"
    assert span.attributes["code.line.number"] == line_of(
        __file__, "# push-site: " + "writer thread"
    )


def record_what_flask_returns(app: Flask) -> list[Any]:
    """The objects the app's own ``wsgi_app`` returns, in order (before any guard)."""
    returned: list[Any] = []
    flask_wsgi_app = app.wsgi_app

    def recording(environ: Any, start_response: Any) -> Any:
        returned.append(flask_wsgi_app(environ, start_response))
        return returned[-1]

    app.wsgi_app = recording  # type: ignore[method-assign]
    return returned


def test_an_ordinary_response_is_handed_back_as_it_is_with_an_ambient_context(telemetry):
    """An ordinary (not streamed) response, and the empty body of a ``HEAD`` request, go back
    to the server as the very object Flask returned, also on a thread where an app context
    was pushed at start-up: nothing of the request can run after it returned, so there is
    nothing to watch."""
    app = make_app()
    returned = record_what_flask_returns(app)
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    app.app_context().push()  # at start-up, on this thread
    for path, method in (("/", "GET"), ("/items/1", "GET"), ("/", "HEAD")):
        body = app(environ(path, method), start_response)
        assert body is returned[-1]
        body.close()


def test_send_file_bodies_that_run_no_code_are_handed_back_as_they_are(telemetry):
    """``send_file`` answers with Werkzeug objects that read the file and run no code of the
    app: a Range request under a server whose ``wsgi.file_wrapper`` is a function (uWSGI)
    gets Flask's range wrapper, and a server whose file wrapper is Werkzeug's own
    ``FileWrapper`` class gets its own wrapper object, both exactly as Flask returned them."""
    import io

    from flask import send_file
    from werkzeug.wsgi import FileWrapper

    app = make_app()

    @app.route("/file")
    def file() -> Any:
        return send_file(io.BytesIO(b"0123456789" * 10), mimetype="text/plain")

    returned = record_what_flask_returns(app)

    def uwsgi_file_wrapper(filelike: Any, blksize: int = 8192) -> Any:
        return filelike

    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    for extra in (
        {"wsgi.file_wrapper": uwsgi_file_wrapper, "HTTP_RANGE": "bytes=10-29"},
        {"wsgi.file_wrapper": FileWrapper},
    ):
        body = app(environ("/file", **extra), start_response)
        assert body is returned[-1]
        body.close()
    assert [type(body).__name__ for body in returned] == ["_RangeWrapper", "FileWrapper"]


class SizedRows:
    """A body with a length and a ``close()`` of its own (a result set the view returns):
    Flask does not stream it, but its ``close`` is the app's code."""

    def __init__(self, rows: list[bytes]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Any:
        return iter(self.rows)

    def close(self) -> None:
        self.rows.append(request.path.encode())  # outside the request's context


def late_code_app() -> Flask:
    """Responses whose code runs after the view returned, each touching ``request`` there."""
    app = make_app()

    @app.route("/on-close")
    def on_close() -> Any:
        response = app.make_response("closing")
        response.call_on_close(lambda: request.path)  # outside the request's context
        return response

    @app.route("/mapped")
    def mapped() -> Any:
        return app.response_class(map(lambda row: f"{row} {request.path}", ["a", "b"]))

    @app.route("/rows")
    def rows() -> Any:
        return app.response_class(SizedRows([b"a", b"b"]))

    return app


@pytest.mark.parametrize("path", ["/on-close", "/mapped", "/rows"])
def test_code_a_response_runs_after_the_view_is_attributed_to_its_request(telemetry, path):
    """Code of the app that runs after the view returned (a ``call_on_close`` callback, a
    body mapped lazily, the ``close`` of the body the view returned) and uses ``request``
    there: the error is counted for the request being served, with its route, so the hint
    says to wrap that code for the request."""
    app = late_code_app()
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    with pytest.raises(RuntimeError, match="outside of request context"):
        call(app, path)
    errors = "ctxguard.context.errors"
    assert telemetry.value(errors) == 1
    assert telemetry.value(errors, {"ctxguard.worker.kind": "request", "http.route": path}) == 1


def test_the_request_after_one_whose_app_raised_is_guarded(telemetry):
    """A request whose app raised (here Flask's own complaint about the request's pop after a
    view left a context pushed) does not leave the thread unguarded: the same leak in the
    next request is reported too."""
    app = leaky_stream_app()
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    for count in (1, 2):
        with wrong_pop():
            call(app, "/leak")
        left = {kind: count * n for kind, n in LEFT_BY_A_VIEW.items()}
        assert by_kind(telemetry, LEAKS, "request_end") == left


def test_a_middleware_whose_app_was_dropped_says_what_to_keep(telemetry):
    """``CtxGuard`` holds the app only weakly (so a dropped app is freed at once). Code that
    kept only ``app.wsgi_app`` and dropped the app gets an error naming the cause and the
    fix, rather than a confusing failure inside Flask."""
    app = make_app()
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    guard = app.wsgi_app
    del app
    gc.collect()
    with pytest.raises(RuntimeError) as raised:
        guard(environ("/"), start_response)
    assert str(raised.value) == (
        "ctxguard: the Flask app this middleware guarded was garbage collected;"
        " keep a reference to the app itself, not only to app.wsgi_app"
    )


def test_an_environment_that_cannot_be_read_alters_nothing_and_is_logged(
    telemetry, caplog_ctxguard
):
    """An app whose config raises when ``DEBUG`` or ``TESTING`` is read (a broken settings
    object): ctxguard cannot tell the environment, so it alters nothing (the preserve key is
    kept, as in development), and logs one line naming what failed, by exception type."""
    from flask import Config

    class BrokenSettings(Config):
        def __getitem__(self, key: Any) -> Any:
            if key in ("DEBUG", "TESTING"):
                raise LookupError("settings backend down")
            return super().__getitem__(key)

    app = make_app()
    seen: list[bool] = []

    @app.route("/look")
    def look() -> str:
        seen.append("werkzeug.debug.preserve_context" in request.environ)
        return "looked"

    ctxguard.CtxGuard(app, **telemetry.providers)
    app.config = BrokenSettings(app.root_path, app.config)  # type: ignore[assignment]
    assert call(app, "/look", **{"werkzeug.debug.preserve_context": [].append})[2] == b"looked"
    assert seen == [True]
    (line,) = [r.getMessage() for r in caplog_ctxguard.records if "internal error" in r.message]
    assert line.startswith("ctxguard: internal error in environment (ignored, ")
    assert "LookupError" in line


SHOP_APP = """\
from flask import Flask

import toolkit
from shopapp import vendored


def create_app():
    app = Flask(__name__)

    @app.route("/own")
    def own():
        app.app_context().push()  # the app's own line
        return "own"

    @app.route("/included")
    def included():
        toolkit.push(app)
        return "included"

    @app.route("/excluded")
    def excluded():
        vendored.push(app)  # the caller of an excluded helper
        return "excluded"

    return app
"""
HELPER = "def push(app):\n    app.app_context().push()  # the helper's line\n"


def test_the_line_reported_follows_the_apps_package_and_the_in_app_options(
    telemetry, tmp_path, monkeypatch
):
    """An app installed into ``site-packages`` (a container image), guarded with
    ``in_app_include`` and ``in_app_exclude``: a leak is placed at the app's own line, at
    the line of a library included as the user's code, and at the app's line that called a
    helper of an excluded module."""
    site = tmp_path / "site-packages"
    for path, text in (
        (site / "shopapp" / "__init__.py", SHOP_APP),
        (site / "shopapp" / "vendored.py", HELPER),
        (site / "toolkit" / "__init__.py", HELPER),
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    monkeypatch.syspath_prepend(str(site))
    for name in ("shopapp", "shopapp.vendored", "toolkit"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import shopapp  # type: ignore[import-not-found]

    app = shopapp.create_app()
    ctxguard.CtxGuard(
        app,
        environment="production",
        in_app_include=["toolkit"],
        in_app_exclude=["shopapp.vendored"],
        **telemetry.providers,
    )
    for path in ("/own", "/included", "/excluded"):
        with wrong_pop():
            call(app, path)
    app_file = str(site / "shopapp" / "__init__.py")
    sites = {
        (span.attributes["http.route"], span.attributes["ctxguard.context.kind"]): (
            span.attributes["code.file.path"],
            span.attributes["code.line.number"],
        )
        for span in telemetry.spans(LEAK_SPAN)
    }
    expected = {
        "/own": (app_file, line_of(app_file, "# the app's own line")),
        "/included": (str(site / "toolkit" / "__init__.py"), 2),
        "/excluded": (app_file, line_of(app_file, "# the caller of an excluded helper")),
    }
    # Each leak is placed there: on 3.2 the request's own context too, which has no push
    # site of its own and takes the one of the view's context.
    assert sites == {
        (route, kind): place for route, place in expected.items() for kind in LEFT_BY_A_VIEW
    }


def test_an_app_guarded_then_wrapped_is_not_guarded_twice(telemetry):
    """Middleware added around the guard after ``CtxGuard(app)`` (``ProxyFix``, say), then
    the factory code run again: the app keeps its one guard, and ``CtxGuard.middleware``
    still finds it."""
    from werkzeug.middleware.proxy_fix import ProxyFix

    app = make_app()
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    guard = app.wsgi_app
    app.wsgi_app = ProxyFix(guard)  # type: ignore[method-assign]
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    assert ctxguard.CtxGuard.middleware(app) is guard
    assert app.wsgi_app.app is guard
    assert call(app, "/")[2] == b"hello"


def test_a_hand_made_middleware_is_not_guarded_twice_by_the_extension(telemetry):
    """``app.wsgi_app = CtxGuardMiddleware(app.wsgi_app, app=app)`` set up by hand, then
    ``CtxGuard(app)`` (an extension list that includes it too): one guard, found by
    ``CtxGuard.middleware``."""
    app = make_app()
    guard = ctxguard.CtxGuardMiddleware(
        app.wsgi_app, app=app, environment="production", **telemetry.providers
    )
    app.wsgi_app = guard  # type: ignore[method-assign]
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    assert app.wsgi_app is guard
    assert ctxguard.CtxGuard.middleware(app) is guard
    assert call(app, "/")[2] == b"hello"


def test_a_request_through_two_guards_is_checked_once(telemetry, caplog_ctxguard):
    """An app guarded by ``CtxGuard`` and again by a hand-made middleware around it, served
    by Werkzeug's development server in production: the request is checked by the outer
    guard only, so the development server is reported once, as with one guard, and the
    inner guard passes the request through without a fault."""
    app = make_app()
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    app.wsgi_app = ctxguard.CtxGuardMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, app=app, environment="production", **telemetry.providers
    )
    for _ in range(2):
        assert call(app, "/", SERVER_SOFTWARE="Werkzeug/3.1.0")[2] == b"hello"
    violations = "ctxguard.policy.violations"
    assert telemetry.value(violations, {"ctxguard.policy.rule": "development_server"}) == 1
    assert [r.message for r in caplog_ctxguard.records if "internal error" in r.message] == []


def test_a_policy_check_that_fails_leaves_the_request_as_it_is_and_is_logged(
    telemetry, caplog_ctxguard
):
    """In production, the first request's policy check reads the app's debug setting; with
    a config that raises there (a broken settings object) the request is served exactly as
    without ctxguard, and one line names the failing part, by exception type."""
    from flask import Config

    class BrokenSettings(Config):
        def __getitem__(self, key: Any) -> Any:
            if key == "DEBUG":
                raise LookupError("settings backend down")
            return super().__getitem__(key)

    app = make_app()
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    app.config = BrokenSettings(app.root_path, app.config)  # type: ignore[assignment]
    assert call(app, "/items/7")[2] == b"item 7"
    (line,) = [r.getMessage() for r in caplog_ctxguard.records if "internal error" in r.message]
    assert line.startswith("ctxguard: internal error in middleware (ignored, ")
    assert "LookupError" in line


def test_a_wsgi_app_that_is_a_method_of_another_object_is_kept_and_called(telemetry):
    """``app.wsgi_app`` set to a bound method of some middleware object (not the app's own
    ``wsgi_app``) before ``CtxGuard(app)``: the guard keeps that object and calls the
    method on it, so requests are served as without ctxguard."""

    class Prefixed:
        def __init__(self, app: Any) -> None:
            self.app = app

        def handle(self, environ: dict[str, Any], start_response: Any) -> Any:
            environ["SCRIPT_NAME"] = "/shop"
            return self.app(environ, start_response)

    app = make_app()

    @app.route("/where")
    def where() -> str:
        from flask import url_for

        return url_for("where")

    app.wsgi_app = Prefixed(app.wsgi_app).handle  # type: ignore[method-assign]
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    assert call(app, "/where")[2] == b"/shop/where"


def test_the_first_ordinary_response_of_a_process_is_handed_back_as_it_is(telemetry, monkeypatch):
    """In a fresh worker process ctxguard has not seen Werkzeug's response type yet: the
    very first ordinary response is recognised by its class and handed back exactly as
    Flask returned it. (ctxguard keeps that class process-wide once seen; it is forgotten
    here, since a fresh process cannot be made in this one otherwise.)"""
    import ctxguard.middleware

    app = make_app()
    returned = record_what_flask_returns(app)
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    monkeypatch.setattr(ctxguard.middleware, "_closing_type", None)
    body = app(environ("/"), start_response)
    assert body is returned[-1]
    assert b"".join(body) == b"hello"
    body.close()
