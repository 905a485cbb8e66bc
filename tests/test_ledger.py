"""The ledger: every push and pop of Flask's contexts is counted and attributed."""

from __future__ import annotations

import builtins
import functools
import gc
import os
import threading
import weakref
from typing import Any

import flask
import pytest
from flask import Flask, current_app
from helpers import (
    CONTEXT_CLASSES,
    MERGED,
    REQUEST_PUSHES,
    call,
    environ,
    line_of,
    make_app,
    read_and_close_streams,
    wrong_pop,
)

import ctxguard

PUSHES = "ctxguard.context.pushes"
POPS = "ctxguard.context.pops"
OPEN = "ctxguard.context.open"
APP = {"ctxguard.context.kind": "app"}
REQUEST = {"ctxguard.context.kind": "request"}


def pops(kind: str, outcome: str) -> dict[str, str]:
    return {"ctxguard.context.kind": kind, "ctxguard.pop.outcome": outcome}


def test_pushes_and_pops_are_counted_exactly(telemetry):
    """Dashboards show exact push/pop counts by kind and outcome."""
    app = make_app()
    ctxguard.install(**telemetry.providers)
    for _ in range(3):
        with app.app_context():
            pass
    with app.test_request_context("/"):
        pass
    # Up to Flask 3.1 the request context pushes its own app context; on 3.2 it is one
    # context, kind ``request``.
    app_pushes = 3 + REQUEST_PUSHES.get("app", 0)
    assert telemetry.value(PUSHES, APP) == app_pushes
    assert telemetry.value(PUSHES, REQUEST) == 1
    assert telemetry.value(POPS, pops("app", "ok")) == app_pushes
    assert telemetry.value(POPS, pops("request", "ok")) == 1
    assert telemetry.value(POPS, pops("app", "wrong_context")) == 0
    assert telemetry.value(OPEN, APP) == 0


def test_counts_are_exact_across_threads(telemetry):
    """Counts stay exact when many threads push at once, and survive the threads' end."""
    app = make_app()
    ctxguard.install(**telemetry.providers)

    def work() -> None:
        for _ in range(200):
            with app.app_context():
                pass

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    del threads
    gc.collect()
    assert telemetry.value(PUSHES, APP) == 1600
    assert telemetry.value(POPS, pops("app", "ok")) == 1600
    assert telemetry.value(OPEN, APP) == 0
    assert ctxguard.snapshot()["workers"] == []
    # Read again: the counts are cumulative, not reset by a read nor lost with the threads.
    assert telemetry.value(PUSHES, APP) == 1600


def test_open_contexts_are_visible_with_push_site(telemetry):
    """An open context shows where the user's code pushed it, in metrics and snapshot."""
    app = make_app()
    ctxguard.install(**telemetry.providers)
    ctx = app.app_context()
    ctx.push()  # push-site: snapshot
    line = line_of(__file__, "# push-site: " + "snapshot")
    try:
        assert telemetry.value(OPEN, APP) == 1
        (worker,) = ctxguard.snapshot()["workers"]
        (entry,) = worker["contexts"]
        assert entry["kind"] == "app"
        assert entry["file"] == __file__
        assert entry["line"] == line
        assert entry["function"].endswith("test_open_contexts_are_visible_with_push_site")
        assert entry["request"] is None
        assert entry["age"] >= 0
        assert worker["thread_name"] == threading.current_thread().name
    finally:
        ctx.pop()
    assert telemetry.value(OPEN, APP) == 0
    assert ctxguard.snapshot()["workers"] == []


def test_push_site_skips_flask_frames(telemetry):
    """``with app.app_context():`` is attributed to the with-statement, not to Flask's __enter__."""
    app = make_app()
    ctxguard.install(**telemetry.providers)
    with app.app_context():  # push-site: with
        entry = ctxguard.snapshot()["workers"][0]["contexts"][0]
        expected = line_of(__file__, "# push-site: " + "with")
        assert (entry["file"], entry["line"]) == (__file__, expected)


def test_wrong_order_pop_is_recorded_and_the_same_error_propagates(telemetry):
    """A wrong-order pop is counted; Flask's error (``AssertionError`` up to Flask 3.1,
    ``RuntimeError`` on 3.2) reaches the caller unchanged."""
    app = make_app()
    ctxguard.install(**telemetry.providers)
    outer = app.app_context()
    inner = app.app_context()
    outer.push()
    inner.push()

    with wrong_pop() as raised:
        outer.pop()

    if not MERGED:
        assert str(raised.value).startswith("Popped wrong app context.")
    # The innermost frame is Flask's own raise, as without ctxguard.
    tb = raised.value.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    assert tb.tb_frame.f_code.co_filename.endswith("flask/ctx.py")
    assert telemetry.value(POPS, pops("app", "wrong_context")) == 1
    if MERGED:
        # Flask 3.2 refused the pop before changing anything: nothing was jumped over,
        # both are still pushed and pop in the right order (see
        # test_a_pop_flask_refuses_out_of_order_stays_open_and_pops_later).
        inner.pop()
        outer.pop()
        assert telemetry.value(POPS, pops("app", "ok")) == 2
        assert telemetry.value(OPEN, APP) == 0
        return
    # Flask reset past ``inner``: it can never be popped and is not kept alive by ctxguard.
    ref = weakref.ref(inner)
    del inner, raised, tb  # the traceback's frames hold it too
    gc.collect()
    assert ref() is None


