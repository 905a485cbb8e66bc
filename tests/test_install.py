"""Process hooks: install/uninstall, idempotent wiring, disabling, global providers, snapshot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from typing import Any

import flask
import pytest
from flask.ctx import AppContext, RequestContext
from helpers import call, line_of, make_app

import ctxguard

PUSHES = "ctxguard.context.pushes"
LEAKS = "ctxguard.context.leaks"
APP = {"ctxguard.context.kind": "app"}
HOOKED = [
    (AppContext, "push"),
    (AppContext, "pop"),
    (RequestContext, "push"),
    (RequestContext, "pop"),
]


def patched_objects() -> list[Any]:
    return [vars(cls)[name] for cls, name in HOOKED]


def all_same(now: list[Any], then: list[Any]) -> bool:
    """Every attribute is the very object it was (identity, not equality)."""
    return all(a is b for a, b in zip(now, then, strict=True))


def none_same(now: list[Any], then: list[Any]) -> bool:
    return not any(a is b for a, b in zip(now, then, strict=True))


def leaky_app() -> flask.Flask:
    """An app with a view that pushes an app context and never pops it."""
    app = make_app()
    app.view_calls = 0  # type: ignore[attr-defined]

    @app.route("/leak")
    def leak() -> str:
        app.view_calls += 1  # type: ignore[attr-defined]
        app.app_context().push()
        return "leaked"

    @app.route("/boom")
    def boom() -> str:
        app.view_calls += 1  # type: ignore[attr-defined]
        raise ValueError("boom")

    return app


def test_install_twice_patches_once(telemetry):
    """A second install() (two libraries, or an app plus a worker hook) must not wrap the
    wrappers: every push would be counted twice and cost twice."""
    originals = patched_objects()
    assert ctxguard.install(**telemetry.providers) is True
    first = patched_objects()
    assert ctxguard.install() is True
    assert patched_objects() == first
    assert all_same(patched_objects(), first)
    assert none_same(first, originals)

    with make_app().app_context():
        pass
    assert telemetry.value(PUSHES, APP) == 1


def test_uninstall_restores_the_very_objects(telemetry):
    """uninstall() must leave Flask exactly as it found it, down to object identity,
    so other tools that compare or re-wrap these methods are not confused."""
    originals = patched_objects()
    ctxguard.install(**telemetry.providers)
    assert none_same(patched_objects(), originals)
    ctxguard.uninstall()
    for (cls, name), original in zip(HOOKED, originals, strict=True):
        assert vars(cls)[name] is original, f"{cls.__name__}.{name} not restored"
    ctxguard.uninstall()  # a second uninstall is harmless
    for (cls, name), original in zip(HOOKED, originals, strict=True):
        assert vars(cls)[name] is original


def test_install_uninstall_install_counts_again(telemetry):
    """Hooks can be put back after being removed (worker restarts, test suites) and count
    from a clean slate, once per push."""
    originals = patched_objects()
    app = make_app()
    ctxguard.install(**telemetry.providers)
    ctxguard.uninstall()
    with app.app_context():
        pass  # not counted: ctxguard is not installed
    ctxguard.install(**telemetry.providers)
    assert none_same(patched_objects(), originals)
    with app.app_context():
        pass
    assert telemetry.value(PUSHES, APP) == 1
    ctxguard.uninstall()
    assert all_same(patched_objects(), originals)


def test_init_app_twice_wraps_once(telemetry):
    """init_app called twice (factory code run again, two CtxGuard objects) must not stack
    two middlewares on app.wsgi_app."""
    app = make_app()
    original = app.wsgi_app
    guard = ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    wrapped = app.wsgi_app
    assert isinstance(wrapped, ctxguard.CtxGuardMiddleware)
    assert wrapped.wsgi_app == original
    guard.init_app(app)
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    assert app.wsgi_app is wrapped
    status, _, body = call(app)
    assert (status, body) == ("200 OK", b"hello")


def test_two_middlewares_report_a_leak_once(telemetry):
    """An app guarded by CtxGuard and again by a hand-made middleware reports each leak once:
    the inner middleware passes through instead of counting it a second time."""
    app = leaky_app()
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    app.wsgi_app = ctxguard.CtxGuardMiddleware(
        app.wsgi_app, app=app, environment="production", **telemetry.providers
    )
    with pytest.raises(AssertionError, match="Popped wrong app context"):
        call(app, "/leak")
    assert app.view_calls == 1  # type: ignore[attr-defined]
    assert telemetry.value(LEAKS) == 1
    assert len(telemetry.spans("ctxguard.context_leak")) == 1


def test_a_guarded_app_after_uninstall_behaves_as_bare(telemetry):
    """After uninstall() the middleware left in app.wsgi_app must be a plain pass-through:
    each request runs the view once and its exception reaches the caller unchanged."""
    app = leaky_app()
    app.testing = True
    ctxguard.CtxGuard(app, **telemetry.providers)
    ctxguard.uninstall()
    with pytest.raises(ValueError, match=r"^boom$"):
        call(app, "/boom")
    assert app.view_calls == 1  # type: ignore[attr-defined]
    with pytest.raises(AssertionError, match="Popped wrong app context"):
        call(app, "/leak")
    assert app.view_calls == 2  # type: ignore[attr-defined]


def test_disabled_patches_nothing(monkeypatch, telemetry, global_telemetry):
    """CTXGUARD_DISABLED=1 is the kill switch: no hook in Flask, app.wsgi_app left alone,
    nothing reported (switched off, ctxguard takes no provider of its own, so a report
    could only go to the global providers: those are read too)."""
    monkeypatch.setenv("CTXGUARD_DISABLED", "1")
    originals = patched_objects()
    app = leaky_app()
    ctxguard.CtxGuard(app, **telemetry.providers)
    assert "wsgi_app" not in vars(app)
    assert "ctxguard" not in app.extensions
    assert ctxguard.install(**telemetry.providers) is False
    assert all_same(patched_objects(), originals)
    middleware = ctxguard.CtxGuardMiddleware(app.wsgi_app, app=app, **telemetry.providers)
    assert all_same(patched_objects(), originals)
    with pytest.raises(AssertionError, match="Popped wrong app context"):
        call(middleware, "/leak")
    assert telemetry.value(LEAKS) == 0
    assert telemetry.value(PUSHES) == 0
    assert telemetry.spans() == []
    assert global_telemetry.value(LEAKS) == 0
    assert global_telemetry.spans() == []
    assert ctxguard.snapshot()["workers"] == []


LATE_PROVIDERS = textwrap.dedent(
    """
    import json

    import flask

    import ctxguard

    # ctxguard is imported, installed and wired into an app before any provider exists.
    ctxguard.install()
    app = flask.Flask("late")

    @app.route("/leak")
    def leak():
        app.app_context().push()
        return "leaked"

    ctxguard.CtxGuard(app, environment="production")

    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(tracer_provider)
    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))

    try:
        app.test_client().get("/leak")
    except AssertionError:
        pass
    with app.app_context():
        pass

    values = {}
    for rm in reader.get_metrics_data().resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                values[m.name] = sum(
                    p.value
                    for p in m.data.data_points
                    if p.attributes.get("ctxguard.context.kind") == "app"
                )
    spans = [s.name for s in exporter.get_finished_spans()]
    print(json.dumps({"metrics": values, "spans": spans}))
    """
)


def test_global_providers_set_later_are_used():
    """OpenTelemetry is often configured after the app module imported ctxguard (an
    instrumentation entry point, a settings module): telemetry must reach those providers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CTXGUARD_", "OTEL_"))}
    result = subprocess.run(
        [sys.executable, "-c", LATE_PROVIDERS],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["spans"] == ["ctxguard.context_leak"]
    assert found["metrics"]["ctxguard.context.leaks"] == 1
    # The request's app context, the leaked one, and the one in the `with` block.
    assert found["metrics"]["ctxguard.context.pushes"] == 3


def test_snapshot_shows_a_context_pushed_in_user_code(telemetry):
    """snapshot() answers "which contexts are open, who pushed them" for a debug endpoint or
    a signal handler, so it must name the user's line and survive json.dumps."""
    ctxguard.install(**telemetry.providers)
    ctx = make_app().app_context()
    ctx.push()  # push-site: snapshot
    try:
        snap = ctxguard.snapshot()
        text = json.dumps(snap)
    finally:
        ctx.pop()
    assert json.loads(text) == snap
    contexts = [c for w in snap["workers"] for c in w["contexts"]]
    assert len(contexts) == 1
    found = contexts[0]
    assert found["kind"] == "app"
    assert found["file"] == __file__
    assert found["line"] == line_of(__file__, "# push-site: " + "snapshot")
    assert found["function"] == "test_snapshot_shows_a_context_pushed_in_user_code"
    assert isinstance(found["age"], float) and found["age"] >= 0
    assert found["request"] is None
    (worker,) = snap["workers"]
    assert worker["thread_id"] == threading.get_ident()

    after = ctxguard.snapshot()
    assert [c for w in after["workers"] for c in w["contexts"]] == []


def test_snapshot_from_another_thread_sees_a_worker_thread(telemetry):
    """A snapshot is taken from a thread other than the one holding the context (a
    monitoring thread, a signal handler): every worker's contexts must be listed."""
    ctxguard.install(**telemetry.providers)
    app = make_app()
    pushed = threading.Event()
    release = threading.Event()
    errors: list[BaseException] = []

    def work() -> None:
        try:
            ctx = app.app_context()
            ctx.push()  # push-site: worker thread
            pushed.set()
            release.wait(60)
            ctx.pop()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
            pushed.set()

    thread = threading.Thread(target=work, name="ctx-holder")
    thread.start()
    try:
        assert pushed.wait(60)
        snap = ctxguard.snapshot()
        json.dumps(snap)
    finally:
        release.set()
        thread.join(60)
    assert errors == []
    workers = [w for w in snap["workers"] if w["thread_name"] == "ctx-holder"]
    assert len(workers) == 1
    assert workers[0]["thread_id"] == thread.ident
    (found,) = workers[0]["contexts"]
    assert found["kind"] == "app"
    assert found["file"] == __file__
    assert found["line"] == line_of(__file__, "# push-site: " + "worker thread")
    assert found["function"] in (work.__name__, work.__qualname__)
    assert found["request"] is None
    assert [c for w in ctxguard.snapshot()["workers"] for c in w["contexts"]] == []


def test_unhookable_flask_is_logged_and_left_alone(monkeypatch, telemetry, caplog_ctxguard):
    """If Flask's internals ever cannot be hooked, CtxGuard(app) still starts, every
    attribute is left as it was, requests pass through, and the problem is logged."""
    from ctxguard import ledger

    before = {name: vars(flask.ctx.AppContext)[name] for name in ("push", "pop")}

    def broken_hooks():
        yield flask.ctx.AppContext, "push", lambda self: None
        raise RuntimeError("Flask changed")

    monkeypatch.setattr(ledger, "hooks", broken_hooks)
    app = make_app()
    ctxguard.CtxGuard(app, **telemetry.providers)
    assert {name: vars(flask.ctx.AppContext)[name] for name in ("push", "pop")} == before
    assert call(app, "/")[2] == b"hello"
    logged = [r.getMessage() for r in caplog_ctxguard.records]
    assert any("internal error in install" in m and "RuntimeError" in m for m in logged), logged
