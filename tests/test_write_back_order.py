"""The qcow2 write-back in steps (`write_back_steps`), whose barriers run in a worker thread.

Each step stops where the file must be durable before the next writes: what
another reader of the file (qemu-io) sees between the steps is the proof of
the order: the data's L2 entry never before the barrier after the data, the
new L2 table's L1 entry never before the barrier after the table.

Guests may write between the steps (a mount's flush, a snapshot, a pivot):
an entry they add after the write-back took its tables waits for the next
write-back, reads still find the tables taken, and a write-back that its
caller gave up at a barrier, or that another resumes without a sync of its
own, keeps its order and loses nothing.
"""

from __future__ import annotations

import errno
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest

from imgchain.chain import open_image

from .conftest import fdatasync_failing_once, qemu_img, qemu_io

MIB = 1 << 20


def reads_back(image: Path, pattern: int, at: str = "1M") -> bool:
    """Does qemu-io (sharing the file) read 64 KiB of `pattern` at `at`?"""
    proc = qemu_io(image, f"read -P {pattern} {at} 64k", extra=("-U", "-r"))
    return "Pattern verification failed" not in proc.stdout + proc.stderr and proc.returncode == 0


@contextmanager
def node_on(tmp_path: Path) -> Iterator[tuple[Path, Any]]:
    """A new 64 MiB qcow2 image, opened writable, closed at the end."""
    image = tmp_path / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "64M", check=True)
    node = open_image(str(image), writable=True)
    try:
        yield image, node
    finally:
        node.close()


def test_write_back_steps_stop_at_each_barrier(tmp_path: Path) -> None:
    with node_on(tmp_path) as (image, node):
        node.write(MIB, b"\x5a" * 65536)  # a new cluster in a new L2 table: pending L2 and L1 entries
        steps = node.write_back_steps()
        seen = []
        for _ in steps:  # each stop: a barrier is due before the next writes
            seen.append(reads_back(image, 0x5a))
            node.sync_file()
        seen.append(reads_back(image, 0x5a))
        assert seen == [False, False, True], seen  # data; table written, L1 not yet; then the L1 entry
        assert list(node.write_back_steps()) == []  # nothing left pending
    assert qemu_img("check", image).returncode == 0
    assert reads_back(image, 0x5a)


def test_write_back_runs_the_same_steps_with_its_own_barriers(tmp_path: Path) -> None:
    with node_on(tmp_path) as (image, node):
        node.write(MIB, b"\x5a" * 65536)
        assert not reads_back(image, 0x5a)
        node.write_back()
        assert reads_back(image, 0x5a)
    assert qemu_img("check", image).returncode == 0


def stopped_at_first_barrier(node: Any) -> Iterator[None]:
    """A new cluster of 0x5a at 1 MiB, and a write-back of it stopped at the
    barrier after the data (its tables taken, nothing written yet)."""
    node.write(MIB, b"\x5a" * 65536)
    steps = node.write_back_steps()
    next(steps)
    return steps


def test_an_entry_written_between_the_steps_waits_for_the_next_write_back(tmp_path: Path) -> None:
    with node_on(tmp_path) as (image, node):
        steps = stopped_at_first_barrier(node)
        node.write(2 * MIB, b"\xa5" * 65536)  # same L2 table, a new entry, its data not synced
        node.sync_file()
        for _ in steps:
            node.sync_file()
        assert reads_back(image, 0x5a) and not reads_back(image, 0xa5, "2M")
        node.write_back()
        node.sync_file()
        assert reads_back(image, 0xa5, "2M")
    assert qemu_img("check", image).returncode == 0


def test_reads_find_the_tables_a_write_back_took_when_the_cache_lets_them_go(tmp_path: Path) -> None:
    with node_on(tmp_path) as (image, node):
        steps = stopped_at_first_barrier(node)
        node.driver.l2_cache.invalidate()  # the pool drops every table: the file has none of them yet
        assert node.read(MIB, 65536) == b"\x5a" * 65536
        for _ in steps:
            node.sync_file()
        node.driver.l2_cache.invalidate()
        assert node.read(MIB, 65536) == b"\x5a" * 65536  # written now: the file has it


