#!/usr/bin/env bash
# Regenerate every test fixture in testimages/fixtures/ with real qemu-img / qemu-io,
# then rewrite testimages/manifest.json (via make_manifest.py).
#
# Deterministic: two runs give byte-identical files (checked with sha256sum).
# Two fixtures need a tiny python byte patch for that (see normalize_* below):
#   snapshot.qcow2  the snapshot's date_sec/date_nsec are set to a fixed date
#   luks.qcow2      the random LUKS fields (uuid, salts, digest, key material) and the
#                   benchmarked PBKDF2 iteration counts are overwritten with constants
# and one fixture is built by a python rewrite of cluster 0:
#   nobackingfmt.qcow2  the backing-format extension (0xE2792ACA) is removed
#
# Tested with qemu-img / qemu-io 7.2.22 (Debian 12 qemu-utils).
set -euo pipefail
cd "$(dirname "$0")"

export LC_ALL=C TZ=UTC
umask 022

ver=$(qemu-img --version | head -n1)
case "$ver" in
    "qemu-img version 7.2."*) ;;
    *) echo "warning: fixtures were made with qemu-img 7.2.22; this is: $ver" >&2 ;;
esac

OUT=fixtures
rm -rf "$OUT"
mkdir -p "$OUT/chain"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

q() { qemu-img "$@" >/dev/null; }          # qemu-img, quiet on success
io() { qemu-io "$@" >/dev/null; }          # qemu-io, quiet on success (fails loudly)

cd "$OUT"

# ---------------------------------------------------------------------------------
# base.qcow2 / overlay.qcow2: exactly QCOW2-SUBSET.md section 6.1
# ---------------------------------------------------------------------------------
q create -f qcow2 -o cluster_size=65536 base.qcow2 64M
io -c 'write -P 0xaa 0 64k' -c 'write -P 0xbb 1M 128k' -c 'write -P 0xcc 2M 64k' \
   -c 'write -P 0xdd 33M 64k' -c 'discard 1088k 64k' base.qcow2
q create -f qcow2 -o cluster_size=65536 -b base.qcow2 -F qcow2 overlay.qcow2
io -c 'write -P 0x11 64k 64k' -c 'write -z 1M 64k' -c 'discard 2M 64k' -c 'write -P 0x22 3M 4k' \
   -c 'write -P 0x33 4M 128k' -c 'write -z 4M 64k' -c 'write -z -u 4160k 64k' -c 'write -z 33M 64k' overlay.qcow2

# ---------------------------------------------------------------------------------
# raw-base.raw (1 MiB, sparse) and raw-over.qcow2 (-F raw)
# ---------------------------------------------------------------------------------
q create -f raw raw-base.raw 1M
io -f raw -c 'write -P 0x5a 0 64k' -c 'write -P 0x5b 128k 64k' -c 'write -P 0x5c 300k 10k' \
   -c 'write -P 0x5d 512k 128k' -c 'write -P 0x5e 1020k 4k' raw-base.raw
# (192k..300k, 310k..512k, 640k..1020k stay holes)
q create -f qcow2 -o cluster_size=65536 -b raw-base.raw -F raw raw-over.qcow2
io -c 'write -P 0x61 64k 64k' \
   -c 'write -z 128k 64k' \
   -c 'write -P 0x62 260k 8k' \
   -c 'write -P 0x63 576k 4k' \
   -c 'write -P 0x64 1016k 8k' \
   raw-over.qcow2
#  64k: full cluster over a hole in the base
# 128k: zero cluster hiding base 0x5b
# 260k: partial write, COW of a cluster holding base 0x5c (300k..310k) and holes
# 576k: partial write inside base 0x5d (COW of base data around it)
# 1016k: 8k in the last cluster, covering the last base pattern (0x5e at 1020k..1024k)

# Extra: overlay whose virtual size (2 MiB) exceeds its raw backing (1 MiB)
q create -f qcow2 -o cluster_size=65536 -b raw-base.raw -F raw grow-over.qcow2 2M
io -c 'write -P 0x71 1M 64k' -c 'write -P 0x72 1016k 16k' grow-over.qcow2
# 1M: one cluster past the end of the backing; 1016k: 8k inside + 8k past the backing end

