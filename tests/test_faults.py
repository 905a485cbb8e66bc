"""Faults: nothing ctxguard gets wrong may change what the application does or answers.

Each fault is injected for real (a provider, processor, exporter or app option that
raises) and the same requests are run through the same app without ctxguard: responses
must be byte-identical, exceptions the same, and the fault logged but not flooded.
"""

from __future__ import annotations

import builtins
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import flask
import pytest
from flask import Config, Flask, appcontext_pushed
from flask.globals import _cv_app
from helpers import CONTEXT_VARS, MERGED, environ, line_of, make_app, without_ids
from opentelemetry.metrics import NoOpCounter, NoOpMeter, NoOpMeterProvider
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

import ctxguard

PRESERVE_KEY = "werkzeug.debug.preserve_context"
REPEAT = 5


class InjectedFault(RuntimeError):
    """The failure a test plants inside ctxguard's path."""


# -- broken telemetry


class RaisingCounter(NoOpCounter):
    def add(self, *args: Any, **kwargs: Any) -> None:
        raise InjectedFault("counter.add")


class MeterWithRaisingCounters(NoOpMeter):
    def create_counter(self, *args: Any, **kwargs: Any) -> Any:
        return RaisingCounter("broken")


class MeterThatCannotCreate(NoOpMeter):
    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise InjectedFault("create instrument")

    create_counter = _refuse
    create_up_down_counter = _refuse
    create_histogram = _refuse
    create_observable_counter = _refuse
    create_observable_up_down_counter = _refuse
    create_observable_gauge = _refuse


