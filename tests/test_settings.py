"""Options: environment variables over defaults, explicit arguments over both, clear errors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flask
import pytest
from flask import Flask
from helpers import call, make_app

import ctxguard

HEALED = "ctxguard.context.healed"
VIOLATIONS = "ctxguard.policy.violations"
PRESERVE_ENVIRON = {"ctxguard.policy.rule": "preserve_context_environ"}


def stale_app() -> Flask:
    """An app whose streamed body pushes an app context and never pops it, leaving it
    current on the worker for the next request (the flask#6123 shape)."""
    app = make_app()

    @app.route("/stream")
    def stream() -> Any:
        def chunks() -> Any:
            app.app_context().push()
            yield b"streamed"

        return app.response_class(chunks())

    return app


def heals(app: Flask) -> bool:
    """Run a request that leaves a stale context, then one more: was the stale one popped?"""
    assert call(app, "/stream")[2] == b"streamed"
    before = len(app.teardowns)  # type: ignore[attr-defined]
    assert call(app, "/")[2] == b"hello"
    # Healed: the stale context's teardown ran, then the request's own app context's.
    # Not healed: the request reused the stale context and no teardown ran at all.
    return len(app.teardowns) - before == 2  # type: ignore[attr-defined]


def preserves_context(app: Flask) -> bool:
    """Does a request that carries the preserve-context key get its contexts kept?

    The request comes straight from a server, as with Werkzeug's debugger in
    front of the app (the test client's own requests are always kept: they
    are tests).
    """
    kept: list[Any] = []
    assert call(app, "/", **{"werkzeug.debug.preserve_context": kept.append})[2] == b"hello"
    return bool(kept)


# -- environment


def test_environment_variable_overrides_the_derived_environment(monkeypatch, telemetry):
    """CTXGUARD_ENVIRONMENT=testing on an app that looks like production: the production
    rule that strips the preserve-context key does not apply."""
    monkeypatch.setenv("CTXGUARD_ENVIRONMENT", "testing")
    app = make_app()
    ctxguard.CtxGuard(app, **telemetry.providers)
    assert preserves_context(app)
    assert telemetry.value(VIOLATIONS) == 0


def test_explicit_environment_beats_the_variable(monkeypatch, telemetry):
    """environment="production" in code wins over CTXGUARD_ENVIRONMENT=testing."""
    monkeypatch.setenv("CTXGUARD_ENVIRONMENT", "testing")
    app = make_app()
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    assert not preserves_context(app)
    assert telemetry.value(VIOLATIONS, PRESERVE_ENVIRON) == 1


def test_production_is_the_default_for_a_plain_app(telemetry):
    """Neither debug nor testing: production, so the preserve-context key is stripped."""
    app = make_app()
    ctxguard.CtxGuard(app, **telemetry.providers)
    assert not preserves_context(app)
    assert telemetry.value(VIOLATIONS, PRESERVE_ENVIRON) == 1


def test_testing_app_is_left_alone(telemetry):
    """app.testing: the test client's ``with client:`` keeps working."""
    app = make_app(TESTING=True)
    ctxguard.CtxGuard(app, **telemetry.providers)
    assert preserves_context(app)
    assert telemetry.value(VIOLATIONS) == 0


def test_debug_app_is_development(telemetry):
    """app.debug: development, never altered; even the strict policy does not refuse it."""
    app = make_app(DEBUG=True)
    ctxguard.CtxGuard(app, policy="strict", **telemetry.providers)
    assert preserves_context(app)
    assert telemetry.value(VIOLATIONS) == 0


def test_app_switched_to_testing_after_init_is_testing(telemetry):
    """Test suites often build the app with CtxGuard in a factory, then set app.testing in a
    fixture: requests must then be treated as testing."""
    app = make_app()
    ctxguard.CtxGuard(app, **telemetry.providers)
    app.testing = True
    with app.test_client() as client:
        client.get("/")
        assert flask.request.path == "/"
    assert telemetry.value(VIOLATIONS) == 0


# -- policy


def test_policy_variable_strict_refuses_a_debug_app_in_production(monkeypatch, telemetry):
    """CTXGUARD_POLICY=strict: a debug-mode app forced to production does not start."""
    monkeypatch.setenv("CTXGUARD_POLICY", "strict")
    app = make_app(DEBUG=True)
    original = app.wsgi_app
    with pytest.raises(ctxguard.PolicyError, match="debug_mode"):
        ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    assert app.wsgi_app == original


def test_policy_variable_is_the_default_only(monkeypatch, telemetry):
    """An explicit policy="warn" wins over CTXGUARD_POLICY=strict: reported, not refused."""
    monkeypatch.setenv("CTXGUARD_POLICY", "strict")
    app = make_app(DEBUG=True)
    ctxguard.CtxGuard(app, environment="production", policy="warn", **telemetry.providers)
    assert (
        telemetry.value(
            VIOLATIONS, {"ctxguard.policy.rule": "debug_mode", "ctxguard.policy.action": "reported"}
        )
        == 1
    )


def test_policy_variable_off_reports_nothing(monkeypatch, telemetry):
    """CTXGUARD_POLICY=off: a production request carrying the preserve key is left as is."""
    monkeypatch.setenv("CTXGUARD_POLICY", "off")
    app = make_app(DEBUG=True)
    ctxguard.CtxGuard(app, environment="production", **telemetry.providers)
    assert preserves_context(app)
    assert telemetry.value(VIOLATIONS) == 0


# -- heal


def test_production_heals_by_default(telemetry):
    """Healing is on in production unless told otherwise."""
    app = stale_app()
    ctxguard.CtxGuard(app, **telemetry.providers)
    assert heals(app)
    assert telemetry.value(HEALED) == 1


def test_heal_variable_switches_healing_off(monkeypatch, telemetry):
    """CTXGUARD_HEAL=0 in production: the stale context is reported but left in place."""
    monkeypatch.setenv("CTXGUARD_HEAL", "0")
    app = stale_app()
    ctxguard.CtxGuard(app, **telemetry.providers)
    assert not heals(app)
    assert telemetry.value(HEALED) == 0


def test_empty_heal_variable_counts_as_not_set(monkeypatch, telemetry):
    """CTXGUARD_HEAL= (empty, as deployment templates often leave it) keeps the default."""
    monkeypatch.setenv("CTXGUARD_HEAL", "")
    app = stale_app()
    ctxguard.CtxGuard(app, **telemetry.providers)
    assert heals(app)
    assert telemetry.value(HEALED) == 1


def test_explicit_heal_beats_the_variable(monkeypatch, telemetry):
    """heal=True in code wins over CTXGUARD_HEAL=0."""
    monkeypatch.setenv("CTXGUARD_HEAL", "0")
    app = stale_app()
    ctxguard.CtxGuard(app, heal=True, **telemetry.providers)
    assert heals(app)
    assert telemetry.value(HEALED) == 1


def test_heal_variable_switches_healing_on_outside_production(monkeypatch, telemetry):
    """CTXGUARD_HEAL=1 heals in testing too, where the default is off."""
    monkeypatch.setenv("CTXGUARD_HEAL", "1")
    app = stale_app()
    app.testing = True
    ctxguard.CtxGuard(app, **telemetry.providers)
    assert heals(app)
    assert telemetry.value(HEALED) == 1


def test_testing_does_not_heal_by_default(telemetry):
    """Without CTXGUARD_HEAL a testing app is observed, not changed."""
    app = stale_app()
    app.testing = True
    ctxguard.CtxGuard(app, **telemetry.providers)
    assert not heals(app)
    assert telemetry.value(HEALED) == 0


# -- bad values

ALLOWED = {
    "CTXGUARD_ENVIRONMENT": ("production", "development", "testing"),
    "CTXGUARD_POLICY": ("enforce", "warn", "strict", "off"),
    "CTXGUARD_HEAL": ("true", "false"),
    "CTXGUARD_DISABLED": ("true", "false"),
}


def guard_extension(**kwargs: Any) -> Any:
    return ctxguard.CtxGuard(make_app(), **kwargs)


def guard_middleware(**kwargs: Any) -> Any:
    app = make_app()
    return ctxguard.CtxGuardMiddleware(app.wsgi_app, app=app, **kwargs)


ENTRY_POINTS: list[Callable[..., Any]] = [guard_extension, guard_middleware]


def test_config_error_is_a_value_error():
    """Code that already catches ValueError around its set-up keeps working."""
    assert issubclass(ctxguard.ConfigError, ValueError)


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=["CtxGuard", "CtxGuardMiddleware"])
@pytest.mark.parametrize("variable", sorted(ALLOWED))
def test_bad_variable_is_logged_once_and_the_default_used(
    monkeypatch, telemetry, caplog_ctxguard, entry, variable
):
    """A typo in a deployment's environment must not take the deployment down (gunicorn
    exits when a worker fails to boot): as with OpenTelemetry's ``OTEL_*`` variables, it is
    logged once, naming the variable, its value and the values allowed, and the default is
    used; ctxguard still starts."""
    monkeypatch.setenv(variable, "bogus-value")
    original = vars(flask.ctx.AppContext)["push"]
    entry(**telemetry.providers)
    entry(**telemetry.providers)
    lines = [r.getMessage() for r in caplog_ctxguard.records if "bogus-value" in r.getMessage()]
    assert len(lines) == 1, lines
    assert variable in lines[0] and "default" in lines[0]
    for value in ALLOWED[variable]:
        assert value in lines[0]
    # The default is in effect: ctxguard runs.
    assert vars(flask.ctx.AppContext)["push"] is not original