def test_wrong_order_pop_of_request_context(telemetry):
    """The same for request contexts: counted under kind ``request``."""
    app = make_app()
    ctxguard.install(**telemetry.providers)
    outer = app.test_request_context("/")
    inner = app.test_request_context("/items/1")
    outer.push()
    inner.push()
    with wrong_pop("request"):
        outer.pop()
    assert telemetry.value(POPS, pops("request", "wrong_context")) == 1
    if MERGED:
        # Flask 3.2 refused the pop and left both pushed: the right order pops them.
        inner.pop()
        outer.pop()
        assert telemetry.value(POPS, pops("request", "ok")) == 2
        assert telemetry.value(OPEN) == 0


@pytest.mark.skipif(
    not MERGED,
    reason="Flask up to 3.1 pops anyway, then complains (the tests above and below)",
)
@pytest.mark.parametrize("kind", ["app", "request"])
def test_a_pop_flask_refuses_out_of_order_stays_open_and_pops_later(
    telemetry, caplog_ctxguard, monkeypatch, kind
):
    """Flask 3.2 refuses a pop out of order before changing anything. The very
    ``RuntimeError`` Flask raised reaches the caller; the pop is counted ``wrong_context``
    once and nothing else: the context stays open (``open`` unchanged) and listed in the
    snapshot, reachable and not reported, and so do the contexts above it, still current.
    Popped in the right order afterwards, all are ordinary ``ok`` pops, their teardown
    runs, and nothing is left open or reported as leaked."""
    from flask.ctx import AppContext
    from flask.globals import app_ctx

    flask_raised: list[BaseException] = []
    flask_pop = AppContext.pop

    def pop(self: Any, exc: Any = None) -> None:  # sees what Flask raises, under ctxguard
        try:
            flask_pop(self, exc)
        except BaseException as error:
            flask_raised.append(error)
            raise

    monkeypatch.setattr(AppContext, "pop", pop)
    app = make_app()
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)

    def make() -> Any:
        return app.app_context() if kind == "app" else app.test_request_context("/")

    outer, inner = make(), make()
    outer.push()  # push: refused out of order
    inner.push()  # push: above the refused one
    open_before = telemetry.value(OPEN)
    with wrong_pop(kind) as raised:
        outer.pop()  # pop: refused
    assert flask_raised == [raised.value]
    assert raised.value.__context__ is None
    assert telemetry.value(POPS, pops(kind, "wrong_context")) == 1
    assert telemetry.value(POPS) == 1
    assert telemetry.value(OPEN) == open_before == 2
    assert app_ctx._get_current_object() is inner
    (worker,) = ctxguard.snapshot()["workers"]
    assert [
        (entry["kind"], entry["line"], entry["reachable"], entry["leaked"])
        for entry in worker["contexts"]
    ] == [
        (kind, line_of(__file__, "# push: " + "refused out of order"), True, False),
        (kind, line_of(__file__, "# push: " + "above the refused one"), True, False),
    ]
    assert app.teardowns == []
    inner.pop()
    outer.pop()
    assert app.teardowns == [None, None]
    assert telemetry.value(POPS, pops(kind, "ok")) == 2
    assert telemetry.value(POPS, pops(kind, "wrong_context")) == 1
    assert telemetry.value(OPEN) == 0
    assert ctxguard.snapshot()["workers"] == []
    call(app, "/")  # a request on this thread finds nothing stale nor ambient
    assert telemetry.value(LEAKS) == 0
    assert telemetry.spans("ctxguard.context_leak") == []
    assert [r.getMessage() for r in caplog_ctxguard.records] == [
        f"ctxguard: {kind} context popped with outcome wrong_context at"
        f" {__file__}:{line_of(__file__, '# pop: ' + 'refused')} in"
        " test_a_pop_flask_refuses_out_of_order_stays_open_and_pops_later"
    ]


def test_pop_on_another_thread_is_cross_worker(telemetry):
    """Popping a context on another thread than its push is counted as ``cross_worker``;
    Flask's own error still propagates and the context stays open where it was pushed."""
    app = make_app()
    ctxguard.install(**telemetry.providers)
    ctx = app.app_context()
    ctx.push()
    errors: list[BaseException] = []

    def pop_elsewhere() -> None:
        try:
            ctx.pop()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=pop_elsewhere)
    t.start()
    t.join()
    assert len(errors) == 1
    if MERGED:
        # Flask 3.2 refuses a pop where the context is not the active one (on that thread
        # none is), before changing anything.
        assert isinstance(errors[0], RuntimeError)
        assert "there is no active context" in str(errors[0])
    else:
        # Up to Flask 3.1 the pop fails resetting the other thread's context variable.
        assert isinstance(errors[0], (LookupError, ValueError))
    assert telemetry.value(POPS, pops("app", "cross_worker")) == 1
    assert telemetry.value(OPEN, APP) == 1
    # Still current here, where it was pushed; popping it here works.
    assert current_app._get_current_object() is app
    ctx.pop()
    assert telemetry.value(OPEN, APP) == 0


