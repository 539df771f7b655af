"""The on-disk formats: the qcow2 v3 subset and raw.

Bytes in, values out: this package parses and builds headers, extensions and
tables, classifies entries and computes geometry. It never opens a file, never
awaits and never imports trio, pyfuse3, click or the core; callers hand it the
bytes they read and write the bytes it builds.
"""

from .errors import CorruptImage, FormatError, NotQcow2, ReadOnlyImage, UnsupportedFeature
from .probe import probe_format

__all__ = [
    "CorruptImage",
    "FormatError",
    "NotQcow2",
    "ReadOnlyImage",
    "UnsupportedFeature",
    "probe_format",
]
