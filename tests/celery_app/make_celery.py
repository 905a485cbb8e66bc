"""The worker's entry point, as Flask's guide writes it (``celery -A celery_app.make_celery
worker``), with one OpenTelemetry SDK per worker process exporting over OTLP/HTTP.

The broker (Redis) is ``CELERY_APP_BROKER``; ``CELERY_APP_AMBIENT=1`` pushes an app
context when the worker imports the app, a pattern some apps use instead of FlaskTask.
"""

from __future__ import annotations

import os
from typing import Any

from celery.signals import (
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)

from ctxguard.integrations.gunicorn import post_worker_init, worker_exit

from . import create_app, tasks  # noqa: F401 (the tasks register with the Celery app)

flask_app = create_app(os.environ["CELERY_APP_BROKER"])
celery_app = flask_app.extensions["celery"]

if os.environ.get("CELERY_APP_AMBIENT"):
    flask_app.app_context().push()

# The SDK's threads do not survive a fork and every process must report as itself: the
# prefork pool's children (and the solo pool) set it up in worker_process_init, the other
# pools in the worker's own process once it is ready. The setup is the one gunicorn's
# post_worker_init does (a resource per process, OTLP/HTTP from the OTEL_* variables).
_sdk_pid = 0


def _set_up_sdk(**kwargs: Any) -> None:
    global _sdk_pid
    if os.environ.get("CELERY_APP_ZERO_CODE"):
        return  # opentelemetry-instrument set the SDK up
    if _sdk_pid != os.getpid() and os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        _sdk_pid = os.getpid()
        post_worker_init(None)


def _export_last(**kwargs: Any) -> None:
    if _sdk_pid == os.getpid():
        worker_exit(None, None)


worker_process_init.connect(_set_up_sdk, weak=False)
worker_ready.connect(_set_up_sdk, weak=False)
worker_process_shutdown.connect(_export_last, weak=False)
worker_shutdown.connect(_export_last, weak=False)
