"""Differential harness: ctxguard's central promise, "transparent or nothing".

With ctxguard on, every request, test client call, stream, thread and exception
must behave exactly as without it. Each scenario below is run twice on two
fresh, identical apps built by one factory: once plain (ctxguard uninstalled),
once after ``CtxGuard(app)``. Everything the user, the server or the test can
see is recorded and the two records must be equal:

- what the server sees: ``start_response`` (status, headers, ``exc_info``),
  every chunk (exact bytes and types), and the return value's protocol: is it
  an iterator (``iter(x) is x``, ``__next__``), does it have ``close``, is it
  exactly the object the server's ``wsgi.file_wrapper`` returned (the sendfile
  path), and its exact type when nothing in it runs application code;
- exceptions that reach the server or the test: type, message, whether it is
  the very object the user's code raised, its ``__cause__``/``__context__``
  chain, each exception of an exception group (Flask 3.2's teardown errors) and
  its traceback frames (file, function, line; local names of the
  user's frames), leaving out only ctxguard's own frames and Werkzeug's proxy
  lookup, which ctxguard replaces by design;
- the app's lifecycle, in order, interleaved with the server's actions:
  ``before_request``/``after_request``, ``teardown_request`` and
  ``teardown_appcontext`` (with the exception they got and the request's
  ``g``), Flask's signals, generator ``finally`` blocks, ``call_on_close``
  callbacks, thread and executor work;
- what a test sees: ``flask.request``/``g``/``session`` after a client call
  (``with client:``), cookies, redirects, CLI output;
- the environ keys added or removed, contexts left current, the app logger's
  records, exceptions in threads (``threading.excepthook``), unraisable
  exceptions and warnings.

Nothing depends on timing: threads are joined, abandoned bodies are finalised
with ``gc.collect()``, memory addresses in messages are masked and signed
session cookies are compared by their content, not their timestamped value.
``test_the_harness_is_deterministic`` runs every scenario plain twice, and the
mutant tests show that the comparison fails for middlewares that are not
transparent in exactly the ways a guard could go wrong.

Adding a case: write ``def name(app: DiffApp, probe: Probe) -> None`` with a
docstring naming the user-visible promise it guards, decorated with
``@scenario()`` (optionally the modes, a ``setup`` run on the app before it is
guarded). Routes live in ``build``; ``probe.serve`` plays a WSGI server,
``probe.attempt`` records what a call returns or raises.
"""

from __future__ import annotations

import abc
import asyncio
import builtins
import gc
import io
import logging
import os
import pprint
import re
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn
from wsgiref.handlers import SimpleHandler
from wsgiref.util import setup_testing_defaults

import click
import pytest
import werkzeug.local
from flask import (
    Flask,
    Response,
    abort,
    copy_current_request_context,
    current_app,
    g,
    has_app_context,
    has_request_context,
    jsonify,
    make_response,
    redirect,
    request,
    send_file,
    session,
    signals,
    stream_with_context,
    url_for,
)
from flask.globals import app_ctx
from helpers import MERGED, reset_contexts, without_ids
from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.test import EnvironBuilder

import ctxguard

# --------------------------------------------------------------------------
# The apps.

#: Production (no TESTING, no DEBUG), testing and debug apps.
MODES: dict[str, dict[str, Any]] = {
    "production": {},
    "testing": {"TESTING": True},
    "debug": {"DEBUG": True},
}

#: Exceptions raised by the user's code in the current run (identity checks).
RAISED: list[BaseException] = []
#: Objects returned by the server's ``wsgi.file_wrapper`` in the current run.
WRAPPED: list[Any] = []

DATA = b"".join(b"line %02d of the file\n" % n for n in range(40))


class Timeout(BaseException):
    """A ``BaseException`` raised in a view, as ``gevent.Timeout`` is."""


class DiffApp(Flask):
    """A Flask app that records what happens to it."""

    events: list[tuple[Any, ...]]
    data_file: Path
    ambient: Any
    pending: Any
    uploads: list[Any]
    #: Other apps served in the same process (mounted), guarded like this one.
    extra_apps: list[Flask]


def fail(exc: BaseException) -> NoReturn:
    """Raise ``exc`` from the user's code, remembering it for the identity check."""
    RAISED.append(exc)
    raise exc


def short(exc: BaseException | None) -> tuple[str, str] | None:
    return None if exc is None else (type(exc).__name__, masked(exc))


def masked(value: object) -> str:
    """``str(value)`` without memory addresses (two runs never share them)."""
    return without_ids(str(value))


