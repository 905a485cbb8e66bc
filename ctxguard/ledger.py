"""The per-worker ledger of open Flask contexts.

Wraps the push and pop of Flask's context classes (``AppContext`` and, up
to Flask 3.1, ``RequestContext``; see ``flaskmodel``). For every
worker (a thread, or a greenlet when gevent patched ``threading.local``) it
keeps the contexts pushed and not yet popped: their kind, the user's line
that pushed them, when, and the request they were pushed in. It counts
pushes and pops by outcome (``ok``, ``wrong_context``, ``cross_worker``).

The push and pop hooks run on every request, so they touch only the current
worker's list and C-level counters. Everything that walks, reports or
reconciles runs only when something is wrong.

A record is a small list (cheaper to build than an object on this path),
read and changed only through the functions of this module.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from . import flaskmodel, frames, telemetry
from .flaskmodel import current
from .frames import Site

# Record fields.
_CTX = 0  # the context, or a weak reference to it once it can never be popped
_KIND = 1
_SITE = 2
_PUSHED_AT = 3
_REQUEST = 4
#: Flask 3.2: the context was pushed already, so this push only counted one more
#: (see ``_home_request``).
_NESTED = 5
#: A record has these fields; whoever reports it as leaked appends a token to it
#: (see ``claim``), so a longer record has been reported.
_FIELDS = 6

# Counters. ``next()`` on an ``itertools.count`` is one C call, atomic under the
# GIL: exact across threads without a lock, and cheaper than any Python-level
# increment. ``telemetry.counted`` reads one back.
_KINDS = (telemetry.KIND_APP, telemetry.KIND_REQUEST)
_OUTCOMES = (telemetry.OUTCOME_OK, telemetry.OUTCOME_WRONG, telemetry.OUTCOME_CROSS)
_pushes: dict[str, Any] = {}
_pops: dict[tuple[str, str], Any] = {}


def _reset_counters() -> None:
    _pushes.update({kind: itertools.count() for kind in _KINDS})
    _pops.update({key: itertools.count() for key in itertools.product(_KINDS, _OUTCOMES)})


_reset_counters()

_METHODS = frozenset(
    ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
)


def http_method(method: Any) -> str | None:
    """A request method as telemetry may carry it: a known method, else ``_OTHER``."""
    if not isinstance(method, str):
        return None
    return method if method in _METHODS else "_OTHER"


class RequestInfo:
    """The request a context was pushed in: only what may appear in telemetry.

    ``rule`` is Flask's matched URL rule, filled in when the request's own
    context is pushed; the raw path is never kept. ``span_context`` is the
    span active when code of the request first pushed a context of its own
    (for a link from a leak's span back to the request's trace). ``ended``
    is set once the response is closed or abandoned: until then the request
    is alive, even if another request runs on its thread meanwhile (servers
    that interleave requests on one thread), and its contexts are not stale.
    """

    __slots__ = ("ended", "method", "rule", "span_context")

    def __init__(self, method: Any) -> None:
        self.method = method
        self.rule: Any = None
        self.span_context: Any = None
        self.ended = False

    @property
    def http_method(self) -> str | None:
        return http_method(self.method)

    @property
    def route(self) -> str | None:
        rule = getattr(self.rule, "rule", None)
        return rule if isinstance(rule, str) else None

    @property
    def endpoint(self) -> str | None:
        endpoint = getattr(self.rule, "endpoint", None)
        return endpoint if isinstance(endpoint, str) else None

    def as_dict(self) -> dict[str, str | None]:
        return {"method": self.http_method, "route": self.route, "endpoint": self.endpoint}


class Worker:
    """One worker's open contexts.

    ``request`` is the request this worker is running code for right now
    (set by the middleware), so pushes can be attributed to it.
    """

    __slots__ = ("__weakref__", "ident", "name", "open", "request", "serial")

    def __init__(self, serial: int) -> None:
        self.open: list[list[Any]] = []
        self.request: RequestInfo | None = None
        self.ident = 0
        self.name = threading.current_thread().name
        self.serial = serial


# Live workers by serial number. A worker lives as long as its thread's
# ``threading.local`` storage: when the thread ends its open list goes with it.
# No lock guards these maps: a finaliser (an abandoned response body, a
# generator's close, the weakref callback below) can reach them on a thread
# that is in the middle of changing them, and a lock held there would hang
# that thread for ever. Each change is one dict operation, atomic under the
# GIL, and readers copy the values before looking at them.
_workers: dict[int, weakref.ref[Worker]] = {}
# The same, by thread (or greenlet) ident, to find a worker without creating one.
_by_ident: dict[int, weakref.ref[Worker]] = {}
#: The current worker's ident (gevent's ``get_ident`` once it has patched ``threading``).
ident = threading.get_ident
_serials = itertools.count(1)
_local: Any = threading.local()
# The ``threading.local`` in use before gevent patched ``threading`` (after
# ctxguard was installed, as gunicorn's gevent worker does after the fork):
# the thread's main greenlet takes its worker back from there.
_unpatched: Any = None


def _forgetter(serial: int, key: int) -> Callable[[weakref.ref[Worker]], None]:
    def forget(ref: weakref.ref[Worker]) -> None:
        if _workers.get(serial) is ref:
            _workers.pop(serial, None)
        if _by_ident.get(key) is ref:
            _by_ident.pop(key, None)

    return forget


def _register(worker: Worker) -> None:
    ref = weakref.ref(worker, _forgetter(worker.serial, worker.ident))
    _workers[worker.serial] = ref
    _by_ident[worker.ident] = ref


def _new_worker() -> Worker:
    worker = _adopted()
    if worker is None:
        worker = Worker(next(_serials))
        worker.ident = ident()
    _local.worker = worker
    # Forgotten when the thread ends, even if nothing ever lists the workers.
    _register(worker)
    return worker


def _adopted() -> Worker | None:
    """This thread's worker from before gevent's patching, if this is its main greenlet."""
    unpatched = _unpatched
    if unpatched is None:
        return None
    try:
        old = unpatched.worker
        import greenlet

        if greenlet.getcurrent().parent is not None:
            return None  # a spawned greenlet: it never saw the thread's contexts
    except Exception:
        return None
    del unpatched.worker
    old.ident = ident()
    return old


def worker() -> Worker:
    """The current worker's ledger."""
    try:
        return _local.worker
    except AttributeError:
        return _new_worker()


