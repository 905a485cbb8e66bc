"""Options: explicit arguments, then ``CTXGUARD_*`` environment variables, then defaults.

A bad value written in code is a mistake found where it was written, so it
raises ``ConfigError`` there. A bad environment variable must not take a
deployment down: as the OpenTelemetry SDK does with its ``OTEL_*`` variables,
it is logged once, naming the variable and the values allowed, and the default
is used. A value made only of spaces counts as not set, for every variable.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

D = TypeVar("D", str, None)

logger = logging.getLogger("ctxguard")

ENVIRONMENTS = ("production", "development", "testing")
POLICIES = ("enforce", "warn", "strict", "off")
PROPAGATIONS = ("off", "app")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")

ENV_ENVIRONMENT = "CTXGUARD_ENVIRONMENT"
ENV_POLICY = "CTXGUARD_POLICY"
ENV_HEAL = "CTXGUARD_HEAL"
ENV_DISABLED = "CTXGUARD_DISABLED"
ENV_PROPAGATE = "CTXGUARD_PROPAGATE"
ENV_IN_APP_INCLUDE = "CTXGUARD_IN_APP_INCLUDE"
ENV_IN_APP_EXCLUDE = "CTXGUARD_IN_APP_EXCLUDE"
VARIABLES = (
    ENV_ENVIRONMENT,
    ENV_POLICY,
    ENV_HEAL,
    ENV_DISABLED,
    ENV_PROPAGATE,
    ENV_IN_APP_INCLUDE,
    ENV_IN_APP_EXCLUDE,
)

#: Where a value came from, as the start-up line says it.
FROM_ARGUMENT = "argument"
FROM_DEFAULT = "default"


class ConfigError(ValueError):
    """An argument has a value ctxguard does not know.

    Raised where the argument was written (``CtxGuard(...)``,
    ``CtxGuardMiddleware(...)``, ``install(...)``); environment variables
    never raise.
    """


# Invalid variables already logged, so a value is complained about once per
# process, not once per guard or per call.
_complained: set[tuple[str, str]] = set()


def forget_complaints() -> None:
    """Complain again about a bad variable (for ``uninstall``: a fresh start)."""
    _complained.clear()


def _complain(variable: str, value: str, allowed: str, default: object) -> None:
    if (variable, value) in _complained:
        return
    _complained.add((variable, value))
    logger.warning(
        "ctxguard: %s=%r is not valid (expected %s); using the default (%s)",
        variable,
        value,
        allowed,
        default,
    )


def _variable(name: str) -> str | None:
    """The variable's value, stripped; None when unset or blank."""
    value = os.environ.get(name)
    if value is None or not value.strip():
        return None
    return value.strip()


def _choice(value: object, allowed: tuple[str, ...], source: str) -> str:
    if isinstance(value, str) and value.strip().lower() in allowed:
        return value.strip().lower()
    raise ConfigError(f"{source}={value!r} is not valid: expected one of {', '.join(allowed)}")


def _option(
    value: object,
    name: str,
    variable: str,
    allowed: tuple[str, ...],
    default: D,
    sources: dict[str, str],
) -> str | D:
    """The argument if given, else the variable if set and valid, else ``default``."""
    if value is not None:
        sources[name] = FROM_ARGUMENT
        return _choice(value, allowed, name)
    text = _variable(variable)
    if text is not None:
        if text.lower() in allowed:
            sources[name] = variable
            return text.lower()
        _complain(variable, text, "one of " + ", ".join(allowed), default or "follow the app")
    sources[name] = FROM_DEFAULT
    return default


def _flag_variable(variable: str, default: bool | None) -> bool | None:
    """A boolean variable: None when unset, blank or invalid (invalid is logged)."""
    text = _variable(variable)
    if text is None:
        return None
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    shown = "follow the environment" if default is None else ("on" if default else "off")
    _complain(variable, text, "one of " + ", ".join(_TRUE + _FALSE), shown)
    return None


def _modules(value: object, name: str) -> tuple[str, ...]:
    """A list of module prefixes given in code: raises on anything else."""
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ConfigError(
            f"{name}={value!r} is not valid: expected a list of module names, such as"
            " ['myapp', 'mylib.tasks']"
        )
    items = tuple(value)
    for item in items:
        if not _is_module_name(item):
            raise ConfigError(f"{name} has {item!r}, which is not a module name")
    return items


