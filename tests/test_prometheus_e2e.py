"""From gunicorn workers to Prometheus, the dashboard's panels and Alertmanager, with
real parts on 127.0.0.1.

Two gunicorn deployments of tests/export/export_app.py (two workers each, the SDK
per worker as docs/production.md sets it up): job ``buggy`` runs the scenarios
users meet (a thread reading ``request``, threads leaving contexts pushed, a
streamed body leaving its context on the worker, a long-lived thread keeping
contexts, debug mode in production), job ``clean`` serves a clean app. Their
OTLP goes to a receiver in the test that exposes it for scraping as an
OpenTelemetry Collector's Prometheus exporter would (tests/otlp.py); Debian's
Prometheus scrapes it every second and evaluates the shipped rules, their
durations scaled from minutes to seconds, and sends to Debian's Alertmanager.

Checked: each alert fires for job ``buggy`` and none for ``clean``; Alertmanager
lists the firing alerts; every panel of the shipped dashboard returns data.
Needs ``prometheus`` and ``prometheus-alertmanager`` (Debian packages); without
them the test skips, unless ``CI_REQUIRE_TOOLS`` is set (CI sets it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("gunicorn")
pytest.importorskip("opentelemetry.proto")

from otlp import get, gunicorn, otlp_receiver, stop

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
ALERTS = {
    "CtxguardContextErrors",
    "CtxguardContextLeak",
    "CtxguardStaleContextHealed",
    "CtxguardOpenContextsGrowing",
    "CtxguardPolicyViolation",
}
#: The shipped rules' windows, from minutes to seconds (scrape and evaluation: 1 s).
SCALED = [
    ("rate(ctxguard_context_errors_total[5m])", "rate(ctxguard_context_errors_total[10s])"),
    ("[10m]", "[20s]"),
    ("offset 10m", "offset 20s"),
    ("[5m] offset 15m", "[4s] offset 8s"),
    ("open[5m]", "open[4s]"),
    ("for: 15m", "for: 5s"),
    ("for: 5m", "for: 3s"),
]


def binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        message = f"{name} not found (Debian: apt-get install prometheus prometheus-alertmanager)"
        if os.environ.get("CI_REQUIRE_TOOLS"):
            pytest.fail(message + "; CI_REQUIRE_TOOLS is set")
        pytest.skip(message)
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def process(command: list[str], log_path: Path, ready_url: str) -> Iterator[None]:
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    with urllib.request.urlopen(ready_url, timeout=2):
                        break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        pytest.fail(f"{command[0]} did not start:\n{log_path.read_text()[-3000:]}")
                    time.sleep(0.2)
            yield
        finally:
            stop(proc, 15)


def query(prometheus: str, promql: str) -> list[dict[str, Any]]:
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=10) as response:
        answer = json.load(response)
    assert answer["status"] == "success", answer
    return answer["data"]["result"]  # type: ignore[no-any-return]


def api(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def firing(prometheus: str) -> set[tuple[str, str]]:
    alerts = api(f"{prometheus}/api/v1/alerts")["data"]["alerts"]
    return {
        (a["labels"]["alertname"], a["labels"]["job"]) for a in alerts if a["state"] == "firing"
    }


def test_alerts_fire_for_each_scenario_only_and_every_panel_has_data(tmp_path):
    """The path a team runs: every alert of deploy/prometheus fires for the deployment whose
    scenario should trigger it and stays silent for the clean one, Alertmanager lists the
    firing alerts, and every panel of deploy/grafana returns data from that Prometheus."""
    prometheus_bin = binary("prometheus")
    alertmanager_bin = binary("prometheus-alertmanager")

    rules = (DEPLOY / "prometheus" / "ctxguard-rules.yml").read_text()
    for old, new in SCALED:
        assert old in rules, old
        rules = rules.replace(old, new)
    assert not re.search(r"\b\d+m\b", rules.split("groups:", 1)[1]), "a window left unscaled"
    (tmp_path / "rules.yml").write_text(rules)
    (tmp_path / "alertmanager.yml").write_text(
        "route:\n  receiver: test\n  group_wait: 1s\n  group_interval: 1s\n"
        "receivers:\n  - name: test\n"
    )

    with ExitStack() as stack:

        def scrape(path: str, received: Any) -> bytes | None:
            return received.exposition() if path == "/metrics" else None

        endpoint, received = stack.enter_context(otlp_receiver(scrape))
        bridge = endpoint.removeprefix("http://")
        am_port, prom_port = free_port(), free_port()
        alertmanager = f"http://127.0.0.1:{am_port}"
        prometheus = f"http://127.0.0.1:{prom_port}"
        (tmp_path / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files: [{tmp_path / 'rules.yml'}]\n"
            "alerting:\n  alertmanagers:\n"
            f"    - static_configs: [{{targets: ['127.0.0.1:{am_port}']}}]\n"
            "scrape_configs:\n"
            "  - job_name: otlp-bridge\n    honor_labels: true\n"
            f"    static_configs: [{{targets: ['{bridge}']}}]\n"
        )
        stack.enter_context(
            process(
                [
                    alertmanager_bin,
                    f"--config.file={tmp_path / 'alertmanager.yml'}",
                    f"--storage.path={tmp_path / 'am'}",
                    f"--web.listen-address=127.0.0.1:{am_port}",
                    "--cluster.listen-address=",
                ],
                tmp_path / "alertmanager.log",
                f"{alertmanager}/-/ready",
            )
        )
        stack.enter_context(
            process(
                [
                    prometheus_bin,
                    f"--config.file={tmp_path / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                ],
                tmp_path / "prometheus.log",
                f"{prometheus}/-/ready",
            )
        )
        buggy = stack.enter_context(
            gunicorn(
                endpoint,
                ["--worker-class", "gthread", "--threads", "4"],
                tmp_path / "buggy.log",
                {"OTEL_SERVICE_NAME": "buggy"},
                app_spec="export_app:create_app(debug=True)",
            )
        )
        clean = stack.enter_context(
            gunicorn(
                endpoint,
                ["--worker-class", "sync"],
                tmp_path / "clean.log",
                {"OTEL_SERVICE_NAME": "clean"},
                app_spec="export_app:create_app(clean=True)",
            )
        )

        stop = threading.Event()

        def traffic() -> None:
            i = 0
            while not stop.is_set():
                get(clean, "/")
                get(buggy, ["/spawn", "/spawn", "/hold", "/", "/stream", "/leak"][i % 6])
                i += 1
                time.sleep(0.05)

        loader = threading.Thread(target=traffic, daemon=True)
        loader.start()
        stack.callback(loader.join, 30)
        stack.callback(stop.set)

        deadline = time.monotonic() + 90
        expected = {(name, "buggy") for name in ALERTS}
        while firing(prometheus) != expected:
            unexpected = {a for a in firing(prometheus) if a[1] != "buggy"}
            assert not unexpected, f"alerts for the clean deployment: {unexpected}"
            if time.monotonic() > deadline:
                pytest.fail(
                    f"firing: {sorted(firing(prometheus))}, expected {sorted(expected)}\n"
                    + received.exposition().decode()[-4000:]
                )
            time.sleep(1)

        # Alertmanager got them from Prometheus.
        deadline = time.monotonic() + 30
        while True:
            listed = {
                (a["labels"]["alertname"], a["labels"]["job"])
                for a in api(f"{alertmanager}/api/v2/alerts")
                if a["status"]["state"] == "active"
            }
            if listed >= expected:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"Alertmanager lists {sorted(listed)}, expected {sorted(expected)}")
            time.sleep(1)
        assert {job for _, job in listed} == {"buggy"}

        # Every panel of the shipped dashboard, for the buggy deployment, has data.
        dashboard = json.loads((DEPLOY / "grafana" / "ctxguard-dashboard.json").read_text())
        for panel in dashboard["panels"]:
            (target,) = panel["targets"]
            promql = (
                target["expr"]
                .replace("$__rate_interval", "10s")
                .replace("$job", "buggy")
                .replace("$instance", ".*")
            )
            assert query(prometheus, promql), f"no data for panel {panel['title']!r}: {promql}"
        jobs = api(f"{prometheus}/api/v1/label/job/values?match[]=ctxguard_context_pushes_total")[
            "data"
        ]
        assert {"buggy", "clean"} <= set(jobs)
        # The clean deployment's own series are there too, and show nothing wrong.
        assert query(prometheus, 'ctxguard_context_pushes_total{job="clean"}')
        assert not query(prometheus, 'ctxguard_context_errors_total{job="clean"}')
        assert not query(prometheus, 'ctxguard_context_leaks_total{job="clean"}')
