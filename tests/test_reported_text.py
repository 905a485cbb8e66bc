"""The exact words ctxguard reports: log lines and hints, as docs/telemetry.md lists them.

People read these lines in their logs and span attributes; the README quotes one word for
word. Each test here runs a real case end to end (a real app, real threads, real telemetry
from the SDK's in-memory exporter) and checks the whole text, so a changed word, a lost
field or a wrong branch is seen.
"""

from __future__ import annotations

import importlib
import logging
import re
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from flask import Flask, current_app, g, request, stream_with_context
from helpers import MERGED, call, line_of, make_app, wrong_pop

import ctxguard

HERE = __file__
ERROR_SPAN = "ctxguard.context_error"


def messages(caplog: pytest.LogCaptureFixture, start: str = "ctxguard: ") -> list[str]:
    """ctxguard's WARNING lines, in order, as a log handler formats them."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "ctxguard"
        and r.levelno == logging.WARNING
        and r.getMessage().startswith(start)
    ]


def where(marker: str, function: str) -> str:
    """``file:line in function`` for the line of this file holding ``marker``.

    ``function`` is the qualified name; Python 3.10 code objects carry only the short name
    (no ``co_qualname``), and that is what ctxguard can report there."""
    if sys.version_info < (3, 11):
        function = function.rsplit(".", 1)[-1]
    return f"{HERE}:{line_of(HERE, '# ' + marker)} in {function}"


def run_in_thread(target: Any) -> None:
    worker = threading.Thread(target=target, name="worker-1")
    worker.start()
    worker.join()


# --------------------------------------------------------------------------
# Proxy errors: "ctxguard: <proxy> used outside <a request|an application> context at
# <file:line in function> (<worker kind> worker[, started by|serving <method> <route>]).
# <hint>"


def test_error_line_in_a_thread_started_by_a_request(telemetry, caplog_ctxguard):
    """The README's example line: proxy, the user's line, the worker kind, the request that
    started the thread (method and route template) and the hint, word for word."""
    app = make_app()

    @app.route("/reports/<int:report_id>", methods=["POST"])
    def reports(report_id: int) -> str:
        def get_token() -> None:
            try:
                _ = request.headers  # touch: thread started by a request
            except RuntimeError:
                pass

        run_in_thread(get_token)
        return "ok"

    ctxguard.CtxGuard(app, **telemetry.providers)
    call(app, "/reports/7", REQUEST_METHOD="POST")
    (line,) = messages(caplog_ctxguard)
    function = "test_error_line_in_a_thread_started_by_a_request.<locals>.reports.<locals>"
    function += ".get_token"
    assert line == (
        "ctxguard: request used outside a request context at"
        f" {where('touch: thread started by a request', function)}"
        " (thread worker, started by POST /reports/<int:report_id>). This thread outlives the"
        " request that started it: pass the values it needs from `request` in as arguments, or"
        " wrap the function with `flask.copy_current_request_context`."
    )


def test_error_line_of_a_streamed_body_names_the_request_it_serves(telemetry, caplog_ctxguard):
    """Code run for a request whose context is gone (a streamed body) is a ``request``
    worker "serving" that request, and the hint says how to keep the context."""
    app = make_app()

    @app.route("/stream")
    def stream() -> Any:
        def chunks() -> Iterator[str]:
            try:
                yield request.path  # touch: streamed body
            except RuntimeError:
                yield "no request"

        return app.response_class(chunks())

    ctxguard.CtxGuard(app, **telemetry.providers)
    call(app, "/stream")
    (line,) = messages(caplog_ctxguard)
    function = "test_error_line_of_a_streamed_body_names_the_request_it_serves.<locals>"
    function += ".stream.<locals>.chunks"
    assert line == (
        "ctxguard: request used outside a request context at"
        f" {where('touch: streamed body', function)} (request worker, serving GET /stream)."
        " This runs after the request's context was popped, while its response is streamed or"
        " closed: wrap the generator with `flask.stream_with_context`, or the callback with"
        " `flask.copy_current_request_context`."
    )


def test_error_line_of_work_started_by_a_request_that_matched_no_route(telemetry, caplog_ctxguard):
    """A request that matched no route has no route template: the line says
    ``<unmatched>``, never the raw path."""
    app = make_app()

    @app.before_request
    def audit() -> None:
        def work() -> None:
            try:
                _ = current_app.name  # touch: unmatched origin
            except RuntimeError:
                pass

        run_in_thread(work)

    ctxguard.CtxGuard(app, **telemetry.providers)
    call(app, "/no/such/page")
    (line,) = messages(caplog_ctxguard)
    function = "test_error_line_of_work_started_by_a_request_that_matched_no_route.<locals>"
    function += ".audit.<locals>.work"
    assert line == (
        "ctxguard: current_app used outside an application context at"
        f" {where('touch: unmatched origin', function)} (thread worker, started by GET"
        " <unmatched>). Pass the app in (`current_app._get_current_object()`) and run this"
        " work inside `with app.app_context():`, or start the ctxguard extension with"
        ' `propagate="app"`.'
    )
    assert "/no/such/page" not in line


def test_error_line_outside_any_request(telemetry, caplog_ctxguard):
    """``g`` touched by a script (the main thread, no request): an application context is
    needed, and nothing about a request is said."""
    ctxguard.install(**telemetry.providers)
    with pytest.raises(RuntimeError):
        _ = g.user  # touch: script
    (line,) = messages(caplog_ctxguard)
    assert line == (
        "ctxguard: g used outside an application context at"
        f" {where('touch: script', 'test_error_line_outside_any_request')} (main worker)."
        " No application context is pushed here: run this code inside"
        " `with app.app_context():` (for workers, scripts and CLI tasks)."
    )


# --------------------------------------------------------------------------
# Hints, one per case of docs/telemetry.md, as the span attribute ``ctxguard.hint``.


def hint_of(telemetry: Any) -> str:
    (span,) = telemetry.spans(ERROR_SPAN)
    return str(span.attributes["ctxguard.hint"])


def test_hint_at_import_time(telemetry, tmp_path, monkeypatch):
    """A module that reads ``current_app`` at its top level while being imported is told to
    move that code into a function."""
    (tmp_path / "settings_module.py").write_text(
        "from flask import current_app\n\ntry:\n    NAME = current_app.name\n"
        "except RuntimeError:\n    NAME = None\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "settings_module", raising=False)  # imported afresh
    ctxguard.install(**telemetry.providers)
    importlib.import_module("settings_module")
    assert hint_of(telemetry) == (
        "`current_app` is used at import time: move this code into a function that runs"
        " during a request or inside `with app.app_context():`."
    )


def test_hint_for_g_in_a_thread(telemetry):
    """``g`` in a thread started by a request: the values must be passed in."""
    app = make_app()

    @app.route("/g")
    def view() -> str:
        def work() -> None:
            try:
                _ = g.tenant
            except RuntimeError:
                pass

        run_in_thread(work)
        return "ok"

    ctxguard.CtxGuard(app, **telemetry.providers)
    call(app, "/g")
    assert hint_of(telemetry) == (
        "`g` belongs to the request's app context and is empty in any other: pass the values"
        " this thread needs from `g` in as arguments."
    )


def test_hint_for_request_in_an_executor_task(telemetry):
    """The worker kind named in the hint is the one the code ran in: an executor task."""
    app = make_app()
    pool = ThreadPoolExecutor(1)

    @app.route("/task")
    def view() -> str:
        def work() -> None:
            try:
                _ = request.args
            except RuntimeError:
                pass

        pool.submit(work).result()
        return "ok"

    ctxguard.CtxGuard(app, **telemetry.providers)
    try:
        call(app, "/task")
    finally:
        pool.shutdown()
    assert hint_of(telemetry) == (
        "This executor outlives the request that started it: pass the values it needs from"
        " `request` in as arguments, or wrap the function with"
        " `flask.copy_current_request_context`."
    )


def test_hint_for_request_with_an_app_context_but_no_request(telemetry):
    """``session`` inside ``with app.app_context():`` (a CLI command, a task)."""
    app = Flask("hints")
    ctxguard.install(**telemetry.providers)
    with app.app_context(), pytest.raises(RuntimeError):
        _ = ctxguard_session_get()
    assert hint_of(telemetry) == (
        "There is an application context here but no request: pass the values from"
        " `session` in as arguments, or use `app.test_request_context()` in tests."
    )


def ctxguard_session_get() -> Any:
    from flask import session

    return session.get("user")


def test_hint_for_request_with_no_context_at_all(telemetry):
    """``request`` where nothing is pushed: pass the values in from the view."""
    ctxguard.install(**telemetry.providers)
    with pytest.raises(RuntimeError):
        _ = request.form
    assert hint_of(telemetry) == (
        "No request is being handled here: pass the values from `request` in as arguments"
        " from the view that has them, or use `app.test_request_context()` in tests."
    )


def test_hint_for_request_in_a_streamed_body(telemetry):
    """The streamed-body hint, also as the span attribute."""
    app = make_app()

    @app.route("/stream")
    def stream() -> Any:
        def chunks() -> Iterator[str]:
            try:
                yield request.path
            except RuntimeError:
                yield "gone"

        return app.response_class(chunks())

    ctxguard.CtxGuard(app, **telemetry.providers)
    call(app, "/stream")
    assert hint_of(telemetry) == (
        "This runs after the request's context was popped, while its response is streamed or"
        " closed: wrap the generator with `flask.stream_with_context`, or the callback with"
        " `flask.copy_current_request_context`."
    )


# --------------------------------------------------------------------------
# Leaks: "ctxguard: <kind> context leaked (<site>), <why>; pushed at <where>, <age>s ago,
# thread <name>"

#: The kinds of the contexts a view (or a before_request function) leaves pushed, in the
#: order ``leak_lines`` lists them. Up to Flask 3.1 Flask pops the request's contexts
#: anyway and only the view's app context is left; 3.2 refuses to pop the request's own
#: context from under it, so it is left too (reported with the view's line).
LEFT_BY_A_VIEW = ["app", "request"] if MERGED else ["app"]

LEAK_LINE = re.compile(
    r"ctxguard: (?P<kind>\w+) context leaked \((?P<site>\w+)\), (?P<why>.*); pushed at"
    r" (?P<where>.*), (?P<age>\d+\.\d{3})s ago, thread (?P<thread>.*)"
)


def leak_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, str]]:
    found = []
    for text in messages(caplog, "ctxguard: app context leaked"):
        match = LEAK_LINE.fullmatch(text)
        assert match, text
        found.append(match.groupdict())
    for text in messages(caplog, "ctxguard: request context leaked"):
        match = LEAK_LINE.fullmatch(text)
        assert match, text
        found.append(match.groupdict())
    return found


def test_leak_line_at_the_end_of_a_request(telemetry, caplog_ctxguard):
    """A view that pushes and never pops: kind, site, the request (method, route template),
    the push line, the thread. On Flask 3.2, which refuses to pop the request's own context
    from under the view's, a second line says the same of the request's context."""
    app = make_app()

    @app.route("/leak/<name>")
    def leak(name: str) -> str:
        app.app_context().push()  # push: view
        return name

    ctxguard.CtxGuard(app, **telemetry.providers)
    with wrong_pop():
        call(app, "/leak/x")
    lines = leak_lines(caplog_ctxguard)
    assert [line["kind"] for line in lines] == LEFT_BY_A_VIEW
    for line in lines:
        assert line["site"] == "request_end"
        assert line["why"] == "pushed during request GET /leak/<name>"
        assert line["where"] == where(
            "push: view", "test_leak_line_at_the_end_of_a_request.<locals>.leak"
        )
        assert line["thread"] == threading.current_thread().name


def test_leak_line_of_a_request_that_matched_no_route(telemetry, caplog_ctxguard):
    """A context pushed while serving a request that matched no route: ``<unmatched>``."""
    app = make_app()

    @app.before_request
    def push() -> None:
        app.app_context().push()  # push: unmatched

    ctxguard.CtxGuard(app, **telemetry.providers)
    with wrong_pop():
        call(app, "/nowhere")
    lines = leak_lines(caplog_ctxguard)
    assert [line["kind"] for line in lines] == LEFT_BY_A_VIEW
    for line in lines:
        assert line["why"] == "pushed during request GET <unmatched>"


def test_leak_line_in_a_thread_started_by_a_request(telemetry, caplog_ctxguard):
    """A thread started by a view ends with its context open: the line names the request
    that started the work."""
    app = make_app()

    @app.route("/spawn", methods=["PUT"])
    def spawn() -> str:
        def work() -> None:
            app.app_context().push()  # push: spawned thread

        run_in_thread(work)
        return "ok"

    ctxguard.CtxGuard(app, **telemetry.providers)
    call(app, "/spawn", REQUEST_METHOD="PUT")
    (line,) = leak_lines(caplog_ctxguard)
    assert line["site"] == "thread_exit"
    assert line["why"] == "pushed in work started by request PUT /spawn"
    assert line["thread"] == "worker-1"
    assert line["where"] == where(
        "push: spawned thread",
        "test_leak_line_in_a_thread_started_by_a_request.<locals>.spawn.<locals>.work",
    )


def test_leak_line_of_a_thread_outside_any_request(telemetry, caplog_ctxguard):
    """A script's thread that pushes and never pops: it was simply never popped."""
    app = Flask("script")
    ctxguard.install(**telemetry.providers)

    def work() -> None:
        app.app_context().push()

    run_in_thread(work)
    (line,) = leak_lines(caplog_ctxguard)
    assert (line["site"], line["why"]) == ("thread_exit", "never popped")


