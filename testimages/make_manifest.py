#!/usr/bin/env python3
"""Write testimages/manifest.json from the files in testimages/fixtures/.

Called at the end of make-fixtures.sh. For every fixture it records:
  format        "qcow2" or "raw" (what qemu-img info reports; cross-checked with the name)
  virtual_size  bytes (qemu-img info)
  backing       the backing name as stored in the qcow2 header, or null
  backing_format  content of the backing-format extension (0xE2792ACA), or null
  cluster_size  qcow2 cluster size, or null for raw
  file_size     length of the fixture file in bytes
  sha256        sha256 of the guest-visible content (qemu-img convert -O raw of the whole
                chain), or null when qemu cannot read the guest data
  qemu_check_rc exit code of `qemu-img check -f <format> <file>`
  notes         what the fixture is for
Deterministic: keys sorted, no timestamps, no absolute paths.
"""
import hashlib
import json
import os
import struct
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "fixtures")

NOTES = {
    "base.qcow2": "QCOW2-SUBSET.md 6.1 base: 64 KiB clusters, data at 0/1M/2M/33M, a discarded cluster (free cluster 7 inside the file).",
    "overlay.qcow2": "QCOW2-SUBSET.md 6.1 overlay of base.qcow2: NORMAL, ZERO_PLAIN (hiding base data), ZERO_ALLOC, a partial write (COW), a freed trailing cluster.",
    "raw-base.raw": "1 MiB sparse raw with 5 patterns (0x5a..0x5e) and holes; backing for raw-over/grow-over/nobackingfmt.",
    "raw-over.qcow2": "qcow2 overlay on raw-base.raw (-F raw): full-cluster write over a hole, zero cluster hiding base data, partial-cluster writes (COW from a raw backing), write in the last cluster.",
    "grow-over.qcow2": "2 MiB qcow2 overlay on the 1 MiB raw-base.raw: reads past the backing end are zeros; a write straddling the backing end and one cluster past it.",
    "chain/chain-base.qcow2": "Bottom of a 3-layer chain (4 MiB): patterns 0xa0..0xa3.",
    "chain/chain-mid.qcow2": "Middle layer; backing name 'chain-base.qcow2' is relative to chain/. Overlapping writes, write -z hiding base 0xa1 at 1M, partial writes.",
    "chain-top.qcow2": "Top layer in fixtures/; backing name 'chain/chain-mid.qcow2' (relative, in a subdirectory). Overlaps both lower layers, zero cluster hiding base data at 0.",
    "c512.qcow2": "cluster_size=512, 2 MiB, 512 scattered 512-byte writes: 64 L2 tables, several refcount blocks, no feature-table extension.",
    "c2m.qcow2": "cluster_size=2M (max), 8 MiB: two small writes in one data cluster and a ZERO_PLAIN cluster. File is large but sparse.",
    "c4k.qcow2": "cluster_size=4096: shows whether qemu writes the feature-name table at 4 KiB clusters.",
    "c8k.qcow2": "cluster_size=8192: shows whether qemu writes the feature-name table at 8 KiB clusters.",
    "compressed.qcow2": "qemu-img convert -c of a 1 MiB raw: zlib-compressed clusters, one incompressible cluster stored uncompressed, one half-compressible cluster.",
    "snapshot.qcow2": "One internal snapshot 'snap1' (nb_snapshots=1, refcount-2 clusters), then more writes (COW). Snapshot date normalized to 2024-01-01T00:00:00Z. Read-only in the subset.",
    "bitmaps.qcow2": "Persistent bitmaps bm0 (enabled, dirtied by writes) and bm1 (disabled): autoclear bit 0 + extension 0x23852875. Subset: read ok, refuse writes.",
    "lazy.qcow2": "lazy_refcounts=on (compatible bit 0), data written, cleanly closed (dirty bit clear).",
    "empty.qcow2": "Fresh 4 MiB image, no writes (no L2 tables).",
    "nobackingfmt.qcow2": "Overlay on raw-base.raw whose backing-format extension was removed by a python rewrite of cluster 0 (qemu probes the backing format).",
    "v2.qcow2": "REJECT: compat=0.10 (version 2 header, 72 bytes, no header_length).",
    "luks.qcow2": "REJECT: crypt_method=2 (LUKS, aes-128-cbc) with extension 0x0537BE77. Random LUKS fields normalized for determinism, so it can no longer be unlocked; qemu check rc is without a secret.",
    "extl2.qcow2": "REJECT: extended_l2=on (incompatible bit 4, 128-bit L2 entries, subcluster write at 1M+4k).",
    "datafile.qcow2": "REJECT: external data file 'datafile.data' (incompatible bit 2, extension 0x44415441).",
    "datafile.data": "Raw external data file of datafile.qcow2 (not a fixture on its own).",
    "zstd.qcow2": "REJECT: compression_type=zstd (incompatible bit 3, header byte 104 = 1), one zstd-compressed cluster at 0.",
}

