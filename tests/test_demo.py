"""``ctxguard demo``, the README's first command: run for real, as a user would."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import ctxguard.demo

#: What the demo's client sends as its Authorization header, and the token in it.
AUTHORIZATION = ctxguard.demo.AUTHORIZATION
TOKEN = AUTHORIZATION.split(" ", 1)[1]

#: Runs the demo with the SDK's in-memory exporter and reader dumped to a file (argv[1])
#: when the demo shuts them down, with every log line ctxguard wrote, as JSON.
DUMPING = """
import json, sys
import ctxguard.demo as demo

dump = {"spans": [], "metrics": "", "logs": []}

class Dumping(demo.Recorded):
    def shutdown(self):
        dump["spans"] = [span.to_json() for span in self.exporter.get_finished_spans()]
        data = self.reader.get_metrics_data()
        dump["metrics"] = data.to_json() if data is not None else ""
        super().shutdown()

class Keeping(demo.Quiet):
    def __exit__(self, *exc_info):
        for capture in self.logs.values():
            dump["logs"] += [capture.format(r) for r in capture.records]
        super().__exit__(*exc_info)

demo.Recorded = Dumping
demo.Quiet = Keeping
code = demo.run()
with open(sys.argv[1], "w", encoding="utf-8") as out:
    json.dump(dump, out)
