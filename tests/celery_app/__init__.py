"""A Flask app with Celery, set up as Flask's guide "Background Tasks with Celery" does
(``celery_init_app`` and its ``FlaskTask``), guarded by ctxguard.

tests/test_celery.py runs its worker (``celery -A celery_app.make_celery worker``, with
tests/ on ``PYTHONPATH``) and enqueues its tasks from its views, served in the test's own
process.
"""

from __future__ import annotations

import os

from celery import Celery, Task
from flask import Flask, g

import ctxguard

#: Tags of the contexts pushed by ``tasks.leak`` whose teardown ran, in this process.
TORN_DOWN: list[str] = []


def celery_init_app(app: Flask) -> Celery:
    """Word for word Flask's guide, plus ``flask_app`` for the tasks that are not FlaskTasks."""

    class FlaskTask(Task):
        def __call__(self, *args: object, **kwargs: object) -> object:
            with app.app_context():
                return self.run(*args, **kwargs)

    celery_app = Celery(app.name, task_cls=FlaskTask)
    celery_app.config_from_object(app.config["CELERY"])
    celery_app.set_default()
    celery_app.flask_app = app  # type: ignore[attr-defined]
    app.extensions["celery"] = celery_app
    return celery_app


def create_app(broker_url: str, result_backend: str | None = None) -> Flask:
    app = Flask(__name__)
    app.config.from_mapping(
        CELERY={
            "broker_url": broker_url,
            "result_backend": result_backend or broker_url,
            "task_ignore_result": False,
            "broker_connection_retry_on_startup": True,
        },
    )
    celery_init_app(app)
    if not os.environ.get("CELERY_APP_ZERO_CODE"):
        # Celery is imported already, so this also switches ctxguard's Celery integration on.
        # (Under opentelemetry-instrument, CELERY_APP_ZERO_CODE=1: no ctxguard line at all.)
        ctxguard.CtxGuard(app)

    @app.teardown_appcontext
    def record_teardown(exc: BaseException | None) -> None:
        tag = g.get("leak_tag")
        if tag is not None:
            TORN_DOWN.append(tag)

    from . import views

    views.register(app)
    return app
