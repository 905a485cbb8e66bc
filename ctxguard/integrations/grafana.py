"""ctxguard's Grafana dashboard, built from the telemetry contract.

``python -m ctxguard.integrations.grafana > ctxguard-dashboard.json`` writes
the dashboard shipped as ``deploy/grafana/ctxguard-dashboard.json``: import it
as it is (Dashboards, New, Import). It asks for a Prometheus datasource and a
traces datasource (Tempo), and filters by ``job`` and ``instance``. Every
metric and label in its queries comes from ``ctxguard.integrations.prometheus``,
so a change to the contract changes the dashboard with it (a test checks that
the shipped file is this module's output).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from .. import telemetry
from .prometheus import label, metric

TITLE = "ctxguard: Flask context errors and leaks"
UID = "ctxguard"
#: Series of the selected jobs and processes.
SELECTOR = '{job=~"$job", instance=~"$instance"}'

PROXY = label(telemetry.PROXY)
KIND = label(telemetry.CONTEXT_KIND)
WORKER = label(telemetry.WORKER_KIND)
ROUTE = label(telemetry.HTTP_ROUTE)
SITE = label(telemetry.LEAK_SITE)
OUTCOME = label(telemetry.POP_OUTCOME)
RULE = label(telemetry.POLICY_RULE)
ACTION = label(telemetry.POLICY_ACTION)

PROMETHEUS = {"type": "prometheus", "uid": "${datasource}"}


def _target(expr: str, legend: str, *, instant: bool = False) -> dict[str, Any]:
    target: dict[str, Any] = {
        "datasource": PROMETHEUS,
        "expr": expr,
        "legendFormat": legend,
        "refId": "A",
    }
    if instant:
        target.update({"instant": True, "range": False, "format": "table"})
    return target


def _panel(
    title: str,
    description: str,
    target: dict[str, Any],
    grid: tuple[int, int, int, int],
    *,
    kind: str = "timeseries",
    unit: str = "short",
    links: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    x, y, w, h = grid
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": PROMETHEUS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit, "links": links or []}, "overrides": []},
        "options": {},
        "targets": [target],
    }


def _trace_link(span: str, attribute: str, field_label: str) -> dict[str, Any]:
    """A data link from a series to its spans in the traces datasource (TraceQL)."""
    value = f"${{__field.labels.{field_label}}}"
    return {
        "title": f"{span} spans",
        "url": "",
        "internal": {
            "datasourceUid": "${traces}",
            "datasourceName": "${traces}",
            "query": {
                "queryType": "traceql",
                "query": f'{{ name = "{span}" && span.{attribute} = "{value}" }}',
            },
        },
    }


def panels() -> list[dict[str, Any]]:
    errors = metric(telemetry.ERRORS)
    leaks = metric(telemetry.LEAKS)
    healed = metric(telemetry.HEALED)
    open_ = metric(telemetry.OPEN)
    violations = metric(telemetry.VIOLATIONS)
    pushes = metric(telemetry.PUSHES)
    pops = metric(telemetry.POPS)
    return [
        _panel(
            "Context errors per second, by proxy, route and worker kind",
            "Flask proxies used outside their context (the caller got a RuntimeError)."
            " Follow a series' link to its ctxguard.context_error spans: they name the"
            " line of code and carry the hint.",
            _target(
                f"sum by ({PROXY}, {ROUTE}, {WORKER}) (rate({errors}{SELECTOR}[$__rate_interval]))",
                f"{{{{{PROXY}}}}} {{{{{ROUTE}}}}} ({{{{{WORKER}}}}})",
            ),
            (0, 0, 24, 8),
            unit="ops",
            links=[_trace_link(telemetry.SPAN_CONTEXT_ERROR, telemetry.PROXY, PROXY)],
        ),
        _panel(
            "Leaked contexts, by site and kind",
            "Contexts pushed and never popped, counted where they were found. The first"
            " leak of a process starts its series: see the table beside for totals.",
            _target(
                f"sum by ({SITE}, {KIND}) (increase({leaks}{SELECTOR}[$__rate_interval]))",
                f"{{{{{SITE}}}}} ({{{{{KIND}}}}})",
            ),
            (0, 8, 12, 8),
            links=[_trace_link(telemetry.SPAN_CONTEXT_LEAK, telemetry.LEAK_SITE, SITE)],
        ),
        _panel(
            "Leaked contexts since each process started",
            "Totals per site and kind over the processes running now.",
            _target(
                f"sum by ({SITE}, {KIND}) ({leaks}{SELECTOR})",
                f"{{{{{SITE}}}}} ({{{{{KIND}}}}})",
                instant=True,
            ),
            (12, 8, 12, 8),
            kind="table",
        ),
        _panel(
            "Stale contexts healed",
            "Contexts an ended request left on a worker, popped by ctxguard at the next"
            " request so their teardown ran.",
            _target(
                f"sum by (instance, {KIND}) (increase({healed}{SELECTOR}[$__rate_interval]))",
                f"{{{{instance}}}} ({{{{{KIND}}}}})",
            ),
            (0, 16, 12, 8),
        ),
        _panel(
            "Contexts open now, by process",
            "Pushed and not yet popped: requests in flight, plus anything leaked.",
            _target(
                f"sum by (instance, {KIND}) ({open_}{SELECTOR})",
                f"{{{{instance}}}} ({{{{{KIND}}}}})",
            ),
            (12, 16, 12, 8),
        ),
        _panel(
            "Production policy violations, by rule",
            "Debug mode, the debugger, the development server or preserved contexts in"
            " production, and what ctxguard did about it.",
            _target(
                f"sum by (instance, {RULE}, {ACTION}) ({violations}{SELECTOR})",
                f"{{{{instance}}}} {{{{{RULE}}}}} ({{{{{ACTION}}}}})",
                instant=True,
            ),
            (0, 24, 12, 8),
            kind="table",
        ),
        _panel(
            "Pops per second, by outcome",
            "ok, wrong_context (popped out of order: the contexts above are orphaned),"
            " cross_worker (popped on another thread than the push).",
            _target(
                f"sum by ({OUTCOME}) (rate({pops}{SELECTOR}[$__rate_interval]))",
                f"{{{{{OUTCOME}}}}}",
            ),
            (12, 24, 6, 8),
            unit="ops",
        ),
        _panel(
            "Pushes per second, by kind",
            "Every application and request context pushed.",
            _target(
                f"sum by ({KIND}) (rate({pushes}{SELECTOR}[$__rate_interval]))",
                f"{{{{{KIND}}}}}",
            ),
            (18, 24, 6, 8),
            unit="ops",
        ),
    ]


def _variable(name: str, query: str, label_text: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label_text,
        "type": "query",
        "datasource": PROMETHEUS,
        "query": {"query": query, "refId": f"{name}-variable"},
        "refresh": 2,
        "multi": True,
        "includeAll": True,
        "allValue": ".*",
        "current": {},
        "sort": 1,
    }


def dashboard() -> dict[str, Any]:
    """The dashboard, as Grafana's JSON model."""
    pushes = metric(telemetry.PUSHES)
    templating = [
        {
            "name": "datasource",
            "label": "Prometheus",
            "type": "datasource",
            "query": "prometheus",
            "current": {},
        },
        {
            "name": "traces",
            "label": "Traces",
            "type": "datasource",
            "query": "tempo",
            "current": {},
        },
        _variable("job", f"label_values({pushes}, job)", "Job"),
        _variable("instance", f'label_values({pushes}{{job=~"$job"}}, instance)', "Process"),
    ]
    return {
        "uid": UID,
        "title": TITLE,
        "description": "Flask application and request context errors, leaks and policy"
        " violations, from ctxguard's metrics.",
        "tags": ["flask", "ctxguard"],
        "editable": True,
        "schemaVersion": 39,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "1m",
        "templating": {"list": templating},
        "panels": [{**panel, "id": i + 1} for i, panel in enumerate(panels())],
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, sort_keys=True) + "\n"


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
