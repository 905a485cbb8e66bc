"""The process hooks: installed once per process, removed exactly.

``install()`` replaces a few attributes (Flask's context push/pop, the
proxies' lookups, ``Thread.start`` and ``ThreadPoolExecutor.submit``) and
remembers the very objects it replaced; ``uninstall()`` puts those objects
back.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterable
from typing import Any

from . import apps, frames, ledger, proxies, settings, telemetry, threads

_lock = threading.RLock()
# (owner, attribute, original, replacement, owner had the attribute itself)
_patches: list[tuple[Any, str, Any, Any, bool]] = []


def _after_fork_in_child() -> None:
    """A forked worker (gunicorn's, after ``--preload``) starts with a copy of the
    master's state: a lock another thread of the master held would never be
    released here. (The telemetry module resets its own state the same way.)"""
    global _lock
    _lock = threading.RLock()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)


def installed() -> bool:
    return bool(_patches)


def install(
    *,
    tracer_provider: Any = None,
    meter_provider: Any = None,
    in_app_include: Iterable[str] | None = None,
    in_app_exclude: Iterable[str] | None = None,
) -> bool:
    """Install the process hooks (idempotent); returns whether they are installed.

    For workers, scripts and CLIs that run no Flask request but still push
    contexts. Providers given here are used from now on; by default the
    global ones are used. ``in_app_include`` and ``in_app_exclude`` are module
    prefixes whose frames are (or are not) the application's own code, for
    the line reported as where a context was pushed or a proxy was touched;
    by default ``CTXGUARD_IN_APP_INCLUDE`` and ``CTXGUARD_IN_APP_EXCLUDE``
    (comma-separated). A bad argument raises ``ConfigError``; a bad variable is
    logged and ignored. A Flask whose internals cannot be hooked is logged and
    left alone (False).
    """
    include, exclude, sources = settings.modules(in_app_include, in_app_exclude)
    if settings.disabled():
        return False
    with _lock:
        telemetry.configure(tracer_provider, meter_provider, ledger.observations)
        frames.configure(include, exclude)
        if _patches:
            # Celery may have been imported since the hooks went in (under
            # ``opentelemetry-instrument`` they go in before anything is imported).
            _integrations(enable=True)
            return True
        ledger.reset()
        frames.refresh()
        try:
            for hooks in (ledger.hooks, proxies.hooks, threads.hooks, apps.hooks):
                for owner, name, replacement in hooks():
                    own = _has_own(owner, name)
                    original = _own(owner, name) if own else getattr(owner, name)
                    _set(owner, name, replacement)
                    _patches.append((owner, name, original, replacement, own))
            ledger.record_current_context(ledger.worker())
        except Exception as exc:
            _restore()
            threads.reset()
            telemetry.fault("install", exc)
            return False
        settings.warn_unknown_variables()
        _integrations(enable=True)
        telemetry.logger.info(
            "ctxguard: process hooks installed (pid %d); in_app_include=%s (%s),"
            " in_app_exclude=%s (%s)",
            os.getpid(),
            ",".join(include) or "none",
            sources["in_app_include"],
            ",".join(exclude) or "none",
            sources["in_app_exclude"],
        )
        return True


def _integrations(*, enable: bool) -> None:
    """Switch on (or off) the integrations of libraries already imported.

    A Celery worker imports Celery before the application's module, where
    ``install()`` (or ``CtxGuard(app)``) runs: its tasks become units of work
    with no other line of code.
    """
    if "celery" not in sys.modules:
        return
    try:
        from .integrations import celery

        if enable:
            celery.enable()
        else:
            celery.disable()
    except Exception as exc:
        telemetry.fault("celery integration", exc)


def add_app(app: Any) -> None:
    """The app's own package is the user's code, even when installed."""
    if app is not None:
        frames.add_app(getattr(app, "import_name", None), getattr(app, "root_path", None))


def rebind() -> None:
    """Follow ``threading`` as it is now: gevent patched it after the hooks went in.

    gunicorn's gevent worker patches after the fork, so hooks installed in the
    master (``--preload``) would otherwise see each worker's greenlets as one
    thread.
    """
    with _lock:
        if _patches:
            ledger.rebind()
            threads.rebind()


# Classes are patched in their ``__dict__``; Werkzeug's proxies are instances
# whose attribute access is forwarded to the proxied object, so they are read
# and written through ``object``'s own methods. Which of the two an owner is
# is told from its type alone: ``isinstance`` would ask a proxy for its
# ``__class__``, which looks its context up.


def _is_class(owner: Any) -> bool:
    return issubclass(type(owner), type)


def _has_own(owner: Any, name: str) -> bool:
    return name in vars(owner) if _is_class(owner) else True


def _own(owner: Any, name: str) -> Any:
    if _is_class(owner):
        return vars(owner).get(name)
    return object.__getattribute__(owner, name)


def _set(owner: Any, name: str, value: Any) -> None:
    if _is_class(owner):
        setattr(owner, name, value)
    else:
        object.__setattr__(owner, name, value)


def _restore() -> None:
    while _patches:
        owner, name, original, replacement, own = _patches.pop()
        if _own(owner, name) is not replacement:
            telemetry.log_event(
                ("uninstall", name),
                "ctxguard: %s.%s was replaced again after ctxguard patched it;"
                " leaving the newer one in place",
                # A class by its name; anything else (a Flask proxy, whose own
                # attributes would look its context up) by its type's.
                (owner if _is_class(owner) else type(owner)).__qualname__,
                name,
            )
            continue
        if own:
            _set(owner, name, original)
        else:
            delattr(owner, name)


def uninstall() -> None:
    """Remove every hook, putting back the exact objects that were there before.

    The ledger and the telemetry settings are forgotten too: a later
    ``install()`` starts from a clean slate.
    """
    with _lock:
        _integrations(enable=False)
        _restore()
        threads.reset()
        telemetry.drain_if_safe(sys._getframe(1))
        ledger.reset()
        frames.reset()
        telemetry.reset()
        settings.forget_complaints()
