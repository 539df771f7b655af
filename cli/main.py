"""The `imgchain` command line (click): the entry point, with every command registered.

Parses arguments, calls the core, prints human or JSON output, and turns
errors into one line on stderr and an exit code: 0 success, 1 failure,
2 usage error (`check` and `compare` keep qemu-img's own codes). Only this
package imports click. The root group and the shared helpers are in
cli/common.py; importing the command modules here adds their commands.
"""

from __future__ import annotations

from . import images  # noqa: F401  (registers create, info, check, map, compare, rebase)
from . import jobs  # noqa: F401  (registers stream, commit, jobs, job)
from . import mount  # noqa: F401  (registers mount, unmount, mounts)
from . import snapshot  # noqa: F401  (registers snapshot)
from .common import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
