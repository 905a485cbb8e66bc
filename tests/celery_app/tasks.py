"""The tasks: the FlaskTask pattern, tasks that never touch Flask, and the bugs users meet."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from celery import Task, shared_task
from flask import current_app, g, has_app_context, request

from . import TORN_DOWN


@shared_task
def read_request(report_id: int) -> str:
    """A bug: a FlaskTask (app context, no request) reading the request that enqueued it."""
    return f"{report_id}: {request.path}"


@shared_task(base=Task)
def read_current_app() -> str:
    """A bug: a plain task (no app context) reading ``current_app``."""
    return current_app.name


@shared_task
def uses_app(n: int) -> list[Any]:
    """Flask's documented pattern: ``current_app`` and ``g`` inside the FlaskTask's context."""
    g.n = n
    return [current_app.name, g.n]


@shared_task(base=Task)
def no_flask(a: int, b: int) -> int:
    """A task that never touches Flask."""
    return a + b


@shared_task(bind=True, base=Task)
def leak(self: Task, tag: str) -> list[int]:
    """A bug: an app context pushed and never popped; ``tag`` names it for its teardown."""
    self.app.flask_app.app_context().push()
    g.leak_tag = tag
    return [os.getpid(), threading.get_ident()]


@shared_task(base=Task)
def probe(delay: float) -> list[Any]:
    """Where it ran, and the tags whose teardown ran in this process so far."""
    time.sleep(delay)
    return [os.getpid(), threading.get_ident(), list(TORN_DOWN)]


@shared_task(base=Task)
def sees_app_context() -> bool:
    """Whether an app context is current in a plain task (an ambient one is)."""
    return has_app_context()


@shared_task(base=Task)
def fails(text: str) -> None:
    """A task whose own exception must reach Celery unchanged."""
    raise ValueError(text)


@shared_task(base=Task)
def fan_out() -> str:
    """A task that enqueues another."""
    return no_flask.delay(1, 2).id