sys.exit(code)
"""


def _line_of(marker: str) -> int:
    """The line of ctxguard/demo.py that carries ``marker``."""
    lines = Path(ctxguard.demo.__file__).read_text(encoding="utf-8").splitlines()
    return next(n for n, line in enumerate(lines, start=1) if marker in line)


def _leak_rows(output: str) -> list[list[str]]:
    """The leaks table, one list of cells (split on runs of two spaces) per row."""
    table = output.split("Leaks (", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    return [re.split(r"\s{2,}", row.strip()) for row in table]


def _error_rows(output: str) -> list[list[str]]:
    """The errors table: proxy, worker, used at, route, thread."""
    table = output.split("Errors (", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    return [re.split(r"\s{2,}", row.strip()) for row in table]


def _paragraph(output: str, label: str) -> str:
    """One scenario's explanation, unwrapped."""
    found = re.search(rf"^  {re.escape(label)}:(.*?)(?=^  \S|^$)", output, re.M | re.S)
    assert found, f"no {label!r} line in:\n{output}"
    return " ".join(found.group(1).split())


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[str]:
    """`ctxguard demo`, run once for the tests that read its output."""
    return subprocess.run(
        [sys.executable, "-m", "ctxguard.cli", "demo"],
        cwd=tmp_path_factory.mktemp("demo"),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_demo_shows_every_scenario(demo: subprocess.CompletedProcess[str]) -> None:
    """`ctxguard demo` finishes, exits 0 and shows what ctxguard caught in each scenario:
    the view's leak at request_end naming its line, the flask#6123 stream healed at the
    next request, the ambient context reported once at request_start, and no leak from
    normal requests."""
    done = demo
    output = done.stdout
    assert done.returncode == 0, output + done.stderr
    assert "UNEXPECTED" not in output
    rows = _leak_rows(output)

    view_line = _line_of("# pushed, never popped")
    assert ["app", "request_end", f"demo.py:{view_line} leaky_view", "/leaky"] in [
        row[:4] for row in rows
    ]
    assert "1 pop with outcome wrong_context" in _paragraph(output, "1 view")

    stream = _paragraph(output, "2 flask#6123")
    assert re.search(r"counted [1-9]\d* leaks? at request_end", stream), stream
    assert re.search(r"healed [1-9]", stream), stream
    assert "teardown_appcontext ran: yes" in stream
    assert any(r[1] == "request_end" and r[3] == "/report.csv" for r in rows), rows

    ambient_line = _line_of("# pushed outside any request")
    ambient = [r for r in rows if r[1] == "request_start"]
    assert [r[:4] for r in ambient] == [
        ["app", "request_start", f"demo.py:{ambient_line} boot_worker", "-"]
    ]
    assert "reported it 1 time at request_start" in _paragraph(output, "3 ambient")
    assert "healed 0" in _paragraph(output, "3 ambient")

    assert _paragraph(output, "normal").endswith("all 200: 0 leaks.")
    assert done.stderr == ""


def test_demo_without_sdk_says_what_to_install(tmp_path: Path) -> None:
    """Without the OpenTelemetry SDK the demo names the install command and exits 1,
    instead of ending in a traceback."""
    blocked = (
        "import sys; sys.modules['opentelemetry.sdk'] = None\n"
        "from ctxguard.cli import main\n"
        "sys.exit(main(['demo']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", blocked], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert 'pip install "flask-ctxguard[demo]"' in done.stderr
    assert "Traceback" not in done.stderr


def test_demo_shows_the_seed_scenarios(demo: subprocess.CompletedProcess[str]) -> None:
    """The demo shows the three mistakes users report, each with the proxy, the user's
    file:line and function, the route that started the work and the hint: a view's
    background thread reading the Authorization header through a helper, current_app in
    a script with no app context, and a worker that pushes an app context and raises
    before popping it (a leak at thread_exit and at task_end, naming the push)."""
    output = demo.stdout
    assert demo.returncode == 0, output + demo.stderr
    assert "UNEXPECTED" not in output
    errors = _error_rows(output)
    leaks = _leak_rows(output)

    helper = f"demo.py:{_line_of('# read where there is no request')} current_user_id"
    route = "/orders/<int:order_id>/export"
    assert ["request", "thread", helper, route, "oplog"] in errors, errors
    thread = _paragraph(output, "4 thread")
    assert (
        'The thread logged "Failed to save the operation log: RuntimeError: Working outside'
        ' of request context."' in thread
    ), thread
    assert f"proxy request, at {helper}, worker thread, route {route} (POST," in thread
    assert "endpoint export_orders)" in thread
    assert (
        'hint: "This thread outlives the request that started it: pass the values it needs'
        " from `request` in as arguments, or wrap the function with"
        ' `flask.copy_current_request_context`."' in thread
    ), thread

    script = f"demo.py:{_line_of('# no application context in a script')} nightly_report"
    assert ["current_app", "main", script, "-", "MainThread"] in errors, errors
    paragraph = _paragraph(output, "5 script")
    assert "RuntimeError: Working outside of application context." in paragraph
    assert f"proxy current_app, at {script}, worker main, route - (" in paragraph
    assert (
        'hint: "No application context is pushed here: run this code inside'
        " `with app.app_context():`" in paragraph
    ), paragraph

    push = f"demo.py:{_line_of('# popped only when process_data() succeeds')} process_task"
    assert ["app", "thread_exit", push, "-", "queue-worker"] in leaks, leaks
    assert ["app", "task_end", push, "-", "task-worker_0"] in leaks, leaks
    worker = _paragraph(output, "6 worker")
    assert f"1 leak at thread_exit and 1 leak at task_end, both pushed at {push}." in worker
    assert "has_app_context() = True" in worker


def test_demo_never_shows_the_authorization_value(tmp_path: Path) -> None:
    """The Authorization header the demo's client sends reaches ctxguard's report (the
    thread that read it is named) but its value is nowhere: not in the output, not in any
    exported span (attributes, events, links) or metric point, not in a log line."""
    dump = tmp_path / "telemetry.json"
    done = subprocess.run(
        [sys.executable, "-c", DUMPING, str(dump)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    exported = json.loads(dump.read_text(encoding="utf-8"))
    spans = "\n".join(exported["spans"])
    # The dump holds what the scenario produced: the error span, its metric point, its log.
    assert "current_user_id" in spans
    assert "/orders/<int:order_id>/export" in exported["metrics"]
    assert any("current_user_id" in line for line in exported["logs"]), exported["logs"]
    for where, text in [
        ("stdout", done.stdout),
        ("stderr", done.stderr),
        ("spans", spans),
        ("metrics", exported["metrics"]),
        ("logs", "\n".join(exported["logs"])),
    ]:
        assert TOKEN not in text, f"the Authorization value is in the {where}"
    assert "appears in 0 of the" in _paragraph(done.stdout, "privacy")
