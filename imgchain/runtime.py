"""The runtime directory: one record per live mount, found by mount point or image.

`$IMGCHAIN_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/imgchain`, else `/run/imgchain`
for root and `/tmp/imgchain-$UID` for others, created mode 0700. A record is a
JSON file written atomically by the daemon once its mount is live and removed
when it exits; records whose daemon is gone are ignored and deleted.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import ImgchainError


def runtime_dir(create: bool = True) -> str:
    """The runtime directory (created 0700 when `create`)."""
    path = os.environ.get("IMGCHAIN_RUNTIME_DIR")
    if not path:
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        if xdg:
            path = os.path.join(xdg, "imgchain")
        else:
            path = "/run/imgchain" if os.geteuid() == 0 else f"/tmp/imgchain-{os.getuid()}"
    if create:
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise ImgchainError(f"cannot create the runtime directory '{path}': {exc.strerror}") from None
    return path


@dataclass
class MountRecord:
    """What the CLI needs to find and talk to a mount's daemon."""

    pid: int
    mountpoint: str
    image: str
    socket: str
    device: str = "drive0"
    read_only: bool = False
    nodes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def path(self) -> str:
        return record_path(self.pid)

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def record_path(pid: int) -> str:
    return os.path.join(runtime_dir(), f"mount-{pid}.json")


def write_record(record: MountRecord) -> None:
    """Write (or replace) a record atomically."""
    tmp = record.path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(asdict(record), f, indent=2)
    os.replace(tmp, record.path)


def remove_record(pid: int) -> None:
    try:
        os.unlink(record_path(pid))
    except FileNotFoundError:
        pass


def live_records() -> list[MountRecord]:
    """Records of running daemons; stale ones are deleted on the way."""
    records = []
    directory = runtime_dir()
    for name in sorted(os.listdir(directory)):
        if not (name.startswith("mount-") and name.endswith(".json")):
            continue
        try:
            with open(os.path.join(directory, name)) as f:
                record = MountRecord(**json.load(f))
        except (OSError, ValueError, TypeError):
            continue
        if record.alive():
            records.append(record)
        else:
            remove_record(record.pid)
            _remove_quietly(record.socket)
    return records


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def find_by_mountpoint(mountpoint: str) -> MountRecord | None:
    target = os.path.realpath(mountpoint)
    return next((r for r in live_records() if os.path.realpath(r.mountpoint) == target), None)

