"""Production policy: nothing may keep a context alive past its request.

Flask 2.2 removed ``PRESERVE_CONTEXT_ON_EXCEPTION``: nothing reads it any
more. Contexts now outlive a request through the
``werkzeug.debug.preserve_context`` environ key, set by Werkzeug's debugger
(``evalex=True``: every failing request's frames and contexts are kept for
ever) and by the test client inside ``with client:``. In production the key
is removed from every request and the configurations that lead there are
reported: ``enforce`` fixes what it can, ``warn`` only reports, ``strict``
refuses to start, ``off`` does nothing. Development and testing are never
altered.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any

from . import events, telemetry

PRESERVE_KEY = "werkzeug.debug.preserve_context"
CONFIG_KEY = "PRESERVE_CONTEXT_ON_EXCEPTION"


@dataclass(frozen=True)
class Violation:
    rule: str
    detail: str


class PolicyError(RuntimeError):
    """Raised by ``init_app`` under ``policy="strict"``, listing every violation."""

    def __init__(self, violations: list[Violation]) -> None:
        self.violations = list(violations)
        lines = "\n".join(f"  - {v.rule}: {v.detail}" for v in self.violations)
        super().__init__(f"ctxguard refused to start in production:\n{lines}")


def app_violations(app: Any, wsgi_app: Any) -> list[Violation]:
    """What is wrong with this app and WSGI chain for production."""
    found = []
    config = getattr(app, "config", None)
    if config is not None and config.get(CONFIG_KEY):
        found.append(
            Violation(
                telemetry.RULE_PRESERVE_CONFIG,
                f"{CONFIG_KEY} is {config.get(CONFIG_KEY)!r}: failing requests would keep"
                " their contexts (Flask >= 2.2 ignores the key; ctxguard sets it to False)",
            )
        )
    if app is not None and getattr(app, "debug", False):
        found.append(
            Violation(
                telemetry.RULE_DEBUG_MODE,
                "debug mode is on: unhandled errors reach the server and the debugger",
            )
        )
    debugger = find_debugger(wsgi_app)
    if debugger is not None:
        evalex = getattr(debugger, "evalex", False)
        found.append(
            Violation(
                telemetry.RULE_DEBUGGER,
                "Werkzeug's DebuggedApplication is in the WSGI chain"
                + (
                    " with evalex=True: every failing request's contexts are kept" if evalex else ""
                ),
            )
        )
    return found


def _children(obj: Any) -> Iterator[Any]:
    """The WSGI apps a middleware wraps, by the names middlewares use."""
    func = getattr(obj, "__func__", None)
    if func is not None:  # a bound method such as app.wsgi_app
        yield getattr(obj, "__self__", None)
    for name in ("app", "wsgi_app", "application", "__wrapped__"):
        try:
            child = vars(obj).get(name) if hasattr(obj, "__dict__") else None
        except TypeError:
            child = None
        if child is not None:
            yield child
    mounts = getattr(obj, "mounts", None)
    if isinstance(mounts, dict):
        yield from mounts.values()


def find_debugger(wsgi_app: Any, limit: int = 32) -> Any:
    """Werkzeug's ``DebuggedApplication`` anywhere below ``wsgi_app``, or None."""
    try:
        from werkzeug.debug import DebuggedApplication
    except Exception:
        return None
    seen: set[int] = set()
    stack = [wsgi_app]
    while stack and limit:
        obj = stack.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        limit -= 1
        if isinstance(obj, DebuggedApplication):
            return obj
        try:
            stack.extend(_children(obj))
        except Exception:
            continue
    return None


def report(violation: Violation, action: str) -> None:
    """Counter (exact), span and log line (once per rule and action per minute)."""
    attributes = {telemetry.POLICY_RULE: violation.rule, telemetry.POLICY_ACTION: action}
    telemetry.count(telemetry.VIOLATIONS, attributes)
    telemetry.span(
        telemetry.SPAN_POLICY_VIOLATION,
        attributes,
        throttle_key=(violation.rule, action),
    )
    text = "ctxguard: production policy violation %s (%s): %s"
    args = (violation.rule, action, violation.detail)
    telemetry.log_event(("policy", violation.rule, action), text, *args)
    if events.listening():
        events.emit(telemetry.SPAN_POLICY_VIOLATION, attributes, (text, args))


def apply(app: Any, violations: list[Violation], policy: str, *, refuse: bool = True) -> None:
    """Act on violations as the policy says; ``strict`` raises only when ``refuse``."""
    if policy == "off" or not violations:
        return
    if policy == "strict" and refuse:
        for violation in violations:
            report(violation, telemetry.ACTION_REFUSED)
        raise PolicyError(violations)
    for violation in violations:
        if policy != "warn" and violation.rule == telemetry.RULE_PRESERVE_CONFIG:
            app.config[CONFIG_KEY] = False
            report(violation, telemetry.ACTION_ENFORCED)
        else:
            report(violation, telemetry.ACTION_REPORTED)


PRESERVE_ENVIRON = Violation(
    telemetry.RULE_PRESERVE_ENVIRON,
    f"a request carried {PRESERVE_KEY!r} (Werkzeug's debugger with evalex, or the test"
    " client): its contexts would be kept after the request",
)
DEVELOPMENT_SERVER = Violation(
    telemetry.RULE_DEV_SERVER,
    "requests are served by Werkzeug's development server, which is not meant for production",
)


def strip_preserve_key(environ: Any, policy: str) -> None:
    """Remove the preserve-context key from a production request (``enforce``/``strict``)."""
    if policy == "off":
        return
    if policy == "warn":
        report(PRESERVE_ENVIRON, telemetry.ACTION_REPORTED)
        return
    environ.pop(PRESERVE_KEY, None)
    report(PRESERVE_ENVIRON, telemetry.ACTION_ENFORCED)


def test_client_request(frame: FrameType | None, limit: int = 32) -> bool:
    """Is Werkzeug's (or Flask's) test client making the request running here?

    A request made by the test client is a test, whatever ``app.testing``
    says: the contexts it preserves inside ``with client:`` must be kept. It is
    recognised by the test client's own function on the stack, which nothing
    outside the process can fake (a header, ``REMOTE_ADDR`` or the user agent
    could all come from a client or a proxy in production).
    """
    module = sys.modules.get("werkzeug.test")
    runner = getattr(getattr(module, "run_wsgi_app", None), "__code__", None)
    if runner is None:
        return False
    while frame is not None and limit:
        if frame.f_code is runner:
            return True
        frame = frame.f_back
        limit -= 1
    return False


def is_development_server(environ: Any) -> bool:
    software = environ.get("SERVER_SOFTWARE")
    return isinstance(software, str) and software.startswith("Werkzeug/")
