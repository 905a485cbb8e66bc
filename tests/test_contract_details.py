"""Details of ctxguard's documented behaviour that no broader test pins down.

Each test states the promise it guards (README, docs/telemetry.md, docs/index.md) and
checks it the way a user would see it: through ``CtxGuard``, ``install()``,
``snapshot()``, and the spans and metrics the OpenTelemetry SDK receives.
"""

from __future__ import annotations

import builtins
import contextvars
import gc
import importlib
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from importlib.metadata import version as installed_version
from typing import Any

import pytest
from flask import Flask, current_app, request
from flask.ctx import AppContext
from helpers import CONTEXT_CLASSES, MERGED, call, environ, line_of, make_app, wrong_pop

import ctxguard

HERE = __file__
# Flask 3.1 changed when stream_with_context pushes (see its test below).
FLASK_AT_LEAST_3_1 = tuple(map(int, installed_version("flask").split(".")[:2])) >= (3, 1)
LEAKS = "ctxguard.context.leaks"
HEALED = "ctxguard.context.healed"
ERRORS = "ctxguard.context.errors"
PUSHES = "ctxguard.context.pushes"
POPS = "ctxguard.context.pops"
OPEN = "ctxguard.context.open"
LEAK_SPAN = "ctxguard.context_leak"
ERROR_SPAN = "ctxguard.context_error"
#: The kinds of the contexts left open by a view that pushes an app context and never
#: pops it: the view's, and on Flask 3.2 the request's own too (Flask refuses to pop it
#: from under the view's; up to 3.1 it pops it anyway, then complains).
LEAKED_BY_A_VIEW = ("app", "request") if MERGED else ("app",)


def line(marker: str) -> int:
    """The line of this file with the comment ``# <marker>``."""
    return line_of(HERE, "# " + marker)


def stream_app() -> Flask:
    """``/stream`` pushes an app context in its body and never pops it."""
    app = make_app()

    @app.route("/stream")
    def stream() -> Any:
        def chunks() -> Iterator[bytes]:
            app.app_context().push()  # push: stream body
            yield b"chunk"

        return app.response_class(chunks())

    return app


def abandon_stream(app: Flask, path: str = "/stream") -> None:
    """Serve ``path``, read one chunk and drop the body unclosed, on this thread."""
    body = app.wsgi_app(environ(path), lambda *a: None)
    next(iter(body))
    del body
    gc.collect()


# --------------------------------------------------------------------------
# Stale contexts at the start of a request (docs/telemetry.md, request_start).


def test_a_stale_context_is_reported_at_the_next_request_and_healed(telemetry):
    """A body abandoned on its thread leaves its context there: the next request reports it
    (site ``request_start``, with its push line) and pops it so its teardown runs."""
    app = stream_app()
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    abandon_stream(app)
    assert telemetry.value(LEAKS) == 0
    torn_down = len(app.teardowns)  # type: ignore[attr-defined]
    call(app, "/")
    assert telemetry.value(LEAKS, {"ctxguard.leak.site": "request_start"}) == 1
    assert telemetry.value(LEAKS) == 1
    assert telemetry.value(HEALED, {"ctxguard.context.kind": "app"}) == 1
    (span,) = telemetry.spans(LEAK_SPAN)
    assert span.attributes["ctxguard.leak.site"] == "request_start"
    assert span.attributes["http.route"] == "/stream"
    assert span.attributes["code.line.number"] == line("push: stream body")
    assert len(app.teardowns) == torn_down + 2  # type: ignore[attr-defined]


def test_a_context_already_reported_does_not_hide_a_stale_one_behind_it(telemetry):
    """An ambient context (reported once, then left alone) under a stale one: every later
    request still finds, reports and heals the stale context."""
    app = stream_app()
    ambient = app.app_context()
    ambient.push()
    try:
        ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
        call(app, "/")  # reports the ambient context
        assert telemetry.value(LEAKS) == 1
        abandon_stream(app)
        call(app, "/")
        assert telemetry.value(LEAKS, {"ctxguard.leak.site": "request_start"}) == 2
        assert telemetry.value(HEALED) == 1
    finally:
        ambient.pop()


def test_an_ambient_context_is_reported_once_per_push_site(telemetry):
    """The same import-time push seen by many requests is one leak; a second push site is
    another one."""
    app = make_app()
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    first = app.app_context()
    first.push()  # push: ambient one
    try:
        for _ in range(3):
            call(app, "/")
        second = app.app_context()
        second.push()  # push: ambient two
        try:
            for _ in range(3):
                call(app, "/")
        finally:
            second.pop()
    finally:
        first.pop()
    assert telemetry.value(LEAKS, {"ctxguard.leak.site": "request_start"}) == 2
    lines = sorted(s.attributes["code.line.number"] for s in telemetry.spans(LEAK_SPAN))
    assert lines == sorted([line("push: ambient one"), line("push: ambient two")])


# --------------------------------------------------------------------------
# Leak spans: their own trace, rate limited per site (docs/telemetry.md, Spans).


def test_a_leak_span_starts_its_own_trace_even_inside_a_span(telemetry):
    """A leak found while a span is current (a server's span around the request) is not its
    child: the leak span has no parent."""
    app = make_app()

    @app.route("/leak")
    def leak() -> str:
        app.app_context().push()
        return "leaked"

    ctxguard.CtxGuard(app, **telemetry.providers)
    tracer = telemetry.tracer_provider.get_tracer("server")
    with tracer.start_as_current_span("GET /leak"), wrong_pop():
        call(app, "/leak")
    spans = telemetry.spans(LEAK_SPAN)
    assert sorted(s.attributes["ctxguard.context.kind"] for s in spans) == list(LEAKED_BY_A_VIEW)
    assert [s.parent for s in spans] == [None] * len(spans)


def test_leak_spans_are_rate_limited_per_push_site_and_counted_exactly(telemetry):
    """The same leak three times within a second: three in the counter, one span; the next
    span for that site, a second later, says how many were dropped. (On Flask 3.2 each
    request leaks two contexts, of two kinds, at the view's line: each kind has its own
    span, rate limited alike.)"""
    app = make_app()

    @app.route("/leak")
    def leak() -> str:
        app.app_context().push()
        return "leaked"

    ctxguard.CtxGuard(app, **telemetry.providers)
    for _ in range(3):
        with wrong_pop():
            call(app, "/leak")
    for kind in ("app", "request"):
        leaked = 3 if kind in LEAKED_BY_A_VIEW else 0
        assert telemetry.value(LEAKS, {"ctxguard.context.kind": kind}) == leaked
    assert len(telemetry.spans(LEAK_SPAN)) == len(LEAKED_BY_A_VIEW)
    time.sleep(1.05)
    with wrong_pop():
        call(app, "/leak")
    for kind in LEAKED_BY_A_VIEW:
        spans = [
            s for s in telemetry.spans(LEAK_SPAN) if s.attributes["ctxguard.context.kind"] == kind
        ]
        assert len(spans) == 2
        assert spans[1].attributes["ctxguard.suppressed"] == 2
        assert "ctxguard.suppressed" not in spans[0].attributes


