"""pytest plugin for the peer suites: one ctxguard mode, and a record of what happened.

``run.py`` loads it into a peer project's own pytest run (``-p ctxguard_peer``
with ``--ctxguard-peer-mode``). Without that option it does nothing, so it is
harmless wherever else it gets loaded.

It acts in ``pytest_load_initial_conftests``, before the suite's conftest is
imported, so the suite's fixtures and apps are made under the mode:

* real OpenTelemetry SDK providers are set globally in every mode, so the
  modes differ only by ctxguard, and ctxguard's reports can be read back;
* ``plain``: nothing else (ctxguard is not even imported);
* ``install``: ``ctxguard.install()``, the process hooks only;
* ``guard``: ``flask.Flask.__init__`` ends with ``ctxguard.CtxGuard(self)``,
  so every app the suite makes is guarded with default arguments;
* ``plugin``: nothing here either: ``run.py`` enables ctxguard's own pytest
  plugin (loaded by its entry point in every mode) with ``--ctxguard=warn``,
  and its findings (warnings of its categories) are recorded with their tests.

In every mode it records whether ctxguard's pytest plugin was registered and
in which mode it ran, and which of ctxguard's modules were imported: in
``plain`` the plugin must be registered and do nothing.

It records each test's outcome by node id, and every ctxguard report (spans
of the ``ctxguard`` scope, non-zero increments of its synchronous counters)
with the test during which it happened: the exporter and the reader are read
before and after each test's whole protocol (setup, call, teardown), and what
came before the first test is "collection". The record is written as JSON at
the end of the session for ``run.py`` to compare and judge.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Generator, Mapping
from typing import Any

import pytest

MODES = ("plain", "install", "guard", "plugin")
#: The pytest plugin's module (its ``pytest11`` entry point is named ``ctxguard``).
PLUGIN_MODULE = "ctxguard.integrations.pytest_plugin"
SCOPE = "ctxguard"
#: The synchronous counters: each increment is a report.
COUNTERS = (
    "ctxguard.context.errors",
    "ctxguard.context.leaks",
    "ctxguard.context.healed",
    "ctxguard.policy.violations",
)
#: The observable ones: read at the end only, to prove ctxguard saw the suite's contexts.
OBSERVED = ("ctxguard.context.pushes", "ctxguard.context.pops", "ctxguard.context.open")
COLLECTION = "<collection>"
OUTSIDE = "<outside tests>"
#: Enough of a failure's text to tell why it failed; the log has the rest.
LONGREPR_CHARS = 6000


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ctxguard-peer", "ctxguard peer suites (tests/peer/run.py)")
    group.addoption(
        "--ctxguard-peer-mode",
        choices=MODES,
        default=None,
        help="plain, install (ctxguard.install()), guard (CtxGuard(app) on every Flask app) or"
        " plugin (ctxguard's pytest plugin, enabled by run.py)",
    )
    group.addoption("--ctxguard-peer-out", default=None, help="write the record here (JSON)")
    group.addoption(
        "--ctxguard-peer-module",
        action="append",
        default=[],
        help="record the file this module was imported from (repeatable)",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    """Set up the mode before the suite's conftest runs (it may create apps at import)."""
    options = early_config.known_args_namespace
    mode = getattr(options, "ctxguard_peer_mode", None)
    if mode is None:
        return
    recorder = Recorder(mode, options.ctxguard_peer_out, options.ctxguard_peer_module)
    recorder.start()
    early_config.pluginmanager.register(recorder, "ctxguard-peer-recorder")