def build(mode: str, tmp: Path) -> DiffApp:
    """The one factory: both variants of every scenario get an app built here."""
    app = DiffApp("differential_app", root_path=str(tmp))
    app.config.update(MODES[mode], SECRET_KEY="differential")
    app.events = []
    app.data_file = tmp / "data.bin"
    app.ambient = app.pending = None
    app.uploads = []
    app.extra_apps = []
    ev = app.events.append

    def receiver(name: str) -> Callable[..., None]:
        def receive(sender: Any, **kwargs: Any) -> None:
            exc = kwargs.get("exception", kwargs.get("exc"))
            response = kwargs.get("response")
            ev(("signal", name, short(exc), getattr(response, "status", None)))

        return receive

    receivers = []
    for name in (
        "request_started",
        "request_finished",
        "got_request_exception",
        "request_tearing_down",
        "appcontext_pushed",
        "appcontext_popped",
        "appcontext_tearing_down",
    ):
        receive = receiver(name)
        receivers.append(receive)  # blinker holds receivers weakly
        getattr(signals, name).connect(receive, app)
    app.extensions["differential receivers"] = receivers

    @app.before_request
    def before() -> Any:
        same = request.environ.get("harness.environ") is request.environ
        ev(("before_request", request.method, request.path, same))
        if request.headers.get("X-Short-Circuit"):
            return "short-circuited", 202
        return None

    @app.after_request
    def after(response: Response) -> Response:
        ev(("after_request", response.status))
        response.headers["X-After"] = "yes"
        return response

    @app.teardown_request
    def teardown_request(exc: BaseException | None) -> None:
        ev(("teardown_request", short(exc), g.get("marker")))
        if g.get("fail_teardown") == "request":
            fail(RuntimeError("teardown_request failed"))

    @app.teardown_appcontext
    def teardown_appcontext(exc: BaseException | None) -> None:
        ev(("teardown_appcontext", short(exc), g.get("marker")))
        if g.get("fail_teardown") == "app":
            fail(RuntimeError("teardown_appcontext failed"))

    @app.route("/hello")
    def hello() -> str:
        g.marker = "hello"
        return f"hello {request.path} q={request.args.get('q')}"

    @app.route("/json", methods=["GET", "POST"])
    def json_view() -> Response:
        return jsonify(
            method=request.method,
            form=request.form.to_dict(),
            json=request.get_json(silent=True),
            data=request.get_data(as_text=True),
        )

    @app.route("/upload", methods=["POST"])
    def upload() -> str:
        upload = request.files["file"]
        app.uploads.append(upload.stream)
        return f"{upload.filename} {upload.read()!r} {request.form.get('field')}"

    @app.route("/redirect")
    def redirect_view() -> Response:
        return redirect(url_for("hello", q="redirected"))

    @app.route("/boom")
    def boom() -> str:
        g.marker = "boom"
        fail(ValueError("boom in view"))

    @app.route("/lookup")
    def lookup() -> str:
        fail(KeyError("missing key"))

    @app.route("/base-exception")
    def base_exception() -> str:
        fail(Timeout("view timed out"))

    @app.route("/abort")
    def abort_view() -> str:
        abort(403, description="not for you")

    @app.route("/abort-response")
    def abort_response() -> str:
        abort(Response("I am a teapot", status=418, headers={"X-Teapot": "1"}))

    @app.route("/teardown-fail/<which>")
    def teardown_fail(which: str) -> str:
        g.fail_teardown = which
        return f"teardown {which} will fail"

    @app.route("/teardown-fail-after-error/<which>")
    def teardown_fail_after_error(which: str) -> str:
        g.fail_teardown = which
        fail(ValueError("view failed before teardown"))

    @app.route("/push-no-pop")
    def push_no_pop() -> str:
        app.app_context().push()
        return "pushed"

    @app.route("/wrong-order-pop")
    def wrong_order_pop() -> str:
        outer = app.app_context()
        outer.push()
        g.marker = "outer"
        inner = app.app_context()
        inner.push()
        g.marker = "inner"
        try:
            outer.pop()  # inner is the current one
        except Exception as exc:
            ev(("wrong-order pop", describe_exc(exc)))
        # Pop what is still ours, innermost first: up to Flask 3.1 the wrong pop
        # happened (inner is unreachable now); on 3.2 it was refused.
        for ctx in (inner, outer):
            if app_ctx._get_current_object() is ctx:
                ev(("popping", g.get("marker")))
                ctx.pop()
        return f"current g.marker: {g.get('marker')}"

    @app.route("/pop-on-another-thread")
    def pop_on_another_thread() -> str:
        ctx = app.app_context()
        ctx.push()
        g.marker = "pushed by the view"
        outcome: list[Any] = []

        def pop_there() -> None:
            try:
                ctx.pop()
                outcome.append("popped")
            except Exception as exc:
                outcome.append(describe_exc(exc))

        thread = threading.Thread(target=pop_there)
        thread.start()
        thread.join()
        still = app_ctx._get_current_object() is ctx
        ev(("popped on another thread", outcome, "still current here", still))
        if still:
            ctx.pop()
        return f"still current in the view: {still}"

    @app.route("/g/<value>")
    def g_view(value: str) -> str:
        before_value = g.get("marker")
        if value != "-":
            g.marker = value
        return f"g.marker was {before_value}"

    @app.route("/generator")
    def generator() -> Response:
        def chunks() -> Iterator[bytes]:
            try:
                for n in range(3):
                    ev(("generator", "yield", n))
                    yield b"part%d;" % n
            finally:
                ev(("generator", "finally", has_request_context(), has_app_context()))

        return Response(chunks(), mimetype="text/plain")

    @app.route("/generator-error")
    def generator_error() -> Response:
        def chunks() -> Iterator[bytes]:
            yield b"before the error;"
            fail(RuntimeError("broken generator"))

        return Response(chunks())

    @app.route("/generator-uses-request")
    def generator_uses_request() -> Response:
        def chunks() -> Iterator[bytes]:
            yield b"first;"
            yield request.path.encode()  # no stream_with_context: the context is gone

        return Response(chunks())

    @app.route("/stream")
    def stream() -> Response:
        g.marker = "stream"

        def chunks() -> Iterator[str]:
            try:
                ev(("stream", "start", request.path, g.get("marker")))
                for n in range(3):
                    ev(("stream", "yield", n))
                    yield f"{request.args.get('prefix', 'chunk')}{n};"
            finally:
                ev(("stream", "finally", has_request_context(), g.get("marker")))

        return Response(stream_with_context(chunks()))

    @app.route("/stream-error")
    def stream_error() -> Response:
        g.marker = "stream-error"

        def chunks() -> Iterator[str]:
            yield f"{request.path};"
            fail(RuntimeError("broken stream"))

        return Response(stream_with_context(chunks()))

    @app.route("/stream-input", methods=["POST"])
    def stream_input() -> Response:
        def chunks() -> Iterator[bytes]:
            while True:
                block = request.stream.read(5)
                if not block:
                    return
                yield block.upper()

        return Response(stream_with_context(chunks()))

    @app.route("/on-close/<kind>")
    def on_close(kind: str) -> Response:
        response = Response(f"closing {kind}")

        def callback() -> None:
            if kind == "error":
                fail(RuntimeError("call_on_close failed"))
            if kind == "request":
                ev(("call_on_close", request.path))  # the request's context is gone
            ev(("call_on_close", kind, has_request_context(), has_app_context()))

        response.call_on_close(callback)
        return response

    @app.route("/file")
    def file() -> Response:
        return send_file(app.data_file, mimetype="application/octet-stream")

    @app.route("/passthrough/<kind>")
    def passthrough(kind: str) -> Response:
        def chunks() -> Iterator[bytes]:
            try:
                yield b"gen-a;"
                yield b"gen-b;"
            finally:
                ev(("passthrough generator", "finally"))

        body: Iterable[bytes] = {
            "list": [b"list-a;", b"list-b;"],
            "tuple": (b"tuple-a;", b"tuple-b;"),
        }.get(kind) or chunks()
        return Response(body, direct_passthrough=True)

    @app.route("/session/<action>")
    def session_view(action: str) -> Response:
        if action == "login":
            session["user"] = request.args.get("user", "ada")
            response = make_response("logged in")
            response.set_cookie("flavour", "oatmeal", httponly=True, samesite="Lax")
            return response
        if action == "logout":
            session.clear()
            response = make_response("logged out")
            response.delete_cookie("flavour")
            return response
        return make_response(f"user={session.get('user')} flavour={request.cookies.get('flavour')}")

    @app.route("/remote")
    def remote() -> str:
        return f"{request.remote_addr} {request.scheme} {request.host} {request.url}"

    @app.route("/thread/<kind>")
    def thread_view(kind: str) -> str:
        g.marker = f"thread-{kind}"
        results: list[Any] = []

        def plain_work() -> None:
            try:
                results.append(request.path)
            except RuntimeError as exc:
                results.append(describe_exc(exc))
            try:
                results.append(g.get("marker"))
            except RuntimeError as exc:
                results.append(describe_exc(exc))

        @copy_current_request_context
        def copied_work() -> None:
            results.append((request.path, request.args.get("q"), g.get("marker")))
            results.append((has_request_context(), has_app_context()))

        def failing_work() -> None:
            fail(ValueError("thread failed"))

        class Worker(threading.Thread):
            def run(self) -> None:
                results.append(("subclass run", has_request_context()))

        threads: list[threading.Thread] = []
        if kind == "copy":
            threads.append(threading.Thread(target=copied_work))
        elif kind == "plain":
            threads.append(threading.Thread(target=plain_work))
        elif kind == "uncaught":
            threads.append(threading.Thread(target=failing_work))
        elif kind == "timer":
            threads.append(threading.Timer(0, plain_work))
        else:
            threads.append(Worker())
        for thread in threads:
            thread.start()
            thread.join()
            results.append(("thread attributes", sorted(vars(thread))))
        results.append(("proxies in the thread", repr(request), bool(request), bool(g)))
        ev(("thread results", kind, results))
        return f"threads {kind} done"

    @app.route("/thread/outlives")
    def thread_outlives() -> str:
        g.marker = "outlives"
        release = threading.Event()

        @copy_current_request_context
        def work() -> None:
            # Released by the scenario once the response is closed; the timeout is
            # only a safety net, never what orders the events.
            release.wait(30)
            ev(("late thread", request.path, g.get("marker"), has_request_context()))

        thread = threading.Thread(target=work)
        thread.start()
        app.pending = (release, thread)
        return "thread started"

    @app.route("/executor")
    def executor() -> str:
        g.marker = "executor"
        results: list[Any] = []

        @copy_current_request_context
        def copied() -> Any:
            return (request.path, g.get("marker"))

        def uses_app() -> Any:
            return current_app.name

        def raises() -> Any:
            fail(LookupError("task failed"))

        with ThreadPoolExecutor(max_workers=1) as pool:
            results.append(pool.submit(copied).result())
            for task in (uses_app, raises):
                try:
                    results.append(pool.submit(task).result())
                except Exception as exc:
                    results.append(describe_exc(exc))
            results.append(list(pool.map(str.upper, ["a", "b"])))
        ev(("executor results", results))
        return "executor done"

    @app.route("/async")
    async def async_view() -> str:
        await asyncio.sleep(0)
        g.marker = "async"
        return f"async {request.path} q={request.args.get('q')}"

    @app.route("/async-stream")
    async def async_stream() -> Response:
        await asyncio.sleep(0)
        g.marker = "async-stream"

        def chunks() -> Iterator[str]:
            yield f"{request.path};"
            yield f"{g.get('marker')};"

        return Response(stream_with_context(chunks()))

    @app.route("/async-boom")
    async def async_boom() -> str:
        await asyncio.sleep(0)
        g.marker = "async-boom"
        fail(ValueError("async boom"))

    @app.cli.command("where")
    def where() -> None:
        g.marker = "cli"
        click.echo(f"app={current_app.name} request={has_request_context()}")

    return app


def with_error_handlers(app: DiffApp) -> None:
    """Error handlers for 404, 405, 500 and LookupError."""

    @app.errorhandler(404)
    def not_found(exc: Exception) -> Any:
        return f"custom 404: {request.path}", 404

    @app.errorhandler(405)
    def not_allowed(exc: Exception) -> Any:
        return "custom 405", 405

    @app.errorhandler(500)
    def server_error(exc: Exception) -> Any:
        return f"custom 500: {short(getattr(exc, 'original_exception', None))}", 500

    @app.errorhandler(LookupError)
    def lookup_error(exc: Exception) -> Any:
        return f"handled {short(exc)}", 409


def with_proxy_fix(app: DiffApp) -> None:
    """Werkzeug's ProxyFix around ``wsgi_app`` before the guard is added."""
    app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1, x_host=1)  # type: ignore[method-assign]


class LegacyBody:
    """A hand-written WSGI iterator with ``close``, as older frameworks return."""

    def __init__(self, events: list[tuple[Any, ...]]) -> None:
        self.parts = [b"legacy-", b"iterator"]
        self.events = events

    def __iter__(self) -> LegacyBody:
        return self

    def __next__(self) -> bytes:
        if not self.parts:
            raise StopIteration
        return self.parts.pop(0)

    def close(self) -> None:
        self.events.append(("legacy iterator", "close"))


def with_mounted_wsgi(app: DiffApp) -> None:
    """Plain WSGI apps mounted next to Flask with DispatcherMiddleware."""

    def headers(start_response: Callable[..., Any]) -> None:
        start_response("200 OK", [("Content-Type", "text/plain")])

    def list_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        headers(start_response)
        return [b"legacy ", environ["PATH_INFO"].encode()]

    def generator_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        headers(start_response)

        def body() -> Iterator[bytes]:
            try:
                yield b"legacy-"
                yield b"generator"
            finally:
                app.events.append(("legacy generator", "finally"))

        return body()

    def iterator_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        headers(start_response)
        return LegacyBody(app.events)

    def late_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        def body() -> Iterator[bytes]:
            # PEP 3333 allows start_response until the first chunk, and again with
            # exc_info after an error.
            headers(start_response)
            try:
                fail(ValueError("legacy app failed before its first chunk"))
            except ValueError:
                start_response("500 INTERNAL SERVER ERROR", [], sys.exc_info())
            yield b"legacy error page"

        return body()

    app.wsgi_app = DispatcherMiddleware(  # type: ignore[method-assign]
        app.wsgi_app,
        {
            "/legacy-list": list_app,
            "/legacy-gen": generator_app,
            "/legacy-iter": iterator_app,
            "/legacy-late": late_app,
        },
    )