# Fixtures whose guest data qemu cannot read without extra options
NO_SHA = {"luks.qcow2"}


def run(*args):
    # Run inside fixtures/ with relative names: qemu 7.2 resolves an external data_file
    # name relative to the current directory (backing names: relative to the image).
    return subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=FIX)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def qcow2_header(path):
    with open(path, "rb") as f:
        h = f.read(112)
        if h[:4] != b"QFI\xfb":
            return None
        version, bfo, bfs, cbits = struct.unpack(">IQII", h[4:24])
        info = {"cluster_size": 1 << cbits, "backing": None, "backing_format": None}
        if bfo:
            f.seek(bfo)
            info["backing"] = f.read(bfs).decode()
        if True:  # v2 has a fixed 72-byte header, extensions follow it
            hlen = struct.unpack(">I", h[100:104])[0] if version >= 3 else 72
            end = bfo if bfo else 1 << cbits
            f.seek(0)
            c0 = f.read(end)
            off = hlen
            while off + 8 <= end:
                magic, length = struct.unpack(">II", c0[off:off + 8])
                if magic == 0:
                    break
                if magic == 0xE2792ACA:
                    info["backing_format"] = c0[off + 8:off + 8 + length].decode()
                off += 8 + ((length + 7) & ~7)
        return info


def main():
    files = []
    for root, _dirs, names in os.walk(FIX):
        for n in names:
            files.append(os.path.relpath(os.path.join(root, n), FIX))
    files.sort()
    unknown = sorted(set(files) - set(NOTES))
    missing = sorted(set(NOTES) - set(files))
    if unknown or missing:
        sys.exit(f"make_manifest: no notes for {unknown}, missing files {missing}")

    manifest = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rel in files:
            path = os.path.join(FIX, rel)
            fmt = "qcow2" if rel.endswith(".qcow2") else "raw"
            r = run("qemu-img", "info", "--output=json", "-f", fmt, rel)
            if r.returncode != 0:
                sys.exit(f"qemu-img info {rel} failed: {r.stderr}")
            info = json.loads(r.stdout)
            assert info["format"] == fmt, (rel, info["format"])
            entry = {
                "format": fmt,
                "virtual_size": info["virtual-size"],
                "file_size": os.path.getsize(path),
                "backing": None,
                "backing_format": None,
                "cluster_size": None,
            }
            if fmt == "qcow2":
                hdr = qcow2_header(path)
                entry.update(hdr)
                assert entry["backing"] == info.get("backing-filename"), rel
            sha = None
            if rel not in NO_SHA:
                out = os.path.join(tmp, "guest.raw")
                r = run("qemu-img", "convert", "-f", fmt, "-O", "raw", rel, out)
                if r.returncode == 0:
                    sha = sha256_file(out)
                else:
                    print(f"make_manifest: convert {rel} failed: {r.stderr.strip()}", file=sys.stderr)
                if os.path.exists(out):
                    os.unlink(out)
            entry["sha256"] = sha
            entry["qemu_check_rc"] = run("qemu-img", "check", "-f", fmt, rel).returncode
            entry["notes"] = NOTES[rel]
            manifest[rel] = entry

    with open(os.path.join(HERE, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
