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

import importlib
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .extension import CtxGuard
    from .middleware import CtxGuardMiddleware
    from .policy import PolicyError
    from .process import install, uninstall
    from .settings import ConfigError

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

# The public names, imported when first used (PEP 562). The pytest plugin and the
# OpenTelemetry instrumentor live in this package, and pytest imports the plugin's
# module in every run where ctxguard is installed: importing the package itself
# must cost nothing (no OpenTelemetry API, no Flask) until ctxguard is used.
_LAZY = {
    "ConfigError": ("settings", "ConfigError"),
    "CtxGuard": ("extension", "CtxGuard"),
    "CtxGuardMiddleware": ("middleware", "CtxGuardMiddleware"),
    "PolicyError": ("policy", "PolicyError"),
    "__version__": ("telemetry", "VERSION"),
    "install": ("process", "install"),
    "uninstall": ("process", "uninstall"),
}


def __getattr__(name: str) -> Any:
    try:
        module, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{module}", __name__), attribute)
    globals()[name] = value  # the next lookup is a plain one
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


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
    from . import ledger, telemetry, threads

    telemetry.drain_if_safe(sys._getframe(1))
    return ledger.snapshot(threads.describe)
