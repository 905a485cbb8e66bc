"""ctxguard in Celery: each task a unit of work, with the request that enqueued it.

Real workers: ``celery -A celery_app.make_celery worker`` (tests/celery_app, the app of
Flask's Celery guide, guarded by ctxguard) with the solo, threads, prefork and gevent
pools, against Debian's redis-server as broker and result backend (started here on
127.0.0.1, no persistence). Each worker process sets the OpenTelemetry SDK up for itself
and exports over OTLP/HTTP to a receiver in this test (tests/otlp.py), which decodes the
protobuf messages; the Flask side runs in this process, traced by
opentelemetry-instrumentation-flask, and enqueues the tasks from its views. Without
redis-server the worker tests skip, unless ``CI_REQUIRE_TOOLS`` is set (CI sets it).

In-process tests run a task as a worker's pool does (Celery's own tracer, not eagerly)
for what is checked in detail: the origin header, heal settings, other receivers that
push and pop contexts, faults, switching on and off.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("celery")
pytest.importorskip("redis")
pytest.importorskip("opentelemetry.proto")

from celery import signals
from celery.app.trace import trace_task
from celery.result import AsyncResult
from celery.utils import uuid
from flask import Flask
from otlp import attributes_of, instrument_environment, otlp_receiver, stop, wait_for

import ctxguard
from ctxguard import events
from ctxguard.integrations import celery as integration

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))  # celery_app, as the worker imports it

from celery_app import TORN_DOWN, create_app, tasks  # noqa: E402

ERRORS = "ctxguard.context.errors"
LEAKS = "ctxguard.context.leaks"
HEALED = "ctxguard.context.healed"
ERROR_SPAN = "ctxguard.context_error"
LEAK_SPAN = "ctxguard.context_leak"
REQUEST_HINT = "A Celery task runs after the request that enqueued it"
APP_HINT = "Run tasks inside the app's context"
READ_ROUTE = "/reports/<int:report_id>/read"
LEAK_ROUTE = "/reports/<int:report_id>/leak"


def task_name(name: str) -> str:
    return f"celery_app.tasks.{name}"


# --------------------------------------------------------------------------
# Redis, the workers and the web side.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Debian's redis-server on a free port of 127.0.0.1, in memory only."""
    binary = shutil.which("redis-server")
    if binary is None:
        message = "redis-server not found (Debian: apt-get install redis-server)"
        if os.environ.get("CI_REQUIRE_TOOLS"):
            pytest.fail(message + "; CI_REQUIRE_TOOLS is set")
        pytest.skip(message)
    import redis

    directory = tmp_path_factory.mktemp("redis")
    port = free_port()
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory)]
    command += ["--save", "", "--appendonly", "no"]
    with open(directory / "redis.log", "wb") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        client = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(
                        "redis-server did not start:\n" + (directory / "redis.log").read_text()
                    )
                time.sleep(0.05)
        client.close()
        yield f"redis://127.0.0.1:{port}"
    finally:
        stop(server, 10)


_databases = itertools.count(1)


@pytest.fixture
def broker(redis_url: str) -> str:
    """A Redis database of its own for each test: no task of one reaches another's worker."""
    number = next(_databases)
    assert number < 16, "redis-server has 16 databases"
    return f"{redis_url}/{number}"


