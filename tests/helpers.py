"""Small builders shared by the tests: an app, a WSGI environ, a request run to the end."""

from __future__ import annotations

import io
from typing import Any

from flask import Flask


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
