"""User-facing errors: each one is printed as a single message and exits with code 2 (no traceback)."""


class LmforgeError(Exception):
    """A problem with the user's input (config, data, request). The CLI prints it and exits 2."""

    exit_code = 2


class ConfigError(LmforgeError):
    """A bad config key or value; the message names the file and the dotted key."""


class DataError(LmforgeError):
    """Bad data rows or sources; the message names file:line and the reason."""


class UnsupportedError(LmforgeError):
    """A valid request this machine or install cannot run (e.g. a GPU-only path on CPU)."""


class TrainingError(LmforgeError):
    """A run that stopped on purpose (a signal, a NaN loss): the message says what was kept and how to go on."""

    exit_code = 1
