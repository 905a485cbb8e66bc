"""ctxguard's overhead on Flask's hot paths, as ratios against bare Flask.

Run ``python benchmarks/bench.py`` (``--quick`` for a short run). Everything is
measured in one process, alternating the variants round by round, so drift of
the machine (frequency scaling, a neighbour on the host) falls on every variant
alike; the figure that matters is the ratio of medians, not the microseconds.

(a) a hello-world request through ``app.wsgi_app``: a bare Flask app against a
    second app with ``CtxGuard(app, environment="production")``. The process
    hooks patch Flask's context classes for every app, so the bare rounds run
    with ``ctxguard.uninstall()`` and the guarded rounds after ``install()``.
(b) an ``app.app_context()`` push and pop, without and with the ledger.
(c) ``request.method`` inside a request context (one ``test_request_context()``
    pushed per timed loop, outside the timing): the proxies' guarded
    ``_get_current_object`` against Werkzeug's own (``uninstall()`` puts it back).
(d) ``threading.Thread(target=noop).start()`` and ``join()``, with and without
    the threading hooks; ``ThreadPoolExecutor.submit(noop).result()`` likewise
    (one pool per timed loop, its thread started before the timing).
(e) one recorded error: ``request.method`` outside any context, caught, with
    ctxguard reporting to a real SDK (``InMemorySpanExporter``). The span rate
    limit (one per second per code site) is defeated for the "span each" row by
    setting ``ctxguard.telemetry._spans.interval`` to 0 in that row's setup (and
    back to ``SPAN_INTERVAL`` for every other row), so every access emits its span;
    the "rate limited" row keeps the limit (counter only, span dropped). A
    third row replays, ctxguard uninstalled, the very span and counter point
    ctxguard emits (same name, attributes, ``exception`` event) straight
    through the SDK: the "span each" row is judged by how much it adds to that
    one (ctxguard's own share), the others by microseconds over the failing
    access uninstalled.

The ``+ SDK`` variants run with a real OpenTelemetry SDK ``MeterProvider`` and
``TracerProvider``: the hot path reads no instrument, so they cost the same.
These are measurements, not tests: the exit code is always 0.
"""

from __future__ import annotations

import argparse
import gc
import io
import logging
import os
import platform
import statistics
import sys
import threading
import time
import wsgiref.util
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from flask import Flask
from flask import request as flask_request

import ctxguard
from ctxguard import telemetry

HELLO = b"Hello, World!"

#: ``wall`` is the default; ``cpu`` (this process's CPU time) is steadier on a busy machine.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
REQUEST_TARGET = 1.03
CONTEXT_TARGET = 1.10
PROXY_TARGET = 1.02
THREAD_TARGET = 1.10
#: Microseconds one reported error may add to the failing access when its span is
#: rate limited (counter only).
ERROR_TARGET_US = 30.0
#: Microseconds ctxguard's own work may add to the SDK's for one error with its span.
OWN_SHARE_TARGET_US = 10.0
GROUPS = "abcde"

#: Werkzeug's lookup and Thread.start as they were before anything was installed.
_WERKZEUG_LOOKUP = object.__getattribute__(flask_request, "_get_current_object")
_THREAD_START = vars(threading.Thread)["start"]

ENVIRON: dict[str, Any] = {
    "REQUEST_METHOD": "GET",
    "SCRIPT_NAME": "",
    "PATH_INFO": "/",
    "QUERY_STRING": "",
    "SERVER_NAME": "127.0.0.1",
    "SERVER_PORT": "8000",
    "SERVER_PROTOCOL": "HTTP/1.1",
    "REMOTE_ADDR": "127.0.0.1",
    "HTTP_HOST": "127.0.0.1:8000",
    "wsgi.version": (1, 0),
    "wsgi.url_scheme": "http",
    "wsgi.input": io.BytesIO(b""),
    "wsgi.errors": sys.stderr,
    "wsgi.multithread": True,
    "wsgi.multiprocess": False,
    "wsgi.run_once": False,
    # Production servers (gunicorn, waitress, uWSGI) offer one; the middleware looks for it.
    "wsgi.file_wrapper": wsgiref.util.FileWrapper,
}


def make_app(name: str) -> Flask:
    """The hello-world app, plus a route the sanity check uses."""
    app = Flask(name)

    @app.route("/")
    def hello() -> bytes:
        return HELLO

    @app.route("/snapshot")
    def snapshot() -> dict[str, Any]:
        return ctxguard.snapshot()

    return app


