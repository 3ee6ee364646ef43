"""The project's own exception types.

Every error a user can meet is one of these, with a message that names the fix. The
command line prints the message on one line and exits with status 2; ``debug=true``
shows the traceback as well.
"""

from __future__ import annotations


class EchoEnvError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(EchoEnvError, ValueError):
    """A configuration value is missing, unknown or out of range."""


class EnvUsageError(EchoEnvError, RuntimeError):
    """An environment was driven out of order (step before reset, unknown agent...)."""


class ServerUnreachableError(EchoEnvError, ConnectionError):
    """Nothing answered at the server address, or it stopped answering."""


class ServerResponseError(EchoEnvError, RuntimeError):
    """The server answered, but not as an OpenAI-compatible server should."""


class MetricsError(EchoEnvError, RuntimeError):
    """The server's Prometheus metrics are missing or unreadable."""


class ModelError(EchoEnvError, RuntimeError):
    """The model could not be found, prepared or loaded."""


class EngineError(EchoEnvError, RuntimeError):
    """The embedded vLLM engine could not be installed, started or stopped."""
