"""Mount commands: mount, unmount, mounts; and recovery when a mount's daemon has died.

`mount` starts the daemon (imgchain.fuse.daemon) in the background and waits
for its readiness line; when the daemon cannot start, the one-line error
says why (the daemon's own message, libfuse's or fusermount3's, or the last
line of a crash), not only where the log is. A daemon that died (kill -9,
the OOM killer) leaves a dead FUSE mount: `unmount` detaches it and says so,
`mount` onto it clears it first, and `mounts` shows it as dead.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time

import click


from imgchain.errors import ImgchainError
from imgchain.fuse.options import (DEFAULT_CACHE_SIZE, DEFAULT_PREALLOC_SIZE, MIN_CACHE_SIZE, PREALLOC_ALIGN,
                                   MountOptions)
from imgchain.fuse.recovery import connection_dead, is_dead_mount, is_imgchain_mount, recover
from imgchain.qmp_client import QmpClient, QmpClientError
from imgchain.runtime import (MountRecord, create_log, current_records, find_by_mountpoint,
                              open_private, runtime_dir, signal_daemon)

from .common import main, notice, output_option, parse_size, trust_backing_option, user_errors

START_TIMEOUT = 120
STOP_TIMEOUT = 300
LOG_TAIL = 64 * 1024
# The last line of a Python traceback: "ModuleNotFoundError: No module named ...".
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)(: .*)?$")


# -- start --------------------------------------------------------------------

def _daemon_argv(opts: MountOptions) -> list[str]:
    # -P: the current directory does not go first on the daemon's sys.path, so a
    # clone's imgchain/ folder (which holds neither formats/ nor fuse/) cannot
    # shadow the installed package.
    argv = [sys.executable, "-P", "-m", "imgchain.fuse.daemon", opts.image, opts.mountpoint,
            "--device-name", opts.device, "--cache-size", str(opts.cache_size),
            "--prealloc-size", str(opts.prealloc_size)]
    for flag, on in (("--read-only", opts.read_only), ("--allow-other", opts.allow_other),
                     ("--trust-backing", opts.trust_backing)):
        if on:
            argv.append(flag)
    if opts.qmp:
        argv += ["--qmp", opts.qmp]
    return argv


def _log_tail(name: str) -> list[str]:
    """The last lines of a daemon's log (opened without following symlinks)."""
    try:
        fd = open_private(name, os.O_RDONLY)
    except OSError:
        return []
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        f.seek(max(0, size - LOG_TAIL))
        return [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]


def startup_failure(lines: list[str]) -> str:
    """Why a daemon died before it was ready, from its log: libfuse's or
    fusermount3's own message, else the exception that ended it, else its last line."""
    fuse = [line for line in lines if line.startswith(("fusermount3:", "fuse:"))]
    if fuse:
        return fuse[-1]
    crash = [line for line in lines if _EXCEPTION_LINE.match(line)]
    if crash:
        return crash[-1]
    return lines[-1] if lines else "no message"


def _wait_ready(read_fd: int, proc: subprocess.Popen[bytes], log_name: str) -> str:
    """The daemon's one readiness line ("OK socket" / "ERR message")."""
    log_path = os.path.join(runtime_dir(), log_name)
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
    proc.wait()
    raise ImgchainError(f"the daemon exited during start-up: {startup_failure(_log_tail(log_name))} "
                        f"(log: {log_path})")


def _start_daemon(argv: list[str]) -> tuple[int, str]:
    starting = f"starting-{os.getpid()}.log"
    log_fd = create_log(starting)
    read_fd, write_fd = os.pipe()
    try:
        proc = subprocess.Popen([*argv, "--ready-fd", str(write_fd)], pass_fds=(write_fd,),
                                stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd, start_new_session=True)
    finally:
        os.close(write_fd)
        os.close(log_fd)
    log_name = f"mount-{proc.pid}.log"
    directory = runtime_dir()
    os.replace(os.path.join(directory, starting), os.path.join(directory, log_name))
    try:
        return proc.pid, _wait_ready(read_fd, proc, log_name)
    finally:
        os.close(read_fd)


# -- dead mounts --------------------------------------------------------------

def _leaks_note(record: MountRecord | None) -> None:
    image = record.image if record else "IMAGE"
    notice(f"{image}: after a crash `imgchain check` may report leaked clusters (exit 3); "
           f"they are harmless, and `imgchain check -r leaks {image}` repairs them")