def _modules_variable(variable: str) -> tuple[str, ...]:
    """Comma-separated module prefixes; a part that is not one is logged and skipped."""
    text = _variable(variable)
    if text is None:
        return ()
    items = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if _is_module_name(part):
            items.append(part)
        else:
            _complain(variable, part, "comma-separated module names", "skipped")
    return tuple(items)


def _is_module_name(item: object) -> bool:
    return isinstance(item, str) and all(part.isidentifier() for part in item.split("."))


def disabled() -> bool:
    """``CTXGUARD_DISABLED`` switches every hook and middleware off.

    Like ``OTEL_SDK_DISABLED``, only a true value disables; anything else that
    is not a known false value is logged and ignored.
    """
    return _flag_variable(ENV_DISABLED, False) is True


def warn_unknown_variables() -> None:
    """Name any ``CTXGUARD_*`` variable that is not a setting (a typo does nothing)."""
    for name in sorted(os.environ):
        if name.startswith("CTXGUARD_") and name not in VARIABLES:
            _complain(name, os.environ[name], "a known variable: " + ", ".join(VARIABLES), "none")


@dataclass(frozen=True)
class Options:
    """Resolved options. ``environment`` and ``heal`` are None when they follow the app.

    ``sources`` says where each came from: ``argument``, a variable's name,
    or ``default``.
    """

    environment: str | None
    policy: str
    heal: bool | None
    disabled: bool
    propagate: str = "off"
    in_app_include: tuple[str, ...] = ()
    in_app_exclude: tuple[str, ...] = ()
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    def environment_for(self, debug: bool, testing: bool) -> str:
        if self.environment is not None:
            return self.environment
        if testing:
            return "testing"
        if debug:
            return "development"
        return "production"

    def heal_for(self, environment: str) -> bool:
        return self.heal if self.heal is not None else environment == "production"

    def describe(self) -> str:
        """One line: each setting in effect and where it came from."""
        shown = {
            "environment": self.environment or "follows app.debug/app.testing",
            "policy": self.policy,
            "heal": "follows the environment"
            if self.heal is None
            else ("on" if self.heal else "off"),
            "propagate": self.propagate,
            "in_app_include": ",".join(self.in_app_include) or "none",
            "in_app_exclude": ",".join(self.in_app_exclude) or "none",
        }
        return ", ".join(
            f"{name}={value} ({self.sources.get(name, FROM_DEFAULT)})"
            for name, value in shown.items()
        )


def modules(
    in_app_include: Iterable[str] | None, in_app_exclude: Iterable[str] | None
) -> tuple[tuple[str, ...], tuple[str, ...], dict[str, str]]:
    """The in-app module prefixes: each argument if given, else its variable."""
    sources: dict[str, str] = {}
    found = []
    for value, name, variable in (
        (in_app_include, "in_app_include", ENV_IN_APP_INCLUDE),
        (in_app_exclude, "in_app_exclude", ENV_IN_APP_EXCLUDE),
    ):
        if value is not None:
            found.append(_modules(value, name))
            sources[name] = FROM_ARGUMENT
        else:
            items = _modules_variable(variable)
            found.append(items)
            sources[name] = variable if items else FROM_DEFAULT
    return found[0], found[1], sources


def resolve(
    environment: str | None = None,
    policy: str | None = None,
    heal: bool | None = None,
    propagate: str | None = None,
    in_app_include: Iterable[str] | None = None,
    in_app_exclude: Iterable[str] | None = None,
) -> Options:
    """Validate the arguments and fill the gaps from the environment variables."""
    sources: dict[str, str] = {}
    environment = _option(environment, "environment", ENV_ENVIRONMENT, ENVIRONMENTS, None, sources)
    policy = _option(policy, "policy", ENV_POLICY, POLICIES, "enforce", sources)

    if heal is not None:
        if not isinstance(heal, bool):
            raise ConfigError(f"heal={heal!r} is not valid: expected True, False or None")
        sources["heal"] = FROM_ARGUMENT
    else:
        heal = _flag_variable(ENV_HEAL, None)
        sources["heal"] = ENV_HEAL if heal is not None else FROM_DEFAULT

    propagate = _option(propagate, "propagate", ENV_PROPAGATE, PROPAGATIONS, "off", sources)
    include, exclude, module_sources = modules(in_app_include, in_app_exclude)
    sources.update(module_sources)

    return Options(
        environment=environment,
        policy=policy,
        heal=heal,
        disabled=disabled(),
        propagate=propagate,
        in_app_include=include,
        in_app_exclude=exclude,
        sources=sources,
    )
