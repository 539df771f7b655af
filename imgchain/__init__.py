"""imgchain: disk-image backing chains (qcow2 subset and raw), mounted and rewritten live.

The core package: the block graph (nodes and backing links), the I/O path
through a chain with copy-on-write, and the offline image tools. It never
imports pyfuse3 or click; the FUSE export and the command line sit on top.
"""

import os

# In the source tree the subpackages formats/, fuse/ and cli/ sit beside this folder, not in it
# (pyproject.toml's package-dir puts them inside the package when a wheel is built). The
# development install (`make setup`: editable, compat mode) only puts the tree's root on sys.path,
# a plain path entry with no import hook to load at every start; so the root joins this package's
# path, where `imgchain.formats` & co. are found. A wheel has them inside and skips this.
if not os.path.isdir(os.path.join(__path__[0], "formats")):
    __path__.append(os.path.dirname(__path__[0]))

__version__ = "0.1.0"

# The public names, each with the module that defines it. They load on first use (PEP 562), so
# that `import imgchain.cli` (every command) or `imgchain.formats` alone does not pay for the
# whole core: the command line decides what the standard library defers before construct loads.
_PUBLIC = {
    "BackingError": ".errors",
    "Chain": ".chain",
    "FormatError": ".formats",
    "ImageIOError": ".errors",
    "ImgchainError": ".errors",
    "open_chain": ".chain",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> object:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'imgchain' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_PUBLIC[name], __name__), name)
