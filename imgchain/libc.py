"""Calls into the C library that the os module lacks (sync_file_range,
fallocate), through ctypes, loaded on first use: the offline commands never
pay for ctypes."""

from __future__ import annotations

import functools
import os
from typing import Any, Callable


@functools.cache
def libc_function(name: str) -> Callable[..., int]:
    """The libc function `name`, its argument types as `_ARGTYPES` declares
    them, errno kept for `call_checked`."""
    import ctypes
    call = ctypes.CDLL(None, use_errno=True)[name]
    call.argtypes = _ARGTYPES[name](ctypes)
    call.restype = ctypes.c_int
    return call  # type: ignore[no-any-return]


_ARGTYPES: dict[str, Callable[[Any], list[Any]]] = {
    "sync_file_range": lambda c: [c.c_int, c.c_int64, c.c_int64, c.c_uint],
    "fallocate": lambda c: [c.c_int, c.c_int, c.c_int64, c.c_int64],
}


def call_checked(name: str, *args: int) -> None:
    """Call libc's `name`; OSError with its errno when it returns non-zero."""
    if libc_function(name)(*args):
        import ctypes
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