def existing() -> Worker | None:
    """The current worker's ledger if it has one; never creates one.

    For checks at the end of a thread: most threads never push a context, and
    creating their ledger just to find it empty would cost every thread.
    """
    ref = _by_ident.get(ident())
    w = ref() if ref is not None else None
    if w is None:
        return None
    try:
        return w if _local.worker is w else None  # not a dead thread's with the same ident
    except AttributeError:
        return None


def known(w: Worker) -> bool:
    """Is ``w`` a worker of the hooks installed now (not one from before ``uninstall()``)?

    Pops made while the hooks were out went unseen, so such a worker's
    records cannot be judged.
    """
    ref = _workers.get(w.serial)
    return ref is not None and ref() is w


def live_workers() -> list[Worker]:
    """Every worker whose thread is alive."""
    alive = []
    for ref in list(_workers.values()):
        w = ref()
        if w is not None:
            alive.append(w)
    return alive


def rebind() -> None:
    """Use ``threading``'s identity and thread-local storage as they are now.

    gevent patches ``threading`` in gunicorn's worker only after the fork, so
    hooks installed in the master (``--preload``) would see every greenlet of
    a worker as one thread. Workers of the old storage stay registered until
    their threads end; a thread's main greenlet takes its own back.
    """
    global ident, _local, _unpatched
    if threading.get_ident is ident:
        return
    _unpatched = _local
    _local = threading.local()
    ident = threading.get_ident


# --------------------------------------------------------------------------
# Flask's internals that the hooks compare against, looked up once.