def test_leak_line_of_an_ambient_context_pushed_before_ctxguard(telemetry, caplog_ctxguard):
    """A context pushed at import time, before ``CtxGuard(app)``: shared by every request on
    the thread, and its push site unknown."""
    app = make_app()
    ctx = app.app_context()
    ctx.push()
    try:
        ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
        call(app, "/")
    finally:
        ctx.pop()
    (line,) = leak_lines(caplog_ctxguard)
    assert line["site"] == "request_start"
    assert line["why"] == (
        "pushed outside any request or task and shared by all later work on this thread"
    )
    assert line["where"] == "a place Flask chose (no user code on the stack)"


# --------------------------------------------------------------------------
# Healing: "ctxguard: popped a stale <kind> context (pushed at <where>) so its teardown ran"


def stale_stream_app() -> Flask:
    """A stream whose body pushes an app context and is abandoned on the thread."""
    app = make_app()

    @app.route("/stream")
    def stream() -> Any:
        def chunks() -> Iterator[bytes]:
            app.app_context().push()  # push: stream body
            yield b"a"

        return app.response_class(chunks())

    return app


def test_heal_line_names_the_kind_and_push_site(telemetry, caplog_ctxguard):
    """A stale context healed at the next request: its kind and the line that pushed it."""
    app = stale_stream_app()
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    env_body = app.wsgi_app  # served by hand: the body is read but not closed
    from helpers import environ

    body = env_body(environ("/stream"), lambda *a: None)
    assert next(iter(body)) == b"a"
    del body
    call(app, "/")
    healed = messages(caplog_ctxguard, "ctxguard: popped a stale")
    assert healed == [
        "ctxguard: popped a stale app context (pushed at"
        f" {where('push: stream body', 'stale_stream_app.<locals>.stream.<locals>.chunks')})"
        " so its teardown ran"
    ]


