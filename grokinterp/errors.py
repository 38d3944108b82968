"""User-facing errors. Each message is one line saying what was wrong and how to fix it; the CLI prints it and
exits with code 2."""


class GrokinterpError(ValueError):
    """Base of every error caused by the user's input rather than by a bug."""


class TaskError(GrokinterpError):
    """A task that cannot be built (unknown operation, bad modulus or fraction)."""


class ConfigError(GrokinterpError):
    """A configuration that cannot be used."""


class RunError(GrokinterpError):
    """A run directory that cannot be used as asked (missing, locked, corrupt, different config)."""


class AnalysisError(GrokinterpError):
    """An analysis that cannot run as asked (unknown metric, metric not for this task, bad step selection)."""