def _start_response(status: str, headers: Any, exc_info: Any = None) -> Callable[..., Any]:
    return _write


def _write(data: bytes) -> None:
    pass


def request(wsgi_app: Any, path: str = "/") -> bytes:
    """One request as a WSGI server makes it: call, join the body, close it."""
    environ = dict(ENVIRON)
    environ["PATH_INFO"] = path
    body = wsgi_app(environ, _start_response)
    try:
        return b"".join(body)
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()


def time_requests(wsgi_app: Any, n: int, now: Callable[[], float]) -> float:
    """Seconds per request, ``n`` hello-world requests in a row."""
    template = ENVIRON
    start_response = _start_response
    start = now()
    for _ in range(n):
        body = wsgi_app(dict(template), start_response)
        b"".join(body)
        close = getattr(body, "close", None)
        if close is not None:
            close()
    return (now() - start) / n


def time_app_context(app: Flask, n: int, now: Callable[[], float]) -> float:
    """Seconds per ``app.app_context()`` created, pushed and popped."""
    app_context = app.app_context
    start = now()
    for _ in range(n):
        ctx = app_context()
        ctx.push()
        ctx.pop()
    return (now() - start) / n


def time_proxy_reads(app: Flask, n: int, now: Callable[[], float]) -> float:
    """Seconds per ``request.method`` read, inside one request context."""
    ctx = app.test_request_context()
    ctx.push()
    try:
        proxy = flask_request
        start = now()
        for _ in range(n):
            proxy.method  # noqa: B018 (the read is what is timed)
        return (now() - start) / n
    finally:
        ctx.pop()


def _noop() -> None:
    pass


def time_threads(n: int, now: Callable[[], float]) -> float:
    """Seconds per ``Thread(target=noop)`` started and joined."""
    thread_class = threading.Thread
    start = now()
    for _ in range(n):
        thread = thread_class(target=_noop)
        thread.start()
        thread.join()
    return (now() - start) / n


def time_executor(n: int, now: Callable[[], float]) -> float:
    """Seconds per ``submit(noop).result()`` on a one-thread pool already running."""
    with ThreadPoolExecutor(1) as pool:
        pool.submit(_noop).result()  # the pool's thread starts outside the timing
        submit = pool.submit
        start = now()
        for _ in range(n):
            submit(_noop).result()
        elapsed = now() - start
    return elapsed / n


def time_failing_reads(n: int, now: Callable[[], float]) -> float:
    """Seconds per ``request.method`` outside any context, its RuntimeError caught."""
    proxy = flask_request
    start = now()
    for _ in range(n):
        try:
            proxy.method  # noqa: B018 (the failing read is what is timed)
        except RuntimeError:
            pass
    return (now() - start) / n


@dataclass
class Variant:
    """One way to run an operation; ``setup`` puts the process in its state.

    Against its ``baseline`` a variant is judged by the ratio of medians
    (``target``) or, for a rare event's cost, by the difference of medians in
    microseconds (``target_us``).
    """

    name: str
    setup: Callable[[], None]
    run: Callable[[int], float]
    n: int
    baseline: Variant | None = None
    target: float | None = None
    target_us: float | None = None
    #: Shown as microseconds over the baseline even without a target.
    in_us: bool = False
    samples: list[float] = field(default_factory=list)


@dataclass
class Sdk:
    """A real SDK configuration: metrics read in memory, spans kept in memory."""

    tracer_provider: Any
    meter_provider: Any
    reader: Any
    exporter: Any

    @classmethod
    def create(cls) -> Sdk | None:
        try:
            from opentelemetry.sdk.metrics import MeterProvider
            from opentelemetry.sdk.metrics.export import InMemoryMetricReader
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import SimpleSpanProcessor
            from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
                InMemorySpanExporter,
            )
        except ImportError:
            return None
        exporter = InMemorySpanExporter()
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
        reader = InMemoryMetricReader()
        return cls(tracer_provider, MeterProvider(metric_readers=[reader]), reader, exporter)

    def install(self) -> None:
        ctxguard.uninstall()
        ctxguard.install(tracer_provider=self.tracer_provider, meter_provider=self.meter_provider)
        telemetry._spans.interval = telemetry.SPAN_INTERVAL

    def install_unthrottled(self) -> None:
        """Installed, with every error span let through (no per-site rate limit)."""
        self.install()
        telemetry._spans.interval = 0.0

    def spans(self) -> int:
        return len(self.exporter.get_finished_spans())

    def points(self) -> dict[str, int]:
        """Sum of every ctxguard metric's data points, by metric name."""
        data = self.reader.get_metrics_data()
        totals: dict[str, int] = {}
        for rm in data.resource_metrics if data else []:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    value = sum(p.value for p in metric.data.data_points)
                    totals[metric.name] = totals.get(metric.name, 0) + value
        return totals


