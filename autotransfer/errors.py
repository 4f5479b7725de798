"""One exception root, so the CLI can tell a user's mistake from a bug, and the exit codes that say which.

Messages follow one template: what input, what was expected, what was received, how to fix it.
"""

from __future__ import annotations

EXIT_USAGE = 2  # an AutotransferError (or a usage mistake): the message says how to fix it
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM (128 + SIGINT): the running trials were marked and queued again


class AutotransferError(Exception):
    """Root of every error autotransfer raises on purpose."""


class ConfigError(AutotransferError, ValueError):
    """A flag, option or argument has a value autotransfer cannot use."""


class DataError(AutotransferError, ValueError):
    """The data set (folder, CSV, images) cannot be used as given."""


class ExportError(AutotransferError, RuntimeError):
    """The exported model does not match the trained one."""