# Code objects of Flask's own callers of push: a push from there is made on
# behalf of a request, not by the user's code.
_request_push_code: Any = None
_wsgi_app_code: Any = None


# --------------------------------------------------------------------------
# The hooks.

_getframe = sys._getframe
_monotonic = time.monotonic


def _site_of(frame: Any, request: RequestInfo | None) -> Site | None:
    """The push site of a push made from ``frame`` (not Flask's own for a request).

    A push made by the request's own code is the first moment its span is
    known to be active: it is kept for the leak's link to the request's trace.
    """
    code = frame.f_code
    if frames.file_kinds.get(code.co_filename) == frames.USER:
        site = (code, frame.f_lasti)  # pushed straight from user code: no walk
    else:
        site = frames.site_from(frame)
    if request is not None and request.span_context is None:
        request.span_context = telemetry.current_span_context()
    return site


def _home_request(ctx: Any, w: Worker) -> RequestInfo | None:
    """The request of the push that made ``ctx`` current on another worker.

    On Flask 3.2 pushing a context that is already pushed only counts one more
    push; the context stays where it is current, whoever pops it last. Such a
    push in a worker of its own (an async view runs in an executor thread and
    ``stream_with_context`` pushes the request's context there, to be popped
    when the body ends on the serving thread) belongs to that request, not to
    the worker's task.
    """
    for other in live_workers():
        if other is not w:
            for record in reversed(list(other.open)):
                if record[_CTX] is ctx:
                    return record[_REQUEST]
    return None


def _recorder(kind: str | None) -> Callable[[Any, Any, bool], None]:
    """What a push of this kind records, given the frame that called ``push``
    (kind ``None``: the context's own, ``flaskmodel.kind_of``) and whether the
    context was pushed already before it (Flask 3.2)."""

    def record(ctx: Any, frame: Any, nested: bool = False) -> None:
        try:
            try:
                w = _local.worker
            except AttributeError:
                w = _new_worker()
            request = w.request
            if nested and request is None:
                request = _home_request(ctx, w)
            code = frame.f_code
            k = kind if kind is not None else flaskmodel.kind_of(ctx)
            if code is _request_push_code or code is _wsgi_app_code:
                # Flask pushing for the request it serves: no user site.
                site = None
                if k == telemetry.KIND_REQUEST and request is not None and request.rule is None:
                    request.rule = getattr(getattr(ctx, "request", None), "url_rule", None)
            else:
                site = _site_of(frame, request)
            w.open.append([ctx, k, site, _monotonic(), request, nested])
            next(_pushes[k])
        except Exception as exc:
            telemetry.fault("ledger push", exc)

    return record


def _takes(func: Callable[..., Any], names: list[str]) -> bool:
    """Does ``func`` take exactly these parameters (Flask's own signature)?"""
    try:
        return list(inspect.signature(func, follow_wrapped=False).parameters) == names
    except (TypeError, ValueError):
        return False


def _is_current(ctx: Any, kind: str | None) -> bool:
    """Is ``ctx`` current (a push that raised after it took effect)?"""
    return current(kind if kind is not None else flaskmodel.kind_of(ctx)) is ctx


