"""Flask's context model, detected once at install: the one module that knows
how Flask versions differ.

Up to Flask 3.1 a request has two contexts: a ``RequestContext`` (context
variable ``_cv_request``) that pushes an ``AppContext`` (``_cv_app``) under
it, or reuses the one already pushed. Flask 3.2 merges them: one
``AppContext`` class, one context variable, and a context holds a request or
not (``RequestContext`` and ``request_ctx`` remain as deprecated aliases,
which ctxguard never touches: reading them warns).

Everything is detected from what the installed Flask has, never from its
version number, so a Flask release is supported by what it does.
"""

from __future__ import annotations

import builtins
import contextvars
import inspect
from typing import Any

from . import telemetry

#: Flask 3.2's refusal of a pop, raised before anything changes.
_REFUSED = "Cannot pop this context ("
_NOT_ACTIVE = "), it is not the active context ("
#: Flask up to 3.1: raised after the pop reset the context variable past
#: the contexts pushed after this one.
_WRONG_MESSAGES = {
    telemetry.KIND_APP: "Popped wrong app context",
    telemetry.KIND_REQUEST: "Popped wrong request context",
}


class Model:
    """What ctxguard hooks and reads in the installed Flask.

    ``classes``: each context class, once, with the kind of context it makes
    (``None``: the kind follows what the context holds, Flask 3.2).
    ``request_push``: the code of Flask's own push of an app context on a
    request's behalf (up to 3.1, ``RequestContext.push``), or None.
    """

    __slots__ = ("classes", "merged", "request_push", "variables")

    def __init__(self) -> None:
        import flask.ctx
        import flask.globals

        ctx_names = vars(flask.ctx)
        global_names = vars(flask.globals)
        app_context = ctx_names["AppContext"]
        request_context = ctx_names.get("RequestContext")
        app_var = global_names.get("_cv_app")
        request_var = global_names.get("_cv_request")
        self.merged = request_context is None or request_context is app_context
        self.classes: tuple[tuple[type, str | None], ...]
        if self.merged:
            self.classes = ((app_context, None),)
            self.variables = {telemetry.KIND_APP: app_var, telemetry.KIND_REQUEST: app_var}
            self.request_push = None
        else:
            self.classes = (
                (app_context, telemetry.KIND_APP),
                (request_context, telemetry.KIND_REQUEST),
            )
            self.variables = {telemetry.KIND_APP: app_var, telemetry.KIND_REQUEST: request_var}
            self.request_push = getattr(inspect.unwrap(request_context.push), "__code__", None)


_model: Model | None = None
#: Up to Flask 3.1: the request context's own variable, read by ``request_context``
#: on every thread start and executor submit.
_request_var: Any = None


def detect() -> Model:
    """Look the installed Flask's model up (at install: Flask is imported by then)."""
    global _model, _request_var
    _model = Model()
    _request_var = None if _model.merged else _model.variables.get(telemetry.KIND_REQUEST)
    return _model


def merged() -> bool:
    """Does one context class hold both the app and the request (Flask 3.2)?"""
    return _model is not None and _model.merged


def kind_of(ctx: Any) -> str:
    """The kind of a context of the merged model: ``request`` if it holds one."""
    return telemetry.KIND_REQUEST if getattr(ctx, "has_request", False) else telemetry.KIND_APP


def current(kind: str) -> Any:
    """The context of this kind current on this worker, or None.

    On the merged model the app context is current in a request too, and the
    request context is the current context if it holds a request.
    """
    model = _model
    var = model.variables.get(kind) if model is not None else None
    if var is None:
        return None
    try:
        ctx = var.get(None)
        if ctx is not None and model.merged and kind == telemetry.KIND_REQUEST:  # type: ignore[union-attr]
            return ctx if kind_of(ctx) == kind else None
        return ctx
    except Exception:
        return None


def request_context() -> Any:
    """The innermost context on this worker that holds a request, or None.

    Up to 3.1 that is the current request context, even under an app context
    a view pushed. On 3.2 an app context pushed in a view hides the request
    (``request`` fails there), so the contexts under the current one are
    looked through, as Flask stacked them.
    """
    var = _request_var
    if var is not None:
        try:
            return var.get(None)
        except Exception:
            return None
    if not merged():
        return current(telemetry.KIND_REQUEST)
    ctx = current(telemetry.KIND_APP)
    for _ in range(_DEPTH):
        if ctx is None or kind_of(ctx) == telemetry.KIND_REQUEST:
            return ctx
        below = getattr(getattr(ctx, "_cv_token", None), "old_value", None)
        ctx = None if below is contextvars.Token.MISSING else below
    return None


def request_hidden() -> bool:
    """Is a request's context pushed here, under an app context that hides it (3.2)?"""
    if not merged():
        return False
    ctx = current(telemetry.KIND_APP)
    return ctx is not None and kind_of(ctx) == telemetry.KIND_APP and request_context() is not None


#: How far ``request_context`` looks down: nesting deeper than this is not a view's.
_DEPTH = 32


def is_pushed(ctx: Any) -> bool:
    """Is this context pushed already (Flask 3.2: a push then only counts one more)?"""
    return getattr(ctx, "_cv_token", None) is not None


def current_contexts() -> list[tuple[Any, str]]:
    """The contexts current on this worker with their kinds, oldest first."""
    if merged():
        ctx = current(telemetry.KIND_APP)
        return [] if ctx is None else [(ctx, kind_of(ctx))]
    found = []
    for kind in (telemetry.KIND_APP, telemetry.KIND_REQUEST):
        ctx = current(kind)
        if ctx is not None:
            found.append((ctx, kind))
    return found


_GROUP = getattr(builtins, "BaseExceptionGroup", None)
#: Flask 3.2 (on Python 3.11+) runs every teardown function and raises their errors
#: together, in groups of its own (context, app, request teardown) nested in each other.
_TEARDOWN_GROUPS = frozenset(
    f"Errors during {what} teardown" for what in ("context", "app", "request")
)


def raised_names(exc: BaseException) -> str:
    """The type names of what the user's teardown functions raised through a pop.

    Names only: a message can hold request data.
    """
    if _GROUP is not None and isinstance(exc, _GROUP) and exc.message in _TEARDOWN_GROUPS:
        return ", ".join(raised_names(error) for error in exc.exceptions)
    return type(exc).__qualname__


def is_refusal(exc: BaseException | None) -> bool:
    """Did Flask refuse the pop before changing anything (Flask 3.2)?"""
    return isinstance(exc, RuntimeError) and str(exc).startswith(_REFUSED)


def is_wrong_order(exc: BaseException | None, kind: str) -> bool:
    """Flask's complaint that this context is not the current one.

    Up to 3.1 an ``AssertionError`` of this kind, raised after the pop (a
    request context's pop also pops its app context, whose complaint passes
    through it). On 3.2 the ``RuntimeError`` refusing it, the pop not done.
    Both messages hold the contexts' ``repr`` (the request's URL): they are
    read here, never logged.
    """
    if isinstance(exc, AssertionError):
        return str(exc).startswith(_WRONG_MESSAGES[kind])
    return is_refusal(exc) and _NOT_ACTIVE in str(exc)
