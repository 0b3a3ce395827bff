"""The gateway's Settings as a command on its host loads them: a bad variable becomes a UsageError."""

from __future__ import annotations

from llm_proxy.ops.command_errors import UsageError
from llm_proxy.settings import ConfigError, Settings, load_settings


def configuration_error(exc: ConfigError) -> UsageError:
    """Return the failure that shows each of the error's problems as its own `configuration error:` line."""
    return UsageError("\n".join(f"configuration error: {variable}: {problem}" for variable, problem in exc.problems))


def command_settings() -> Settings:
    """Load the Settings from the environment and .env, or raise the UsageError naming each bad variable."""
    try:
        return load_settings()
    except ConfigError as exc:
        raise configuration_error(exc) from None
