"""ctxguard next to OpenTelemetry's Flask and threading instrumentations and Sentry's threading
integration, installed in the same process in various orders.

These patch process-wide state that ctxguard's uninstall cannot undo, so each case runs
tests/threads_coexist.py in a subprocess; every case is compared with the same process without
ctxguard (the baseline), so "keeps working" means "does what it does without ctxguard".
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from typing import Any

import pytest
from helpers import line_of

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "threads_coexist.py")
ROUTE = "/items/<int:item_id>"
OUTSIDE = "RuntimeError: Working outside of request context."
CTXGUARD_STEPS = ("ctxguard", "ctxguard_process")

ORDERS = {
    "otel-ctxguard-first": "ctxguard,flask_app,threading",
    "otel-ctxguard-middle": "threading,ctxguard,flask_app",
    "otel-ctxguard-last": "flask_app,threading,ctxguard",
    "sentry-ctxguard-first": "ctxguard,sentry",
    "sentry-ctxguard-last": "sentry,ctxguard",
    "all-ctxguard-first": "ctxguard,flask_app,threading,sentry",
    "all-ctxguard-middle": "threading,flask_app,ctxguard,sentry",
    "all-ctxguard-last": "sentry,threading,flask_app,ctxguard",
    "all-global-flask-instrumentor": "ctxguard_process,flask_global,sentry,threading,ctxguard",
}


class Run:
    """One run of the script: its JSON report and its stderr."""

    def __init__(self, steps: str) -> None:
        done = subprocess.run(
            [sys.executable, SCRIPT, steps],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=HERE,
        )
        assert done.returncode == 0, done.stderr
        self.stderr = done.stderr
        self.report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        self.steps: list[str] = self.report["steps"]

    def __getitem__(self, key: str) -> Any:
        return self.report[key]

    def spans(self, name: str | None = None, *, before_uninstall: bool = False) -> list[Any]:
        found = self["before_uninstall"]["spans"] if before_uninstall else self["spans"]
        return [s for s in found if name is None or s["name"] == name]

    def server_spans(self) -> list[tuple[str, str | None]]:
        return [
            (s["name"], s["attributes"].get("http.route"))
            for s in self.spans()
            if s["kind"] == "SERVER"
        ]


@functools.cache
def run(steps: str) -> Run:
    return Run(steps)


def baseline_of(steps: str) -> Run:
    """The same instrumentations in the same order, without ctxguard."""
    return run(",".join(s for s in steps.split(",") if s not in CTXGUARD_STEPS))


def propagated(seen: dict[str, Any], key: str) -> bool:
    """Did the worker see the request's span as current?"""
    return seen.get(key) is not None and seen[key] == seen["view span"]


@pytest.fixture(params=list(ORDERS), ids=list(ORDERS))
def order(request: pytest.FixtureRequest) -> str:
    return ORDERS[request.param]


def test_ctxguard_reports_exactly_the_real_errors(order):
    """Whatever else is installed, and in whatever order: the thread and the Timer that touch
    ``request`` are each reported once with the route of the request that started them (and
    linked to the OpenTelemetry server span when there is one); the copied request context in
    an executor (open-telemetry/opentelemetry-python-contrib#1653) and in a ``call_on_close``
    callback (its #1692) are not reported; nothing is reported after ``uninstall()``."""
    r = run(order)
    assert r["responses"] == [
        ["200 OK", "started"],
        ["200 OK", "copied"],
        ["200 OK", "closing"],
        ["200 OK", "started"],
    ]
    assert r["seen"]["close"] == {"route": "/close"}

    errors = r.spans("ctxguard.context_error", before_uninstall=True)
    by_function = {s["attributes"]["code.function.name"]: s for s in errors}
    assert sorted(by_function) == ["touch_in_timer", "touch_request"]
    markers = {"touch_request": "# touch: coexist", "touch_in_timer": "# touch: timer"}
    for function, span in by_function.items():
        attrs = span["attributes"]
        assert attrs["ctxguard.proxy"] == "request"
        assert attrs["ctxguard.worker.kind"] == "thread"
        assert attrs["http.route"] == ROUTE
        assert attrs["http.request.method"] == "GET"
        assert attrs["ctxguard.origin.endpoint"] == "show_item"
        assert attrs["code.line.number"] == line_of(SCRIPT, markers[function])
    assert r.spans("ctxguard.context_leak") == []
    assert r["errors"] == 2
    assert r["leaks"] == 0
    # After uninstall the same request reports nothing (the global provider is the same
    # in-memory one, so anything ctxguard still emitted would be here).
    assert [s for s in r.spans() if s["name"].startswith("ctxguard.")] == errors
    assert "ctxguard: internal error" not in r.stderr

    if "flask_app" in r.steps or "flask_global" in r.steps:
        view_span = r["seen"]["first"]["view span"]
        for span in errors:
            assert span["links"] == [view_span]
        assert view_span in {s["span_id"] for s in r.spans() if s["kind"] == "SERVER"}