def test_heal_line_when_a_teardown_raises(telemetry, caplog_ctxguard):
    """A teardown that raises while a stale context is healed: its exception type only."""
    app = stale_stream_app()

    class TeardownBroke(Exception):
        pass

    calls: list[int] = []

    @app.teardown_appcontext
    def teardown(exc: BaseException | None) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise TeardownBroke("secret value")

    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    from helpers import environ

    body = app.wsgi_app(environ("/stream"), lambda *a: None)
    assert next(iter(body)) == b"a"
    del body
    call(app, "/")
    lines = messages(caplog_ctxguard, "ctxguard: a teardown function raised")
    assert lines == [
        "ctxguard: a teardown function raised"
        " test_heal_line_when_a_teardown_raises.<locals>.TeardownBroke while healing a stale"
        " app context"
    ]


def test_heal_lines_of_a_view_that_never_popped_name_the_views_line(telemetry, caplog_ctxguard):
    """A view pushes a context and never pops it, in production. On Flask 3.2, which
    refuses to pop the request's own context from under the view's, both stay current on
    the thread and are healed at the next request: each heal line names the view's line,
    as its leak line did (the request's context has no push site of its own and is
    reported with the view's, even once the view's context has been healed). Up to 3.1
    Flask popped the request's contexts and the view's is unreachable: nothing to heal."""
    app = make_app()

    @app.route("/report")
    def report() -> str:
        app.app_context().push()  # push: report view
        return "done"

    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    with wrong_pop():
        call(app, "/report")
    call(app, "/")
    site = where(
        "push: report view",
        "test_heal_lines_of_a_view_that_never_popped_name_the_views_line.<locals>.report",
    )
    assert messages(caplog_ctxguard, "ctxguard: popped a stale") == [
        f"ctxguard: popped a stale {kind} context (pushed at {site}) so its teardown ran"
        for kind in (LEFT_BY_A_VIEW if MERGED else [])
    ]


