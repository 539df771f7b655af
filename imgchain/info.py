"""Image information: what `qemu-img info` (7.2) reports, as data and as text.

`image_info` opens one image (or, with `backing_chain`, each image of the
chain in turn, top first) without its backing, the way qemu-img does with
BDRV_O_NO_BACKING, so an overlay whose backing file is missing still has
info. The keys and their presence follow qemu's `bdrv_query_image_info` and
`qcow2_get_specific_info`; `human_info` renders them the way
`bdrv_image_info_dump` prints them. Dict insertion order follows the order
qemu-img 7.2 prints the keys in, so a caller that dumps the dict keeps
qemu's layout.

This module only reads. The snapshot table and the bitmap directory are
decoded by `formats.qcow2_snapshots` and `formats.qcow2_bitmaps`; this module
turns their values into qemu's keys.
"""

from __future__ import annotations

import math
import os
import time
from typing import TYPE_CHECKING, Any

from imgchain.formats.qcow2_header import (
    COMPAT_LAZY_REFCOUNTS,
    EXT_BITMAPS,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    Qcow2Header,
)

from .chain import open_image, protocol_of
from .errors import BackingError, ImgchainError
from .locks import ImageLockedError
from .node import Node
from .qcow2 import read_snapshot_table

if TYPE_CHECKING:
    from imgchain.formats.qcow2_snapshots import Snapshot

Info = dict[str, Any]

SECTOR = 512
_SIZE_SUFFIXES = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")


# ---------------------------------------------------------------------------
# Names


def full_backing_filename(overlay: str, name: str) -> str:
    """The path qemu shows as `full-backing-filename` (and opens) for `name`.

    Lexical, like QEMU's bdrv_make_absolute_filename: an absolute name or one
    with a protocol prefix stays as it is; a relative one is appended to the
    overlay's path up to and including its last '/'."""
    if name.startswith("/") or protocol_of(name):
        return name
    return overlay[:overlay.rfind("/") + 1] + name


# ---------------------------------------------------------------------------
# Collecting


def image_info(path: str, backing_chain: bool = False,
               force_share: bool = False) -> Info | list[Info]:
    """What `qemu-img info --output=json [--backing-chain] [-U] path` prints.

    Without `backing_chain` only `path` itself is opened (its backing may be
    missing). With it, a list top first; a backing that cannot be opened, or
    a chain that comes back to an image already listed, raises
    `BackingError`. Each image is opened with QEMU's read locks, so an image
    another process writes raises `ImageLockedError`, as qemu-img refuses
    it, unless `force_share` (qemu-img's `-U`) skips the locks.
    """
    lock = None if force_share else "default"
    if not backing_chain:
        return _info_of_file(path, None, ImgchainError, lock)
    return _chain_info(path, lock)


def _chain_info(path: str, lock: str | None) -> list[Info]:
    infos: list[Info] = []
    seen_files: set[tuple[int, int]] = set()
    seen_names: set[str] = set()
    filename: str | None = path
    fmt: str | None = None
    while filename is not None:
        error = ImgchainError if not infos else BackingError
        ident = _file_identity(filename)
        if filename in seen_names or (ident is not None and ident in seen_files):
            raise BackingError(f"Backing file '{filename}' creates an infinite loop")
        seen_names.add(filename)
        if ident is not None:
            seen_files.add(ident)
        info = _info_of_file(filename, fmt, error, lock)
        infos.append(info)
        filename = info.get("full-backing-filename")
        fmt = info.get("backing-filename-format")
    return infos


def _file_identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None  # reported when the image is opened
    return st.st_dev, st.st_ino


