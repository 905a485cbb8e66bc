"""Run by test_threads.py in a subprocess: ctxguard under gevent's monkey-patching.

Prints one JSON line with what the SDK's in-memory exporter and reader saw.
"""

import os

if os.environ.get("CTXGUARD_TEST_IMPORT_FIRST"):
    # ctxguard (and Flask) imported before gevent patches; installed after.
    import ctxguard

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import threading  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
import gevent.pool  # noqa: E402
from flask import Flask, current_app, request  # noqa: E402
from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)

import ctxguard  # noqa: E402

exporter = InMemorySpanExporter()
tracer_provider = TracerProvider()
tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
reader = InMemoryMetricReader()
meter_provider = MeterProvider(metric_readers=[reader])

before = (gevent.spawn, gevent.spawn_later, vars(gevent.pool.Group)["spawn"])
app = Flask("greenlets")
ctxguard.CtxGuard(
    app, environment="production", tracer_provider=tracer_provider, meter_provider=meter_provider
)
# True once the process hooks are in (``install`` is idempotent and says so).
installed = ctxguard.install(tracer_provider=tracer_provider, meter_provider=meter_provider)
messages: list[str] = []


def touch_in_greenlet() -> None:
    try:
        messages.append(request.method)  # touch: greenlet
    except RuntimeError as error:
        messages.append(str(error).splitlines()[0])


def touch_in_thread() -> None:
    try:
        messages.append(request.method)  # touch: thread
    except RuntimeError as error:
        messages.append(str(error).splitlines()[0])


def touch_later() -> None:
    try:
        messages.append(request.method)  # touch: spawn_later
    except RuntimeError as error:
        messages.append(str(error).splitlines()[0])


def touch_in_pool(name: str) -> None:
    try:
        messages.append(request.args[name])  # touch: pool
    except RuntimeError as error:
        messages.append(str(error).splitlines()[0])


def leak_in_greenlet() -> None:
    app.app_context().push()  # push: greenlet, never popped


@app.route("/items/<int:item_id>")
def show_item(item_id: int) -> str:
    gevent.spawn(touch_in_greenlet).join()
    thread = threading.Thread(target=touch_in_thread)
    thread.start()
    thread.join()
    gevent.spawn_later(0, touch_later).join()
    pool = gevent.pool.Pool(2)
    pool.spawn(touch_in_pool, "name").join()
    gevent.spawn(leak_in_greenlet).join()
    return "ok"


tracer = tracer_provider.get_tracer("test")
with tracer.start_as_current_span("request") as request_span:
    status = app.test_client().get("/items/1").status_code
request_span_id = request_span.get_span_context().span_id


def touch_outside() -> None:
    try:
        messages.append(request.method)  # touch: outside
    except RuntimeError as error:
        messages.append(str(error).splitlines()[0])


# Spawned outside any request: no origin, nothing wrapped.
gevent.spawn(touch_outside).join()

# Two greenlets, each holding an app context of its own app while the other runs.
apps = {"first": Flask("first"), "second": Flask("second")}
holding = gevent.event.Event()
release = gevent.event.Event()
own_app: dict[str, str] = {}
pushed = []


def hold(name: str) -> None:
    if name == "first":
        ctx = apps[name].app_context()
        ctx.push()  # push: first
    else:
        ctx = apps[name].app_context()
        ctx.push()  # push: second
    pushed.append(name)
    if len(pushed) == 2:
        holding.set()
    release.wait(30)
    own_app[name] = current_app.name
    ctx.pop()


greenlets = [gevent.spawn(hold, name) for name in apps]
holding.wait(30)
snapshot = ctxguard.snapshot()
release.set()
gevent.joinall(greenlets, timeout=30)


def total(metric: str) -> int:
    found = 0
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                if m.name == metric:
                    found += sum(p.value for p in m.data.data_points)
    return found


hooked = gevent.spawn is not before[0]
ctxguard.uninstall()
after = (gevent.spawn, gevent.spawn_later, vars(gevent.pool.Group)["spawn"])

print(
    json.dumps(
        {
            "spawn_hooked": hooked,
            "spawn_restored": all(a is b for a, b in zip(after, before, strict=True)),
            "patched": monkey.is_module_patched("threading"),
            "installed": installed,
            "status": status,
            "messages": messages,
            "error_spans": [
                {**s.attributes, "links": [link.context.span_id for link in s.links]}
                for s in exporter.get_finished_spans()
                if s.name == "ctxguard.context_error"
            ],
            "leak_spans": [
                dict(s.attributes)
                for s in exporter.get_finished_spans()
                if s.name == "ctxguard.context_leak"
            ],
            "request_span_id": request_span_id,
            "snapshot": snapshot,
            "own_app": own_app,
            "errors": total("ctxguard.context.errors"),
            "leaks": total("ctxguard.context.leaks"),
        }
    )
)