# --------------------------------------------------------------------------
# Unusual pops: "ctxguard: <kind> context popped with outcome <outcome> at <where>"


def test_wrong_order_pop_line_names_the_popping_line(telemetry, caplog_ctxguard):
    """A pop in the wrong order: the kind, the outcome, and the user's line that popped."""
    app = Flask("pops")
    ctxguard.install(**telemetry.providers)
    outer = app.app_context()
    inner = app.app_context()
    outer.push()
    inner.push()
    with wrong_pop():
        outer.pop()  # pop: wrong order
    assert messages(caplog_ctxguard, "ctxguard: app context popped") == [
        "ctxguard: app context popped with outcome wrong_context at"
        f" {where('pop: wrong order', 'test_wrong_order_pop_line_names_the_popping_line')}"
    ]


def test_cross_thread_pop_line(telemetry, caplog_ctxguard):
    """A context pushed on one thread and popped on another: outcome ``cross_worker``."""
    app = Flask("pops")
    ctxguard.install(**telemetry.providers)
    ctx = app.app_context()
    ctx.push()

    def pop_it() -> None:
        try:
            ctx.pop()  # pop: other thread
        except Exception:
            pass

    run_in_thread(pop_it)
    lines = messages(caplog_ctxguard, "ctxguard: app context popped")
    assert lines == [
        "ctxguard: app context popped with outcome cross_worker at"
        f" {where('pop: other thread', 'test_cross_thread_pop_line.<locals>.pop_it')}"
    ]


