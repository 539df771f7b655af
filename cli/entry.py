"""The `imgchain` executable: start the command line fast, then end a read-only command fast.

A small `imgchain info` or `check` spends nearly all its time starting and stopping
the interpreter, not reading the image, and scripts call them in loops. Three
things here cut that, each only in the executable's own process (importing
`imgchain.cli.main`, as the tests do, changes nothing):

- Modules deferred: click and construct import pdb, pickle, hashlib and
  traceback at start-up and use them only for debugging aids, pickling and
  checksums no command of ours asks for. Each is registered as a placeholder
  that imports the real module on first attribute use (`DeferredModule`).
  (inspect cannot be: click calls `inspect.cleandoc` on every option's help
  as it builds the option.)
- No cyclic garbage collection while the command line's modules load: they
  allocate tens of thousands of objects and free almost none, so the collector
  would only walk them; once loaded they are frozen (`gc.freeze`), out of every
  later collection's way (they live as long as the process anyway).
- No interpreter teardown after a read-only offline command (`TEARDOWN_FREE`):
  once the command has returned (files closed, output written), freeing every
  module and object one by one only costs time; the process flushes its output
  and ends (`os._exit`), as long as no other thread is running.
"""

from __future__ import annotations

import gc
import os
import sys
import types

# Imported by click or construct when they load, used by neither on our commands' paths.
DEFERRED = ("pdb", "pickle", "hashlib", "traceback")

# Commands that only read images (check's repairs are written and closed before it returns).
TEARDOWN_FREE = frozenset({"info", "check", "map", "compare"})


class DeferredModule(types.ModuleType):
    """Stands in sys.modules for a module until an attribute of it is first used.

    `import name` finds this placeholder and binds it; the first attribute
    looked up on it imports the real module (which then replaces it in
    sys.modules) and every later lookup through the placeholder is forwarded.
    """

    def __getattr__(self, attr: str) -> object:
        name = self.__name__
        if sys.modules.get(name) is self:
            del sys.modules[name]
        __import__(name)
        return getattr(sys.modules[name], attr)


def defer_modules(names: tuple[str, ...] = DEFERRED) -> None:
    """Put a placeholder for each module of `names` that is not loaded yet."""
    for name in names:
        if name not in sys.modules:
            sys.modules[name] = DeferredModule(name)


def exit_now(code: object) -> None:
    """End the process with `code` (a SystemExit's) after flushing stdout and stderr, skipping teardown."""
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:  # None: started with that descriptor closed
                stream.flush()
        except OSError:  # a closed pipe or a full disk: what was printed is lost either way
            code = code or 1
    os._exit(code or 0)


def run() -> None:
    """Run the command line on sys.argv; the console script `imgchain` calls this."""
    defer_modules()
    gc.disable()
    try:
        from .main import main
    finally:
        gc.freeze()
        gc.enable()
    try:
        main()
    except SystemExit as end:
        if main.invoked in TEARDOWN_FREE and only_thread():
            exit_now(end.code)
        raise


def only_thread() -> bool:
    """No thread but this one runs (threading is loaded by click already)."""
    import threading

    return threading.active_count() == 1
