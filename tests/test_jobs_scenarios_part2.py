"""BLOCK-JOBS.md section 4, the active-commit scenarios (10, 11, 19) through QMP on real mounts.

Same harness as tests/test_jobs_scenarios.py: a verifying writer keeps
writing to the mount before, during and after the jobs; afterwards every
qcow2 image passes `qemu-img check` and the guest content of the image the
device ended on equals the writer's model.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import assert_qemu_clean, qemu_io
from .jobs_helpers import KiB, Qmp, VerifyingWriter, assert_backing, make_c3, make_p9
from .test_jobs_scenarios import run_mounted, run_mounted_on


def _with_second_run(c3: dict[str, Path]) -> None:
    """Data in top besides mid's, so a throttled job is still running after its first run."""
    proc = qemu_io(c3["top"], f"write -P 0x77 {1536 * KiB} {64 * KiB}", fmt="qcow2")
    assert proc.returncode == 0, proc.stderr


def test_scenario_10_active_commit_ready_and_complete(tmp_path: Path) -> None:
    """C3: complete before READY is refused; after READY the writer keeps
    writing; complete -> COMPLETED; the mount reads and writes base, which
    holds everything, including the writes between READY and complete; no
    header is rewritten (top still names mid, mid still names base)."""
    c3 = make_c3(tmp_path)
    _with_second_run(c3)
    top_header, mid_header = c3["top"].read_bytes()[:512], c3["mid"].read_bytes()[:512]

    async def body(qmp: Qmp, writer: VerifyingWriter) -> None:
        since = qmp.mark()
        await qmp.cmd("block-commit", device="drive0", speed=1 * KiB, **{"base-node": "base"})
        assert await qmp.error("block-job-complete", device="drive0") == \
            "Job 'drive0' in state 'running' cannot accept command verb 'complete'"
        await qmp.cmd("block-job-set-speed", device="drive0", speed=0)
        await qmp.wait_event("BLOCK_JOB_READY", since, device="drive0")
        await writer.warm_up(writer.writes + 30)  # writes between READY and complete
        await qmp.cmd("block-job-complete", device="drive0")
        name, data = await qmp.wait_job_end("drive0", since)
        assert name == "BLOCK_JOB_COMPLETED" and "error" not in data
        block = await qmp.cmd("query-block")
        assert block[0]["inserted"]["node-name"] == "base" and block[0]["inserted"]["ro"] is False
        assert await qmp.chain() == ["base"]

    run_mounted_on(c3["top"], c3["base"], tmp_path, body, seed=10)
    assert_qemu_clean(*c3.values())
    assert c3["top"].read_bytes()[:512] == top_header and c3["mid"].read_bytes()[:512] == mid_header
    assert_backing(c3["top"], c3["mid"], "qcow2")


def test_scenario_11_active_commit_cancel(tmp_path: Path) -> None:
    """C3: cancel before READY -> CANCELLED, mount still on top; after READY
    without force -> COMPLETED, mount still on top, base in sync with the
    content at that moment; after READY with force -> CANCELLED, no pivot;
    paused, then cancel without force -> `The block job for device 'drive0'
    is currently paused`, with force it cancels."""
    c3 = make_c3(tmp_path)
    _with_second_run(c3)

    async def body(qmp: Qmp, writer: VerifyingWriter) -> None:
        since = qmp.mark()  # (a) before READY
        await qmp.cmd("block-commit", device="drive0", speed=1 * KiB, **{"base-node": "base"})
        await qmp.cmd("block-job-cancel", device="drive0")
        assert (await qmp.wait_job_end("drive0", since))[0] == "BLOCK_JOB_CANCELLED"
        assert qmp.find("BLOCK_JOB_READY", since) is None
        await qmp.wait_event("JOB_STATUS_CHANGE", since, id="drive0", status="null")
        assert await qmp.chain() == ["top", "mid", "base"]

        since = qmp.mark()  # (b) soft cancel after READY: in sync, no pivot
        await qmp.cmd("block-commit", device="drive0", **{"base-node": "base"})
        await qmp.wait_event("BLOCK_JOB_READY", since, device="drive0")
        writer.pause()
        await qmp.cmd("block-job-cancel", device="drive0")
        name, data = await qmp.wait_job_end("drive0", since)
        assert name == "BLOCK_JOB_COMPLETED" and "error" not in data
        await qmp.wait_event("JOB_STATUS_CHANGE", since, id="drive0", status="null")
        assert await qmp.chain() == ["top", "mid", "base"]
        assert c3["base"].read_bytes() == writer.snapshot()  # base holds the content, no pivot
        writer.resume()

        since = qmp.mark()  # (c) forced cancel after READY
        await qmp.cmd("block-commit", device="drive0", **{"base-node": "base"})
        await qmp.wait_event("BLOCK_JOB_READY", since, device="drive0")
        await qmp.cmd("block-job-cancel", device="drive0", force=True)
        assert (await qmp.wait_job_end("drive0", since))[0] == "BLOCK_JOB_CANCELLED"
        await qmp.wait_event("JOB_STATUS_CHANGE", since, id="drive0", status="null")
        assert await qmp.chain() == ["top", "mid", "base"]

        since = qmp.mark()  # (d) paused
        await qmp.cmd("block-commit", device="drive0", speed=1 * KiB, **{"base-node": "base"})
        await qmp.cmd("block-job-pause", device="drive0")
        await qmp.wait_job("drive0", lambda j: j["status"] == "paused")
        assert await qmp.error("block-job-cancel", device="drive0") == \
            "The block job for device 'drive0' is currently paused"
        await qmp.cmd("block-job-cancel", device="drive0", force=True)
        assert (await qmp.wait_job_end("drive0", since))[0] == "BLOCK_JOB_CANCELLED"
        await qmp.wait_event("JOB_STATUS_CHANGE", since, id="drive0", status="null")

    run_mounted(c3["top"], tmp_path, body, seed=11)
    assert_qemu_clean(*c3.values())
    assert_backing(c3["top"], c3["mid"], "qcow2")


