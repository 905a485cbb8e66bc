"""Zero-code setup: ``opentelemetry-instrument`` guards every Flask app the process makes.

The first tests run the real command on a real server (gunicorn serving an app
with no line of ctxguard in it) and read what arrives over OTLP; the others
call the instrumentor as ``opentelemetry-instrument`` does, in this process.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

pytest.importorskip("gunicorn")
pytest.importorskip("opentelemetry.proto")
pytest.importorskip("opentelemetry.instrumentation")

from opentelemetry.instrumentation.instrumentor import BaseInstrumentor
from otlp import (
    attributes_of,
    get,
    gunicorn,
    instrument_environment,
    otlp_receiver,
    wait_for,
)

import ctxguard
from ctxguard.integrations.opentelemetry import CtxGuardInstrumentor

HERE = Path(__file__).parent / "instrument"


@contextmanager
def instrumented_gunicorn(
    endpoint: str, root: Path, log_path: Path, extra_env: dict[str, str] | None = None
) -> Iterator[int]:
    """``opentelemetry-instrument gunicorn plain_app:app``, one sync worker; yields the port."""
    command = shutil.which("opentelemetry-instrument", path=os.path.dirname(sys.executable))
    if command is None:
        pytest.fail("opentelemetry-instrument comes with the test extra: pip install -e '.[test]'")
    env = {
        # The configurator on the path; the SDK exports over OTLP/HTTP to the receiver.
        **instrument_environment(root, HERE),
        **(extra_env or {}),
    }
    with gunicorn(
        endpoint,
        [],
        log_path,
        env,
        "plain_app:app",
        app_dir=HERE,
        config=None,  # no ctxguard anywhere: opentelemetry-instrument brings it
        workers=1,
        wrapper=(command,),
    ) as port:
        yield port


def test_opentelemetry_instrument_guards_an_app_with_no_ctxguard_code(tmp_path):
    """`opentelemetry-instrument gunicorn app:app` is all it takes: ctxguard's spans and
    metrics arrive beside the Flask instrumentation's, the error span links to the
    trace of the request that started the thread, and nothing false is reported."""
    log_path = tmp_path / "gunicorn.log"
    with (
        otlp_receiver() as (endpoint, received),
        instrumented_gunicorn(endpoint, tmp_path, log_path) as port,
    ):
        for path in ("/", "/spawn", "/spawn", "/leak", "/"):
            get(port, path)
        wait_for(
            lambda: (
                received.total("ctxguard.context.errors") >= 2
                and received.total("ctxguard.context.leaks") >= 1
                and len(received.named("ctxguard.context_error")) >= 1
                and len(received.named("ctxguard.context_leak")) >= 1
            ),
            "ctxguard's counters and spans",
            log_path,
        )
    log = log_path.read_text()
    assert "Traceback" not in log, log
    assert received.total("ctxguard.context.errors") == 2
    assert received.total("ctxguard.context.errors", **{"ctxguard.worker.kind": "thread"}) == 2
    assert received.total("ctxguard.context.errors", **{"http.route": "/spawn"}) == 2
    assert received.total("ctxguard.context.leaks", **{"ctxguard.leak.site": "thread_exit"}) == 1
    assert received.total("ctxguard.context.pushes") > 0

    servers = {span.name: span for _, span in received.spans if span.kind == 2}  # SERVER
    assert "GET /spawn" in servers, sorted(servers)
    errors = received.named("ctxguard.context_error")
    resource, error = errors[0]
    assert resource.get("service.name") == "web"
    attributes = attributes_of(error.attributes)
    assert attributes["ctxguard.proxy"] == "request"
    assert attributes["http.route"] == "/spawn"
    assert attributes["code.function.name"] == "_read_request"
    assert attributes["code.file.path"].endswith("plain_app.py")
    spawn_traces = {s.trace_id for _, s in received.spans if s.name == "GET /spawn"}
    assert [link.trace_id in spawn_traces for link in error.links] == [True]


def test_disabled_instrumentations_leave_ctxguard_out(tmp_path):
    """`OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=ctxguard` turns it off: the Flask
    instrumentation still reports the requests, ctxguard reports nothing."""
    log_path = tmp_path / "gunicorn.log"
    env = {"OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "ctxguard"}
    with (
        otlp_receiver() as (endpoint, received),
        instrumented_gunicorn(endpoint, tmp_path, log_path, env) as port,
    ):
        for path in ("/spawn", "/leak", "/"):
            get(port, path)
        # ctxguard's error span ends before the response does: it would come with these.
        wait_for(
            lambda: {"GET /spawn", "GET /"} <= {span.name for _, span in received.spans},
            "the Flask instrumentation's spans",
            log_path,
        )
        time.sleep(1)  # three metric exports: ctxguard's points would be in them
    assert not [s for _, s in received.spans if s.name.startswith("ctxguard.")]
    assert not [metric for _, metric, _ in received.points if metric.startswith("ctxguard.")]


# --------------------------------------------------------------------------
# In this process, as the loader calls it.


@pytest.fixture
def instrumentor() -> Iterator[CtxGuardInstrumentor]:
    instrumentor = CtxGuardInstrumentor()
    try:
        yield instrumentor
    finally:
        instrumentor.uninstrument()


def test_the_entry_point_names_the_instrumentor():
    """The loader finds it under `opentelemetry_instrumentor` as `ctxguard` (the name
    OTEL_PYTHON_DISABLED_INSTRUMENTATIONS takes), and it is a BaseInstrumentor."""
    found = [
        ep
        for ep in importlib.metadata.entry_points(group="opentelemetry_instrumentor")
        if ep.name == "ctxguard"
    ]
    assert [ep.value for ep in found] == [
        "ctxguard.integrations.opentelemetry:CtxGuardInstrumentor"
    ]
    assert issubclass(found[0].load(), BaseInstrumentor)


def test_apps_made_after_instrument_are_guarded_and_report(instrumentor, telemetry):
    """Every Flask app made after instrument(), of any subclass, is guarded as
    CtxGuard(app) would guard it, with the providers given."""
    import flask

    instrumentor.instrument(**telemetry.providers)

    class MyFlask(Flask):
        def __init__(self, name: str) -> None:
            super().__init__(name)
            self.config["MINE"] = True

    for app in (Flask("plain"), MyFlask("subclass")):
        assert ctxguard.CtxGuard.middleware(app) is not None
        assert app.config.get("MINE", True)

        @app.route("/leak")
        def leak() -> str:
            app = flask.current_app._get_current_object()
            thread = threading.Thread(target=lambda: app.app_context().push())  # never popped
            thread.start()
            thread.join()
            return "ok"

        assert app.test_client().get("/leak").data == b"ok"
    assert telemetry.value("ctxguard.context.leaks", {"ctxguard.leak.site": "thread_exit"}) == 2
    leaks = telemetry.spans("ctxguard.context_leak")
    # One span: the second leak is at the same line within the second (rate limited).
    assert [span.attributes["http.route"] for span in leaks] == ["/leak"]


def test_instrument_twice_and_uninstrument_restore_flask_exactly(instrumentor, telemetry):
    """instrument() is idempotent; uninstrument() puts back Flask's own __init__ and
    apps made afterwards are not guarded."""
    original = vars(Flask)["__init__"]
    instrumentor.instrument(**telemetry.providers)
    instrumentor.instrument(**telemetry.providers)
    assert vars(Flask)["__init__"] is not original
    assert Flask.__init__.__wrapped__ is original
    instrumentor.uninstrument()
    assert vars(Flask)["__init__"] is original
    assert ctxguard.CtxGuard.middleware(Flask("after")) is None
    instrumentor.instrument(**telemetry.providers)
    assert ctxguard.CtxGuard.middleware(Flask("again")) is not None


def test_ctxguard_disabled_leaves_flask_alone(instrumentor, monkeypatch):
    """CTXGUARD_DISABLED=1 under opentelemetry-instrument: no hook, no guard."""
    monkeypatch.setenv("CTXGUARD_DISABLED", "1")
    original = vars(Flask)["__init__"]
    instrumentor.instrument()
    assert vars(Flask)["__init__"] is original
    assert ctxguard.CtxGuard.middleware(Flask("off")) is None


def test_instrument_never_raises(instrumentor, monkeypatch, caplog_ctxguard):
    """A failure inside instrument() is logged, never raised: the loader would stop
    loading every instrumentor after this one."""
    from ctxguard import process

    def broken(**kwargs: Any) -> bool:
        raise RuntimeError("boom")

    monkeypatch.setattr(process, "install", broken)
    instrumentor.instrument()  # does not raise
    assert "instrument" in caplog_ctxguard.text
    app = Flask("unguarded")
    assert ctxguard.CtxGuard.middleware(app) is None


def test_a_guard_that_fails_still_makes_the_app(instrumentor, telemetry, monkeypatch):
    """If guarding a new app fails, the app is made all the same, unguarded."""
    from ctxguard import extension

    instrumentor.instrument(**telemetry.providers)

    def broken(self: Any, app: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(extension.CtxGuard, "init_app", broken)
    app = Flask("made")
    app.route("/")(lambda: "ok")
    assert app.test_client().get("/").data == b"ok"