def _make_push(original: Callable[..., Any], kind: str | None) -> Callable[..., Any]:
    """The push hook; ``kind`` None: the kind follows what the context holds."""
    record = _recorder(kind)

    if not _takes(original, ["self"]):

        def push_any(self: Any, *args: Any, **kwargs: Any) -> Any:
            nested = kind is None and flaskmodel.is_pushed(self)
            try:
                result = original(self, *args, **kwargs)
            except BaseException:
                if _is_current(self, kind):
                    record(self, _getframe(1), nested)
                raise
            record(self, _getframe(1), nested)
            return result

        return _like(push_any, original)

    # Flask's own signature, and record() inlined: this runs on every request,
    # where each Python call, each *args tuple and each bytecode shows
    # (docs/benchmarks.md).
    file_kinds, user = frames.file_kinds, frames.USER
    if kind is not None:
        return _like(_fixed_push(original, kind, record, file_kinds, user), original)

    pushes = _pushes
    request_kind = telemetry.KIND_REQUEST
    kind_of, is_pushed = flaskmodel.kind_of, flaskmodel.is_pushed

    def push(self: Any) -> None:
        nested = is_pushed(self)
        try:
            original(self)
        except BaseException:
            # A receiver of appcontext_pushed raised after the context became current.
            if _is_current(self, None):
                record(self, _getframe(1), nested)
            raise
        try:
            try:
                w = _local.worker
            except AttributeError:
                w = _new_worker()
            request = w.request
            if nested and request is None:
                request = _home_request(self, w)
            frame = _getframe(1)
            code = frame.f_code
            k = kind_of(self)
            if code is _request_push_code or code is _wsgi_app_code:
                site = None
                if k == request_kind and request is not None and request.rule is None:
                    request.rule = getattr(getattr(self, "request", None), "url_rule", None)
            elif request is None and file_kinds.get(code.co_filename) == user:
                site = (code, frame.f_lasti)  # pushed straight from user code: no walk
            else:
                site = _site_of(frame, request)
            w.open.append([self, k, site, _monotonic(), request, nested])
            next(pushes[k])
        except Exception as exc:
            telemetry.fault("ledger push", exc)

    return _like(push, original)


def _fixed_push(
    original: Callable[..., Any],
    kind: str,
    record: Callable[[Any, Any, bool], None],
    file_kinds: dict[str, int],
    user: int,
) -> Callable[[Any], None]:
    """The push hook of a class whose contexts are all of one kind (Flask <= 3.1):
    nothing to work out per push but the record itself."""
    counter = _pushes[kind]
    matches_rule = kind == telemetry.KIND_REQUEST

    def push(self: Any) -> None:
        try:
            original(self)
        except BaseException:
            # A receiver of appcontext_pushed raised after the context became current.
            if _is_current(self, kind):
                record(self, _getframe(1), False)
            raise
        try:
            try:
                w = _local.worker
            except AttributeError:
                w = _new_worker()
            request = w.request
            frame = _getframe(1)
            code = frame.f_code
            if code is _request_push_code or code is _wsgi_app_code:
                # Flask pushing for the request it serves: no user site.
                if matches_rule and request is not None and request.rule is None:
                    request.rule = getattr(getattr(self, "request", None), "url_rule", None)
                w.open.append([self, kind, None, _monotonic(), request, False])
            elif request is None and file_kinds.get(code.co_filename) == user:
                # Pushed straight from user code: no walk.
                w.open.append([self, kind, (code, frame.f_lasti), _monotonic(), None, False])
            else:
                w.open.append([self, kind, _site_of(frame, request), _monotonic(), request, False])
            next(counter)
        except Exception as exc:
            telemetry.fault("ledger push", exc)

    return push


def _make_pop(original: Callable[..., Any], kind: str | None) -> Callable[..., Any]:
    """The pop hook; ``kind`` None: the kind follows what the context holds."""
    ok = {k: _pops[k, telemetry.OUTCOME_OK] for k in _KINDS}
    defaults = getattr(original, "__defaults__", None)

    if not (_takes(original, ["self", "exc"]) and defaults and len(defaults) == 1):

        def pop_any(self: Any, *args: Any, **kwargs: Any) -> Any:
            w, record, where = _take(self)
            try:
                result = original(self, *args, **kwargs)
            except BaseException as error:
                _after_pop(w, self, kind, record, error, where)
                raise
            if record is None:
                _after_pop(w, self, kind, None, None)
            else:
                next(ok[record[_KIND]])
            return result

        return _like(pop_any, original)

    sentinel = defaults[0]
    # One kind per class up to Flask 3.1: its counter, with no look-up per pop.
    fixed = ok[kind] if kind is not None else None

    # Flask's own signature, and _take() inlined for its usual case, for the
    # same reason as push.
    def pop(self: Any, exc: Any = sentinel) -> None:
        try:
            w = _local.worker
        except AttributeError:
            w = _new_worker()
        open_ = w.open
        where = None  # on top
        record = open_[-1] if open_ else None
        if record is not None and record[_CTX] is self and record[_REQUEST] is w.request:
            open_.pop()
            if open_ and record[_SITE] is not None:
                _keep_site(open_, self, record[_SITE])
        else:
            record, where = _choose(w, self)
        try:
            original(self, exc)
        except BaseException as error:
            _after_pop(w, self, kind, record, error, where)
            raise
        if record is None:
            _after_pop(w, self, kind, None, None)
        elif fixed is not None:
            next(fixed)
        else:
            next(ok[record[_KIND]])

    return _like(pop, original)


