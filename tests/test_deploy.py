"""The alerting rules and the dashboard shipped in deploy/: valid, tested, and in
step with the telemetry contract.

promtool comes with Prometheus (Debian: ``apt-get install prometheus``). Without
it these tests skip, unless ``CI_REQUIRE_TOOLS`` is set (CI sets it), so a
missing install step fails CI instead of hiding a test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import call

from ctxguard import telemetry
from ctxguard import telemetry as telemetry_module
from ctxguard.integrations import grafana, prometheus

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
RULES = DEPLOY / "prometheus" / "ctxguard-rules.yml"
RULES_TESTS = DEPLOY / "prometheus" / "ctxguard-rules.test.yml"
RUNBOOK = Path(__file__).resolve().parent.parent / "docs" / "runbook.md"


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        message = "promtool not found (Debian: apt-get install prometheus)"
        if os.environ.get("CI_REQUIRE_TOOLS"):
            pytest.fail(message + "; CI_REQUIRE_TOOLS is set")
        pytest.skip(message)
    return found


def test_the_rules_file_is_valid_prometheus():
    """Prometheus loads the shipped rules file as it is (promtool check rules)."""
    result = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 5 rules found" in result.stdout


def test_every_alert_fires_when_it_should_and_only_then():
    """promtool's unit tests of the rules: each alert fires for the series its scenario
    makes (including a first event, whose series starts at 1, and a start-up policy
    violation that never moves) and stays silent for a clean or restarted worker."""
    result = subprocess.run(
        [promtool(), "test", "rules", RULES_TESTS.name],
        capture_output=True,
        text=True,
        cwd=RULES_TESTS.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def _used_names(text: str) -> set[str]:
    return set(re.findall(r"\b(ctxguard_[a-z_]+|http_route)\b", text))


def test_the_rules_use_only_names_of_the_telemetry_contract():
    """Every metric and label a rule names is one ctxguard emits, as Prometheus names it
    (a renamed metric would leave an alert that can never fire)."""
    known = prometheus.names()
    labels = {name for series_labels in known.values() for name in series_labels}
    rules = RULES.read_text()
    unknown = _used_names(rules) - set(known) - labels
    assert not unknown, f"not in the telemetry contract: {sorted(unknown)}"
    # Each metric appears with labels it really has.
    for metric, selector_labels in re.findall(r"(ctxguard_[a-z_]+)\{([^}]*)\}", rules):
        for name in re.findall(r"(\w+)\s*=", selector_labels):
            assert name in known[metric], (metric, name)


def test_each_alert_links_to_its_runbook_section():
    """Each alert's runbook_url is a section of docs/runbook.md that exists."""
    rules = RULES.read_text()
    alerts = re.findall(r"- alert: (\w+)", rules)
    anchors = re.findall(r'runbook_url: "docs/runbook\.md#([\w-]+)"', rules)
    assert [a.lower() for a in alerts] == anchors
    headings = {
        re.sub(r"[^\w-]", "", line.lstrip("#").strip().lower().replace(" ", "-"))
        for line in RUNBOOK.read_text().splitlines()
        if line.startswith("## ")
    }
    assert set(anchors) <= headings, sorted(set(anchors) - headings)


def test_prometheus_names_follow_the_opentelemetry_translation():
    """Counters get _total, the gauge keeps its name, dots become underscores."""
    assert prometheus.metric(telemetry.ERRORS) == "ctxguard_context_errors_total"
    assert prometheus.metric(telemetry.PUSHES) == "ctxguard_context_pushes_total"
    assert prometheus.metric(telemetry.OPEN) == "ctxguard_context_open"
    assert prometheus.label(telemetry.HTTP_ROUTE) == "http_route"
    with pytest.raises(KeyError):
        prometheus.metric("ctxguard.not.a.metric")


DASHBOARD = DEPLOY / "grafana" / "ctxguard-dashboard.json"


def _dashboard_queries() -> list[str]:
    model = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for panel in model["panels"] for t in panel["targets"]]
    queries += [v["query"]["query"] for v in model["templating"]["list"] if v["type"] == "query"]
    return queries


