"""The WSGI middleware: each request starts and ends on a clean worker.

Before the app runs it looks at the contexts already open on this worker. One
pushed during an earlier request and never popped is stale: it is reported
(``request_start``) and, when healing is on, popped so its teardown runs and
the new request gets its own app context. One pushed outside any request
(an ``app.app_context().push()`` at import time) is reported once per push
site outside testing and left alone.

After the response iterable is closed (or abandoned and finalised, possibly
on another thread) every context pushed for the request must be gone; one
that is not is reported (``request_end``) with its push site.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from . import frames, leaks, ledger, policy, process, settings, telemetry, threads
from .ledger import RequestInfo, Worker

WSGIApp = Callable[..., Iterable[bytes]]
_worker = ledger.worker

#: Bodies whose iteration runs no application code.
_PLAIN = (list, tuple)


def flask_app_of(wsgi_app: Any) -> Any:
    """The Flask app behind ``wsgi_app`` (the app or its bound ``wsgi_app``), or None."""
    try:
        from flask import Flask
    except Exception:
        return None
    if isinstance(wsgi_app, Flask):
        return wsgi_app
    owner = getattr(wsgi_app, "__self__", None)
    return owner if isinstance(owner, Flask) else None


class CtxGuardMiddleware:
    """Guard a WSGI app: stale and leaked contexts, production policy.

    ``CtxGuardMiddleware(app.wsgi_app, app=app)`` is what ``CtxGuard`` sets
    up; use it directly for plain WSGI stacks. Without a Flask ``app`` the
    environment defaults to production (or ``CTXGUARD_ENVIRONMENT``).
    """

    def __init__(
        self,
        wsgi_app: WSGIApp,
        *,
        app: Any = None,
        environment: str | None = None,
        policy: str | None = None,
        heal: bool | None = None,
        propagate: str | None = None,
        tracer_provider: Any = None,
        meter_provider: Any = None,
    ) -> None:
        self.wsgi_app = wsgi_app
        self.app = app if app is not None else flask_app_of(wsgi_app)
        self.options = settings.resolve(environment, policy, heal, propagate)
        self._disabled = self.options.disabled
        self._first_request_seen = False
        self._ambient_reported: set[Any] = set()
        self._rules_reported: set[str] = set()
        self._lock = threading.Lock()
        if not self.options.disabled:
            process.install(tracer_provider=tracer_provider, meter_provider=meter_provider)
            if self.options.propagate == "app" and self.app is not None:
                threads.propagate_app(self.app)

    # -- options that follow the app (it may be switched to testing after init)

    def environment(self) -> str:
        if self.options.environment is not None:
            return self.options.environment
        app = self.app
        try:
            debug = bool(getattr(app, "debug", False)) if app is not None else False
            testing = bool(getattr(app, "testing", False)) if app is not None else False
        except Exception as exc:
            # Unknown: alter nothing (a testing app must keep its preserved contexts).
            telemetry.fault("environment", exc)
            return "development"
        return self.options.environment_for(debug, testing)

    def check_app(self, *, refuse: bool = True) -> list[policy.Violation]:
        """Policy check of the app and the chain below this middleware.

        At start-up (``refuse``) the strict policy raises ``PolicyError``; a
        server already running is never made to fail requests.
        """
        if self.environment() != "production" or self.options.policy == "off":
            return []
        found = [
            v
            for v in policy.app_violations(self.app, self.wsgi_app)
            if v.rule not in self._rules_reported
        ]
        self._rules_reported.update(v.rule for v in found)
        policy.apply(self.app, found, self.options.policy, refuse=refuse)
        return found

    # -- the request

    def __call__(self, environ: Any, start_response: Any) -> Iterable[bytes]:
        info = w = None
        if not self._disabled:
            try:
                w = ledger.worker()
                # Not inside another guarded request (two middlewares), and installed.
                if w.request is None and process.installed():
                    if not self._first_request_seen:
                        self._first_request(environ)
                    if policy.PRESERVE_KEY in environ:
                        self._preserve_key(environ)
                    if w.open:
                        self._check_start(w)
                    info = RequestInfo(environ.get("REQUEST_METHOD"))
            except Exception as exc:
                telemetry.fault("middleware", exc)
                info = None
        # Called outside any handler of ctxguard's own errors, so the app runs once
        # and its exceptions carry no context from ctxguard.
        if info is None or w is None:
            return self.wsgi_app(environ, start_response)

        w.request = info
        try:
            body = self.wsgi_app(environ, start_response)
        except BaseException:
            w.request = None
            self._check_end(w, info)
            raise
        w.request = None
        try:
            wrapper = environ.get("wsgi.file_wrapper")
            if type(body) in _PLAIN or (type(wrapper) is type and isinstance(body, wrapper)):
                # Iterating it runs no application code: the request is over.
                self._check_end(w, info)
                return body
            return _Body(body, self, w, info)
        except Exception as exc:
            telemetry.fault("middleware body", exc)
            return body

    def _first_request(self, environ: Any) -> None:
        with self._lock:
            if self._first_request_seen:
                return
            self._first_request_seen = True
        if self.environment() != "production" or self.options.policy == "off":
            return
        # Configuration and wrapping often change after init_app: look again.
        self.check_app(refuse=False)
        if policy.is_development_server(environ):
            policy.report(policy.DEVELOPMENT_SERVER, telemetry.ACTION_REPORTED)

    def _preserve_key(self, environ: Any) -> None:
        if self.environment() == "production":
            policy.strip_preserve_key(environ, self.options.policy)

    def _check_start(self, w: Worker) -> None:
        """Report stale and ambient contexts on this worker; heal the stale ones."""
        if not ledger.needs_attention(w):
            return
        environment = self.environment()
        for item in ledger.open_contexts(w):
            if item.reported:
                continue
            if item.request is not None:
                leaks.report(item, w, telemetry.SITE_REQUEST_START)
            elif environment != "testing":
                key = item.site
                ledger.mark_reported(item)
                if key not in self._ambient_reported:
                    self._ambient_reported.add(key)
                    leaks.report(item, w, telemetry.SITE_REQUEST_START, ambient=True)
        if self.options.heal_for(environment):
            _heal(w)

    def _check_end(self, w: Worker, info: RequestInfo, here: Worker | None = None) -> None:
        """After the request: anything it pushed and did not pop is a leak.

        ``w`` ran the app; ``here`` is the worker the check runs on (it may
        have iterated or closed the body), if already known.
        """
        if not w.open and (here is None or here is w or not here.open):
            return  # the usual case: nothing open anywhere
        try:
            if here is None:
                here = ledger.worker()
            for owner in (w,) if here is w else (w, here):
                if owner.open:
                    for item in ledger.open_contexts(owner, info, prune=owner is here):
                        if not item.reported:
                            leaks.report(item, owner, telemetry.SITE_REQUEST_END)
        except Exception as exc:
            telemetry.fault("request end check", exc)


def _heal(w: Worker) -> None:
    """Pop stale contexts from the top of this worker's stack so their teardown runs.

    Popping a request context may pop the app context it pushed too: every
    context that left the ledger is counted.
    """
    while True:
        item = ledger.top(w)
        if item is None or item.request is None or not item.current:
            return
        before = ledger.open_contexts(w, prune=False)
        try:
            item.context().pop()
        except Exception as exc:
            # A teardown function failed; Flask still popped the context.
            telemetry.log_event(
                ("heal", item.site),
                "ctxguard: a teardown function raised while healing a stale %s context: %r",
                item.kind,
                exc,
            )
        remaining = {id(other.handle) for other in ledger.open_contexts(w, prune=False)}
        healed = [other for other in before if id(other.handle) not in remaining]
        for other in healed:
            telemetry.count(telemetry.HEALED, {telemetry.CONTEXT_KIND: other.kind})
            telemetry.log_event(
                ("healed", other.kind, other.site),
                "ctxguard: popped a stale %s context (pushed at %s) so its teardown ran",
                other.kind,
                frames.where(other.location, "a place Flask chose (no user code on the stack)"),
            )
        if not healed:
            return  # Flask could not pop it; do not loop.


class _Body:
    """The response iterable, so the request's end can be checked when it is closed.

    While the body runs (a streamed response pushes its contexts here) pushes
    are attributed to the request. If the server abandons it without calling
    ``close()``, the check runs when it is finalised, on whatever thread that is.
    """

    __slots__ = ("_body", "_guard", "_info", "_worker")

    def __init__(
        self, body: Iterable[bytes], guard: CtxGuardMiddleware, w: Worker, info: RequestInfo
    ):
        self._body: Iterable[bytes] | None = body  # None once closed or finalised
        self._guard = guard
        self._worker = w
        self._info = info

    def __iter__(self) -> Iterator[bytes]:
        return self._chunks()

    def _chunks(self) -> Iterator[bytes]:
        """The chunks, each made with the request set on the worker making it.

        A generator with a plain ``for`` loop rather than ``__next__``: no
        Python call per chunk, and the end of the body costs nothing extra.
        """
        body = self._body
        if body is None:
            return
        info = self._info
        w = self._worker
        try:
            w.request = info
            for chunk in body:
                w.request = None
                yield chunk
                if w.ident != threading.get_ident():
                    w = _worker()  # the server iterates on another thread than the app ran on
                w.request = info
        finally:
            if w.request is info:
                w.request = None

    def close(self) -> None:
        body, self._body = self._body, None
        if body is None:
            return
        close = getattr(body, "close", None)
        del body
        here = None
        try:
            if close is not None:
                # Close callbacks are still the request's: what they push, and the
                # proxies they touch after its context is gone, are attributed to it.
                here = self._worker if self._worker.ident == threading.get_ident() else _worker()
                if here.request is None:
                    here.request = self._info
                else:
                    here = None
                close()
        finally:
            del close
            if here is not None:
                here.request = None
            self._guard._check_end(self._worker, self._info)

    def __del__(self) -> None:
        if self._body is None:
            return
        try:
            # Abandoned without close(). Drop the body: it is finalised as it
            # would have been without ctxguard (the chunk generator may still
            # hold it for a moment). On the thread that served it, its contexts
            # pop normally, and anything left is stale at the next request;
            # finalised on another thread, they cannot be popped: a leak.
            self._body = None
            if self._worker.ident != threading.get_ident():
                self._guard._check_end(self._worker, self._info)
        except Exception as exc:
            telemetry.fault("response finaliser", exc)
