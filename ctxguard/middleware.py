"""The WSGI middleware: each request starts and ends on a clean thread.

Before the app runs it looks at the contexts already open on the thread (or
greenlet) serving the request. One pushed during an earlier request that has
ended, and never popped, is stale: it is reported (``request_start``) and,
when healing is on, popped so its teardown runs and the new request gets its
own app context. One pushed outside any request (an
``app.app_context().push()`` at import time) is reported once per push site
outside testing and left alone. A request whose response is still being sent
is alive, even when the server runs another request on the same thread
meanwhile (event-loop servers do): its contexts are not stale.

After the response is closed (or abandoned and finalised, possibly on another
thread) every context pushed for the request must be gone; one that is not is
reported (``request_end``) with its push site.

The app's own return value is handed back untouched wherever nothing can run
after the request returned (the usual, non-streamed response); otherwise a
wrapper that keeps the iterator protocol and ``close`` watches the body.
"""

from __future__ import annotations

import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from types import GeneratorType
from typing import Any

from . import leaks, ledger, policy, process, settings, telemetry, threads
from .ledger import OpenContext, RequestInfo, Worker

WSGIApp = Callable[..., Iterable[bytes]]

#: Bodies whose iteration and ``close`` run no application code.
_PLAIN = (list, tuple, bytes)


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
        in_app_include: Iterable[str] | None = None,
        in_app_exclude: Iterable[str] | None = None,
        tracer_provider: Any = None,
        meter_provider: Any = None,
    ) -> None:
        self._wsgi_app: WSGIApp | None = wsgi_app
        # Set by hold_app_weakly(): the app's function and a weak reference to it.
        self._function: Callable[..., Iterable[bytes]] | None = None
        self._weak_app: weakref.ref[Any] | None = None
        self._app = app if app is not None else flask_app_of(wsgi_app)
        self.options = settings.resolve(
            environment, policy, heal, propagate, in_app_include, in_app_exclude
        )
        self._disabled = self.options.disabled
        self._first_request_seen = False
        self._ambient_reported: set[Any] = set()
        self._rules_reported: set[str] = set()
        self._lock = threading.Lock()
        if not self.options.disabled:
            process.install(
                tracer_provider=tracer_provider,
                meter_provider=meter_provider,
                in_app_include=self.options.in_app_include,
                in_app_exclude=self.options.in_app_exclude,
            )
            process.add_app(self._app)
            if self.options.propagate == "app" and self._app is not None:
                threads.propagate_app(self._app)
            telemetry.logger.info(
                "ctxguard: guarding %s: %s",
                getattr(self._app, "name", None) or "a WSGI app",
                self.options.describe(),
            )

    @property
    def app(self) -> Any:
        """The Flask app guarded, when known."""
        return self._weak_app() if self._weak_app is not None else self._app

    @property
    def wsgi_app(self) -> WSGIApp:
        """The WSGI callable this middleware calls."""
        if self._weak_app is not None and self._function is not None:
            return self._function.__get__(self._weak_app())  # type: ignore[no-any-return]
        return self._wsgi_app  # type: ignore[return-value]

    @wsgi_app.setter
    def wsgi_app(self, value: WSGIApp) -> None:
        self._wsgi_app = value
        self._function = None

    def hold_app_weakly(self) -> None:
        """Stop keeping the app alive: the app now holds this middleware.

        ``CtxGuard`` sets the middleware as ``app.wsgi_app``; a strong
        reference back to the app (its bound ``wsgi_app``) would make a cycle
        that only the garbage collector can free, so a dropped app would no
        longer be freed as soon as its last reference goes.
        """
        wsgi_app, app = self._wsgi_app, self._app
        function = getattr(wsgi_app, "__func__", None)
        if app is None or function is None or getattr(wsgi_app, "__self__", None) is not app:
            return  # not the app's own bound method: nothing to break
        self._function = function
        self._weak_app = weakref.ref(app)
        self._wsgi_app = None
        self._app = None

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

    def _call_app(self, environ: Any, start_response: Any) -> Iterable[bytes]:
        if self._function is None:
            return self._wsgi_app(environ, start_response)  # type: ignore[misc]
        app = self._weak_app() if self._weak_app is not None else None
        if app is None:
            raise RuntimeError(
                "ctxguard: the Flask app this middleware guarded was garbage collected;"
                " keep a reference to the app itself, not only to app.wsgi_app"
            )
        return self._function(app, environ, start_response)

    def __call__(self, environ: Any, start_response: Any) -> Iterable[bytes]:
        info = w = None
        if not self._disabled:
            try:
                if telemetry.pending:
                    telemetry.drain_if_safe(sys._getframe(1))
                if process.installed():
                    if threading.get_ident is not ledger.ident:
                        process.rebind()  # gevent patched threading after ctxguard was installed
                    w = ledger.worker()
                    # Not inside another guarded request (two middlewares).
                    if w.request is None:
                        test: bool | None = None
                        if not self._first_request_seen or policy.PRESERVE_KEY in environ:
                            test = policy.test_client_request(sys._getframe(1))
                            if not test:
                                if not self._first_request_seen:
                                    self._first_request(environ)
                                if policy.PRESERVE_KEY in environ:
                                    self._preserve_key(environ)
                        if w.open:
                            self._check_start(w, test)
                        info = RequestInfo(environ.get("REQUEST_METHOD"))
            except Exception as exc:
                telemetry.fault("middleware", exc)
                info = None
        # Called outside any handler of ctxguard's own errors, so the app runs once
        # and its exceptions carry no context from ctxguard.
        if info is None or w is None:
            return self._call_app(environ, start_response)

        w.request = info
        try:
            function = self._function
            if function is None:
                body = self._wsgi_app(environ, start_response)  # type: ignore[misc]
            else:
                app = self._weak_app() if self._weak_app is not None else None
                if app is None:
                    body = self._call_app(environ, start_response)  # raises: app collected
                else:
                    body = function(app, environ, start_response)
        except BaseException:
            w.request = None
            self._end(w, info)
            raise
        w.request = None
        try:
            # The usual response: a Werkzeug body that runs no code of the app any
            # more, and nothing of the request left open. Handed back as it is.
            if type(body) is _closing_type and not w.open and not _closing_runs_code(body):
                info.ended = True
                return body
            return self._watch(body, environ, w, info)
        except Exception as exc:
            telemetry.fault("middleware body", exc)
            return body

    def _watch(self, body: Any, environ: Any, w: Worker, info: RequestInfo) -> Any:
        """The body to hand to the server: the app's own, or a watching wrapper."""
        runs_code = _runs_code(body, environ)
        if not runs_code and not (w.open and ledger.has_open(w, info)):
            info.ended = True  # nothing of the request can run any more
            return body
        if not runs_code:
            self._end(w, info)  # a leak already, and nothing can pop it now
            return body
        kind = _IterBody if hasattr(type(body), "__next__") else _Body
        return kind(body, self, w, info)

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

    def _check_start(self, w: Worker, test: bool | None) -> None:
        """Report stale and ambient contexts on this thread; heal the stale ones.

        A request made by a test client is a test, whatever the environment:
        a context the test pushed around it is not ambient, and nothing is
        healed under it.
        """
        if not ledger.needs_attention(w):
            return
        environment = self.environment()
        for item in ledger.open_contexts(w):
            if item.reported:
                continue
            request = item.request
            if request is not None:
                if request.ended:
                    leaks.report(item, w, telemetry.SITE_REQUEST_START)
                # else: its response is still being sent (an event-loop server
                # runs another request on this thread meanwhile): alive.
            elif environment != "testing":
                if test is None:
                    test = policy.test_client_request(sys._getframe(2))
                if test:
                    continue
                key = item.site
                if key not in self._ambient_reported:
                    self._ambient_reported.add(key)
                    leaks.report(item, w, telemetry.SITE_REQUEST_START, ambient=True)
                else:
                    ledger.claim(item)  # reported once per push site
        if self.options.heal_for(environment):
            if test is None:
                test = policy.test_client_request(sys._getframe(2))
            if not test:
                leaks.heal(w, _ended)

    def _end(self, w: Worker, info: RequestInfo, here: Worker | None = None) -> None:
        """The request is over: anything it pushed and did not pop is a leak.

        ``w`` ran the app; ``here`` is the worker the check runs on (it may
        have iterated or closed the body), if already known. Workers of hooks
        since uninstalled are not judged: their pops went unseen.
        """
        info.ended = True
        if not w.open:
            if here is None:
                if ledger.ident() == w.ident:
                    return  # the usual case: nothing open, checked where the app ran
                # Checked on another thread (it read or closed the body): its own
                # ledger, if it has one, may hold what the body pushed there.
                here = ledger.existing()
            if here is None or here is w or not here.open:
                return
        try:
            if here is None:
                here = ledger.worker()
            for owner in (w,) if here is w else (w, here):
                if owner.open and ledger.known(owner):
                    for item in ledger.open_contexts(owner, info, prune=owner is here):
                        if not item.reported and not ledger.handed_over(owner, item):
                            leaks.report(item, owner, telemetry.SITE_REQUEST_END)
        except Exception as exc:
            telemetry.fault("request end check", exc)