# --------------------------------------------------------------------------
# Policy: "ctxguard: production policy violation <rule> (<action>): <what is wrong>"


def test_policy_line_names_rule_action_and_what_is_wrong(telemetry, caplog_ctxguard):
    """The legacy config key in production: enforced, and the line says what and why."""
    app = make_app(PRESERVE_CONTEXT_ON_EXCEPTION=True)
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    assert messages(caplog_ctxguard, "ctxguard: production policy") == [
        "ctxguard: production policy violation preserve_context_on_exception (enforced):"
        " PRESERVE_CONTEXT_ON_EXCEPTION is True: failing requests would keep their contexts"
        " (Flask >= 2.2 ignores the key; ctxguard sets it to False)"
    ]


def test_stream_with_context_is_fine(telemetry, caplog_ctxguard):
    """The fix the hints give works: ``stream_with_context`` keeps the request there, and
    nothing is reported."""
    app = make_app()

    @app.route("/ok")
    def ok() -> Any:
        def chunks() -> Iterator[str]:
            yield request.path

        return app.response_class(stream_with_context(chunks()))

    ctxguard.CtxGuard(app, **telemetry.providers)
    assert call(app, "/ok")[2] == b"/ok"
    assert messages(caplog_ctxguard) == []


# --------------------------------------------------------------------------
# Once per minute per site: a second site is never silenced by the first.


def test_each_error_line_is_logged_once_per_minute_and_another_line_still_is(
    telemetry, caplog_ctxguard
):
    """The same line failing again within a minute is not logged again; a different line is."""
    ctxguard.install(**telemetry.providers)
    for _ in range(3):
        with pytest.raises(RuntimeError):
            _ = request.args  # touch: first line
    with pytest.raises(RuntimeError):
        _ = request.form  # touch: second line
    lines = messages(caplog_ctxguard)
    function = "test_each_error_line_is_logged_once_per_minute_and_another_line_still_is"
    assert [line.split(" at ")[1].split(" (")[0] for line in lines] == [
        where("touch: first line", function),
        where("touch: second line", function),
    ]


def test_leaks_at_two_sites_are_both_logged(telemetry, caplog_ctxguard):
    """Two leaks with different push sites within a minute: both are logged (a line per
    context left: on Flask 3.2 each request's own context is left too, and logged as well)."""
    app = make_app()

    @app.route("/a")
    def a() -> str:
        app.app_context().push()  # push: route a
        return "a"

    @app.route("/b")
    def b() -> str:
        app.app_context().push()  # push: route b
        return "b"

    ctxguard.CtxGuard(app, **telemetry.providers)
    for path in ("/a", "/b"):
        with wrong_pop():
            call(app, path)
    assert sorted(line["why"] for line in leak_lines(caplog_ctxguard)) == [
        f"pushed during request GET {path}" for path in ("/a", "/b") for _ in LEFT_BY_A_VIEW
    ]


