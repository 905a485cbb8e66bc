"""Threads and executor tasks: where their work came from, and what they left open.

``Thread.start`` and ``ThreadPoolExecutor.submit`` take the origin of the
work when a request is being handled (route template, method, endpoint and
the active span), so an error or a leak in the thread names the request that
spawned it. At the end of a thread's ``run``, and of each executor task, a
context still pushed is a leak (``thread_exit``, ``task_end``).

``start`` wraps the thread's own ``run`` (an instance attribute, as Sentry
does), which covers ``Timer`` and every subclass that overrides ``run``.

Optional (``propagate="app"``): work started inside a request of an app that
asked for it runs inside a fresh application context of that app, so
``current_app`` and ``g`` work there while ``request`` still fails loudly.
"""

from __future__ import annotations

import functools
import sys
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from types import FunctionType, MethodType
from typing import Any

from . import flaskmodel, leaks, ledger, telemetry
from .ledger import RequestInfo, Worker

#: The module of the executor's own worker loop: its threads carry no origin.
_EXECUTOR_MODULE = ThreadPoolExecutor.__module__
#: Apps whose spawned work gets an application context (``propagate="app"``).
_propagating: weakref.WeakSet[Any] = weakref.WeakSet()
#: False once uninstalled: wrappers already handed out then step aside.
_active = False
_get_ident = threading.get_ident


def propagate_app(app: Any) -> None:
    """Threads and tasks started in ``app``'s requests get an app context of ``app``."""
    _propagating.add(app)


# --------------------------------------------------------------------------
# What kind of worker is this?


def kind_of(w: Worker) -> str:
    """The ``ctxguard.worker.kind`` of the code running on ``w`` (this thread) now."""
    if w.request is not None:
        return telemetry.WORKER_REQUEST
    binding = _bindings.get(_get_ident())
    if binding is not None:
        return binding[0]
    if "gevent" in sys.modules and _in_greenlet():
        return telemetry.WORKER_GREENLET
    if "asyncio" in sys.modules and _in_task():
        return telemetry.WORKER_TASK
    if "click" in sys.modules and _in_cli():
        return telemetry.WORKER_CLI
    if threading.current_thread() is threading.main_thread():
        return telemetry.WORKER_MAIN
    return telemetry.WORKER_THREAD


def _in_greenlet() -> bool:
    try:
        import greenlet

        return greenlet.getcurrent().parent is not None  # not the thread's main greenlet
    except Exception:
        return False


def _in_task() -> bool:
    try:
        import asyncio

        # Asking for the loop first avoids current_task()'s RuntimeError when there is none.
        loop = asyncio.events._get_running_loop()
        return loop is not None and asyncio.current_task(loop) is not None
    except Exception:
        return False


def _in_cli() -> bool:
    try:
        import click

        return click.get_current_context(silent=True) is not None
    except Exception:
        return False


# --------------------------------------------------------------------------
# The origin, bound to the worker while the work runs.


class Origin:
    """The request that handed work to a thread, an executor or a task queue.

    Taken when the work is started or submitted; ``span_context`` is the span
    active then (the request's, when it is traced), for a span link.
    """

    __slots__ = ("endpoint", "http_method", "route", "span_context")

    def __init__(self, request: Any, span_context: Any) -> None:
        info = RequestInfo(getattr(request, "method", None))
        info.rule = getattr(request, "url_rule", None)
        self.route = info.route
        self.http_method = info.http_method
        self.endpoint = info.endpoint
        self.span_context = span_context

    @classmethod
    def of(
        cls,
        route: str | None,
        http_method: str | None,
        endpoint: str | None,
        span_context: Any = None,
    ) -> Origin:
        """An origin carried over a process boundary (a task message's headers)."""
        origin = cls.__new__(cls)
        origin.route = route
        origin.http_method = http_method
        origin.endpoint = endpoint
        origin.span_context = span_context
        return origin

    def as_dict(self) -> dict[str, str | None]:
        return {"method": self.http_method, "route": self.route, "endpoint": self.endpoint}


#: What each thread (or greenlet) runs now for ctxguard, by ident: its worker
#: kind, origin and the attributes its reports carry (a Celery task's name).
#: Kept apart from the ledger so that a thread that never pushes a context
#: never gets a ledger of its own.
_bindings: dict[int, tuple[str, Origin | None, Mapping[str, Any] | None]] = {}


def origin_of(w: Worker) -> RequestInfo | Origin | None:
    """The request this code runs for (served here, or that started the work)."""
    if w.request is not None:
        return w.request
    binding = _bindings.get(_get_ident())
    return binding[1] if binding is not None else None


