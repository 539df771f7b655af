"""Mount commands: mount, unmount, mounts."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time

import click

from imgchain.errors import ImgchainError
from imgchain.qmp_client import QmpClient, QmpClientError
from imgchain.runtime import find_by_mountpoint, live_records, runtime_dir

from .common import main, output_option, user_errors

START_TIMEOUT = 120
STOP_TIMEOUT = 300


def _daemon_argv(image: str, mountpoint: str, read_only: bool, allow_other: bool,
                 qmp: str | None, device: str) -> list[str]:
    # -P: the current directory does not go first on the daemon's sys.path, so a
    # clone's imgchain/ folder (which holds neither formats/ nor fuse/) cannot
    # shadow the installed package.
    argv = [sys.executable, "-P", "-m", "imgchain.fuse.daemon", image, mountpoint, "--device-name", device]
    if read_only:
        argv.append("--read-only")
    if allow_other:
        argv.append("--allow-other")
    if qmp:
        argv += ["--qmp", qmp]
    return argv


def _wait_ready(read_fd: int, proc: subprocess.Popen[bytes], log_path: str) -> str:
    """The daemon's one readiness line ("OK socket" / "ERR message")."""
    data = b""
    deadline = time.monotonic() + START_TIMEOUT
    while not data.endswith(b"\n"):
        ready, _, _ = select.select([read_fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            proc.kill()
            raise ImgchainError(f"the daemon did not start within {START_TIMEOUT} s (log: {log_path})")
        chunk = os.read(read_fd, 4096)
        if not chunk:
            break
        data += chunk
    line = data.decode().strip()
    if line.startswith("OK "):
        return line[3:]
    if line.startswith("ERR "):
        raise ImgchainError(line[4:])
    raise ImgchainError(f"the daemon exited during start-up (log: {log_path})")


def _start_daemon(argv: list[str]) -> tuple[int, str]:
    log_dir = runtime_dir()
    tmp_log = os.path.join(log_dir, f"starting-{os.getpid()}.log")
    read_fd, write_fd = os.pipe()
    with open(tmp_log, "ab") as log:
        proc = subprocess.Popen([*argv, "--ready-fd", str(write_fd)], pass_fds=(write_fd,),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    os.close(write_fd)
    log_path = os.path.join(log_dir, f"mount-{proc.pid}.log")
    os.replace(tmp_log, log_path)
    try:
        return proc.pid, _wait_ready(read_fd, proc, log_path)
    finally:
        os.close(read_fd)


@main.command()
@click.option("--read-only", is_flag=True, help="Refuse writes (EROFS).")
@click.option("-f", "--foreground", is_flag=True, help="Stay attached until unmounted.")
@click.option("--allow-other", is_flag=True, help="Let other users access the file.")
@click.option("--qmp", "qmp", metavar="SOCKET", help="Control socket path (default: in the runtime directory).")
@click.option("--device-name", default="drive0", show_default=True, help="The export's device name.")
@click.argument("image")
@click.argument("mountpoint")
@user_errors()
def mount(read_only: bool, foreground: bool, allow_other: bool, qmp: str | None,
          device_name: str, image: str, mountpoint: str) -> None:
    """Expose IMAGE's chain as the regular file MOUNTPOINT (created if absent)."""
    if foreground:
        from imgchain.fuse.daemon import MountOptions, run_mount
        opts = MountOptions(image, mountpoint, read_only, allow_other, qmp, device_name)
        run_mount(opts, lambda socket: click.echo(f"{mountpoint}: mounted {image} (pid {os.getpid()}, "
                                                  f"QMP socket {socket})"))
        return
    pid, socket = _start_daemon(_daemon_argv(image, mountpoint, read_only, allow_other, qmp, device_name))
    click.echo(f"{mountpoint}: mounted {image} (pid {pid}, QMP socket {socket})")


def _running(pid: int) -> bool:
    """True while the process exists and is not a zombie waiting for its parent."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _wait_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _running(pid):
            return True
        time.sleep(0.02)
    return False


@main.command()
@click.argument("mountpoint")
@user_errors()
def unmount(mountpoint: str) -> None:
    """Flush and unmount MOUNTPOINT, and wait for its daemon to exit."""
    record = find_by_mountpoint(mountpoint)
    if record is None:
        raise ImgchainError(f"'{mountpoint}' is not an imgchain mount")
    try:
        with QmpClient(record.socket) as client:
            client.execute("quit")
    except QmpClientError:
        os.kill(record.pid, 15)  # no control socket: SIGTERM ends it cleanly too
    if not _wait_exit(record.pid, STOP_TIMEOUT):
        raise ImgchainError(f"'{mountpoint}': the daemon (pid {record.pid}) did not exit")


@main.command()
@output_option
@user_errors()
def mounts(output: str) -> None:
    """List live mounts: mount point, image, pid, control socket, nodes."""
    records = live_records()
    docs = [{"mountpoint": r.mountpoint, "image": r.image, "pid": r.pid, "socket": r.socket,
             "device": r.device, "read-only": r.read_only, "nodes": r.nodes} for r in records]
    if output == "json":
        click.echo(json.dumps(docs, indent=4))
        return
    for d in docs:
        nodes = ", ".join(f"{n['node-name']}={n['file']}" for n in d["nodes"])
        ro = " (read-only)" if d["read-only"] else ""
        click.echo(f"{d['mountpoint']}{ro}: {d['image']} pid {d['pid']} socket {d['socket']}\n  nodes: {nodes}")