def test_heals_at_two_sites_are_both_logged(telemetry, caplog_ctxguard):
    """Two stale contexts from two push sites, healed within a minute: two lines."""
    app = make_app()

    @app.route("/one")
    def one() -> Any:
        def chunks() -> Iterator[bytes]:
            app.app_context().push()  # push: stream one
            yield b"one"

        return app.response_class(chunks())

    @app.route("/two")
    def two() -> Any:
        def chunks() -> Iterator[bytes]:
            app.app_context().push()  # push: stream two
            yield b"two"

        return app.response_class(chunks())

    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    from helpers import environ

    for name in ("one", "two"):
        body = app.wsgi_app(environ(f"/{name}"), lambda *a: None)
        assert next(iter(body)) == name.encode()
        del body
        call(app, "/")
    assert len(messages(caplog_ctxguard, "ctxguard: popped a stale app context")) == 2


def test_two_policy_violations_are_both_logged(telemetry, caplog_ctxguard):
    """Two rules broken at start-up: one line each."""
    app = make_app(PRESERVE_CONTEXT_ON_EXCEPTION=True)
    app.debug = True
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    lines = messages(caplog_ctxguard, "ctxguard: production policy violation")
    assert [line.split(" ")[4] for line in lines] == [
        "preserve_context_on_exception",
        "debug_mode",
    ]


# --------------------------------------------------------------------------
# Configuration messages, as docs/configuration.md shows them.


@pytest.mark.parametrize(
    ("argument", "value", "message"),
    [
        (
            "policy",
            "nope",
            "policy='nope' is not valid: expected one of enforce, warn, strict, off",
        ),
        ("heal", "yes", "heal='yes' is not valid: expected True, False or None"),
        (
            "environment",
            3,
            "environment=3 is not valid: expected one of production, development, testing",
        ),
        (
            "in_app_include",
            "myapp",
            "in_app_include='myapp' is not valid: expected a list of module names, such as"
            " ['myapp', 'mylib.tasks']",
        ),
    ],
)
def test_a_bad_argument_raises_the_documented_message(telemetry, argument, value, message):
    """The ``ConfigError`` messages docs/configuration.md shows, word for word."""
    with pytest.raises(ctxguard.ConfigError) as info:
        ctxguard.CtxGuard(make_app(), **{argument: value}, **telemetry.providers)
    assert str(info.value) == message


def test_dotted_module_names_are_module_names(telemetry):
    """``in_app_include=['myapp', 'mylib.tasks']`` (the documented example) is accepted."""
    assert ctxguard.install(in_app_include=["myapp", "mylib.tasks"], **telemetry.providers)
    with pytest.raises(ctxguard.ConfigError) as info:
        ctxguard.install(in_app_include=["mylib..tasks"], **telemetry.providers)
    assert str(info.value) == "in_app_include has 'mylib..tasks', which is not a module name"


@pytest.mark.parametrize(
    ("variable", "value", "line"),
    [
        (
            "CTXGUARD_POLICY",
            "bogus",
            "ctxguard: CTXGUARD_POLICY='bogus' is not valid (expected one of enforce, warn,"
            " strict, off); using the default (enforce)",
        ),
        (
            "CTXGUARD_DISABLED",
            "maybe",
            "ctxguard: CTXGUARD_DISABLED='maybe' is not valid (expected one of 1, true, yes, on,"
            " 0, false, no, off); using the default (off)",
        ),
        (
            "CTXGUARD_ENVIRONMENT",
            "prod",
            "ctxguard: CTXGUARD_ENVIRONMENT='prod' is not valid (expected one of production,"
            " development, testing); using the default (follow the app)",
        ),
    ],
)
def test_a_bad_variable_logs_the_documented_line(
    monkeypatch, telemetry, caplog_ctxguard, variable, value, line
):
    """The warning docs/configuration.md shows for a bad variable, word for word."""
    monkeypatch.setenv(variable, value)
    ctxguard.CtxGuard(make_app(), **telemetry.providers)
    assert messages(caplog_ctxguard, f"ctxguard: {variable}=") == [line]