def _take(self: Any) -> tuple[Worker, list[Any] | None, int | None]:
    """Take the context's record off before popping: popping a request context
    pops its application context inside it, which then finds its own on top.
    Also says where the record was (``None``: on top)."""
    w = worker()
    open_ = w.open
    if open_ and open_[-1][_CTX] is self and open_[-1][_REQUEST] is w.request:
        record = open_.pop()
        if open_ and record[_SITE] is not None:
            _keep_site(open_, self, record[_SITE])
        return w, record, None
    return (w, *_choose(w, self))


def _choose(w: Worker, ctx: Any) -> tuple[list[Any] | None, int | None]:
    """The record a pop of ``ctx`` closes, when it is not simply the top one,
    and where it was (for a wrong-order pop, the contexts above it are the ones
    Flask jumped over).

    One context object can be pushed twice (``stream_with_context`` pushes the
    request's context again while the body is read, and the test client
    pushes it again to keep it after the request). A pop then closes the push
    made for the same request as the code popping it (else the most recent
    one). A context with one record not on top is left to ``_after_pop``: it
    is a wrong-order pop or a pop on another thread, which Flask decides.
    """
    try:
        open_ = w.open
        mine = [i for i in range(len(open_)) if open_[i][_CTX] is ctx]
        if not mine or (len(mine) == 1 and mine[0] != len(open_) - 1):
            return None, None
        request = w.request
        index = mine[-1]
        for i in reversed(mine):
            if open_[i][_REQUEST] is request:
                index = i
                break
        record = open_.pop(index)
        if record[_SITE] is not None:
            _keep_site(open_, ctx, record[_SITE])
        return record, index
    except Exception as exc:
        telemetry.fault("ledger pop", exc)
        return None, None


def _like(wrapper: Callable[..., Any], original: Callable[..., Any]) -> Callable[..., Any]:
    """Give the wrapper the original's identity attributes."""
    functools.update_wrapper(wrapper, original)
    return wrapper


def _keep_site(records: list[list[Any]], ctx: Any, site: Site) -> None:
    """A context pushed twice and popped once stays open because of the other
    push: the push that remains takes this site if Flask made it on the user's
    behalf (``stream_with_context`` re-pushes the request's context in the view)."""
    index = _find(records, ctx)
    if index >= 0 and records[index][_SITE] is None:
        records[index][_SITE] = site


def _find(records: list[list[Any]], ctx: Any) -> int:
    for i in range(len(records) - 1, -1, -1):
        if records[i][_CTX] is ctx:
            return i
    return -1


def _after_pop(
    w: Worker,
    ctx: Any,
    kind: str | None,
    record: list[Any] | None,
    exc: BaseException | None,
    where: int | None = None,
) -> None:
    """Reconcile the ledger after a pop that was not the plain case.

    Only this worker's own list is restructured; another worker's records are
    at most marked closed (one slot written), since that worker may be pushing
    or popping at this very moment.
    """
    try:
        if record is None:
            index = _find(w.open, ctx)
            if index < 0:
                _pop_elsewhere(w, ctx, kind or flaskmodel.kind_of(ctx), exc)
                return
            record = w.open.pop(index)
        else:
            index = len(w.open) if where is None else where  # where the record was
        kind = record[_KIND]
        wrong = flaskmodel.is_wrong_order(exc, kind)
        if flaskmodel.is_refusal(exc) or not (exc is None or wrong or current(kind) is not ctx):
            # Flask did not pop it (Flask 3.2 refuses a pop up front; up to 3.1, a
            # token from another contextvars Context): still open. Only a
            # wrong-order attempt is counted.
            w.open.insert(min(index, len(w.open)), record)
            if wrong:
                next(_pops[kind, telemetry.OUTCOME_WRONG])
                _log_pop(kind, telemetry.OUTCOME_WRONG)
            return
        next(_pops[kind, telemetry.OUTCOME_WRONG if wrong else telemetry.OUTCOME_OK])
        if wrong:
            _orphan_above(w, kind, index)
            _log_pop(kind, telemetry.OUTCOME_WRONG)
    except Exception as error:
        telemetry.fault("ledger pop", error)