def attributes_of(w: Worker) -> Mapping[str, Any] | None:
    """What the unit of work running here adds to its reports (a task's name)."""
    if w.request is not None:
        return None
    binding = _bindings.get(_get_ident())
    return binding[2] if binding is not None else None


def describe(w: Worker) -> dict[str, Any]:
    """The kind of any worker (not only this thread's) and its origin, for ``snapshot``."""
    origin: Any
    if w.request is not None:
        kind, origin = telemetry.WORKER_REQUEST, w.request
    else:
        binding = _bindings.get(w.ident)
        if binding is not None:
            kind, origin = binding[0], binding[1]
        else:
            origin = None
            main = threading.main_thread()
            kind = telemetry.WORKER_MAIN if w.ident == main.ident else telemetry.WORKER_THREAD
    return {"kind": kind, "origin": origin.as_dict() if origin is not None else None}


def current_origin() -> Origin | None:
    """The request being handled on this thread now, as an origin for work it hands over."""
    return _capture()[0]


def _capture() -> tuple[Origin | None, Any]:
    """The request handing work over (if any), and the app to propagate."""
    ctx = flaskmodel.request_context()
    if ctx is None:
        return None, None
    origin = Origin(getattr(ctx, "request", None), telemetry.current_span_context())
    app = getattr(ctx, "app", None) if len(_propagating) else None
    return origin, app if app is not None and app in _propagating else None


_Binding = tuple[str, "Origin | None", "Mapping[str, Any] | None"]
_State = tuple[int, "_Binding | None", Any, "Origin | None", ledger.Mark]


_NOTHING_OPEN: ledger.Mark = {}


def _enter(
    kind: str,
    origin: Origin | None,
    app: Any,
    attributes: Mapping[str, Any] | None = None,
    baseline: bool = False,
) -> _State | None:
    """Bind the work to this thread. ``baseline``: contexts open now (a worker
    process's own) are not the work's. A new thread, or a pool's, has none."""
    try:
        ident = _get_ident()
        previous = _bindings.get(ident)
        before = ledger.mark(ledger.existing()) if baseline else _NOTHING_OPEN
        _bindings[ident] = (kind, origin, attributes)
    except Exception as exc:
        telemetry.fault("thread start", exc)
        return None
    ctx = None
    if app is not None:
        try:
            ctx = app.app_context()
            ctx.push()
        except Exception as exc:
            telemetry.fault("propagated app context", exc)
            if ledger.current(telemetry.KIND_APP) is not ctx:
                ctx = None
            # else: pushed, then an ``appcontext_pushed`` receiver raised. It is
            # current: popped at the end like any other, so its teardown runs.
    return ident, previous, ctx, origin, before


def _exit(state: _State | None, site: str) -> None:
    """Report what the work left open."""
    if state is None:
        return
    ident, previous, ctx, origin, before = state
    try:
        if ctx is not None and ledger.current(telemetry.KIND_APP) is ctx:
            try:
                ctx.pop()
            except Exception as exc:  # a teardown function of the app raised
                telemetry.log_event(
                    ("propagated teardown", site),
                    "ctxguard: a teardown function raised %s while popping the propagated"
                    " app context",
                    flaskmodel.raised_names(exc),
                )
        if telemetry.pending:
            telemetry.drain_if_safe(sys._getframe(1))
        w = ledger.existing()
        # Uninstalled meanwhile: pops since went unseen, so the ledger cannot judge.
        if w is not None and w.open and _active:
            binding = _bindings.get(ident)
            extra = binding[2] if binding is not None else None
            for item in ledger.opened_since(w, before):
                # A request's contexts are the middleware's to judge when the request
                # ends (its body may still be streaming from here); a push that only
                # counted one more push of a context living elsewhere (Flask 3.2) is
                # ended there.
                if item.reported or item.request is not None or item.nested:
                    continue
                if ctx is None or item.context() is not ctx:
                    leaks.report(item, w, site, origin=origin, attributes=extra)
    except Exception as exc:
        telemetry.fault("thread end check", exc)
    finally:
        if previous is None:
            _bindings.pop(ident, None)
        else:
            _bindings[ident] = previous


class Unit:
    """One unit of work that is not a request (a task a queue hands to a worker).

    ``begin`` binds its worker kind, origin and report attributes to this
    thread (or greenlet); ``end`` reports, as leaked at ``site``, every
    context pushed since ``begin`` and still open. Contexts open before
    ``begin`` (a worker's own, listed in ``before``) are not the unit's.
    Never raises.
    """

    __slots__ = ("_state", "before")

    def __init__(self, state: _State | None) -> None:
        self._state = state
        #: What was open on this worker when the unit began (``ledger.mark``).
        self.before: ledger.Mark = state[4] if state is not None else {}

    def end(self, site: str = telemetry.SITE_TASK_END) -> None:
        state, self._state = self._state, None
        _exit(state, site)