def test_only_a_true_value_disables(monkeypatch, telemetry, caplog_ctxguard):
    """The kill switch, like ``OTEL_SDK_DISABLED``, switches ctxguard off only on a true
    value: ``maybe`` is logged and ctxguard runs; `` TRUE `` switches it off."""
    monkeypatch.setenv("CTXGUARD_DISABLED", "maybe")
    assert ctxguard.install(**telemetry.providers) is True
    assert any("CTXGUARD_DISABLED" in r.getMessage() for r in caplog_ctxguard.records)
    ctxguard.uninstall()
    monkeypatch.setenv("CTXGUARD_DISABLED", " TRUE ")
    assert ctxguard.install(**telemetry.providers) is False


@pytest.mark.parametrize("variable", sorted(ALLOWED))
def test_blank_variable_counts_as_unset(monkeypatch, telemetry, caplog_ctxguard, variable):
    """A variable made only of spaces is unset, for every variable alike: no warning, and
    the default in effect (healing on in production included)."""
    monkeypatch.setenv(variable, "   ")
    app = stale_app()
    ctxguard.CtxGuard(app, **telemetry.providers)
    assert heals(app)
    assert not [r for r in caplog_ctxguard.records if variable in r.getMessage()]


def test_unknown_variable_is_named(monkeypatch, telemetry, caplog_ctxguard):
    """``CTXGUARD_ENABLED=0`` is not a setting: it is named in a warning rather than silently
    ignored, so whoever set it learns it does nothing."""
    monkeypatch.setenv("CTXGUARD_ENABLED", "0")
    ctxguard.CtxGuard(make_app(), **telemetry.providers)
    lines = [
        r.getMessage() for r in caplog_ctxguard.records if "CTXGUARD_ENABLED" in r.getMessage()
    ]
    assert len(lines) == 1 and "CTXGUARD_DISABLED" in lines[0]