# ---------------------------------------------------------------------------------
# three-layer chain: chain/chain-base.qcow2 <- chain/chain-mid.qcow2 <- chain-top.qcow2
# mid stores "chain-base.qcow2" (relative to chain/), top stores "chain/chain-mid.qcow2"
# ---------------------------------------------------------------------------------
q create -f qcow2 -o cluster_size=65536 chain/chain-base.qcow2 4M
io -c 'write -P 0xa0 0 256k' -c 'write -P 0xa1 1M 64k' -c 'write -P 0xa2 2M 128k' \
   -c 'write -P 0xa3 3076k 8k' chain/chain-base.qcow2
q create -f qcow2 -o cluster_size=65536 -b chain-base.qcow2 -F qcow2 chain/chain-mid.qcow2
io -c 'write -P 0xb0 128k 256k' -c 'write -z 1M 64k' -c 'write -P 0xb1 2112k 4k' \
   -c 'write -P 0xb2 3072k 6k' chain/chain-mid.qcow2
# 128k..384k overlaps base 0xa0; write -z hides base 0xa1; 2112k partial over base 0xa2;
# 3072k..3078k overlaps the start of base 0xa3 (3076k..3084k)
q create -f qcow2 -o cluster_size=65536 -b chain/chain-mid.qcow2 -F qcow2 chain-top.qcow2
io -c 'write -P 0xc0 192k 64k' -c 'write -P 0xc1 2108k 8k' -c 'write -P 0xc2 3080k 2k' \
   -c 'write -z 0 64k' -c 'write -P 0xc3 1028k 4k' chain-top.qcow2
# 192k overlaps mid 0xb0 (and base 0xa0 under it); 2108k..2116k straddles mid 0xb1;
# 3080k partial over base 0xa3 inside mid's 3M cluster; write -z hides base 0xa0 at 0; 1028k partial inside mid's zero cluster

# ---------------------------------------------------------------------------------
# cluster sizes
# ---------------------------------------------------------------------------------
# c512: 512-byte clusters, 2 MiB; one 512-byte write every 4 KiB (512 data clusters +
# 64 L2 tables) so the refcounts need several 512-byte refcount blocks (256 clusters each)
q create -f qcow2 -o cluster_size=512 c512.qcow2 2M
args=()
for ((i = 0; i < 512; i++)); do
    args+=(-c "write -P $(( (i * 7 + 1) % 256 )) $(( i * 4096 + (i % 8) * 512 )) 512")
done
io "${args[@]}" c512.qcow2

# c2m: 2 MiB clusters, 8 MiB; every cluster is 2 MiB of file, so keep to one data cluster
q create -f qcow2 -o cluster_size=2M c2m.qcow2 8M
io -c 'write -P 0xe1 0 4k' -c 'write -P 0xe2 1049088 1536' -c 'write -z 4M 2M' c2m.qcow2

q create -f qcow2 -o cluster_size=4096 c4k.qcow2 4M
io -c 'write -P 0x41 0 8k' -c 'write -P 0x42 1049088 3k' c4k.qcow2
q create -f qcow2 -o cluster_size=8192 c8k.qcow2 4M
io -c 'write -P 0x81 0 8k' -c 'write -P 0x82 1049088 3k' c8k.qcow2

# ---------------------------------------------------------------------------------
# compressed.qcow2: qemu-img convert -c of a 1 MiB raw with patterns, one incompressible
# cluster (stays uncompressed) and one half-compressible cluster
# ---------------------------------------------------------------------------------
q create -f raw "$TMP/csrc.raw" 1M
io -f raw -c 'write -P 0x31 0 64k' -c 'write -P 0x32 100k 30k' -c 'write -P 0x33 900k 124k' "$TMP/csrc.raw"
python3 - "$TMP/csrc.raw" <<'EOF'
import hashlib, sys
def prng(n, seed):
    out, i = bytearray(), 0
    while len(out) < n:
        out += hashlib.sha256(b"%s-%d" % (seed, i)).digest(); i += 1
    return bytes(out[:n])