def _info_of_file(filename: str, fmt: str | None, error: type[ImgchainError],
                  lock: str | None) -> Info:
    proto = protocol_of(filename)
    if proto and not filename.startswith("/"):
        raise error(f"Could not open '{filename}': Unknown protocol '{proto}'")
    try:
        node = open_image(filename, False, fmt, lock=lock)
    except ImageLockedError:
        raise
    except ImgchainError as exc:
        # qemu-img repeats the name: "Could not open 'x': Could not open 'x': ..."
        raise error(f"Could not open '{filename}': {exc}") from None
    try:
        return node_info(node)
    finally:
        node.close()


def node_info(node: Node) -> Info:
    """The `qemu-img info` record of one opened image (its backing not needed)."""
    driver = node.driver
    header: Qcow2Header | None = getattr(driver, "header", None)
    info: Info = {}
    if driver.backing_file and driver.backing_format:
        info["backing-filename-format"] = driver.backing_format
    if header is not None and header.nb_snapshots:
        table = read_snapshot_table(driver.file, header, node.filename)  # type: ignore[attr-defined]
        info["snapshots"] = [_snapshot_info(sn) for sn in table.snapshots]
    info["virtual-size"] = virtual_size(node)
    info["filename"] = node.filename
    if header is not None:
        info["cluster-size"] = header.cluster_size
    info["format"] = node.format_name
    info["actual-size"] = driver.file.allocated_bytes()  # type: ignore[attr-defined]
    if header is not None:
        info["format-specific"] = {"type": "qcow2", "data": _qcow2_specific(  # type: ignore[attr-defined]
            driver.file, header, node.filename)}
    if driver.backing_file:
        info["full-backing-filename"] = full_backing_filename(node.filename, driver.backing_file)
        info["backing-filename"] = driver.backing_file
    info["dirty-flag"] = bool(header is not None and header.incompatible_features & INCOMPAT_DIRTY)
    return info


