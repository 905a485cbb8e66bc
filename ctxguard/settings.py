"""Options: explicit arguments, then ``CTXGUARD_*`` environment variables, then defaults.

A bad value is a configuration mistake found at start-up, so it raises at
once with the name of the argument or variable and the values allowed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TypeVar

D = TypeVar("D", str, None)

ENVIRONMENTS = ("production", "development", "testing")
POLICIES = ("enforce", "warn", "strict", "off")
PROPAGATIONS = ("off", "app")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")

ENV_ENVIRONMENT = "CTXGUARD_ENVIRONMENT"
ENV_POLICY = "CTXGUARD_POLICY"
ENV_HEAL = "CTXGUARD_HEAL"
ENV_DISABLED = "CTXGUARD_DISABLED"
ENV_PROPAGATE = "CTXGUARD_PROPAGATE"


class ConfigError(ValueError):
    """An option or ``CTXGUARD_*`` variable has a value ctxguard does not know."""


def _choice(value: object, allowed: tuple[str, ...], source: str) -> str:
    if isinstance(value, str) and value.strip().lower() in allowed:
        return value.strip().lower()
    raise ConfigError(f"{source}={value!r} is not valid: expected one of {', '.join(allowed)}")


def _option(
    value: object, name: str, variable: str, allowed: tuple[str, ...], default: D
) -> str | D:
    """The argument if given, else the variable if set (and not empty), else ``default``."""
    if value is not None:
        return _choice(value, allowed, name)
    if os.environ.get(variable):
        return _choice(os.environ[variable], allowed, variable)
    return default


def _flag(value: object, source: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise ConfigError(
        f"{source}={value!r} is not valid: expected one of {', '.join(_TRUE + _FALSE[:-1])}"
    )


def disabled() -> bool:
    """``CTXGUARD_DISABLED`` switches every hook and middleware off."""
    value = os.environ.get(ENV_DISABLED)
    return value is not None and _flag(value, ENV_DISABLED)


@dataclass(frozen=True)
class Options:
    """Resolved options. ``environment`` and ``heal`` are None when they follow the app."""

    environment: str | None
    policy: str
    heal: bool | None
    disabled: bool
    propagate: str = "off"

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


def resolve(
    environment: str | None = None,
    policy: str | None = None,
    heal: bool | None = None,
    propagate: str | None = None,
) -> Options:
    """Validate the arguments and fill the gaps from the environment variables."""
    environment = _option(environment, "environment", ENV_ENVIRONMENT, ENVIRONMENTS, None)
    policy = _option(policy, "policy", ENV_POLICY, POLICIES, "enforce")

    if heal is not None:
        if not isinstance(heal, bool):
            raise ConfigError(f"heal={heal!r} is not valid: expected True, False or None")
    elif os.environ.get(ENV_HEAL):
        heal = _flag(os.environ[ENV_HEAL], ENV_HEAL)

    propagate = _option(propagate, "propagate", ENV_PROPAGATE, PROPAGATIONS, "off")

    return Options(
        environment=environment,
        policy=policy,
        heal=heal,
        disabled=disabled(),
        propagate=propagate,
    )