def with_mounted_flask_app(app: DiffApp) -> None:
    """A second Flask app mounted at ``/inner`` with DispatcherMiddleware; each app is
    guarded by its own ``CtxGuard``, so one request passes two middlewares."""
    inner = Flask("differential_inner")
    inner.config.update(app.config)
    ev = app.events.append

    @inner.teardown_appcontext
    def inner_teardown(exc: BaseException | None) -> None:
        ev(("inner teardown_appcontext", short(exc), g.get("marker")))

    @inner.route("/")
    def inner_index() -> str:
        g.marker = "inner"
        return f"inner {request.script_root} {request.path} {current_app.name}"

    @inner.route("/stream")
    def inner_stream() -> Response:
        def chunks() -> Iterator[str]:
            yield f"{current_app.name};"
            yield f"{request.path};"

        return Response(stream_with_context(chunks()))

    @inner.route("/boom")
    def inner_boom() -> str:
        fail(ValueError("inner boom"))

    app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {"/inner": inner})  # type: ignore[method-assign]
    app.extra_apps.append(inner)


def with_preserve_config(app: DiffApp) -> None:
    """The pre-2.2 ``PRESERVE_CONTEXT_ON_EXCEPTION`` left in a config."""
    app.config["PRESERVE_CONTEXT_ON_EXCEPTION"] = True


def with_ambient_context(app: DiffApp) -> None:
    """An app context pushed at start-up (import time), before the guard, never popped
    by a request: every request on the worker shares its ``g``."""
    app.ambient = app.app_context()
    app.ambient.push()
    g.marker = "ambient"


# --------------------------------------------------------------------------
# The servers' file wrappers.


class GunicornFileWrapper:
    """``gunicorn.http.wsgi.FileWrapper``: a class, iterable through ``__getitem__``;
    gunicorn uses sendfile when the app returns an instance of it."""

    def __init__(self, filelike: Any, blksize: int = 8192) -> None:
        self.filelike = filelike
        self.blksize = blksize
        if hasattr(filelike, "close"):
            self.close = filelike.close
        WRAPPED.append(self)

    def __getitem__(self, key: int) -> bytes:
        data = self.filelike.read(self.blksize)
        if data:
            return bytes(data)
        raise IndexError


class AbcFileWrapper(GunicornFileWrapper, metaclass=abc.ABCMeta):
    """The same file wrapper class, with a metaclass (deriving from an ABC would do it)."""


def uwsgi_file_wrapper(filelike: Any, blksize: int = 8192) -> Any:
    """uWSGI's ``wsgi.file_wrapper`` is a function that returns the file object itself;
    uWSGI uses sendfile when the app returns that very object."""
    WRAPPED.append(filelike)
    return filelike


def factory_file_wrapper(filelike: Any, blksize: int = 8192) -> Any:
    """A file wrapper that is a function returning a wrapper object of the server's own
    (a factory, or ``functools.partial`` of a class), recognised by identity."""
    return GunicornFileWrapper(filelike, blksize)


FILE_WRAPPERS: dict[str, Any] = {
    "class": GunicornFileWrapper,
    "function": uwsgi_file_wrapper,
    "abc class": AbcFileWrapper,
    "factory": factory_file_wrapper,
}


# --------------------------------------------------------------------------
# What an exception looks like to the user.

_CTXGUARD_DIR = Path(ctxguard.__file__).resolve().parent
_PROXY_FILE = Path(werkzeug.local.__file__).resolve()
_THIS_FILE = Path(__file__).resolve()
_places: dict[str, str | None] = {}


def _place(filename: str) -> str | None:
    """How a traceback frame's file is shown; None for frames left out of the comparison:
    ctxguard's own, and Werkzeug's proxy lookup (ctxguard replaces ``_get_current_object``
    by design and raises the very same error)."""
    if filename not in _places:
        path = Path(filename).resolve()
        if path == _THIS_FILE:
            _places[filename] = "<scenario>"
        elif path == _PROXY_FILE or _CTXGUARD_DIR in path.parents:
            _places[filename] = None
        else:
            _places[filename] = "/".join(path.parts[-2:])
    return _places[filename]


def frames(tb: TracebackType | None) -> list[tuple[Any, ...]]:
    """The traceback's frames: file, function, line, and the local names of the user's."""
    found: list[tuple[Any, ...]] = []
    while tb is not None:
        code = tb.tb_frame.f_code
        place = _place(code.co_filename)
        if place == "<scenario>":
            found.append((place, code.co_name, tb.tb_lineno, tuple(sorted(tb.tb_frame.f_locals))))
        elif place is not None:
            found.append((place, code.co_name, tb.tb_lineno))
        tb = tb.tb_next
    return found


#: ``BaseExceptionGroup`` (Python 3.11+), or nothing is one.
_GROUP: Any = getattr(builtins, "BaseExceptionGroup", ())


def describe_exc(exc: BaseException, depth: int = 0) -> dict[str, Any]:
    """Everything about an exception that a user, a server or an error tracker sees."""
    described: dict[str, Any] = {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": masked(exc),
        "raised by the user's code (same object)": any(exc is r for r in RAISED),
        "suppress_context": exc.__suppress_context__,
        "frames": frames(exc.__traceback__),
    }
    if depth < 3:
        for link in ("__cause__", "__context__"):
            linked = getattr(exc, link)
            described[link] = None if linked is None else describe_exc(linked, depth + 1)
        if isinstance(exc, _GROUP):
            # Flask 3.2 raises teardown errors in (nested) exception groups.
            described["exceptions"] = [describe_exc(e, depth + 1) for e in exc.exceptions]
    return described


# --------------------------------------------------------------------------
# The probe: a WSGI server, a recorder.


