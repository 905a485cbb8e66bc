"""Flask's proxies, reporting when they are used outside their context.

Each of ``request``, ``session``, ``g``, ``current_app``, ``request_ctx`` and
``app_ctx`` is a Werkzeug ``LocalProxy`` whose ``_get_current_object`` looks
its context up. The proxy objects themselves get a replacement, so code that
imported them long before ctxguard was installed is covered too. The
replacement does exactly Werkzeug's work when the context is there; only
when it is not does it report, then raise the very ``RuntimeError`` Werkzeug
raises (same message, no chained cause).

Not every failure reaches the user: Werkzeug answers ``bool(request)``,
``repr(request)``, ``isinstance(x, ...)``, ``dir()``, ``__doc__`` and
``__wrapped__`` with a fallback. Those are not errors and are not reported.
Nor is introspection: a tool looking a dunder attribute up through a proxy
(pytest's collection asking every module-level name for ``__test__``,
``inspect`` for ``__signature__``, ``copy.deepcopy`` and ``pickle`` for their
hooks, doctest, Sphinx, a debugger, an IDE) is not the user's code using it.
To see the name looked up, ``LocalProxy.__getattr__`` (a Werkzeug descriptor
that cannot see it) is replaced by a plain function doing the same lookup.
"""

from __future__ import annotations

import contextvars
import sys
from collections.abc import Callable, Iterator
from types import CodeType, FrameType
from typing import Any

from . import events, flaskmodel, frames, ledger, telemetry, threads

#: The proxies in ``flask.globals``, and the context each one needs.
PROXIES = (
    (telemetry.PROXY_REQUEST, telemetry.KIND_REQUEST),
    (telemetry.PROXY_SESSION, telemetry.KIND_REQUEST),
    (telemetry.PROXY_REQUEST_CTX, telemetry.KIND_REQUEST),
    (telemetry.PROXY_G, telemetry.KIND_APP),
    (telemetry.PROXY_CURRENT_APP, telemetry.KIND_APP),
    (telemetry.PROXY_APP_CTX, telemetry.KIND_APP),
)

_getframe = sys._getframe
#: Werkzeug's ``_ProxyLookup.__get__``: where fallbacks swallow the error.
_lookup_code: CodeType | None = None
#: Werkzeug's ``_ProxyLookup.__call__``: a hook called on the object, not looked up.
_lookup_call_code: CodeType | None = None

#: Protocol hooks that tools (``copy.deepcopy``, ``pickle``, ``isinstance`` with a
#: proxy as the class) look up on an object they were handed, through
#: Werkzeug's ``_ProxyLookup``: introspection, unlike operators such as
#: ``__getitem__``. Only the lookup is: ``copy.copy(request)`` calls the hook
#: (through ``_ProxyLookup.__call__``), which is using the object.
_INTROSPECTION_HOOKS = frozenset(
    (
        "__copy__",
        "__deepcopy__",
        "__reduce__",
        "__reduce_ex__",
        "__getstate__",
        "__getnewargs__",
        "__getnewargs_ex__",
        "__instancecheck__",
        "__subclasscheck__",
    )
)


#: Attributes test tools probe every module-level name for: pytest's fixture
#: marker (before pytest 8.4) and its check for ``unittest.mock`` objects.
_TOOL_PROBES = ("_pytest", "_mock_")
#: Packages whose own code looking a name up through a proxy is a tool's.
_TOOL_PACKAGES = ("_pytest", "pytest", "pluggy")


def _introspection(name: object, caller: FrameType | None) -> bool:
    """A dunder name (``__test__``, ``__signature__``, ...), a test tool's probe, or
    any lookup made by pytest's own code."""
    if isinstance(name, str) and (
        (len(name) > 4 and name.startswith("__") and name.endswith("__"))
        or name.startswith(_TOOL_PROBES)
    ):
        return True
    module = caller.f_globals.get("__name__") if caller is not None else None
    return isinstance(module, str) and module.partition(".")[0] in _TOOL_PACKAGES


def _proxy_getattr(self: Any, name: str) -> Any:
    """``LocalProxy.__getattr__``: the proxied object's attribute.

    The same work as Werkzeug's ``_ProxyLookup(getattr)``, whose ``__get__``
    never sees the name; here the name is a local of this frame, so a failed
    lookup of a dunder name can be told apart from the user's code.
    """
    return getattr(self._get_current_object(), name)


_proxy_getattr.__name__ = "__getattr__"
_proxy_getattr.__qualname__ = "LocalProxy.__getattr__"
_getattr_code = _proxy_getattr.__code__


