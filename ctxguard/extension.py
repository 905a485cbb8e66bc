"""``CtxGuard``: the Flask extension that puts the pieces together."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from . import settings
from .middleware import CtxGuardMiddleware

EXTENSION_KEY = "ctxguard"


class CtxGuard:
    """See and stop application/request context bugs in a Flask app.

    ``init_app`` wraps ``app.wsgi_app`` in :class:`CtxGuardMiddleware`,
    installs the process hooks once and applies the production policy.
    ``environment`` defaults to the app's (``testing`` if ``app.testing``,
    ``development`` if ``app.debug``, else ``production``), ``policy`` to
    ``enforce``, ``heal`` to on in production. ``propagate="app"`` (off by
    default) runs threads and executor tasks started in a request inside a
    fresh app context of this app, so ``current_app`` works there.
    ``in_app_include`` and ``in_app_exclude`` are module prefixes whose code is
    (or is not) yours, for the line reported; the app's own package is yours
    already, installed or not.
    ``CTXGUARD_*`` environment variables override the defaults; explicit
    arguments win.
    """

    def __init__(
        self,
        app: Any = None,
        *,
        environment: str | None = None,
        policy: str | None = None,
        heal: bool | None = None,
        propagate: str | None = None,
        in_app_include: Iterable[str] | None = None,
        in_app_exclude: Iterable[str] | None = None,
        tracer_provider: Any = None,
        meter_provider: Any = None,
    ) -> None:
        # Validate now, so a typo fails where it was written.
        settings.resolve(environment, policy, heal, propagate, in_app_include, in_app_exclude)
        self._kwargs = {
            "environment": environment,
            "policy": policy,
            "heal": heal,
            "propagate": propagate,
            "in_app_include": in_app_include,
            "in_app_exclude": in_app_exclude,
            "tracer_provider": tracer_provider,
            "meter_provider": meter_provider,
        }
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Any) -> None:
        """Guard ``app``; calling it again for the same app changes nothing."""
        if _guard_of(app) is not None:
            return
        if settings.disabled():
            return
        middleware = CtxGuardMiddleware(app.wsgi_app, app=app, **self._kwargs)
        # Refuse (strict) before the app is touched.
        middleware.check_app()
        app.wsgi_app = middleware
        # The app holds the middleware now: the middleware must not hold the app.
        middleware.hold_app_weakly()
        app.extensions[EXTENSION_KEY] = middleware

    @staticmethod
    def middleware(app: Any) -> CtxGuardMiddleware | None:
        """The middleware guarding ``app``, if any."""
        return _guard_of(app)


def _guard_of(app: Any) -> CtxGuardMiddleware | None:
    guard = getattr(app, "extensions", {}).get(EXTENSION_KEY)
    if isinstance(guard, CtxGuardMiddleware):
        return guard
    wsgi_app = getattr(app, "wsgi_app", None)
    return wsgi_app if isinstance(wsgi_app, CtxGuardMiddleware) else None
