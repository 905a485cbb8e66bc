"""A module that reads ``current_app.config`` at its top level, as users' config modules do.

Imported by test_proxies with no application context: the error is kept in ``error``
so the test can compare it with Flask's.
"""

from __future__ import annotations

from flask import current_app

error: RuntimeError | None = None
try:
    DEBUG = current_app.config.get("DEBUG")  # touch: import time
except RuntimeError as exc:
    error = exc
