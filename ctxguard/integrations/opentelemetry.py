"""ctxguard with no code change: ``opentelemetry-instrument gunicorn app:app``.

With ``flask-ctxguard[instrument]`` installed, ``opentelemetry-instrument``
finds :class:`CtxGuardInstrumentor` under the ``opentelemetry_instrumentor``
entry point ``ctxguard`` and calls ``instrument()`` before the application is
imported. From then on every Flask app the process makes is guarded as
``CtxGuard(app)`` would guard it, with the options of the ``CTXGUARD_*``
environment variables, and reports go to the tracer and meter providers that
``opentelemetry-instrument`` configured (the global ones).
``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=ctxguard`` leaves it out.

Programmatic use is the same call::

    from ctxguard.integrations.opentelemetry import CtxGuardInstrumentor

    CtxGuardInstrumentor().instrument()  # before the app is made
    app = Flask(__name__)                # guarded

``instrument()`` never raises: the loader stops loading every instrumentor
after one that raises, so a problem here is logged on the ``ctxguard`` logger
and the process runs unguarded.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from opentelemetry.instrumentation.instrumentor import BaseInstrumentor

from .. import apps, process, settings, telemetry
from ..extension import CtxGuard

__all__ = ["CtxGuardInstrumentor"]

#: The Flask releases ctxguard supports; ``instrument()`` does nothing (and
#: says so) where another is installed.
_instruments = ("flask >= 2.3",)


class CtxGuardInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Guard every Flask app the process makes, from the moment ``instrument()`` runs.

    Apps made before it are left alone (guard those with ``CtxGuard(app)``);
    ``uninstrument()`` removes the process hooks, after which apps already
    guarded report nothing more.
    """

    _unsubscribe: Callable[[], None] | None = None

    def instrumentation_dependencies(self) -> Collection[str]:
        return _instruments

    def _instrument(self, **kwargs: Any) -> None:
        try:
            if settings.disabled():
                telemetry.logger.info("ctxguard: disabled by CTXGUARD_DISABLED; not instrumenting")
                return
            installed = process.install(
                tracer_provider=kwargs.get("tracer_provider"),
                meter_provider=kwargs.get("meter_provider"),
            )
            if not installed:
                return  # install() said why
            if self._unsubscribe is None:
                self._unsubscribe = apps.subscribe(_guard)
        except Exception as exc:
            telemetry.fault("instrument", exc)

    def _uninstrument(self, **kwargs: Any) -> None:
        try:
            unsubscribe, self._unsubscribe = self._unsubscribe, None
            if unsubscribe is not None:
                unsubscribe()
            process.uninstall()
        except Exception as exc:
            telemetry.fault("uninstrument", exc)


def _guard(app: Any) -> None:
    """Guard a newly made app, as ``CtxGuard(app)`` with no arguments would."""
    CtxGuard(app)