def test_ages_are_seconds_to_the_microsecond(telemetry):
    """``ctxguard.context.age`` and ``snapshot()``'s ``age``: seconds since the push, with
    sub-second precision, rounded to the microsecond."""
    app = make_app()
    ctxguard.install(**telemetry.providers)

    def work() -> None:
        app.app_context().push()
        time.sleep(0.02)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    (span,) = telemetry.spans(LEAK_SPAN)
    age = span.attributes["ctxguard.context.age"]
    assert isinstance(age, float) and 0.015 < age < 5
    assert age == round(age, 6)
    ctx = app.app_context()
    ctx.push()
    try:
        time.sleep(0.02)
        (worker,) = ctxguard.snapshot()["workers"]
        (context,) = worker["contexts"]
        assert 0.015 < context["age"] < 1.0  # pushed just now
        assert context["age"] == round(context["age"], 6)
    finally:
        ctx.pop()


# --------------------------------------------------------------------------
# snapshot(): every field, for a debug endpoint (README, snapshot()).


def test_snapshot_of_a_context_pushed_in_a_request_names_the_request(telemetry):
    """A context leaked by a view: kind, push site, the request it was pushed in (method,
    route template, endpoint), reported as leaked; and the process id. (On Flask 3.2 the
    request's own context stays open under it, shown at the view's line too, and both
    are current, so the next request heals them.)"""
    app = make_app()
    kept: list[Any] = []

    @app.route("/keep/<name>", methods=["PATCH"])
    def keep(name: str) -> str:
        ctx = app.app_context()
        ctx.push()  # push: kept by the view
        kept.append(ctx)
        return name

    ctxguard.CtxGuard(app, **telemetry.providers)
    with wrong_pop():
        call(app, "/keep/x", REQUEST_METHOD="PATCH")
    snap = ctxguard.snapshot()
    assert json.loads(json.dumps(snap)) == snap
    assert snap["pid"] == os.getpid()
    contexts = [c for w in snap["workers"] for c in w["contexts"]]
    mine = [c for c in contexts if c["line"] == line("push: kept by the view")]
    # Up to Flask 3.1 only the view's context is left; on 3.2 the request's own too (Flask
    # refused to pop it from under the view's), oldest first, and it has no push site of
    # its own: it is shown at the view's line.
    assert [c["kind"] for c in mine] == list(LEAKED_BY_A_VIEW)[::-1]
    for context in mine:
        assert context["file"] == HERE
        assert context["function"].endswith("keep")
        assert context["request"] == {
            "method": "PATCH",
            "route": "/keep/<name>",
            "endpoint": "keep",
        }
        assert context["leaked"] is True
        # Up to 3.1 Flask's wrong-order pop jumped past it; 3.2 refused the pop.
        assert context["reachable"] is MERGED
    call(app, "/")
    after = [c for w in ctxguard.snapshot()["workers"] for c in w["contexts"]]
    if MERGED:
        # Both were still current on this thread: stale for the next request there, which
        # healed them (production), so they are gone.
        assert after == []
        assert telemetry.value(HEALED) == 2
    else:
        # The next request on this thread forgets nothing still alive.
        assert [c["line"] for c in after] == [c["line"] for c in contexts]


def test_snapshot_shows_each_workers_kind_and_the_request_that_started_it(telemetry):
    """A thread started by a request and still holding a context: the snapshot says it is
    a `thread` worker started by that request (method, route template, endpoint); the
    main thread holding one of its own is a `main` worker with no origin."""
    app = make_app()
    pushed = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with app.app_context():
            pushed.set()
            release.wait(60)

    threads: list[threading.Thread] = []

    @app.route("/start/<name>", methods=["POST"])
    def start(name: str) -> str:
        thread = threading.Thread(target=hold, name="held")
        thread.start()
        threads.append(thread)
        return name

    ctxguard.CtxGuard(app, **telemetry.providers)
    call(app, "/start/x", REQUEST_METHOD="POST")
    assert pushed.wait(60)
    ctx = app.app_context()
    ctx.push()
    try:
        snap = ctxguard.snapshot()
    finally:
        ctx.pop()
        release.set()
        threads[0].join(60)
    assert json.loads(json.dumps(snap)) == snap
    workers = {w["thread_name"]: w for w in snap["workers"]}
    assert workers["held"]["kind"] == "thread"
    assert workers["held"]["origin"] == {
        "method": "POST",
        "route": "/start/<name>",
        "endpoint": "start",
    }
    main = workers[threading.current_thread().name]
    assert (main["kind"], main["origin"]) == ("main", None)


def test_snapshot_of_a_context_pushed_before_install(telemetry):
    """Pushed before ctxguard was installed: listed, its push site unknown (``None``), not
    leaked, reachable, pushed in no request."""
    app = make_app()
    ctx = app.app_context()
    ctx.push()
    try:
        ctxguard.install(**telemetry.providers)
        (worker,) = ctxguard.snapshot()["workers"]
        (context,) = worker["contexts"]
        assert context["file"] is None and context["line"] is None
        assert context["function"] is None
        assert context["request"] is None
        assert (context["leaked"], context["reachable"]) == (False, True)
        assert worker["thread_name"] == threading.current_thread().name
    finally:
        ctx.pop()


@pytest.mark.skipif(
    MERGED,
    reason="Flask 3.2 refuses a wrong-order pop: no context is ever out of reach"
    " (test_a_wrong_order_pop_through_another_wrapper_is_recorded)",
)
def test_snapshot_lists_an_unreachable_context_while_something_holds_it(telemetry):
    """After a wrong-order pop, the context jumped over can never be popped: ``snapshot()``
    lists it (``reachable`` false) while it is alive, and drops it once it is collected."""
    app = Flask("orphans")
    ctxguard.install(**telemetry.providers)
    outer = app.app_context()
    inner = app.app_context()
    outer.push()
    inner.push()  # push: jumped over
    with pytest.raises(AssertionError):
        outer.pop()

    def listed() -> list[dict[str, Any]]:
        return [c for w in ctxguard.snapshot()["workers"] for c in w["contexts"]]

    (context,) = listed()
    assert context["line"] == line("push: jumped over")
    assert context["reachable"] is False
    del inner
    gc.collect()
    assert listed() == []


# --------------------------------------------------------------------------
# Introspection is not use (docs/telemetry.md, ctxguard.context.errors).


def test_a_lookup_made_by_pytests_own_code_is_not_an_error(telemetry):
    """pytest's own code looking a name up through a proxy (as its collection does with
    every module-level name) is a tool's lookup, whatever the name."""
    from _pytest.compat import safe_getattr

    ctxguard.install(**telemetry.providers)
    assert safe_getattr(request, "some_marker", "absent") == "absent"
    assert telemetry.value(ERRORS) == 0
    with pytest.raises(RuntimeError):
        _ = request.some_marker  # the same name from the user's code is an error
    assert telemetry.value(ERRORS) == 1


def test_a_short_dunder_name_is_introspection_too(telemetry):
    """Any ``__name__``-shaped lookup is introspection, the shortest ones included."""
    ctxguard.install(**telemetry.providers)
    for name in ("__x__", "__ab__"):
        with pytest.raises(RuntimeError):
            getattr(current_app, name)
    assert telemetry.value(ERRORS) == 0
    with pytest.raises(RuntimeError):
        _ = current_app.x__  # not a dunder: the user's use
    assert telemetry.value(ERRORS) == 1


