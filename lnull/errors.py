"""The user-facing error type. Imports nothing, so every module (config, stages, scorers) can raise it."""


class ConfigError(ValueError):
    """A value (config, file, data) that cannot work; the message names it in one line and says what to do."""