def test_start_up_line_says_each_setting_and_where_it_came_from(monkeypatch, telemetry, caplog):
    """One line at start-up lists the settings in effect and where each came from (argument,
    variable or default), so a deployment can be checked from its logs."""
    caplog.set_level("INFO", logger="ctxguard")
    monkeypatch.setenv("CTXGUARD_POLICY", "warn")
    ctxguard.CtxGuard(make_app(), heal=False, **telemetry.providers)
    (line,) = [r.getMessage() for r in caplog.records if "guarding" in r.getMessage()]
    assert "policy=warn (CTXGUARD_POLICY)" in line
    assert "heal=off (argument)" in line
    assert "propagate=off (default)" in line


BAD_ARGUMENTS = {
    "environment": ("prod", ("production", "development", "testing")),
    "policy": ("strictest", ("enforce", "warn", "strict", "off")),
    "heal": ("yes", ("True", "False")),
}


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=["CtxGuard", "CtxGuardMiddleware"])
@pytest.mark.parametrize("argument", sorted(BAD_ARGUMENTS))
def test_bad_argument_names_itself_and_the_allowed_values(telemetry, entry, argument):
    """A wrong argument fails where it was written, naming the argument and its values."""
    value, allowed = BAD_ARGUMENTS[argument]
    with pytest.raises(ctxguard.ConfigError) as excinfo:
        entry(**{argument: value}, **telemetry.providers)
    message = str(excinfo.value)
    assert argument in message
    assert repr(value) in message
    for choice in allowed:
        assert choice in message


def test_bad_argument_fails_before_the_app_is_touched(telemetry):
    """CtxGuard(environment=...) with a typo leaves the app exactly as it was."""
    app = make_app()
    with pytest.raises(ctxguard.ConfigError):
        ctxguard.CtxGuard(app, policy="enforced", **telemetry.providers)
    assert "wsgi_app" not in vars(app)
    assert "ctxguard" not in app.extensions


