"""Run by test_coexist.py in a subprocess: ctxguard next to other instrumentations.

``python threads_coexist.py STEP,STEP,...`` installs, in that order, any of:

- ``ctxguard``: ``CtxGuard(app, ...)`` (process hooks and middleware);
- ``ctxguard_process``: ``ctxguard.install(...)`` alone (no app yet);
- ``flask_app``: ``FlaskInstrumentor().instrument_app(app)``;
- ``flask_global``: ``FlaskInstrumentor().instrument()`` (before the app exists);
- ``threading``: ``ThreadingInstrumentor().instrument()``;
- ``sentry``: ``sentry_sdk.init(...)`` with its ``ThreadingIntegration``.

Then it serves three requests, uninstalls ctxguard, serves the first one again, and prints
one JSON line with what each part did: spans, metrics, Sentry events, what threads saw.
"""

from __future__ import annotations

import json
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import flask
import sentry_sdk
from flask import copy_current_request_context, make_response, request
from opentelemetry import trace
from opentelemetry.instrumentation.flask import FlaskInstrumentor
from opentelemetry.instrumentation.threading import ThreadingInstrumentor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sentry_sdk.integrations.threading import ThreadingIntegration
from sentry_sdk.transport import Transport
from werkzeug.test import EnvironBuilder

import ctxguard

STEPS = [step for step in sys.argv[1].split(",") if step]

exporter = InMemorySpanExporter()
tracer_provider = TracerProvider()
tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(tracer_provider)
reader = InMemoryMetricReader()
meter_provider = MeterProvider(metric_readers=[reader])
providers = {"tracer_provider": tracer_provider, "meter_provider": meter_provider}


class RecordingTransport(Transport):
    """Keeps Sentry's envelopes in memory."""

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.events: list[dict[str, Any]] = []

    def capture_envelope(self, envelope: Any) -> None:
        for item in envelope.items:
            event = item.get_event()
            if event is not None:
                self.events.append(event)


transport = RecordingTransport()
hooked: list[Any] = []
seen: dict[str, Any] = {}
app: Any = None


def span_id() -> str | None:
    context = trace.get_current_span().get_span_context()
    return format(context.span_id, "016x") if context.is_valid else None


def touch_request(into: dict[str, Any]) -> None:
    into["span"] = span_id()
    into["thread"] = threading.current_thread().name
    request.headers.get("Authorization")  # touch: coexist


def touch_in_timer(into: dict[str, Any]) -> None:
    into["timer span"] = span_id()
    into["method"] = request.method  # touch: timer


def copied_task(into: dict[str, Any]) -> str:
    into["span"] = span_id()
    sentry_sdk.capture_message("from the copied task")
    return request.args["q"]


def get_app() -> Any:
    global app
    if app is not None:
        return app
    app = flask.Flask("coexist")

    @app.route("/items/<int:item_id>")
    def show_item(item_id: int) -> str:
        sentry_sdk.set_tag("origin", "view")
        mine = seen.setdefault(request.args["round"], {})
        mine["view span"] = span_id()
        thread = threading.Thread(target=touch_request, args=(mine,), name="background")
        thread.start()
        thread.join()
        timer = threading.Timer(0, touch_in_timer, args=(mine,))
        timer.start()
        timer.join()
        return "started"

    @app.route("/copy")
    def copy() -> str:
        sentry_sdk.set_tag("origin", "copy view")
        mine = seen.setdefault("copy", {})
        mine["view span"] = span_id()
        task = copy_current_request_context(copied_task)
        with ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(task, mine).result()

    @app.route("/close")
    def close() -> Any:
        mine = seen.setdefault("close", {})

        @copy_current_request_context
        def on_close() -> None:
            mine["route"] = request.url_rule.rule

        response = make_response("closing")
        response.call_on_close(on_close)
        return response

    return app