def test_a_write_back_given_up_at_a_barrier_is_finished_by_the_next(tmp_path: Path) -> None:
    with node_on(tmp_path) as (image, node):
        steps = stopped_at_first_barrier(node)
        steps.close()  # its caller was cancelled while the barrier's sync ran
        assert not reads_back(image, 0x5a)
        node.write_back()  # nothing new is pending: it finishes the one given up
        assert reads_back(image, 0x5a)
    assert qemu_img("check", image).returncode == 0


def test_a_step_resumed_without_a_sync_since_its_barrier_syncs_itself(tmp_path: Path) -> None:
    with node_on(tmp_path) as (image, node):
        file = node.driver.file
        first = stopped_at_first_barrier(node)  # its caller's sync has not even started
        before = file.sync_mark()
        second = node.write_back_steps()
        stops = 0
        for _ in second:  # a caller that resumes without syncing first: the steps sync themselves
            stops += 1
            break
        assert stops == 1
        list(second)  # resumes past the barrier of `first` with no sync of its own
        assert file.durable_since(before)  # the step synced the file before writing the tables
        assert list(first) == []  # already finished by `second`
        assert reads_back(image, 0x5a)


def test_a_write_back_returns_only_once_what_was_pending_at_its_start_is_written(tmp_path: Path) -> None:
    with node_on(tmp_path) as (image, node):
        first = stopped_at_first_barrier(node)  # a flush waiting for its barrier's sync
        node.write(2 * MIB, b"\xa5" * 65536)  # then a guest write, and a guest flush
        flush = node.write_back_steps()
        next(flush)  # it resumes `first`: past its barrier, at the next (its sync runs in a thread)
        other = node.write_back_steps()  # a third flush finishes `first` and takes the entry at 2M
        next(other)
        for _ in flush:
            node.sync_file()
        node.sync_file()  # the flush's last sync: it returns to the guest
        assert reads_back(image, 0xa5, "2M")  # what the guest wrote before it is in the file
        for _ in other:
            node.sync_file()
        assert list(first) == []
    assert qemu_img("check", image).returncode == 0


def test_a_write_back_that_fails_leaves_what_it_took_pending(tmp_path: Path) -> None:
    with node_on(tmp_path) as (image, node):
        file = node.driver.file
        steps = stopped_at_first_barrier(node)
        steps.close()  # its caller gave up at the barrier, with nothing synced since
        real_flush = file.flush

        def failing_flush() -> None:
            file.flush = real_flush
            raise OSError(5, "Input/output error")

        file.flush = failing_flush  # the sync the next write-back's first step runs fails (EIO)
        with pytest.raises(OSError):  # the write-back reports its failed sync
            node.write_back()
        assert not reads_back(image, 0x5a)
        node.write_back()  # a later flush writes what the failed one had taken
        node.sync_file()
        assert reads_back(image, 0x5a)
    assert qemu_img("check", image).returncode == 0


def test_once_a_sync_failed_every_later_flush_of_the_file_fails(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Linux reports a failed write-back to one fdatasync and may drop the
    pages: a later fdatasync that succeeds proves nothing, so every later
    flush of the file fails (the disk's EIO is simulated: fdatasync fails
    once, as the kernel reports it)."""
    with node_on(tmp_path) as (image, node):
        file = node.driver.file
        fdatasync_failing_once(monkeypatch).append(file.fd)
        try:
            node.write(MIB, b"\x5a" * 65536)
            with pytest.raises(OSError) as first:
                node.flush()
            assert first.value.errno == errno.EIO and file.sync_failed
            with pytest.raises(OSError) as later:  # the kernel's fdatasync would succeed now
                node.flush()
            assert later.value.errno == errno.EIO and "earlier sync" in str(later.value)
        finally:
            monkeypatch.undo()
            file.sync_failed = False  # let the image close
