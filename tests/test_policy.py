"""Production policy: nothing keeps a context alive past its request; risky setups are reported."""

from __future__ import annotations

from typing import Any

import pytest
from flask import request
from helpers import MERGED, call, context_kind, make_app
from werkzeug.debug import DebuggedApplication
from werkzeug.middleware.proxy_fix import ProxyFix

import ctxguard

VIOLATIONS = "ctxguard.policy.violations"
PRESERVE = "werkzeug.debug.preserve_context"


def violation(rule: str, action: str) -> dict[str, str]:
    return {"ctxguard.policy.rule": rule, "ctxguard.policy.action": action}


def app_seeing_preserve_key() -> Any:
    app = make_app()
    app.seen = []  # type: ignore[attr-defined]

    @app.route("/look")
    def look() -> str:
        app.seen.append(PRESERVE in request.environ)  # type: ignore[attr-defined]
        return "looked"

    return app


def test_enforce_strips_the_preserve_key_from_every_request(telemetry):
    """In production the app never sees werkzeug.debug.preserve_context, so no context is
    kept after the request; each stripped request is counted."""
    app = app_seeing_preserve_key()
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    preserved: list[Any] = []
    for _ in range(3):
        status, _, data = call(app, "/look", **{PRESERVE: preserved.append})
        assert (status, data) == ("200 OK", b"looked")
    assert app.seen == [False, False, False]
    assert preserved == []
    assert telemetry.value(VIOLATIONS, violation("preserve_context_environ", "enforced")) == 3
    (span,) = telemetry.spans("ctxguard.policy_violation")  # rate limited per rule
    assert span.attributes["ctxguard.policy.rule"] == "preserve_context_environ"
    assert span.attributes["ctxguard.policy.action"] == "enforced"


def test_warn_reports_without_changing_anything(telemetry):
    """``warn``: the request keeps its key (contexts are preserved) and it is reported."""
    app = app_seeing_preserve_key()
    app.config["PRESERVE_CONTEXT_ON_EXCEPTION"] = True
    ctxguard.CtxGuard(app, environment="production", policy="warn", **telemetry.providers)
    assert app.config["PRESERVE_CONTEXT_ON_EXCEPTION"] is True
    preserved: list[Any] = []
    call(app, "/look", **{PRESERVE: preserved.append})
    assert app.seen == [True]
    # Flask handed over the request's contexts: its app and request contexts up to 3.1,
    # its one context (holding the request) on 3.2.
    kinds = ["request"] if MERGED else ["app", "request"]
    assert [context_kind(ctx) for ctx in preserved] == kinds
    assert telemetry.value(VIOLATIONS, violation("preserve_context_environ", "reported")) == 1
    assert telemetry.value(VIOLATIONS, violation("preserve_context_on_exception", "reported")) == 1


def test_off_does_nothing(telemetry):
    """``off``: no change and no report."""
    app = app_seeing_preserve_key()
    app.config["PRESERVE_CONTEXT_ON_EXCEPTION"] = True
    ctxguard.CtxGuard(app, environment="production", policy="off", **telemetry.providers)
    call(app, "/look", **{PRESERVE: [].append})
    assert app.seen == [True]
    assert app.config["PRESERVE_CONTEXT_ON_EXCEPTION"] is True
    assert telemetry.value(VIOLATIONS) == 0
    assert telemetry.spans("ctxguard.policy_violation") == []


def test_enforce_sets_the_legacy_config_key_to_false(telemetry, caplog_ctxguard):
    """A config asking for PRESERVE_CONTEXT_ON_EXCEPTION=True is switched off and reported
    with a counter, a span and one log line."""
    app = make_app(PRESERVE_CONTEXT_ON_EXCEPTION=True)
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    assert app.config["PRESERVE_CONTEXT_ON_EXCEPTION"] is False
    assert telemetry.value(VIOLATIONS, violation("preserve_context_on_exception", "enforced")) == 1
    (span,) = telemetry.spans("ctxguard.policy_violation")
    assert span.attributes["ctxguard.policy.rule"] == "preserve_context_on_exception"
    lines = [r for r in caplog_ctxguard.records if "preserve_context_on_exception" in r.message]
    assert len(lines) == 1


def test_strict_refuses_to_start_and_lists_every_violation(telemetry):
    """``strict`` raises PolicyError from init_app naming each problem; app unchanged."""
    app = make_app(PRESERVE_CONTEXT_ON_EXCEPTION=True, DEBUG=True)
    original = DebuggedApplication(app.wsgi_app, evalex=True)
    app.wsgi_app = original
    with pytest.raises(ctxguard.PolicyError) as raised:
        ctxguard.CtxGuard(app, environment="production", policy="strict", **telemetry.providers)
    rules = {v.rule for v in raised.value.violations}
    assert rules == {"preserve_context_on_exception", "debug_mode", "debugger_middleware"}
    for rule in rules:
        assert rule in str(raised.value)
    assert app.wsgi_app is original
    assert telemetry.value(VIOLATIONS, violation("debug_mode", "refused")) == 1


def test_strict_passes_a_clean_app(telemetry):
    """``strict`` with nothing wrong starts normally and strips the key like enforce."""
    app = app_seeing_preserve_key()
    ctxguard.CtxGuard(app, environment="production", policy="strict", **telemetry.providers)
    call(app, "/look", **{PRESERVE: [].append})
    assert app.seen == [False]
    assert telemetry.value(VIOLATIONS, violation("preserve_context_environ", "enforced")) == 1