with open(sys.argv[1], "r+b") as f:
    f.seek(256 * 1024); f.write(prng(65536, b"incompressible"))          # cluster 4
    f.seek(384 * 1024); f.write(prng(16384, b"half") + b"\x77" * 16384)  # cluster 6, first half
EOF
q convert -c -O qcow2 -o cluster_size=65536 "$TMP/csrc.raw" compressed.qcow2

# ---------------------------------------------------------------------------------
# internal snapshot, bitmaps, lazy refcounts, empty, no backing-format extension
# ---------------------------------------------------------------------------------
q create -f qcow2 -o cluster_size=65536 snapshot.qcow2 4M
io -c 'write -P 0x51 0 128k' -c 'write -P 0x52 1M 64k' snapshot.qcow2
q snapshot -c snap1 snapshot.qcow2
io -c 'write -P 0x53 64k 4k' -c 'write -P 0x54 2M 64k' -c 'write -z 1M 64k' snapshot.qcow2
# (active view: 0x51 with 4k of 0x53 at 64k, zeros at 1M, 0x54 at 2M; snap1 keeps the old data)
python3 - snapshot.qcow2 <<'EOF'
# normalize_snapshot_dates: set date_sec/date_nsec of every snapshot entry to a fixed value
import struct, sys
FIXED = 1704067200  # 2024-01-01T00:00:00Z
with open(sys.argv[1], "r+b") as f:
    h = f.read(72)
    nb, off = struct.unpack(">IQ", h[60:72])
    for _ in range(nb):
        f.seek(off)
        e = f.read(40)
        id_len, name_len = struct.unpack(">HH", e[12:16])
        extra = struct.unpack(">I", e[36:40])[0]
        f.seek(off + 16); f.write(struct.pack(">II", FIXED, 0))
        size = 40 + extra + id_len + name_len
        off += (size + 7) & ~7
EOF

q create -f qcow2 -o cluster_size=65536 bitmaps.qcow2 4M
io -c 'write -P 0x61 0 64k' bitmaps.qcow2
q bitmap --add bitmaps.qcow2 bm0
q bitmap --add --disable -g 128k bitmaps.qcow2 bm1
io -c 'write -P 0x62 1M 64k' -c 'write -P 0x63 3M 4k' bitmaps.qcow2
# bm0 (enabled) now records the writes at 1M and 3M; bm1 is disabled and empty

q create -f qcow2 -o cluster_size=65536,lazy_refcounts=on lazy.qcow2 4M
io -c 'write -P 0x71 0 64k' -c 'write -P 0x72 1M 4k' -c 'write -z 2M 64k' lazy.qcow2

q create -f qcow2 -o cluster_size=65536 empty.qcow2 4M

q create -f qcow2 -o cluster_size=65536 -b raw-base.raw -F raw nobackingfmt.qcow2
io -c 'write -P 0x91 64k 64k' nobackingfmt.qcow2
python3 - nobackingfmt.qcow2 <<'EOF'
# strip_backing_format: rebuild cluster 0 without extension 0xE2792ACA, qemu-style:
# header, remaining extensions (in order), end marker, backing name right after it
import struct, sys
path = sys.argv[1]
with open(path, "r+b") as f:
    h = f.read(112)
    bfo, bfs, cbits = struct.unpack(">QII", h[8:24])
    hlen = struct.unpack(">I", h[100:104])[0]
    cs = 1 << cbits
    f.seek(0); c0 = f.read(cs)
    name = c0[bfo:bfo + bfs]
    exts, off = [], hlen
    while off + 8 <= bfo:
        magic, length = struct.unpack(">II", c0[off:off + 8])
        if magic == 0:
            break
        exts.append((magic, c0[off + 8:off + 8 + length]))
        off += 8 + ((length + 7) & ~7)
    assert any(m == 0xE2792ACA for m, _ in exts), "no backing-format extension"
    out = bytearray(c0[:hlen])
    for magic, data in exts:
        if magic == 0xE2792ACA:
            continue
        out += struct.pack(">II", magic, len(data)) + data + b"\0" * (-len(data) % 8)
    out += b"\0" * 8                      # end marker
    new_bfo = len(out)
    out += name
    out[8:16] = struct.pack(">Q", new_bfo)
    out += b"\0" * (cs - len(out))
    f.seek(0); f.write(out)
