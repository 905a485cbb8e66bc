"""The server matrix: the same mixed load, bare and guarded, under every kind of server.

ctxguard promises that with ``CtxGuard(app)`` every request behaves exactly as
without it, that every count it exports is the ground truth, and that it
reports nothing that did not happen. Each server below runs the app of
``matrix_app.py`` twice, in a subprocess on 127.0.0.1 (a port the OS picks):
once bare, once with ``CtxGuard(app)`` (default arguments, production). The
test sends both runs the same deterministic load, counts its own ground truth
(how many leaky requests of each kind it made), and compares:

- every response (status, headers but ``Date``, body bytes) with the bare run's;
- ctxguard's counters (read from the server's global in-memory SDK reader
  through ``/_telemetry``) with the ground truth, exactly;
- the reports: nothing for a clean request, no ``request_start`` leak, and a
  heal only where Flask left a stale context: up to Flask 3.1 none ever exists
  in this load; on Flask 3.2 the view that never pops leaves its context and
  the request's own current on its worker (Flask refuses to pop the request's
  out of order), and the next request that worker starts (counted by the app
  itself) heals both;
- what Flask tore down (the app's own count of ``teardown_appcontext`` calls)
  with what it pushed, less what the leaky views left open and plus what
  ctxguard healed;
- the large streams: complete, byte for byte.

The servers: Werkzeug's threaded server; gunicorn ``sync``, ``gthread``,
``gevent`` and ``gevent --preload`` (one worker, so a run's telemetry is in one
process); and bjoern, a single-threaded libev server that interleaves requests
on one thread.

The load. Lane 0 sends, one after the other, everything that keeps a Flask
context open after the view returns or corrupts the thread's context stack:
large and small ``stream_with_context`` bodies and the view that pushes and
never pops. The other lanes, concurrently, send every other view, the
thread-leak and thread-error views and large plain streams. They start once
lane 0's first large stream is flowing, and lane 0 reads its large streams at
a gentle pace, so an event-loop server serves them in the middle of it. Why
lane 0 is sequential: on a server that interleaves requests on one thread,
Flask's contexts (context variables of that one thread) form one stack for
every request on it, so two ``stream_with_context`` bodies open at once, or a
push left open while another body streams, corrupt each other *without*
ctxguard (each stream ends in ``AssertionError: Popped wrong request context``
or ``LookupError`` and is cut), and the bare run would be no reference.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matrix_app
import pytest
from helpers import MERGED

TESTS = Path(__file__).resolve().parent

LEAKS = "ctxguard.context.leaks"
ERRORS = "ctxguard.context.errors"
HEALED = "ctxguard.context.healed"
VIOLATIONS = "ctxguard.policy.violations"
PUSHES = "ctxguard.context.pushes"
POPS = "ctxguard.context.pops"
#: The counters ctxguard moves only when it reports something.
REPORTS = (LEAKS, ERRORS, HEALED, VIOLATIONS)

#: Large streams: size in MiB, and the client's pause between 64 KiB reads of
#: lane 0's large streams (it keeps them open while the other lanes run).
LARGE_MIB = 4
PACE = 0.002
#: Every socket operation of the client, and the whole load of one run.
TIMEOUT = 10.0
LOAD_DEADLINE = 30.0
#: How long a server may take to start serving.
STARTUP = 30.0
#: The client's receive buffer: a slow reader really holds the server back.
RCVBUF = 64 * 1024

# Route templates, as ctxguard must name them (never the raw path).
ROUTE_LEAK_END = "/leak/request-end/<int:n>"
ROUTE_LEAK_THREAD = "/leak/thread-exit/<int:n>"
ROUTE_ERROR_THREAD = "/error/thread-request/<int:n>"


# --------------------------------------------------------------------------
# The servers.


@dataclass(frozen=True)
class Server:
    """One server of the matrix: a gunicorn worker class, or run by ``matrix_app.serve``."""

    name: str
    gunicorn: tuple[str, ...] = ()
    #: Serves many requests interleaved on one thread (an event loop).
    interleaves: bool = False
    #: Werkzeug's development server: ctxguard's policy rightly reports it, once.
    development: bool = False

    @property
    def preload(self) -> bool:
        return "--preload" in self.gunicorn

    @property
    def gevent(self) -> bool:
        return "gevent" in self.gunicorn

    def not_as_described(self, report: dict[str, Any]) -> str | None:
        """What, in a run's report, says the run did not exercise this server as described."""
        if self.preload and report["created_pid"] == report["pid"]:
            return "--preload, yet the app was created in the worker"
        if self.gunicorn and not self.preload and report["created_pid"] != report["pid"]:
            return "the app was created in another process than the worker"
        if report["gevent_patched"] != self.gevent:
            return f"gevent patched threading: {report['gevent_patched']}"
        if self.interleaves and not report["guarded"] and report["interleaved"] == 0:
            return "no request started on the thread of an open stream: nothing interleaved"
        return None

    def unavailable(self) -> str | None:
        """Why this server cannot run on this platform, or None."""
        if self.gunicorn and sys.platform == "win32":
            return "gunicorn runs on POSIX only"
        if self.name == "bjoern" and sys.platform == "win32":
            return "bjoern (libev) does not build on Windows"
        return None