def _clear_dead_mount(mountpoint: str) -> None:
    """Before mounting: clean up a dead imgchain mount left on `mountpoint`."""
    if not is_dead_mount(mountpoint):
        return
    record = find_by_mountpoint(mountpoint)
    if record is not None and record.daemon_running():
        raise ImgchainError(f"{mountpoint}: the mount's FUSE connection is gone but its daemon "
                            f"(pid {record.pid}) still runs; stop it with `imgchain unmount`")
    recover(mountpoint, record)
    who = f" (pid {record.pid})" if record else ""
    notice(f"{mountpoint}: cleaned up a dead mount: its daemon{who} had died")
    _leaks_note(record)


def _recover_dead(mountpoint: str, record: MountRecord | None) -> None:
    """unmount of a mount whose daemon is not running: detach it and say so."""
    if record is None and not is_imgchain_mount(mountpoint):
        raise ImgchainError(f"{mountpoint}: is not an imgchain mount")
    if is_imgchain_mount(mountpoint) and not connection_dead(mountpoint):
        pid = f" (pid {record.pid})" if record else ""
        raise ImgchainError(f"{mountpoint}: its daemon{pid} cannot be identified; "
                            "unmount it with `fusermount3 -u`")
    detached = recover(mountpoint, record)
    who = f" (pid {record.pid})" if record else ""
    done = "detached the dead mount" if detached else "it was no longer mounted"
    notice(f"{mountpoint}: the daemon{who} had died; {done}")
    _leaks_note(record)


# -- stop ---------------------------------------------------------------------

def _wait_exit(record: MountRecord, timeout: float) -> bool:
    """Wait until the record's daemon no longer runs (a zombie does not)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not record.daemon_running():
            return True
        time.sleep(0.02)
    return False


def _stop(record: MountRecord, mountpoint: str) -> None:
    """Ask a running daemon to quit (QMP, else SIGTERM to that very process) and wait."""
    try:
        with QmpClient(record.socket) as client:
            client.execute("quit")
    except QmpClientError:
        signal_daemon(record, signal.SIGTERM)  # no control socket: SIGTERM ends it cleanly too
    if not _wait_exit(record, STOP_TIMEOUT):
        raise ImgchainError(f"{mountpoint}: the daemon (pid {record.pid}) did not exit")


# -- commands -----------------------------------------------------------------

@main.command()
@click.option("--read-only", is_flag=True, help="Refuse writes (EROFS).")
@click.option("-f", "--foreground", is_flag=True, help="Stay attached until unmounted.")
@click.option("--allow-other", is_flag=True, help="Let other users access the file.")
@click.option("--qmp", "qmp", metavar="SOCKET", help="Control socket path (default: in the runtime directory).")
@click.option("--device-name", default="drive0", show_default=True, help="The export's device name.")
@click.option("--cache-size", "cache_size", metavar="SIZE", default=f"{DEFAULT_CACHE_SIZE >> 20}M", show_default=True,
              help="Bytes of metadata caches (qcow2 tables and cluster maps) the daemon keeps, "
                   "as QEMU's cache-size; at least 1M.")
@click.option("--prealloc-size", "prealloc_size", metavar="SIZE", default=f"{DEFAULT_PREALLOC_SIZE >> 20}M",
              show_default=True,
              help="Bytes allocated ahead of a qcow2 file's end while it grows, as QEMU's preallocate "
                   "filter; cut back at unmount. 0: none.")
@trust_backing_option
@click.argument("image")
@click.argument("mountpoint")
@user_errors()
def mount(read_only: bool, foreground: bool, allow_other: bool, qmp: str | None,
          device_name: str, cache_size: str, prealloc_size: str, trust_backing: bool, image: str,
          mountpoint: str) -> None:
    """Expose IMAGE's chain as the regular file MOUNTPOINT (created if absent)."""
    _clear_dead_mount(mountpoint)
    opts = MountOptions(image, mountpoint, read_only, allow_other, qmp, device_name, trust_backing,
                        _cache_size(cache_size), _prealloc_size(prealloc_size))
    if foreground:
        from imgchain.fuse.daemon import run_mount  # loads pyfuse3
        run_mount(opts, lambda socket: click.echo(f"{mountpoint}: mounted {image} (pid {os.getpid()}, "
                                                  f"QMP socket {socket})"))
        return
    pid, socket = _start_daemon(_daemon_argv(opts))
    click.echo(f"{mountpoint}: mounted {image} (pid {pid}, QMP socket {socket})")


