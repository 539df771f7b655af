"""Image information: what `qemu-img info` (7.2) reports, as data and as text.

`image_info` opens one image (or, with `backing_chain`, each image of the
chain in turn, top first) without its backing, the way qemu-img does with
BDRV_O_NO_BACKING, so an overlay whose backing file is missing still has
info. The keys and their presence follow qemu's `bdrv_query_image_info` and
`qcow2_get_specific_info`; `human_info` renders them the way
`bdrv_image_info_dump` prints them. Dict insertion order follows the order
qemu-img 7.2 prints the keys in, so a caller that dumps the dict keeps
qemu's layout.

This module only reads. The small snapshot-table and bitmap-directory
decoders below are read-only views for reporting; the subset never writes
either structure.
"""

from __future__ import annotations

import math
import os
import struct
import time
from typing import Any

from imgchain.formats.qcow2_header import (
    AUTOCLEAR_BITMAPS,
    COMPAT_LAZY_REFCOUNTS,
    EXT_BITMAPS,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    BitmapsExtension,
    Qcow2Header,
)

from .chain import open_image, protocol_of
from .errors import BackingError, ImgchainError
from .locks import ImageLockedError
from .node import Node

Info = dict[str, Any]

SECTOR = 512
_SIZE_SUFFIXES = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")
_NO_ICOUNT = (1 << 64) - 1
_BITMAP_FLAGS = ((1 << 0, "in-use"), (1 << 1, "auto"))  # BME_FLAG_IN_USE, BME_FLAG_AUTO


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
        info["snapshots"] = [_snapshot_info(s) for s in read_snapshots(driver.file, header)]  # type: ignore[attr-defined]
    info["virtual-size"] = virtual_size(node)
    info["filename"] = node.filename
    if header is not None:
        info["cluster-size"] = header.cluster_size
    info["format"] = node.format_name
    info["actual-size"] = driver.file.allocated_bytes()  # type: ignore[attr-defined]
    if header is not None:
        info["format-specific"] = {"type": "qcow2", "data": _qcow2_specific(driver.file, header)}  # type: ignore[attr-defined]
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


def _qcow2_specific(file: Any, header: Qcow2Header) -> Info:
    data: Info = {
        "compat": "1.1",
        "compression-type": "zlib",
        "lazy-refcounts": bool(header.compatible_features & COMPAT_LAZY_REFCOUNTS),
    }
    bitmaps = _bitmap_infos(file, header)
    if bitmaps is not None:
        data["bitmaps"] = bitmaps
    data["refcount-bits"] = header.refcount_bits
    data["corrupt"] = bool(header.incompatible_features & INCOMPAT_CORRUPT)
    data["extended-l2"] = False  # the subset refuses extended L2 images
    return data


# ---------------------------------------------------------------------------
# Internal snapshots (qcow2 spec "Snapshot table"), read-only

_SNAPSHOT_HEAD = struct.Struct(">QIHHIIQII")  # 40 bytes


def read_snapshots(file: Any, header: Qcow2Header) -> list[dict[str, int | str]]:
    """Decode the snapshot table: id, name, dates, clock, VM state size, icount."""
    out: list[dict[str, int | str]] = []
    offset = header.snapshots_offset
    for _ in range(header.nb_snapshots):
        offset = -(-offset // 8) * 8
        head = file.pread(offset, _SNAPSHOT_HEAD.size)
        (_l1_off, _l1_size, id_len, name_len, date_sec, date_nsec, vm_clock,
         vm_state, extra_len) = _SNAPSHOT_HEAD.unpack(head)
        offset += _SNAPSHOT_HEAD.size
        rest = file.pread(offset, extra_len + id_len + name_len)
        extra = rest[:extra_len]
        if extra_len >= 8:
            vm_state = int.from_bytes(extra[0:8], "big")
        icount = int.from_bytes(extra[16:24], "big") if extra_len >= 24 else _NO_ICOUNT
        out.append({
            "id": rest[extra_len:extra_len + id_len].decode("utf-8", "replace"),
            "name": rest[extra_len + id_len:].decode("utf-8", "replace"),
            "date_sec": date_sec, "date_nsec": date_nsec, "vm_clock_nsec": vm_clock,
            "vm_state_size": vm_state, "icount": icount,
        })
        offset += len(rest)
    return out


def _snapshot_info(sn: dict[str, int | str]) -> Info:
    clock = int(sn["vm_clock_nsec"])
    info: Info = {}
    if sn["icount"] != _NO_ICOUNT:
        info["icount"] = sn["icount"]
    info.update({
        "vm-clock-nsec": clock % 1_000_000_000,
        "name": sn["name"],
        "date-sec": sn["date_sec"],
        "date-nsec": sn["date_nsec"],
        "vm-clock-sec": clock // 1_000_000_000,
        "id": sn["id"],
        "vm-state-size": sn["vm_state_size"],
    })
    return info


# ---------------------------------------------------------------------------
# Persistent bitmaps (qcow2 spec "Bitmaps extension"), read-only

_BITMAP_ENTRY = struct.Struct(">QIIBBHI")  # 24 bytes


def _bitmap_infos(file: Any, header: Qcow2Header) -> list[Info] | None:
    """The `bitmaps` list qemu shows; None when qemu would show none.

    qemu ignores the extension when the autoclear bit is clear (a program
    without bitmap support wrote the image)."""
    ext = header.extension(EXT_BITMAPS)
    if ext is None or not header.autoclear_features & AUTOCLEAR_BITMAPS:
        return None
    fields = BitmapsExtension.parse(ext.data)
    directory = file.pread(fields.bitmap_directory_offset, fields.bitmap_directory_size)
    out: list[Info] = []
    pos = 0
    for _ in range(fields.nb_bitmaps):
        _table, _size, flags, _type, gran_bits, name_len, extra_len = \
            _BITMAP_ENTRY.unpack_from(directory, pos)
        name_at = pos + _BITMAP_ENTRY.size + extra_len
        name = directory[name_at:name_at + name_len].decode("utf-8", "replace")
        out.append({
            "flags": [text for bit, text in _BITMAP_FLAGS if flags & bit],
            "name": name,
            "granularity": 1 << gran_bits,
        })
        pos = -(-(name_at + name_len) // 8) * 8
    return out


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


def _human_backing(info: Info) -> list[str]:
    lines = []
    if "backing-filename" in info:
        name, full = info["backing-filename"], info.get("full-backing-filename")
        if full is None:
            lines.append(f"backing file: {name} (cannot determine actual path)")
        elif full != name:
            lines.append(f"backing file: {name} (actual path: {full})")
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
