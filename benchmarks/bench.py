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
import time
import wsgiref.util
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from flask import Flask

import ctxguard

HELLO = b"Hello, World!"

#: ``wall`` is the default; ``cpu`` (this process's CPU time) is steadier on a busy machine.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
REQUEST_TARGET = 1.03
CONTEXT_TARGET = 1.10

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


@dataclass
class Variant:
    """One way to run an operation; ``setup`` puts the process in its state."""

    name: str
    setup: Callable[[], None]
    run: Callable[[int], float]
    n: int
    baseline: Variant | None = None
    target: float | None = None
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


def installed() -> None:
    ctxguard.uninstall()
    ctxguard.install()


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


def variants(
    bare: Flask, guarded: Flask, sdk: Sdk | None, quick: bool, now: Callable[[], float]
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
    if sdk is None:
        return [a, a_guarded, b, b_ledger]
    a_sdk = Variant(
        "(a) request, CtxGuard + SDK", sdk.install, requests_guarded, n_request, a, REQUEST_TARGET
    )
    b_sdk = Variant(
        "(b) app_context, ledger + SDK", sdk.install, contexts, n_context, b, CONTEXT_TARGET
    )
    return [a, a_guarded, a_sdk, b, b_ledger, b_sdk]


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
    header = (
        f"{'variant':36} {'median us/op':>12} {'IQR %':>6} {'ratio':>6}"
        f" {'paired p10-p90':>15} {'target':>7}  verdict"
    )
    lines = [header, "-" * len(header)]
    for v in all_variants:
        median = statistics.median(v.samples)
        iqr = (_quantile(v.samples, 0.75) - _quantile(v.samples, 0.25)) / median * 100
        ratio = paired = target = verdict = ""
        if v.baseline is not None and v.target is not None:
            value = median / statistics.median(v.baseline.samples)
            pairs = [s / b for s, b in zip(v.samples, v.baseline.samples, strict=True)]
            ratio = f"{value:.3f}"
            paired = f"{_quantile(pairs, 0.1):.3f}-{_quantile(pairs, 0.9):.3f}"
            target = f"<={v.target:.2f}"
            verdict = "PASS" if value <= v.target else "over"
        lines.append(
            f"{v.name:36} {median * 1e6:12.2f} {iqr:6.1f} {ratio:>6}"
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
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: time.perf_counter (default); cpu: time.process_time (steadier when busy)",
    )
    args = parser.parse_args(argv)
    rounds = args.rounds or (7 if args.quick else 25)

    # Re-creating the SDK instruments on every install() is expected here.
    logging.getLogger("opentelemetry").setLevel(logging.ERROR)

    print(
        f"Python {platform.python_version()} ({platform.python_implementation()},"
        f" {platform.machine()}, {os.cpu_count()} CPUs), Flask {_version('flask')},"
        f" Werkzeug {_version('werkzeug')},"
        f" ctxguard {_version('ctxguard')} ({os.path.dirname(ctxguard.__file__)}),"
        f" opentelemetry-api {_version('opentelemetry-api')},"
        f" opentelemetry-sdk {_version('opentelemetry-sdk')}"
    )
    bare = make_app("bare")
    guarded = make_app("guarded")
    ctxguard.CtxGuard(guarded, environment="production")
    sdk = None if args.no_sdk else Sdk.create()

    for line in sanity(bare, guarded, sdk):
        print(line)
    all_variants = variants(bare, guarded, sdk, args.quick, CLOCKS[args.clock])
    print(
        f"{rounds} rounds, variants alternated (order reversed every other round);"
        f" clock: {args.clock}; ratio = median / median of the bare variant;"
        " paired = per-round ratios"
    )
    measure(all_variants, rounds)
    print(table(all_variants))
    return 0


if __name__ == "__main__":
    sys.exit(main())
