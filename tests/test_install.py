"""Process hooks: install/uninstall, idempotent wiring, disabling, global providers, snapshot."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import warnings
from typing import Any

import flask
import pytest
from helpers import CONTEXT_CLASSES, MERGED, REQUEST_PUSHES, call, line_of, make_app, wrong_pop

import ctxguard

PUSHES = "ctxguard.context.pushes"
LEAKS = "ctxguard.context.leaks"
APP = {"ctxguard.context.kind": "app"}
KINDS = ("app", "request")
HOOKED = [(cls, name) for cls in CONTEXT_CLASSES for name in ("push", "pop")]


def patched_objects() -> list[Any]:
    return [vars(cls)[name] for cls, name in HOOKED]


def all_same(now: list[Any], then: list[Any]) -> bool:
    """Every attribute is the very object it was (identity, not equality)."""
    return all(a is b for a, b in zip(now, then, strict=True))


def none_same(now: list[Any], then: list[Any]) -> bool:
    return not any(a is b for a, b in zip(now, then, strict=True))


#: Contexts left open by a request to ``/leak``, by kind: the view's app context, and on
#: Flask 3.2 the request's own context too (Flask refuses to pop it from under the view's,
#: up to 3.1 it pops it anyway and complains).
LEAKED_BY_LEAK = {"app": 1, "request": 1 if MERGED else 0}


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


def test_uninstall_leaves_every_context_class_and_flask_ctx_as_they_were(telemetry):
    """uninstall() puts back exactly what each of Flask's context classes held in its
    ``__dict__`` (the same names, the very same objects) and leaves ``flask.ctx``'s
    namespace as it was. On Flask 3.2, where one ``AppContext`` class serves both kinds,
    the deprecated ``RequestContext`` alias is left alone: never set, still Flask's own
    name for ``AppContext`` itself, while installed and after."""
    import flask.ctx

    def dicts() -> list[dict[str, Any]]:
        return [dict(vars(cls)) for cls in CONTEXT_CLASSES] + [dict(vars(flask.ctx))]

    def same(now: dict[str, Any], then: dict[str, Any]) -> bool:
        return now.keys() == then.keys() and all(now[k] is then[k] for k in then)

    def request_context_alias() -> Any:
        with pytest.warns(DeprecationWarning, match="'RequestContext' has merged"):
            return flask.ctx.RequestContext

    before = dicts()
    ctxguard.install(**telemetry.providers)
    hooked = dicts()
    assert not all(map(same, hooked, before))
    for now, then in zip(hooked[:-1], before[:-1], strict=True):  # only push and pop replaced
        assert sorted(k for k in then if now[k] is not then[k]) == ["pop", "push"]
    assert same(hooked[-1], before[-1])  # nothing set in flask.ctx
    if MERGED:
        assert "RequestContext" not in vars(flask.ctx)
        assert request_context_alias() is flask.ctx.AppContext
    with make_app().test_request_context("/"):
        pass
    ctxguard.uninstall()
    assert all(map(same, dicts(), before))
    if MERGED:
        assert request_context_alias() is flask.ctx.AppContext


def test_each_context_class_is_hooked_once(telemetry):
    """Push and pop are hooked exactly once per context class Flask has (two up to Flask
    3.1; one on 3.2, where ``RequestContext`` is only another name for ``AppContext``):
    each hook wraps Flask's own method directly; a request through the test client counts
    exactly the contexts Flask pushes for it, each popped ``ok`` once; and a context left
    open is one leak, of its own kind only (not once as ``app`` and again as
    ``request``)."""
    originals = patched_objects()
    app = make_app()

    @app.route("/work")
    def work() -> str:
        thread = threading.Thread(target=lambda: app.app_context().push())  # push: hooked once
        thread.start()
        thread.join()
        return "done"

    ctxguard.install(**telemetry.providers)
    for hooked, original in zip(patched_objects(), originals, strict=True):
        assert hooked.__wrapped__ is original
    response = app.test_client().get("/")
    assert response.status_code == 200
    response.close()
    for kind in KINDS:
        attributes = {"ctxguard.context.kind": kind}
        assert telemetry.value(PUSHES, attributes) == REQUEST_PUSHES.get(kind, 0)
        outcome = {**attributes, "ctxguard.pop.outcome": "ok"}
        assert telemetry.value("ctxguard.context.pops", outcome) == REQUEST_PUSHES.get(kind, 0)
    assert telemetry.value("ctxguard.context.pops") == sum(REQUEST_PUSHES.values())
    assert telemetry.value("ctxguard.context.open") == 0
    app.test_client().get("/work").close()
    (span,) = telemetry.spans("ctxguard.context_leak")
    assert span.attributes["ctxguard.context.kind"] == "app"
    assert span.attributes["code.line.number"] == line_of(__file__, "# push: " + "hooked once")
    assert telemetry.value(LEAKS, APP) == 1
    assert telemetry.value(LEAKS) == 1


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
    with wrong_pop():
        call(app, "/leak")
    assert app.view_calls == 1  # type: ignore[attr-defined]
    leaked = {kind: telemetry.value(LEAKS, {"ctxguard.context.kind": kind}) for kind in KINDS}
    assert leaked == LEAKED_BY_LEAK
    spans = telemetry.spans("ctxguard.context_leak")
    assert sorted(s.attributes["ctxguard.context.kind"] for s in spans) == [
        kind for kind in KINDS if LEAKED_BY_LEAK[kind]
    ]


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
    with wrong_pop():
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
    with wrong_pop():
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
    except WRONG_POP:
        pass
    with app.app_context():
        pass

    values = {}
    for rm in reader.get_metrics_data().resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                for kind in ("app", "request"):
                    values[f"{m.name} {kind}"] = sum(
                        p.value
                        for p in m.data.data_points
                        if p.attributes.get("ctxguard.context.kind") == kind
                    )
    spans = [s.name for s in exporter.get_finished_spans()]
    print(json.dumps({"metrics": values, "spans": spans}))
    """
)