def test_strict_refusal_lists_every_violation_one_per_line(telemetry):
    """``PolicyError``'s message: a heading, then one ``- rule: detail`` line per violation."""
    app = make_app(PRESERVE_CONTEXT_ON_EXCEPTION=True)
    app.debug = True
    with pytest.raises(ctxguard.PolicyError) as info:
        ctxguard.CtxGuard(app, environment="production", policy="strict", **telemetry.providers)
    assert str(info.value) == (
        "ctxguard refused to start in production:\n"
        "  - preserve_context_on_exception: PRESERVE_CONTEXT_ON_EXCEPTION is True: failing"
        " requests would keep their contexts (Flask >= 2.2 ignores the key; ctxguard sets it"
        " to False)\n"
        "  - debug_mode: debug mode is on: unhandled errors reach the server and the debugger"
    )


@pytest.mark.parametrize(
    ("evalex", "detail"),
    [
        (
            True,
            "Werkzeug's DebuggedApplication is in the WSGI chain with evalex=True: every"
            " failing request's contexts are kept",
        ),
        (False, "Werkzeug's DebuggedApplication is in the WSGI chain"),
    ],
)
def test_debugger_line_says_whether_evalex_keeps_contexts(
    telemetry, caplog_ctxguard, evalex, detail
):
    """The debugger violation's line says what is wrong, evalex or not."""
    from werkzeug.debug import DebuggedApplication

    app = make_app()
    app.wsgi_app = DebuggedApplication(app.wsgi_app, evalex=evalex)  # type: ignore[method-assign]
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    assert messages(caplog_ctxguard, "ctxguard: production policy") == [
        f"ctxguard: production policy violation debugger_middleware (reported): {detail}"
    ]


def test_start_up_line_lists_every_setting_and_its_source(monkeypatch, telemetry, caplog):
    """The INFO line docs/configuration.md shows at start-up, word for word, and with every
    setting given."""
    caplog.set_level(logging.INFO, logger="ctxguard")
    monkeypatch.setenv("CTXGUARD_POLICY", "warn")
    app = make_app()
    ctxguard.CtxGuard(app, **telemetry.providers)
    ctxguard.CtxGuard(
        make_app(),
        environment="production",
        heal=True,
        propagate="app",
        in_app_include=["myapp", "mylib.tasks"],
        in_app_exclude=["vendored", "mylib.compat"],
        **telemetry.providers,
    )
    lines = [
        r.getMessage() for r in caplog.records if r.getMessage().startswith("ctxguard: guarding")
    ]
    assert lines == [
        "ctxguard: guarding testapp: environment=follows app.debug/app.testing (default),"
        " policy=warn (CTXGUARD_POLICY), heal=follows the environment (default),"
        " propagate=off (default), in_app_include=none (default), in_app_exclude=none (default)",
        "ctxguard: guarding testapp: environment=production (argument), policy=warn"
        " (CTXGUARD_POLICY), heal=on (argument), propagate=app (argument),"
        " in_app_include=myapp,mylib.tasks (argument), in_app_exclude=vendored,mylib.compat"
        " (argument)",
    ]


def test_start_up_line_of_a_plain_wsgi_app_and_of_variables(monkeypatch, telemetry, caplog):
    """A guarded WSGI app that is not Flask is "a WSGI app"; settings from variables name
    their variable."""
    caplog.set_level(logging.INFO, logger="ctxguard")
    monkeypatch.setenv("CTXGUARD_HEAL", "off")
    monkeypatch.setenv("CTXGUARD_ENVIRONMENT", "development")
    monkeypatch.setenv("CTXGUARD_IN_APP_INCLUDE", "shop,shop_tasks")

    def plain(environ: Any, start_response: Any) -> list[bytes]:
        return []

    ctxguard.CtxGuardMiddleware(plain, **telemetry.providers)
    (line,) = [
        r.getMessage() for r in caplog.records if r.getMessage().startswith("ctxguard: guarding")
    ]
    assert line == (
        "ctxguard: guarding a WSGI app: environment=development (CTXGUARD_ENVIRONMENT),"
        " policy=enforce (default), heal=off (CTXGUARD_HEAL), propagate=off (default),"
        " in_app_include=shop,shop_tasks (CTXGUARD_IN_APP_INCLUDE), in_app_exclude=none"
        " (default)"
    )