def _pop_elsewhere(w: Worker, ctx: Any, kind: str, exc: BaseException | None) -> None:
    """A pop of a context pushed on another worker (or before ctxguard was installed)."""
    owner = _find_owner(ctx)
    if owner is None:
        # Pushed before ctxguard was installed: nothing to reconcile.
        if exc is None:
            next(_pops[kind, telemetry.OUTCOME_OK])
        return
    next(_pops[kind, telemetry.OUTCOME_CROSS])
    if exc is None:
        # Flask managed it (both workers share one contextvars context).
        for record in list(owner.open):
            if record[_CTX] is ctx:
                record[_CTX] = None
                if record[_NESTED]:
                    # Flask 3.2: the other worker's push only counted one more push of
                    # a context current here, and Flask ended it where the context
                    # lives (see _home_request): nothing wrong to log.
                    return
                break
    _log_pop(kind, telemetry.OUTCOME_CROSS)


def _log_pop(kind: str, outcome: str) -> None:
    """Log an unusual pop with the line that made it.

    Flask's own error message is not logged: it holds the ``repr`` of the
    contexts, which is the request's full URL with its query string.
    """
    location = frames.describe(frames.user_site(4))
    telemetry.log_event(
        ("pop", kind, outcome, location),
        "ctxguard: %s context popped with outcome %s at %s",
        kind,
        outcome,
        frames.where(location, "an unknown place"),
    )


def _orphan_above(w: Worker, kind: str, index: int) -> None:
    """After a wrong-order pop, same-kind contexts pushed later are unreachable.

    Flask reset its context variable past them: they stay open for ever and
    their teardown never runs. Keep them in the ledger (they are leaks, to be
    reported with their push site) but only weakly, so the ledger does not
    keep them alive.
    """
    for record in w.open[index:]:
        ctx = record[_CTX]
        if record[_KIND] == kind and ctx is not None and not isinstance(ctx, weakref.ref):
            record[_CTX] = weakref.ref(ctx)


def _find_owner(ctx: Any) -> Worker | None:
    for other in live_workers():
        if _find(other.open, ctx) >= 0:
            return other
    return None


# --------------------------------------------------------------------------
# Reading the ledger (cold paths only).


@dataclass(frozen=True)
class OpenContext:
    """A context pushed and not popped, as the middleware and snapshot see it."""

    kind: str
    site: Site | None
    age: float
    request: RequestInfo | None
    current: bool
    reported: bool
    handle: list[Any]

    @property
    def location(self) -> frames.Location | None:
        return frames.describe(self.site)

    @property
    def reachable(self) -> bool:
        """False once Flask can never pop it (a wrong-order pop jumped past it)."""
        ctx = self.handle[_CTX]
        return ctx is not None and not isinstance(ctx, weakref.ref)

    @property
    def nested(self) -> bool:
        """Flask 3.2: pushed while it was pushed already, so the push only counted one
        more; the context lives, and is popped, where it was first pushed."""
        return bool(self.handle[_NESTED])

    def context(self) -> Any:
        ctx = self.handle[_CTX]
        return ctx() if isinstance(ctx, weakref.ref) else ctx