def test_global_providers_set_later_are_used():
    """OpenTelemetry is often configured after the app module imported ctxguard (an
    instrumentation entry point, a settings module): telemetry must reach those providers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CTXGUARD_", "OTEL_"))}
    # Flask's complaint about the request's own context, popped from under the view's:
    # up to 3.1 an AssertionError after the pop, on 3.2 a RuntimeError refusing it.
    script = LATE_PROVIDERS.replace("WRONG_POP", "RuntimeError" if MERGED else "AssertionError")
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["spans"] == ["ctxguard.context_leak"] * sum(LEAKED_BY_LEAK.values())
    for kind in KINDS:
        assert found["metrics"][f"ctxguard.context.leaks {kind}"] == LEAKED_BY_LEAK[kind]
    # The request's own contexts, the leaked one, and the one in the `with` block.
    assert found["metrics"]["ctxguard.context.pushes app"] == REQUEST_PUSHES.get("app", 0) + 2
    assert found["metrics"]["ctxguard.context.pushes request"] == REQUEST_PUSHES["request"]


NO_DEPRECATED_NAMES = textwrap.dedent(
    """
    import json
    import logging
    import threading

    import flask

    import ctxguard

    logged = []


    class Keep(logging.Handler):
        def emit(self, record):
            logged.append(record.getMessage())


    logging.getLogger("ctxguard").addHandler(Keep(logging.DEBUG))
    logging.getLogger("ctxguard").setLevel(logging.DEBUG)
    app = flask.Flask("strict")
    ran = []


    @app.route("/")
    def index():
        thread = threading.Thread(target=lambda: ran.append(flask.current_app.name))
        thread.start()
        thread.join()
        return "ok"


    ctxguard.CtxGuard(app, propagate="app")
    installed = ctxguard.install()
    response = app.test_client().get("/")
    snapshot = ctxguard.snapshot()
    ctxguard.uninstall()
    print(json.dumps({
        "installed": installed,
        "status": response.status_code,
        "ran": ran,
        "workers": snapshot["workers"],
        "logged": logged,
    }))
    """
)


def test_nothing_ctxguard_does_reads_a_deprecated_name():
    """A process run with ``-W error::DeprecationWarning`` (deprecations as errors, as
    many test suites run): importing ctxguard, ``CtxGuard(app)``, ``install()``, a request
    through the test client whose view starts a thread, ``snapshot()`` and ``uninstall()``
    raise no warning and log no internal error of ctxguard's, on every Flask (on 3.2,
    ``flask.ctx.RequestContext`` and ``flask.globals.request_ctx`` are deprecated
    aliases: ctxguard never reads them)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CTXGUARD_", "OTEL_"))}
    result = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", NO_DEPRECATED_NAMES],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["installed"] is True
    assert found["status"] == 200
    assert found["ran"] == ["strict"]  # the thread ran in the app context ctxguard pushed
    assert found["workers"] == []
    assert [m for m in found["logged"] if "internal error" in m] == []
    # Its two start-up lines, and nothing else.
    assert [m.split(" (pid ")[0].split(": environment=")[0] for m in found["logged"]] == [
        "ctxguard: process hooks installed",
        "ctxguard: guarding strict",
    ]


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