def _plain(value: Any) -> Any:
    """An attribute value as JSON (OpenTelemetry sequences are tuples)."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _attributes(attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    return {key: _plain(value) for key, value in (attributes or {}).items()}


def _frozen(attributes: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    return tuple(
        sorted(
            (k, tuple(v) if isinstance(v, list) else v) for k, v in _attributes(attributes).items()
        )
    )


def _span(span: Any) -> dict[str, Any]:
    return {
        "name": span.name,
        "attributes": _attributes(span.attributes),
        "events": [
            {"name": event.name, "attributes": _attributes(event.attributes)}
            for event in span.events
        ],
        "links": len(span.links),
        "status": span.status.status_code.name,
    }


class Recorder:
    """The mode's set-up, and the outcomes and ctxguard reports of one pytest session."""

    def __init__(self, mode: str, out: str | None, modules: list[str]) -> None:
        self.mode = mode
        self.out = out
        self.modules = modules
        self.started = time.monotonic()
        self.outcomes: dict[str, dict[str, Any]] = {}
        # bucket (COLLECTION, a node id, OUTSIDE) -> {"spans": [...], "counters": [...]}
        self.reports: dict[str, dict[str, list[dict[str, Any]]]] = {}
        self.bucket = COLLECTION
        self.tests_run = 0
        self.apps_made = 0
        self.apps_guarded = 0
        self.installed: bool | None = None
        self.findings: list[dict[str, Any]] = []
        self._spans_seen = 0
        self._counted: dict[tuple[str, tuple[tuple[str, Any], ...]], float] = {}
        self._observed: dict[str, list[dict[str, Any]]] = {}

    # -- set-up

    def start(self) -> None:
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        self.exporter = InMemorySpanExporter()
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        trace.set_tracer_provider(tracer_provider)
        self.reader = InMemoryMetricReader()
        meter_provider = MeterProvider(metric_readers=[self.reader])
        metrics.set_meter_provider(meter_provider)
        # The API keeps the first provider set: make sure it is ours, or nothing would be seen.
        if trace.get_tracer_provider() is not tracer_provider:
            raise pytest.UsageError("ctxguard-peer: a tracer provider was already set")
        if metrics.get_meter_provider() is not meter_provider:
            raise pytest.UsageError("ctxguard-peer: a meter provider was already set")

        import flask  # imported in every mode, so that the modes differ only by ctxguard

        if self.mode == "install":
            import ctxguard

            self.installed = ctxguard.install()
        elif self.mode == "guard":
            self._guard_every_app(flask.Flask)

    def _guard_every_app(self, flask_class: type) -> None:
        """Make ``Flask.__init__`` end with ``CtxGuard(self)``, as an application would."""
        import ctxguard

        original = flask_class.__init__
        recorder = self

        @functools.wraps(original)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **kwargs)
            recorder.apps_made += 1
            ctxguard.CtxGuard(self)
            if ctxguard.CtxGuard.middleware(self) is not None:
                recorder.apps_guarded += 1

        flask_class.__init__ = __init__  # type: ignore[misc]

    # -- attributing reports

    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item) -> Generator[None, None, None]:
        self._collect(self.bucket)
        self.bucket = item.nodeid
        self.tests_run += 1
        yield
        self._collect(item.nodeid)
        self.bucket = OUTSIDE

    def _collect(self, bucket: str) -> None:
        """Move the spans and counter increments seen since the last call into ``bucket``."""
        spans = self.exporter.get_finished_spans()
        fresh = spans[self._spans_seen :]
        self._spans_seen = len(spans)
        found = [
            _span(span)
            for span in fresh
            if span.instrumentation_scope is not None and span.instrumentation_scope.name == SCOPE
        ]
        counted = []
        for (name, attributes), value in self._read_counters().items():
            delta = value - self._counted.get((name, attributes), 0)
            if delta:
                counted.append({"name": name, "attributes": dict(attributes), "value": delta})
                self._counted[(name, attributes)] = value
        if found or counted:
            reports = self.reports.setdefault(bucket, {"spans": [], "counters": []})
            reports["spans"].extend(found)
            reports["counters"].extend(counted)

    def _read_counters(self) -> dict[tuple[str, tuple[tuple[str, Any], ...]], float]:
        """Cumulative values of ctxguard's counters (and the observable ones, kept aside)."""
        data = self.reader.get_metrics_data()
        values: dict[tuple[str, tuple[tuple[str, Any], ...]], float] = {}
        observed: dict[str, list[dict[str, Any]]] = {}
        for resource_metrics in data.resource_metrics if data is not None else ():
            for scope_metrics in resource_metrics.scope_metrics:
                if scope_metrics.scope.name != SCOPE:
                    continue
                for metric in scope_metrics.metrics:
                    for point in metric.data.data_points:
                        if metric.name in COUNTERS:
                            values[(metric.name, _frozen(point.attributes))] = point.value
                        elif metric.name in OBSERVED:
                            observed.setdefault(metric.name, []).append(
                                {"attributes": _attributes(point.attributes), "value": point.value}
                            )
        self._observed = observed
        return values

    # -- outcomes

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            entry = self.outcomes.setdefault(report.nodeid or "<session>", {})
            entry["outcome"] = "error"
            entry["phase"] = "collect"
            entry.update(_failure(report))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        entry = self.outcomes.setdefault(report.nodeid, {"outcome": None})
        xfail = hasattr(report, "wasxfail")
        if report.when == "call":
            outcome = ("xfailed" if report.skipped else "xpassed") if xfail else report.outcome
        elif report.when == "setup":
            if report.passed:
                return
            outcome = "error" if report.failed else ("xfailed" if xfail else "skipped")
        else:  # teardown: only a failure changes the outcome
            if not report.failed:
                return
            outcome = "error"
        entry["outcome"] = outcome
        if report.failed:
            entry.setdefault("phase", report.when)
            entry.setdefault("summary", _failure(report)["summary"])
            entry["longrepr"] = (entry.get("longrepr", "") + _failure(report)["longrepr"])[
                -LONGREPR_CHARS:
            ]
        elif report.skipped and isinstance(report.longrepr, tuple):
            entry["summary"] = str(report.longrepr[2])

    # -- the pytest plugin's findings

    def pytest_warning_recorded(
        self, warning_message: Any, when: str, nodeid: str, location: Any
    ) -> None:
        """A warning of the plugin's categories: one finding (or a fault of the plugin)."""
        category = warning_message.category
        plugin = sys.modules.get(PLUGIN_MODULE)
        if plugin is None or not isinstance(category, type):
            return
        if not issubclass(category, (plugin.CtxGuardWarning, plugin.CtxGuardPluginWarning)):
            return
        self.findings.append(
            {
                "test": nodeid or (COLLECTION if when == "collect" else OUTSIDE),
                "when": when,
                "category": category.__name__,
                "message": str(warning_message.message),
                "filename": warning_message.filename,
                "lineno": warning_message.lineno,
            }
        )

    # -- the end

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        self._collect(self.bucket)
        if self.out is None:
            return
        record = {
            "mode": self.mode,
            "exitstatus": int(exitstatus),
            "duration": round(time.monotonic() - self.started, 3),
            "python": sys.version.split()[0],
            "pytest": pytest.__version__,
            "rootdir": str(session.config.rootpath),
            "inifile": str(session.config.inipath) if session.config.inipath else None,
            "modules": {
                name: getattr(sys.modules.get(name), "__file__", None)
                for name in ["flask", "werkzeug", "ctxguard", *self.modules]
            },
            "ctxguard": {
                "imported": "ctxguard" in sys.modules,
                "modules": sorted(m for m in sys.modules if m.split(".")[0] == "ctxguard"),
                "pytest_plugin": _pytest_plugin(session.config),
                "installed_at_start": self.installed,
                "hooks_installed_at_end": _hooks_installed(),
                "apps_made": self.apps_made,
                "apps_guarded": self.apps_guarded,
                "observed": self._observed,
            },
            "tests_run": self.tests_run,
            "outcomes": self.outcomes,
            "reports": self.reports,
            "findings": self.findings,
        }
        os.makedirs(os.path.dirname(os.path.abspath(self.out)), exist_ok=True)
        with open(self.out, "w", encoding="utf-8") as file:
            json.dump(record, file, indent=1, default=repr)


def _pytest_plugin(config: pytest.Config) -> dict[str, Any]:
    """Was ctxguard's pytest plugin registered (by its entry point), and in which mode?"""
    plugin = config.pluginmanager.get_plugin("ctxguard")
    summary = None
    if plugin is not None:
        try:
            summary = plugin.summary(config)
        except Exception as exc:  # an older plugin: say so rather than fail the record
            summary = {"mode": f"unknown ({exc!r})"}
    return {
        "registered": plugin is not None,
        "module": getattr(plugin, "__name__", None),
        "mode": summary["mode"] if summary else None,
        "summary": summary,
    }


def _hooks_installed() -> bool | None:
    process = sys.modules.get("ctxguard.process")
    return None if process is None else bool(process.installed())


def _failure(report: pytest.CollectReport | pytest.TestReport) -> dict[str, str]:
    crash = getattr(report.longrepr, "reprcrash", None)
    summary = getattr(crash, "message", None) or report.longreprtext.strip().splitlines()[-1:]
    if isinstance(summary, list):
        summary = summary[0] if summary else ""
    return {
        "summary": summary.splitlines()[0][:500] if summary else "",
        "longrepr": report.longreprtext[-LONGREPR_CHARS:],
    }