@pytest.mark.parametrize("evalex", [True, False])
def test_debugger_anywhere_in_the_chain_is_reported(telemetry, evalex):
    """Werkzeug's DebuggedApplication below other middleware is found, with or without evalex."""
    app = make_app()
    app.wsgi_app = ProxyFix(DebuggedApplication(app.wsgi_app, evalex=evalex))
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    assert telemetry.value(VIOLATIONS, violation("debugger_middleware", "reported")) == 1


def test_debugger_added_after_init_is_found_at_the_first_request(telemetry):
    """Wrapping often happens after extensions are set up: the first request looks again."""
    app = make_app()
    guard = ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    app.wsgi_app.wsgi_app = DebuggedApplication(app.wsgi_app.wsgi_app)
    assert guard.middleware(app) is app.wsgi_app
    call(app, "/")
    call(app, "/")
    assert telemetry.value(VIOLATIONS, violation("debugger_middleware", "reported")) == 1


def test_debug_mode_forced_to_production_is_reported(telemetry):
    """Debug mode in an app declared production is reported, not silently changed."""
    app = make_app(DEBUG=True)
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    assert app.debug is True
    assert telemetry.value(VIOLATIONS, violation("debug_mode", "reported")) == 1


def test_development_server_is_reported_once(telemetry):
    """Werkzeug's development server serving production traffic is reported once."""
    app = make_app()
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    for _ in range(3):
        call(app, "/", SERVER_SOFTWARE="Werkzeug/3.1.0")
    assert telemetry.value(VIOLATIONS, violation("development_server", "reported")) == 1


def test_late_config_is_enforced_at_the_first_request(telemetry):
    """Config loaded after init_app is checked when the first request arrives."""
    app = make_app()
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    app.config["PRESERVE_CONTEXT_ON_EXCEPTION"] = True
    call(app, "/")
    assert app.config["PRESERVE_CONTEXT_ON_EXCEPTION"] is False
    assert telemetry.value(VIOLATIONS, violation("preserve_context_on_exception", "enforced")) == 1


@pytest.mark.parametrize("config", [{"DEBUG": True}, {"TESTING": True}])
def test_development_and_testing_are_never_altered(telemetry, config):
    """A debug or testing app (derived environment) keeps its config and its preserve key."""
    app = app_seeing_preserve_key()
    app.config.update(config, PRESERVE_CONTEXT_ON_EXCEPTION=True)
    ctxguard.CtxGuard(app, policy="strict", **telemetry.providers)
    call(app, "/look", SERVER_SOFTWARE="Werkzeug/3.1.0", **{PRESERVE: [].append})
    assert app.seen == [True]
    assert app.config["PRESERVE_CONTEXT_ON_EXCEPTION"] is True
    assert telemetry.value(VIOLATIONS) == 0


def test_debugger_with_evalex_in_production_keeps_no_context(telemetry):
    """Werkzeug's debugger with evalex hands every request a preserve hook; in production
    ctxguard removes it before Flask can give the debugger the request's contexts."""
    app = make_app()

    @app.route("/boom")
    def boom() -> str:
        raise RuntimeError("boom")

    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    debugged = DebuggedApplication(app, evalex=True)
    status, _, _ = call(debugged, "/boom")
    assert status.startswith("500")
    assert telemetry.value(VIOLATIONS, violation("preserve_context_environ", "enforced")) == 1


# --------------------------------------------------------------------------
# Where the policy looks, and what it reports (found by mutation testing).


def test_debugger_mounted_under_a_dispatcher_is_reported(telemetry):
    """Werkzeug's debugger on an app mounted with ``DispatcherMiddleware`` (next to the
    Flask app, under a path prefix) is in the chain too: reported in production."""
    from werkzeug.middleware.dispatcher import DispatcherMiddleware

    app = make_app()
    admin = make_app()
    app.wsgi_app = DispatcherMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, {"/admin": DebuggedApplication(admin, evalex=True)}
    )
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    assert telemetry.value(VIOLATIONS, violation("debugger_middleware", "reported")) == 1


def test_off_reports_nothing_about_the_development_server(telemetry):
    """``off``: a production app served by Werkzeug's development server is not reported
    either (the policy does nothing at all)."""
    app = make_app()
    ctxguard.CtxGuard(app, environment="production", policy="off", **telemetry.providers)
    for _ in range(2):
        call(app, "/", SERVER_SOFTWARE="Werkzeug/3.1.0")
    assert telemetry.value(VIOLATIONS) == 0


def test_strict_never_fails_a_request_for_a_problem_found_late(telemetry, caplog_ctxguard):
    """``strict`` refuses to start, but a problem found at the first request (config loaded
    after ``init_app``) cannot stop a server already running: the request is served and the
    problem is enforced and reported, as under ``enforce``."""
    app = make_app()
    ctxguard.CtxGuard(app, environment="production", policy="strict", **telemetry.providers)
    app.config["PRESERVE_CONTEXT_ON_EXCEPTION"] = True
    status, _, data = call(app, "/")
    assert (status, data) == ("200 OK", b"hello")
    assert app.config["PRESERVE_CONTEXT_ON_EXCEPTION"] is False
    assert telemetry.value(VIOLATIONS, violation("preserve_context_on_exception", "enforced")) == 1
    assert telemetry.value(VIOLATIONS, violation("preserve_context_on_exception", "refused")) == 0
    assert [r for r in caplog_ctxguard.records if "internal error" in r.message] == []