def _view(record: list[Any], now: float) -> OpenContext:
    ctx = record[_CTX]
    live = ctx() if isinstance(ctx, weakref.ref) else ctx
    return OpenContext(
        kind=record[_KIND],
        site=record[_SITE],
        age=max(0.0, now - record[_PUSHED_AT]),
        request=record[_REQUEST],
        current=live is not None and current(record[_KIND]) is live,
        reported=len(record) > _FIELDS,
        handle=record,
    )


def open_contexts(
    w: Worker, request: RequestInfo | None = None, *, prune: bool = True
) -> list[OpenContext]:
    """The worker's open contexts, oldest first; only ``request``'s if given.

    ``current`` is only meaningful on the worker's own thread, and only there
    may ``prune`` forget the unreachable contexts already reported. Contexts
    popped on another worker (with Flask's consent) are not open, pruned or not.
    """
    now = _monotonic()
    if prune:
        _prune(w.open)
    views = [_view(record, now) for record in list(w.open) if record[_CTX] is not None]
    # A context Flask pushed for a request (no site of its own) is reported with
    # the site of the next push the same request made on this worker.
    later: dict[int, Site] = {}
    for i in range(len(views) - 1, -1, -1):
        item = views[i]
        if item.request is None:
            continue
        if item.site is None and id(item.request) in later:
            views[i] = replace(item, site=later[id(item.request)])
        elif item.site is not None:
            later[id(item.request)] = item.site
    return [v for v in views if request is None or v.request is request]


Mark = dict[int, float]


def mark(w: Worker | None) -> Mark:
    """What is open on ``w`` now, to tell later which contexts were pushed since.

    A record is known by its identity and push time together: a record popped
    meanwhile may leave its address to a new one.
    """
    if w is None or not w.open:
        return {}
    return {id(record): record[_PUSHED_AT] for record in list(w.open)}


def opened_since(w: Worker, before: Mark, *, prune: bool = True) -> list[OpenContext]:
    """The worker's open contexts that were not open at ``before``.

    ``prune`` as for ``open_contexts``: only on the worker's own thread.
    """
    items = open_contexts(w, prune=prune)
    if not before:
        return items
    return [item for item in items if before.get(id(item.handle)) != item.handle[_PUSHED_AT]]


def top(w: Worker) -> OpenContext | None:
    """The most recently pushed context still open on this worker."""
    return _view(w.open[-1], _monotonic()) if w.open else None


def has_open(w: Worker, request: RequestInfo) -> bool:
    """Does ``w`` still have a context pushed for ``request``?"""
    return any(record[_REQUEST] is request for record in w.open)


def handed_over(w: Worker, item: OpenContext) -> bool:
    """Was this context pushed again, after the request's push, by someone else?

    The test client pushes a request's contexts again after the request to
    keep them inside ``with client:``; whoever did will pop them. The
    request's push is theirs from now on (its record takes their request, so
    it is not found stale later either).
    """
    record = item.handle
    ctx = record[_CTX]
    records = w.open
    below = True
    for other in list(records):
        if other is record:
            below = False
        elif not below and other[_CTX] is ctx and other[_REQUEST] is not record[_REQUEST]:
            record[_REQUEST] = other[_REQUEST]
            return True
    return False


def needs_attention(w: Worker) -> bool:
    """Cheap test for the middleware: is there anything new or stale on this worker?"""
    return any(len(record) == _FIELDS or record[_REQUEST] is not None for record in w.open)


def _prune(records: list[list[Any]]) -> None:
    """Forget records closed elsewhere, or reported and collected.

    Removed one by one, by identity: a finaliser run by a collection while
    this runs may pop a context (and its record) from the same list.
    """
    gone = [r for r in records if r[_CTX] is None or (len(r) > _FIELDS and _is_dead(r))]
    for record in gone:
        for i in range(len(records) - 1, -1, -1):
            if records[i] is record:
                del records[i]
                break


def _is_dead(record: list[Any]) -> bool:
    """Closed by another worker's pop, or unreachable and already collected."""
    ctx = record[_CTX]
    return ctx is None or (isinstance(ctx, weakref.ref) and ctx() is None)