def _werkzeug_lookup(local: Any, get_name: Any, unbound_message: Any) -> Callable[[], Any]:
    """Werkzeug 2.3 to 3.1's lookup for a proxy over a ``ContextVar``, verbatim.

    Only compared with the proxies' own code: when the bytecode is the same,
    the guarded version below is the same work on the success path.
    """

    def _get_current_object() -> Any:
        try:
            obj = local.get()
        except LookupError:
            raise RuntimeError(unbound_message) from None

        return get_name(obj)

    return _get_current_object


def _guarded(proxy: str, kind: str, local: Any, get_name: Any, message: Any) -> Callable[[], Any]:
    """Werkzeug's lookup, reporting in its ``LookupError`` branch."""

    def _get_current_object() -> Any:
        try:
            obj = local.get()
        except LookupError:
            error = RuntimeError(message)
            _outside(proxy, kind, error)
            try:
                raise error from None
            finally:
                del error  # else error -> traceback -> this frame -> error: a cycle

        return get_name(obj)

    return _get_current_object


def _guarded_merged(
    proxy: str, kind: str, local: Any, get_name: Any, message: Any
) -> Callable[[], Any]:
    """For Flask 3.2, where the request lives in the app context.

    There ``request`` inside an app context without a request finds its
    context and fails in the context's own property: that failure is
    reported too, and re-raised as it is. Any other error of the lookup
    (a session interface's own) is not a context error.
    """

    def _get_current_object() -> Any:
        try:
            obj = local.get()
        except LookupError:
            error = RuntimeError(message)
            _outside(proxy, kind, error)
            try:
                raise error from None
            finally:
                del error  # else error -> traceback -> this frame -> error: a cycle
        try:
            return get_name(obj)
        except RuntimeError as error:
            if flaskmodel.kind_of(obj) != kind:
                _outside(proxy, kind, error)
            raise

    return _get_current_object


def _wrapped(proxy: str, kind: str, original: Any, message: str | None) -> Callable[[], Any]:
    """For internals that are not Werkzeug's known ones: slower, still exact."""

    def _get_current_object() -> Any:
        try:
            return original()
        except RuntimeError as error:
            if message is None or str(error) == message:
                _outside(proxy, kind, error)
            raise

    return _get_current_object


def _closure(func: Any) -> dict[str, Any]:
    code = getattr(func, "__code__", None)
    cells = getattr(func, "__closure__", None) or ()
    if code is None or len(code.co_freevars) != len(cells):
        return {}
    try:
        return {
            name: cell.cell_contents for name, cell in zip(code.co_freevars, cells, strict=True)
        }
    except ValueError:  # an empty cell
        return {}


def _is_werkzeugs(func: Any) -> bool:
    code = getattr(func, "__code__", None)
    reference = _werkzeug_lookup(None, None, None).__code__
    return (
        code is not None
        and code.co_code == reference.co_code
        and code.co_names == reference.co_names
        and code.co_freevars == reference.co_freevars
        and code.co_varnames == reference.co_varnames
        and isinstance(_closure(func).get("local"), contextvars.ContextVar)
    )


def _replacement(
    proxy: str, kind: str, original: Any, app_vars: set[int], default_message: str | None
) -> Callable[[], Any]:
    cells = _closure(original)
    message = cells.get("unbound_message", default_message)
    if not _is_werkzeugs(original):
        telemetry.log_event(
            ("proxy shape", proxy),
            "ctxguard: flask.%s is not built as Werkzeug 2.3-3.1 builds its proxies;"
            " guarding it with a plain wrapper (correct, a little slower)",
            proxy,
        )
        guarded = _wrapped(proxy, kind, original, message)
    else:
        local = cells["local"]
        make = _guarded
        if kind == telemetry.KIND_REQUEST and id(local) in app_vars:
            make = _guarded_merged  # Flask 3.2: the request is in the app context
        guarded = make(proxy, kind, local, cells["get_name"], message)
    guarded.__wrapped__ = original  # type: ignore[attr-defined]
    guarded.__qualname__ = getattr(original, "__qualname__", guarded.__qualname__)
    return guarded


