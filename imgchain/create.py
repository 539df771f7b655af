"""Creating images (qemu-img create): qcow2 of the subset, or raw.

A new qcow2 image has QEMU's layout: cluster 0 header, then the refcount
table, the refcount blocks and the L1 table, all counted once; the file ends
right after the L1 table. The backing name is stored as given and the backing
format is always recorded (detected from the backing when not given).
"""

from __future__ import annotations

import os
from array import array

from imgchain.formats.qcow2_header import Qcow2Header, build_cluster0
from imgchain.formats.qcow2_tables import Geometry, encode_refcount16, encode_u64_table

from .chain import open_backing_chain, protocol_of, resolve_backing_name
from .errors import ImgchainError

DEFAULT_CLUSTER_SIZE = 65536


def _layout(geo: Geometry, l1_clusters: int) -> tuple[int, int]:
    """(refcount table clusters, refcount blocks) that cover all initial metadata."""
    table, blocks = 1, 1
    while True:
        used = 1 + table + blocks + l1_clusters
        if blocks * geo.refblock_entries >= used and table * geo.cluster_size // 8 >= blocks:
            return table, blocks
        if blocks * geo.refblock_entries < used:
            blocks += 1
        else:
            table += 1


def create_qcow2(path: str, size: int, cluster_size: int = DEFAULT_CLUSTER_SIZE,
                 backing_file: str | None = None, backing_format: str | None = None) -> None:
    """Write a new, empty qcow2 image at `path` (overwriting any file there)."""
    if cluster_size & (cluster_size - 1) or not 512 <= cluster_size <= 2 * 1024 * 1024:
        raise ImgchainError(f"{path}: Cluster size must be a power of two between 512 and 2048k")
    if size % 512:
        raise ImgchainError(f"{path}: Image size must be a multiple of 512 bytes")
    geo = Geometry(cluster_size.bit_length() - 1)
    l1_size = geo.l1_size_for(size)
    if l1_size * 8 > 32 * 1024 * 1024:
        raise ImgchainError(f"{path}: image size {size} is too large for cluster size {cluster_size}")
    l1_clusters = geo.clusters(l1_size * 8)
    table_clusters, blocks = _layout(geo, l1_clusters)
    cs = cluster_size
    header = Qcow2Header(
        cluster_bits=geo.cluster_bits, size=size, l1_size=l1_size,
        l1_table_offset=(1 + table_clusters + blocks) * cs,
        refcount_table_offset=cs, refcount_table_clusters=table_clusters,
        backing_file=backing_file or None, backing_format=backing_format if backing_file else None,
    )
    cluster0 = build_cluster0(path, header)
    reftable = array("Q", [(1 + table_clusters + j) * cs for j in range(blocks)])
    reftable.extend([0] * (table_clusters * cs // 8 - blocks))
    used = 1 + table_clusters + blocks + l1_clusters
    counts = array("H", [1] * used + [0] * (blocks * geo.refblock_entries - used))
    with open(path, "wb") as f:
        f.write(cluster0)
        f.write(encode_u64_table(reftable))
        f.write(encode_refcount16(counts))
        f.write(bytes(l1_size * 8))
        f.flush()
        os.fsync(f.fileno())


def create_raw(path: str, size: int) -> None:
    """Write a new sparse raw image of `size` bytes."""
    with open(path, "wb") as f:
        f.truncate(size)
        os.fsync(f.fileno())


def backing_size_and_format(path: str, backing_file: str, backing_format: str | None) -> tuple[int, str]:
    """Open the backing chain named by `backing_file` (relative to `path`'s
    directory) and return its virtual size and format."""
    if protocol_of(backing_file) and not os.path.isabs(backing_file):
        raise ImgchainError(f"Could not open backing file '{backing_file}': "
                            f"Unknown protocol '{protocol_of(backing_file)}'")
    resolved = resolve_backing_name(path, backing_file)
    try:
        node = open_backing_chain(resolved, False, backing_format)
    except ImgchainError as exc:
        raise ImgchainError(f"Could not open backing image '{resolved}': {exc}") from None
    try:
        return node.size, node.format_name
    finally:
        for n in node.chain():
            n.close()


def create_image(path: str, fmt: str = "qcow2", size: int | None = None,
                 backing_file: str | None = None, backing_format: str | None = None,
                 cluster_size: int = DEFAULT_CLUSTER_SIZE) -> dict[str, object]:
    """qemu-img create: returns the options used (for the "Formatting" line)."""
    if fmt not in ("qcow2", "raw"):
        raise ImgchainError(f"Unknown file format '{fmt}' (supported: qcow2, raw)")
    if backing_file:
        if fmt == "raw":
            raise ImgchainError("Backing file not supported for file format 'raw'")
        bsize, bfmt = backing_size_and_format(path, backing_file, backing_format)
        backing_format = backing_format or bfmt
        size = bsize if size is None else size
    if size is None:
        raise ImgchainError("Image creation needs a size parameter")
    if fmt == "raw":
        create_raw(path, size)
        return {"fmt": "raw", "size": size}
    create_qcow2(path, size, cluster_size, backing_file, backing_format)
    opts: dict[str, object] = {"fmt": "qcow2", "cluster_size": cluster_size, "size": size}
    if backing_file:
        opts.update(backing_file=backing_file, backing_fmt=backing_format)
    return opts