#: Werkzeug's ``ClosingIterator``, what a Flask app returns for every response
#: that is not passed straight through; found on the first one seen.
_closing_type: type | None = None


def _closing_runs_code(body: Any) -> bool:
    """Can iterating or closing this ``ClosingIterator`` run application code?

    Werkzeug's response puts its own ``close`` last among the callbacks; the
    response runs the app's code only if it is streamed (a generator), its
    body has a ``close`` of its own, or ``call_on_close`` callbacks were added.
    Anything unexpected is assumed to run code.
    """
    try:
        response = body._callbacks[-1].__self__
        if type(response.response) is list:  # what Flask makes of a str, bytes or JSON
            return bool(response._on_close)
        return bool(
            response._on_close or response.is_streamed or hasattr(response.response, "close")
        )
    except Exception:
        return True


def _runs_code(body: Any, environ: Any) -> bool:
    """Can iterating or closing ``body`` run application code?

    A Werkzeug response that is not streamed and has no close callbacks
    cannot; neither can a list, nor the server's own file wrapper. A generator
    can, and anything unknown is assumed to.
    """
    global _closing_type
    kind = type(body)
    if kind in _PLAIN:
        return False
    if kind is _closing_type or (
        kind.__name__ == "ClosingIterator" and kind.__module__ == "werkzeug.wsgi"
    ):
        _closing_type = kind
        return _closing_runs_code(body)
    if kind is GeneratorType:
        return True
    wrapper = environ.get("wsgi.file_wrapper")
    if wrapper is not None:
        if isinstance(wrapper, type):
            return not isinstance(body, wrapper)
        # A wrapper that is a function hands back an object of the server's (uWSGI's
        # is the file itself, recognised by identity): what Flask passes straight
        # through is that object, and iterating it runs no application code.
        return False
    return True


