"""The `imgchain` command line (click): the entry point, with every command registered.

Parses arguments, calls the core, prints human or JSON output, and turns
errors into one line on stderr and an exit code: 0 success, 1 failure,
2 usage error (`check` and `compare` keep qemu-img's own codes). Only this
package imports click. The root group and the shared helpers are in
cli/common.py; the command modules add their commands to it, and this module
names which module holds which command, so that a command loads only its own
module: the offline tools load neither the job engine (trio) nor pyfuse3.
"""

from __future__ import annotations

from .common import main

COMMAND_MODULES = {
    ".images": ("create", "info", "check", "map", "compare", "rebase"),
    ".jobs": ("stream", "commit", "jobs", "job"),
    ".mount": ("mount", "unmount", "mounts"),
    ".snapshot": ("snapshot",),
}
main.lazy.update({name: module for module, names in COMMAND_MODULES.items() for name in names})

__all__ = ["main"]

if __name__ == "__main__":
    main()
