"""Errors of the core.

`ImgchainError` is the family the CLI, the QMP server and the FUSE export turn
into messages, error classes and errno values. Format errors from
`imgchain.formats` are a separate family (`FormatError`); both carry a
one-line message that names the file or node and the reason.
"""

from __future__ import annotations

from imgchain.formats import FormatError


class ImgchainError(Exception):
    """A user-facing error of the core, with a one-line message."""


class BackingError(ImgchainError):
    """A backing file could not be resolved or opened."""


class ImageIOError(ImgchainError):
    """An I/O request could not be served (out of range, read-only, OS error)."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


USER_ERRORS = (ImgchainError, FormatError, OSError)
"""What a front end reports as a message rather than a traceback."""
