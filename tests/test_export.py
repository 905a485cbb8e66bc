"""ctxguard's telemetry leaves a multi-worker gunicorn over OTLP, as docs/production.md
sets it up, and arrives right: decoded here from the real protobuf messages.

A receiver in the test accepts OTLP/HTTP (``/v1/traces``, ``/v1/metrics``) on
127.0.0.1 and decodes each request with opentelemetry-proto. gunicorn runs
tests/export/export_app.py with two workers and ctxguard.integrations.gunicorn
(the SDK per worker in ``post_worker_init``, a resource per process, a final export in
``worker_exit``), for each worker class, with and without ``--preload``, and with
workers restarted by ``--max-requests``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("gunicorn")
pytest.importorskip("opentelemetry.proto")

from otlp import attributes_of, get, gunicorn, otlp_receiver, wait_for

ERRORS = "ctxguard.context.errors"
LEAKS = "ctxguard.context.leaks"
PUSHES = "ctxguard.context.pushes"
ERROR_SPAN = "ctxguard.context_error"
LEAK_SPAN = "ctxguard.context_leak"


SHAPES = {
    "sync": ["--worker-class", "sync"],
    "gthread": ["--worker-class", "gthread", "--threads", "4"],
    "gthread-preload": ["--worker-class", "gthread", "--threads", "4", "--preload"],
    "gevent": ["--worker-class", "gevent"],
    "gevent-preload": ["--worker-class", "gevent", "--preload"],
    "sync-max-requests": ["--worker-class", "sync", "--max-requests", "7"],
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_workers_telemetry_arrives_over_otlp_true_to_the_ground_truth(shape, tmp_path):
    """From every worker of a real gunicorn, ctxguard's counters arrive over OTLP equal to
    what the app really did (summed over the processes, each told apart by its
    service.instance.id, restarted workers included), and its spans arrive with their
    names and attributes, each error span linking to the trace of the request that
    started the thread."""
    if "gevent" in shape:
        pytest.importorskip("gevent")
    spawned, leaked = 24, 6
    log_path = tmp_path / "gunicorn.log"
    with otlp_receiver() as (endpoint, received):
        with gunicorn(endpoint, SHAPES[shape], log_path) as port:
            pids = set()
            for i in range(spawned):
                pids.add(get(port, "/spawn"))
                if i % 4 == 0:
                    pids.add(get(port, "/leak"))
            wait_for(
                lambda: (
                    received.total(ERRORS) == spawned
                    and received.total(LEAKS) == leaked
                    and len(received.named(ERROR_SPAN)) > 0
                ),
                f"{spawned} errors and {leaked} leaks in the metrics",
                log_path,
            )
            server_spans = {
                span.trace_id: span
                for _, span in received.spans
                if span.name == "GET /spawn" and span.kind == span.SPAN_KIND_SERVER
            }
        # After the server stopped (and each worker's last export): nothing more, nothing less.
        assert received.total(ERRORS) == spawned
        assert (
            received.total(
                ERRORS,
                **{
                    "ctxguard.proxy": "request",
                    "ctxguard.context.kind": "request",
                    "ctxguard.worker.kind": "thread",
                    "http.route": "/spawn",
                },
            )
            == spawned
        )
        assert (
            received.total(
                LEAKS, **{"ctxguard.context.kind": "app", "ctxguard.leak.site": "thread_exit"}
            )
            == leaked
        )
        assert received.content_types == {"application/x-protobuf"}

    # One series set per worker process: every pid that answered is an instance.
    instances = received.instances(PUSHES)
    assert {instance.rsplit(":", 1)[1] for instance in instances} >= pids
    if shape == "sync-max-requests":
        assert len(instances) > 2  # restarted workers reported as processes of their own

    error_spans = received.named(ERROR_SPAN)
    assert error_spans
    for resource, span in error_spans:
        attributes = attributes_of(span.attributes)
        assert resource["service.name"] == "web"
        assert attributes["ctxguard.proxy"] == "request"
        assert attributes["ctxguard.worker.kind"] == "thread"
        assert attributes["http.route"] == "/spawn"
        assert attributes["http.request.method"] == "GET"
        assert attributes["code.function.name"] == "read_request"
        assert attributes["code.file.path"].endswith("export_app.py")
        assert "ctxguard.hint" in attributes
        assert span.status.code == span.status.STATUS_CODE_ERROR
        assert [event.name for event in span.events] == ["exception"]
        # The link back to the request that started the thread, as its server span says.
        (link,) = span.links
        assert link.trace_id in server_spans
        assert server_spans[link.trace_id].span_id == link.span_id
    leak_spans = received.named(LEAK_SPAN)
    assert leak_spans
    for _, span in leak_spans:
        attributes = attributes_of(span.attributes)
        assert attributes["ctxguard.leak.site"] == "thread_exit"
        assert attributes["code.function.name"].endswith("push_and_forget")


SDK_LATE = """
import json
from flask import Flask
import ctxguard

app = Flask("late")
app.debug = True
ctxguard.CtxGuard(app, environment="production")  # debug mode: a violation, no SDK yet

from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

reader = InMemoryMetricReader()
metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))  # as post_worker_init


def violations():
    data = reader.get_metrics_data()
    return [
        (dict(p.attributes), p.value)
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "ctxguard.policy.violations"
        for p in m.data.data_points
    ]


first = violations()  # the SDK's first collection
app.test_client().get("/")  # a request: the next safe point
print(json.dumps([first, violations(), violations()]))
"""


def test_a_violation_found_before_the_sdk_is_set_up_is_still_exported(tmp_path):
    """A production policy violation found when the app is made (at import, before
    gunicorn's post_worker_init sets the SDK up) is counted once the SDK collects, where
    the OpenTelemetry API's stand-in provider would drop it: exactly once, not again."""
    script = tmp_path / "late.py"
    script.write_text(SDK_LATE)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    first, second, third = json.loads(result.stdout)
    assert first == []
    expected = [[{"ctxguard.policy.rule": "debug_mode", "ctxguard.policy.action": "reported"}, 1]]
    assert second == expected
    assert third == expected
