"""``ctxguard demo``, the README's first command: run for real, as a user would."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import ctxguard.demo


def _line_of(marker: str) -> int:
    """The line of ctxguard/demo.py that carries ``marker``."""
    lines = Path(ctxguard.demo.__file__).read_text(encoding="utf-8").splitlines()
    return next(n for n, line in enumerate(lines, start=1) if marker in line)


def _leak_rows(output: str) -> list[list[str]]:
    """The leaks table, one list of cells (split on runs of two spaces) per row."""
    table = output.split("Leaks (", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    return [re.split(r"\s{2,}", row.strip()) for row in table]


def _paragraph(output: str, label: str) -> str:
    """One scenario's explanation, unwrapped."""
    found = re.search(rf"^  {re.escape(label)}:(.*?)(?=^  \S|^$)", output, re.M | re.S)
    assert found, f"no {label!r} line in:\n{output}"
    return " ".join(found.group(1).split())


def test_demo_shows_every_scenario(tmp_path: Path) -> None:
    """`ctxguard demo` finishes, exits 0 and shows what ctxguard caught in each scenario:
    the view's leak at request_end naming its line, the flask#6123 stream healed at the
    next request, the ambient context reported once at request_start, and no leak from
    normal requests."""
    done = subprocess.run(
        [sys.executable, "-m", "ctxguard.cli", "demo"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
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
    assert 'pip install "ctxguard[demo]"' in done.stderr
    assert "Traceback" not in done.stderr
