"""qcow2 v3 cluster 0: the header, its extensions and the backing file name.

Parses the header and extension area with `construct` into a `Qcow2Header`
value, validates it against the subset (`QCOW2-SUBSET.md` §0, §1, §4), and
builds cluster 0 back in QEMU's layout (header, backing format, feature table,
preserved unknown extensions, end marker, name). It only sees bytes: the
caller reads cluster 0 and writes what `build_cluster0` returns.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from construct import Adapter, Bytes, Const, Int8ub, Int32ub, Int64ub, Struct

from .errors import CorruptImage, NotQcow2, ReadOnlyImage, UnsupportedFeature

HEADER_V3_SIZE = 104
HEADER_QEMU_SIZE = 112  # qemu 7.2: compression_type + 7 pad bytes
MAX_BACKING_NAME = 1023
MAX_BACKING_FORMAT = 15
MIN_CLUSTER_BITS, MAX_CLUSTER_BITS = 9, 21
MAX_L1_BYTES = 32 * 1024 * 1024
MAX_REFTABLE_BYTES = 8 * 1024 * 1024

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

# (type, bit, name) exactly as qemu 7.2 writes its feature name table.
QEMU_FEATURES: tuple[tuple[int, int, str], ...] = (
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
)

HeaderV3 = Struct(
    "magic" / Const(b"QFI\xfb"),
    "version" / Int32ub,
    "backing_file_offset" / Int64ub,
    "backing_file_size" / Int32ub,
    "cluster_bits" / Int32ub,
    "size" / Int64ub,
    "crypt_method" / Int32ub,
    "l1_size" / Int32ub,
    "l1_table_offset" / Int64ub,
    "refcount_table_offset" / Int64ub,
    "refcount_table_clusters" / Int32ub,
    "nb_snapshots" / Int32ub,
    "snapshots_offset" / Int64ub,
    "incompatible_features" / Int64ub,
    "compatible_features" / Int64ub,
    "autoclear_features" / Int64ub,
    "refcount_order" / Int32ub,
    "header_length" / Int32ub,
)
assert HeaderV3.sizeof() == HEADER_V3_SIZE

ExtensionHead = Struct("magic" / Int32ub, "length" / Int32ub)
class _FeatureName(Adapter):
    """A NUL-padded name; bytes that are not ASCII read as U+FFFD (a hostile
    image must not make the header unreadable), names built are ASCII."""

    def _decode(self, obj: bytes, context: object, path: str) -> str:
        return obj.split(b"\0", 1)[0].decode("ascii", "replace")

    def _encode(self, obj: str, context: object, path: str) -> bytes:
        return obj.encode("ascii").ljust(46, b"\0")


FeatureEntry = Struct("type" / Int8ub, "bit" / Int8ub, "name" / _FeatureName(Bytes(46)))
BitmapsExtension = Struct(
    "nb_bitmaps" / Int32ub,
    "reserved" / Int32ub,
    "bitmap_directory_size" / Int64ub,
    "bitmap_directory_offset" / Int64ub,
)
FEATURE_ENTRY_SIZE = FeatureEntry.sizeof()


@dataclass
class Extension:
    """One header extension kept in file order (unknown ones byte-exact)."""

    magic: int
    data: bytes


@dataclass
class Qcow2Header:
    """The decoded contents of cluster 0."""

    cluster_bits: int
    size: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    version: int = 3
    crypt_method: int = 0
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = HEADER_QEMU_SIZE
    compression_type: int = 0
    extra_fields: bytes = b""
    backing_file: str | None = None
    backing_format: str | None = None
    extensions: list[Extension] = field(default_factory=list)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    def extension(self, magic: int) -> Extension | None:
        """The extension with this magic, if the image has one."""
        return next((e for e in self.extensions if e.magic == magic), None)

    def feature_names(self) -> dict[tuple[int, int], str]:
        """Feature names from the image's own table, else qemu's."""
        names = {(t, b): n for t, b, n in QEMU_FEATURES}
        table = self.extension(EXT_FEATURE_TABLE)
        if table is not None:
            for i in range(len(table.data) // FEATURE_ENTRY_SIZE):
                entry = FeatureEntry.parse(table.data[i * FEATURE_ENTRY_SIZE:])
                names[(entry.type, entry.bit)] = entry.name
        return names

    def replace(self, **changes: object) -> "Qcow2Header":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# Parsing


def parse_header(filename: str, data: bytes) -> Qcow2Header:
    """Decode cluster 0 (or at least its first `header_length` bytes plus the
    extension area) into a `Qcow2Header`, checking every field the subset
    relies on. Raises a `FormatError` subclass naming `filename`."""
    if len(data) < 8 or data[:4] != b"QFI\xfb":
        raise NotQcow2(filename, "Image is not in qcow2 format")
    version = int.from_bytes(data[4:8], "big")
    if version == 2:
        raise UnsupportedFeature(
            filename, "qcow2 v2 unsupported; convert with `qemu-img amend -o compat=1.1`")
    if version != 3:
        raise UnsupportedFeature(filename, f"Unsupported qcow2 version {version}")
    if len(data) < HEADER_V3_SIZE:
        raise CorruptImage(filename, "qcow2 header too short")
    raw = HeaderV3.parse(data)
    _check_geometry(filename, raw)
    cs = 1 << raw.cluster_bits
    if len(data) < min(cs, _ext_end(raw, cs)):
        raise CorruptImage(filename, "qcow2 header too short")
    header = Qcow2Header(
        **{k: raw[k] for k in _HEADER_FIELDS},
        compression_type=data[104] if raw.header_length > 104 else 0,
        extra_fields=bytes(data[HEADER_QEMU_SIZE:raw.header_length]),
    )
    header.extensions = _parse_extensions(filename, data, raw.header_length, _ext_end(raw, cs))
    fmt = header.extension(EXT_BACKING_FORMAT)
    if fmt is not None:
        header.extensions.remove(fmt)
        header.backing_format = fmt.data.decode("ascii", "replace")
    header.backing_file = _parse_backing_name(filename, data, raw, cs)
    _check_features(filename, header)
    return header


_HEADER_FIELDS = (
    "version", "cluster_bits", "size", "crypt_method", "l1_size", "l1_table_offset",
    "refcount_table_offset", "refcount_table_clusters", "nb_snapshots", "snapshots_offset",
    "incompatible_features", "compatible_features", "autoclear_features",
    "refcount_order", "header_length",
)


def _ext_end(raw: object, cs: int) -> int:
    off = raw.backing_file_offset  # type: ignore[attr-defined]
    return off if off else cs


def _check_geometry(filename: str, raw: object) -> None:
    bits = raw.cluster_bits  # type: ignore[attr-defined]
    if not MIN_CLUSTER_BITS <= bits <= MAX_CLUSTER_BITS:
        raise UnsupportedFeature(filename, f"Unsupported cluster size: 2^{bits}")
    cs = 1 << bits
    hlen = raw.header_length  # type: ignore[attr-defined]
    if hlen < HEADER_V3_SIZE:
        raise CorruptImage(filename, "qcow2 header too short")
    if hlen > cs:
        raise CorruptImage(filename, "qcow2 header exceeds cluster size")
    if hlen % 8:
        raise CorruptImage(filename, f"qcow2 header length {hlen} is not a multiple of 8")
    if raw.backing_file_offset > cs:  # type: ignore[attr-defined]
        raise CorruptImage(filename, "Invalid backing file offset")
    if raw.refcount_order > 6:  # type: ignore[attr-defined]
        raise CorruptImage(
            filename, "Reference count entry width too large; may not exceed 64 bits")


def _parse_extensions(filename: str, data: bytes, start: int, end: int) -> list[Extension]:
    # ref: qcow2_read_extensions
    exts: list[Extension] = []
    offset = start
    while offset < end:
        if offset + 8 > end:
            raise CorruptImage(filename, "Header extension too large")
        head = ExtensionHead.parse(data[offset:offset + 8])
        offset += 8
        if head.length > end - offset:
            raise CorruptImage(filename, "Header extension too large")
        if head.magic == EXT_END:
            break
        if any(e.magic == head.magic for e in exts):
            raise CorruptImage(filename, f"duplicate header extension 0x{head.magic:08x}")
        payload = bytes(data[offset:offset + head.length])
        if head.magic == EXT_BACKING_FORMAT and len(payload) > MAX_BACKING_FORMAT:
            raise CorruptImage(
                filename, f"ext_backing_format: len={len(payload)} too large (>=16)")
        exts.append(Extension(head.magic, payload))
        offset += (head.length + 7) & ~7
    return exts


def _parse_backing_name(filename: str, data: bytes, raw: object, cs: int) -> str | None:
    off = raw.backing_file_offset  # type: ignore[attr-defined]
    size = raw.backing_file_size  # type: ignore[attr-defined]
    if not off:
        return None
    if size > MAX_BACKING_NAME or size > cs - off:
        raise CorruptImage(filename, "Backing file name too long")
    name = bytes(data[off:off + size])
    if b"\0" in name:
        raise CorruptImage(filename, "backing file name contains a NUL byte")
    try:
        return name.decode("utf-8")
    except UnicodeDecodeError:
        raise CorruptImage(filename, "backing file name is not valid UTF-8") from None


def _check_features(filename: str, h: Qcow2Header) -> None:
    """Refuse what the subset cannot read at all (§0)."""
    if h.crypt_method:
        kind = {1: "AES", 2: "LUKS"}.get(h.crypt_method, f"method {h.crypt_method}")
        raise UnsupportedFeature(filename, f"encrypted images are not supported ({kind})")
    incompat = h.incompatible_features
    names = h.feature_names()
    for bit, what in ((INCOMPAT_DATA_FILE, "external data file"),
                      (INCOMPAT_EXTL2, "extended L2"),
                      (INCOMPAT_COMPRESSION, "compression type")):
        if incompat & bit:
            raise UnsupportedFeature(filename, f"unsupported qcow2 feature: {what}")
    unknown = incompat & ~0x1F
    if unknown:
        named = [names[(0, b)] for b in range(64) if unknown >> b & 1 and (0, b) in names]
        parts = [", ".join(named)] if named else []
        rest = unknown & ~sum(1 << b for b in range(64) if (0, b) in names)
        if rest:
            parts.append(f"Unknown incompatible feature: {rest:x}")
        raise UnsupportedFeature(filename, "Unsupported qcow2 feature(s): " + ", ".join(parts))
    if h.extension(EXT_DATA_FILE) is not None:
        raise UnsupportedFeature(filename, "unsupported qcow2 feature: external data file")
    if h.extension(EXT_CRYPTO) is not None:
        raise UnsupportedFeature(filename, "encrypted images are not supported (crypto header)")
    if h.compression_type:
        raise CorruptImage(filename, "compression type set without its incompatible feature bit")


def check_writable(filename: str, h: Qcow2Header) -> None:
    """Refuse a read-write open of an image the subset may only read (§0, §1.3, §1.4)."""
    if h.incompatible_features & INCOMPAT_CORRUPT:
        raise ReadOnlyImage(filename, "qcow2: Image is corrupt; cannot be opened read/write")
    if h.incompatible_features & INCOMPAT_DIRTY:
        raise ReadOnlyImage(filename, "image dirty, run `qemu-img check -r all`")
    if h.nb_snapshots:
        raise ReadOnlyImage(
            filename, f"has {h.nb_snapshots} internal snapshot(s); writes are not supported")
    if h.extension(EXT_BITMAPS) is not None:
        raise ReadOnlyImage(
            filename, "has persistent bitmaps; remove with `qemu-img bitmap --remove`")
    if h.refcount_order != 4:
        raise ReadOnlyImage(
            filename, f"refcount width {h.refcount_bits} bits; writes need 16-bit refcounts")


def check_tables(filename: str, h: Qcow2Header, file_size: int) -> None:
    """Validate the table pointers against each other and the file (qcow2_do_open)."""
    cs = h.cluster_size
    limit = -(-file_size // cs) * cs  # the last cluster may be partly written
    if h.refcount_table_clusters == 0:
        raise CorruptImage(filename, "Image does not contain a reference count table")
    if h.refcount_table_clusters * cs > MAX_REFTABLE_BYTES:
        raise CorruptImage(filename, "Reference count table too large")
    if h.refcount_table_offset % cs:
        raise CorruptImage(filename, "Invalid reference count table offset")
    if h.refcount_table_offset + h.refcount_table_clusters * cs > limit:
        raise CorruptImage(filename, "reference count table lies outside the file")
    if h.l1_size * 8 > MAX_L1_BYTES:
        raise CorruptImage(filename, "Active L1 table too large")
    l2_span = cs * (cs // 8)
    if h.l1_size < -(-h.size // l2_span):
        raise CorruptImage(filename, "L1 table is too small")
    if h.l1_table_offset % cs:
        raise CorruptImage(filename, "Invalid L1 table offset")
    if h.l1_size and h.l1_table_offset + h.l1_size * 8 > limit:
        raise CorruptImage(filename, "L1 table lies outside the file")
    if h.nb_snapshots and h.snapshots_offset % cs:
        raise CorruptImage(filename, "Invalid snapshot table offset")


# ---------------------------------------------------------------------------
# Building


def feature_table_payload() -> bytes:
    """The 8-entry feature name table qemu writes."""
    return b"".join(FeatureEntry.build(dict(type=t, bit=b, name=n)) for t, b, n in QEMU_FEATURES)


def _ext_bytes(magic: int, data: bytes) -> bytes:
    pad = (-len(data)) % 8
    return ExtensionHead.build(dict(magic=magic, length=len(data))) + data + b"\0" * pad


def build_cluster0(filename: str, h: Qcow2Header) -> bytes:
    """Build all of cluster 0 in QEMU's layout (ref: qcow2_update_header).

    Raises `CorruptImage` ("No space left in the file header") when the
    extensions and the backing name do not fit, before anything is written."""
    cs = h.cluster_size
    name = (h.backing_file or "").encode("utf-8")
    if len(name) > MAX_BACKING_NAME:
        raise CorruptImage(filename, f"backing file name too long ({len(name)} > 1023 bytes)")
    exts = b""
    if name and h.backing_format:
        exts += _ext_bytes(EXT_BACKING_FORMAT, h.backing_format.encode("ascii"))
    body = [e for e in h.extensions if e.magic != EXT_FEATURE_TABLE]
    if cs > 4096 or h.extension(EXT_FEATURE_TABLE) is not None:
        exts += _ext_bytes(EXT_FEATURE_TABLE, feature_table_payload())
    exts += b"".join(_ext_bytes(e.magic, e.data) for e in body)
    exts += _ext_bytes(EXT_END, b"")
    name_offset = h.header_length + len(exts)
    if name_offset + len(name) > cs:
        raise CorruptImage(filename, "No space left in the file header")
    fixed = HeaderV3.build(dict(
        magic=b"QFI\xfb",
        **{k: getattr(h, k) for k in _HEADER_FIELDS},
        backing_file_offset=name_offset if name else 0,
        backing_file_size=len(name),
    ))
    tail = b""
    if h.header_length > HEADER_V3_SIZE:
        tail = bytes([h.compression_type]) + b"\0" * 7 + h.extra_fields
        tail = tail[:h.header_length - HEADER_V3_SIZE]
    out = fixed + tail + exts + name
    return out + b"\0" * (cs - len(out))
