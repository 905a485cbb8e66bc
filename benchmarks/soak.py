"""A soak: a million requests through a real server, some of them going wrong.

    python benchmarks/soak.py                        # 1,000,000 requests, gthread
    python benchmarks/soak.py --requests 200000 --worker sync

One gunicorn worker serves ``load_app:make_soak()`` guarded by ``CtxGuard``,
with the OpenTelemetry SDK exporting over OTLP/HTTP every second
(``ctxguard.integrations.gunicorn``) to a receiver this script runs, which decodes the
messages (opentelemetry-proto). ``wrk`` sends the requests: of every 100, 10
start a thread that reads ``request`` (a context error) and 1 starts a thread
that pushes an app context and never pops it (a leak), the rest are clean.

Reported:

- the worker's resident memory (``VmRSS``) after the warm-up (the first tenth
  of the requests) and at the end: target, less than 1 MiB of growth;
- ctxguard's counters as exported (``ctxguard.context.errors`` and
  ``ctxguard.context.leaks``) against the app's own count of what it did: they
  must be equal;
- the spans exported against the rate limit: one per second per line of code,
  so at most one per second per site, plus one per site.

Needs ``wrk`` (Debian: ``apt-get install wrk``) and the ``test`` extra. A
measurement, not a test: exit status 1 only when a check above fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from load import WORKER_OPTIONS, OtlpSink, free_port  # noqa: E402  (load.py's servers)

#: Of every 100 requests (wrk's Lua, per connection thread): 10 fail, 1 leaks.
WRK_SCRIPT = """
counter = 0
request = function()
  counter = counter + 1
  local m = counter % 100
  if m == 0 then
    return wrk.format("GET", "/leak")
  elseif m % 10 == 1 then
    return wrk.format("GET", "/fail")
  end
  return wrk.format("GET", "/")
end
"""
ERRORS = "ctxguard.context.errors"
LEAKS = "ctxguard.context.leaks"


class Receiver:
    """OTLP/HTTP on 127.0.0.1 (load.py's sink): ctxguard's latest metric values and its
    spans, counted."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        self.metrics: dict[str, float] = {}
        self.spans: dict[str, int] = {}
        self.lock = threading.Lock()
        decoders = {
            "/v1/metrics": (self.add_metrics, metrics_service_pb2.ExportMetricsServiceRequest),
            "/v1/traces": (self.add_spans, trace_service_pb2.ExportTraceServiceRequest),
        }

        def received(path: str, body: bytes) -> None:
            if path in decoders:
                add, message = decoders[path]
                add(message, body)

        self.sink = OtlpSink(received)
        self.endpoint = self.sink.endpoint

    def add_metrics(self, message: Any, body: bytes) -> None:
        request = message.FromString(body)
        totals: dict[str, float] = {}
        for resource_metrics in request.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                if scope_metrics.scope.name != "ctxguard":
                    continue
                for metric in scope_metrics.metrics:
                    data = getattr(metric, metric.WhichOneof("data"))
                    totals[metric.name] = sum(
                        getattr(point, point.WhichOneof("value")) for point in data.data_points
                    )
        with self.lock:
            self.metrics.update(totals)  # cumulative: the latest export has it all

    def add_spans(self, message: Any, body: bytes) -> None:
        request = message.FromString(body)
        with self.lock:
            for resource_spans in request.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans[span.name] = self.spans.get(span.name, 0) + 1

    def close(self) -> None:
        self.sink.close()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def truth(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "truth", timeout=10) as response:
        return json.load(response)  # type: ignore[no-any-return]


def wrk(url: str, seconds: int, connections: int, script: str) -> None:
    subprocess.run(
        [
            "wrk",
            "--threads",
            "1",
            "--connections",
            str(connections),
            "--duration",
            f"{seconds}s",
            "--script",
            script,
            url,
        ],
        check=True,
        capture_output=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--worker", choices=sorted(WORKER_OPTIONS), default="gthread")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--step", type=int, default=20, help="seconds per wrk run")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("soak: wrk is not installed (Debian: apt-get install wrk)")

    receiver = Receiver()
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTXGUARD_")}
    env.update(
        {
            "LOAD_EXPORT": "1",
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_METRIC_EXPORT_INTERVAL": "1000",
            "OTEL_SERVICE_NAME": "soak",
        }
    )
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--workers",
            "1",
            *WORKER_OPTIONS[args.worker],
            "--config",
            "python:ctxguard.integrations.gunicorn",
            "--bind",
            f"127.0.0.1:{port}",
            "--log-level",
            "warning",
            "--chdir",
            str(HERE),
            "load_app:make_soak()",
        ],
        env=env,
        start_new_session=True,
    )
    failures = []
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                state = truth(url)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("soak: the server did not start") from None
                time.sleep(0.2)
        pid = state["pid"]
        started = time.monotonic()
        with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
            script.write(WRK_SCRIPT)
        warm_rss = None
        warm_at = max(1, args.requests // 10)
        while state["requests"] < args.requests:
            wrk(url, args.step, args.connections, script.name)
            state = truth(url)
            if warm_rss is None and state["requests"] >= warm_at:
                warm_rss = rss_kib(pid), state["requests"]
            print(
                f"soak: {state['requests']:>9,} requests, {rss_kib(pid):,} KiB resident",
                file=sys.stderr,
            )
        elapsed = time.monotonic() - started
        end_rss = rss_kib(pid)
        time.sleep(3)  # the last periodic export
        with receiver.lock:
            metrics, spans = dict(receiver.metrics), dict(receiver.spans)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
        receiver.close()

    assert warm_rss is not None
    growth = end_rss - warm_rss[0]
    print(
        f"{args.worker}: {state['requests']:,} requests in {elapsed:.0f} s;"
        f" {state['failed']:,} threads failed outside their context,"
        f" {state['leaked']:,} leaked a context"
    )
    print(
        f"resident memory: {warm_rss[0]:,} KiB after {warm_rss[1]:,} requests,"
        f" {end_rss:,} KiB at the end: {growth:+,} KiB (target: < 1,024)"
    )
    if growth >= 1024:
        failures.append("memory grew by 1 MiB or more")
    for name, expected in ((ERRORS, state["failed"]), (LEAKS, state["leaked"])):
        got = metrics.get(name)
        print(f"{name}: {got} exported, {expected} done")
        if got != expected:
            failures.append(f"{name} is not the ground truth")
    bound = int(elapsed) + 2
    for name in ("ctxguard.context_error", "ctxguard.context_leak"):
        print(f"{name} spans: {spans.get(name, 0)} (rate limit: at most {bound})")
        if spans.get(name, 0) > bound:
            failures.append(f"more {name} spans than the rate limit allows")
    for failure in failures:
        print(f"FAILED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