def uninstalled() -> None:
    ctxguard.uninstall()
    telemetry._spans.interval = telemetry.SPAN_INTERVAL


def installed() -> None:
    ctxguard.uninstall()
    ctxguard.install()
    telemetry._spans.interval = telemetry.SPAN_INTERVAL


def sanity(bare: Flask, guarded: Flask, sdk: Sdk | None) -> list[str]:
    """Check the variants measure what they claim to; returns lines to print."""
    lines = []
    ok = True

    uninstalled()
    for app in (bare, guarded):
        if request(app.wsgi_app) != HELLO:
            ok = False
            lines.append(f"  {app.name}: unexpected response body")
    seen = request(guarded.wsgi_app, "/snapshot")
    if b'"contexts"' in seen:
        ok = False
        lines.append("  uninstalled: the guarded app still fed the ledger")

    installed()
    seen = request(guarded.wsgi_app, "/snapshot")
    if b'"/snapshot"' not in seen:
        ok = False
        lines.append("  installed: the guarded app's contexts are not attributed to the request")
    seen = request(bare.wsgi_app, "/snapshot")
    if b'"contexts"' not in seen or b'"/snapshot"' in seen:
        ok = False
        lines.append(
            "  installed: the bare app's contexts should be in the ledger, with no request"
        )

    if sdk is not None:
        sdk.install()
        for _ in range(100):
            request(guarded.wsgi_app)
        totals = sdk.points()
        pushes = totals.get("ctxguard.context.pushes", 0)
        synchronous = {
            name: value
            for name, value in totals.items()
            if name
            in (
                "ctxguard.context.errors",
                "ctxguard.context.leaks",
                "ctxguard.context.healed",
                "ctxguard.policy.violations",
            )
        }
        spans = len(sdk.exporter.get_finished_spans())
        if pushes != 200 or synchronous or spans:
            ok = False
            lines.append(
                f"  SDK: expected 200 pushes and nothing else, got pushes={pushes}"
                f" synchronous={synchronous} spans={spans}"
            )
        else:
            lines.append(
                "  SDK: 100 requests -> ctxguard.context.pushes=200 (observable),"
                " 0 synchronous counter points, 0 spans"
            )
    problems = _sanity_proxies_threads(bare, sdk)
    if problems:
        ok = False
        lines.extend(f"  {problem}" for problem in problems)
    elif sdk is not None:
        lines += [
            "  (c) request.method reads through ctxguard's lookup installed, Werkzeug's"
            " uninstalled",
            "  (d) installed, a thread's and a task's leaked contexts are counted",
            "  (e) 100 failing reads -> ctxguard.context.errors +100, and 100 spans"
            " unthrottled, 1 span rate limited; nothing uninstalled",
        ]
    uninstalled()
    lines.insert(
        0,
        "sanity: "
        + (
            "ok (uninstalled: guarded app passes through; installed: ledger and middleware active)"
            if ok
            else "FAILED, the figures below may not mean what they say"
        ),
    )
    return lines


def _leak_app_context(app: Flask) -> None:
    app.app_context().push()


