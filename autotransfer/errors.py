"""One exception root, so the CLI can tell a user's mistake from a bug.

Messages follow one template: what input, what was expected, what was received, how to fix it.
"""

from __future__ import annotations


class AutotransferError(Exception):
    """Root of every error autotransfer raises on purpose."""


class ConfigError(AutotransferError, ValueError):
    """A flag, option or argument has a value autotransfer cannot use."""


class DataError(AutotransferError, ValueError):
    """The data set (folder, CSV, images) cannot be used as given."""


class ExportError(AutotransferError, RuntimeError):
    """The exported model does not match the trained one."""
