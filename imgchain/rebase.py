"""Changing an image's backing file (qemu-img rebase).

Unsafe mode (`-u`) rewrites only the header. Safe mode first copies into the
image every range it does not allocate itself where the old backing chain and
the new one differ, so the guest-visible content is the same before, during
and after; only then does it rewrite the header.
"""

from __future__ import annotations

import os

from .chain import close_chain, open_backing_chain, open_image, protocol_of, resolve_backing_name
from .errors import ImgchainError
from .extent import Status
from .node import Node

CHUNK = 1 << 20


def _new_backing_format(path: str, new: str, fmt: str | None) -> str | None:
    """The format to record for `new`: given, else detected, else an error."""
    if not new or fmt:
        return fmt or None
    resolved = resolve_backing_name(path, new)
    if protocol_of(new) or not os.path.exists(resolved):
        raise ImgchainError(f"Could not change the backing file to '{new}': "
                            f"backing format must be specified (-F)")
    node = open_image(resolved)
    try:
        return node.format_name
    finally:
        node.close()


def rebase(path: str, new: str, fmt: str | None = None, unsafe: bool = False,
           trust_backing: bool = False) -> None:
    """Make `new` (stored as given; "" for none) the backing file of `path`."""
    if unsafe:
        node = open_image(path, writable=True)
        try:
            _rewrite_header(node, new, _new_backing_format(path, new, fmt))
        finally:
            node.close()
        return
    top = open_backing_chain(path, writable=True, trust_backing=trust_backing)
    try:
        fmt = _new_backing_format(path, new, fmt)
        target = _open_new_backing(path, new, fmt, trust_backing)
        try:
            copy_differences(top, target)
        finally:
            if target is not None:
                close_chain(target)
        top.flush()
        _rewrite_header(top, new, fmt)
    finally:
        close_chain(top)


def _open_new_backing(path: str, new: str, fmt: str | None, trust_backing: bool) -> Node | None:
    if not new:
        return None
    resolved = resolve_backing_name(path, new)
    try:
        return open_backing_chain(resolved, False, fmt, trust_backing=trust_backing)
    except (ImgchainError, OSError) as exc:
        raise ImgchainError(f"Could not open new backing file '{resolved}': {exc}") from None


def _rewrite_header(node: Node, new: str, fmt: str | None) -> None:
    if node.format_name != "qcow2":
        raise ImgchainError(f"{node.filename}: Driver '{node.format_name}' does not support backing files")
    try:
        node.driver.change_backing_file(new or None, fmt)
    except ImgchainError as exc:
        raise ImgchainError(f"Could not change the backing file to '{new}': {exc}") from None


def copy_differences(top: Node, target: Node | None) -> None:
    """Copy into `top`, cluster by cluster, what its current backing shows
    and `target` does not, in every range `top` does not allocate."""
    step = top.driver.cluster_size or CHUNK
    for ext in top.driver.block_status(0, top.size):
        if ext.status is not Status.UNALLOCATED:
            continue
        for pos in range(ext.guest_offset, ext.end, CHUNK):
            n = min(CHUNK, ext.end - pos)
            _copy_chunk(top, target, pos, n, step)


def _copy_chunk(top: Node, target: Node | None, pos: int, n: int, step: int) -> None:
    old_zero = top.backing_node is None or top.backing_node.reads_as_zero(pos, n)
    new_zero = target is None or target.reads_as_zero(pos, n)
    if old_zero and new_zero:
        return
    old = top.read_below(pos, n)
    new = target.read(pos, n) if target is not None else bytes(n)
    if old == new:
        return
    for i in range(0, n, step):
        a, b = old[i:i + step], new[i:i + step]
        if a != b:
            top.write(pos + i, a)