def _sanity_proxies_threads(app: Flask, sdk: Sdk | None) -> list[str]:
    """(c), (d) and (e) measure ctxguard's hooks installed and Flask's own uninstalled."""
    problems = []
    for setup, guarded in ((uninstalled, False), (installed, True)):
        setup()
        lookup = object.__getattribute__(flask_request, "_get_current_object")
        if (lookup is not _WERKZEUG_LOOKUP) != guarded or (
            guarded and getattr(lookup, "__wrapped__", None) is not _WERKZEUG_LOOKUP
        ):
            problems.append(f"(c) {setup.__name__}: request's lookup is {lookup!r}")
        with app.test_request_context():
            if flask_request.method != "GET":
                problems.append(f"(c) {setup.__name__}: request.method is not GET")
        if (vars(threading.Thread)["start"] is not _THREAD_START) != guarded:
            problems.append(f"(d) {setup.__name__}: Thread.start is not as expected")
    if sdk is None:
        uninstalled()
        return problems

    def failing(n: int) -> tuple[int, int]:
        errors, spans = sdk.points().get(telemetry.ERRORS, 0), sdk.spans()
        for _ in range(n):
            try:
                flask_request.method  # noqa: B018
            except RuntimeError:
                pass
        return sdk.points().get(telemetry.ERRORS, 0) - errors, sdk.spans() - spans

    sdk.install()
    leaks = sdk.points().get(telemetry.LEAKS, 0)
    thread = threading.Thread(target=_leak_app_context, args=(app,))
    thread.start()
    thread.join()
    with ThreadPoolExecutor(1) as pool:
        pool.submit(_leak_app_context, app).result()
    if sdk.points().get(telemetry.LEAKS, 0) - leaks != 2:
        problems.append("(d) installed: a thread's and a task's leaks were not both counted")
    for setup, expected in (
        (sdk.install_unthrottled, (100, 100)),
        (sdk.install, (100, 1)),
        (uninstalled, (0, 0)),
    ):
        setup()
        seen = failing(100)
        if seen != expected:
            problems.append(
                f"(e) {setup.__name__}: 100 failing reads gave (errors, spans) = {seen},"
                f" expected {expected}"
            )
    sdk.exporter.clear()
    uninstalled()
    return problems


def variants(
    bare: Flask,
    guarded: Flask,
    sdk: Sdk | None,
    quick: bool,
    now: Callable[[], float],
    groups: str = GROUPS,
) -> list[Variant]:
    n_request = 400 if quick else 2000
    n_context = 4000 if quick else 20000
    bare_wsgi = bare.wsgi_app
    guarded_wsgi = guarded.wsgi_app

    def requests_bare(n: int) -> float:
        return time_requests(bare_wsgi, n, now)

    def requests_guarded(n: int) -> float:
        return time_requests(guarded_wsgi, n, now)

    def contexts(n: int) -> float:
        return time_app_context(bare, n, now)

    a = Variant("(a) request, bare Flask", uninstalled, requests_bare, n_request)
    a_guarded = Variant(
        "(a) request, CtxGuard", installed, requests_guarded, n_request, a, REQUEST_TARGET
    )
    b = Variant("(b) app_context push+pop, bare", uninstalled, contexts, n_context)
    b_ledger = Variant(
        "(b) app_context push+pop, ledger", installed, contexts, n_context, b, CONTEXT_TARGET
    )
    chosen: list[Variant] = []
    if "a" in groups:
        chosen += [a, a_guarded]
        if sdk is not None:
            chosen.append(
                Variant(
                    "(a) request, CtxGuard + SDK",
                    sdk.install,
                    requests_guarded,
                    n_request,
                    a,
                    REQUEST_TARGET,
                )
            )
    if "b" in groups:
        chosen += [b, b_ledger]
        if sdk is not None:
            chosen.append(
                Variant(
                    "(b) app_context, ledger + SDK",
                    sdk.install,
                    contexts,
                    n_context,
                    b,
                    CONTEXT_TARGET,
                )
            )
    if "c" in groups:
        chosen += proxy_variants(bare, quick, now)
    if "d" in groups:
        chosen += thread_variants(quick, now)
    if "e" in groups and sdk is not None:
        chosen += error_variants(sdk, quick, now)
    return chosen


def proxy_variants(app: Flask, quick: bool, now: Callable[[], float]) -> list[Variant]:
    n = 40_000 if quick else 200_000

    def reads(n: int) -> float:
        return time_proxy_reads(app, n, now)

    c = Variant("(c) request.method, uninstalled", uninstalled, reads, n)
    return [c, Variant("(c) request.method, installed", installed, reads, n, c, PROXY_TARGET)]


