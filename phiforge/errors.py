"""User-facing errors.

A `PhiforgeError` is something the user can fix (a bad file, a bad config, missing data). The CLI prints it as
one line, `phiforge: error: ...`, and exits with code 2; any other exception is a bug and shows a traceback.
"""

from __future__ import annotations


class PhiforgeError(Exception):
    """An error the user caused and can fix; its message names the file, field or tensor at fault."""

    exit_code = 2


class ConfigError(PhiforgeError):
    """A bad configuration: unknown key, wrong type, impossible value."""


class CheckpointError(PhiforgeError):
    """A checkpoint that cannot be loaded: missing or corrupt file, wrong keys or shapes."""


class DataError(PhiforgeError):
    """Input data that cannot be used: missing files, empty inputs, malformed records."""