def test_scenario_19_active_commit_blocks_a_stream(tmp_path: Path) -> None:
    """P9: a throttled active commit down to img-3 blocks `stream img-5 base
    img-3` (img-5 is the first busy node in walk order); unthrottled it gets
    READY and complete moves the mount onto img-3."""
    p9 = make_p9(tmp_path)
    img3_header = p9["img-3"].read_bytes()[:512]

    async def body(qmp: Qmp, writer: VerifyingWriter) -> None:
        since = qmp.mark()
        await qmp.cmd("block-commit", device="drive0", speed=1 * KiB, **{"base-node": "img-3"})
        assert await qmp.error("block-stream", device="img-5", **{"base-node": "img-3"}) == \
            "Node 'img-5' is busy: block device is in use by block job: commit"
        assert await qmp.error("blockdev-snapshot-sync", device="drive0",
                               **{"snapshot-file": str(tmp_path / "snap.qcow2")}) == \
            "Node 'drive0' is busy: block device is in use by block job: commit"
        await qmp.cmd("block-job-set-speed", device="drive0", speed=0)
        await qmp.wait_event("BLOCK_JOB_READY", since, device="drive0")
        await qmp.cmd("block-job-complete", device="drive0")
        name, data = await qmp.wait_job_end("drive0", since)
        assert name == "BLOCK_JOB_COMPLETED" and "error" not in data
        assert (await qmp.cmd("query-block"))[0]["inserted"]["node-name"] == "img-3"

    run_mounted_on(p9["img-8"], p9["img-3"], tmp_path, body, seed=19)
    assert_qemu_clean(*p9.values())
    assert p9["img-3"].read_bytes()[:512] == img3_header  # the pivot rewrites no header
    assert not (tmp_path / "snap.qcow2").exists()  # the refused snapshot created nothing


def test_a_snapshot_of_a_read_only_mount_is_read_only(tmp_path: Path) -> None:
    """QEMU gives the new overlay the old node's read-only flag: a read-only
    mount stays read-only (the new file is opened as a reader)."""
    import asyncio

    from .jobs_helpers import qmp_session
    from .mounting import mount

    c3 = make_c3(tmp_path)
    disk = tmp_path / "disk.img"

    async def body() -> None:
        async with qmp_session(disk) as qmp:
            await qmp.cmd("blockdev-snapshot-sync", device="drive0",
                          **{"snapshot-file": str(tmp_path / "ro.qcow2")})
            inserted = (await qmp.cmd("query-block"))[0]["inserted"]
            assert inserted["node-name"] == "ro" and inserted["ro"] is True

    with mount(c3["top"], disk, "--read-only"):
        asyncio.run(body())
        with pytest.raises(OSError):  # the export still refuses writes
            with open(disk, "r+b") as f:
                f.write(b"x")
    assert_qemu_clean(tmp_path / "ro.qcow2", *c3.values())