def thread_variants(quick: bool, now: Callable[[], float]) -> list[Variant]:
    n_thread = 300 if quick else 1500
    n_task = 1000 if quick else 5000

    def threads(n: int) -> float:
        return time_threads(n, now)

    def tasks(n: int) -> float:
        return time_executor(n, now)

    d = Variant("(d) Thread start+join, uninstalled", uninstalled, threads, n_thread)
    d_pool = Variant("(d) executor submit+result, uninst.", uninstalled, tasks, n_task)
    return [
        d,
        Variant("(d) Thread start+join, installed", installed, threads, n_thread, d, THREAD_TARGET),
        d_pool,
        Variant(
            "(d) executor submit+result, inst.", installed, tasks, n_task, d_pool, THREAD_TARGET
        ),
    ]


def error_variants(sdk: Sdk, quick: bool, now: Callable[[], float]) -> list[Variant]:
    n_fail = 2000 if quick else 10_000
    n_span = 400 if quick else 2000

    def failing(n: int) -> float:
        sdk.exporter.clear()  # the spans of the last loop, outside the timing
        return time_failing_reads(n, now)

    replay = SdkReplay(sdk)

    def sdk_only(n: int) -> float:
        sdk.exporter.clear()
        return replay.time(n, now)

    e = Variant("(e) failing request.method, uninst.", uninstalled, failing, n_fail)
    e_sdk = Variant(
        "(e) the same span+counter, SDK only", replay.setup, sdk_only, n_span, e, in_us=True
    )
    return [
        e,
        e_sdk,
        Variant(
            "(e) error reported, span each (SDK)",
            sdk.install_unthrottled,
            failing,
            n_span,
            e_sdk,
            target_us=OWN_SHARE_TARGET_US,
        ),
        Variant(
            "(e) error reported, rate limited",
            sdk.install,
            failing,
            n_fail,
            e,
            target_us=ERROR_TARGET_US,
        ),
    ]


class SdkReplay:
    """What one reported error costs in the SDK alone, ctxguard uninstalled.

    The span and counter point ctxguard emits for a failing ``request.method``
    are recorded once (name, kind, attributes, the ``exception`` event, links,
    the counter's attributes), then each failing access in the timed loop makes
    the same span and the same ``add`` straight through the SDK. The "span
    each" row minus this one is ctxguard's own share of a reported error.
    """

    def __init__(self, sdk: Sdk) -> None:
        self.sdk = sdk
        self.span: Any = None
        self.counter_attributes: dict[str, Any] = {}

    def setup(self) -> None:
        if self.span is None:
            self.sdk.install_unthrottled()
            self.sdk.exporter.clear()
            time_failing_reads(1, time.perf_counter)
            (self.span,) = self.sdk.exporter.get_finished_spans()
            self.counter_attributes = self._counter_attributes()
            self.sdk.exporter.clear()
        uninstalled()

    def _counter_attributes(self) -> dict[str, Any]:
        data = self.sdk.reader.get_metrics_data()
        for rm in data.resource_metrics if data else []:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name == telemetry.ERRORS:
                        return dict(metric.data.data_points[0].attributes)
        raise RuntimeError("no ctxguard.context.errors point to replay")

    def time(self, n: int, now: Callable[[], float]) -> float:
        from opentelemetry.trace import Status, StatusCode

        recorded = self.span
        tracer = self.sdk.tracer_provider.get_tracer(telemetry.SCOPE, telemetry.VERSION)
        meter = self.sdk.meter_provider.get_meter(telemetry.SCOPE, telemetry.VERSION)
        counter = meter.create_counter(telemetry.ERRORS, unit="{error}")
        name, kind, links = recorded.name, recorded.kind, recorded.links or None
        attributes = dict(recorded.attributes)
        (event,) = recorded.events
        event_name, event_attributes = event.name, dict(event.attributes)
        counter_attributes = self.counter_attributes
        proxy = flask_request
        start = now()
        for _ in range(n):
            try:
                proxy.method  # noqa: B018 (the failing read, as in the other rows)
            except RuntimeError:
                counter.add(1, counter_attributes)
                span = tracer.start_span(name, kind=kind, attributes=attributes, links=links)
                span.add_event(event_name, event_attributes)
                span.set_status(Status(StatusCode.ERROR))
                span.end()
        return (now() - start) / n