def hooks() -> Iterator[tuple[Any, str, Callable[..., Any]]]:
    """The proxies' ``_get_current_object`` attributes, with their replacements."""
    global _lookup_code, _lookup_call_code
    import flask.globals
    import werkzeug.local

    lookup = getattr(werkzeug.local, "_ProxyLookup", None)
    _lookup_code = getattr(getattr(lookup, "__get__", None), "__code__", None)
    call = vars(lookup).get("__call__") if isinstance(lookup, type) else None
    _lookup_call_code = getattr(call, "__code__", None)
    # Read from the module's own names: Flask 3.2 answers the deprecated ones
    # (``request_ctx``) through a module ``__getattr__`` that warns.
    names = vars(flask.globals)
    messages = {
        telemetry.KIND_APP: names.get("_no_app_msg"),
        telemetry.KIND_REQUEST: names.get("_no_req_msg"),
    }
    found = []
    for name, kind in PROXIES:
        proxy = names.get(name)
        if isinstance(proxy, werkzeug.local.LocalProxy):
            found.append((name, kind, proxy, object.__getattribute__(proxy, "_get_current_object")))
    app_vars = {
        id(_closure(original).get("local"))
        for _, kind, _, original in found
        if kind == telemetry.KIND_APP
    }
    for name, kind, proxy, original in found:
        yield (
            proxy,
            "_get_current_object",
            _replacement(name, kind, original, app_vars, messages[kind]),
        )
    proxy_class = werkzeug.local.LocalProxy
    if _is_werkzeugs_getattr(vars(proxy_class).get("__getattr__"), lookup):
        yield proxy_class, "__getattr__", _proxy_getattr
    else:
        telemetry.log_event(
            ("proxy shape", "__getattr__"),
            "ctxguard: werkzeug.local.LocalProxy.__getattr__ is not Werkzeug 2.3-3.1's;"
            " introspection through a proxy (pytest's collection, inspect) may be"
            " reported as a context error",
        )


def _is_werkzeugs_getattr(current: Any, lookup: Any) -> bool:
    """Is ``LocalProxy.__getattr__`` Werkzeug's ``_ProxyLookup(getattr)``, whose work
    ``_proxy_getattr`` does?"""
    if lookup is None or not isinstance(current, lookup):
        return False
    bind = getattr(current, "bind_f", None)
    return (
        getattr(current, "fallback", 0) is None
        and getattr(current, "class_value", 0) is None
        and _closure(bind).get("f") is getattr
    )


# --------------------------------------------------------------------------
# The report (cold path: the user's code is about to get a RuntimeError).


def _outside(proxy: str, kind: str, error: RuntimeError) -> None:
    """Report a proxy used outside its context, unless it is not the user's use.

    Not reported: a lookup Werkzeug answers with a fallback, introspection,
    and a proxy touched by something ctxguard itself called while emitting
    (a span processor, an exporter, a logging filter).
    """
    try:
        caller = _getframe(2)  # whoever asked the proxy for its object
        if _not_a_use(caller):
            return
        state = telemetry.stack_state(caller)
        if state == telemetry.INSIDE_CTXGUARD:
            return
        report(proxy, kind, error, caller, later=state == telemetry.INSIDE_SDK)
    except Exception as exc:
        telemetry.fault("proxy error", exc)


def _not_a_use(frame: FrameType) -> bool:
    """Is this lookup one that is not the user's code using the proxy?

    Werkzeug asking for a lookup that answers with a fallback instead of
    raising, or a tool introspecting the proxy by a dunder name.
    """
    code = frame.f_code
    if code is _getattr_code:
        return _introspection(frame.f_locals.get("name"), frame.f_back)
    if code is not _lookup_code:
        return False
    lookup = frame.f_locals.get("self")
    if getattr(lookup, "fallback", None) is not None:
        return True
    called = frame.f_back is not None and frame.f_back.f_code is _lookup_call_code
    return not called and getattr(lookup, "name", None) in _INTROSPECTION_HOOKS