def virtual_size(node: Node) -> int:
    """The size qemu reports: a raw file's length is rounded up to a sector."""
    if node.format_name == "raw":
        return -(-node.size // SECTOR) * SECTOR
    return node.size


def _qcow2_specific(file: Any, header: Qcow2Header, filename: str) -> Info:
    data: Info = {
        "compat": "1.1",
        "compression-type": "zlib",
        "lazy-refcounts": bool(header.compatible_features & COMPAT_LAZY_REFCOUNTS),
    }
    bitmaps = _bitmap_infos(file, header, filename)
    if bitmaps is not None:
        data["bitmaps"] = bitmaps
    data["refcount-bits"] = header.refcount_bits
    data["corrupt"] = bool(header.incompatible_features & INCOMPAT_CORRUPT)
    data["extended-l2"] = False  # the subset refuses extended L2 images
    return data


# ---------------------------------------------------------------------------
# Internal snapshots and persistent bitmaps, as qemu reports them


def _snapshot_info(sn: Snapshot) -> Info:
    info: Info = {}
    if sn.icount is not None:
        info["icount"] = sn.icount
    info.update({
        "vm-clock-nsec": sn.vm_clock_nsec % 1_000_000_000,
        "name": sn.name,
        "date-sec": sn.date_sec,
        "date-nsec": sn.date_nsec,
        "vm-clock-sec": sn.vm_clock_nsec // 1_000_000_000,
        "id": sn.id,
        "vm-state-size": sn.vm_state_size,
    })
    return info


def _bitmap_infos(file: Any, header: Qcow2Header, filename: str) -> list[Info] | None:
    """The `bitmaps` list qemu shows; None when qemu would show none.

    qemu ignores the extension when the autoclear bit is clear (a program
    without bitmap support wrote the image)."""
    if header.extension(EXT_BITMAPS) is None:  # the usual case: no need to load the bitmap decoder
        return None
    from imgchain.formats.qcow2_bitmaps import (BME_FLAG_AUTO, BME_FLAG_IN_USE, bitmap_directory_entries,
                                                 find_bitmap_directory)
    where = find_bitmap_directory(filename, header)
    if where is None:
        return None
    directory = file.pread(where.offset, where.size)
    return [{
        "flags": [text for bit, text in ((BME_FLAG_IN_USE, "in-use"), (BME_FLAG_AUTO, "auto")) if bitmap.flags & bit],
        "name": bitmap.name,
        "granularity": bitmap.granularity,
    } for bitmap in bitmap_directory_entries(filename, directory, where.nb_bitmaps)]


# ---------------------------------------------------------------------------
# Human output


def size_to_str(value: int) -> str:
    """qemu's size_to_str: three significant digits and a binary suffix."""
    _, exp = math.frexp(value / (1000.0 / 1024.0))
    index = max(0, (exp - 1) // 10)
    return "%0.3g %sB" % (value / (1 << (index * 10)), _SIZE_SUFFIXES[index])


def human_info(info: Info | list[Info]) -> str:
    """`qemu-img info` human output; chain records are separated by a blank line."""
    records = info if isinstance(info, list) else [info]
    return "\n".join(_human_one(r) for r in records)


def _human_one(info: Info) -> str:
    actual = info.get("actual-size")
    lines = [
        f"image: {info['filename']}",
        f"file format: {info['format']}",
        f"virtual size: {size_to_str(info['virtual-size'])} ({info['virtual-size']} bytes)",
        f"disk size: {size_to_str(actual) if actual is not None else 'unavailable'}",
    ]
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if info.get("dirty-flag"):
        lines.append("cleanly shut down: no")
    lines += _human_backing(info)
    if "snapshots" in info:
        lines.append("Snapshot list:")
        lines.append(_snapshot_row(None))
        lines += [_snapshot_row(sn) for sn in info["snapshots"]]
    if "format-specific" in info:
        lines.append("Format specific information:")
        lines += _dump_value(1, info["format-specific"]["data"])
    return "".join(line + "\n" for line in lines)


def resolved_backing_path(full: str) -> str:
    """Where a backing file really is: the absolute path with every symlink
    followed (imgchain shows it so a user sees where an image points before
    trusting it; qemu-img shows the lexical `full-backing-filename`)."""
    return full if protocol_of(full) else os.path.realpath(full)


def _human_backing(info: Info) -> list[str]:
    lines = []
    if "backing-filename" in info:
        name, full = info["backing-filename"], info.get("full-backing-filename")
        if full is None:
            lines.append(f"backing file: {name} (cannot determine actual path)")
        elif resolved_backing_path(full) != name:
            lines.append(f"backing file: {name} (actual path: {resolved_backing_path(full)})")
        else:
            lines.append(f"backing file: {name}")
    if "backing-filename-format" in info:
        lines.append(f"backing file format: {info['backing-filename-format']}")
    return lines


def _snapshot_row(sn: Info | None) -> str:
    if sn is None:
        return "%-10s%-17s%8s%20s%13s%11s" % ("ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT")
    date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sn["date-sec"]))
    secs = sn["vm-clock-sec"]
    clock = "%02d:%02d:%02d.%03d" % (secs // 3600, secs // 60 % 60, secs % 60,
                                     sn["vm-clock-nsec"] // 1_000_000)
    icount = str(sn["icount"]) if "icount" in sn else ""
    return "%-9s %-16s %8s%20s%13s%11s" % (sn["id"], sn["name"], size_to_str(sn["vm-state-size"]),
                                          date, clock, icount)


def _dump_value(indent: int, value: Any) -> list[str]:
    """The nested `key: value` dump qemu uses for format-specific data."""
    items = (value.items() if isinstance(value, dict)
             else ((f"[{i}]", v) for i, v in enumerate(value)))
    lines = []
    for key, item in items:
        key = key.replace("-", " ")
        pad = " " * (indent * 4)
        if isinstance(item, (dict, list)):
            lines.append(f"{pad}{key}:")
            lines += _dump_value(indent + 1, item)
        else:
            lines.append(f"{pad}{key}: {_scalar(item)}")
    return lines


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