def claim(item: OpenContext) -> bool:
    """Mark the context reported; True for exactly one caller, whoever calls first.

    A leak can be found at once by a finaliser on one thread and by the next
    request on another: the check and the mark must be one atomic step, and
    no lock may be taken here (a finaliser can run while the lock is held).
    ``list.append`` is atomic, so each caller appends a token of its own and
    the one whose token lands first in the slot after the fields wins.
    """
    token = object()
    record = item.handle
    record.append(token)
    return record[_FIELDS] is token


def record_current_context(w: Worker) -> None:
    """Record contexts current on this worker that were pushed before the hooks.

    Their push site is unknown, but a context pushed at import time before
    ``CtxGuard(app)`` must still be seen by the middleware.
    """
    known = {id(record[_CTX]) for record in w.open}
    adopted = [
        [ctx, kind, None, _monotonic(), None, False]
        for ctx, kind in flaskmodel.current_contexts()
        if id(ctx) not in known
    ]
    w.open[0:0] = adopted


# --------------------------------------------------------------------------
# Metrics and snapshot.


def observations() -> dict[str, list[tuple[dict[str, str], int]]]:
    """Cumulative pushes and pops, and contexts open now, for the observable instruments."""
    open_by_kind = dict.fromkeys(_KINDS, 0)
    for w in live_workers():
        for record in list(w.open):
            if not _is_dead(record):
                open_by_kind[record[_KIND]] += 1
    kind_key = telemetry.CONTEXT_KIND
    return {
        telemetry.PUSHES: [({kind_key: kind}, telemetry.counted(c)) for kind, c in _pushes.items()],
        telemetry.POPS: [
            ({kind_key: kind, telemetry.POP_OUTCOME: outcome}, telemetry.counted(c))
            for (kind, outcome), c in _pops.items()
        ],
        telemetry.OPEN: [({kind_key: kind}, n) for kind, n in open_by_kind.items()],
    }


def snapshot(
    describe: Callable[[Worker], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Every worker's open contexts, as plain JSON-serialisable data.

    ``describe`` adds what other modules know of each worker (its kind, the
    request that started its work).
    """
    workers = []
    for w in sorted(live_workers(), key=lambda w: w.serial):
        contexts = []
        for item in open_contexts(w, prune=False):
            if not item.reachable and item.context() is None:
                continue  # gone: nothing can pop it and nothing holds it
            loc = item.location
            contexts.append(
                {
                    "kind": item.kind,
                    "file": loc.file if loc else None,
                    "line": loc.line if loc else None,
                    "function": loc.function if loc else None,
                    "age": round(item.age, 6),
                    "request": item.request.as_dict() if item.request is not None else None,
                    "leaked": item.reported,
                    "reachable": item.reachable,
                }
            )
        if contexts:
            entry: dict[str, Any] = {"thread_id": w.ident, "thread_name": w.name}
            if describe is not None:
                entry.update(describe(w))
            entry["contexts"] = contexts
            workers.append(entry)
    return {"pid": os.getpid(), "workers": workers}


# --------------------------------------------------------------------------
# Install and uninstall.


def hooks() -> Iterator[tuple[Any, str, Callable[..., Any]]]:
    """The attributes this module replaces, with their replacements."""
    import flask

    global _request_push_code, _wsgi_app_code
    model = flaskmodel.detect()
    _request_push_code = model.request_push
    _wsgi_app_code = getattr(inspect.unwrap(flask.Flask.wsgi_app), "__code__", None)
    for cls, kind in model.classes:
        yield cls, "push", _make_push(cls.push, kind)
        yield cls, "pop", _make_pop(cls.pop, kind)


def reset() -> None:
    """Forget every worker and count, and use ``threading.local`` as it is now.

    Called when the hooks are installed in a clean process state (gevent may
    have patched ``threading.local`` since import) and when they are removed.
    """
    global _local, ident, _unpatched
    ident = threading.get_ident  # gevent's, once it has patched threading
    _workers.clear()
    _by_ident.clear()
    _reset_counters()
    _local = threading.local()
    _unpatched = None
