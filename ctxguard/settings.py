"""Options: explicit arguments, then ``CTXGUARD_*`` environment variables, then defaults.

A bad value is a configuration mistake found at start-up, so it raises at
once with the name of the argument or variable and the values allowed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

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
    if environment is not None:
        environment = _choice(environment, ENVIRONMENTS, "environment")
    elif os.environ.get(ENV_ENVIRONMENT):
        environment = _choice(os.environ[ENV_ENVIRONMENT], ENVIRONMENTS, ENV_ENVIRONMENT)

    if policy is not None:
        policy = _choice(policy, POLICIES, "policy")
    elif os.environ.get(ENV_POLICY):
        policy = _choice(os.environ[ENV_POLICY], POLICIES, ENV_POLICY)
    else:
        policy = "enforce"

    if heal is not None:
        if not isinstance(heal, bool):
            raise ConfigError(f"heal={heal!r} is not valid: expected True, False or None")
    elif os.environ.get(ENV_HEAL):
        heal = _flag(os.environ[ENV_HEAL], ENV_HEAL)

    if propagate is not None:
        propagate = _choice(propagate, PROPAGATIONS, "propagate")
    elif os.environ.get(ENV_PROPAGATE):
        propagate = _choice(os.environ[ENV_PROPAGATE], PROPAGATIONS, ENV_PROPAGATE)
    else:
        propagate = "off"

    return Options(
        environment=environment,
        policy=policy,
        heal=heal,
        disabled=disabled(),
        propagate=propagate,
    )