def begin(
    kind: str, origin: Origin | None = None, attributes: Mapping[str, Any] | None = None
) -> Unit:
    """Start a unit of work on this thread; see :class:`Unit`."""
    return Unit(_enter(kind, origin, None, attributes, baseline=True) if _active else None)


# --------------------------------------------------------------------------
# The hooks.


def _bound(original: Any, instance: Any) -> Any:
    """``original``, some other library's wrapper object rather than a plain function,
    bound to ``instance`` as an attribute lookup on it would."""
    return original.__get__(instance, type(instance))


def _make_start(original: Any) -> Callable[..., Any]:
    plain = type(original) is FunctionType

    def start(self: Any, *args: Any, **kwargs: Any) -> Any:
        prepared = False
        if _active:
            try:
                prepared = _prepare(self)
            except Exception as exc:
                telemetry.fault("thread start", exc)
        try:
            if plain:
                return original(self, *args, **kwargs)
            return _bound(original, self)(*args, **kwargs)
        except BaseException:
            if prepared:
                _unprepare(self)  # never started: leave the thread as it was
            raise

    return functools.wraps(original)(start)


_STATE_KEY = "_ctxguard_run"
_NOTHING = object()


def _prepare(thread: Any) -> bool:
    """Give ``thread`` a ``run`` that binds the origin and checks the balance.

    The thread's own ``run`` (whatever it is by now: a subclass's, or another
    library's wrapper) and what to bind are kept in the thread's ``__dict__``,
    and removed when ``run`` ends, so no reference cycle outlives the thread.
    """
    attributes = vars(thread)
    if _STATE_KEY in attributes:
        return False  # started twice, or ``start`` is wrapped twice
    target = getattr(thread, "_target", None)
    if getattr(target, "__module__", None) == _EXECUTOR_MODULE:
        kind, origin, app = telemetry.WORKER_EXECUTOR, None, None  # the pool's own thread
    else:
        kind = telemetry.WORKER_THREAD
        origin, app = _capture()
    inner = thread.run
    # A plain bound method is called through its function with the thread, as
    # Sentry's wrapper calls what it wraps; anything else is called as it is.
    func = inner.__func__ if type(inner) is MethodType and inner.__self__ is thread else None
    # What the thread's own ``run`` attribute was (set by the user or another
    # library), to put back exactly when ``run`` ends.
    own = attributes.get("run", _NOTHING)
    attributes[_STATE_KEY] = (inner, func, kind, origin, app, own)
    attributes["run"] = MethodType(run, thread)
    return True


def _unprepare(thread: Any) -> None:
    attributes = vars(thread)
    state = attributes.pop(_STATE_KEY, None)
    mine = attributes.get("run")
    if type(mine) is MethodType and mine.__func__ is run:
        own = state[5] if state is not None else _NOTHING
        if own is _NOTHING:
            del attributes["run"]
        else:
            attributes["run"] = own


def run(self: Any, *args: Any, **kwargs: Any) -> Any:
    """The thread's ``run``, with the origin bound and the balance checked at the end."""
    state = vars(self).get(_STATE_KEY)
    if state is None:  # prepared and undone: nothing to add
        return type(self).run(self, *args, **kwargs)
    inner, func, kind, origin, app, _ = state
    if not _active:
        _unprepare(self)
        return func(self, *args, **kwargs) if func is not None else inner(*args, **kwargs)
    entered = _enter(kind, origin, app)
    try:
        if func is not None:
            return func(self, *args, **kwargs)
        return inner(*args, **kwargs)
    finally:
        _exit(entered, telemetry.SITE_THREAD_EXIT)
        _unprepare(self)