def test_other_instrumentations_keep_working(order):
    """OpenTelemetry's server spans, its context in threads and tasks, and Sentry's scope
    forking and exception capture in threads behave exactly as they do without ctxguard,
    before and after ``uninstall()``; the user's exception reaches ``threading.excepthook``
    unchanged."""
    r, b = run(order), baseline_of(order)

    assert r["responses"] == b["responses"]
    assert r["hook_errors"] == b["hook_errors"] == [OUTSIDE] * 4
    assert r.server_spans() == b.server_spans()
    for round_ in ("first", "copy", "after"):
        for key in ("span", "timer span"):
            if propagated(b["seen"][round_], key):
                assert propagated(r["seen"][round_], key), (round_, key)
    assert r["sentry"] == b["sentry"]
    if "Failed to detach context" not in b.stderr:
        assert "Failed to detach context" not in r.stderr

    if "flask_app" in r.steps or "flask_global" in r.steps:
        assert r.server_spans() == [
            ("GET " + ROUTE, ROUTE),
            ("GET /copy", "/copy"),
            ("GET /close", "/close"),
            ("GET " + ROUTE, ROUTE),
        ]
    if "threading" in r.steps:
        # The copied task in the executor sees the request's span (#1653's setting).
        assert propagated(r["seen"]["copy"], "span")
        if "sentry" not in r.steps:
            # Sentry's own start wrapper bypasses OpenTelemetry's class-level run wrapper
            # (baseline); without it, the thread and the Timer see the request's span.
            for round_ in ("first", "after"):
                assert propagated(r["seen"][round_], "span")
                assert propagated(r["seen"][round_], "timer span")
    if "sentry" in r.steps:
        # Sentry's run wrapper ran in the threads: it captured their exception, on a scope
        # forked from the view's (which carries the view's tag).
        thread_events = [e for e in r["sentry"] if e["exception"]]
        assert len(thread_events) >= 2
        for event in thread_events:
            assert event["exception"] == [["RuntimeError", "Working outside of request context."]]
            assert event["tags"] == {"origin": "view"}
        assert [e for e in r["sentry"] if not e["exception"]] == [
            {"message": "from the copied task", "exception": [], "tags": {"origin": "copy view"}}
        ]


def test_identity_and_uninstall_leave_the_others_in_place(order):
    """Every instrumentation really patched what it patches; the wrapped callables keep their
    names; ``uninstall()`` puts back what was there before ctxguard where ctxguard's wrapper
    was outermost, and leaves a newer wrapper (Sentry's, OpenTelemetry's) where one was put
    over it."""
    r = run(order)
    first_ctxguard = next(s for s in r.steps if s in CTXGUARD_STEPS)
    assert r["changed"][first_ctxguard][:2] == [True, True]
    if "sentry" in r.steps:
        assert r["changed"]["sentry"][:2] == [True, True]  # its setup_once patched them
    if "threading" in r.steps:
        assert r["changed"]["threading"] == [True, True, True]
    assert r["identity"] == {"start": "start", "submit": "submit", "timer start": "start"}
    assert r["restored"] == [True, True, True]
