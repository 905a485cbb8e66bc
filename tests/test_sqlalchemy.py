"""flask#6123 as users meet it: Flask-SQLAlchemy loses one connection per poisoned thread."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from flask import Flask, Response, stream_with_context
from flask_sqlalchemy import SQLAlchemy
from helpers import MERGED, call, environ
from sqlalchemy import text

import ctxguard

unraisable_ok = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def database_app(path: Any) -> tuple[Flask, SQLAlchemy]:
    app = Flask("reports")
    app.config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{path}"
    db = SQLAlchemy(app)

    @app.route("/report.csv")
    def report() -> Response:
        db.session.execute(text("select 1"))

        def rows() -> Any:
            for n in range(100):
                yield f"{n}\n"

        return Response(stream_with_context(rows()))

    @app.route("/")
    def index() -> str:
        db.session.execute(text("select 1"))
        return "ok"

    return app, db


def checked_out(app: Flask, db: SQLAlchemy) -> int:
    with app.app_context():
        return db.engine.pool.checkedout()


def poison_then_serve(app: Flask) -> None:
    """On one pooled thread: a report abandoned mid-stream and finalised on another
    thread, then three ordinary requests."""
    holder: dict[str, Any] = {}

    def start_report() -> None:
        body = app(environ("/report.csv"), lambda *args: None)
        next(iter(body))
        holder["body"] = body

    with ThreadPoolExecutor(1) as pool:
        pool.submit(start_report).result()
        with ThreadPoolExecutor(1) as finaliser:
            finaliser.submit(holder.clear).result()
        for _ in range(3):
            assert pool.submit(call, app, "/").result()[2] == b"ok"


@unraisable_ok
def test_without_ctxguard_a_connection_is_lost(tmp_path):
    """Control: the poisoned thread keeps its session, and its connection, for ever."""
    app, db = database_app(tmp_path / "db.sqlite")
    poison_then_serve(app)
    assert checked_out(app, db) == 1


@unraisable_ok
def test_with_ctxguard_no_connection_is_lost(tmp_path, telemetry):
    """With ctxguard the stale context is healed at the next request: its
    teardown_appcontext removes the session and the connection goes back to the pool."""
    app, db = database_app(tmp_path / "db.sqlite")
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    poison_then_serve(app)
    assert checked_out(app, db) == 0
    # The abandoned report's contexts: its own on Flask 3.2 (a context holding the request),
    # its request context and app context up to 3.1. Each is reported once and healed.
    kinds = ["request"] if MERGED else ["app", "request"]
    for metric in ("ctxguard.context.leaks", "ctxguard.context.healed"):
        assert telemetry.value(metric) == len(kinds)
        for kind in kinds:
            assert telemetry.value(metric, {"ctxguard.context.kind": kind}) == 1