class Probe:
    """Drives one app the way a server or a test does, and records what it sees."""

    def __init__(self, app: DiffApp) -> None:
        self.app = app
        self.data: dict[str, Any] = {}

    def record(self, key: str, value: Any) -> None:
        assert key not in self.data, f"scenario recorded {key!r} twice"
        self.data[key] = value

    def mark(self, *what: Any) -> None:
        """A point in the scenario, so the lifecycle's order around it is compared."""
        self.app.events.append(("harness", *what))

    def attempt(self, key: str, func: Callable[[], Any]) -> Any:
        """Record what ``func()`` returns (summarised: a response's body is read) or raises."""
        try:
            value = func()
            summary = self.summary(value)
        except Exception as exc:
            self.record(key, {"raised": describe_exc(exc)})
            return None
        self.record(key, {"returned": summary})
        return value

    # -- values

    def summary(self, value: Any) -> Any:
        if isinstance(value, Response):  # the test client's TestResponse
            return {
                "status": value.status,
                "headers": self.headers(value.headers.to_wsgi_list()),
                "data": value.get_data(),
            }
        if isinstance(value, str | bytes | int | float | bool | type(None)):
            return value
        if isinstance(value, list | tuple):
            return [self.summary(v) for v in value]
        if isinstance(value, dict):
            return {k: self.summary(v) for k, v in value.items()}
        return f"<{type(value).__qualname__}>"

    def headers(self, headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        """Headers in order and exact, except what says when they were made: ``Date``
        (``send_file`` sets it) and the signed session cookie, whose value carries a
        timestamp (shown by its content)."""
        shown = []
        for name, value in headers:
            if name.lower() == "date":
                value = "<now>"
            elif name.lower() == "set-cookie":
                value = self._session_cookie(value)
            shown.append((name, value))
        return shown

    def _session_cookie(self, header: str) -> str:
        prefix = f"{self.app.config['SESSION_COOKIE_NAME']}="
        if not header.startswith(prefix):
            return header
        value, _, attributes = header[len(prefix) :].partition(";")
        return f"{prefix}{self.session_value(value)};{attributes}"

    def session_value(self, value: str | None) -> str:
        if not value:
            return repr(value)
        serializer = self.app.session_interface.get_signing_serializer(self.app)  # type: ignore[attr-defined]
        try:
            return f"<session {serializer.loads(value)!r}>"
        except Exception as exc:
            return f"<unreadable session {short(exc)}>"

    # -- WSGI

    def environ(
        self,
        path: str,
        method: str = "GET",
        *,
        file_wrapper: str | None = None,
        **builder: Any,
    ) -> dict[str, Any]:
        environ = EnvironBuilder(path, method=method, **builder).get_environ()
        environ["harness.environ"] = environ
        if file_wrapper is not None:
            environ["wsgi.file_wrapper"] = FILE_WRAPPERS[file_wrapper]
        return environ

    def start_response(self, label: str, seen: dict[str, Any]) -> Callable[..., Any]:
        def start_response(status: str, headers: list[Any], exc_info: Any = None) -> Any:
            self.mark(label, "start_response", status)
            seen["status"] = status
            seen["headers"] = self.headers(headers)
            seen["exc_info"] = None if exc_info is None else short(exc_info[1])
            return lambda data: self.mark(label, "write", data)

        return start_response

    def protocol(self, body: Any) -> dict[str, Any]:
        """The return value as the server sees it, without consuming it."""
        try:
            is_iterator = iter(body) is body
        except TypeError as exc:
            is_iterator = f"iter() raised {short(exc)}"
        wrapped = any(body is w for w in WRAPPED)
        exact = wrapped or type(body) in (list, tuple)
        return {
            "iter(x) is x": is_iterator,
            "has __next__": callable(getattr(type(body), "__next__", None)),
            "has close": callable(getattr(body, "close", None)),
            "is what wsgi.file_wrapper returned": wrapped,
            # Only these must keep their exact type; anything else may be watched.
            "exact type (a list, a tuple, the file wrapper's)": (
                type(body).__qualname__ if exact else None
            ),
        }

    def serve(
        self,
        label: str,
        environ: dict[str, Any],
        *,
        read: int | None = None,
        closes: int = 1,
        on_thread: bool = False,
        close_on_thread: bool = False,
        app: Callable[..., Any] | None = None,
    ) -> None:
        """One request, as a WSGI server runs it.

        ``read`` chunks at most (the client went away), then ``close()`` called
        ``closes`` times (0: the body is abandoned and finalised by the garbage
        collector). ``on_thread``: iterated and closed on another thread;
        ``close_on_thread``: only closed there (threads are joined).
        """
        seen: dict[str, Any] = {}
        keys = set(environ)
        wsgi = self.app if app is None else app
        try:
            body = wsgi(environ, self.start_response(label, seen))
        except BaseException as exc:
            self.record(f"{label}: app raised", describe_exc(exc))
            self.record(f"{label}: start_response", seen)
            return
        self.record(f"{label}: start_response", seen)
        self.record(f"{label}: return value", self.protocol(body))
        iterate, close = self._consumer(label, body, read, closes)
        del body
        for step, elsewhere in ((iterate, on_thread), (close, on_thread or close_on_thread)):
            if elsewhere:
                thread = threading.Thread(target=step)
                thread.start()
                thread.join()
                del thread
            else:
                step()
        del iterate, close, step
        self.mark(label, "server dropped the body")
        gc.collect()
        self.mark(label, "garbage collected")
        self.record(
            f"{label}: environ keys added, removed",
            (sorted(set(environ) - keys), sorted(keys - set(environ))),
        )

    def _consumer(
        self, label: str, body: Any, read: int | None, closes: int
    ) -> tuple[Callable[[], None], Callable[[], None]]:
        """Iterating, then closing, the body: two steps, each may run on its own thread."""
        box = [body]

        def iterate() -> None:
            body = box[0]
            chunks: list[Any] = []
            try:
                if any(body is w for w in WRAPPED):
                    # The server's sendfile path: it reads the file itself.
                    self.mark(label, "sendfile")
                    chunks.append(getattr(body, "filelike", body).read())
                elif read != 0:
                    for chunk in body:
                        chunks.append(chunk)
                        self.mark(label, "chunk", chunk)
                        if read is not None and len(chunks) >= read:
                            break
            except BaseException as exc:
                self.record(f"{label}: iteration raised", describe_exc(exc))
            self.record(f"{label}: chunks", chunks)
            self.record(f"{label}: chunk types", sorted({type(c).__qualname__ for c in chunks}))

        def close() -> None:
            body = box.pop()
            close = getattr(body, "close", None)
            del body
            for n in range(closes if close is not None else 0):
                self.mark(label, "close", n)
                try:
                    close()
                except BaseException as exc:
                    self.record(f"{label}: close {n} raised", describe_exc(exc))

        return iterate, close


# --------------------------------------------------------------------------
# The scenarios.

Drive = Callable[[DiffApp, Probe], None]
Setup = Callable[[DiffApp], None]


@dataclass(frozen=True)
class Scenario:
    drive: Drive
    modes: tuple[str, ...]
    setup: Setup | None
    #: Arguments for ``CtxGuard`` (none: its defaults, as users run it).
    options: dict[str, Any]

    @property
    def name(self) -> str:
        return self.drive.__name__


SCENARIOS: dict[str, Scenario] = {}


def scenario(*modes: str, setup: Setup | None = None, **options: Any) -> Callable[[Drive], Drive]:
    """Register a scenario, run in ``modes`` (default: production, testing and debug);
    ``options`` are passed to ``CtxGuard`` (only to turn off a documented, deliberate
    change of behaviour, and the docstring says why)."""

    def register(drive: Drive) -> Drive:
        assert drive.__doc__, f"scenario {drive.__name__} needs a docstring: what it guards"
        assert drive.__name__ not in SCENARIOS
        assert not drive.__name__.startswith("test"), "pytest would collect it as a test"
        SCENARIOS[drive.__name__] = Scenario(drive, modes or tuple(MODES), setup, options)
        return drive

    return register


# -- plain requests through a WSGI server


@scenario()
def hello(app: DiffApp, probe: Probe) -> None:
    """A plain GET: same status, headers, bytes, return value protocol and lifecycle."""
    probe.serve("GET /hello", probe.environ("/hello", query_string="q=1"))


@scenario()
def next_on_the_return_value(app: DiffApp, probe: Probe) -> None:
    """``next(app(environ, start_response))`` works as on Flask, whose return value is an
    iterator; so does ``app.wsgi_app`` called directly, as tests and middlewares do."""
    for label, wsgi in (("app", app), ("app.wsgi_app", app.wsgi_app)):
        body = wsgi(probe.environ("/hello"), probe.start_response(label, {}))
        probe.attempt(f"{label}: next()", lambda body=body: next(body))
        probe.attempt(f"{label}: list() of the rest", lambda body=body: list(body))
        probe.attempt(f"{label}: close()", lambda body=body: body.close())


@scenario()
def json_and_form_posts(app: DiffApp, probe: Probe) -> None:
    """Request bodies (form, JSON, raw) reach the view intact; JSON responses are identical."""
    probe.serve("POST form", probe.environ("/json", "POST", data={"a": "1", "b": "two"}))
    probe.serve("POST json", probe.environ("/json", "POST", json={"x": [1, 2]}))
    probe.serve("POST raw", probe.environ("/json", "POST", data=b"\x00raw bytes\xff"))


@scenario()
def file_upload(app: DiffApp, probe: Probe) -> None:
    """A multipart upload: the view reads the file; Flask closes it at teardown."""
    data = {"file": (io.BytesIO(b"uploaded bytes"), "notes.txt"), "field": "value"}
    probe.serve("POST /upload", probe.environ("/upload", "POST", data=data))
    probe.record("upload streams closed", [stream.closed for stream in app.uploads])


@scenario()
def served_by_the_development_server(app: DiffApp, probe: Probe) -> None:
    """Werkzeug's development server serving a production app: ctxguard only reports it."""
    environ = probe.environ("/hello", environ_overrides={"SERVER_SOFTWARE": "Werkzeug/3.1"})
    probe.serve("GET /hello", environ)


@scenario()
def redirect_response(app: DiffApp, probe: Probe) -> None:
    """A redirect: same status, ``Location`` and body."""
    probe.serve("GET /redirect", probe.environ("/redirect"))


@scenario()
def not_found_and_method_not_allowed(app: DiffApp, probe: Probe) -> None:
    """404 and 405 without handlers: Werkzeug's pages, ``Allow`` header, teardowns."""
    probe.serve("GET /missing", probe.environ("/missing"))
    probe.serve("DELETE /hello", probe.environ("/hello", "DELETE"))


@scenario(setup=with_error_handlers)
def not_found_and_method_not_allowed_with_handlers(app: DiffApp, probe: Probe) -> None:
    """404 and 405 answered by the app's error handlers."""
    probe.serve("GET /missing", probe.environ("/missing"))
    probe.serve("DELETE /hello", probe.environ("/hello", "DELETE"))


@scenario()
def view_error_without_handler(app: DiffApp, probe: Probe) -> None:
    """An error in a view: a 500 page in production, the very exception propagated to
    the server (``PROPAGATE_EXCEPTIONS``) in testing and debug, with the user's frames."""
    probe.serve("GET /boom", probe.environ("/boom"))
    probe.serve("GET /lookup", probe.environ("/lookup"))


@scenario(setup=with_error_handlers)
def view_error_with_handlers(app: DiffApp, probe: Probe) -> None:
    """Errors handled by ``errorhandler(500)`` and ``errorhandler(LookupError)``."""
    probe.serve("GET /boom", probe.environ("/boom"))
    probe.serve("GET /lookup", probe.environ("/lookup"))


@scenario()
def abort_in_view(app: DiffApp, probe: Probe) -> None:
    """``abort(403)`` and ``abort(Response)``: the same responses."""
    probe.serve("GET /abort", probe.environ("/abort"))
    probe.serve("GET /abort-response", probe.environ("/abort-response"))


@scenario()
def view_raises_a_base_exception(app: DiffApp, probe: Probe) -> None:
    """A ``BaseException`` (gevent's ``Timeout``) leaves the app as it is, in every mode,
    and the teardown functions get it."""
    probe.serve("GET /base-exception", probe.environ("/base-exception"))


@scenario()
def head_request(app: DiffApp, probe: Probe) -> None:
    """HEAD: headers with ``Content-Length``, an empty body."""
    probe.serve("HEAD /hello", probe.environ("/hello", "HEAD"))


@scenario()
def before_request_short_circuit(app: DiffApp, probe: Probe) -> None:
    """A ``before_request`` returning a response skips the view, not ``after_request``."""
    probe.serve("GET /hello", probe.environ("/hello", headers={"X-Short-Circuit": "1"}))


@scenario()
def teardown_request_fails(app: DiffApp, probe: Probe) -> None:
    """A failing ``teardown_request``: the server gets its very exception after
    ``start_response``, the app context is still torn down."""
    probe.serve("GET /teardown-fail/request", probe.environ("/teardown-fail/request"))


@scenario()
def teardown_appcontext_fails(app: DiffApp, probe: Probe) -> None:
    """A failing ``teardown_appcontext``: the same exception, traceback and order."""
    probe.serve("GET /teardown-fail/app", probe.environ("/teardown-fail/app"))


@scenario()
def teardown_fails_after_a_view_error(app: DiffApp, probe: Probe) -> None:
    """A view error, then a failing teardown: same exception and same chain
    (``__context__``) in every mode."""
    for which in ("request", "app"):
        path = f"/teardown-fail-after-error/{which}"
        probe.serve(f"GET {path}", probe.environ(path))


# Flask 3.2 refuses the request's pop after a view that never pops: the view's context
# and the request's own stay current, stale for the thread's next request, which
# ctxguard's healing (on by default in production) pops: its one documented,
# deliberate change of behaviour. Up to Flask 3.1 nothing stale is left to heal.
_NO_HEAL_IF_MERGED: dict[str, Any] = {"heal": False} if MERGED else {}


@scenario(**_NO_HEAL_IF_MERGED)
def context_pushed_in_a_view_and_never_popped(app: DiffApp, probe: Probe) -> None:
    """A view that pushes an app context and never pops it: Flask's own complaint
    reaches the server unchanged (an ``AssertionError`` after the pop up to Flask 3.1, a
    ``RuntimeError`` refusing it on 3.2, which leaves both contexts current: compared
    with ``heal=False``, healing being ctxguard's one deliberate change), and the next
    request is served as without ctxguard."""
    probe.serve("GET /push-no-pop", probe.environ("/push-no-pop"))
    probe.serve("GET /g/-", probe.environ("/g/-"))


@scenario()
def wrong_order_pop_in_a_view(app: DiffApp, probe: Probe) -> None:
    """A view that pops the app context it pushed first while a later one is current,
    catches Flask's complaint and pops what is still its own: the same complaint (up to
    Flask 3.1 an ``AssertionError`` after the pop, the later context left unreachable;
    on 3.2 a ``RuntimeError`` refusing it, nothing changed), the same teardowns in the
    same order, the same response, and the next request is served as without ctxguard."""
    probe.serve("GET /wrong-order-pop", probe.environ("/wrong-order-pop"))
    probe.serve("GET /g/-", probe.environ("/g/-"))


@scenario()
def context_popped_on_another_thread(app: DiffApp, probe: Probe) -> None:
    """A context pushed on one thread and popped on another (by a view, and by a
    script): the other thread gets the same error (Flask 3.2 refuses the pop, the
    context stays pushed on its own thread; up to 3.1 the teardown runs there, then
    Flask's context variable fails), the same teardowns run, and the pushing thread
    pops it as without ctxguard; the next request is served the same."""
    probe.serve("GET /pop-on-another-thread", probe.environ("/pop-on-another-thread"))
    probe.serve("GET /g/-", probe.environ("/g/-"))
    ctx = app.app_context()
    ctx.push()
    g.marker = "pushed by the script"
    errors: list[Any] = []

    def pop_there() -> None:
        try:
            ctx.pop()
        except Exception as exc:
            errors.append(describe_exc(exc))

    thread = threading.Thread(target=pop_there)
    thread.start()
    thread.join()
    probe.record("the script's context popped on another thread", errors)
    probe.attempt("after: g.marker here", lambda: g.get("marker"))
    probe.attempt("the script pops it", ctx.pop)
    probe.attempt("after: has_app_context", has_app_context)


@scenario()
def teardown_raises_in_a_manual_pop(app: DiffApp, probe: Probe) -> None:
    """A teardown function that raises when the user's own code pops a context (a
    script's ``with app.app_context()``, a test's ``with app.test_request_context()``):
    the user gets the same exception (up to Flask 3.1 the teardown function's own; on
    3.2, once every teardown ran and the context was popped, an exception group holding
    it on Python 3.11+), compared member by member, and the context is gone as without
    ctxguard."""

    def block(factory: Callable[[], Any], which: str) -> None:
        with factory():
            g.marker = f"manual {which}"
            g.fail_teardown = which

    probe.attempt("app context", lambda: block(app.app_context, "app"))
    probe.attempt("after app context: has_app_context", has_app_context)
    for which in ("request", "app"):
        probe.attempt(
            f"test request context, {which} teardown fails",
            lambda which=which: block(lambda: app.test_request_context("/manual"), which),
        )
        probe.attempt(f"after {which}: has_app_context", has_app_context)
        probe.attempt(f"after {which}: has_request_context", has_request_context)


@scenario()
def g_is_isolated_between_requests(app: DiffApp, probe: Probe) -> None:
    """Each request gets a fresh ``g``."""
    probe.serve("GET /g/first", probe.environ("/g/first"))
    probe.serve("GET /g/second", probe.environ("/g/second"))
    probe.serve("GET /g/-", probe.environ("/g/-"))


@scenario(setup=with_ambient_context)
def ambient_app_context_shares_g(app: DiffApp, probe: Probe) -> None:
    """An app context pushed at start-up is left alone: requests share its ``g`` and
    its teardown runs when the app pops it, exactly as without ctxguard."""
    probe.serve("GET /g/first", probe.environ("/g/first"))
    probe.serve("GET /g/-", probe.environ("/g/-"))
    probe.attempt("pop the ambient context", lambda: app.ambient.pop())


# -- streamed bodies


@scenario()
def generator_read_fully(app: DiffApp, probe: Probe) -> None:
    """A plain generator response: chunk boundaries, and its ``finally`` runs (outside
    the request's context) in the same place relative to the server's actions."""
    probe.serve("GET /generator", probe.environ("/generator"))


@scenario()
def generator_read_partly_then_closed(app: DiffApp, probe: Probe) -> None:
    """A client that goes away: one chunk read, then ``close()`` stops the generator."""
    probe.serve("GET /generator", probe.environ("/generator"), read=1)


@scenario()
def generator_closed_without_reading(app: DiffApp, probe: Probe) -> None:
    """``close()`` on a body never iterated."""
    probe.serve("GET /generator", probe.environ("/generator"), read=0)


@scenario()
def generator_abandoned_without_close(app: DiffApp, probe: Probe) -> None:
    """A server that drops a half-read body without ``close()``: it is finalised as
    without ctxguard, at the same point."""
    probe.serve("GET /generator", probe.environ("/generator"), read=1, closes=0)


@scenario()
def generator_raises_while_streaming(app: DiffApp, probe: Probe) -> None:
    """An error while the body is iterated reaches the server: same object, same frames."""
    probe.serve("GET /generator-error", probe.environ("/generator-error"))


@scenario()
def generator_uses_request_without_stream_with_context(app: DiffApp, probe: Probe) -> None:
    """The classic bug: a generator touching ``request`` after the view returned. The
    server gets the very same ``RuntimeError`` after the first chunk."""
    probe.serve("GET /generator-uses-request", probe.environ("/generator-uses-request"))


@scenario()
def stream_with_context_read_fully(app: DiffApp, probe: Probe) -> None:
    """``stream_with_context``: the generator sees ``request`` and ``g``; teardowns run
    when it ends, at the same point."""
    probe.serve("GET /stream", probe.environ("/stream", query_string="prefix=c"))


@scenario()
def stream_with_context_read_partly_then_closed(app: DiffApp, probe: Probe) -> None:
    """``stream_with_context`` read partly, then closed: ``finally`` and teardowns."""
    probe.serve("GET /stream", probe.environ("/stream"), read=1)


@scenario()
def stream_with_context_head(app: DiffApp, probe: Probe) -> None:
    """HEAD to a ``stream_with_context`` view: no body; the primed generator is closed."""
    probe.serve("HEAD /stream", probe.environ("/stream", "HEAD"))


@scenario()
def stream_with_context_abandoned_without_close(app: DiffApp, probe: Probe) -> None:
    """A half-read ``stream_with_context`` body dropped without ``close()``."""
    probe.serve("GET /stream", probe.environ("/stream"), read=1, closes=0)


@scenario()
def stream_with_context_raises_while_streaming(app: DiffApp, probe: Probe) -> None:
    """An error inside a ``stream_with_context`` generator: same exception and frames,
    teardowns with the same exception."""
    probe.serve("GET /stream-error", probe.environ("/stream-error"))


@scenario()
def stream_with_context_reads_the_request_body(app: DiffApp, probe: Probe) -> None:
    """A streamed response reading ``request.stream`` as it goes."""
    environ = probe.environ("/stream-input", "POST", data=b"abcdefghijklmnopqrstuvw")
    probe.serve("POST /stream-input", environ)


@scenario()
def bodies_iterated_on_another_thread(app: DiffApp, probe: Probe) -> None:
    """Servers that iterate and close the body on another thread than the one that
    called the app (joined, so the order is fixed)."""
    probe.serve("GET /generator", probe.environ("/generator"), on_thread=True)
    probe.serve("GET /on-close/ok", probe.environ("/on-close/ok"), on_thread=True)
    environ = probe.environ("/passthrough/generator")
    probe.serve("GET /passthrough/generator", environ, on_thread=True)


@scenario(heal=False)
def stream_closed_on_another_thread_then_next_request(app: DiffApp, probe: Probe) -> None:
    """flask#6123: a ``stream_with_context`` body read on the serving thread and closed
    on another leaves its contexts current on the serving thread (Flask 2.3 pushes them
    in the view, so also when it is only closed there); the next request there shares
    the stale ``g`` and skips ``teardown_appcontext``. Bad, but ctxguard must not change
    it unless it heals: healing (on by default in production) is its one documented,
    deliberate change of behaviour, so this compares with ``heal=False``."""
    probe.serve("GET /stream", probe.environ("/stream"), read=1, close_on_thread=True)
    probe.serve("GET /g/-", probe.environ("/g/-"))
    environ = probe.environ("/stream", query_string="prefix=late")
    probe.serve("GET /stream (only closed elsewhere)", environ, read=0, close_on_thread=True)
    probe.serve("GET /g/- again", probe.environ("/g/-"))


@scenario()
def call_on_close_runs_on_close(app: DiffApp, probe: Probe) -> None:
    """``response.call_on_close`` callbacks run when the server closes the body."""
    probe.serve("GET /on-close/ok", probe.environ("/on-close/ok"))


@scenario()
def call_on_close_raises(app: DiffApp, probe: Probe) -> None:
    """A failing ``call_on_close`` callback: its very exception comes out of ``close()``."""
    probe.serve("GET /on-close/error", probe.environ("/on-close/error"))


@scenario()
def call_on_close_uses_request(app: DiffApp, probe: Probe) -> None:
    """A ``call_on_close`` callback touching ``request`` after the request: the same
    ``RuntimeError`` (message, no chained cause) out of ``close()``."""
    probe.serve("GET /on-close/request", probe.environ("/on-close/request"))


@scenario()
def close_called_twice(app: DiffApp, probe: Probe) -> None:
    """A server (or a middleware and a server) calling ``close()`` twice: callbacks run
    as many times as on Flask's own return value."""
    probe.serve("GET /on-close/ok", probe.environ("/on-close/ok"), closes=2)


# -- send_file and the server's wsgi.file_wrapper


@scenario()
def send_file_without_file_wrapper(app: DiffApp, probe: Probe) -> None:
    """``send_file`` with no ``wsgi.file_wrapper``: Werkzeug's own wrapper, same bytes."""
    probe.serve("GET /file", probe.environ("/file"))


@scenario()
def send_file_with_a_class_file_wrapper(app: DiffApp, probe: Probe) -> None:
    """gunicorn's file wrapper (a class): the server gets its instance back and keeps
    its sendfile path."""
    probe.serve("GET /file", probe.environ("/file", file_wrapper="class"))


@scenario()
def send_file_with_a_function_file_wrapper(app: DiffApp, probe: Probe) -> None:
    """uWSGI's file wrapper (a function returning the file object, recognised by
    identity): the server gets exactly that object back and keeps its sendfile path."""
    probe.serve("GET /file", probe.environ("/file", file_wrapper="function"))


@scenario()
def send_file_with_a_file_wrapper_class_with_a_metaclass(app: DiffApp, probe: Probe) -> None:
    """A file wrapper class whose metaclass is not ``type``: still the server's own
    object back, sendfile kept."""
    probe.serve("GET /file", probe.environ("/file", file_wrapper="abc class"))


@scenario()
def send_file_with_a_file_wrapper_factory(app: DiffApp, probe: Probe) -> None:
    """A file wrapper that is a function returning the server's own wrapper object (not
    the file): the server gets exactly that object back and keeps its sendfile path."""
    probe.serve("GET /file", probe.environ("/file", file_wrapper="factory"))


@scenario()
def send_file_head_and_range_with_file_wrappers(app: DiffApp, probe: Probe) -> None:
    """HEAD and a Range request to ``send_file`` under each kind of file wrapper."""
    for kind in FILE_WRAPPERS:
        probe.serve(f"HEAD /file ({kind})", probe.environ("/file", "HEAD", file_wrapper=kind))
        environ = probe.environ("/file", headers={"Range": "bytes=10-29"}, file_wrapper=kind)
        probe.serve(f"GET /file range ({kind})", environ)


@scenario()
def send_file_not_modified(app: DiffApp, probe: Probe) -> None:
    """Conditional ``send_file``: the ETag, then a 304 with an empty body."""
    seen: dict[str, Any] = {}
    body = app(probe.environ("/file"), probe.start_response("first", seen))
    body.close()
    etag = dict(seen["headers"])["ETag"]
    probe.record("etag", etag)
    for kind in (None, *FILE_WRAPPERS):
        environ = probe.environ("/file", headers={"If-None-Match": etag}, file_wrapper=kind)
        probe.serve(f"GET /file If-None-Match ({kind})", environ)


@scenario()
def direct_passthrough_bodies(app: DiffApp, probe: Probe) -> None:
    """``direct_passthrough`` responses: Flask returns the body itself (a list, a tuple:
    their exact type; a generator: an iterator with ``close``)."""
    for kind in ("list", "tuple", "generator"):
        probe.serve(f"GET /passthrough/{kind}", probe.environ(f"/passthrough/{kind}"))


@scenario(setup=with_mounted_wsgi)
def mounted_plain_wsgi_apps(app: DiffApp, probe: Probe) -> None:
    """Plain WSGI apps mounted with ``DispatcherMiddleware`` below the guard: their
    return values (a list, a generator, a hand-written iterator) reach the server as
    they are; Flask requests beside them are unchanged."""
    for path in ("/legacy-list/x", "/legacy-gen", "/legacy-iter", "/legacy-late", "/hello"):
        probe.serve(f"GET {path}", probe.environ(path))


@scenario(setup=with_mounted_flask_app)
def two_guarded_flask_apps(app: DiffApp, probe: Probe) -> None:
    """Two Flask apps, each with ``CtxGuard``, one mounted in the other: plain, streamed
    and failing requests to the inner app, and a request to the outer one."""
    for path in ("/inner/", "/inner/stream", "/inner/boom", "/hello"):
        probe.serve(f"GET {path}", probe.environ(path))


@scenario(setup=with_proxy_fix)
def proxy_fix_below_the_guard(app: DiffApp, probe: Probe) -> None:
    """``ProxyFix`` added before ``CtxGuard(app)``: forwarded headers still applied."""
    headers = {
        "X-Forwarded-For": "203.0.113.7",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "example.org",
    }
    probe.serve("GET /remote", probe.environ("/remote", headers=headers))


@scenario()
def served_by_wsgiref(app: DiffApp, probe: Probe) -> None:
    """A real WSGI server, in-process: the standard library's ``wsgiref`` handler. The
    exact bytes it writes (``Date`` masked) and the last line it logs for an error."""
    paths = ("/hello", "/stream", "/file", "/generator-error", "/boom", "/on-close/ok")
    for path in paths:
        environ: dict[str, Any] = {"PATH_INFO": path}
        setup_testing_defaults(environ)
        stdout, stderr = io.BytesIO(), io.StringIO()
        SimpleHandler(io.BytesIO(), stdout, stderr, environ, multithread=False).run(app)
        written = re.sub(rb"Date: [^\r]*", b"Date: <now>", stdout.getvalue())
        logged = stderr.getvalue().strip().splitlines()[-1:]
        probe.record(f"wsgiref GET {path}", (written, [masked(line) for line in logged]))


# -- threads and async views


@scenario()
def copy_current_request_context_in_a_thread(app: DiffApp, probe: Probe) -> None:
    """``copy_current_request_context``: the thread sees the request, as without ctxguard."""
    probe.serve("GET /thread/copy", probe.environ("/thread/copy", query_string="q=7"))


@scenario()
def thread_outlives_its_request(app: DiffApp, probe: Probe) -> None:
    """A thread with ``copy_current_request_context`` still running after the response
    is closed: it sees the request then, and its teardowns run on it, in the same order."""
    probe.serve("GET /thread/outlives", probe.environ("/thread/outlives"))
    release, thread = app.pending
    probe.mark("releasing the thread")
    release.set()
    thread.join()
    probe.mark("thread joined")


@scenario()
def request_used_in_a_thread_without_copy(app: DiffApp, probe: Probe) -> None:
    """A thread touching ``request`` and ``g``: the same ``RuntimeError`` (message, no
    chained cause, the user's frames)."""
    probe.serve("GET /thread/plain", probe.environ("/thread/plain"))


@scenario()
def uncaught_error_in_a_thread(app: DiffApp, probe: Probe) -> None:
    """An exception escaping a thread reaches ``threading.excepthook`` unchanged."""
    probe.serve("GET /thread/uncaught", probe.environ("/thread/uncaught"))


@scenario()
def timer_and_thread_subclass(app: DiffApp, probe: Probe) -> None:
    """``threading.Timer`` and a ``Thread`` subclass overriding ``run`` behave the same,
    and leave the same attributes on the thread object."""
    probe.serve("GET /thread/timer", probe.environ("/thread/timer"))
    probe.serve("GET /thread/subclass", probe.environ("/thread/subclass"))


@scenario()
def executor_tasks(app: DiffApp, probe: Probe) -> None:
    """``ThreadPoolExecutor.submit`` and ``map``: results, and errors re-raised by
    ``result()`` with the same frames."""
    probe.serve("GET /executor", probe.environ("/executor"))


@scenario()
def async_view(app: DiffApp, probe: Probe) -> None:
    """An ``async def`` view (asgiref) sees the request and ``g``."""
    probe.serve("GET /async", probe.environ("/async", query_string="q=async"))


@scenario()
def async_view_with_stream_with_context(app: DiffApp, probe: Probe) -> None:
    """``stream_with_context`` returned by an ``async def`` view."""
    probe.serve("GET /async-stream", probe.environ("/async-stream"))


@scenario()
def async_view_raises(app: DiffApp, probe: Probe) -> None:
    """An error in an ``async def`` view: the same 500 or propagated exception."""
    probe.serve("GET /async-boom", probe.environ("/async-boom"))


# -- what a test sees


@scenario()
def client_calls(app: DiffApp, probe: Probe) -> None:
    """The test client without ``with``: responses, and ``request`` unusable after."""
    client = app.test_client()
    probe.attempt("GET /hello", lambda: client.get("/hello?q=1"))
    probe.attempt("POST /json", lambda: client.post("/json", json={"k": "v"}))
    probe.attempt("GET /missing", lambda: client.get("/missing"))
    probe.attempt("GET /stream buffered", lambda: client.get("/stream", buffered=True))
    probe.attempt("after: request.path", lambda: request.path)


@scenario()
def client_with_block_keeps_the_request(app: DiffApp, probe: Probe) -> None:
    """``with client:`` keeps ``flask.request``, ``g`` and ``session`` usable after each
    call, with ``TESTING`` on or off (many apps run their tests without it), until the
    next call or the end of the block."""
    client = app.test_client()
    with client:
        probe.attempt("GET /hello", lambda: client.get("/hello?q=1"))
        probe.attempt("after: request.path", lambda: request.path)
        probe.attempt("after: request.args", lambda: request.args.to_dict())
        probe.attempt("after: g.marker", lambda: g.get("marker"))
        probe.attempt("after: session", lambda: dict(session))
        probe.attempt("GET /g/second", lambda: client.get("/g/second"))
        probe.attempt("after second: request.path", lambda: request.path)
        probe.attempt("after second: g.marker", lambda: g.get("marker"))
        probe.mark("leaving the with block")
    probe.attempt("after the block: request.path", lambda: request.path)


@scenario()
def client_with_block_after_a_view_error(app: DiffApp, probe: Probe) -> None:
    """``with client:`` and a failing view: the 500 (production) or the exception
    (testing, debug), and the failed request still inspectable after."""
    client = app.test_client()
    with client:
        probe.attempt("GET /boom", lambda: client.get("/boom"))
        probe.attempt("after: request.path", lambda: request.path)
        probe.attempt("after: g.marker", lambda: g.get("marker"))
    probe.attempt("after the block: request.path", lambda: request.path)


@scenario()
def client_with_block_and_a_stream(app: DiffApp, probe: Probe) -> None:
    """``with client:`` around a ``stream_with_context`` response read by the test."""
    client = app.test_client()
    with client:
        response = probe.attempt("GET /stream", lambda: client.get("/stream?prefix=s"))
        probe.attempt("after: request.path", lambda: request.path)
        probe.attempt("close", lambda: response.close())
    probe.attempt("after the block: request.path", lambda: request.path)


@scenario()
def client_inside_test_request_context(app: DiffApp, probe: Probe) -> None:
    """A test inside ``app.test_request_context()`` calling the client: the view shares
    the test's app context (``g``), and the test's request is current again after."""
    client = app.test_client()
    with app.test_request_context("/outer?o=1"):
        g.marker = "outer"
        probe.attempt("GET /g/inner", lambda: client.get("/g/inner"))
        probe.attempt("after: request.path", lambda: request.path)
        probe.attempt("after: g.marker", lambda: g.get("marker"))
        with client:
            probe.attempt("with client: GET /hello", lambda: client.get("/hello"))
            probe.attempt("with client: request.path", lambda: request.path)
        probe.attempt("after with client: request.path", lambda: request.path)
    probe.attempt("after the block: request.path", lambda: request.path)


@scenario()
def client_inside_app_context(app: DiffApp, probe: Probe) -> None:
    """A test inside ``app.app_context()`` calling the client: the view shares its ``g``;
    ``teardown_appcontext`` runs when the test's block ends."""
    client = app.test_client()
    with app.app_context():
        g.marker = "test"
        probe.attempt("GET /g/view", lambda: client.get("/g/view"))
        probe.attempt("after: g.marker", lambda: g.get("marker"))
        probe.attempt("GET /g/-", lambda: client.get("/g/-"))
        probe.mark("leaving the app context")


@scenario("production")
def switching_testing_on_after_the_guard(app: DiffApp, probe: Probe) -> None:
    """``app = create_app(); app.config["TESTING"] = True``, the factory having called
    ``CtxGuard(app)``: after a first request in production, the test's ``with client:``
    and propagated exceptions work as without ctxguard."""
    client = app.test_client()
    probe.attempt("GET /hello before the switch", lambda: client.get("/hello"))
    app.config["TESTING"] = True
    with client:
        probe.attempt("GET /boom", lambda: client.get("/boom"))
        probe.attempt("after: request.path", lambda: request.path)
        probe.attempt("GET /hello", lambda: client.get("/hello?q=after"))
        probe.attempt("after: request.args", lambda: request.args.to_dict())


@scenario("production")
def switching_debug_on_after_the_guard(app: DiffApp, probe: Probe) -> None:
    """``app.debug = True`` after ``CtxGuard(app)`` (as ``app.run(debug=True)`` does):
    errors propagate to the server as without ctxguard."""
    probe.serve("GET /boom before", probe.environ("/boom"))
    app.debug = True
    probe.serve("GET /boom after", probe.environ("/boom"))


@scenario("testing", "debug", setup=with_preserve_config)
def preserve_context_config_outside_production(app: DiffApp, probe: Probe) -> None:
    """A test or debug app keeping ``PRESERVE_CONTEXT_ON_EXCEPTION = True``: its config
    is left as it is (production is left out: there ctxguard sets it to False, a
    documented policy; Flask >= 2.2 ignores the key)."""
    client = app.test_client()
    with client:
        probe.attempt("GET /boom", lambda: client.get("/boom"))
        probe.attempt("after: request.path", lambda: request.path)
    probe.record("config", app.config["PRESERVE_CONTEXT_ON_EXCEPTION"])


@scenario()
def client_session_and_cookies(app: DiffApp, probe: Probe) -> None:
    """Sessions and cookies through the test client, and ``session_transaction``."""
    client = app.test_client()
    probe.attempt("login", lambda: client.get("/session/login?user=grace"))
    probe.attempt("whoami", lambda: client.get("/session/whoami"))
    flavour = client.get_cookie("flavour")
    probe.record("cookie flavour", None if flavour is None else flavour.value)
    cookie = client.get_cookie(app.config["SESSION_COOKIE_NAME"])
    probe.record("cookie session", probe.session_value(None if cookie is None else cookie.value))
    with client.session_transaction() as sess:
        sess["user"] = "hopper"
    probe.attempt("whoami after transaction", lambda: client.get("/session/whoami"))
    probe.attempt("logout", lambda: client.get("/session/logout"))
    probe.attempt("whoami after logout", lambda: client.get("/session/whoami"))


@scenario()
def session_cookie_through_wsgi(app: DiffApp, probe: Probe) -> None:
    """The session cookie a server sends and gets back: same content, attributes and order."""
    raw: list[tuple[str, str]] = []

    def start_response(status: str, headers: list[Any], exc_info: Any = None) -> None:
        raw.extend(headers)

    app(probe.environ("/session/login", query_string="user=turing"), start_response).close()
    probe.record("login headers", probe.headers(raw))
    cookie = "; ".join(value.split(";")[0] for name, value in raw if name == "Set-Cookie")
    environ = probe.environ("/session/whoami", headers={"Cookie": cookie})
    probe.serve("GET /session/whoami", environ)


@scenario()
def client_follow_redirects(app: DiffApp, probe: Probe) -> None:
    """``follow_redirects=True``: the final response and the history."""
    client = app.test_client()
    response = probe.attempt(
        "GET /redirect", lambda: client.get("/redirect", follow_redirects=True)
    )
    probe.record("history", [r.status for r in response.history] if response else None)
    probe.record("final request", response.request.full_path if response else None)


@scenario()
def client_streamed_response_read_partly(app: DiffApp, probe: Probe) -> None:
    """Streamed responses the test reads one chunk of, then closes."""
    client = app.test_client()
    for path in ("/generator", "/stream"):
        response = client.get(path)
        chunks = iter(response.response)
        probe.attempt(f"{path}: first chunk", lambda chunks=chunks: next(chunks))
        probe.mark(path, "closing")
        probe.attempt(f"{path}: close", lambda response=response: response.close())


@scenario()
def client_view_error(app: DiffApp, probe: Probe) -> None:
    """A failing view under the test client: the 500 (production) or the very exception
    with the user's frames (testing, debug), including from async views and teardowns."""
    client = app.test_client()
    probe.attempt("GET /boom", lambda: client.get("/boom"))
    probe.attempt("GET /async-boom", lambda: client.get("/async-boom"))
    probe.attempt("GET /teardown-fail/app", lambda: client.get("/teardown-fail/app"))
    probe.attempt("GET /stream-error", lambda: client.get("/stream-error"))


@scenario()
def dispatch_inside_test_request_context(app: DiffApp, probe: Probe) -> None:
    """``app.test_request_context()`` with ``full_dispatch_request()``, as unit tests do."""
    with app.test_request_context("/hello?q=direct"):
        probe.attempt("full_dispatch_request", lambda: app.full_dispatch_request())
        probe.attempt("g.marker", lambda: g.get("marker"))


@scenario()
def app_context_in_a_script(app: DiffApp, probe: Probe) -> None:
    """``with app.app_context():`` in a script: its error reaches the script unchanged
    and ``teardown_appcontext`` gets it."""

    def script() -> None:
        with app.app_context():
            g.marker = "script"
            fail(ValueError("script failed"))

    probe.attempt("script", script)
    probe.attempt("after: current_app", lambda: current_app.name)


@scenario()
def cli_command(app: DiffApp, probe: Probe) -> None:
    """A ``flask`` CLI command (``with_appcontext``): same output and exit code."""
    result = app.test_cli_runner().invoke(args=["where"])
    probe.record("cli", (result.exit_code, result.output, short(result.exception)))


# --------------------------------------------------------------------------
# Running a scenario.


def _clear_contexts() -> list[str]:
    """Pop whatever is current, without any hooks; say what was left."""
    return reset_contexts()


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[tuple[Any, ...]] = []

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        self.seen.append((record.name, record.levelname, masked(record.getMessage()), short(exc)))


Guard = Callable[[DiffApp], Any]


def run(scenario: Scenario, mode: str, tmp: Path, guard: Guard | None) -> dict[str, Any]:
    """Build a fresh app, guard it (or not), drive it, and return everything observed."""
    ctxguard.uninstall()
    _clear_contexts()
    RAISED.clear()
    WRAPPED.clear()
    # Garbage from before is frozen: it cannot be finalised during this run, and the
    # collections below only scan what this run made (fast).
    gc.freeze()
    try:
        return _run(scenario, mode, tmp, guard)
    finally:
        gc.unfreeze()


def _run(scenario: Scenario, mode: str, tmp: Path, guard: Guard | None) -> dict[str, Any]:
    app = build(mode, tmp)
    if scenario.setup is not None:
        scenario.setup(app)
    _guard_all(app, guard)
    probe = Probe(app)
    thread_errors: list[Any] = []
    unraisable: list[Any] = []
    records = _Records()
    loggers = [logging.getLogger(each.name) for each in (app, *app.extra_apps)]
    hooks = threading.excepthook, sys.unraisablehook
    threading.excepthook = lambda args: thread_errors.append(describe_exc(args.exc_value))
    sys.unraisablehook = lambda u: unraisable.append((short(u.exc_value), masked(u.err_msg)))
    for logger in loggers:
        logger.addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                scenario.drive(app, probe)
            except Exception as exc:
                probe.record("the scenario raised", describe_exc(exc))
            probe.record("contexts left current", _clear_contexts())
            gc.collect()
    finally:
        threading.excepthook, sys.unraisablehook = hooks
        for logger in loggers:
            logger.removeHandler(records)
        ctxguard.uninstall()
    probe.record("events", list(app.events))
    probe.record("app log", records.seen)
    probe.record("thread exceptions", thread_errors)
    probe.record("unraisable exceptions", unraisable)
    probe.record("warnings", [(w.category.__name__, masked(w.message)) for w in caught])
    return probe.data


def _guard_all(app: DiffApp, guard: Guard | None) -> None:
    """Guard the app and the apps mounted in it (a function of its own, so that the
    harness's frames in tracebacks have the same locals in both variants)."""
    for each in (app, *app.extra_apps) if guard is not None else ():
        guard(each)


def explain(plain: dict[str, Any], guarded: dict[str, Any]) -> str:
    """The observations that differ, plain first."""
    lines = ["ctxguard changed what the app does:"]
    for key in [*plain, *(k for k in guarded if k not in plain)]:
        a, b = plain.get(key, "<not recorded>"), guarded.get(key, "<not recorded>")
        if a != b:
            lines.append(f"--- {key}\n  plain:   {pprint.pformat(a, width=90)}")
            lines.append(f"  guarded: {pprint.pformat(b, width=90)}")
    return "\n".join(lines)


CASES = [
    pytest.param(s.name, mode, id=f"{s.name}-{mode}")
    for s in SCENARIOS.values()
    for mode in s.modes
]


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    """The directory of both variants' apps, with the file ``send_file`` serves."""
    data = tmp_path / "data.bin"
    data.write_bytes(DATA)
    os.utime(data, (1_700_000_000, 1_700_000_000))
    return tmp_path


@pytest.mark.parametrize(("name", "mode"), CASES)
def test_ctxguard_is_transparent(name: str, mode: str, tmp: Path, telemetry: Any) -> None:
    """The scenario observed on a plain app equals the same scenario with ``CtxGuard``."""
    scenario = SCENARIOS[name]
    plain = run(scenario, mode, tmp, None)
    options = {**scenario.options, **telemetry.providers}
    guarded = run(scenario, mode, tmp, lambda app: ctxguard.CtxGuard(app, **options))
    assert guarded == plain, explain(plain, guarded)


# --------------------------------------------------------------------------
# The harness itself: deterministic, and able to fail.


@pytest.mark.parametrize(("name", "mode"), CASES)
def test_the_harness_is_deterministic(name: str, mode: str, tmp: Path) -> None:
    """Two plain runs observe exactly the same: a difference with ctxguard is ctxguard's."""
    scenario = SCENARIOS[name]
    assert run(scenario, mode, tmp, None) == run(scenario, mode, tmp, None)


def _mutant(wrap: Callable[[Any, dict[str, Any], Callable[..., Any]], Any]) -> Guard:
    """A guard that wraps ``app.wsgi_app`` in a middleware built from ``wrap``."""

    def guard(app: DiffApp) -> None:
        inner = app.wsgi_app

        def middleware(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
            return wrap(inner, environ, start_response)

        app.wsgi_app = middleware  # type: ignore[method-assign]

    return guard


class _OnlyIterable:
    def __init__(self, body: Any) -> None:
        self.body = body

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.body)

    def close(self) -> None:
        self.body.close()


def _iterable_body(app: Any, environ: dict[str, Any], start_response: Any) -> Any:
    return _OnlyIterable(app(environ, start_response))


def _extra_header(app: Any, environ: dict[str, Any], start_response: Any) -> Any:
    def patched(status: str, headers: list[Any], exc_info: Any = None) -> Any:
        return start_response(status, [*headers, ("X-Guard", "1")], exc_info)

    return app(environ, patched)


def _reraise_new(app: Any, environ: dict[str, Any], start_response: Any) -> Any:
    try:
        return app(environ, start_response)
    except ValueError as exc:
        raise ValueError(str(exc)) from None


def _lose_traceback(app: Any, environ: dict[str, Any], start_response: Any) -> Any:
    try:
        return app(environ, start_response)
    except ValueError as exc:
        raise exc.with_traceback(None) from None


def _strip_preserve_key(app: Any, environ: dict[str, Any], start_response: Any) -> Any:
    environ.pop("werkzeug.debug.preserve_context", None)
    return app(environ, start_response)


def _wrap_every_body(app: Any, environ: dict[str, Any], start_response: Any) -> Any:
    body = app(environ, start_response)
    return body if isinstance(body, list | tuple) else _OnlyIterable(body)


def _eager_body(app: Any, environ: dict[str, Any], start_response: Any) -> Any:
    body = app(environ, start_response)
    try:
        return list(body)
    finally:
        getattr(body, "close", lambda: None)()


def _close_once(app: Any, environ: dict[str, Any], start_response: Any) -> Any:
    body = app(environ, start_response)

    class Once:
        def __init__(self) -> None:
            self.closed = False

        def __iter__(self) -> Any:
            return self

        def __next__(self) -> bytes:
            return next(body)

        def close(self) -> None:
            if not self.closed:
                self.closed = True
                body.close()

    return Once()


MUTANTS = [
    pytest.param(_iterable_body, "hello", "production", id="body only iterable"),
    pytest.param(_extra_header, "hello", "production", id="extra header"),
    pytest.param(_reraise_new, "view_error_without_handler", "testing", id="new exception"),
    pytest.param(_lose_traceback, "view_error_without_handler", "debug", id="lost traceback"),
    pytest.param(
        _strip_preserve_key, "client_with_block_keeps_the_request", "production", id="preserve"
    ),
    pytest.param(
        _wrap_every_body, "send_file_with_a_class_file_wrapper", "production", id="file wrapper"
    ),
    pytest.param(_eager_body, "stream_with_context_read_fully", "production", id="eager body"),
    pytest.param(_close_once, "close_called_twice", "production", id="close once"),
]


@pytest.mark.parametrize(("wrap", "name", "mode"), MUTANTS)
def test_the_comparison_catches_a_non_transparent_middleware(
    wrap: Callable[..., Any], name: str, mode: str, tmp: Path
) -> None:
    """Each way a guard could be less than transparent is caught by a scenario."""
    scenario = SCENARIOS[name]
    assert run(scenario, mode, tmp, _mutant(wrap)) != run(scenario, mode, tmp, None)


# A guard's hook on ``pop`` is ctxguard's code: its frames are left out of the
# comparison (see ``_place``). A mutant of such a hook is compiled as if it were
# ctxguard's, so that only what it changes can make the comparison fail.
_POP_HOOKS = '''
def swallow(pop):
    """A hook that swallows Flask's complaint about a pop (wrong order, other thread)."""
    def hooked(*args, **kwargs):
        try:
            return pop(*args, **kwargs)
        except (AssertionError, RuntimeError, LookupError, ValueError):
            return None
    return hooked


def alter_errors(pop):
    """A hook that changes the teardown function's error it lets through (inside
    Flask 3.2's exception groups: the groups themselves are left as they are)."""
    def hooked(*args, **kwargs):
        try:
            return pop(*args, **kwargs)
        except BaseException as exc:
            errors = [exc]
            while errors:
                error = errors.pop()
                if isinstance(error, GROUP):
                    errors.extend(error.exceptions)
                else:
                    error.args = ("changed by the guard",)
            raise
    return hooked
'''
_pop_hooks: dict[str, Any] = {"GROUP": _GROUP}
exec(compile(_POP_HOOKS, str(_CTXGUARD_DIR / "mutant_pop_hooks.py"), "exec"), _pop_hooks)


def _pop_mutant(hook: str) -> Guard:
    """A guard whose hook on the pop of every context the app makes is ``hook``."""

    def guard(app: DiffApp) -> None:
        def hooked(make: Callable[..., Any]) -> Callable[..., Any]:
            def made(*args: Any, **kwargs: Any) -> Any:
                ctx = make(*args, **kwargs)
                ctx.pop = _pop_hooks[hook](ctx.pop)
                return ctx

            return made

        for name in ("app_context", "request_context", "test_request_context"):
            setattr(app, name, hooked(getattr(app, name)))

    return guard


POP_MUTANTS = [
    pytest.param("swallow", "wrong_order_pop_in_a_view", "production", id="wrong order"),
    pytest.param("swallow", "context_popped_on_another_thread", "testing", id="other thread"),
    pytest.param("alter_errors", "teardown_raises_in_a_manual_pop", "debug", id="teardown error"),
]


@pytest.mark.parametrize(("hook", "name", "mode"), POP_MUTANTS)
def test_the_comparison_catches_a_pop_hook_that_is_not_transparent(
    hook: str, name: str, mode: str, tmp: Path
) -> None:
    """A hook on ``pop`` that swallows Flask's complaint about a pop out of order or on
    another thread, or changes a teardown function's error (on Flask 3.2 inside the
    exception groups Flask raises), is caught by a scenario."""
    scenario = SCENARIOS[name]
    assert run(scenario, mode, tmp, _pop_mutant(hook)) != run(scenario, mode, tmp, None)