# --------------------------------------------------------------------------
# The warnings for bad variables, word for word.


def warnings_about(caplog: pytest.LogCaptureFixture, variable: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith(f"ctxguard: {variable}=")
    ]


def test_bad_heal_variable_says_healing_follows_the_environment(
    monkeypatch, telemetry, caplog_ctxguard
):
    """A bad ``CTXGUARD_HEAL`` is logged with the values allowed and what happens instead:
    healing follows the environment (on in production)."""
    monkeypatch.setenv("CTXGUARD_HEAL", "maybe")
    app = stale_app()
    ctxguard.CtxGuard(app, **telemetry.providers)
    assert heals(app)
    assert warnings_about(caplog_ctxguard, "CTXGUARD_HEAL") == [
        "ctxguard: CTXGUARD_HEAL='maybe' is not valid (expected one of 1, true, yes, on, 0,"
        " false, no, off); using the default (follow the environment)"
    ]


def test_unknown_variable_line_lists_the_known_variables(monkeypatch, telemetry, caplog_ctxguard):
    """The warning for a ``CTXGUARD_*`` variable that is not a setting names it, its value
    and every variable that is one."""
    monkeypatch.setenv("CTXGUARD_ENABLED", "0")
    ctxguard.CtxGuard(make_app(), **telemetry.providers)
    assert warnings_about(caplog_ctxguard, "CTXGUARD_ENABLED") == [
        "ctxguard: CTXGUARD_ENABLED='0' is not valid (expected a known variable:"
        " CTXGUARD_ENVIRONMENT, CTXGUARD_POLICY, CTXGUARD_HEAL, CTXGUARD_DISABLED,"
        " CTXGUARD_PROPAGATE, CTXGUARD_IN_APP_INCLUDE, CTXGUARD_IN_APP_EXCLUDE); using the"
        " default (none)"
    ]


def test_in_app_variable_skips_empty_and_bad_parts_and_keeps_the_rest(
    monkeypatch, telemetry, caplog
):
    """``CTXGUARD_IN_APP_INCLUDE`` with an empty part and a part that is not a module name:
    the empty part is ignored, the bad one is named in a warning and skipped, and every
    module name around them is used."""
    caplog.set_level("INFO", logger="ctxguard")
    monkeypatch.setenv("CTXGUARD_IN_APP_INCLUDE", "shop,, shop-tasks ,billing.jobs")
    ctxguard.CtxGuard(make_app(), **telemetry.providers)
    assert warnings_about(caplog, "CTXGUARD_IN_APP_INCLUDE") == [
        "ctxguard: CTXGUARD_IN_APP_INCLUDE='shop-tasks' is not valid (expected comma-separated"
        " module names); using the default (skipped)"
    ]
    (line,) = [r.getMessage() for r in caplog.records if "guarding" in r.getMessage()]
    assert "in_app_include=shop,billing.jobs (CTXGUARD_IN_APP_INCLUDE)" in line


# --------------------------------------------------------------------------
# Testing: what the test set-up pushed is not an ambient context.


def test_a_testing_app_reports_no_ambient_context(telemetry):
    """With ``app.testing``, an app context the test set-up pushed outside any request and
    left current is not reported as ambient, even for a request that does not come through
    the test client (a live server in the test run)."""
    app = make_app(TESTING=True)
    ctxguard.CtxGuard(app, **telemetry.providers)
    ctx = app.app_context()
    ctx.push()
    try:
        assert call(app, "/")[2] == b"hello"
    finally:
        ctx.pop()
    assert telemetry.value("ctxguard.context.leaks") == 0
    assert telemetry.spans() == []


def test_switched_off_middleware_logs_nothing(monkeypatch, telemetry, caplog):
    """``CTXGUARD_DISABLED=1``: a ``CtxGuardMiddleware`` built then says nothing, not even
    its start-up line, and passes requests through."""
    caplog.set_level("INFO", logger="ctxguard")
    monkeypatch.setenv("CTXGUARD_DISABLED", "1")
    app = make_app()
    middleware = ctxguard.CtxGuardMiddleware(app.wsgi_app, app=app, **telemetry.providers)
    assert call(middleware, "/")[2] == b"hello"
    assert [r.getMessage() for r in caplog.records if r.name == "ctxguard"] == []