def report(
    proxy: str, kind: str, error: BaseException, caller: FrameType, *, later: bool = False
) -> None:
    """Count the error, and emit its span (rate limited per site) and log line.

    The counter is exact, so it is added first and cheaply; where the line is
    and which hint fits are worked out only if a span or a log line goes out.
    ``later``: the OpenTelemetry SDK is running on this thread, so emit at the
    next safe point.
    """
    w = ledger.worker()
    worker_kind = threads.kind_of(w)
    origin = threads.origin_of(w)
    counted: dict[str, Any] = {
        telemetry.PROXY: proxy,
        telemetry.CONTEXT_KIND: kind,
        telemetry.WORKER_KIND: worker_kind,
    }
    if origin is not None and origin.route is not None:
        counted[telemetry.HTTP_ROUTE] = origin.route
    telemetry.count(telemetry.ERRORS, counted, later=later)

    site = frames.site_from(caller, 64)
    key = site if site is not None else (proxy, worker_kind)
    found: list[tuple[frames.Location | None, str]] = []

    def details() -> tuple[frames.Location | None, str]:
        if not found:
            location = frames.describe(site)
            importing = location is not None and location.function == "<module>"
            importing = importing and _importing(caller, site)
            found.append((location, hint(proxy, kind, worker_kind, origin is not None, importing)))
        return found[0]

    def attributes() -> dict[str, Any]:
        location, text = details()
        attrs = {
            **counted,
            telemetry.THREAD_ID: w.ident,
            telemetry.THREAD_NAME: w.name,
            telemetry.HINT: text,
            **telemetry.code_attributes(location),
        }
        if origin is not None:
            attrs[telemetry.HTTP_METHOD] = origin.http_method
            attrs[telemetry.ORIGIN_ENDPOINT] = origin.endpoint
        extra = threads.attributes_of(w)
        if extra:
            attrs.update(extra)
        return attrs

    def message() -> tuple[str, tuple[Any, ...]]:
        location, text = details()
        started = ""
        if origin is not None:
            how = "serving" if worker_kind == telemetry.WORKER_REQUEST else "started by"
            started = f", {how} {origin.http_method} {origin.route or '<unmatched>'}"
        needed = "a request" if kind == telemetry.KIND_REQUEST else "an application"
        where = frames.where(location, "an unknown place")
        return (
            "ctxguard: %s used outside %s context at %s (%s worker%s). %s",
            (proxy, needed, where, worker_kind, started, text),
        )

    telemetry.span(
        telemetry.SPAN_CONTEXT_ERROR,
        attributes,
        throttle_key=key,
        exception=error,
        stacktrace=lambda: frames.stack_text(caller),
        link=getattr(origin, "span_context", None),
        later=later,
    )
    telemetry.log_event(("error", key), message, later=later)
    if events.listening():
        events.emit(telemetry.SPAN_CONTEXT_ERROR, attributes, message)


def _importing(frame: FrameType | None, site: frames.Site | None) -> bool:
    """Is the user's frame a module body run by an import?

    importlib marks a module's spec while it runs the body for an import; a
    script run as ``__main__``, ``python -c`` and a shell's input are not.
    """
    code = site[0] if site is not None else None
    while frame is not None:
        if frame.f_code is code:
            spec = frame.f_globals.get("__spec__")
            return bool(getattr(spec, "_initializing", False))
        frame = frame.f_back
    return False


def hint(
    proxy: str,
    kind: str,
    worker_kind: str,
    spawned: bool,
    importing: bool,
) -> str:
    """One sentence: the fix that fits this case."""
    if importing:
        return (
            f"`{proxy}` is used at import time: move this code into a function that runs"
            " during a request or inside `with app.app_context():`."
        )
    if kind == telemetry.KIND_REQUEST and flaskmodel.request_hidden():
        return (
            "An app context pushed during the request hides the request's own (Flask 3.2):"
            " the request's context is an app context already, so drop the"
            f" `with app.app_context():`, or read `{proxy}` before pushing it."
        )
    if worker_kind == telemetry.WORKER_REQUEST:
        return (
            "This runs after the request's context was popped, while its response is"
            " streamed or closed: wrap the generator with `flask.stream_with_context`, or"
            " the callback with `flask.copy_current_request_context`."
        )
    if worker_kind == telemetry.WORKER_CELERY:
        if kind == telemetry.KIND_REQUEST:
            return (
                f"A Celery task runs after the request that enqueued it, in another worker:"
                f" pass the values it needs from `{proxy}` in as task arguments when you"
                " enqueue it."
            )
        return (
            "Run tasks inside the app's context: give Celery a `Task` class whose"
            " `__call__` runs the task in `with app.app_context():`, as in Flask's"
            " Celery guide."
        )
    if kind == telemetry.KIND_REQUEST:
        if spawned:
            return (
                f"This {worker_kind} outlives the request that started it: pass the values it"
                f" needs from `{proxy}` in as arguments, or wrap the function with"
                " `flask.copy_current_request_context`."
            )
        if ledger.current(telemetry.KIND_APP) is not None:
            return (
                f"There is an application context here but no request: pass the values from"
                f" `{proxy}` in as arguments, or use `app.test_request_context()` in tests."
            )
        return (
            f"No request is being handled here: pass the values from `{proxy}` in as"
            " arguments from the view that has them, or use `app.test_request_context()`"
            " in tests."
        )
    if spawned and proxy == telemetry.PROXY_G:
        # A fresh app context (propagate="app", or `with app.app_context():`) has an
        # empty `g`: the values the request set are not there either.
        return (
            f"`g` belongs to the request's app context and is empty in any other: pass"
            f" the values this {worker_kind} needs from `g` in as arguments."
        )
    if spawned:
        return (
            "Pass the app in (`current_app._get_current_object()`) and run this work inside"
            " `with app.app_context():`, or start the ctxguard extension with"
            ' `propagate="app"`.'
        )
    return (
        "No application context is pushed here: run this code inside"
        " `with app.app_context():` (for workers, scripts and CLI tasks)."
    )