# --------------------------------------------------------------------------
# A worker process forked from the master (gunicorn after ``--preload``).


class HeldOnce(logging.Handler):
    """A log handler whose first record waits for ``gate``: the thread logging it is held
    there, inside ``install()``, which logs its start-up line before it returns."""

    def __init__(self, inside: threading.Event, gate: threading.Event) -> None:
        super().__init__(logging.INFO)
        self.inside, self.gate = inside, gate
        self.held = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.held:
            self.held = True
            self.inside.set()
            self.gate.wait(10)


def forked_worker_uses_ctxguard(app: flask.Flask) -> bool:
    """What a forked worker does: install, push a context, see it in a snapshot, uninstall."""
    if not ctxguard.install():
        return False
    with app.app_context():  # push-site: forked worker
        mine = [
            c
            for w in ctxguard.snapshot()["workers"]
            for c in w["contexts"]
            if c["file"] == __file__
        ]
    ctxguard.uninstall()
    return [c["line"] for c in mine] == [line_of(__file__, "# push-site: " + "forked worker")]


def fork_a_worker(app: flask.Flask) -> int:
    """Fork a worker that runs ``forked_worker_uses_ctxguard``; its exit status (the
    worker is killed after 30 s if stuck)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads, 3.12+
        pid = os.fork()
    if pid == 0:  # the worker: never returns into pytest
        code = 1
        try:
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.alarm(30)
            code = 0 if forked_worker_uses_ctxguard(app) else 2
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_worker_forked_while_the_master_installs_can_use_ctxguard(telemetry, caplog):
    """A worker process forked while another thread of the master is inside ``install()``
    (a server forking its workers after loading the app): the worker is not stuck on the
    master's half-finished call, so ``install()``, ``snapshot()`` and ``uninstall()`` work
    there. The worker's exit status says so (it is killed after 30 s if stuck)."""
    caplog.set_level(logging.INFO, logger="ctxguard")
    app = make_app()
    inside, gate = threading.Event(), threading.Event()
    handler = HeldOnce(inside, gate)
    logging.getLogger("ctxguard").addHandler(handler)
    installed: list[bool] = []
    master = threading.Thread(
        target=lambda: installed.append(ctxguard.install(**telemetry.providers))
    )
    try:
        master.start()
        assert inside.wait(10)  # the master thread is inside install() now
        status = fork_a_worker(app)
    finally:
        gate.set()
        master.join(10)
        logging.getLogger("ctxguard").removeHandler(handler)

    assert os.waitstatus_to_exitcode(status) == 0
    assert installed == [True]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_worker_forked_while_the_master_makes_its_instruments_can_use_ctxguard(telemetry):
    """The same while the master's thread is inside the meter provider, making ctxguard's
    instruments: the worker does not wait for ever on what the master held at the fork."""
    from opentelemetry.sdk.metrics import MeterProvider

    app = make_app()
    inside, gate = threading.Event(), threading.Event()
    master_pid = os.getpid()

    class SlowMeterProvider(MeterProvider):
        def get_meter(self, *args: Any, **kwargs: Any) -> Any:
            if os.getpid() == master_pid:  # held in the master only
                inside.set()
                gate.wait(10)
            return super().get_meter(*args, **kwargs)

    master = threading.Thread(target=lambda: ctxguard.install(meter_provider=SlowMeterProvider()))
    try:
        master.start()
        assert inside.wait(10)  # the master thread is making the instruments now
        status = fork_a_worker(app)
    finally:
        gate.set()
        master.join(10)
    assert os.waitstatus_to_exitcode(status) == 0