SERVERS = [
    Server("werkzeug-threaded", development=True),
    Server("gunicorn-sync", ("-k", "sync")),
    Server("gunicorn-gthread", ("-k", "gthread", "--threads", "4")),
    Server("gunicorn-gevent", ("-k", "gevent")),
    Server("gunicorn-gevent-preload", ("-k", "gevent", "--preload")),
    Server("bjoern", interleaves=True),
]


def _server_env(guarded: bool) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CTXGUARD_", "FLASK_", "GUNICORN_", "OTEL_"))
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env["MATRIX_GUARD"] = "1" if guarded else "0"
    return env


@contextmanager
def running(server: Server, guarded: bool, workdir: Path) -> Iterator[tuple[int, Path]]:
    """Start the server, yield (port, log file), and stop it whatever happens."""
    mode = "guarded" if guarded else "bare"
    log_path = workdir / f"{server.name}-{mode}.log"
    env = _server_env(guarded)
    with open(log_path, "wb") as log:
        if server.gunicorn:
            # gunicorn is handed a socket already listening on a port the OS picked.
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.bind(("127.0.0.1", 0))
            listener.listen(128)
            port = listener.getsockname()[1]
            gunicorn = shutil.which("gunicorn", path=os.path.dirname(sys.executable))
            if gunicorn is None:
                pytest.fail("gunicorn is a test dependency: pip install -e '.[test]'")
            command = [
                gunicorn,
                "--workers",
                "1",
                *server.gunicorn,
                "--bind",
                f"fd://{listener.fileno()}",
                "--graceful-timeout",
                "5",
                "--log-level",
                "warning",
                "matrix_app:create_app()",
            ]
            try:
                process = subprocess.Popen(
                    command,
                    cwd=workdir,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    pass_fds=(listener.fileno(),),
                )
            finally:
                listener.close()  # if the server dies, connections fail at once
        else:
            port_file = workdir / f"{server.name}-{mode}.port"
            kind = "bjoern" if server.interleaves else "werkzeug"
            process = subprocess.Popen(
                [sys.executable, "-m", "matrix_app", kind, str(port_file)],
                cwd=workdir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            port = 0
        try:
            if not server.gunicorn:
                port = _wait_for_port(process, port_file, log_path)
            yield port, log_path
        finally:
            _stop(process)


def _wait_for_port(process: subprocess.Popen[bytes], port_file: Path, log: Path) -> int:
    """The port ``matrix_app.serve`` wrote once listening; fail if the server died first."""
    deadline = time.monotonic() + STARTUP
    while not port_file.exists():
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            pytest.fail(f"server did not listen within {STARTUP} s:\n{_tail(log)}")
        time.sleep(0.02)
    return int(port_file.read_text())


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (gunicorn stops its worker gracefully), then SIGKILL if it lingers."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(15)


def _tail(log: Path, lines: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------
# The client.


@dataclass(frozen=True)
class Req:
    """One request of the load."""

    lane: int
    seq: int
    kind: str
    path: str
    #: Read at a gentle pace, keeping the response open on the server.
    paced: bool = False


@dataclass(frozen=True)
class Outcome:
    """What the client got: status, headers (but Date), body, and a transport error if any."""

    status: int | None
    headers: tuple[tuple[str, str], ...]
    body: bytes
    error: str | None

    def describe(self) -> str:
        digest = hashlib.sha256(self.body).hexdigest()[:12]
        return (
            f"status={self.status} error={self.error} body={len(self.body)} bytes sha256:{digest}"
        )


class _Connection(http.client.HTTPConnection):
    """HTTP/1.1 with a small receive buffer, so a slow reader really holds the server back."""

    def connect(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        sock.settimeout(self.timeout)
        try:
            sock.connect((self.host, self.port))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def fetch(
    port: int, req: Req, flowing: threading.Event | None = None, timeout: float = TIMEOUT
) -> Outcome:
    """One request on a fresh connection, its body read to the end (or to the error)."""
    conn = _Connection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", req.path)
        response = conn.getresponse()
        headers = tuple((k.lower(), v) for k, v in response.getheaders() if k.lower() != "date")
        parts: list[bytes] = []
        error = None
        try:
            while True:
                data = response.read(matrix_app.CHUNK)
                if not data:
                    break
                parts.append(data)
                if flowing is not None:
                    flowing.set()
                if req.paced:
                    time.sleep(PACE)
        except (http.client.HTTPException, OSError) as exc:
            error = f"{type(exc).__name__} after {sum(map(len, parts))} bytes"
        return Outcome(response.status, headers, b"".join(parts), error)
    except (http.client.HTTPException, OSError) as exc:
        return Outcome(None, (), b"", f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()
        if flowing is not None:
            flowing.set()


def plan() -> list[list[Req]]:
    """The load: the same for every server and run, lane by lane, in a fixed order."""
    lanes: list[list[tuple[str, str, bool]]] = [[]]
    for r in range(3):
        lanes[0] += [
            ("swc-large", f"/swc-large/{LARGE_MIB}?tag=S{r}", True),
            ("leak-request-end", f"/leak/request-end/{10 * r + 1}", False),
            ("swc", f"/swc/5?tag=s{r}a", False),
            ("leak-request-end", f"/leak/request-end/{10 * r + 2}", False),
            ("swc", f"/swc/3?tag=s{r}b", False),
            ("text", "/text", False),
        ]
    cycle = [
        "text",
        "json",
        "gen",
        "file",
        "missing",
        "handled",
        "leak-thread-exit",
        "error-thread-request",
        "json",
        "gen",
        "leak-thread-exit",
        "text",
        "error-thread-request",
        "file",
    ]
    for lane in range(1, 5):
        kinds = cycle[lane:] + cycle[:lane] + cycle
        kinds.insert(2 * lane, "gen-large")
        entries = []
        for seq, kind in enumerate(kinds):
            n = 100 * lane + seq
            path = {
                "text": "/text",
                "json": f"/json/{n}",
                "gen": f"/gen/{n % 7 + 1}?tag=g{n}",
                "gen-large": f"/gen-large/{LARGE_MIB}?tag=G{lane}",
                "file": "/file",
                "missing": f"/missing/{n}",
                "handled": f"/handled/{n}",
                "leak-thread-exit": f"/leak/thread-exit/{n}",
                "error-thread-request": f"/error/thread-request/{n}",
            }[kind]
            entries.append((kind, path, False))
        lanes.append(entries)
    return [
        [Req(lane, seq, kind, path, paced) for seq, (kind, path, paced) in enumerate(entries)]
        for lane, entries in enumerate(lanes)
    ]


def run_load(port: int) -> dict[Req, Outcome]:
    """Send the plan: lane 0 first, the other lanes once its first large stream flows."""
    lanes = plan()
    flowing = threading.Event()
    deadline = time.monotonic() + LOAD_DEADLINE
    outcomes: dict[Req, Outcome] = {}

    def lane_worker(requests: list[Req]) -> None:
        if requests[0].lane != 0:
            flowing.wait(TIMEOUT)
        for req in requests:
            if time.monotonic() > deadline:
                outcomes[req] = Outcome(None, (), b"", "not sent: the load ran out of time")
                continue
            gate = flowing if req.lane == 0 and req.seq == 0 else None
            outcomes[req] = fetch(port, req, gate)

    with ThreadPoolExecutor(len(lanes)) as pool:
        for future in [pool.submit(lane_worker, lane) for lane in lanes]:
            future.result()
    return outcomes


def read_telemetry(port: int) -> tuple[dict[str, Any], int]:
    """ctxguard's telemetry once it has settled, and how many requests reading it took.

    A streamed body is closed (and its request's end checked) just after its last
    byte left: read again until two reads 0.2 s apart report the same.
    """
    previous: Any = None
    report: dict[str, Any] = {}
    for attempt in range(1, 8):
        outcome = fetch(port, Req(-1, attempt, "telemetry", "/_telemetry"))
        assert outcome.status == 200 and outcome.error is None, outcome.describe()
        report = json.loads(outcome.body)
        reports = sorted(
            (p["name"], sorted(p["attributes"].items()), p["value"])
            for p in report["points"]
            if p["name"] in REPORTS
        )
        if reports == previous:
            return report, attempt
        previous = reports
        time.sleep(0.2)
    return report, attempt


# --------------------------------------------------------------------------
# One server, bare and guarded.


@dataclass
class Run:
    server: Server
    guarded: bool
    outcomes: dict[Req, Outcome]
    telemetry: dict[str, Any]
    #: Requests the test sent besides the load (readiness probe, /_telemetry reads).
    extra_requests: int
    log: Path

    @property
    def label(self) -> str:
        mode = f"guarded by {self.telemetry.get('ctxguard')}" if self.guarded else "bare"
        return f"{self.server.name} {mode} (log: {self.log})"

    def made(self) -> Counter[str]:
        """The ground truth: how many requests of each kind the test made."""
        return Counter(req.kind for req in self.outcomes)

    def points(self, name: str) -> dict[tuple[tuple[str, Any], ...], int]:
        found: dict[tuple[tuple[str, Any], ...], int] = {}
        for p in self.telemetry["points"]:
            if p["name"] == name:
                key = _key(p["attributes"])
                found[key] = found.get(key, 0) + p["value"]
        return found

    def nonzero(self, name: str) -> dict[tuple[tuple[str, Any], ...], int]:
        return {k: v for k, v in self.points(name).items() if v}

    def spans(self, name: str) -> list[dict[str, Any]]:
        return [s["attributes"] for s in self.telemetry["spans"] if s["name"] == name]


def serve_and_load(server: Server, guarded: bool, workdir: Path) -> Run:
    with running(server, guarded, workdir) as (port, log):
        # One probe, patient: the socket listens already, the worker may still be starting.
        probe = fetch(port, Req(-1, 0, "probe", "/text"), timeout=STARTUP)
        if probe.status != 200:
            pytest.fail(f"{server.name}: not ready ({probe.describe()}):\n{_tail(log)}")
        outcomes = run_load(port)
        telemetry, reads = read_telemetry(port)
    return Run(server, guarded, outcomes, telemetry, 1 + reads, log)


@dataclass
class Pair:
    bare: Run
    guarded: Run


@pytest.fixture(scope="module", params=SERVERS, ids=[s.name for s in SERVERS])
def matrix(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Pair:
    server: Server = request.param
    reason = server.unavailable()
    if reason:
        pytest.skip(f"{server.name}: {reason}")
    if server.interleaves:
        try:
            import bjoern  # noqa: F401
        except ImportError as exc:
            pytest.fail(
                f"bjoern is a test dependency (pip install -e '.[test]'; it builds against"
                f" libev: apt-get install libev-dev): {exc}"
            )
    workdir = tmp_path_factory.mktemp(server.name)
    pair = Pair(serve_and_load(server, False, workdir), serve_and_load(server, True, workdir))
    for run in (pair.bare, pair.guarded):
        wrong = server.not_as_described(run.telemetry)
        if wrong:
            pytest.fail(f"{run.label} is not the server this cell tests: {wrong}")
    return pair


# --------------------------------------------------------------------------
# The ground truth and how to say what differs.


def _key(attributes: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(attributes.items()))


def expected_reports(run: Run) -> dict[str, dict[tuple[tuple[str, Any], ...], int]]:
    """The counters ctxguard must show after this load, exactly."""
    made = run.made()
    kind, site = "ctxguard.context.kind", "ctxguard.leak.site"
    leaks = {
        _key({kind: "app", site: "request_end"}): made["leak-request-end"],
        _key({kind: "app", site: "thread_exit"}): made["leak-thread-exit"],
    }
    healed = {}
    if MERGED:
        # Flask 3.2 refuses wsgi_app's pop of the request's own context (the view's
        # is on top): both stay current, both leak at the request's end, and the
        # next request its worker starts finds them stale and heals both. Up to 3.1
        # the pop happens anyway: the view's context is unreachable, nothing stale.
        leaks[_key({kind: "request", site: "request_end"})] = made["leak-request-end"]
        followed = run.telemetry["leaks_followed"]
        healed = {_key({kind: "app"}): followed, _key({kind: "request"}): followed}
    error = {
        "ctxguard.proxy": "request",
        kind: "request",
        "ctxguard.worker.kind": "thread",
        "http.route": ROUTE_ERROR_THREAD,
    }
    errors = {_key(error): made["error-thread-request"]}
    violations = {}
    if run.server.development:
        rule = {"ctxguard.policy.rule": "development_server", "ctxguard.policy.action": "reported"}
        violations[_key(rule)] = 1
    return {
        LEAKS: {k: v for k, v in leaks.items() if v},
        ERRORS: {k: v for k, v in errors.items() if v},
        HEALED: {k: v for k, v in healed.items() if v},
        VIOLATIONS: violations,
    }


def _attrs(key: tuple[tuple[str, Any], ...]) -> str:
    return "{" + ", ".join(f"{k}={v}" for k, v in key) + "}"


def _function(attributes: dict[str, Any]) -> str | None:
    """The function a span names (ctxguard may give the qualified name) if in matrix_app."""
    if not str(attributes.get("code.file.path", "")).endswith("matrix_app.py"):
        return None
    name = attributes.get("code.function.name")
    return name.rsplit(".", 1)[-1] if isinstance(name, str) else None


def diff_counts(
    metric: str,
    expected: dict[tuple[tuple[str, Any], ...], int],
    got: dict[tuple[tuple[str, Any], ...], int],
) -> list[str]:
    lines = []
    for k in sorted(set(expected) | set(got), key=str):
        want, have = expected.get(k, 0), got.get(k, 0)
        if want != have:
            lines.append(f"{metric} {_attrs(k)}: expected {want}, got {have} ({have - want:+d})")
    return lines


def _first_difference(a: bytes, b: bytes, block: int = 4096) -> int:
    """Offset of the first byte where ``a`` and ``b`` differ (or the shorter one ends)."""
    for start in range(0, min(len(a), len(b)), block):
        x, y = a[start : start + block], b[start : start + block]
        if x != y:
            common = min(len(x), len(y))
            return start + next((i for i in range(common) if x[i] != y[i]), common)
    return min(len(a), len(b))


def diff_outcomes(req: Req, bare: Outcome, guarded: Outcome) -> str | None:
    what = []
    if bare.status != guarded.status:
        what.append(f"status {bare.status} -> {guarded.status}")
    if bare.headers != guarded.headers:
        b, g = dict(bare.headers), dict(guarded.headers)
        changed = {k: (b.get(k), g.get(k)) for k in set(b) | set(g) if b.get(k) != g.get(k)}
        what.append(f"headers {changed or 'in another order'}")
    if bare.body != guarded.body:
        at = _first_difference(bare.body, guarded.body)
        what.append(f"body {len(bare.body)} -> {len(guarded.body)} bytes, first difference at {at}")
    if bare.error != guarded.error:
        what.append(f"transport {bare.error!r} -> {guarded.error!r}")
    if not what:
        return None
    return f"{req.kind} {req.path} (lane {req.lane} #{req.seq}): " + "; ".join(what)


def expected_stream(req: Req) -> bytes | None:
    """The exact body of a streamed response, or None for the other views."""
    if req.kind not in ("swc-large", "gen-large", "swc", "gen"):
        return None
    path, _, query = req.path.partition("?")
    tag = query.removeprefix("tag=")
    size = int(path.rsplit("/", 1)[1])
    if req.kind == "swc-large":
        chunks = size * matrix_app.MIB // matrix_app.CHUNK
        return matrix_app.large_body(tag, size, matrix_app.swc_trailer(tag, chunks))
    if req.kind == "gen-large":
        return matrix_app.large_body(tag, size)
    if req.kind == "swc":
        lines = b"".join(f"{tag} {i} GET\n".encode() for i in range(size))
        return lines + matrix_app.swc_trailer(tag, size)
    return b"".join(f"{tag} {i}\n".encode() for i in range(size))


# --------------------------------------------------------------------------
# The tests.


def test_every_response_is_identical_to_the_bare_run(matrix: Pair) -> None:
    """Promise: with ctxguard on, every request behaves exactly as without it. Each response
    (status, headers but Date, body bytes, and how the connection ended) equals the bare
    run's for the same request, on this server, under the same concurrent load."""
    bare, guarded = matrix.bare, matrix.guarded
    assert set(bare.outcomes) == set(guarded.outcomes)
    diffs = [
        d
        for req in sorted(bare.outcomes, key=lambda r: (r.lane, r.seq))
        if (d := diff_outcomes(req, bare.outcomes[req], guarded.outcomes[req]))
    ]
    assert not diffs, (
        f"{len(diffs)} of {len(bare.outcomes)} responses differ from the bare run on"
        f" {guarded.label}:\n" + "\n".join(diffs[:15])
    )


def test_streams_are_never_cut(matrix: Pair) -> None:
    """Promise: ctxguard never cuts a stream. Every streamed body (several MiB through
    stream_with_context read slowly while other requests run, large plain generators,
    small streams) arrives complete and byte-exact, bare and guarded."""
    problems = []
    for run in (matrix.bare, matrix.guarded):
        for req, outcome in sorted(run.outcomes.items(), key=lambda i: (i[0].lane, i[0].seq)):
            want = expected_stream(req)
            if want is None:
                continue
            if outcome.status != 200 or outcome.error or outcome.body != want:
                problems.append(
                    f"{run.label}: {req.path} (lane {req.lane} #{req.seq}):"
                    f" {outcome.describe()}, expected {len(want)} bytes"
                )
    assert not problems, f"{len(problems)} streams cut or wrong:\n" + "\n".join(problems[:15])


def test_counters_equal_the_ground_truth(matrix: Pair) -> None:
    """Promise: every count is the ground truth. Leaks by kind and site, errors by proxy
    (with context kind, worker kind and route), heals and policy violations equal exactly
    what the test's own requests did; the bare run exports nothing."""
    bare, guarded = matrix.bare, matrix.guarded
    assert bare.telemetry["points"] == [] and bare.telemetry["spans"] == []
    unanswered = [
        f"{req.path}: {o.describe()}"
        for req, o in guarded.outcomes.items()
        if req.kind.startswith(("leak-", "error-")) and o.status is None
    ]
    assert not unanswered, "leaky requests without a response, ground truth unknown:\n" + (
        "\n".join(unanswered[:10])
    )
    expected = expected_reports(guarded)
    diffs = [
        line
        for metric in REPORTS
        for line in diff_counts(metric, expected[metric], guarded.nonzero(metric))
    ]
    assert not diffs, (
        f"ctxguard's counters differ from the ground truth on {guarded.label}"
        f" (made: {dict(guarded.made())}):\n" + "\n".join(diffs)
    )


def test_push_and_pop_counts_equal_flask(matrix: Pair) -> None:
    """Promise: every count is the ground truth, the observable ones too. Pushes by kind
    equal what Flask pushed: app contexts as Flask's own ``appcontext_pushed`` signal counted
    them in the app (how many depends on the Flask version, whose stream_with_context may
    push one, and on the server: up to Flask 3.1 a request interleaved with an open stream
    reuses its app context), request contexts one per request (on Flask 3.2, where the
    signal is sent for them too, exactly as many as it counted) and one more per
    stream_with_context body. The only wrong-order pops are Flask's own failures after the
    view that never pops, and nothing is popped on another worker."""
    run = matrix.guarded
    made = run.made()
    requests = len(run.outcomes) + run.extra_requests
    streams = made["swc"] + made["swc-large"]
    # Flask 3.2 sends appcontext_pushed for a request's own context too: the app
    # counted it apart (it holds the request), once per request.
    assert run.telemetry["request_pushes"] == (requests if MERGED else 0)
    pushes = {"app": run.telemetry["app_pushes"], "request": requests + streams}
    got_pushes = {dict(k)["ctxguard.context.kind"]: v for k, v in run.points(PUSHES).items()}
    wrong_or_cross = {
        f"{dict(k)['ctxguard.context.kind']} {dict(k)['ctxguard.pop.outcome']}": v
        for k, v in run.points(POPS).items()
        if dict(k)["ctxguard.pop.outcome"] != "ok" and v
    }
    # After the view that never pops, Flask up to 3.1 pops the request's app context
    # anyway and complains about it (``Popped wrong app context``); Flask 3.2 refuses
    # to pop the request's own context, which is not the active one.
    expected_wrong = {f"{'request' if MERGED else 'app'} wrong_context": made["leak-request-end"]}
    assert (got_pushes, wrong_or_cross) == (pushes, expected_wrong), (
        f"on {run.label}: pushes {got_pushes} (expected {pushes}), wrong-order or"
        f" cross-worker pops {wrong_or_cross} (expected {expected_wrong})"
    )


def expected_teardowns(run: Run) -> dict[str, int]:
    """How many contexts of each kind Flask must have torn down when ``/_telemetry``
    answered, from the app's own record: every context it pushed, but the ones the
    leaky views left (the thread's, which ended with it; the view's; on Flask 3.2 the
    request's own too, unless healed) and the one answering (its teardown comes later:
    up to 3.1 an app context, on 3.2 the request's own)."""
    made, report = run.made(), run.telemetry
    leaked = made["leak-request-end"]
    healed = {kind: 0 for kind in ("app", "request")}
    for key, value in (expected_reports(run)[HEALED] if run.guarded else {}).items():
        healed[dict(key)["ctxguard.context.kind"]] = value
    app = report["app_pushes"] - made["leak-thread-exit"] - leaked + healed["app"]
    if not MERGED:
        # Up to Flask 3.1 a request's context is an app context under a request
        # context (whose pop runs teardown_request only).
        return {"app": app - 1, "request": 0}
    request = report["request_pushes"] - leaked + healed["request"] - 1
    return {"app": app, "request": request}


def test_contexts_are_torn_down_as_flask_does_and_healing_tears_down(matrix: Pair) -> None:
    """Promise: ctxguard changes nothing in what Flask tears down, except that a stale
    context it heals is really popped: its ``teardown_appcontext`` runs, once. Counted
    by the app itself, bare and guarded: every context Flask pushed is torn down but
    those the leaky views left open (on Flask 3.2 the request's own too, which a
    guarded worker's next request heals) and the one answering the count."""
    got = {"bare": matrix.bare.telemetry["teardowns"]}
    got["guarded"] = matrix.guarded.telemetry["teardowns"]
    expected = {"bare": expected_teardowns(matrix.bare)}
    expected["guarded"] = expected_teardowns(matrix.guarded)
    healed = matrix.guarded.nonzero(HEALED)
    assert got == expected, (
        f"teardown_appcontext calls {got}, expected {expected} on {matrix.guarded.label}"
        f" (healed: {healed}, followed leaks: {matrix.guarded.telemetry['leaks_followed']})"
    )


def test_clean_requests_report_nothing(matrix: Pair) -> None:
    """Promise: a false report is as bad as a missed one. No clean request is reported:
    no leak found at a request's start (no shared context ever exists here, and a stale
    one, left by the view that never pops on Flask 3.2, was reported when its request
    ended), no heal but of those stale contexts, and every leak or error span names one
    of the leaky views, the line of the app that pushed or touched the context, and the
    route template; each counted kind of leak and error has its span. The only policy
    violation is Werkzeug's development server, where it is one."""
    run = matrix.guarded
    wanted_leaks = {
        ("app", "request_end", ROUTE_LEAK_END, "leak_request_end"),
        ("app", "thread_exit", ROUTE_LEAK_THREAD, "push_and_exit"),
    }
    if MERGED:
        # Flask 3.2 leaves the request's own context current under the view's; it has
        # no push site of the user's and takes the view's line.
        wanted_leaks.add(("request", "request_end", ROUTE_LEAK_END, "leak_request_end"))
    wanted_errors = {("request", "request", "thread", ROUTE_ERROR_THREAD, "read_request")}
    seen_leaks = Counter(
        (
            a.get("ctxguard.context.kind"),
            a.get("ctxguard.leak.site"),
            a.get("http.route"),
            _function(a),
        )
        for a in run.spans("ctxguard.context_leak")
    )
    seen_errors = Counter(
        (
            a.get("ctxguard.proxy"),
            a.get("ctxguard.context.kind"),
            a.get("ctxguard.worker.kind"),
            a.get("http.route"),
            _function(a),
        )
        for a in run.spans("ctxguard.context_error")
    )
    false_reports = [f"leak span {k} x{n}" for k, n in seen_leaks.items() if k not in wanted_leaks]
    false_reports += [
        f"error span {k} x{n}" for k, n in seen_errors.items() if k not in wanted_errors
    ]
    false_reports += diff_counts(HEALED, expected_reports(run)[HEALED], run.nonzero(HEALED))
    rules = {a.get("ctxguard.policy.rule") for a in run.spans("ctxguard.policy_violation")}
    if rules != ({"development_server"} if run.server.development else set()):
        false_reports.append(f"policy violation spans for rules {sorted(map(str, rules))}")
    missing = sorted(wanted_leaks - set(seen_leaks)) + sorted(wanted_errors - set(seen_errors))
    assert not false_reports and not missing, (
        f"on {run.label}: reports no request earned: {false_reports};"
        f" counted kinds without a span: {missing};"
        f" open contexts now: {json.dumps(run.telemetry['snapshot'])[:1500]}"
    )
