"""imgchain: disk-image backing chains (qcow2 subset and raw), mounted and rewritten live.

The core package: the block graph (nodes and backing links), the I/O path
through a chain with copy-on-write, and the offline image tools. It never
imports pyfuse3 or click; the FUSE export and the command line sit on top.
"""

from .chain import Chain, open_chain
from .errors import BackingError, ImageIOError, ImgchainError
from .formats import FormatError

__version__ = "0.1.0"

__all__ = ["BackingError", "Chain", "FormatError", "ImageIOError", "ImgchainError", "open_chain"]
