"""Errors that carry a one-line, user-facing message.

Every failure a user can cause (a corrupt file, an unsupported format, a wrong model
directory) is raised as an :class:`M3BindError`; the CLI prints ``error: <what> (<path>)``
and exits with status 2, the app shows the same line, the indexer records it as a failure.
"""

from __future__ import annotations


class M3BindError(Exception):
    """Base class of all user-facing errors.

    Args:
        what: A short description of what went wrong, without the path.
        path: The file or folder concerned, if any.
    """

    def __init__(self, what: str, path: str | None = None):
        self.what = " ".join(str(what).split())  # always one line
        self.path = None if path is None else str(path)
        super().__init__(self.line())

    def line(self) -> str:
        """The one-line message ``<what> (<path>)`` shown to users."""
        return f"{self.what} ({self.path})" if self.path else self.what


class UnsupportedFormat(M3BindError):
    """The file is not in a format m3bind reads (or the modality cannot be determined)."""


class CorruptFile(M3BindError):
    """The file claims a supported format but cannot be decoded (truncated, damaged, empty)."""


class TooLarge(M3BindError):
    """The file or its decoded size exceeds a safety limit (decompression bombs included)."""


class ModelDirError(M3BindError):
    """A model directory is missing, malformed, holds a pickle or fails its hash manifest."""


class ConfigError(M3BindError):
    """A configuration value is invalid."""