def _make_submit(original: Any) -> Callable[..., Any]:
    plain = type(original) is FunctionType

    def submit(self: Any, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        if _active:
            try:
                fn = _task(fn)
            except Exception as exc:
                telemetry.fault("executor submit", exc)
        if plain:
            return original(self, fn, *args, **kwargs)
        return _bound(original, self)(fn, *args, **kwargs)

    return functools.wraps(original)(submit)


def _task(
    fn: Any,
    kind: str = telemetry.WORKER_EXECUTOR,
    site: str = telemetry.SITE_TASK_END,
    captured: tuple[Origin | None, Any] | None = None,
) -> Callable[..., Any]:
    origin, app = captured if captured is not None else _capture()

    def task(*args: Any, **kwargs: Any) -> Any:
        if not _active:
            return fn(*args, **kwargs)
        state = _enter(kind, origin, app)
        try:
            return fn(*args, **kwargs)
        finally:
            _exit(state, site)

    try:
        if type(fn) is FunctionType:
            _assign_identity(task, fn)
        else:
            functools.update_wrapper(task, fn)
    except Exception:
        pass  # an odd callable: the task still runs it
    return task


#: Python 3.12 and later: ``functools.update_wrapper`` also assigns ``__type_params__``.
_TYPE_PARAMS = "__type_params__" in functools.WRAPPER_ASSIGNMENTS


def _assign_identity(task: Any, fn: FunctionType) -> None:
    """What ``functools.update_wrapper`` does for a plain function, written out.

    It runs once per ``submit``; the generic loop of ``getattr``/``setattr``
    calls cost most of the submit hook (twice as much on Python 3.10).
    """
    task.__module__ = fn.__module__
    task.__name__ = fn.__name__
    task.__qualname__ = fn.__qualname__
    task.__doc__ = fn.__doc__
    task.__annotations__ = fn.__annotations__
    if _TYPE_PARAMS:
        task.__type_params__ = fn.__type_params__
    attributes = fn.__dict__
    if attributes:
        task.__dict__.update(attributes)
    task.__wrapped__ = fn


def _make_spawn(original: Any, position: int) -> Callable[..., Any]:
    """gevent's ``spawn``, ``spawn_later`` or ``Group.spawn``, whose argument at
    ``position`` is the function the greenlet runs.

    Called during a request, the function runs bound to the request's origin
    and its balance is checked when it returns (``thread_exit``, as a thread's).
    Elsewhere, or when gevent has not patched ``threading`` (greenlets then
    share their thread's ledger, so a binding would leak into the others),
    the call goes straight through.
    """

    def spawn(*args: Any, **kwargs: Any) -> Any:
        if _active and len(args) > position and _greenlets_are_workers():
            try:
                captured = _capture()
                if captured[0] is not None:
                    fn = _task(
                        args[position],
                        telemetry.WORKER_GREENLET,
                        telemetry.SITE_THREAD_EXIT,
                        captured,
                    )
                    args = (*args[:position], fn, *args[position + 1 :])
            except Exception as exc:
                telemetry.fault("greenlet spawn", exc)
        return original(*args, **kwargs)

    return functools.wraps(original)(spawn)


def _greenlets_are_workers() -> bool:
    """Has gevent patched ``threading``, and ctxguard followed, so that each greenlet
    is a worker of its own?"""
    try:
        from gevent import monkey

        return bool(monkey.is_module_patched("threading")) and _get_ident is threading.get_ident
    except Exception:
        return False


def _gevent_hooks() -> Iterator[tuple[Any, str, Callable[..., Any]]]:
    import gevent
    import gevent.pool

    yield gevent, "spawn", _make_spawn(gevent.spawn, 0)
    yield gevent, "spawn_later", _make_spawn(gevent.spawn_later, 1)
    owner = _defining(gevent.pool.Group, "spawn")
    yield owner, "spawn", _make_spawn(vars(owner)["spawn"], 1)


def hooks() -> Iterator[tuple[Any, str, Callable[..., Any]]]:
    """``Thread.start`` (and ``Timer.start`` if something gave it its own),
    ``ThreadPoolExecutor.submit``, and gevent's ``spawn`` functions when gevent
    is imported, with their replacements."""
    global _active, _get_ident
    _active = True
    _get_ident = threading.get_ident  # gevent's, once it has patched threading
    # After gevent's monkey-patching ``threading.Thread`` is gevent's subclass,
    # which inherits ``start``: patch the class that defines it.
    owner = _defining(threading.Thread, "start")
    yield owner, "start", _make_start(vars(owner)["start"])
    if "start" in vars(threading.Timer) and threading.Timer is not owner:
        yield threading.Timer, "start", _make_start(vars(threading.Timer)["start"])
    owner = _defining(ThreadPoolExecutor, "submit")
    yield owner, "submit", _make_submit(vars(owner)["submit"])
    if "gevent" in sys.modules:
        yield from _gevent_hooks()


def _defining(cls: type, name: str) -> type:
    return next(c for c in cls.__mro__ if name in vars(c))


def rebind() -> None:
    """Use ``threading``'s identity as it is now (gevent patched it since install)."""
    global _get_ident
    _get_ident = threading.get_ident


def reset() -> None:
    """Step aside: wrappers already handed out call straight through."""
    global _active
    _active = False
    _propagating.clear()
    _bindings.clear()
