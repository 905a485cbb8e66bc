"""ctxguard's cost under a real server: ``wrk`` against one gunicorn worker.

    python benchmarks/load.py                       # gthread, sync, gevent; 5 rounds of 4 s
    python benchmarks/load.py --worker gthread --rounds 3 --duration 2
    python benchmarks/load.py --workers 2 --preload --export   # deployment shapes

For each worker class, three gunicorn servers with one worker each serve the
same two-line view on 127.0.0.1: the bare app, the bare app with only
ctxguard's process hooks (``ctxguard.install()``: what the hooks cost without
the middleware), and the app wrapped by ``CtxGuard`` (``benchmarks/load_app.py``;
the bare server's process never imports ctxguard). ``wrk`` loads them in
alternating rounds (bare, installed, guarded, bare, ...), so drift of the
machine falls on all alike. Where the machine has two CPUs or
more, the servers are pinned to one CPU and ``wrk`` to another, so the load
generator does not take the server's time. The report gives, per worker class,
the median over the rounds of requests per second and of wrk's 50th and 99th
percentile latencies, and their ratios to the bare server's (throughput below 1
and latency above 1 is what ctxguard costs).

``--workers N``, ``--preload`` and ``--export`` (the OpenTelemetry SDK in each
worker exporting over OTLP/HTTP every second to a sink this script runs, set up
by ``ctxguard.integrations.gunicorn``, as docs/production.md does) give the deployment
shapes of production. Needs ``wrk`` (Debian: ``apt-get install wrk``) and
gunicorn (and gevent for its worker class), both in the ``test`` extra but wrk;
``--export`` needs the OTLP exporter (``otlp`` extra). These are measurements,
not tests: the exit code is 0 unless a server or wrk could not run.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKERS = ("gthread", "sync", "gevent")
#: The servers compared, and the factory in load_app.py that makes each one's app.
VARIANTS = {"bare": "make_app", "installed": "make_installed", "guarded": "make_guarded"}
#: Target of the throughput ratio (guarded / bare).
THROUGHPUT_TARGET = 0.98
#: gunicorn options per worker class: gthread as Flask deployments usually run it.
WORKER_OPTIONS = {
    "gthread": ["--worker-class", "gthread", "--threads", "4"],
    "sync": ["--worker-class", "sync"],
    "gevent": ["--worker-class", "gevent", "--worker-connections", "1000"],
}
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


@dataclass
class Figures:
    """What wrk measured, round by round, for one server."""

    rps: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    errors: int = 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpus() -> tuple[list[str], list[str]]:
    """``taskset`` prefixes for the server and for wrk (empty on one CPU)."""
    available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(available) < 2 or shutil.which("taskset") is None:
        return [], []
    return ["taskset", "-c", str(available[0])], ["taskset", "-c", str(available[1])]


class OtlpSink:
    """An OTLP/HTTP endpoint on 127.0.0.1 that accepts what it gets and counts the
    requests, for ``--export`` (the exporters do their real work); ``received`` is
    given each request's path and body (soak.py decodes them)."""

    def __init__(self, received: Callable[[str, bytes], None] | None = None) -> None:
        import http.server
        import threading

        sink = self
        self.requests = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                sink.requests += 1
                if received is not None:
                    received(self.path, body)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_server(
    worker: str, factory: str, pin: list[str], args: argparse.Namespace | None = None
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    extra: list[str] = []
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTXGUARD_")}
    if args is not None and args.preload:
        extra.append("--preload")
    if args is not None and args.export:
        extra += ["--config", "python:ctxguard.integrations.gunicorn"]
        env.update(
            {
                "LOAD_EXPORT": "1",
                "OTEL_SERVICE_NAME": "load",
                "OTEL_EXPORTER_OTLP_ENDPOINT": args.sink.endpoint,
                "OTEL_METRIC_EXPORT_INTERVAL": "1000",
            }
        )
    command = [
        *pin,
        sys.executable,
        "-m",
        "gunicorn",
        "--workers",
        str(args.workers if args is not None else 1),
        *extra,
        *WORKER_OPTIONS[worker],
        "--bind",
        f"127.0.0.1:{port}",
        "--log-level",
        "warning",
        "--chdir",
        str(HERE),
        f"load_app:{factory}()",
    ]
    process = subprocess.Popen(command, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"load: gunicorn ({worker}, {factory}) exited: {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.read() == b"Hello, World!":
                    return process, url
        except OSError:
            time.sleep(0.1)
    stop_server(process)
    raise SystemExit(f"load: gunicorn ({worker}, {factory}) did not answer within 30 s")


def stop_server(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _seconds(text: str) -> float:
    match = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", text)
    if not match:
        raise ValueError(f"load: cannot read wrk's latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def run_wrk(url: str, args: argparse.Namespace, pin: list[str], figures: Figures) -> None:
    command = [
        *pin,
        "wrk",
        "--threads",
        str(args.wrk_threads),
        "--connections",
        str(args.connections),
        "--duration",
        f"{args.duration}s",
        "--latency",
        url,
    ]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rps = re.search(r"^Requests/sec:\s+([0-9.]+)", out, re.M)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    if not (rps and p50 and p99):
        raise SystemExit(f"load: cannot read wrk's output:\n{out}")
    figures.rps.append(float(rps.group(1)))
    figures.p50.append(_seconds(p50.group(1)))
    figures.p99.append(_seconds(p99.group(1)))
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:.*?timeout (\d+)", out)
    figures.errors += (int(bad.group(1)) if bad else 0) + (int(errors.group(1)) if errors else 0)


def measure(worker: str, args: argparse.Namespace) -> dict[str, Figures]:
    server_pin, wrk_pin = _cpus()
    servers = {}
    try:
        for name, factory in VARIANTS.items():
            servers[name] = start_server(worker, factory, server_pin, args)
        figures = {name: Figures() for name in servers}
        for name in servers:  # warm-up, not counted
            run_wrk(servers[name][1], _short(args), wrk_pin, Figures())
        for _ in range(args.rounds):
            for name in VARIANTS:
                run_wrk(servers[name][1], args, wrk_pin, figures[name])
        return figures
    finally:
        for process, _ in servers.values():
            stop_server(process)


def _short(args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "duration": 1})


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "-"


def report(results: dict[str, dict[str, Figures]], args: argparse.Namespace) -> None:
    pinned = "server and wrk on separate CPUs" if _cpus()[0] else "not pinned (one CPU)"
    print(
        f"ctxguard {_version('flask-ctxguard')}, Python {sys.version.split()[0]},"
        f" Flask {_version('flask')}, gunicorn {_version('gunicorn')};"
        f" {args.workers} worker(s){', --preload' if args.preload else ''}"
        f"{', OTLP export to a local sink' if args.export else ''},"
        f" wrk {args.wrk_threads} thread(s) x {args.connections} connections,"
        f" {args.rounds} rounds of {args.duration} s alternated, {pinned}"
    )
    print()
    print(
        f"{'worker':8} {'variant':9} {'req/s':>7} {'ratio':>6} {'p50 us':>7} {'ratio':>6}"
        f" {'p99 us':>7} {'ratio':>6}  ratio per round"
    )
    for worker, figures in results.items():
        bare = figures["bare"]
        for name, measured in figures.items():
            row = f"{worker:8} {name:9}"
            for attribute, scale in (("rps", 1), ("p50", 1e6), ("p99", 1e6)):
                value = statistics.median(getattr(measured, attribute))
                base = statistics.median(getattr(bare, attribute))
                shown = f"{value / base:6.3f}" if name != "bare" else " " * 6
                row += f" {value * scale:7.0f} {shown}"
            if name != "bare":
                per_round = [g / b for b, g in zip(bare.rps, measured.rps, strict=True)]
                met = "met" if statistics.median(per_round) >= THROUGHPUT_TARGET else "over"
                row += "  " + ", ".join(f"{r:.3f}" for r in per_round)
                row += f" (throughput >= {THROUGHPUT_TARGET}: {met})"
            print(row)
            if measured.errors:
                print(f"{'':18} non-2xx responses or timeouts: {measured.errors}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="append", choices=WORKERS, help="repeatable")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=4, help="seconds per round")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--wrk-threads", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1, help="gunicorn workers per server")
    parser.add_argument("--preload", action="store_true", help="gunicorn --preload")
    parser.add_argument(
        "--export",
        action="store_true",
        help="the SDK in each worker exports over OTLP/HTTP (ctxguard.integrations.gunicorn) to a"
        " local sink, every second, for every server (bare ones export nothing)",
    )
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("load: wrk is not installed (Debian: apt-get install wrk)")
    args.sink = OtlpSink() if args.export else None
    try:
        results = {worker: measure(worker, args) for worker in args.worker or WORKERS}
    finally:
        if args.sink is not None:
            args.sink.close()
    report(results, args)
    if args.sink is not None:
        print(f"OTLP export requests received by the sink: {args.sink.requests}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