def test_a_pop_flask_accepts_on_another_thread_closes_the_push(telemetry, caplog_ctxguard):
    """Two threads that run in one ``contextvars.Context`` (``Context.run``, as some task
    runners do) share Flask's context variable: a push on the first and a pop on the
    second is a real pop. It is counted ``cross_worker`` and logged with the popping line,
    the context is no longer open, and the first thread's end reports no leak."""
    import contextvars

    app = make_app()
    ctxguard.install(**telemetry.providers)
    shared = contextvars.copy_context()
    ctx = app.app_context()
    pushed, popped = threading.Event(), threading.Event()

    def pusher() -> None:
        shared.run(ctx.push)
        pushed.set()
        popped.wait(10)

    def popper() -> None:
        pushed.wait(10)
        shared.run(ctx.pop)  # pop: shared context
        popped.set()

    threads = [threading.Thread(target=pusher), threading.Thread(target=popper)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert telemetry.value(POPS, pops("app", "cross_worker")) == 1
    assert telemetry.value(OPEN, APP) == 0
    assert telemetry.spans("ctxguard.context_leak") == []
    assert telemetry.value("ctxguard.context.leaks", APP) == 0
    line = line_of(__file__, "# pop: " + "shared context")
    function = getattr(popper.__code__, "co_qualname", "popper")  # Python 3.10: the short name
    assert [
        r.getMessage() for r in caplog_ctxguard.records if "popped with outcome" in r.getMessage()
    ] == [
        f"ctxguard: app context popped with outcome cross_worker at {__file__}:{line} in {function}"
    ]


def test_a_context_pushed_before_install_pops_as_ok(telemetry):
    """A context a thread pushed before ``install()`` and popped after: an ordinary pop
    (``ok``), not a wrong one; it was never counted as open, so nothing goes negative.
    (Contexts current on the thread that installs are adopted instead.)"""
    app = make_app()
    installed, pushed = threading.Event(), threading.Event()

    def work() -> None:
        with app.app_context():
            pushed.set()
            installed.wait(10)

    thread = threading.Thread(target=work)
    thread.start()
    pushed.wait(10)
    ctxguard.install(**telemetry.providers)
    installed.set()
    thread.join()
    assert telemetry.value(POPS, pops("app", "ok")) == 1
    assert telemetry.value(POPS, pops("app", "cross_worker")) == 0
    assert telemetry.value(OPEN, APP) == 0


def test_ledger_keeps_nothing_alive_after_pop(telemetry):
    """Popped contexts and their requests are freed: the ledger holds no reference."""
    app = make_app()
    ctxguard.install(**telemetry.providers)
    refs = []
    for _ in range(3):
        ctx = app.test_request_context("/")
        ctx.push()
        refs.append(weakref.ref(ctx))
        refs.append(weakref.ref(ctx.request))
        ctx.pop()
        del ctx
    call(app, "/")
    gc.collect()
    assert [r() for r in refs] == [None] * len(refs)


def test_contexts_pushed_before_install_do_not_confuse_counts(telemetry):
    """A context pushed before ctxguard and popped after it is counted as a normal pop."""
    app = Flask("early")
    ctx = app.app_context()
    ctx.push()
    ctxguard.install(**telemetry.providers)
    ctx.pop()
    assert telemetry.value(POPS, pops("app", "ok")) == 1
    assert telemetry.value(OPEN, APP) == 0


# --------------------------------------------------------------------------
# What the plain path does not show: another library's wrapper around Flask's push
# and pop, contexts pushed twice, pops Flask refuses or makes on another thread,
# contexts Flask pushed with no site of their own, healing, and what the ledger keeps.

LEAKS = "ctxguard.context.leaks"


def wrap_push_and_pop(monkeypatch) -> None:
    """Another library wraps Flask's push and pop (with a signature of its own)."""

    def wrap(method):
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            return method(self, *args, **kwargs)

        return wrapper

    for cls in CONTEXT_CLASSES:
        monkeypatch.setattr(cls, "push", wrap(cls.push))
        monkeypatch.setattr(cls, "pop", wrap(cls.pop))


@pytest.fixture
def foreign_wrapper(monkeypatch):
    wrap_push_and_pop(monkeypatch)


@pytest.fixture(params=["flask", "foreign-wrapper"])
def hooks(request, monkeypatch):
    """Flask's own push and pop, or the same wrapped by another library."""
    if request.param == "foreign-wrapper":
        wrap_push_and_pop(monkeypatch)


def test_a_stream_inside_with_client_leaks_nothing_under_a_foreign_wrapper(
    telemetry, foreign_wrapper
):
    """With Flask's push and pop wrapped by another library, a ``stream_with_context``
    response inside ``with client:`` (one context pushed by the request, the stream and
    the client) is still popped cleanly: nothing leaked, every pop ``ok``."""
    from flask import Response, session, stream_with_context

    app = Flask("streams")
    app.config.update(TESTING=True, SECRET_KEY="s")

    @app.route("/")
    def index():
        session["test"] = "flask"

        @stream_with_context
        def gen():
            yield session["test"]

        return Response(gen())

    ctxguard.CtxGuard(app, **telemetry.providers)
    read_and_close_streams(app.test_client())
    assert telemetry.value(LEAKS) == 0
    assert telemetry.spans() == []
    assert telemetry.value(POPS, pops("app", "ok")) == telemetry.value(PUSHES, APP)
    assert telemetry.value(POPS, pops("request", "ok")) == telemetry.value(PUSHES, REQUEST)
    assert telemetry.value(OPEN) == 0


def test_a_context_pushed_again_by_a_view_is_reported_at_the_view(telemetry, hooks):
    """A view pushes the request's own app context once more and never pops it: the
    request's end pops Flask's push, the view's stays open and current. The leak is
    reported at the view's line (not as "a place Flask chose"), with the request's route,
    and linked to the request's trace. (On Flask 3.2 the request's app context is its one
    context, which holds the request: the leak is of kind ``request``.)"""
    from flask.globals import app_ctx

    app = make_app()
    tracer = telemetry.tracer_provider.get_tracer("server")

    @app.route("/again")
    def again() -> str:
        app_ctx.push()  # push: again
        return "ok"

    ctxguard.CtxGuard(app, **telemetry.providers)
    with app.app_context():  # this module pushed a context before, outside any request
        pass
    with tracer.start_as_current_span("GET /again") as request_span:
        call(app, "/again")
    # ``app_ctx`` is the app context Flask pushed under the request context up to 3.1;
    # on 3.2, the request's one context, holding the request.
    kind = "request" if MERGED else "app"
    (span,) = telemetry.spans("ctxguard.context_leak")
    assert span.attributes["ctxguard.context.kind"] == kind
    assert span.attributes["code.file.path"] == __file__
    assert span.attributes["code.line.number"] == line_of(__file__, "# push: " + "again")
    assert span.attributes["http.route"] == "/again"
    (link,) = span.links
    assert link.context.span_id == request_span.get_span_context().span_id
    assert telemetry.value(LEAKS, {"ctxguard.context.kind": kind}) == 1
    assert telemetry.value(LEAKS) == 1


def test_requests_served_without_the_middleware_are_counted_like_any_other(
    telemetry, caplog_ctxguard, hooks
):
    """With the process hooks only (``install()``, no ``CtxGuard``), a request still counts
    one push and one pop of each context Flask pushes for it (a request and an app context
    up to Flask 3.1, one request context on 3.2), is open while the view runs, and nothing
    goes wrong inside ctxguard."""
    app = make_app()
    seen: list[int] = []

    @app.route("/open")
    def view() -> str:
        seen.append(telemetry.value(OPEN))
        return "ok"

    ctxguard.install(**telemetry.providers)
    call(app, "/open")
    # Two contexts per request up to Flask 3.1, one on 3.2.
    expected = [REQUEST_PUSHES.get(kind, 0) for kind in ("app", "request")]
    assert seen == [sum(expected)]
    assert [telemetry.value(PUSHES, kind) for kind in (APP, REQUEST)] == expected
    assert [telemetry.value(POPS, pops(kind, "ok")) for kind in ("app", "request")] == expected
    assert telemetry.value(OPEN) == 0
    assert caplog_ctxguard.records == []


def test_a_pop_flask_cannot_make_leaves_the_context_open(telemetry, caplog_ctxguard, hooks):
    """A pop Flask cannot make (from a copy of the thread's ``contextvars`` context, where
    the push's token is not valid: Flask raises ``ValueError`` and the context stays
    current) leaves the context open: it is still counted open while the thread runs and,
    never popped, reported as leaked at its push line when the thread ends."""
    import contextvars

    app = make_app()
    ctxguard.install(**telemetry.providers)
    seen: dict[str, object] = {}

    def work() -> None:
        ctx = app.app_context()
        ctx.push()  # push: refused pop
        with pytest.raises(ValueError):
            contextvars.copy_context().run(ctx.pop)
        seen["current"] = current_app._get_current_object()
        seen["open"] = telemetry.value(OPEN, APP)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert seen == {"current": app, "open": 1}
    assert telemetry.value(POPS, pops("app", "ok")) == 0  # nothing was popped
    (span,) = telemetry.spans("ctxguard.context_leak")
    assert span.attributes["ctxguard.leak.site"] == "thread_exit"
    assert span.attributes["code.line.number"] == line_of(__file__, "# push: " + "refused pop")
    assert not [r for r in caplog_ctxguard.records if "internal error" in r.getMessage()]


def test_a_wrong_order_pop_leaves_the_contexts_below_it_alone(telemetry):
    """After a wrong-order pop, only the contexts pushed after the popped one are out of
    reach (up to Flask 3.1; 3.2 refuses the pop and none is); one pushed before it is still
    reachable, and popping it closes it: nothing of it stays open or in the snapshot."""
    app = make_app()
    ctxguard.install(**telemetry.providers)
    base = app.app_context()
    base.push()  # push: below
    outer, inner = app.app_context(), app.app_context()
    outer.push()  # push: popped out of order
    inner.push()  # push: jumped over
    with wrong_pop():
        outer.pop()

    def contexts() -> list[tuple[int, bool]]:
        return [
            (entry["line"], entry["reachable"])
            for worker in ctxguard.snapshot()["workers"]
            for entry in worker["contexts"]
        ]

    below, popped, jumped = (
        line_of(__file__, "# push: " + "below"),
        line_of(__file__, "# push: " + "popped out of order"),
        line_of(__file__, "# push: " + "jumped over"),
    )
    if MERGED:
        # Flask 3.2 refused the pop before changing anything: all three are still pushed
        # and reachable, and pop in the right order.
        assert contexts() == [(below, True), (popped, True), (jumped, True)]
        inner.pop()
        outer.pop()
        assert contexts() == [(below, True)]
        assert current_app._get_current_object() is app
        base.pop()
        assert contexts() == []
        assert telemetry.value(OPEN, APP) == 0
        assert telemetry.value(POPS, pops("app", "ok")) == 3
        return
    assert contexts() == [(below, True), (jumped, False)]
    assert current_app._get_current_object() is app
    base.pop()
    assert contexts() == [(jumped, False)]
    assert telemetry.value(OPEN, APP) == 1  # ``inner`` only: this test still holds it
    assert telemetry.value(POPS, pops("app", "ok")) == 1


def test_a_wrong_order_pop_of_a_context_pushed_twice_closes_one_push(telemetry):
    """A context pushed twice with another one between, then popped out of order: up to
    Flask 3.1, Flask undoes its second push (and complains), the first one is still
    current. Exactly two contexts stay open: the first push and the one jumped over, which
    is out of reach and not kept alive by ctxguard. Flask 3.2 refuses the pop and undoes
    nothing: the three pushes stay open, all reachable, and pop in the right order."""
    app = make_app()
    ctxguard.install(**telemetry.providers)
    twice, between = app.app_context(), app.app_context()
    twice.push()
    twice.push()
    between.push()
    with wrong_pop():
        twice.pop()
    if MERGED:
        # Flask 3.2 checks before changing anything: the pop is refused, not made.
        assert telemetry.value(OPEN, APP) == 3
        assert telemetry.value(POPS, pops("app", "wrong_context")) == 1
        assert telemetry.value(POPS, pops("app", "ok")) == 0
        (worker,) = ctxguard.snapshot()["workers"]
        assert [entry["reachable"] for entry in worker["contexts"]] == [True, True, True]
        between.pop()
        twice.pop()
        assert app.teardowns == [None]  # ``between``'s; ``twice`` is still pushed once
        twice.pop()
        assert app.teardowns == [None, None]
        assert telemetry.value(POPS, pops("app", "ok")) == 3
        assert telemetry.value(OPEN, APP) == 0
        return
    assert telemetry.value(OPEN, APP) == 2
    assert telemetry.value(POPS, pops("app", "wrong_context")) == 1
    (worker,) = ctxguard.snapshot()["workers"]
    # The first push is still current; the one jumped over can never be popped, and
    # ctxguard does not keep it alive.
    assert [entry["reachable"] for entry in worker["contexts"]] == [True, False]
    freed = weakref.ref(between)
    del between
    gc.collect()
    assert freed() is None
    twice.pop()  # the first push, current again


def test_a_pop_with_no_code_of_the_users_on_the_stack_is_logged_at_an_unknown_place(telemetry):
    """A cross-thread pop made with nothing but Flask and ctxguard on the stack (a thread
    started at C level, running ``Context.run(ctx.pop)`` directly) is still logged, and
    says it happened at an unknown place."""
    import _thread
    import contextvars
    import logging

    app = make_app()
    ctxguard.install(**telemetry.providers)
    shared = contextvars.copy_context()
    ctx = app.app_context()
    shared.run(ctx.push)
    messages: list[str] = []
    logged = threading.Event()

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "popped with outcome" in record.getMessage():
                messages.append(record.getMessage())
                logged.set()

    logger = logging.getLogger("ctxguard")
    handler = Seen()
    logger.addHandler(handler)
    try:
        _thread.start_new_thread(shared.run, (ctx.pop,))
        assert logged.wait(10)
    finally:
        logger.removeHandler(handler)
    assert messages == [
        "ctxguard: app context popped with outcome cross_worker at an unknown place"
    ]
    assert telemetry.value(POPS, pops("app", "cross_worker")) == 1


def test_a_context_popped_on_another_thread_leaves_the_open_count_and_the_snapshot(
    telemetry, hooks
):
    """Once a context is popped on another thread sharing its ``contextvars`` context, the
    thread that pushed it (still running) no longer counts it open nor shows it in the
    snapshot; its contexts pushed after it are still there."""
    import contextvars

    app = make_app()
    ctxguard.install(**telemetry.providers)
    shared = contextvars.copy_context()
    ctx = app.app_context()
    shared.run(ctx.push)
    later = app.app_context()
    later.push()  # push: still open
    thread = threading.Thread(target=shared.run, args=(ctx.pop,))
    thread.start()
    thread.join()
    assert telemetry.value(POPS, pops("app", "cross_worker")) == 1
    assert telemetry.value(OPEN, APP) == 1
    (worker,) = ctxguard.snapshot()["workers"]
    assert [entry["line"] for entry in worker["contexts"]] == [
        line_of(__file__, "# push: " + "still open")
    ]
    later.pop()
    assert telemetry.value(OPEN, APP) == 0


#: Exception groups' base class (Python 3.11+; before, nothing is one).
EXCEPTION_GROUP: Any = getattr(builtins, "BaseExceptionGroup", ())


def teardown_errors(error: BaseException) -> list[BaseException]:
    """The errors teardown functions raised, out of Flask 3.2's exception groups."""
    if isinstance(error, EXCEPTION_GROUP):
        return [leaf for inner in error.exceptions for leaf in teardown_errors(inner)]
    return [error]


def test_a_teardown_error_that_cannot_be_printed_reaches_the_caller_unchanged(
    telemetry, caplog_ctxguard
):
    """A teardown function raises an ``AssertionError`` whose message itself fails to
    render: ctxguard, which reads the message of an ``AssertionError`` from a pop, logs its
    own failure once (naming where) and the caller gets the very exception raised; the
    context is popped and not counted open. (Flask 3.2 on Python 3.11+ raises teardown
    errors inside exception groups, which ctxguard does not read: the caller gets Flask's
    group holding that very exception, and nothing is logged.)"""
    import sys

    class Unprintable(AssertionError):
        def __str__(self) -> str:
            raise RuntimeError("no message")

    app = make_app()
    raised_here: list[BaseException] = []

    @app.teardown_appcontext
    def fail(exc: BaseException | None) -> None:
        raised_here.append(Unprintable())
        raise raised_here[-1]

    ctxguard.install(**telemetry.providers)
    ctx = app.app_context()
    ctx.push()
    # Flask 3.2 runs every teardown function, pops, then raises their errors together, in
    # exception groups (Python 3.11+); up to 3.1 the error itself.
    grouped = MERGED and sys.version_info >= (3, 11)
    with pytest.raises(BaseException) as raised:
        ctx.pop()
    if grouped:
        assert isinstance(raised.value, EXCEPTION_GROUP)
        assert str(raised.value).startswith("Errors during context teardown")
    else:
        assert raised.value is raised_here[0]
    assert teardown_errors(raised.value) == raised_here
    assert raised.value.__context__ is None
    assert not flask.has_app_context()
    assert telemetry.value(OPEN, APP) == 0
    messages = [r.getMessage() for r in caplog_ctxguard.records]
    if grouped:
        assert messages == []
        return
    (message,) = messages
    assert message.startswith(
        "ctxguard: internal error in ledger pop (ignored, the application is not affected;"
        " 0 more since the last report): RuntimeError"
    )


def test_leaks_with_no_push_site_are_told_apart_by_the_request_that_started_them(
    telemetry, caplog_ctxguard
):
    """Threads started by two different routes each push a request context and never pop
    it. Up to Flask 3.1 the app context Flask pushed inside it has no push site of its own;
    the two are still two leaks, each logged with the route that started its thread. (On
    Flask 3.2 the request context is the only one, and it has the user's push site: two
    leaks of one push site, logged once a minute per site.)"""
    app = make_app()

    def work() -> None:
        app.test_request_context("/").push()  # push: in work

    def start_work() -> str:
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
        return "started"

    app.add_url_rule("/a", "a", start_work)
    app.add_url_rule("/b", "b", start_work)
    ctxguard.CtxGuard(app, **telemetry.providers)
    call(app, "/a")
    call(app, "/b")
    if MERGED:
        # Flask 3.2 pushes no app context inside the request context: the one context
        # has the line in ``work`` as its push site, the same for both threads.
        leaked = [
            r.getMessage()
            for r in caplog_ctxguard.records
            if r.getMessage().startswith("ctxguard: request context leaked")
        ]
        function = getattr(work.__code__, "co_qualname", "work")  # Python 3.10: the short name
        assert [m.rsplit(", ", 2)[0] for m in leaked] == [
            "ctxguard: request context leaked (thread_exit), pushed in work started by request"
            f" GET /a; pushed at {__file__}:{line_of(__file__, '# push: ' + 'in work')} in"
            f" {function}",
        ]
        assert telemetry.value(LEAKS, REQUEST) == 2
        assert telemetry.value(LEAKS) == 2
        return
    leaked = [
        r.getMessage()
        for r in caplog_ctxguard.records
        if r.getMessage().startswith("ctxguard: app context leaked")
    ]
    assert [m.split("; pushed at ")[0] for m in leaked] == [
        "ctxguard: app context leaked (thread_exit), pushed in work started by request GET /a",
        "ctxguard: app context leaked (thread_exit), pushed in work started by request GET /b",
    ]
    assert telemetry.value(LEAKS, APP) == 2


def test_a_stale_context_not_current_on_the_thread_is_not_healed(telemetry):
    """A view pushes an app context in a copy of its ``contextvars`` context (as
    ``asyncio.run`` or ``Context.run`` do) and never pops it: it is reported as leaked when
    the request ends, but it is not current on the thread, so the next request there does
    not pop it: no teardown runs for it and nothing is counted healed."""
    import contextvars

    app = make_app()

    @app.route("/elsewhere")
    def elsewhere() -> str:
        contextvars.copy_context().run(app.app_context().push)
        return "ok"

    ctxguard.CtxGuard(app, environment="production", heal=True, **telemetry.providers)
    call(app, "/elsewhere")
    assert telemetry.value(LEAKS, APP) == 1
    call(app, "/")
    assert telemetry.value("ctxguard.context.healed") == 0
    assert app.teardowns == [None, None]  # the two requests' own app contexts


def test_contexts_closed_on_other_threads_are_not_reported_by_the_next_request(
    telemetry, caplog_ctxguard
):
    """Two contexts pushed on this thread in ``contextvars`` contexts that other threads
    then run and pop there: they are closed. The next request on this thread reports only
    the context still open here (pushed outside any request), not the two closed ones."""
    import contextvars

    app = make_app()
    ctxguard.CtxGuard(app, environment="production", heal=False, **telemetry.providers)
    kept = app.app_context()
    kept.push()  # push: kept open
    first, second = contextvars.copy_context(), contextvars.copy_context()
    closed = [app.app_context(), app.app_context()]
    first.run(closed[0].push)
    second.run(closed[1].push)
    for shared, ctx in ((first, closed[0]), (second, closed[1])):
        thread = threading.Thread(target=shared.run, args=(ctx.pop,))
        thread.start()
        thread.join()
    call(app, "/")
    spans = telemetry.spans("ctxguard.context_leak")
    assert [s.attributes["code.line.number"] for s in spans] == [
        line_of(__file__, "# push: " + "kept open")
    ]
    assert telemetry.value(LEAKS, APP) == 1


@pytest.mark.skipif(
    MERGED,
    reason="Flask 3.2 refuses a wrong-order pop: no context is ever jumped over"
    " (test_a_pop_flask_refuses_out_of_order_stays_open_and_pops_later)",
)
def test_a_context_jumped_over_in_a_view_and_collected_is_still_reported(telemetry):
    """A view pushes two app contexts and pops the outer one first: Flask can never pop the
    inner one. Even once it has been garbage collected, it is reported as leaked when the
    request ends, at its push line."""
    app = make_app()

    @app.route("/jump")
    def jump() -> str:
        outer, inner = app.app_context(), app.app_context()
        outer.push()
        inner.push()  # push: skipped in a view
        ref = weakref.ref(inner)
        del inner
        with pytest.raises(AssertionError, match="Popped wrong app context"):
            outer.pop()
        gc.collect()
        assert ref() is None
        return "ok"

    ctxguard.CtxGuard(app, **telemetry.providers)
    assert call(app, "/jump")[2] == b"ok"
    (span,) = telemetry.spans("ctxguard.context_leak")
    assert span.attributes["code.line.number"] == line_of(
        __file__, "# push: " + "skipped in a view"
    )


@pytest.mark.skipif(
    MERGED,
    reason="Flask 3.2's request_ctx is an alias of app_ctx, the request's one context"
    " (test_a_context_pushed_again_by_a_view_is_reported_at_the_view)",
)
def test_a_request_context_pushed_again_by_a_view_reports_both_contexts_at_the_view(telemetry):
    """A view pushes the request's own request context once more and never pops it: the
    request's end undoes only Flask's push of it, so the request context and the app
    context Flask pushed with it stay open. Both are reported at the view's line: the app
    context has no push site of its own and takes the one of the request's next push."""
    from flask.globals import request_ctx

    app = make_app()

    @app.route("/again")
    def again() -> str:
        request_ctx.push()  # push: request again
        return "ok"

    ctxguard.CtxGuard(app, **telemetry.providers)
    call(app, "/again")
    spans = telemetry.spans("ctxguard.context_leak")
    line = line_of(__file__, "# push: " + "request again")
    assert sorted(
        (s.attributes["ctxguard.context.kind"], s.attributes.get("code.line.number")) for s in spans
    ) == [("app", line), ("request", line)]


def test_a_push_made_after_the_response_does_not_hide_the_requests_push_sites(
    telemetry, caplog_ctxguard
):
    """The same leak in a streamed response, with a context pushed outside any request
    (by the code serving it) between the response and its close: the request's two
    contexts (its one context on Flask 3.2) are still reported at the view's line when the
    body is closed."""
    import flask.globals

    # The request's own context: up to Flask 3.1 ``request_ctx`` (with the app context
    # Flask pushed under it); on 3.2 ``app_ctx``, its one context (``request_ctx`` is a
    # deprecated alias of it there).
    own = flask.globals.app_ctx if MERGED else vars(flask.globals)["request_ctx"]
    app = make_app()

    @app.route("/stream")
    def stream():
        own.push()  # push: streamed again

        def chunks():
            yield "a"

        return app.response_class(chunks())

    ctxguard.CtxGuard(app, **telemetry.providers)
    body = app(environ("/stream"), lambda *a: None)
    server = app.app_context()
    server.push()
    try:
        assert b"".join(body) == b"a"
        body.close()
    finally:
        server.pop()
    line = line_of(__file__, "# push: " + "streamed again")
    assert sorted(
        (s.attributes["ctxguard.context.kind"], s.attributes.get("code.line.number"))
        for s in telemetry.spans("ctxguard.context_leak")
    ) == ([("request", line)] if MERGED else [("app", line), ("request", line)])


def test_a_view_that_pushes_the_ambient_app_context_again_leaks_it(telemetry):
    """An app context pushed outside any request (at import time) is what every request
    on the thread uses. A view that pushes it once more and never pops it leaks that
    push: it is reported when the request ends, at the view's line."""
    from flask.globals import app_ctx

    app = make_app(TESTING=True)

    @app.route("/again")
    def again() -> str:
        app_ctx.push()  # push: ambient again
        return "ok"

    ambient = app.app_context()
    ambient.push()
    ctxguard.CtxGuard(app, **telemetry.providers)
    call(app, "/again")
    (span,) = telemetry.spans("ctxguard.context_leak")
    assert span.attributes["ctxguard.leak.site"] == "request_end"
    assert span.attributes["code.line.number"] == line_of(__file__, "# push: " + "ambient again")


def test_the_ledger_does_not_grow_with_the_threads_that_have_ended(telemetry):
    """A long-running process starts threads for ever (a thread per request, pools that
    renew their threads): what ctxguard keeps for a thread that pushed contexts is freed
    when the thread ends, and nothing of it is left behind, also nothing reported on
    ``sys.unraisablehook``."""
    import sys
    import tracemalloc

    app = make_app()
    ctxguard.install(**telemetry.providers)
    unraisable: list[Any] = []

    def work() -> None:
        with app.app_context():
            pass

    def run_threads(n: int) -> None:
        for _ in range(n):
            thread = threading.Thread(target=work)
            thread.start()
            thread.join()
        gc.collect()

    def in_ledger(snapshot: tracemalloc.Snapshot) -> int:
        ledger_file = os.path.join(os.path.dirname(ctxguard.__file__), "ledger.py")
        return sum(
            s.size
            for s in snapshot.statistics("filename")
            if s.traceback[0].filename == ledger_file
        )

    def from_ctxguard(args: Any) -> bool:
        tb = args.exc_traceback
        while tb is not None:
            if tb.tb_frame.f_code.co_filename.startswith(os.path.dirname(ctxguard.__file__)):
                return True
            tb = tb.tb_next
        return False

    gc.collect()  # what earlier tests left behind is not this test's
    hook = sys.unraisablehook
    sys.unraisablehook = unraisable.append
    tracemalloc.start()
    try:
        run_threads(5)  # warm up
        before = in_ledger(tracemalloc.take_snapshot())
        run_threads(100)
        grown = in_ledger(tracemalloc.take_snapshot()) - before
    finally:
        tracemalloc.stop()
        sys.unraisablehook = hook
    assert grown < 2000, f"{grown} bytes kept for 100 ended threads"
    assert [args for args in unraisable if from_ctxguard(args)] == []


def test_a_thread_reusing_the_ident_of_an_ended_thread_still_has_its_leaks_reported(
    telemetry,
):
    """A response body outlives the thread that served it (kept and dropped later), and
    the system gives that thread's identifier to a new thread meanwhile. When the body is
    dropped, the new thread's ledger is untouched: a context it never pops is reported
    when it ends."""
    app = make_app()

    @app.route("/stream")
    def stream():
        return app.response_class(iter(["a"]))

    ctxguard.CtxGuard(app, **telemetry.providers)
    kept: list[object] = []
    first = threading.Thread(target=lambda: kept.append(app(environ("/stream"), lambda *a: None)))
    first.start()
    first.join()
    chosen, pushed, dropped = threading.Event(), threading.Event(), threading.Event()

    def candidate(go: threading.Event) -> None:
        go.wait(10)
        if chosen.is_set():
            app.app_context().push()  # push: reused ident
            pushed.set()
            dropped.wait(10)

    for _ in range(100):  # until the system hands out the first thread's identifier again
        go = threading.Event()
        second = threading.Thread(target=candidate, args=(go,))
        second.start()
        if second.ident == first.ident:
            chosen.set()
        go.set()
        if chosen.is_set():
            break
        second.join()
    else:
        kept.clear()
        pytest.skip("this system never reused the thread identifier")
    pushed.wait(10)
    kept.clear()
    gc.collect()
    dropped.set()
    second.join()
    (span,) = telemetry.spans("ctxguard.context_leak")
    assert span.attributes["ctxguard.leak.site"] == "thread_exit"
    assert span.attributes["code.line.number"] == line_of(__file__, "# push: " + "reused ident")


def test_the_exception_given_to_pop_reaches_the_teardown_functions(telemetry, hooks):
    """``pop(exc)`` and ``pop(exc=...)`` hand the exception to the app's teardown
    functions as without ctxguard, ``pop()`` in an ``except`` block the exception being
    handled (up to Flask 3.1; 3.2's ``pop()`` hands them ``None``); so does Flask for a view
    that raised."""
    app = make_app()

    @app.route("/fail")
    def fail() -> str:
        raise KeyError("failed")

    ctxguard.install(**telemetry.providers)
    error = ValueError("given")
    first, second = app.app_context(), app.app_context()
    first.push()
    first.pop(error)
    second.push()
    second.pop(exc=error)
    third = app.app_context()
    third.push()
    try:
        raise LookupError("handled")
    except LookupError:
        third.pop()
    assert call(app, "/fail")[0] == "500 INTERNAL SERVER ERROR"
    # Up to Flask 3.1 ``pop()`` takes the exception being handled (``sys.exc_info()``);
    # 3.2's defaults to ``None``.
    handled = type(None) if MERGED else LookupError
    assert [type(exc) for exc in app.teardowns] == [ValueError, ValueError, handled, KeyError]
    assert app.teardowns[:2] == [error, error]


def test_the_hooked_push_and_pop_look_like_the_methods_they_replace(telemetry, hooks):
    """Code that inspects Flask's ``push`` and ``pop`` (documentation tools, debuggers,
    another library hooking them after ctxguard) sees the same name, qualified name,
    module, docstring and signature, and unwraps them to the same function."""
    import inspect

    replaced = [(cls, name) for cls in CONTEXT_CLASSES for name in ("push", "pop")]
    before = {key: getattr(*key) for key in replaced}
    ctxguard.install(**telemetry.providers)
    for key, original in before.items():
        hooked = getattr(*key)
        assert hooked is not original
        for attribute in ("__name__", "__qualname__", "__module__", "__doc__"):
            assert getattr(hooked, attribute) == getattr(original, attribute), (key, attribute)
        assert inspect.signature(hooked) == inspect.signature(original)
        assert inspect.unwrap(hooked) is inspect.unwrap(original)


def test_wrapped_push_and_pop_keep_their_own_parameters(telemetry, monkeypatch):
    """Another library's ``push`` and ``pop`` wrappers with parameters of their own are
    called as without ctxguard: a caller passing those parameters by name reaches them."""
    from flask.ctx import AppContext

    original_push, original_pop = AppContext.push, AppContext.pop
    notes: list[str] = []

    @functools.wraps(original_push)
    def push(self, note="none"):
        notes.append(note)
        return original_push(self)

    @functools.wraps(original_pop)
    def pop(self, error=None):
        return original_pop(self, error) if error is not None else original_pop(self)

    monkeypatch.setattr(AppContext, "push", push)
    monkeypatch.setattr(AppContext, "pop", pop)
    app = make_app()
    ctxguard.install(**telemetry.providers)
    ctx = app.app_context()
    ctx.push(note="named")
    error = ValueError("named")
    ctx.pop(error=error)
    assert notes == ["named"]
    assert app.teardowns == [error]
    assert telemetry.value(PUSHES, APP) == 1
    assert telemetry.value(POPS, pops("app", "ok")) == 1