@contextmanager
def worker(
    broker: str,
    pool: str,
    endpoint: str,
    log_path: Path,
    wrapper: tuple[str, ...] = (),
    **env: str,
) -> Iterator[subprocess.Popen[bytes]]:
    """``celery worker`` for tests/celery_app with this pool, exporting to ``endpoint``,
    run by the ``wrapper`` command if one is given (``opentelemetry-instrument``)."""
    executable = shutil.which("celery", path=os.path.dirname(sys.executable))
    if executable is None:
        pytest.fail("celery is a test dependency: pip install -e '.[test]'")
    environment = {
        name: value for name, value in os.environ.items() if not name.startswith("CTXGUARD_")
    }
    environment.update(
        {
            "CELERY_APP_BROKER": broker,
            "OTEL_SERVICE_NAME": "worker",
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_METRIC_EXPORT_INTERVAL": "300",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
            **env,
        }
    )
    command = [*wrapper, executable, "-A", "celery_app.make_celery", "worker", "-P", pool]
    command += ["-c", "2", "-n", f"{pool}@%h", "-l", "warning"]
    command += ["--without-heartbeat", "--without-gossip", "--without-mingle"]
    with open(log_path, "wb") as log:
        started = subprocess.Popen(
            command, cwd=TESTS, env=environment, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            yield started
        finally:
            stop(started, 30)


@pytest.fixture
def web(broker: str, telemetry: Any) -> Iterator[Flask]:
    """The app's web side in this process: its views enqueue tasks, traced by
    opentelemetry-instrumentation-flask into ``telemetry``."""
    from opentelemetry.instrumentation.flask import FlaskInstrumentor

    app = create_app(broker)
    FlaskInstrumentor().instrument_app(app, tracer_provider=telemetry.tracer_provider)
    try:
        yield app
    finally:
        FlaskInstrumentor().uninstrument_app(app)


def result(task_id: str, timeout: float = 30) -> Any:
    return AsyncResult(task_id).get(timeout=timeout)


def failure(task_id: str, timeout: float = 30) -> BaseException:
    outcome = AsyncResult(task_id)
    outcome.get(timeout=timeout, propagate=False)
    assert outcome.failed(), outcome.state
    return outcome.result  # type: ignore[no-any-return]


def server_spans(telemetry: Any) -> dict[tuple[int, int], str]:
    """(trace id, span id) of each server span of the web side, with its name."""
    return {
        (span.context.trace_id, span.context.span_id): span.name
        for span in telemetry.spans()
        if span.kind.name == "SERVER"
    }


def link_of(span: Any) -> tuple[int, int] | None:
    if not span.links:
        return None
    (link,) = span.links
    return int.from_bytes(link.trace_id, "big"), int.from_bytes(link.span_id, "big")


def heal_seen(tag: str, pid: int, log_path: Path) -> None:
    """Send probes, a few at a time so every pool thread and process gets some, until one
    in process ``pid`` reports that the teardown of the context tagged ``tag`` ran."""
    deadline = time.monotonic() + 20
    while True:
        for found_pid, _, torn_down in [
            result(probe.id) for probe in [tasks.probe.delay(0.05) for _ in range(4)]
        ]:
            if found_pid == pid and tag in torn_down:
                return
        if time.monotonic() > deadline:
            pytest.fail(f"the stale context {tag} was not healed\n{log_path.read_text()[-3000:]}")


# --------------------------------------------------------------------------
# Real workers.


@pytest.mark.parametrize("pool", ["solo", "threads", "prefork", "gevent"])
def test_a_worker_reports_what_its_tasks_do_wrong_and_nothing_else(
    pool: str, broker: str, web: Flask, telemetry: Any, tmp_path: Path
) -> None:
    """The promise for a Celery worker of any pool: a task reading ``request`` is counted
    with worker kind celery, the route of the request that enqueued it, and its span names
    the task, gives the Celery hint and links to that request's span; a plain task reading
    ``current_app`` gets the FlaskTask hint; a context a task leaves pushed is a leak at
    task_end with the task's name and the enqueuing request, and the next task on that
    thread or process pops it so its teardown runs (under gevent, where no later task
    shares the task's greenlet, at the task's end). Flask's FlaskTask pattern and tasks that never
    touch Flask are not reported, and every task's result and exception is its own."""
    if pool == "gevent":
        pytest.importorskip("gevent")
    client = web.test_client()
    log_path = tmp_path / "worker.log"
    with otlp_receiver() as (endpoint, received), worker(broker, pool, endpoint, log_path):
        reads = [client.post(f"/reports/{n}/read").get_data(as_text=True) for n in (1, 2, 3)]
        for task_id in reads:
            error = failure(task_id)
            assert type(error) is RuntimeError
            assert str(error).startswith(("Working outside of request context", "There is no"))
        assert type(failure(tasks.read_current_app.delay().id)) is RuntimeError
        for n in range(3):
            assert result(tasks.uses_app.delay(n).id) == ["celery_app", n]
            assert result(tasks.no_flask.delay(n, 1).id) == n + 1
        error = failure(tasks.fails.delay("as raised").id)
        assert (type(error), str(error)) == (ValueError, "as raised")
        leaked = client.post("/reports/9/leak").get_data(as_text=True)
        pid, _ = result(leaked)
        healed = 1
        heal_seen("report-9", pid, log_path)
        wait_for(
            lambda: (
                received.total(ERRORS) == 4
                and received.total(LEAKS) == 1
                and received.total(HEALED) == healed
                and len(received.named(LEAK_SPAN)) == 1
                and {
                    attributes_of(s.attributes)["celery.task_name"]
                    for _, s in received.named(ERROR_SPAN)
                }
                == {task_name("read_request"), task_name("read_current_app")}
            ),
            "4 errors, 1 leak and its span, both error sites' spans",
            log_path,
        )
    # The worker has stopped (and exported its last): nothing more, nothing less.
    celery_errors = {"ctxguard.worker.kind": "celery"}
    assert received.total(ERRORS) == received.total(ERRORS, **celery_errors) == 4
    read = {
        "ctxguard.proxy": "request",
        "ctxguard.context.kind": "request",
        "http.route": READ_ROUTE,
    }
    assert received.total(ERRORS, **celery_errors, **read) == 3
    app_error = {"ctxguard.proxy": "current_app", "ctxguard.context.kind": "app"}
    assert received.total(ERRORS, **celery_errors, **app_error) == 1
    assert received.total(LEAKS) == 1
    assert (
        received.total(LEAKS, **{"ctxguard.leak.site": "task_end", "ctxguard.context.kind": "app"})
        == 1
    )
    assert received.total(HEALED) == healed

    requests = server_spans(telemetry)
    for resource, span in received.named(ERROR_SPAN):
        attributes = attributes_of(span.attributes)
        assert resource["service.name"] == "worker"
        assert attributes["ctxguard.worker.kind"] == "celery"
        assert attributes["code.file.path"].endswith("tasks.py")
        if attributes["celery.task_name"] == task_name("read_request"):
            assert attributes["ctxguard.proxy"] == "request"
            assert attributes["ctxguard.hint"].startswith(REQUEST_HINT)
            assert attributes["code.function.name"] == "read_request"
            assert attributes["http.route"] == READ_ROUTE
            assert attributes["http.request.method"] == "POST"
            assert attributes["ctxguard.origin.endpoint"] == "enqueue_read"
            assert requests[link_of(span)] == f"POST {READ_ROUTE}"
        else:
            assert attributes["celery.task_name"] == task_name("read_current_app")
            assert attributes["ctxguard.proxy"] == "current_app"
            assert attributes["ctxguard.hint"].startswith(APP_HINT)
            assert "http.route" not in attributes and not span.links  # enqueued outside a request

    ((_, span),) = received.named(LEAK_SPAN)
    attributes = attributes_of(span.attributes)
    assert attributes["celery.task_name"] == task_name("leak")
    assert attributes["ctxguard.leak.site"] == "task_end"
    assert attributes["code.function.name"] == "leak"
    assert attributes["http.route"] == LEAK_ROUTE
    assert attributes["http.request.method"] == "POST"
    assert requests[link_of(span)] == f"POST {LEAK_ROUTE}"


def test_an_app_context_pushed_when_the_worker_imports_the_app_is_reported_once_never_popped(
    broker: str, web: Flask, tmp_path: Path
) -> None:
    """The promise for a worker whose app module pushes an app context at import (an
    ambient context shared by every task): reported once, at the module line that pushed
    it, not as any task's, and never popped, while a context a task leaks on top of it is
    still healed."""
    log_path = tmp_path / "worker.log"
    with (
        otlp_receiver() as (endpoint, received),
        worker(broker, "solo", endpoint, log_path, CELERY_APP_AMBIENT="1"),
    ):
        for n in range(3):
            assert result(tasks.uses_app.delay(n).id) == ["celery_app", n]
            assert result(tasks.no_flask.delay(n, 1).id) == n + 1
        pid, _ = result(tasks.leak.delay("on-top").id)
        heal_seen("on-top", pid, log_path)
        assert result(tasks.sees_app_context.delay().id) is True
        wait_for(
            lambda: received.total(LEAKS) == 2 and received.total(HEALED) == 1,
            "the ambient context and the task's leak, one healed",
            log_path,
        )
    assert received.total(LEAKS) == 2
    assert received.total(HEALED) == 1
    assert received.total(ERRORS) == 0
    spans = {
        attributes_of(span.attributes).get("celery.task_name"): attributes_of(span.attributes)
        for _, span in received.named(LEAK_SPAN)
    }
    assert set(spans) == {None, task_name("leak")}
    ambient = spans[None]
    assert ambient["code.file.path"].endswith("make_celery.py")
    assert ambient["code.function.name"] == "<module>"
    assert "http.route" not in ambient


def test_opentelemetry_instrument_guards_a_worker_with_no_ctxguard_code(
    broker: str, web: Flask, tmp_path: Path
) -> None:
    """`opentelemetry-instrument celery -A ... worker` with no line of ctxguard in the
    worker's code: the Flask app the worker makes is guarded, which switches the Celery
    integration on, and a task's error arrives with worker kind celery, its name and the
    route of the request that enqueued it, through the SDK opentelemetry-instrument set
    up."""
    command = shutil.which("opentelemetry-instrument", path=os.path.dirname(sys.executable))
    assert command is not None, "opentelemetry-instrument comes with the test extra"
    client = web.test_client()
    log_path = tmp_path / "worker.log"
    with (
        otlp_receiver() as (endpoint, received),
        worker(
            broker,
            "solo",
            endpoint,
            log_path,
            (command,),
            CELERY_APP_ZERO_CODE="1",
            **instrument_environment(tmp_path, TESTS),
        ),
    ):
        task_id = client.post("/reports/5/read").get_data(as_text=True)
        assert type(failure(task_id)) is RuntimeError
        assert result(tasks.uses_app.delay(1).id) == ["celery_app", 1]
        wait_for(lambda: received.named(ERROR_SPAN), "the task's error span", log_path)
        wait_for(lambda: received.total(ERRORS) == 1, "the error counter", log_path)
    assert "Traceback" not in log_path.read_text().split("RuntimeError")[0]
    resource, span = received.named(ERROR_SPAN)[0]
    assert resource.get("service.name") == "worker"
    attributes = attributes_of(span.attributes)
    assert attributes["ctxguard.worker.kind"] == "celery"
    assert attributes["celery.task_name"] == task_name("read_request")
    assert attributes["http.route"] == "/reports/<int:report_id>/read"
    assert received.total(ERRORS, **{"ctxguard.worker.kind": "celery"}) == 1


# --------------------------------------------------------------------------
# In this process, a task run as a worker's pool runs it.


@pytest.fixture
def local(telemetry: Any) -> Iterator[tuple[Flask, list[events.Event]]]:
    """The app with an in-memory broker, ctxguard reporting to ``telemetry``, and every
    event ctxguard reports."""
    app = create_app("memory://", "cache+memory://")
    ctxguard.install(**telemetry.providers)
    reported: list[events.Event] = []
    unsubscribe = events.subscribe(reported.append)
    try:
        yield app, reported
    finally:
        unsubscribe()


def run(task: Any, *args: Any, **headers: Any) -> Any:
    """Run ``task`` on this thread as a worker's pool does: Celery's tracer, not eagerly,
    with these message headers; its return value, or the exception it raised."""
    task = task.app.tasks[task.name]
    task_id = uuid()
    request = {
        "id": task_id,
        "task": task.name,
        "hostname": "local@test",
        "delivery_info": {"exchange": "", "routing_key": "celery", "redelivered": False},
        "is_eager": False,
        **headers,
    }
    retval, info, _, _ = trace_task(task, task_id, args, {}, request, app=task.app)
    return info.retval if info is not None else retval


def test_the_origin_header_carries_the_route_method_endpoint_and_traceparent_only(
    local: tuple[Flask, list[events.Event]], telemetry: Any
) -> None:
    """The promise about what a task message carries: the route template, method, Flask
    endpoint and the W3C traceparent of the request's span, nothing the client sent (no
    path, no query string, no body); a task enqueued outside a request carries nothing."""
    app, _ = local
    sent: list[dict[str, Any]] = []

    def capture(headers: Any = None, **kwargs: Any) -> None:
        sent.append(dict(headers))

    signals.before_task_publish.connect(capture, weak=False, dispatch_uid="test.capture")
    try:
        tracer = telemetry.tracer_provider.get_tracer("test")
        with tracer.start_as_current_span("POST /reports") as span:
            app.test_client().post("/reports/4321/read?token=s3cret", data={"card": "4111"})
        tasks.no_flask.delay(1, 2)
    finally:
        signals.before_task_publish.disconnect(dispatch_uid="test.capture")
    context = span.get_span_context()
    traceparent = f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
    assert sent[0][integration.HEADER] == {
        "route": READ_ROUTE,
        "method": "POST",
        "endpoint": "enqueue_read",
        "traceparent": traceparent,
    }
    text = repr(sent[0][integration.HEADER])
    assert "4321" not in text and "s3cret" not in text and "4111" not in text
    assert integration.HEADER not in sent[1]

    # What a worker makes of it: the origin, with a remote span context to link to.
    origin = integration.decode(sent[0][integration.HEADER])
    assert (origin.route, origin.http_method, origin.endpoint) == (
        READ_ROUTE,
        "POST",
        "enqueue_read",
    )
    assert (origin.span_context.trace_id, origin.span_context.span_id) == (
        context.trace_id,
        context.span_id,
    )
    # Anything else a broker hands over is left out, never trusted.
    for junk in (None, "x", [], {}, {"traceparent": "00-zz"}):
        decoded = integration.decode(junk)
        assert decoded is None or decoded.span_context is None
    odd = integration.decode({"method": "BREW", "route": 7, "endpoint": "e" * 10_000})
    assert (odd.http_method, odd.route, odd.endpoint) == ("_OTHER", None, None)


def test_a_task_enqueued_by_a_task_carries_the_origin_of_the_request_that_started_it(
    local: tuple[Flask, list[events.Event]],
) -> None:
    """The promise for chains of work: a task enqueued by a task (no request in the worker)
    names the request that enqueued the first one."""
    header = {"route": READ_ROUTE, "method": "GET", "endpoint": "enqueue_read"}
    sent: list[dict[str, Any]] = []

    def capture(headers: Any = None, **kwargs: Any) -> None:
        sent.append(dict(headers))

    signals.before_task_publish.connect(capture, weak=False, dispatch_uid="test.capture")
    try:
        run(tasks.fan_out, ctxguard_origin=header)
    finally:
        signals.before_task_publish.disconnect(dispatch_uid="test.capture")
    assert sent[0][integration.HEADER] == header


def test_a_stale_context_is_popped_at_the_next_task_only_where_healing_is_on(
    monkeypatch: pytest.MonkeyPatch, telemetry: Any
) -> None:
    """The promise about healing: a context a task left pushed is reported once, and the
    next task on that thread pops it so its teardown runs, unless healing is off
    (``CTXGUARD_HEAL=0``), where it is left as it is."""
    for heal in (True, False):
        if not heal:
            monkeypatch.setenv("CTXGUARD_HEAL", "0")
        create_app("memory://", "cache+memory://")
        ctxguard.install(**telemetry.providers)
        reported: list[events.Event] = []
        unsubscribe = events.subscribe(reported.append)
        try:
            tag = f"heal-{heal}"
            run(tasks.leak, tag)
            assert [e.attributes["ctxguard.leak.site"] for e in reported] == ["task_end"]
            assert reported[0].attributes["celery.task_name"] == task_name("leak")
            assert tag not in TORN_DOWN
            assert run(tasks.sees_app_context) is (not heal)
            assert (tag in TORN_DOWN) is heal
            assert len(reported) == 1  # not again
        finally:
            unsubscribe()
            ctxguard.uninstall()
            from helpers import reset_contexts

            reset_contexts()
    assert telemetry.value(HEALED) == 1


@pytest.mark.parametrize("connected", ["after", "before"])
def test_a_context_pushed_by_a_prerun_receiver_and_popped_by_a_postrun_one_is_no_leak(
    connected: str, local: tuple[Flask, list[events.Event]]
) -> None:
    """The promise for the older Flask recipe that pushes an app context in a
    ``task_prerun`` receiver and pops it in a ``task_postrun`` one, connected before or
    after ctxguard's: no leak, no ambient context, and the tasks see the context."""
    app, reported = local
    pushed: list[Any] = []

    def push(**kwargs: Any) -> None:
        ctx = app.app_context()
        ctx.push()
        pushed.append(ctx)

    def pop(**kwargs: Any) -> None:
        pushed.pop().pop()

    if connected == "before":
        integration.disable()
    signals.task_prerun.connect(push, weak=False, dispatch_uid="test.push")
    signals.task_postrun.connect(pop, weak=False, dispatch_uid="test.pop")
    integration.enable()
    try:
        for _ in range(3):
            assert run(tasks.sees_app_context) is True
            assert run(tasks.no_flask, 1, 2) == 3
    finally:
        signals.task_prerun.disconnect(dispatch_uid="test.push")
        signals.task_postrun.disconnect(dispatch_uid="test.pop")
    assert not pushed
    assert reported == []


def test_flask_tasks_and_tasks_run_eagerly_in_a_request_are_not_reported(
    local: tuple[Flask, list[events.Event]],
) -> None:
    """The promise of no false reports: Flask's FlaskTask pattern, tasks that never touch
    Flask, and tasks run eagerly (``apply()``) inside a request or an app context, whose
    contexts are the caller's."""
    app, reported = local
    for n in range(3):
        assert run(tasks.uses_app, n) == ["celery_app", n]
        assert run(tasks.no_flask, n, 1) == n + 1
    with app.test_request_context("/reports/1/read", method="POST"):
        assert tasks.uses_app.apply((1,)).get() == ["celery_app", 1]
        assert tasks.no_flask.apply((1, 1)).get() == 2
    with app.app_context():
        assert tasks.sees_app_context.apply().get() is True
    assert reported == []


def test_a_task_reading_request_is_a_celery_error_with_the_celery_hint(
    local: tuple[Flask, list[events.Event]],
) -> None:
    """The promise for the commonest mistake: the error names worker kind celery, the
    task, the request that enqueued it, and says to pass the values in as arguments."""
    _, reported = local
    header = {"route": READ_ROUTE, "method": "POST", "endpoint": "enqueue_read"}
    error = run(tasks.read_request, 7, ctxguard_origin=header)
    assert type(error) is RuntimeError
    (event,) = reported
    assert event.name == ERROR_SPAN
    assert event.attributes["ctxguard.worker.kind"] == "celery"
    assert event.attributes["celery.task_name"] == task_name("read_request")
    assert event.attributes["ctxguard.hint"].startswith(REQUEST_HINT)
    assert event.attributes["http.route"] == READ_ROUTE
    assert event.attributes["ctxguard.origin.endpoint"] == "enqueue_read"


def test_faults_inside_ctxguard_never_reach_the_task_or_celery(
    local: tuple[Flask, list[events.Event]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The fail-open promise: whatever breaks inside ctxguard's receivers, every task
    returns what it returns, raises what it raises, no receiver error reaches Celery (which
    would log it at ERROR), and ctxguard logs its own fault."""
    app, _ = local
    caplog.set_level(logging.WARNING)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise OSError("broken inside ctxguard")

    from ctxguard import ledger, threads

    monkeypatch.setattr(threads, "begin", broken)
    monkeypatch.setattr(threads, "current_origin", broken)
    monkeypatch.setattr(ledger, "mark", broken)
    assert run(tasks.uses_app, 3) == ["celery_app", 3]
    error = ValueError("as raised")
    raised = run(tasks.fails, "as raised")
    assert (type(raised), str(raised)) == (type(error), str(error))
    with app.test_request_context("/reports/1/read", method="POST"):
        tasks.no_flask.delay(1, 2)
    celery_errors = [
        r for r in caplog.records if r.name.startswith("celery") and r.levelno >= logging.ERROR
    ]
    assert not [r for r in celery_errors if "Signal handler" in r.getMessage()]
    faults = [r.getMessage() for r in caplog.records if r.name == "ctxguard"]
    assert any("internal error in celery task start" in text for text in faults)
    assert any("internal error in celery publish" in text for text in faults)


def test_enable_is_idempotent_and_disable_disconnects_everything(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The promise of switching: enable() twice connects each receiver once, disable()
    (twice, harmlessly) leaves none, and an enable() that cannot connect returns False
    and leaves nothing half-connected, without raising."""

    def ours() -> list[Any]:
        return [
            receiver
            for signal in (signals.before_task_publish, signals.task_prerun, signals.task_postrun)
            for key, receiver in signal.receivers
            if str(key[0]).startswith("ctxguard.")
        ]

    try:
        assert integration.enable() is True
        assert integration.enable() is True
        assert len(ours()) == 3
        integration.disable()
        integration.disable()
        assert ours() == []

        def refuse(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("cannot connect")

        monkeypatch.setattr(signals.task_postrun, "connect", refuse)
        assert integration.enable() is False
        assert ours() == []
    finally:
        integration.disable()


def test_install_enables_the_integration_and_uninstall_disables_it() -> None:
    """The promise of two lines of setup: with Celery imported, ``ctxguard.install()`` (as
    ``CtxGuard(app)`` calls it) connects the receivers, and ``uninstall()`` removes them."""
    integration.disable()
    ctxguard.install()
    assert any(r is integration._on_prerun for _, r in signals.task_prerun.receivers)
    ctxguard.uninstall()
    assert not any(r is integration._on_prerun for _, r in signals.task_prerun.receivers)