def test_the_import_time_hint_is_for_module_level_code_only(telemetry, tmp_path, monkeypatch):
    """A function called while its module is imported is not module-level code: the hint is
    the ordinary one, and the reported function is that function."""
    (tmp_path / "import_calls.py").write_text(
        "from flask import current_app\n\n\ndef helper():\n    try:\n"
        "        return current_app.name\n    except RuntimeError:\n        return None\n\n\n"
        "NAME = helper()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "import_calls", raising=False)
    ctxguard.install(**telemetry.providers)
    importlib.import_module("import_calls")
    (span,) = telemetry.spans(ERROR_SPAN)
    assert span.attributes["code.function.name"] == "helper"
    assert "import time" not in span.attributes["ctxguard.hint"]
    assert span.attributes["ctxguard.hint"].startswith("No application context is pushed here")


# --------------------------------------------------------------------------
# Another library's wrapper around Flask's push and pop (docs/index.md, Ledger).


@pytest.fixture
def wrapped_contexts(monkeypatch: pytest.MonkeyPatch) -> None:
    """``push``/``pop`` of both context classes replaced by another library's ``*args``
    wrappers before ctxguard is installed, as instrumentation libraries do."""
    for cls in CONTEXT_CLASSES:
        for name in ("push", "pop"):
            monkeypatch.setattr(cls, name, _passing_through(getattr(cls, name)))


def _passing_through(original: Any) -> Any:
    """Another library's wrapper: calls ``original`` with whatever it was given."""

    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        return original(self, *args, **kwargs)

    wrapper.__name__ = original.__name__
    return wrapper


def test_pushes_and_pops_through_another_wrapper_are_counted(telemetry, wrapped_contexts):
    """Nested pushes and pops through a foreign wrapper: exact counts, nothing open after."""
    app = Flask("wrapped")
    ctxguard.install(**telemetry.providers)
    outer = app.app_context()
    inner = app.app_context()
    outer.push()
    inner.push()
    assert telemetry.value(OPEN, {"ctxguard.context.kind": "app"}) == 2
    inner.pop()
    outer.pop()
    assert telemetry.value(PUSHES, {"ctxguard.context.kind": "app"}) == 2
    assert (
        telemetry.value(POPS, {"ctxguard.context.kind": "app", "ctxguard.pop.outcome": "ok"}) == 2
    )
    assert telemetry.value(OPEN, {"ctxguard.context.kind": "app"}) == 0
    assert ctxguard.snapshot()["workers"] == []


def test_a_wrong_order_pop_through_another_wrapper_is_recorded(telemetry, wrapped_contexts):
    """A wrong-order pop through a foreign wrapper: Flask's error unchanged, outcome
    ``wrong_context``, and the context jumped over is still open. (Flask 3.2 refuses the
    pop: the context popped out of order is still open too, both are reachable, and they
    pop in the right order afterwards.)"""
    app = Flask("wrapped")
    ctxguard.install(**telemetry.providers)
    outer = app.app_context()
    inner = app.app_context()
    outer.push()  # push: wrapped outer
    inner.push()  # push: wrapped inner
    with wrong_pop():
        outer.pop()
    wrong = {"ctxguard.context.kind": "app", "ctxguard.pop.outcome": "wrong_context"}
    assert telemetry.value(POPS, wrong) == 1

    def listed() -> list[tuple[int, bool]]:
        return [
            (c["line"], c["reachable"])
            for w in ctxguard.snapshot()["workers"]
            for c in w["contexts"]
        ]

    if not MERGED:
        assert listed() == [(line("push: wrapped inner"), False)]
        return
    assert listed() == [(line("push: wrapped outer"), True), (line("push: wrapped inner"), True)]
    inner.pop()
    outer.pop()
    ok = {"ctxguard.context.kind": "app", "ctxguard.pop.outcome": "ok"}
    assert (telemetry.value(POPS, ok), telemetry.value(POPS, wrong)) == (2, 1)
    assert listed() == []


def test_a_thread_leak_through_another_wrapper_names_the_push_line(telemetry, wrapped_contexts):
    """A context pushed through a foreign wrapper and left open by a thread is a
    ``thread_exit`` leak with the user's push line."""
    app = Flask("wrapped")
    ctxguard.install(**telemetry.providers)

    def work() -> None:
        app.app_context().push()  # push: wrapped thread

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    (span,) = telemetry.spans(LEAK_SPAN)
    assert span.attributes["ctxguard.leak.site"] == "thread_exit"
    assert span.attributes["code.line.number"] == line("push: wrapped thread")


def test_a_context_popped_on_another_thread_through_another_wrapper(telemetry, wrapped_contexts):
    """Pushed on one thread, popped on another, through a foreign wrapper:
    ``cross_worker``, and it is no longer open."""
    app = Flask("wrapped")
    ctxguard.install(**telemetry.providers)
    ctx = app.app_context()
    ctx.push()
    errors: list[BaseException] = []

    def pop_it() -> None:
        try:
            ctx.pop()
        except BaseException as exc:  # Flask may refuse: its context variable is per thread
            errors.append(exc)

    thread = threading.Thread(target=pop_it)
    thread.start()
    thread.join()
    cross = {"ctxguard.context.kind": "app", "ctxguard.pop.outcome": "cross_worker"}
    assert telemetry.value(POPS, cross) == 1
    if not errors:
        assert telemetry.value(OPEN, {"ctxguard.context.kind": "app"}) == 0


# --------------------------------------------------------------------------
# Where spans go (docs/telemetry.md: scope, providers, links).


def test_spans_carry_the_ctxguard_scope_and_version(telemetry):
    """Instrumentation scope ``ctxguard``, version the installed distribution's."""
    from importlib.metadata import version

    ctxguard.install(**telemetry.providers)
    with pytest.raises(RuntimeError):
        _ = request.args
    (span,) = telemetry.spans(ERROR_SPAN)
    assert span.instrumentation_scope.name == "ctxguard"
    assert span.instrumentation_scope.version == version("flask-ctxguard")


def test_a_provider_given_to_a_later_install_is_used_from_then_on(telemetry):
    """``install(tracer_provider=...)`` again, while installed: the new provider gets the
    spans from then on, the old one no more."""
    from conftest import Telemetry

    ctxguard.install(**telemetry.providers)
    with pytest.raises(RuntimeError):
        _ = request.args  # touch: first provider
    later = Telemetry()
    ctxguard.install(tracer_provider=later.tracer_provider)
    with pytest.raises(RuntimeError):
        _ = request.form  # touch: second provider
    assert [s.attributes["code.line.number"] for s in telemetry.spans(ERROR_SPAN)] == [
        line("touch: first provider")
    ]
    assert [s.attributes["code.line.number"] for s in later.spans(ERROR_SPAN)] == [
        line("touch: second provider")
    ]


def test_no_link_when_the_request_that_started_the_work_was_not_traced(telemetry):
    """A thread started by an untraced request: its error span has no link (there is no
    span to link to), but still names the request."""
    app = make_app()

    @app.route("/untraced")
    def untraced() -> str:
        def work() -> None:
            try:
                _ = request.args
            except RuntimeError:
                pass

        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
        return "ok"

    ctxguard.CtxGuard(app, **telemetry.providers)
    call(app, "/untraced")
    (span,) = telemetry.spans(ERROR_SPAN)
    assert span.attributes["http.route"] == "/untraced"
    assert list(span.links) == []


# --------------------------------------------------------------------------
# The middleware on its own (README, Plain WSGI).


def test_the_middleware_finds_the_app_behind_its_bound_wsgi_app(telemetry):
    """``CtxGuardMiddleware(app.wsgi_app)`` without ``app=``: the app is found, so the
    environment follows ``app.testing``; a plain WSGI callable has no app."""
    app = make_app()
    guard = ctxguard.CtxGuardMiddleware(app.wsgi_app, **telemetry.providers)
    assert guard.app is app
    app.testing = True
    assert guard.environment() == "testing"

    def plain(environ: Any, start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        return [b"plain"]

    other = ctxguard.CtxGuardMiddleware(plain, **telemetry.providers)
    assert other.app is None
    assert other.environment() == "production"


class IterableBody:
    """A response body that is iterable but not an iterator, with ``close``: its
    iteration runs the application's code (it pushes a context and never pops it)."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        self.app.app_context().push()  # push: iterable body
        yield b"body"

    def close(self) -> None:
        self.closed = True


def test_a_context_pushed_while_an_iterable_body_is_read_belongs_to_its_request(telemetry):
    """A plain WSGI app whose body (an iterable, not an iterator) pushes a context while
    the server reads it: a ``request_end`` leak of that request, with the push line."""
    flask_app = Flask("plain")
    bodies: list[IterableBody] = []

    def plain(environ: Any, start_response: Any) -> IterableBody:
        start_response("200 OK", [("Content-Type", "text/plain")])
        bodies.append(IterableBody(flask_app))
        return bodies[-1]

    guard = ctxguard.CtxGuardMiddleware(plain, **telemetry.providers)
    try:
        status, _, data = call(guard, "/plain", REQUEST_METHOD="DELETE")
    finally:
        from conftest import _clear_flask_contexts

        _clear_flask_contexts()
    assert (status, data) == ("200 OK", b"body")
    assert bodies[0].closed
    assert telemetry.value(LEAKS, {"ctxguard.leak.site": "request_end"}) == 1
    (span,) = telemetry.spans(LEAK_SPAN)
    assert span.attributes["http.request.method"] == "DELETE"
    assert span.attributes["code.line.number"] == line("push: iterable body")


# --------------------------------------------------------------------------
# Worker kinds (docs/telemetry.md, Worker kinds).


def test_a_greenlet_is_a_greenlet_worker(telemetry):
    """With gevent imported, code in a greenlet of its own (not the thread's main one) is a
    ``greenlet`` worker."""
    pytest.importorskip("gevent")
    import greenlet

    ctxguard.install(**telemetry.providers)

    def touch() -> None:
        try:
            _ = current_app.name
        except RuntimeError:
            pass

    greenlet.greenlet(touch).switch()
    assert telemetry.value(ERRORS, {"ctxguard.worker.kind": "greenlet"}) == 1


# --------------------------------------------------------------------------
# propagate="app" is per app (docs/configuration.md, propagate).


def test_only_the_app_that_asked_for_it_propagates_its_context(telemetry):
    """Two apps in one process, one with ``propagate="app"``: a thread started in the other
    app's request gets no app context, and its ``current_app`` is an error."""
    propagating, plain = make_app(), make_app()
    seen: dict[str, Any] = {}

    def view_starting_a_thread(name: str) -> str:
        def work() -> None:
            try:
                seen[name] = current_app.name
            except RuntimeError:
                seen[name] = None

        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
        return "ok"

    propagating.add_url_rule("/work", "work", lambda: view_starting_a_thread("propagating"))
    plain.add_url_rule("/work", "work", lambda: view_starting_a_thread("plain"))
    ctxguard.CtxGuard(propagating, propagate="app", **telemetry.providers)
    ctxguard.CtxGuard(plain, **telemetry.providers)
    call(propagating, "/work")
    call(plain, "/work")
    assert seen == {"propagating": propagating.name, "plain": None}
    assert telemetry.value(ERRORS) == 1


# --------------------------------------------------------------------------
# Response bodies the server reads: kept as they are (docs/index.md, Middleware).


def test_a_body_without_close_is_served_and_closed_without_error(telemetry):
    """A plain WSGI app whose body is iterable and has no ``close``: the server's
    ``close()`` on what ctxguard hands back succeeds, and the request's end is checked."""

    class NoClose:
        def __iter__(self) -> Iterator[bytes]:
            yield b"no close"

    def plain(environ: Any, start_response: Any) -> NoClose:
        start_response("200 OK", [])
        return NoClose()

    guard = ctxguard.CtxGuardMiddleware(plain, **telemetry.providers)
    assert call(guard, "/")[2] == b"no close"
    assert telemetry.value(LEAKS) == 0


def test_a_body_read_and_closed_inside_another_request_leaves_that_request_whole(telemetry):
    """A server that reads and closes one response while running another request on the
    same thread (as event-loop servers do): the running request keeps its identity, so a
    context its view leaves open is still its own ``request_end`` leak."""
    app = make_app()
    flask_app = Flask("inner")

    def streamed(environ: Any, start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [])
        yield b"first"

    inner = ctxguard.CtxGuardMiddleware(streamed, **telemetry.providers)
    pending: list[Any] = []

    @app.route("/outer")
    def outer() -> str:
        body = pending.pop()
        assert next(iter(body)) == b"first"
        body.close()
        ctx = flask_app.app_context()
        contextvars.copy_context().run(lambda: ctx.push())  # push: outer view
        return "outer"

    ctxguard.CtxGuard(app, **telemetry.providers)
    pending.append(inner(environ("/inner"), lambda *a: None))
    status, _, data = call(app, "/outer")
    assert (status, data) == ("200 OK", b"outer")
    ends = [
        s for s in telemetry.spans(LEAK_SPAN) if s.attributes["ctxguard.leak.site"] == "request_end"
    ]
    assert [s.attributes.get("http.route") for s in ends] == ["/outer"]
    assert ends[0].attributes["code.line.number"] == line("push: outer view")


def test_a_context_pushed_by_a_view_in_a_copied_context_is_a_leak_of_that_request(telemetry):
    """A view whose helper pushes an app context inside a copied ``contextvars`` context
    (so Flask itself never complains) and never pops it: a ``request_end`` leak of that
    request, with the push line, and the response is untouched."""
    app = make_app()
    other = Flask("other")

    @app.route("/copied")
    def copied() -> str:
        # A copy of the current context: what is pushed there is not current here.
        contextvars.copy_context().run(lambda: other.app_context().push())  # push: copied
        return "copied"

    ctxguard.CtxGuard(app, **telemetry.providers)
    assert call(app, "/copied")[2] == b"copied"
    assert telemetry.value(LEAKS, {"ctxguard.leak.site": "request_end"}) == 1
    (span,) = telemetry.spans(LEAK_SPAN)
    assert span.attributes["http.route"] == "/copied"
    assert span.attributes["code.line.number"] == line("push: copied")


# --------------------------------------------------------------------------
# Pop outcomes (docs/telemetry.md, ctxguard.context.pops).


def test_an_assertion_error_from_a_teardown_is_not_a_wrong_context_pop(telemetry):
    """A teardown function that raises ``AssertionError`` while its context is popped: the
    pop is ``ok`` (the context was the right one), and the error reaches the caller (on
    Flask 3.2 with Python 3.11+, inside the exception group Flask raises teardown errors
    in)."""
    app = Flask("teardown")
    raised: list[BaseException] = []

    @app.teardown_appcontext
    def check(exc: BaseException | None) -> None:
        raised.append(AssertionError("a teardown's own assertion"))
        raise raised[-1]

    ctxguard.install(**telemetry.providers)
    ctx = app.app_context()
    ctx.push()
    if MERGED and sys.version_info >= (3, 11):
        # Flask 3.2 runs every teardown function, pops, then raises their errors together.
        with pytest.raises(EXCEPTION_GROUP, match="Errors during context teardown") as group:
            ctx.pop()
        assert teardown_errors(group.value) == raised
    else:
        with pytest.raises(AssertionError, match="a teardown's own assertion") as error:
            ctx.pop()
        assert error.value is raised[0]
    ok = {"ctxguard.context.kind": "app", "ctxguard.pop.outcome": "ok"}
    wrong = {"ctxguard.context.kind": "app", "ctxguard.pop.outcome": "wrong_context"}
    assert (telemetry.value(POPS, ok), telemetry.value(POPS, wrong)) == (1, 0)


# --------------------------------------------------------------------------
# Every error span carries its exception (docs/telemetry.md, ctxguard.context_error).


#: Exception groups' base class (Python 3.11+; before, nothing is one).
EXCEPTION_GROUP: Any = getattr(builtins, "BaseExceptionGroup", ())


def teardown_errors(error: BaseException) -> list[BaseException]:
    """The errors teardown functions raised, out of Flask 3.2's exception groups."""
    if isinstance(error, EXCEPTION_GROUP):
        return [leaf for inner in error.exceptions for leaf in teardown_errors(inner)]
    return [error]


def exception_event(span: Any) -> dict[str, Any]:
    (event,) = [e for e in span.events if e.name == "exception"]
    return dict(event.attributes)


def test_the_plain_wrappers_error_span_carries_the_exception(telemetry, monkeypatch):
    """A proxy guarded by the plain wrapper (its lookup is not Werkzeug's): the span has
    the ``exception`` event with the very error the user got."""
    import flask.globals
    from werkzeug.local import LocalProxy

    def lookup() -> Any:
        raise RuntimeError(flask.globals._no_app_msg)  # Flask's own message

    custom = LocalProxy(lookup)
    monkeypatch.setattr(flask.globals, "current_app", custom)
    ctxguard.install(**telemetry.providers)
    with pytest.raises(RuntimeError) as info:
        _ = custom.name
    (span,) = telemetry.spans(ERROR_SPAN)
    assert span.attributes["ctxguard.context.kind"] == "app"
    event = exception_event(span)
    assert event["exception.type"] == "RuntimeError"
    assert event["exception.message"] == str(info.value)


def test_flask_32s_request_error_span_carries_the_exception(telemetry, monkeypatch):
    """Flask 3.2's shape (the request inside the app context): ``request`` in an app
    context without one fails in the context's property; its span has that exception and
    the ``request`` kind."""
    from contextvars import ContextVar

    import flask.globals
    from werkzeug.local import LocalProxy

    class Merged:
        app = None

        @property
        def request(self) -> Any:
            raise RuntimeError("There is no request in this context.")

    cv: ContextVar[Any] = ContextVar("merged")
    no_app = "Working outside of application context."
    no_request = "Working outside of request context."
    proxies = {
        "app_ctx": LocalProxy(cv, unbound_message=no_app),
        "current_app": LocalProxy(cv, "app", unbound_message=no_app),
        "g": LocalProxy(cv, "g", unbound_message=no_app),
        "request_ctx": LocalProxy(cv, unbound_message=no_request),
        "request": LocalProxy(cv, "request", unbound_message=no_request),
        "session": LocalProxy(cv, "session", unbound_message=no_request),
    }
    for name, value in proxies.items():
        monkeypatch.setattr(flask.globals, name, value)
    ctxguard.install(**telemetry.providers)
    token = cv.set(Merged())
    try:
        with pytest.raises(RuntimeError):
            _ = proxies["request"].method
    finally:
        cv.reset(token)
    (span,) = telemetry.spans(ERROR_SPAN)
    assert span.attributes["ctxguard.context.kind"] == "request"
    assert exception_event(span)["exception.message"] == "There is no request in this context."


# --------------------------------------------------------------------------
# The ``ctxguard`` command (README, Quickstart), in this process.


def test_the_demo_command_shows_every_scenario(capsys):
    """``ctxguard demo``: exit status 0, and every scenario showed what it should."""
    from ctxguard.cli import main

    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"ctxguard {ctxguard.__version__} demo: Flask ")
    assert "What happened:" in out
    assert "UNEXPECTED" not in out


def test_the_command_lists_its_subcommand(capsys):
    """``ctxguard --help`` names the program, says what it is, and lists ``demo`` with what
    it does."""
    from ctxguard.cli import main

    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith("usage: ctxguard ")
    assert "The ``ctxguard`` command." in out
    assert "demo run a small Flask app that leaks contexts and show what ctxguard records" in out


@pytest.mark.parametrize(
    ("argv", "error"), [([], "required: command"), (["bogus"], "invalid choice")]
)
def test_the_command_refuses_a_missing_or_unknown_subcommand(capsys, argv, error):
    """No subcommand, or an unknown one: argparse's usage error (exit status 2)."""
    from ctxguard.cli import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ctxguard ")
    assert error in err


def test_an_error_span_is_a_child_of_the_current_span(telemetry):
    """Unlike a leak span, an error span belongs to the trace it happened in: a child of
    the span current where the proxy was touched."""
    ctxguard.install(**telemetry.providers)
    tracer = telemetry.tracer_provider.get_tracer("app")
    with tracer.start_as_current_span("job") as job, pytest.raises(RuntimeError):
        _ = request.args
    (span,) = telemetry.spans(ERROR_SPAN)
    assert span.parent is not None
    assert span.parent.span_id == job.get_span_context().span_id


def test_the_next_line_let_through_says_how_many_were_left_out(telemetry, caplog, monkeypatch):
    """Once a minute per site: the next line for that site, a minute later, says how many
    lines were left out meanwhile."""
    import logging

    caplog.set_level(logging.WARNING, logger="ctxguard")
    clock = [time.monotonic()]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    ctxguard.install(**telemetry.providers)

    def touch() -> None:
        with pytest.raises(RuntimeError):
            _ = request.args

    for _ in range(3):
        touch()
    clock[0] += 61
    touch()
    lines = [r.getMessage() for r in caplog.records if r.name == "ctxguard"]
    assert len(lines) == 2
    assert not lines[0].endswith("in the last minute)")
    assert lines[1].endswith(". (2 more like this in the last minute)")
    assert lines[1].removesuffix(" (2 more like this in the last minute)") == lines[0]


# --------------------------------------------------------------------------
# Threads and tasks run exactly their own work (docs/index.md, Threads).


def test_an_executor_task_gets_its_keyword_arguments(telemetry):
    """``pool.submit(fn, *args, **kwargs)`` while installed: ``fn`` gets both."""
    from concurrent.futures import ThreadPoolExecutor

    ctxguard.install(**telemetry.providers)

    def add(a: int, *, b: int) -> int:
        return a + b

    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(add, 1, b=2).result(10) == 3


def test_a_task_run_after_uninstall_gets_its_keyword_arguments(telemetry):
    """A task submitted while installed and run after ``uninstall()`` still gets its
    arguments."""
    from concurrent.futures import ThreadPoolExecutor

    def add(a: int, *, b: int) -> int:
        return a + b

    gate = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(gate.wait, 10)
        ctxguard.install(**telemetry.providers)
        queued = pool.submit(add, 1, b=2)
        ctxguard.uninstall()
        gate.set()
        assert busy.result(10) is True
        assert queued.result(10) == 3


def test_a_thread_with_another_librarys_run_wrapper_runs_it_after_uninstall(telemetry):
    """A thread whose ``run`` is another library's instance wrapper (as Sentry's is),
    started while installed and run after ``uninstall()``: its wrapper runs, once."""
    ran: list[str] = []
    gate = threading.Event()
    thread = threading.Thread(target=lambda: ran.append("target"))
    own_run = thread.run

    def wrapper() -> None:
        ran.append("wrapper")
        own_run()

    thread.run = wrapper  # type: ignore[method-assign]
    ctxguard.install(**telemetry.providers)
    previous = threading.gettrace()

    def hold(frame: Any, event: str, arg: Any) -> None:
        sys.settrace(None)
        gate.wait(10)

    threading.settrace(hold)  # the new thread waits before its run begins
    try:
        thread.start()
    finally:
        threading.settrace(previous)  # type: ignore[arg-type]
    ctxguard.uninstall()
    gate.set()
    thread.join(10)
    assert ran == ["wrapper", "target"]


def test_propagated_threads_still_report_their_own_leaks(telemetry, caplog_ctxguard):
    """With ``propagate="app"``: the app context ctxguard pushed for the thread is popped
    for it and never reported; a context the thread pushed itself and left open is a
    ``thread_exit`` leak."""
    app = make_app()
    other = Flask("other")

    @app.route("/spawn")
    def spawn() -> str:
        def work() -> None:
            other.app_context().push()  # push: own context in a propagated thread

        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
        return "ok"

    ctxguard.CtxGuard(app, propagate="app", **telemetry.providers)
    call(app, "/spawn")
    (span,) = telemetry.spans(LEAK_SPAN)
    assert span.attributes["ctxguard.leak.site"] == "thread_exit"
    assert span.attributes["code.line.number"] == line("push: own context in a propagated thread")


def test_a_failing_teardown_of_a_propagated_context_is_logged_by_type(telemetry, caplog_ctxguard):
    """The propagated app context's teardown raising in the thread: the thread's work is
    done, and one line names the exception's type only."""
    app = make_app()

    class TeardownFailed(Exception):
        pass

    @app.teardown_appcontext
    def fail(exc: BaseException | None) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise TeardownFailed("secret")

    done: list[str] = []

    @app.route("/spawn")
    def spawn() -> str:
        thread = threading.Thread(target=lambda: done.append(current_app.name))
        thread.start()
        thread.join()
        return "ok"

    ctxguard.CtxGuard(app, propagate="app", **telemetry.providers)
    call(app, "/spawn")
    assert done == [app.name]
    lines = [r.getMessage() for r in caplog_ctxguard.records if "propagated" in r.getMessage()]
    assert lines == [
        "ctxguard: a teardown function raised"
        " test_a_failing_teardown_of_a_propagated_context_is_logged_by_type.<locals>"
        ".TeardownFailed while popping the propagated app context"
    ]


# --------------------------------------------------------------------------
# Which frames are the user's (docs/configuration.md, in_app_include/in_app_exclude).


def defined_in(path: str, module: str, source: str, name: str) -> Any:
    """Function ``name`` from ``source``, as if it lived in file ``path``, module ``module``
    (only the file name and module name decide whose code a frame is)."""
    namespace: dict[str, Any] = {"__name__": module}
    exec(compile(source, path, "exec"), namespace)
    return namespace[name]


PUSHER = "def push(app):\n    app.app_context().push()\n"


def leak_site_of(telemetry: Any, push: Any, app: Flask) -> tuple[str, int]:
    """Where the leak of a context ``push(app)`` leaves open in a thread is reported."""

    def work() -> None:
        push(app)  # call: the user's line

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    (span,) = [s for s in telemetry.spans(LEAK_SPAN) if s.attributes.get("code.file.path")][-1:]
    return span.attributes["code.file.path"], span.attributes["code.line.number"]


def test_a_library_in_the_interpreters_own_site_packages_is_a_library(telemetry):
    """A library installed into the interpreter's own ``site-packages`` (inside the
    standard library's directory) is skipped like any library: the user's line is
    reported."""
    import sysconfig

    stdlib = sysconfig.get_paths()["stdlib"]
    for packages in ("site-packages", "dist-packages"):
        telemetry.exporter.clear()
        path = f"{stdlib}/{packages}/vendorlib/helpers.py"
        push = defined_in(path, "vendorlib.helpers", PUSHER, "push")
        ctxguard.install(**telemetry.providers)
        assert leak_site_of(telemetry, push, Flask("lib")) == (HERE, line("call: the user's line"))
        ctxguard.uninstall()


def test_an_app_installed_in_the_interpreters_own_site_packages_is_the_users(telemetry):
    """An app installed into the interpreter's own ``site-packages`` (a container image
    without a virtualenv: inside the standard library's directory) is still the user's:
    its line is reported, not looked through as the standard library's."""
    import sysconfig

    stdlib = sysconfig.get_paths()["stdlib"]
    for packages in ("site-packages", "dist-packages"):
        telemetry.exporter.clear()
        root = f"{stdlib}/{packages}/shopapp"
        app = Flask("shopapp", root_path=root)
        ctxguard.CtxGuard(app, **telemetry.providers)
        push = defined_in(f"{root}/helpers.py", "shopapp.helpers", PUSHER, "push")
        assert leak_site_of(telemetry, push, app) == (f"{root}/helpers.py", 2)
        ctxguard.uninstall()


def test_an_app_installed_in_site_packages_is_the_users_but_its_venv_is_not(telemetry, tmp_path):
    """An app installed into ``site-packages`` (a container image): a file under its root
    path is the user's, whatever its module name; a library in an environment kept inside
    the app's directory is not."""
    root = tmp_path / "venv" / "lib" / "python3.11" / "site-packages" / "shop"
    app = Flask("shop", root_path=str(root))
    ctxguard.CtxGuard(app, **telemetry.providers)
    helper = defined_in(str(root / "helpers.py"), "helpers", PUSHER, "push")
    assert leak_site_of(telemetry, helper, app) == (str(root / "helpers.py"), 2)
    for packages in ("site-packages", "dist-packages"):
        time.sleep(1.05)  # a new span for the same push site
        telemetry.exporter.clear()
        vendored = str(root / ".venv" / "lib" / "python3.11" / packages / "dep" / "mod.py")
        dep = defined_in(vendored, "dep.mod", PUSHER, "push")
        assert leak_site_of(telemetry, dep, app) == (HERE, line("call: the user's line"))


def test_an_apps_package_is_the_users_at_any_depth(telemetry, tmp_path):
    """The app's own package (the first part of its import name) is the user's, however
    deep the module, even installed elsewhere in ``site-packages``."""
    app = Flask("shop.web")
    ctxguard.CtxGuard(app, **telemetry.providers)
    path = str(tmp_path / "site-packages" / "shop" / "api" / "views.py")
    views = defined_in(path, "shop.api.views", PUSHER, "push")
    assert leak_site_of(telemetry, views, app) == (path, 2)


def test_in_app_exclude_covers_submodules_not_longer_names(telemetry, tmp_path):
    """``in_app_exclude=["vendored"]`` makes ``vendored.sub`` a library, not
    ``vendoredx``."""
    ctxguard.install(in_app_exclude=["vendored"], **telemetry.providers)
    app = Flask("excluded")
    sub = defined_in(str(tmp_path / "vendored" / "sub.py"), "vendored.sub", PUSHER, "push")
    assert leak_site_of(telemetry, sub, app) == (HERE, line("call: the user's line"))
    telemetry.exporter.clear()
    other_path = str(tmp_path / "vendoredx.py")
    other = defined_in(other_path, "vendoredx", PUSHER, "push")
    assert leak_site_of(telemetry, other, app) == (other_path, 2)


def test_a_context_entered_without_with_is_reported_at_the_users_line(telemetry):
    """``ctx.__enter__()`` (Flask's own frame between the user and the push): the user's
    line, not Flask's."""
    app = Flask("enter")
    ctxguard.install(**telemetry.providers)

    def work() -> None:
        app.app_context().__enter__()  # push: entered by hand

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    (span,) = telemetry.spans(LEAK_SPAN)
    assert span.attributes["code.file.path"] == HERE
    assert span.attributes["code.line.number"] == line("push: entered by hand")


# --------------------------------------------------------------------------
# exception.stacktrace (docs/telemetry.md, ctxguard.context_error).


def test_the_error_stacktrace_is_a_python_traceback_without_source_lines(telemetry):
    """``exception.stacktrace``: Python's traceback layout, outermost first, one
    ``File ..., line ..., in ...`` line per frame (no source lines), ending with the access
    and the error; bounded to the 32 innermost frames."""
    ctxguard.install(**telemetry.providers)

    def deep(n: int) -> None:
        if n:
            deep(n - 1)
        else:
            _ = request.args  # touch: deep

    with pytest.raises(RuntimeError) as info:
        deep(40)
    (span,) = telemetry.spans(ERROR_SPAN)
    text = exception_event(span)["exception.stacktrace"]
    assert text.endswith(f"\nRuntimeError: {info.value}")
    lines = text.removesuffix(f"\nRuntimeError: {info.value}").split("\n")
    assert lines[0] == "Traceback (most recent call last):"
    frames = lines[1:]
    assert len(frames) == 32
    assert all(f.startswith('  File "') for f in frames)
    # Innermost: the proxy's attribute lookup (ctxguard's stand-in for Werkzeug's).
    assert f"{os.sep}ctxguard{os.sep}" in frames[-1]
    assert frames[-2] == f'  File "{HERE}", line {line("touch: deep")}, in deep'
    assert frames[-3] == f'  File "{HERE}", line {line("touch: deep") - 2}, in deep'


# --------------------------------------------------------------------------
# flask#6123: the push site of a context Flask pushed again for the user (docs/telemetry.md).


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("wrapped", [False, True], ids=["flask", "foreign-wrapper"])
def test_an_abandoned_stream_with_context_is_reported_where_it_was_read(
    telemetry, monkeypatch, wrapped
):
    """A ``stream_with_context`` body abandoned mid-stream and dropped on another thread
    (pallets/flask#6123): Flask pushes the request's contexts again when the body is first
    read, so its app context is reported at the first line of user code on the stack then
    (here the code that plays the server), once, also when another library wraps Flask's
    push and pop. (Flask before 3.1, and 3.2, push them again in ``stream_with_context()``
    itself, in the view: reported at the view's line; on 3.2 it is the request's one
    context, kind ``request``.)"""
    from concurrent.futures import ThreadPoolExecutor

    from flask import stream_with_context

    if wrapped:
        original_push, original_pop = AppContext.push, AppContext.pop
        monkeypatch.setattr(AppContext, "push", lambda self, *a: original_push(self, *a))
        monkeypatch.setattr(AppContext, "pop", lambda self, *a: original_pop(self, *a))
    app = make_app()

    @app.route("/stream")
    def stream() -> Any:
        def chunks() -> Iterator[str]:
            yield "a"
            yield "b"

        return app.response_class(stream_with_context(chunks()))  # push: view

    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    holder: dict[str, Any] = {}

    def first() -> None:
        body = app(environ("/stream"), lambda *a: None)
        chunks = iter(body)
        assert next(chunks) == b"a"  # push: first read
        holder.update(body=body, chunks=chunks)

    with ThreadPoolExecutor(1) as pool:
        pool.submit(first).result()
        dropper = threading.Thread(target=holder.clear)
        dropper.start()
        dropper.join()
        gc.collect()
        pool.submit(call, app, "/").result()  # heals the pooled thread
    # The request's app context: on Flask 3.2 its one context, which holds the request.
    kind = "request" if MERGED else "app"
    spans = [s for s in telemetry.spans(LEAK_SPAN) if s.attributes["ctxguard.context.kind"] == kind]
    # Flask before 3.1, and 3.2 again, push it already in stream_with_context(), in the view.
    pushed = "push: first read" if FLASK_AT_LEAST_3_1 and not MERGED else "push: view"
    assert [s.attributes["code.line.number"] for s in spans] == [line(pushed)]
    assert spans[0].attributes["code.file.path"] == HERE


# --------------------------------------------------------------------------
# uninstall() and install() again while a response is being sent (docs/telemetry.md).


def test_a_request_that_straddles_uninstall_and_install_is_not_judged(telemetry, caplog_ctxguard):
    """A streamed response whose request began before ``uninstall()`` and ends after a new
    ``install()``: its pops went partly unseen, so it is not judged; nothing is reported
    and nothing goes wrong inside ctxguard (no warning)."""
    from flask import stream_with_context

    app = make_app()

    @app.route("/big")
    def big() -> Any:
        @stream_with_context
        def chunks() -> Iterator[bytes]:
            for i in range(4):
                yield f"{request.path}:{i};".encode()

        return app.response_class(chunks())

    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    body = app(environ("/big"), lambda *a: None)
    chunks = iter(body)
    next(chunks)
    ctxguard.uninstall()
    ctxguard.install(**telemetry.providers)
    rest = b"".join(chunks)
    body.close()
    assert rest == b"/big:1;/big:2;/big:3;"
    assert telemetry.value(LEAKS) == 0
    assert caplog_ctxguard.records == []


# --------------------------------------------------------------------------
# Set-up (README, docs/configuration.md).


@pytest.mark.parametrize(
    "argument",
    [
        {"environment": "prod"},
        {"policy": "nope"},
        {"heal": "yes"},
        {"propagate": "all"},
        {"in_app_include": "myapp"},
        {"in_app_exclude": "vendored"},
    ],
)
def test_a_typo_fails_where_the_extension_is_made_before_any_app(telemetry, argument):
    """``CtxGuard(...)`` without an app (the application-factory pattern) still checks every
    argument at once, where it was written, not later in ``init_app``."""
    with pytest.raises(ctxguard.ConfigError):
        ctxguard.CtxGuard(**argument, **telemetry.providers)


@pytest.mark.parametrize("attribute", ["app", "wsgi_app", "application", "__wrapped__", "bound"])
def test_the_debugger_is_found_below_any_middleware(telemetry, attribute):
    """Werkzeug's ``DebuggedApplication`` below a middleware that keeps the next app under
    any of the usual names, or below the app's own bound ``wsgi_app``, is reported."""
    from werkzeug.debug import DebuggedApplication

    app = make_app()
    debugger = DebuggedApplication(app.wsgi_app)

    class Middleware:
        def __call__(self, environ: Any, start_response: Any) -> Any:
            return debugger(environ, start_response)

    if attribute == "bound":
        inner = make_app()
        inner.wsgi_app = debugger  # type: ignore[method-assign]
        app.wsgi_app = inner.__call__  # type: ignore[method-assign]  # bound to an app
    else:
        middleware = Middleware()
        setattr(middleware, attribute, debugger)
        app.wsgi_app = middleware  # type: ignore[method-assign]
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    rule = {"ctxguard.policy.rule": "debugger_middleware"}
    assert telemetry.value("ctxguard.policy.violations", rule) == 1


def test_a_plain_wsgi_app_in_production_serves_without_a_fault(telemetry, caplog_ctxguard):
    """A WSGI app that is not Flask, guarded in production: its first request passes
    through with no policy check to make and nothing logged."""

    def plain(environ: Any, start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        return [b"plain"]

    guard = ctxguard.CtxGuardMiddleware(plain, **telemetry.providers)
    assert call(guard, "/")[2] == b"plain"
    assert call(guard, "/")[2] == b"plain"
    assert caplog_ctxguard.records == []


def test_a_request_through_another_wrapper_is_judged_like_any_other(telemetry, wrapped_contexts):
    """Requests whose contexts are pushed through a foreign wrapper: a clean request leaves
    nothing, a view's leak is a ``request_end`` leak with its route and line."""
    app = make_app()
    other = Flask("other")

    @app.route("/leak/<name>")
    def leak(name: str) -> str:
        contextvars.copy_context().run(lambda: other.app_context().push())  # push: wrapped view
        return name

    ctxguard.CtxGuard(app, **telemetry.providers)
    assert call(app, "/items/2")[2] == b"item 2"
    assert telemetry.value(LEAKS) == 0
    assert call(app, "/leak/a")[2] == b"a"
    (span,) = telemetry.spans(LEAK_SPAN)
    assert span.attributes["ctxguard.leak.site"] == "request_end"
    assert span.attributes["http.route"] == "/leak/<name>"
    assert span.attributes["code.line.number"] == line("push: wrapped view")
    kinds = {"ctxguard.context.kind": "request"}
    assert telemetry.value(PUSHES, kinds) == 2
    assert telemetry.value(POPS, {**kinds, "ctxguard.pop.outcome": "ok"}) == 2


def test_a_push_whose_signal_receiver_raises_is_still_recorded(telemetry, wrapped_contexts):
    """An ``appcontext_pushed`` receiver that raises after the context became current:
    the error reaches the caller and the context, now current, is in the ledger."""
    from flask import appcontext_pushed

    app = Flask("signals")

    def receiver(sender: Any, **extra: Any) -> None:
        raise LookupError("receiver failed")

    ctxguard.install(**telemetry.providers)
    appcontext_pushed.connect(receiver, app)
    try:
        ctx = app.app_context()
        with pytest.raises(LookupError):
            ctx.push()  # push: receiver raises
    finally:
        appcontext_pushed.disconnect(receiver, app)
    try:
        lines = [c["line"] for w in ctxguard.snapshot()["workers"] for c in w["contexts"]]
        assert lines == [line("push: receiver raises")]
        assert telemetry.value(PUSHES, {"ctxguard.context.kind": "app"}) == 1
    finally:
        ctx.pop()


# --------------------------------------------------------------------------
# Metric metadata (docs/telemetry.md, Metrics).


def test_every_metric_has_its_documented_unit_scope_and_description(telemetry):
    """Each of ctxguard's metrics as a backend receives it: instrumentation scope
    ``ctxguard`` at the installed version, the documented unit, and its description."""
    from importlib.metadata import version

    from opentelemetry.sdk.metrics.export import Gauge, Sum

    app = make_app(PRESERVE_CONTEXT_ON_EXCEPTION=True)

    @app.route("/leak")
    def leak() -> str:
        app.app_context().push()
        return "leaked"

    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    with wrong_pop():
        call(app, "/leak")
    with pytest.raises(RuntimeError):
        _ = request.args
    abandon = stream_app()
    ctxguard.CtxGuard(abandon, environment="production", **telemetry.providers)
    abandon_stream(abandon)
    call(abandon, "/")  # heals
    expected = {
        ERRORS: ("{error}", "Flask proxies used outside their context.", True),
        LEAKS: ("{context}", "Contexts pushed and never popped.", True),
        HEALED: ("{context}", "Stale contexts popped by ctxguard so their teardown ran.", True),
        "ctxguard.policy.violations": ("{violation}", "Production policy violations.", True),
        PUSHES: ("{context}", "Application and request contexts pushed.", True),
        POPS: ("{context}", "Application and request contexts popped, by outcome.", True),
        OPEN: ("{context}", "Contexts pushed and not yet popped.", False),
    }
    found = {}
    data = telemetry.reader.get_metrics_data()
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            scope = scope_metrics.scope
            for metric in scope_metrics.metrics:
                assert (scope.name, scope.version) == ("ctxguard", version("flask-ctxguard"))
                assert isinstance(metric.data, Sum | Gauge)
                monotonic = getattr(metric.data, "is_monotonic", None)
                found[metric.name] = (metric.unit, metric.description, monotonic)
    assert found == expected


# --------------------------------------------------------------------------
# snapshot() is a safe point (docs/telemetry.md, deferred events).


def test_snapshot_emits_what_was_kept_back_while_the_sdk_was_busy(telemetry):
    """An app's span processor that reads ``request`` when a span outside any request
    ends: the error happens inside the SDK, so ctxguard keeps it back; ``snapshot()`` is
    one of the safe points where it is emitted (counted and exported), before the next
    request or thread end."""
    from opentelemetry.sdk.trace import SpanProcessor

    seen: list[BaseException] = []

    class Audit(SpanProcessor):
        def on_end(self, span: Any) -> None:
            try:
                _ = request.path
            except RuntimeError as exc:
                seen.append(exc)

    telemetry.tracer_provider.add_span_processor(Audit())
    ctxguard.install(**telemetry.providers)
    with telemetry.tracer_provider.get_tracer("jobs").start_as_current_span("nightly"):
        pass
    assert len(seen) == 1
    assert telemetry.value(ERRORS) == 0  # kept back: the SDK was on the stack
    ctxguard.snapshot()
    assert telemetry.value(ERRORS, {"ctxguard.proxy": "request"}) == 1
    assert [s.attributes["ctxguard.proxy"] for s in telemetry.spans(ERROR_SPAN)] == ["request"]


# --------------------------------------------------------------------------
# snapshot(): contexts adopted at install.


def test_contexts_open_at_install_are_listed_oldest_first(telemetry):
    """A request context pushed before ``install()`` (its app context first, up to Flask
    3.1): the snapshot lists them oldest first, as it lists every other context, and a
    later push after them."""
    app = make_app()
    ctx = app.test_request_context("/")
    ctx.push()
    try:
        ctxguard.install(**telemetry.providers)
        with app.app_context():
            kinds = [c["kind"] for w in ctxguard.snapshot()["workers"] for c in w["contexts"]]
        # Up to 3.1 the request context pushed an app context under it; on 3.2 it is one.
        assert kinds == (["request", "app"] if MERGED else ["app", "request", "app"])
    finally:
        ctx.pop()


def test_a_pop_flask_refuses_is_not_counted_as_a_pop(telemetry):
    """A pop Flask cannot make (from a copy of the thread's ``contextvars`` context: the
    push's token is not valid there, Flask raises ``ValueError`` and the context stays
    current, never to be popped) is not counted as a pop: pushes minus pops stays equal to
    the contexts open."""
    app = make_app()
    ctxguard.install(**telemetry.providers)
    kind = {"ctxguard.context.kind": "app"}
    seen: dict[str, Any] = {}

    def work() -> None:  # on its own thread: the context stays there for good
        ctx = app.app_context()
        ctx.push()
        try:
            contextvars.copy_context().run(ctx.pop)
        except ValueError as exc:
            seen["error"] = exc
        seen["counts"] = [telemetry.value(m, kind) for m in (PUSHES, POPS, OPEN)]

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    assert isinstance(seen["error"], ValueError)
    assert seen["counts"] == [1, 0, 1]
