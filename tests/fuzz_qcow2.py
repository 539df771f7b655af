"""A mutation fuzzer for the qcow2 driver (issue 7): hostile images through the Python API.

Each case copies a valid seed image (made by qemu-img and qemu-io: guest data,
L2 tables, refcount blocks, a raw backing file), mutates it (bit flips and
chosen values in the header, the header extensions, the L1 table, an L2
table, the refcount table or a refcount block), then opens the chain
read-write, reads all of it, writes a marker pattern (partial and whole
clusters, zeroes), flushes and closes. A case passes when:

- every failure is a user error (`FormatError`, `ImgchainError`, `OSError`)
  with a one-line message, never another exception (a traceback), a hang
  (`CASE_SECONDS`) or a MemoryError (the worker runs under an address-space
  limit);
- the marker never appears in a cluster that the mutated image's own header,
  L1 table and refcount table call metadata (worked out here independently of
  the driver), and the file grows by at most `MAX_GROWTH`;
- when nothing failed, the chain reads back what was written.

Run as a module for any number of cases (the long mode named in the README):

    .venv/bin/python -m tests.fuzz_qcow2 --cases 100000 [--seed N] [--work DIR]

It prints one line per failing case (seed and reason) and exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import signal
import struct
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

import imgchain
from imgchain.errors import USER_ERRORS

CASE_SECONDS = 10
MEMORY_LIMIT = 3 << 30  # address space of the worker
MAX_GROWTH = 64 << 20
MARKER = bytes.fromhex("f00dfacec0ffee5a11ad5eedbadcab1e")
CHOSEN = [0, 1, 2, 7, 8, 9, 63, 64, 512, 4095, 4096, 65535, 65536, 1 << 20, 1 << 31, (1 << 32) - 1,
          1 << 32, 1 << 40, 1 << 55, 1 << 56, (1 << 63), (1 << 64) - 1]
OFFSET_MASK = 0x00FFFFFFFFFFFE00


class Hang(Exception):
    pass


@dataclass
class Seed:
    path: Path
    cluster_size: int
    size: int


def make_seeds(work: Path) -> list[Seed]:
    """Valid images made by qemu-img/qemu-io, with data and a raw backing file."""
    seeds = []
    backing = work / "backing.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(backing), "2M"], check=True)
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x33 0 2M", str(backing)],
                   check=True, capture_output=True)
    for cs in (512, 4096, 65536):
        path = work / f"seed-{cs}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}",
                        "-b", backing.name, "-F", "raw", str(path), "2M"], check=True, cwd=work)
        cmds = []
        for off in (0, 3 * cs + 100, 300 * 1024, (1 << 20) + 5, (2 << 20) - cs):
            cmds += ["-c", f"write -P 0x{(off // cs) % 200 + 40:02x} {off} {cs + 17 if off + cs + 17 <= 2 << 20 else cs}"]
        cmds += ["-c", f"write -z {(1 << 20) + 2 * cs} {2 * cs}"]
        subprocess.run(["qemu-io", "-f", "qcow2", *cmds, str(path)], check=True, capture_output=True)
        seeds.append(Seed(path, cs, 2 << 20))
    return seeds


def _u(data: bytes | bytearray, off: int, size: int = 8) -> int:
    return int.from_bytes(data[off:off + size], "big") if off + size <= len(data) else 0


def structures(data: bytes | bytearray, cs: int) -> dict[str, list[int]]:
    """Where the seed's own tables are (offsets of each entry region)."""
    l1, l1_size = _u(data, 40), _u(data, 36, 4)
    reftable = _u(data, 48)
    l2s = [_u(data, l1 + 8 * i) & OFFSET_MASK for i in range(min(l1_size, max(0, len(data) - l1) // 8))]
    blocks = [_u(data, reftable + 8 * i) & ~(cs - 1) for i in range(cs // 8)]
    return {"header": [0], "extensions": [_u(data, 100, 4) or 104], "l1": [l1],
            "l2": [o for o in l2s if o], "reftable": [reftable], "refblock": [o for o in blocks if o]}


def mutate(data: bytearray, cs: int, rng: random.Random) -> str:
    """Change the image in place; returns what was done (for the report)."""
    where = structures(data, cs)
    region = rng.choice(["header", "header", "extensions", "l1", "l2", "reftable", "refblock"])
    starts = where[region] or [0]
    start = rng.choice(starts)
    span = 104 if region == "header" else (256 if region == "extensions" else cs)
    if not 0 <= start < len(data):
        return "no-op (region outside the file)"
    kind = rng.choice(["flip", "flip", "value64", "value32", "entry"])
    if kind == "flip":
        done = []
        for _ in range(rng.randint(1, 4)):
            bit = rng.randrange(min(span, len(data) - start) * 8)
            data[start + bit // 8] ^= 1 << (bit % 8)
            done.append(hex(start * 8 + bit))
        return f"{region}: flip bits {','.join(done)}"
    width = 4 if kind == "value32" else 8
    at = start + rng.randrange(0, max(1, min(span, len(data) - start) - width + 1)) // width * width
    if kind == "entry":  # a table entry pointing at another structure, flags kept
        targets = [o for v in where.values() for o in v] + [len(data), len(data) + cs]
        value = (_u(data, at) & ~OFFSET_MASK) | (rng.choice(targets) & OFFSET_MASK)
    else:
        value = rng.choice(CHOSEN + [len(data), rng.getrandbits(width * 8)]) % (1 << (width * 8))
    data[at:at + width] = value.to_bytes(width, "big")
    return f"{region}: {width * 8}-bit value {value:#x} at {at:#x}"


def claimed_metadata(data: bytes, cs: int) -> set[int]:
    """Clusters the (mutated) image's header, L1 and refcount tables call
    metadata, where they lie inside the file; computed without the driver."""
    if data[:4] != b"QFI\xfb":
        return set()  # no longer qcow2: probed as raw, a file with no metadata
    bits = cs.bit_length() - 1
    nclusters = -(-len(data) // cs)
    clusters = {0}

    def region(offset: int, length: int) -> None:
        if 0 < offset < len(data) and length > 0:
            clusters.update(range(offset >> bits, min(nclusters, (offset + length - 1 >> bits) + 1)))

    l1, l1_size = _u(data, 40), _u(data, 36, 4)
    reftable, reftable_clusters = _u(data, 48), _u(data, 56, 4)
    region(l1, min(l1_size, len(data) // 8) * 8)
    region(reftable, min(reftable_clusters, nclusters) * cs)
    for i in range(min(l1_size, max(0, len(data) - l1) // 8)):
        region(_u(data, l1 + 8 * i) & OFFSET_MASK, cs)
    for i in range(min(reftable_clusters * cs, max(0, len(data) - reftable)) // 8):
        region(_u(data, reftable + 8 * i) & ~(cs - 1) & ((1 << 64) - 1), cs)
    return clusters


def exercise(path: Path, seed: Seed, rng: random.Random) -> str | None:
    """Open, read, write, flush, close; None when it behaved, else why not."""
    try:
        chain = imgchain.open_chain(path, writable=True)
    except USER_ERRORS as exc:
        _one_line(exc)  # refused, with a message: fine
        return None
    written: list[tuple[int, bytes]] = []
    failed = False
    try:
        size = chain.size
        try:
            chain.read(0, size)
        except USER_ERRORS as exc:
            failed = failed or bool(_one_line(exc))
        for _ in range(rng.randint(1, 6)):
            off = rng.randrange(0, max(1, size - 1))
            length = min(size - off, rng.choice([1, 17, seed.cluster_size, 3 * seed.cluster_size + 5]))
            data = (MARKER * (length // 16 + 1))[:length]
            try:
                if rng.random() < 0.15:
                    chain.write_zeroes(off, length)
                    data = bytes(length)
                else:
                    chain.write(off, data)
                written.append((off, data))
            except USER_ERRORS as exc:
                failed = failed or bool(_one_line(exc))
                written.clear()
        try:
            chain.flush()
        except USER_ERRORS as exc:
            failed = failed or bool(_one_line(exc))
        if not failed:
            model = {}
            for off, data in written:  # in order: later writes overlap earlier ones
                for i, b in enumerate(data):
                    model[off + i] = b
            if model:
                lo, hi = min(model), max(model) + 1
                got = chain.read(lo, hi - lo)
                wrong = [o for o, b in model.items() if got[o - lo] != b]
                if wrong:
                    return f"read back differs at guest offset {wrong[0]:#x}"
    except USER_ERRORS as exc:
        _one_line(exc)
    finally:
        try:
            chain.close()
        except USER_ERRORS as exc:
            _one_line(exc)
    return None


def _one_line(exc: BaseException) -> str:
    message = str(exc)
    if not message or "\n" in message:
        raise AssertionError(f"error message is not one line: {message!r}")
    return message


def run_case(seed: Seed, case_seed: int, work: Path) -> str | None:
    """One case; None if it passed, else the reason it failed."""
    rng = random.Random(case_seed)
    path = seed.path.with_name("case.qcow2")  # beside the seeds: its backing name resolves
    data = bytearray(seed.path.read_bytes())
    what = mutate(data, seed.cluster_size, rng)
    if rng.random() < 0.3:
        what += "; " + mutate(data, seed.cluster_size, rng)
    path.write_bytes(data)
    metadata = claimed_metadata(bytes(data), seed.cluster_size)
    signal.alarm(CASE_SECONDS)
    try:
        problem = exercise(path, seed, rng)
    except Hang:
        problem = f"hang (over {CASE_SECONDS} s)"
    except BaseException as exc:  # the defect the fuzzer exists to find
        problem = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    finally:
        signal.alarm(0)
    after = path.read_bytes()
    if problem is None:
        problem = _check_file(after, len(data), metadata, seed.cluster_size)
    return None if problem is None else f"{what}: {problem}"


def _check_file(after: bytes, size_before: int, metadata: set[int], cs: int) -> str | None:
    if len(after) > size_before + MAX_GROWTH:
        return f"file grew from {size_before} to {len(after)} bytes"
    pos = after.find(MARKER[:8])
    while pos >= 0:
        if pos // cs in metadata:
            return f"guest data at host offset {pos:#x}, a metadata cluster"
        pos = after.find(MARKER[:8], pos + 1)
    return None


def fuzz(cases: int, first_seed: int, work: Path) -> list[str]:
    """Run `cases` cases; returns the failures (one line each, seed first)."""
    seeds = make_seeds(work)
    failures = []
    for i in range(cases):
        case_seed = first_seed + i
        seed = seeds[case_seed % len(seeds)]
        problem = run_case(seed, case_seed, work)
        if problem is not None:
            failures.append(f"seed {case_seed} ({seed.path.name}): {problem}")
    return failures


def _on_alarm(signum: int, frame: object) -> None:
    raise Hang()


def main() -> int:
    parser = argparse.ArgumentParser(description="Mutation fuzzer for imgchain's qcow2 driver")
    parser.add_argument("--cases", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    signal.signal(signal.SIGALRM, _on_alarm)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        failures = fuzz(args.cases, args.seed, Path(tmp))
    for line in failures:
        print(line)
    print(f"{args.cases} cases, {len(failures)} failed", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
