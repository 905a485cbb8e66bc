"""The ledger: every push and pop of Flask's contexts is counted and attributed."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
from flask import Flask, current_app
from helpers import call, line_of, make_app

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
    assert telemetry.value(PUSHES, APP) == 4  # the request context pushes its own app context
    assert telemetry.value(PUSHES, REQUEST) == 1
    assert telemetry.value(POPS, pops("app", "ok")) == 4
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
    """A wrong-order pop is counted; Flask's AssertionError reaches the caller unchanged."""
    app = make_app()
    ctxguard.install(**telemetry.providers)
    outer = app.app_context()
    inner = app.app_context()
    outer.push()
    inner.push()

    with pytest.raises(AssertionError) as raised:
        outer.pop()

    assert str(raised.value).startswith("Popped wrong app context.")
    # The innermost frame is Flask's own raise, as without ctxguard.
    tb = raised.value.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    assert tb.tb_frame.f_code.co_filename.endswith("flask/ctx.py")
    assert telemetry.value(POPS, pops("app", "wrong_context")) == 1
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
    with pytest.raises(AssertionError, match="Popped wrong request context"):
        outer.pop()
    assert telemetry.value(POPS, pops("request", "wrong_context")) == 1


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
    assert len(errors) == 1 and isinstance(errors[0], (LookupError, ValueError))
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