def _ended(item: OpenContext) -> bool:
    """Stale: pushed during a request that has ended."""
    return item.request is not None and item.request.ended


class _Body:
    """The response iterable, so the request's end can be checked when it is closed.

    While the body runs (a streamed response pushes its contexts here) pushes
    are attributed to the request. If the server abandons it without calling
    ``close()``, the check runs when it is finalised, on whatever thread that is.
    """

    __slots__ = ("_body", "_guard", "_info", "_open", "_worker")

    def __init__(
        self, body: Iterable[bytes], guard: CtxGuardMiddleware, w: Worker, info: RequestInfo
    ):
        self._body: Iterable[bytes] | None = body  # None once finalised
        self._guard = guard
        self._worker = w
        self._info = info
        self._open = True  # until the first close() or the finaliser

    def __iter__(self) -> Iterator[bytes]:
        return self._chunks()

    def _here(self) -> Worker:
        """The worker of the thread running now (the server may iterate on another)."""
        w = self._worker
        return w if w.ident == ledger.ident() else ledger.worker()

    def _chunks(self) -> Iterator[bytes]:
        """The chunks, each made with the request set on the thread making it.

        A generator with a plain ``for`` loop rather than ``__next__``: no
        Python call per chunk, and the end of the body costs nothing extra.
        """
        body = self._body
        if body is None:
            return
        info = self._info
        w = self._here()
        try:
            w.request = info
            for chunk in body:
                w.request = None
                yield chunk
                w = self._here()
                w.request = info
        finally:
            if w.request is info:
                w.request = None

    def close(self) -> None:
        """Close the app's body, every time it is called, as the server asks.

        The first close ends the request: what the close callbacks push, and
        the proxies they touch after its context is gone, are attributed to
        it; then anything of the request still open is a leak.
        """
        close = getattr(self._body, "close", None)
        first, self._open = self._open, False
        here = None
        try:
            if close is not None:
                if first:
                    here = self._here()
                    if here.request is None:
                        here.request = self._info
                    else:
                        here = None
                close()
        finally:
            del close
            if here is not None:
                here.request = None
            if first:
                self._guard._end(self._worker, self._info)

    def __del__(self) -> None:
        if not self._open:
            return
        try:
            self._open = False
            # Abandoned without close(). Drop the body: it is finalised as it
            # would have been without ctxguard (the chunk generator may still
            # hold it for a moment). On the thread that served it, its contexts
            # pop normally, and anything left is stale at the next request;
            # finalised on another thread, they cannot be popped: a leak.
            self._body = None
            if self._worker.ident != ledger.ident():
                self._guard._end(self._worker, self._info)
            else:
                self._info.ended = True
        except Exception as exc:
            telemetry.fault("response finaliser", exc)


class _IterBody(_Body):
    """A watched body that is an iterator, as the app's own was (``next()`` works)."""

    __slots__ = ()

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        body = self._body
        if body is None:
            raise StopIteration
        w = self._here()
        previous = w.request
        w.request = self._info
        try:
            return next(body)  # type: ignore[call-overload]
        finally:
            w.request = previous