def _cache_size(text: str) -> int:
    size = parse_size(text)
    if size < MIN_CACHE_SIZE:
        raise click.BadParameter(f"{text}: the cache size must be at least {MIN_CACHE_SIZE >> 20}M",
                                 param_hint="'--cache-size'")
    return size


def _prealloc_size(text: str) -> int:
    size = parse_size(text)
    if size % PREALLOC_ALIGN:
        raise click.BadParameter(f"{text}: the preallocation size must be a multiple of "
                                 f"{PREALLOC_ALIGN >> 20}M", param_hint="'--prealloc-size'")
    return size


@main.command()
@click.argument("mountpoint")
@user_errors()
def unmount(mountpoint: str) -> None:
    """Flush and unmount MOUNTPOINT, and wait for its daemon to exit.

    If the daemon had died (kill -9, out of memory), detach its dead mount."""
    record = find_by_mountpoint(mountpoint)
    if record is not None and record.daemon_running():
        _stop(record, mountpoint)
        if not is_dead_mount(mountpoint):
            return
        record = find_by_mountpoint(mountpoint)  # it died instead of unmounting
    _recover_dead(mountpoint, record)


JOBS_QUERY_TIMEOUT = 5


def _mount_jobs(record: MountRecord, state: str) -> tuple[list[dict[str, object]], str | None]:
    """The jobs of a mount's daemon (query-jobs records with speed and
    io-status), and why they are unknown if the daemon cannot be asked."""
    if state != "running":
        return [], None
    try:
        with QmpClient(record.socket, timeout=JOBS_QUERY_TIMEOUT) as client:
            block = {j["device"]: j for j in client.execute("query-block-jobs")}
            jobs = client.execute("query-jobs")
    except (QmpClientError, OSError, ValueError, KeyError, TypeError) as exc:
        return [], str(exc) or type(exc).__name__
    return [{**j, "speed": block.get(j["id"], {}).get("speed", 0),
             "io-status": block.get(j["id"], {}).get("io-status", "ok")} for j in jobs], None


def _mount_doc(record: MountRecord) -> dict[str, object]:
    state = record.state()
    jobs, jobs_error = _mount_jobs(record, state)
    doc: dict[str, object] = {
        "mountpoint": record.mountpoint, "image": record.image, "pid": record.pid,
        "state": state, "socket": record.socket, "device": record.device,
        "read-only": record.read_only, "max-background": record.max_background,
        "cache-size": record.cache_size, "prealloc-size": record.prealloc_size,
        "nodes": record.nodes, "jobs": jobs}
    if jobs_error is not None:
        doc["jobs-error"] = jobs_error
    return doc


def _jobs_line(doc: dict[str, object]) -> str:
    if "jobs-error" in doc:
        return f"  jobs: unknown (cannot query the daemon: {doc['jobs-error']})"
    jobs = doc["jobs"]
    if not jobs:
        return "  jobs: none"
    parts = []
    for j in jobs:  # type: ignore[attr-defined]
        total = j["total-progress"]
        pct = f" {j['current-progress'] * 100 // total}%" if total else ""
        error = f", error: {j['error']}" if "error" in j else ""
        parts.append(f"{j['id']} ({j['type']}, {j['status']}{pct}{error})")
    return "  jobs: " + "; ".join(parts)


@main.command()
@output_option
@user_errors()
def mounts(output: str) -> None:
    """List mounts: mount point, image, pid, state, control socket, nodes, jobs.

    A mount whose daemon died is listed as dead until `imgchain unmount` clears it."""
    docs = [_mount_doc(r) for r in current_records()]
    if output == "json":
        click.echo(json.dumps(docs, indent=4))
        return
    for d in docs:
        nodes = ", ".join(f"{n['node-name']}={n['file']}" for n in d["nodes"])  # type: ignore[attr-defined]
        ro = " (read-only)" if d["read-only"] else ""
        dead = " DEAD: the daemon died; `imgchain unmount` detaches it" if d["state"] == "dead" else ""
        click.echo(f"{d['mountpoint']}{ro}: {d['image']} pid {d['pid']} socket {d['socket']}{dead}\n"
                   f"  nodes: {nodes}")
        if d["state"] == "running":
            click.echo(_jobs_line(d))