def install(step: str) -> None:
    if step == "ctxguard":
        ctxguard.CtxGuard(get_app(), environment="production", **providers)
    elif step == "ctxguard_process":
        ctxguard.install(**providers)
    elif step == "flask_app":
        FlaskInstrumentor().instrument_app(get_app())
    elif step == "flask_global":
        assert app is None, "flask_global must come before anything that needs the app"
        FlaskInstrumentor().instrument()
    elif step == "threading":
        ThreadingInstrumentor().instrument()
    elif step == "sentry":
        sentry_sdk.init(
            dsn="https://public@sentry.invalid/1",
            integrations=[ThreadingIntegration(propagate_scope=True)],
            default_integrations=False,
            transport=transport,
        )
    else:
        raise SystemExit(f"unknown step {step!r}")


def current_hooks() -> tuple[Any, Any, Any]:
    """``Thread.start``, ``ThreadPoolExecutor.submit``, and ``Timer.start`` if it has its own."""
    return (
        vars(threading.Thread)["start"],
        vars(ThreadPoolExecutor)["submit"],
        vars(threading.Timer).get("start"),
    )


def call(path: str) -> tuple[str, bytes]:
    """One request run to the end the way a WSGI server runs it (the body is closed)."""
    environ = EnvironBuilder(path=path, headers={"Authorization": "Bearer secret"}).get_environ()
    status: list[str] = []
    body = get_app()(environ, lambda s, h, e=None: status.append(s))
    try:
        data = b"".join(body)
    finally:
        getattr(body, "close", lambda: None)()
    return status[0], data


def metric(name: str) -> int:
    data = reader.get_metrics_data()
    return sum(
        p.value
        for rm in (data.resource_metrics if data else [])
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == name
        for p in m.data.data_points
    )


def spans() -> list[dict[str, Any]]:
    return [
        {
            "name": s.name,
            "kind": s.kind.name,
            "span_id": format(s.context.span_id, "016x"),
            "links": [format(link.context.span_id, "016x") for link in s.links],
            "attributes": dict(s.attributes),
        }
        for s in exporter.get_finished_spans()
    ]


hook_errors: list[str] = []
threading.excepthook = lambda args: hook_errors.append(
    f"{args.exc_type.__name__}: {str(args.exc_value).splitlines()[0]}"
)

changed: dict[str, list[bool]] = {}
pre = mine = None
for step in STEPS:
    before = current_hooks()
    install(step)
    after = current_hooks()
    changed[step] = [b is not a for b, a in zip(before, after, strict=True)]
    if step in ("ctxguard", "ctxguard_process") and pre is None:
        pre, mine = before, after
get_app()
if "ctxguard_process" in STEPS and "ctxguard" not in STEPS:
    ctxguard.CtxGuard(app, environment="production", **providers)

responses = [call("/items/1?round=first"), call("/copy?q=copied"), call("/close")]
identity = {
    "start": threading.Thread.start.__name__,
    "submit": ThreadPoolExecutor.submit.__name__,
    "timer start": threading.Timer.start.__name__,
}
before_uninstall = {"spans": spans(), "errors": metric("ctxguard.context.errors")}
final = current_hooks()
ctxguard.uninstall()
restored = current_hooks()
responses.append(call("/items/2?round=after"))
sentry_sdk.flush()

# What uninstall must leave: the object before ctxguard's patch where ctxguard's wrapper was
# still the outermost one, and the newer wrapper untouched where something wrapped it since.
expected = [
    (pre[i] if final[i] is mine[i] else final[i]) if pre is not None else final[i] for i in range(3)
]

print(
    json.dumps(
        {
            "steps": STEPS,
            "changed": changed,
            "responses": [[status, data.decode()] for status, data in responses],
            "identity": identity,
            "restored": [restored[i] is expected[i] for i in range(3)],
            "seen": seen,
            "hook_errors": hook_errors,
            "before_uninstall": before_uninstall,
            "spans": spans(),
            "errors": metric("ctxguard.context.errors"),
            "leaks": metric("ctxguard.context.leaks"),
            "sentry": [
                {
                    "message": event.get("message") or (event.get("logentry") or {}).get("message"),
                    "exception": [
                        [v.get("type"), (v.get("value") or "").splitlines()[0]]
                        for v in (event.get("exception") or {}).get("values", [])
                    ],
                    "tags": event.get("tags", {}),
                }
                for event in transport.events
            ],
        }
    )
)