def test_the_shipped_dashboard_is_what_the_code_builds():
    """deploy/grafana/ctxguard-dashboard.json is `python -m ctxguard.integrations.grafana`'s
    output, so it changes with the telemetry contract (regenerate it when this fails)."""
    assert DASHBOARD.read_text() == grafana.render()


def test_the_dashboard_uses_only_names_of_the_telemetry_contract():
    """Every metric and label of every panel and variable query exists, as Prometheus
    names ctxguard's telemetry, and each panel filters by the job and process selectors."""
    known = prometheus.names()
    labels = {name for series_labels in known.values() for name in series_labels}
    queries = _dashboard_queries()
    unknown = set().union(*(_used_names(q) for q in queries)) - set(known) - labels
    assert not unknown, f"not in the telemetry contract: {sorted(unknown)}"
    for query in queries:
        # Each query groups and filters by labels its own metric has.
        (metric_name,) = _used_names(query) & set(known)
        assert _used_names(query) - {metric_name} <= set(known[metric_name]), query
    panels = [q for q in queries if not q.startswith("label_values")]
    assert len(panels) == 8
    assert all('{job=~"$job", instance=~"$instance"}' in q for q in panels)


def test_every_dashboard_query_is_valid_promql(tmp_path):
    """Each query, with Grafana's variables filled in, parses as PromQL (promtool)."""
    queries = [
        q.replace("$__rate_interval", "5m").replace("$job", ".*").replace("$instance", ".*")
        for q in _dashboard_queries()
        if not q.startswith("label_values")
    ]
    rules = "groups:\n  - name: dashboard\n    rules:\n" + "".join(
        f"      - record: dashboard:query{i}\n        expr: {json.dumps(q)}\n"
        for i, q in enumerate(queries)
    )
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(rules)
    result = subprocess.run(
        [promtool(), "check", "rules", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


def test_the_error_panel_links_each_series_to_its_spans():
    """The context-errors panel links a series to the ctxguard.context_error spans of its
    proxy in the traces datasource chosen on the dashboard (where the line and hint are)."""
    model = grafana.dashboard()
    (link,) = model["panels"][0]["fieldConfig"]["defaults"]["links"]
    assert link["internal"]["datasourceUid"] == "${traces}"
    assert link["internal"]["query"]["query"] == (
        '{ name = "ctxguard.context_error"'
        ' && span.ctxguard.proxy = "${__field.labels.ctxguard_proxy}" }'
    )
    names = {v["name"]: v for v in model["templating"]["list"]}
    assert names["datasource"]["query"] == "prometheus"
    assert names["traces"]["query"] == "tempo"


def test_each_metric_carries_only_the_attributes_the_dashboard_and_rules_group_by(telemetry):
    """What ctxguard really records (a thread's error started by a request, a context the
    thread leaves pushed, a policy violation, pushes, pops and open contexts) carries only
    attribute keys of telemetry.METRIC_ATTRIBUTES, which the Prometheus names, the
    dashboard and the rules are built from (the healed counter's are checked with the
    healing tests: its one attribute is the context kind)."""
    import threading

    from flask import Flask, request

    import ctxguard

    app = Flask("deployapp")
    app.debug = True  # a policy violation in production, reported once at init

    @app.route("/work/<int:n>")
    def work(n: int) -> str:
        def job() -> None:
            try:
                request.method  # noqa: B018
            except RuntimeError:
                pass
            app.app_context().push()  # never popped: a thread_exit leak

        thread = threading.Thread(target=job)
        thread.start()
        thread.join()
        return "ok"

    ctxguard.CtxGuard(app, environment="production", policy="warn", **telemetry.providers)
    call(app.wsgi_app, "/work/1")
    call(app.wsgi_app, "/work/2")

    seen = set()
    for name, allowed in telemetry_module.METRIC_ATTRIBUTES.items():
        for attributes, _ in telemetry.points(name):
            seen.add(name)
            assert set(attributes) <= set(allowed), (name, attributes)
    assert seen == set(telemetry_module.METRIC_ATTRIBUTES) - {telemetry_module.HEALED}
    errors = telemetry.points(telemetry_module.ERRORS)
    assert {a.get(telemetry_module.HTTP_ROUTE) for a, _ in errors} == {"/work/<int:n>"}
