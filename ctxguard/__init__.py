"""ctxguard: see, and stop, Flask application/request context bugs in production.

Two lines set it up::

    from ctxguard import CtxGuard
    CtxGuard(app)

It keeps a per-worker ledger of context pushes and pops, reports contexts
that leak or go stale on a pooled worker as OpenTelemetry spans and metrics
with the line that pushed them, and enforces a production policy (no context
kept alive past its request, no debugger).
"""

from __future__ import annotations

import sys
from typing import Any

from . import telemetry as _telemetry
from . import threads as _threads
from .extension import CtxGuard
from .ledger import snapshot as _snapshot
from .middleware import CtxGuardMiddleware
from .policy import PolicyError
from .process import install, uninstall
from .settings import ConfigError
from .telemetry import VERSION as __version__

__all__ = [
    "ConfigError",
    "CtxGuard",
    "CtxGuardMiddleware",
    "PolicyError",
    "__version__",
    "install",
    "snapshot",
    "uninstall",
]


def snapshot() -> dict[str, Any]:
    """A JSON-serialisable view of every worker's open contexts in this process.

    Each worker has its kind (``ctxguard.worker.kind``: request, thread,
    executor, celery, ...) and origin (the request that started its work:
    method, route template, endpoint; None when none did). Each context has its
    kind, push site (file, line, function), age in seconds and the request it
    was pushed in, and whether it was reported as leaked. It is also a safe point:
    events kept back while the OpenTelemetry SDK or ctxguard itself was busy on
    some thread are emitted first, unless the caller is itself inside the SDK.
    """
    _telemetry.drain_if_safe(sys._getframe(1))
    return _snapshot(_threads.describe)
