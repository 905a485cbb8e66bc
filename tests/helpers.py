"""Small builders shared by the tests: an app, a WSGI environ, a request run to the end."""

from __future__ import annotations

import io
import re
from typing import Any

import flask.ctx
import flask.globals
import pytest
from flask import Flask

# Flask's context model, told from what the installed Flask has (as ctxguard
# does, but independently of it): up to 3.1 a request has a request context
# over an app context; Flask 3.2 merged them into one AppContext class that
# holds the request when there is one.
MERGED = "_cv_request" not in vars(flask.globals)
#: The context variables, innermost first (one on the merged model).
CONTEXT_VARS = (
    (flask.globals._cv_app,)
    if MERGED
    else (
        vars(flask.globals)["_cv_request"],
        flask.globals._cv_app,
    )
)
#: The context classes Flask defines.
CONTEXT_CLASSES = (
    (flask.ctx.AppContext,)
    if MERGED
    else (
        flask.ctx.AppContext,
        vars(flask.ctx)["RequestContext"],
    )
)
#: Pushes (and pops) of each kind for one request served without a context already pushed.
REQUEST_PUSHES = {"request": 1} if MERGED else {"app": 1, "request": 1}


def context_kind(ctx: Any) -> str:
    """``request`` or ``app``: the class up to Flask 3.1, what it holds on 3.2."""
    if MERGED:
        return "request" if ctx.has_request else "app"
    return "app" if isinstance(ctx, flask.ctx.AppContext) else "request"


def reset_contexts() -> list[str]:
    """Unset the contexts current on this thread without Flask's pop (no hook,
    no teardown runs); the kinds found, innermost first."""
    left = []
    for var in CONTEXT_VARS:
        for _ in range(100):
            ctx = var.get(None)
            if ctx is None:
                break
            if MERGED:
                token = ctx._cv_token
                if token is None:
                    break
                ctx._cv_token, ctx._push_count = None, 0
            else:
                tokens = getattr(ctx, "_cv_tokens", None)
                if not tokens:
                    break
                token = tokens.pop()
                token = token[0] if isinstance(token, tuple) else token
            kind = context_kind(ctx)
            left.append(kind)
            try:
                var.reset(token)
            except ValueError:
                left.append(f"{kind}: not resettable here")
                break
    return left


_IDS = re.compile(r"0x[0-9a-fA-F]+|(?<=Context )[0-9]{6,}(?= of )")


def without_ids(text: str) -> str:
    """``text`` without object addresses: a default ``repr``'s ``0x...`` and the
    ``id()`` Flask 3.2's contexts show in theirs (two runs never share them)."""
    return _IDS.sub("<id>", text)


def read_and_close_streams(client: Any) -> None:
    """Flask's own ``test_async_view`` sequence against ``/``, a ``stream_with_context``
    body that yields ``flask``: closed unread, read, then each again inside
    ``with client:`` (one context pushed by the request, the stream and the client)."""
    client.get().close()
    assert client.get().text == "flask"
    with client:
        client.get().close()
    with client:
        assert client.get().text == "flask"


def wrong_pop(kind: str = "app") -> Any:
    """``pytest.raises`` for Flask's complaint about a context popped out of order:
    an ``AssertionError`` after the pop up to Flask 3.1, a ``RuntimeError``
    refusing it on 3.2 (whose message names no kind)."""
    if MERGED:
        return pytest.raises(RuntimeError, match="it is not the active context")
    return pytest.raises(AssertionError, match=f"Popped wrong {kind} context")


def make_app(**config: Any) -> Flask:
    """A small app with the routes most tests need."""
    app = Flask("testapp")
    app.config.update(config)
    app.teardowns = []  # type: ignore[attr-defined]

    @app.teardown_appcontext
    def record_teardown(exc: BaseException | None) -> None:
        app.teardowns.append(exc)  # type: ignore[attr-defined]

    @app.route("/")
    def index() -> str:
        return "hello"

    @app.route("/items/<int:item_id>")
    def item(item_id: int) -> str:
        return f"item {item_id}"

    return app


def environ(path: str = "/", method: str = "GET", **extra: Any) -> dict[str, Any]:
    """A minimal but complete WSGI environ."""
    env = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(),
        "wsgi.errors": io.StringIO(),
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    env.update(extra)
    return env


def call(wsgi_app: Any, path: str = "/", **extra: Any) -> tuple[str, list[Any], bytes]:
    """Run one request to completion the way a WSGI server does."""
    status_headers: list[Any] = []

    def start_response(status: str, headers: list[Any], exc_info: Any = None) -> None:
        status_headers[:] = [status, headers]

    body = wsgi_app(environ(path, **extra), start_response)
    try:
        data = b"".join(body)
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()
    return status_headers[0], status_headers[1], data


def line_of(path: str, marker: str) -> int:
    """The line number of the only line of ``path`` containing ``marker`` (a comment)."""
    with open(path, encoding="utf-8") as f:
        found = [n for n, text in enumerate(f, start=1) if marker in text]
    assert len(found) == 1, f"{marker!r} found {len(found)} times in {path}"
    return found[0]
