"""Errors of the format layer.

Every problem found in an image's bytes ends in a subclass of `FormatError`.
The message always starts with the file it concerns, so a caller can print
`str(err)` as one line. This module knows nothing of files beyond their names.
"""

from __future__ import annotations


class FormatError(Exception):
    """A problem with an image's on-disk format, tied to one file."""

    def __init__(self, filename: str, reason: str) -> None:
        super().__init__(f"{filename}: {reason}")
        self.filename = filename
        self.reason = reason


class NotQcow2(FormatError):
    """The bytes are not a qcow2 image at all."""


class UnsupportedFeature(FormatError):
    """A valid qcow2 image that uses something outside the subset."""


class CorruptImage(FormatError):
    """A qcow2 image whose fields contradict themselves or the file."""


class ReadOnlyImage(FormatError):
    """The image can be read but the subset refuses to write it."""