EOF

# ---------------------------------------------------------------------------------
# rejection fixtures
# ---------------------------------------------------------------------------------
q create -f qcow2 -o compat=0.10,cluster_size=65536 v2.qcow2 4M
io -c 'write -P 0x02 0 64k' -c 'write -P 0x03 1M 4k' v2.qcow2

# LUKS: aes-128-cbc keeps the LUKS header area (8 key slots) at ~0.5 MiB (aes-256-xts: ~2 MiB);
# iter-time=200 keeps creation fast (values below ~50 fail with "Unable to get accurate CPU usage") (the iteration counts are normalized below anyway)
q create -f qcow2 --object secret,id=sec0,data=abc123 \
  -o encrypt.format=luks,encrypt.key-secret=sec0,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.iter-time=200 \
  luks.qcow2 1M
python3 - luks.qcow2 <<'EOF'
# normalize_luks: overwrite every random / benchmarked field of the LUKS1 header with
# constants. The qcow2 layer is unchanged (crypt_method=2, extension 0x0537BE77), the LUKS
# header still parses (qemu-img info works), but the passphrase no longer unlocks it.
import struct, sys
with open(sys.argv[1], "r+b") as f:
    h = f.read(112)
    hlen = struct.unpack(">I", h[100:104])[0]
    f.seek(hlen); ext = f.read(4096)
    off = 0
    while True:
        magic, length = struct.unpack(">II", ext[off:off + 8])
        assert magic != 0, "no FDE extension"
        if magic == 0x0537BE77:
            luks_off, luks_len = struct.unpack(">QQ", ext[off + 8:off + 24]); break
        off += 8 + ((length + 7) & ~7)
    f.seek(luks_off); L = bytearray(f.read(592))
    assert L[:6] == b"LUKS\xba\xbe"
    key_bytes = struct.unpack(">I", L[108:112])[0]
    L[112:132] = bytes(20)                               # mk_digest
    L[132:164] = bytes(32)                               # mk_digest_salt
    L[164:168] = struct.pack(">I", 1000)                 # mk_digest_iterations
    L[168:208] = b"00000000-0000-4000-8000-000000000000".ljust(40, b"\0")  # uuid
    for s in range(8):
        o = 208 + 48 * s
        active, _, _, km_off, stripes = struct.unpack(">II32sII", L[o:o + 48])
        if active == 0x00AC71F3:
            L[o + 4:o + 8] = struct.pack(">I", 1000)     # iterations
            L[o + 8:o + 40] = bytes(32)                  # salt
            f.seek(luks_off + km_off * 512)
            f.write(bytes(key_bytes * stripes))          # AF-split key material
    f.seek(luks_off); f.write(L)
EOF

q create -f qcow2 -o extended_l2=on,cluster_size=65536 extl2.qcow2 4M
io -c 'write -P 0x21 0 64k' -c 'write -P 0x22 1052672 4k' extl2.qcow2

q create -f qcow2 -o data_file=datafile.data,cluster_size=65536 datafile.qcow2 1M
io -c 'write -P 0xda 0 64k' -c 'write -P 0xdb 512k 4k' datafile.qcow2

q create -f qcow2 -o compression_type=zstd,cluster_size=65536 zstd.qcow2 4M
io -c 'write -c -P 0x7a 0 64k' -c 'write -P 0x7b 1M 4k' zstd.qcow2
# cluster 0 is a zstd-compressed cluster, 1M is a normal one

# Rewrite every file sparsely (zero blocks become holes; bytes unchanged, only du shrinks;
# a git checkout writes them densely anyway)
find . -type f | sort | while read -r f; do
    cp --sparse=always "$f" "$f.sparse" && mv "$f.sparse" "$f"
done

cd ..
python3 make_manifest.py