def measure(all_variants: list[Variant], rounds: int) -> None:
    for r in range(rounds):
        # Reverse the order every other round, so no variant always runs first.
        order = all_variants if r % 2 == 0 else list(reversed(all_variants))
        for v in order:
            v.setup()
            v.run(max(50, v.n // 20))  # warm up after the switch (caches, first request)
            gc.collect()
            v.samples.append(v.run(v.n))
        print(f"\rround {r + 1}/{rounds}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    ctxguard.uninstall()


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def table(all_variants: list[Variant]) -> str:
    """One row per variant: ratio (or microseconds more) against its baseline."""
    header = (
        f"{'variant':36} {'median us/op':>12} {'IQR %':>6} {'ratio':>7}"
        f" {'paired p10-p90':>15} {'target':>7}  verdict"
    )
    lines = [header, "-" * len(header)]
    for v in all_variants:
        median = statistics.median(v.samples)
        iqr = (_quantile(v.samples, 0.75) - _quantile(v.samples, 0.25)) / median * 100
        ratio = paired = target = verdict = ""
        if v.baseline is not None and (v.target_us is not None or v.in_us):
            extra = (median - statistics.median(v.baseline.samples)) * 1e6
            pairs = [(s - b) * 1e6 for s, b in zip(v.samples, v.baseline.samples, strict=True)]
            ratio = f"+{extra:.2f}"
            paired = f"+{_quantile(pairs, 0.1):.1f}-{_quantile(pairs, 0.9):.1f}us"
            if v.target_us is not None:
                target = f"<={v.target_us:.0f}us"
                verdict = "PASS" if extra <= v.target_us else "over"
        elif v.baseline is not None:
            value = median / statistics.median(v.baseline.samples)
            pairs = [s / b for s, b in zip(v.samples, v.baseline.samples, strict=True)]
            ratio = f"{value:.3f}"
            paired = f"{_quantile(pairs, 0.1):.3f}-{_quantile(pairs, 0.9):.3f}"
            if v.target is not None:
                target = f"<={v.target:.2f}"
                verdict = "PASS" if value <= v.target else "over"
        lines.append(
            f"{v.name:36} {median * 1e6:12.2f} {iqr:6.1f} {ratio:>7}"
            f" {paired:>15} {target:>7}  {verdict}"
        )
    return "\n".join(lines)


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="7 short rounds instead of 25")
    parser.add_argument("--rounds", type=int, help="number of rounds (default 25, quick 7)")
    parser.add_argument("--no-sdk", action="store_true", help="skip the OpenTelemetry SDK rows")
    parser.add_argument(
        "--cpu",
        type=int,
        help="pin the process to this one CPU (Linux): steadier (d), whose thread start and"
        " join otherwise include cross-CPU wake-ups",
    )
    parser.add_argument(
        "--only",
        default=GROUPS,
        help="which groups to run, among abcde (default: all; (e) needs the SDK)",
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: time.perf_counter (default); cpu: time.process_time (steadier when busy)",
    )
    args = parser.parse_args(argv)
    rounds = args.rounds or (7 if args.quick else 25)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})

    # Re-creating the SDK instruments on every install() is expected here.
    logging.getLogger("opentelemetry").setLevel(logging.ERROR)
    # (e) makes errors on purpose: their once-a-minute log line goes nowhere (the
    # throttle that decides it still runs, as in production).
    logging.getLogger("ctxguard").addHandler(logging.NullHandler())
    logging.getLogger("ctxguard").propagate = False

    print(
        f"Python {platform.python_version()} ({platform.python_implementation()},"
        f" {platform.machine()}, {os.cpu_count()} CPUs), Flask {_version('flask')},"
        f" Werkzeug {_version('werkzeug')},"
        f" ctxguard {_version('ctxguard')} ({os.path.dirname(ctxguard.__file__)}),"
        f" opentelemetry-api {_version('opentelemetry-api')},"
        f" opentelemetry-sdk {_version('opentelemetry-sdk')}"
        + (f"; pinned to CPU {args.cpu}" if args.cpu is not None else "")
    )
    bare = make_app("bare")
    guarded = make_app("guarded")
    ctxguard.CtxGuard(guarded, environment="production")
    sdk = None if args.no_sdk else Sdk.create()

    for line in sanity(bare, guarded, sdk):
        print(line)
    all_variants = variants(bare, guarded, sdk, args.quick, CLOCKS[args.clock], args.only)
    print(
        f"{rounds} rounds, variants alternated (order reversed every other round);"
        f" clock: {args.clock}; ratio = median / median of the bare variant;"
        " paired = per-round ratios; for (e), us more than the row it is measured against"
    )
    measure(all_variants, rounds)
    print(table(all_variants))
    return 0


if __name__ == "__main__":
    sys.exit(main())
