"""Views that enqueue the tasks, as a web process of the app does."""

from __future__ import annotations

from flask import Flask

from . import tasks


def register(app: Flask) -> None:
    @app.post("/reports/<int:report_id>/read")
    def enqueue_read(report_id: int) -> str:
        return tasks.read_request.delay(report_id).id

    @app.post("/reports/<int:report_id>/leak")
    def enqueue_leak(report_id: int) -> str:
        return tasks.leak.delay(f"report-{report_id}").id