# --------------------------------------------------------------------------
# Something replaced a hook again after ctxguard patched it.


def test_uninstall_leaves_newer_replacements_in_place_and_says_so(
    monkeypatch, telemetry, caplog_ctxguard
):
    """Tools that replaced ``Thread.start`` and ``ThreadPoolExecutor.submit`` after ctxguard
    patched them keep their replacements when ctxguard is uninstalled (putting the originals
    back would remove them); one line names each attribute, and every other hook is still
    put back."""
    from concurrent.futures import ThreadPoolExecutor

    originals = patched_objects()
    monkeypatch.setattr(threading.Thread, "start", vars(threading.Thread)["start"])
    monkeypatch.setattr(ThreadPoolExecutor, "submit", vars(ThreadPoolExecutor)["submit"])
    ctxguard.install(**telemetry.providers)
    our_start = vars(threading.Thread)["start"]
    our_submit = vars(ThreadPoolExecutor)["submit"]

    def newer_start(self: Any) -> None:
        our_start(self)

    def newer_submit(self: Any, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        return our_submit(self, fn, *args, **kwargs)

    threading.Thread.start = newer_start  # type: ignore[method-assign]
    ThreadPoolExecutor.submit = newer_submit  # type: ignore[method-assign]
    ctxguard.uninstall()

    assert vars(threading.Thread)["start"] is newer_start
    assert vars(ThreadPoolExecutor)["submit"] is newer_submit
    assert all_same(patched_objects(), originals)
    assert [r.getMessage() for r in caplog_ctxguard.records] == [
        f"ctxguard: {cls}.{name} was replaced again after ctxguard patched it;"
        " leaving the newer one in place"
        for cls, name in (("ThreadPoolExecutor", "submit"), ("Thread", "start"))
    ]


def test_uninstall_leaves_a_proxys_newer_lookup_in_place_and_says_so(telemetry, caplog_ctxguard):
    """Another tool replaced ``request``'s lookup after ctxguard: ``uninstall()`` leaves it
    (one line naming it, without asking the proxy anything, which would look up a request
    that is not there) and puts every other hook back."""
    werkzeugs = object.__getattribute__(flask.request, "_get_current_object")
    originals = patched_objects()
    ctxguard.install(**telemetry.providers)
    ours = object.__getattribute__(flask.request, "_get_current_object")
    theirs = lambda: ours()  # noqa: E731
    object.__setattr__(flask.request, "_get_current_object", theirs)
    try:
        ctxguard.uninstall()
        assert object.__getattribute__(flask.request, "_get_current_object") is theirs
        assert all_same(patched_objects(), originals)
        assert [
            r.getMessage() for r in caplog_ctxguard.records if "replaced again" in r.getMessage()
        ] == [
            "ctxguard: LocalProxy._get_current_object was replaced again after ctxguard"
            " patched it; leaving the newer one in place"
        ]
    finally:
        object.__setattr__(flask.request, "_get_current_object", werkzeugs)


# --------------------------------------------------------------------------
# The line install() logs.


def test_install_logs_its_process_and_in_app_settings_once(monkeypatch, telemetry, caplog):
    """``install()`` (a worker or a script, no guard) logs one INFO line with the process id
    and the in-app module settings in effect and where each came from; installing again
    logs nothing more."""
    caplog.set_level(logging.INFO, logger="ctxguard")
    monkeypatch.delenv("CTXGUARD_IN_APP_INCLUDE", raising=False)
    monkeypatch.setenv("CTXGUARD_IN_APP_EXCLUDE", "vendored, legacy.tasks")
    assert ctxguard.install(in_app_include=["myapp", "mylib.tasks"], **telemetry.providers)
    assert ctxguard.install(**telemetry.providers)
    ctxguard.uninstall()
    monkeypatch.delenv("CTXGUARD_IN_APP_EXCLUDE")
    assert ctxguard.install(in_app_exclude=["vendored"], **telemetry.providers)
    ctxguard.uninstall()
    assert ctxguard.install(**telemetry.providers)

    lines = [r.getMessage() for r in caplog.records if r.name == "ctxguard"]
    pid = os.getpid()
    assert lines == [
        f"ctxguard: process hooks installed (pid {pid}); in_app_include=myapp,mylib.tasks"
        " (argument), in_app_exclude=vendored,legacy.tasks (CTXGUARD_IN_APP_EXCLUDE)",
        f"ctxguard: process hooks installed (pid {pid}); in_app_include=none (default),"
        " in_app_exclude=vendored (argument)",
        f"ctxguard: process hooks installed (pid {pid}); in_app_include=none (default),"
        " in_app_exclude=none (default)",
    ]


def test_install_says_false_when_flask_cannot_be_hooked(monkeypatch, telemetry):
    """``install()`` answers whether the hooks are in: when Flask's internals cannot be
    hooked it returns False, every attribute is left as it was, and a later ``install()``
    (Flask fixed) puts the hooks in."""
    from ctxguard import ledger

    originals = patched_objects()
    working_hooks = ledger.hooks

    def broken_hooks():
        yield flask.ctx.AppContext, "push", lambda self: None
        raise RuntimeError("Flask changed")

    monkeypatch.setattr(ledger, "hooks", broken_hooks)
    assert ctxguard.install(**telemetry.providers) is False
    assert all_same(patched_objects(), originals)

    monkeypatch.setattr(ledger, "hooks", working_hooks)
    assert ctxguard.install(**telemetry.providers) is True
    assert none_same(patched_objects(), originals)


def test_uninstall_puts_back_opentelemetrys_threading_wrappers(telemetry):
    """With OpenTelemetry's threading instrumentation in place before ctxguard (its wrappers
    are wrapt objects, which bind themselves even when read from the class), threads and
    tasks still run through both, uninstall puts back those very wrapper objects, and the
    instrumentation can still remove itself."""
    from concurrent.futures import ThreadPoolExecutor

    from opentelemetry.instrumentation.threading import ThreadingInstrumentor

    start, submit = vars(threading.Thread)["start"], vars(ThreadPoolExecutor)["submit"]
    instrumentor = ThreadingInstrumentor()
    instrumentor.instrument()
    try:
        wrappers = (vars(threading.Thread)["start"], vars(ThreadPoolExecutor)["submit"])
        assert wrappers[0] is not start and wrappers[1] is not submit
        ctxguard.install(**telemetry.providers)
        ran: list[str] = []
        thread = threading.Thread(target=ran.append, args=("thread",))
        thread.start()
        thread.join()
        with ThreadPoolExecutor(max_workers=1) as pool:
            pool.submit(ran.append, "task").result(10)
        assert ran == ["thread", "task"]
        ctxguard.uninstall()
        assert vars(threading.Thread)["start"] is wrappers[0]
        assert vars(ThreadPoolExecutor)["submit"] is wrappers[1]
    finally:
        instrumentor.uninstrument()
    assert vars(threading.Thread)["start"] is start
    assert vars(ThreadPoolExecutor)["submit"] is submit


def test_a_guarded_app_that_is_not_flask_needs_no_flask_attributes(telemetry):
    """``CtxGuardMiddleware(wsgi_app, app=...)`` with an application object that is not
    Flask (no import name, no root path) starts, and its responses pass through."""

    class PlainApp:
        debug = False
        testing = False

        def __call__(self, environ: Any, start_response: Any) -> list[bytes]:
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"plain"]

    plain = PlainApp()
    guarded = ctxguard.CtxGuardMiddleware(plain, app=plain, **telemetry.providers)
    assert call(guarded, "/") == ("200 OK", [("Content-Type", "text/plain")], b"plain")