class MeterProviderRaisingOnAdd(NoOpMeterProvider):
    def get_meter(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return MeterWithRaisingCounters(name)


class MeterProviderRaisingOnCreate(NoOpMeterProvider):
    def get_meter(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return MeterThatCannotCreate(name)


class MeterProviderRaisingOnGetMeter(NoOpMeterProvider):
    def get_meter(self, *args: Any, **kwargs: Any) -> Any:
        raise InjectedFault("get_meter")


class RaisingProcessor(SpanProcessor):
    def __init__(self, on: str) -> None:
        self.on = on

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        if self.on == "start":
            raise InjectedFault("span processor on_start")

    def on_end(self, span: Any) -> None:
        if self.on == "end":
            raise InjectedFault("span processor on_end")


class RaisingExporter(SpanExporter):
    def __init__(self) -> None:
        self.calls = 0

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        self.calls += 1
        raise InjectedFault("exporter")


def tracer_with(processor: SpanProcessor) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(processor)
    return provider


# -- a bad option found at run time


class TrapConfig(Config):
    """A config whose DEBUG/TESTING lookups raise once armed (a broken settings object)."""

    armed = False

    def _check(self, key: Any) -> None:
        if self.armed and key in ("DEBUG", "TESTING"):
            raise InjectedFault(f"config lookup {key}")

    def __getitem__(self, key: Any) -> Any:
        self._check(key)
        return super().__getitem__(key)

    def get(self, key: Any, default: Any = None) -> Any:
        self._check(key)
        return super().get(key, default)


@dataclass
class Fault:
    """One way for ctxguard's path to break: the providers to use, what to break after init."""

    providers: Callable[[Any], dict[str, Any]]
    arm: Callable[[Flask], None] = lambda app: None
    logged_by_ctxguard: bool = True
    exporter: RaisingExporter = field(default_factory=RaisingExporter)


def arm_config(app: Flask) -> None:
    app.config.armed = True  # type: ignore[attr-defined]


def _exporter_fault() -> Fault:
    fault = Fault(providers=lambda t: {}, logged_by_ctxguard=False)
    fault.providers = lambda t: {
        "tracer_provider": tracer_with(SimpleSpanProcessor(fault.exporter)),
        "meter_provider": t.meter_provider,
    }
    return fault


FAULTS: dict[str, Callable[[], Fault]] = {
    "counter-add-raises": lambda: Fault(
        lambda t: {
            "meter_provider": MeterProviderRaisingOnAdd(),
            "tracer_provider": t.tracer_provider,
        }
    ),
    "create-instrument-raises": lambda: Fault(
        lambda t: {
            "meter_provider": MeterProviderRaisingOnCreate(),
            "tracer_provider": t.tracer_provider,
        }
    ),
    "get-meter-raises": lambda: Fault(
        lambda t: {
            "meter_provider": MeterProviderRaisingOnGetMeter(),
            "tracer_provider": t.tracer_provider,
        }
    ),
    "span-processor-on-start-raises": lambda: Fault(
        lambda t: {
            "tracer_provider": tracer_with(RaisingProcessor("start")),
            "meter_provider": t.meter_provider,
        }
    ),
    "span-processor-on-end-raises": lambda: Fault(
        lambda t: {
            "tracer_provider": tracer_with(RaisingProcessor("end")),
            "meter_provider": t.meter_provider,
        }
    ),
    "exporter-raises": _exporter_fault,
    "config-lookup-raises": lambda: Fault(lambda t: t.providers, arm=arm_config),
}


# -- the app and what a client sees


def build_app() -> Flask:
    """An app with the routes that make ctxguard act: a leak, a stale context, a plain page."""
    app = make_app()
    app.config = TrapConfig(app.root_path, app.config)  # type: ignore[assignment]
    app.view_calls = 0  # type: ignore[attr-defined]

    @app.route("/leak")
    def leak() -> str:
        app.view_calls += 1  # type: ignore[attr-defined]
        app.app_context().push()
        return "leaked"

    @app.route("/stream")
    def stream() -> Any:
        app.view_calls += 1  # type: ignore[attr-defined]

        def chunks() -> Any:
            app.app_context().push()
            yield b"streamed"

        return app.response_class(chunks(), headers={"X-Stream": "1"})

    return app


def serve(wsgi_app: Any, env: dict[str, Any]) -> tuple[Any, ...]:
    """Everything a WSGI server and its client would see: status, headers, body or error.

    Object addresses in Flask's messages (and Flask 3.2's context ids) differ between
    runs and are masked.
    """
    started: list[Any] = []

    def start_response(status: str, headers: list[Any], exc_info: Any = None) -> None:
        started.append((status, list(headers)))

    try:
        body = wsgi_app(env, start_response)
        try:
            data = b"".join(body)
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()
    except Exception as exc:
        message = without_ids(str(exc))
        return ("raised", started, type(exc), message, type(exc.__context__))
    return ("response", started, data)


def seen_by_client(wsgi_app: Any, path: str = "/", **extra: Any) -> tuple[Any, ...]:
    return serve(wsgi_app, environ(path, **extra))


def pop_leftovers() -> None:
    """Pop whatever a scenario left current, so the next run starts clean."""
    for var in CONTEXT_VARS:
        for _ in range(20):
            ctx = var.get(None)
            if ctx is None:
                break
            try:
                ctx.pop()
            except Exception:
                break


def scenario_leak(app: Flask) -> list[Any]:
    """A view pushes an app context and never pops it: Flask's complaint about the pop
    out of order (an ``AssertionError`` after the pop up to 3.1, a ``RuntimeError``
    refusing it on 3.2)."""
    return [seen_by_client(app, "/leak")]


def scenario_stale(app: Flask) -> list[Any]:
    """A streamed body leaves a context current; the next request meets it."""
    return [seen_by_client(app, "/stream"), seen_by_client(app, "/")]


def scenario_ambient(app: Flask) -> list[Any]:
    """A context pushed outside any request, shared by the requests that follow."""
    ctx = app.app_context()
    ctx.push()
    try:
        return [seen_by_client(app, "/"), seen_by_client(app, "/items/3")]
    finally:
        ctx.pop()


def scenario_preserve(app: Flask) -> list[Any]:
    """A production request carrying the preserve-context key (policy event)."""
    kept: list[Any] = []
    return [seen_by_client(app, "/", **{PRESERVE_KEY: kept.append})]


SCENARIOS = {
    "leak": scenario_leak,
    "stale": scenario_stale,
    "ambient": scenario_ambient,
    "preserve": scenario_preserve,
}


def fault_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """ctxguard's log lines about the injected fault (by type: messages are never logged)."""
    return [
        r
        for r in caplog.records
        if r.name == "ctxguard"
        and "internal error in" in r.getMessage()
        and "InjectedFault" in r.getMessage()
    ]


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("fault_name", sorted(FAULTS))
def test_fault_changes_nothing_for_the_client(telemetry, caplog_ctxguard, fault_name, scenario):
    """A broken provider, processor, exporter or app option inside ctxguard's path never
    reaches the request: the client gets exactly what the app without ctxguard answers, and
    the fault is logged on the ``ctxguard`` logger once, not on every request."""
    run = SCENARIOS[scenario]
    fault = FAULTS[fault_name]()

    bare = build_app()
    fault.arm(bare)
    expected = run(bare)
    pop_leftovers()

    app = build_app()
    ctxguard.CtxGuard(app, **fault.providers(telemetry))
    fault.arm(app)
    assert isinstance(app.wsgi_app, ctxguard.CtxGuardMiddleware)

    assert run(app) == expected
    assert app.view_calls == bare.view_calls  # type: ignore[attr-defined]
    pop_leftovers()
    first = len(fault_records(caplog_ctxguard))
    for _ in range(REPEAT - 1):
        assert run(app) == expected
        pop_leftovers()

    records = fault_records(caplog_ctxguard)
    assert len(records) == first, "the same fault was logged again within a minute"
    if fault.logged_by_ctxguard:
        assert first >= 1, "the fault was never logged"
    else:
        # The SDK's processor swallows exporter errors itself; they must still have happened.
        assert fault.exporter.calls >= 1
    assert all(r.levelno >= logging.WARNING for r in records)


def test_counters_stay_exact_when_tracing_is_broken(telemetry):
    """A broken tracer must not cost the metrics that alerts are built on."""
    app = build_app()
    ctxguard.CtxGuard(
        app,
        tracer_provider=tracer_with(RaisingProcessor("end")),
        meter_provider=telemetry.meter_provider,
    )
    for _ in range(REPEAT):
        scenario_leak(app)
    # Up to Flask 3.1 the request's pop happens anyway and only the view's context
    # leaks; Flask 3.2 refuses it, so the request's own context leaks too.
    kind = "ctxguard.context.kind"
    assert telemetry.value("ctxguard.context.leaks", {kind: "app"}) == REPEAT
    leaked_requests = telemetry.value("ctxguard.context.leaks", {kind: "request"})
    assert leaked_requests == (REPEAT if MERGED else 0)


def test_spans_still_flow_when_metrics_are_broken(telemetry):
    """A broken meter must not cost the spans that name the push site."""
    app = build_app()
    ctxguard.CtxGuard(
        app, meter_provider=MeterProviderRaisingOnAdd(), tracer_provider=telemetry.tracer_provider
    )
    for _ in range(REPEAT):
        scenario_leak(app)
    assert len(telemetry.spans("ctxguard.context_leak")) >= 1


# -- the user's own exceptions


def frames_from(exc: BaseException, first: Callable[[traceback.FrameSummary], bool]) -> list[Any]:
    """The traceback from the first frame matching ``first`` down to where it was raised."""
    summary = traceback.extract_tb(exc.__traceback__)
    for i, frame in enumerate(summary):
        if first(frame):
            return [(f.filename, f.lineno, f.name) for f in summary[i:]]
    raise AssertionError(f"no matching frame in {summary}")


def is_flask_wsgi_app(frame: traceback.FrameSummary) -> bool:
    return frame.name == "wsgi_app" and frame.filename.endswith(("flask/app.py", "flask\\app.py"))


def is_flask_ctx(frame: traceback.FrameSummary) -> bool:
    return frame.filename.endswith(("flask/ctx.py", "flask\\ctx.py"))


def is_flask_code(frame: traceback.FrameSummary) -> bool:
    return os.path.basename(os.path.dirname(frame.filename)) == "flask"


def boom_app(**config: Any) -> Flask:
    app = make_app(**config)
    app.raised = []  # type: ignore[attr-defined]

    @app.route("/boom")
    def boom() -> str:
        exc = ValueError("boom: the user's own error")
        app.raised.append(exc)  # type: ignore[attr-defined]
        raise exc  # raise-site: view

    return app


def view_error(app: Flask) -> ValueError:
    with pytest.raises(ValueError) as excinfo:
        seen_by_client_raw(app, "/boom")
    return excinfo.value


def seen_by_client_raw(wsgi_app: Any, path: str) -> None:
    def start_response(status: str, headers: list[Any], exc_info: Any = None) -> None:
        pass

    body = wsgi_app(environ(path), start_response)
    b"".join(body)


@pytest.mark.parametrize(
    "config",
    [{"TESTING": True}, {"PROPAGATE_EXCEPTIONS": True}],
    ids=["testing", "production-propagate"],
)
def test_view_exception_reaches_the_caller_unchanged(telemetry, config):
    """With PROPAGATE_EXCEPTIONS the caller (test, debugger, error tracker) gets the view's
    own exception object, message and traceback, as without ctxguard."""
    bare = boom_app(**config)
    expected = view_error(bare)

    app = boom_app(**config)
    ctxguard.CtxGuard(app, **telemetry.providers)
    got = view_error(app)

    assert got is app.raised[-1]  # type: ignore[attr-defined]
    assert str(got) == "boom: the user's own error"
    assert got.__context__ is None and expected.__context__ is None
    innermost = traceback.extract_tb(got.__traceback__)[-1]
    assert (innermost.filename, innermost.lineno, innermost.name) == (
        __file__,
        line_of(__file__, "# raise-site: " + "view"),
        "boom",
    )
    assert frames_from(got, is_flask_wsgi_app) == frames_from(expected, is_flask_wsgi_app)
    assert len(app.raised) == 1  # type: ignore[attr-defined]


#: Flask 3.2 runs every teardown function and pops, then raises their errors in a
#: ``BaseExceptionGroup`` (Python 3.11+; the first error itself on 3.10); up to 3.1
#: the teardown function's error propagates as it is.
GROUPED = MERGED and sys.version_info >= (3, 11)
_GROUP: Any = getattr(builtins, "BaseExceptionGroup", ())


def teardown_error(app: Flask) -> BaseException:
    """What the user's ``ctx.pop()`` raises when a teardown function fails; Flask pops
    the context anyway."""
    ctx = app.app_context()
    ctx.push()
    with pytest.raises(_GROUP if GROUPED else ValueError) as excinfo:
        ctx.pop()
    assert not flask.has_app_context()
    return excinfo.value


def unwrapped(exc: BaseException) -> tuple[BaseException, list[tuple[Any, ...]]]:
    """The one error inside Flask 3.2's exception groups, and each group around it:
    type, message, ``__context__`` type, and the frames of the inner groups (raised
    in Flask's code: no ctxguard frame can be among them)."""
    groups: list[tuple[Any, ...]] = []
    while isinstance(exc, _GROUP):
        inner = [] if not groups else traceback.extract_tb(exc.__traceback__)
        place = [(f.filename, f.lineno, f.name) for f in inner]
        groups.append((type(exc), exc.message, type(exc.__context__), place))
        (exc,) = exc.exceptions
    return exc, groups


def exploding_teardown_app() -> Flask:
    app = make_app()
    app.raised = []  # type: ignore[attr-defined]

    @app.teardown_appcontext
    def explode(exc: BaseException | None) -> None:
        error = ValueError("teardown failed")
        app.raised.append(error)  # type: ignore[attr-defined]
        raise error  # raise-site: teardown

    return app


def test_teardown_exception_from_a_manual_pop_is_unchanged(telemetry):
    """A teardown function failing during the user's own ctx.pop() raises the user's error,
    with its traceback, through ctxguard's pop hook (on Flask 3.2 inside the same
    exception groups, raised from the same place, as without ctxguard)."""
    expected_group = teardown_error(exploding_teardown_app())

    ctxguard.install(**telemetry.providers)
    app = exploding_teardown_app()
    got_group = teardown_error(app)

    expected, expected_groups = unwrapped(expected_group)
    got, got_groups = unwrapped(got_group)
    assert got_groups == expected_groups
    assert [group[:2] for group in got_groups] == (
        [
            (ExceptionGroup, "Errors during context teardown"),  # noqa: F821 (Python 3.11+)
            (ExceptionGroup, "Errors during app teardown"),  # noqa: F821
        ]
        if GROUPED
        else []
    )
    assert frames_from(got_group, is_flask_ctx) == frames_from(expected_group, is_flask_ctx)
    assert got is app.raised[-1]  # type: ignore[attr-defined]
    assert str(got) == "teardown failed"
    assert type(got.__context__) is type(expected.__context__)
    innermost = traceback.extract_tb(got.__traceback__)[-1]
    assert (innermost.lineno, innermost.name) == (
        line_of(__file__, "# raise-site: " + "teardown"),
        "explode",
    )
    # From Flask's first frame: its pop (up to 3.1), the teardown loop that
    # collected it (3.2, where the group carries the pop's frames).
    assert frames_from(got, is_flask_code) == frames_from(expected, is_flask_code)


def signal_error(app: Flask, raised: list[BaseException]) -> ValueError:
    def receiver(sender: Any, **kwargs: Any) -> None:
        error = ValueError("signal receiver failed")
        raised.append(error)
        raise error  # raise-site: signal

    ctx = app.app_context()
    with appcontext_pushed.connected_to(receiver, app), pytest.raises(ValueError) as excinfo:
        ctx.push()
    # Flask made the context current before sending the signal; clean up as a user would.
    if _cv_app.get(None) is ctx:
        ctx.pop()
    return excinfo.value


def test_signal_receiver_exception_from_push_is_unchanged(telemetry):
    """An appcontext_pushed receiver failing inside app.app_context().push() raises the
    receiver's own error through ctxguard's push hook."""
    expected = signal_error(make_app(), [])

    ctxguard.install(**telemetry.providers)
    raised: list[BaseException] = []
    got = signal_error(make_app(), raised)

    assert got is raised[-1]
    assert str(got) == "signal receiver failed"
    assert type(got.__context__) is type(expected.__context__)
    innermost = traceback.extract_tb(got.__traceback__)[-1]
    assert (innermost.lineno, innermost.name) == (
        line_of(__file__, "# raise-site: " + "signal"),
        "receiver",
    )
    assert frames_from(got, is_flask_ctx) == frames_from(expected, is_flask_ctx)


# -- what is not a Flask request passes through


class ClosingBody:
    """A response iterable that records how often the server closed it."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.closed = 0

    def __iter__(self) -> Any:
        return iter(self.chunks)

    def close(self) -> None:
        self.closed += 1


def plain_wsgi_app(environ: dict[str, Any], start_response: Any) -> Any:
    """Not Flask: answers with what it saw of the environ."""
    keys = ",".join(sorted(k for k in environ if isinstance(k, str)))
    start_response("200 OK", [("Content-Type", "text/plain"), ("X-Keys", keys)])
    return [b"plain:", keys.encode()]


def streaming_wsgi_app(environ: dict[str, Any], start_response: Any) -> Any:
    start_response("200 OK", [("Content-Type", "text/plain")])
    streaming_wsgi_app.body = ClosingBody([b"a", b"b", b"c"])  # type: ignore[attr-defined]
    return streaming_wsgi_app.body  # type: ignore[attr-defined]


def trimmed_environ(*missing: str) -> dict[str, Any]:
    env = environ("/")
    for key in missing:
        env.pop(key, None)
    return env


ODD_ENVIRONS = {
    "complete": (),
    "no-request-method": ("REQUEST_METHOD",),
    "no-server-name-or-port": ("SERVER_NAME", "SERVER_PORT", "SERVER_PROTOCOL"),
    "no-wsgi-keys": ("wsgi.input", "wsgi.errors", "wsgi.url_scheme", "wsgi.multithread"),
}


@pytest.mark.parametrize("missing", list(ODD_ENVIRONS.values()), ids=list(ODD_ENVIRONS))
def test_non_flask_app_passes_through_untouched(telemetry, missing):
    """A plain WSGI app behind CtxGuardMiddleware gets the environ it was given, unmodified,
    and its client gets the exact response, whatever keys the environ lacks."""
    env = trimmed_environ(*missing)
    expected = serve(plain_wsgi_app, dict(env))

    middleware = ctxguard.CtxGuardMiddleware(plain_wsgi_app, **telemetry.providers)
    before = dict(env)
    assert serve(middleware, env) == expected
    assert env == before
    assert all(env[k] is before[k] for k in before)


def test_empty_environ_passes_through(telemetry):
    """Even an empty environ (a broken server or a unit test) reaches the app untouched."""
    env: dict[str, Any] = {}
    middleware = ctxguard.CtxGuardMiddleware(plain_wsgi_app, **telemetry.providers)
    expected = ("response", [("200 OK", [("Content-Type", "text/plain"), ("X-Keys", "")])])
    assert serve(middleware, env) == (*expected, b"plain:")
    assert env == {}


def test_non_flask_streaming_body_is_closed_once(telemetry):
    """The app's own response iterable yields the same bytes and is closed exactly once."""
    middleware = ctxguard.CtxGuardMiddleware(streaming_wsgi_app, **telemetry.providers)
    assert serve(middleware, environ("/")) == (
        "response",
        [("200 OK", [("Content-Type", "text/plain")])],
        b"abc",
    )
    assert streaming_wsgi_app.body.closed == 1  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "missing",
    [("REQUEST_METHOD",), ("SERVER_SOFTWARE", "wsgi.file_wrapper"), ("QUERY_STRING",)],
    ids=["no-request-method", "no-server-software-no-file-wrapper", "no-query-string"],
)
@pytest.mark.parametrize("path", ["/", "/items/7", "/missing"])
def test_flask_app_with_missing_environ_keys_answers_as_without(telemetry, missing, path):
    """A Flask app served with an environ that lacks keys answers as it does without
    ctxguard, and ctxguard adds or removes nothing in that environ."""
    bare = make_app()
    bare_env = trimmed_environ(*missing)
    bare_env["PATH_INFO"] = path
    expected = serve(bare, bare_env)

    app = make_app()
    ctxguard.CtxGuard(app, **telemetry.providers)
    env = trimmed_environ(*missing)
    env["PATH_INFO"] = path
    before = dict(env)
    assert serve(app, env) == expected
    assert set(env) == set(bare_env)
    assert all(env[k] is before[k] for k in before)


# --------------------------------------------------------------------------
# What a fault's log line says (docs/configuration.md: "by exception type and
# where it was raised, never the message"; at most once a minute per place).


class CarriesRequestData(Exception):
    """A provider's failure whose message holds data from the request."""


class CounterThatLeaksData:
    """A counter whose ``add`` fails with the request's data in its message."""

    def __init__(self) -> None:
        self.raised: list[BaseException] = []

    def add(self, *args: Any, **kwargs: Any) -> None:
        error = CarriesRequestData("token=s3cr3t-from-the-request")
        self.raised.append(error)
        raise error  # raise-site: counter


class MeterProviderLeakingData(NoOpMeterProvider):
    def __init__(self) -> None:
        self.counter = CounterThatLeaksData()

    def get_meter(self, name: str, *args: Any, **kwargs: Any) -> Any:
        counter = self.counter

        class Meter(NoOpMeter):
            def create_counter(self, *args: Any, **kwargs: Any) -> Any:
                return counter

        return Meter(name)


def test_a_fault_is_logged_by_type_and_traceback_never_by_message(telemetry, caplog_ctxguard):
    """ctxguard's own failure is logged as one line naming the place, how many more were
    dropped, the exception's type and the traceback from ctxguard's frame down to where it
    was raised, and never the exception's message (it can carry the request's data)."""
    meters = MeterProviderLeakingData()
    ctxguard.install(tracer_provider=telemetry.tracer_provider, meter_provider=meters)
    with pytest.raises(RuntimeError):
        _ = flask.request.method

    (error,) = meters.counter.raised
    (record,) = [r for r in caplog_ctxguard.records if "internal error" in r.getMessage()]
    text = record.getMessage()
    head, stack = text.split("\n", 1)
    assert head == (
        "ctxguard: internal error in counter ctxguard.context.errors (ignored, the application"
        " is not affected; 0 more since the last report): CarriesRequestData"
    )
    assert stack == "".join(traceback.format_tb(error.__traceback__)).rstrip()
    frames = [line for line in stack.splitlines() if line.startswith('  File "')]
    assert len(frames) >= 2
    assert stack.startswith('  File "')
    assert "ctxguard" in frames[0]
    assert frames[-1] == (
        f'  File "{__file__}", line {line_of(__file__, "# raise-site: " + "counter")}, in add'
    )
    assert all(line.startswith(("  File ", "    ")) for line in stack.splitlines())
    assert "s3cr3t" not in text
    assert record.levelno == logging.WARNING


def test_faults_in_two_places_are_each_logged(telemetry, caplog_ctxguard):
    """The once-a-minute limit is per place: a broken meter and a broken tracer failing on
    the same event are both logged, each once however often the event happens."""
    ctxguard.install(
        tracer_provider=tracer_with(RaisingProcessor("start")),
        meter_provider=MeterProviderRaisingOnAdd(),
    )
    for _ in range(3):
        with pytest.raises(RuntimeError):
            _ = flask.request.method

    places = sorted(r.getMessage().split(" (ignored", 1)[0] for r in fault_records(caplog_ctxguard))
    assert places == [
        "ctxguard: internal error in counter ctxguard.context.errors",
        "ctxguard: internal error in span ctxguard.context_error",
    ]


@pytest.mark.parametrize(
    ("fault_name", "place"),
    [
        ("get-meter-raises", "metrics"),
        ("create-instrument-raises", "metrics"),
        ("span-processor-on-start-raises", "span ctxguard.context_leak"),
        ("counter-add-raises", "counter ctxguard.context.leaks"),
    ],
)
def test_a_fault_names_the_place_that_failed(telemetry, caplog_ctxguard, fault_name, place):
    """The fault's log line says which part of ctxguard failed: making the instruments
    (``metrics``), a span (``span <name>``) or a counter (``counter <name>``)."""
    app = build_app()
    ctxguard.CtxGuard(app, **FAULTS[fault_name]().providers(telemetry))
    scenario_leak(app)
    (record,) = fault_records(caplog_ctxguard)
    assert record.getMessage().startswith(f"ctxguard: internal error in {place} (ignored, ")
