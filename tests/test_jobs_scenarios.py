"""BLOCK-JOBS.md section 4, through QMP against real mounts, with a client nobody here wrote (qemu.qmp).

Each test is named after its scenario. In every one a `VerifyingWriter`
thread writes random blocks to the mounted file and checks every byte it
reads back against its model, before, while and after the jobs run (a job of
one 1 MiB chunk may finish between two of its writes; the multi-chunk and
throttled ones overlap it for real). After the unmount, every qcow2 image
passes `qemu-img check`, the guest content (qemu-img convert) equals the
writer's model, headers are read with `qemu-img info --output json` and
allocation with `qemu-img map` (depth 0 = what the image itself stores).

Map comparisons compare *presence* (the ranges an image stores, data or
zeros; a raw image stores everything), not the zero/data flags: imgchain
stores zero data as zero clusters where QEMU would copy data, so instead
every extent an image stores as zeros must read as zeros. The writer's own
blocks, which land in the mounted image, are added to its expected presence
(cluster-aligned) or kept out of the compared range.

Scenarios 10, 11, 13, 15 and 19-23 are not here (active commit, snapshots
and the [CONC] cases with an active commit are tested elsewhere); of 24,
the READY/standby part is the one test here that uses an active commit.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Awaitable, Callable

import pytest
from qemu.qmp import ExecuteError

from .conftest import assert_qemu_clean, qemu_io
from .jobs_helpers import (
    KiB, MiB, TIMEOUT, Qmp, VerifyingWriter, assert_backing, assert_zero_extents_read_zero, cluster_size,
    digest, guest_content, make_c3, make_chain, make_p9, make_s3, merge, presence, qmp_session,
)
from .mounting import mount

BUSY_STREAM = "is busy: block device is in use by block job: stream"
BUSY_COMMIT = "is busy: block device is in use by block job: commit"
P9_CHAIN = [f"img-{i}" for i in range(8, -1, -1)]

Body = Callable[[Qmp, VerifyingWriter], Awaitable[None]]


def run_mounted(top: Path, tmp_path: Path, body: Body, *, seed: int = 0,
                regions: list[tuple[int, int]] | None = None,
                read_regions: list[tuple[int, int]] | None = None) -> VerifyingWriter:
    """Mount `top`, start the writer, run `body(qmp, writer)` in an asyncio
    loop, let the writer go on a little after it, unmount; the final model
    must be the guest content of `top` afterwards. Returns the writer."""
    return run_mounted_on(top, top, tmp_path, body, seed=seed, regions=regions, read_regions=read_regions)


def run_mounted_on(top: Path, final: Path, tmp_path: Path, body: Body, *, seed: int = 0,
                   regions: list[tuple[int, int]] | None = None,
                   read_regions: list[tuple[int, int]] | None = None) -> VerifyingWriter:
    """`run_mounted`, where the guest content ends up in image `final` (an
    active commit pivots the device onto base)."""
    model = guest_content(top)
    disk = tmp_path / "disk.img"
    with mount(top, disk):
        writer = VerifyingWriter(disk, model, regions, seed, read_regions=read_regions)
        writer.start()
        try:
            asyncio.run(_session(disk, writer, body))
        except BaseException:
            writer.stop_event.set()
            writer.join(TIMEOUT)
            raise
        model = writer.finish()
    assert guest_content(final) == model, f"guest content of {final.name} differs from the writer's model"
    return writer


async def _session(disk: Path, writer: VerifyingWriter, body: Body) -> None:
    async with qmp_session(disk) as qmp:
        await writer.warm_up()
        await body(qmp, writer)
        await writer.warm_up(writer.writes + 20)  # verified I/O after the graph changes too
        assert await qmp.cmd("query-block-jobs") == []


def expected_presence(image: Path, source: list[tuple[int, int]], writer: VerifyingWriter) -> list[tuple[int, int]]:
    """What the mounted `image` should store: `source` plus the writer's clusters."""
    return merge(source + writer.touched_clusters(cluster_size(image)))


def whole(image: Path) -> list[tuple[int, int]]:
    return [(0, image.stat().st_size)]


def blkdebug(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rules: list[dict]) -> None:
    """Fault injection for the next mount (the daemon inherits the environment)."""
    path = tmp_path / "blkdebug.json"
    path.write_text(json.dumps(rules))
    monkeypatch.setenv("IMGCHAIN_BLKDEBUG", str(path))


# -- 1-4: streams on S3 -------------------------------------------------------------


def test_scenario_01_full_stream(tmp_path: Path) -> None:
    """Full stream of top: no READY, COMPLETED with offset == len == 1 MiB; the
    header names no backing (name and format); presence(top) == presence(base)
    (the whole image: a raw base stores everything); top's zero clusters read
    as zeros; content unchanged."""
    s3 = make_s3(tmp_path)

    async def body(qmp: Qmp, writer: VerifyingWriter) -> None:
        since = qmp.mark()
        done = await qmp.run_job("block-stream", "top", device="top")
        assert done["offset"] == done["len"] == 1 * MiB and done["type"] == "stream"
        assert qmp.find("BLOCK_JOB_READY", since) is None and "ready" not in qmp.statuses("top", since)
        assert await qmp.chain() == ["top"]

    run_mounted(s3["top"], tmp_path, body, seed=1)
    assert_qemu_clean(*s3.values())
    assert_backing(s3["top"], None)
    assert presence(s3["top"]) == presence(s3["base"]) == whole(s3["base"])
    assert_zero_extents_read_zero(s3["top"], guest_content(s3["top"]))


def test_scenario_02_partial_and_noop_stream(tmp_path: Path) -> None:
    """(a) base-node=base: top gets mid's data (presence(top) == presence(mid)
    plus the writer's clusters), top is over base in the graph and its header
    names base.raw with format raw. (b) On a fresh S3, base-node=mid: the job
    completes, nothing is copied (top stores only the writer's clusters), top
    is still over mid."""
    (tmp_path / "a").mkdir()
    a = make_s3(tmp_path / "a")

    async def partial(qmp: Qmp, writer: VerifyingWriter) -> None:
        await qmp.run_job("block-stream", "top", device="top", **{"base-node": "base"})
        assert await qmp.chain() == ["top", "base"]

    writer = run_mounted(a["top"], tmp_path / "a", partial, seed=2)
    assert_qemu_clean(*a.values())
    assert_backing(a["top"], a["base"], "raw")
    assert presence(a["top"]) == expected_presence(a["top"], presence(a["mid"]), writer)
    assert_zero_extents_read_zero(a["top"], guest_content(a["top"]))

    (tmp_path / "b").mkdir()
    b = make_s3(tmp_path / "b")
    mid_before = digest(b["mid"])

    async def noop(qmp: Qmp, writer: VerifyingWriter) -> None:
        await qmp.run_job("block-stream", "top", device="top", **{"base-node": "mid"})
        assert await qmp.chain() == ["top", "mid", "base"]

    writer = run_mounted(b["top"], tmp_path / "b", noop, seed=3)
    assert_qemu_clean(*b.values())
    assert_backing(b["top"], b["mid"], "qcow2")
    assert presence(b["top"]) == writer.touched_clusters(cluster_size(b["top"]))
    assert digest(b["mid"]) == mid_before


def test_scenario_02_base_given_by_file_name(tmp_path: Path) -> None:
    """Scenario 2 (a) with the base named by file, as in the header
    (`base=base.raw`, relative to the directory of mid, the image above it:
    BLOCK-JOBS.md A9, E1): accepted, top ends over base.raw (format raw)."""
    s3 = make_s3(tmp_path)

    async def body(qmp: Qmp, writer: VerifyingWriter) -> None:
        await qmp.run_job("block-stream", "top", device="top", base="base.raw")
        assert await qmp.chain() == ["top", "base"]

    run_mounted(s3["top"], tmp_path, body, seed=21)
    assert_qemu_clean(*s3.values())
    assert_backing(s3["top"], s3["base"], "raw")


def test_scenario_03_stream_into_intermediate_node(tmp_path: Path) -> None:
    """Stream into mid (job-id stream-mid): presence(mid) == presence(base)
    (everything), mid's header names no backing, top is still over mid (graph
    and header), content unchanged."""
    s3 = make_s3(tmp_path)

    async def body(qmp: Qmp, writer: VerifyingWriter) -> None:
        await qmp.run_job("block-stream", "stream-mid", device="mid", **{"job-id": "stream-mid"})
        assert await qmp.chain() == ["top", "mid"]
        assert (await qmp.node("mid"))["ro"] is True  # read-only again after the job

    run_mounted(s3["top"], tmp_path, body, seed=4)
    assert_qemu_clean(*s3.values())
    assert_backing(s3["mid"], None)
    assert_backing(s3["top"], s3["mid"], "qcow2")
    assert presence(s3["mid"]) == presence(s3["base"]) == whole(s3["base"])
    assert_zero_extents_read_zero(s3["mid"], guest_content(s3["mid"]))


def test_scenario_04_pause_and_resume(tmp_path: Path) -> None:
    """S3 on a 4 MiB base (a 1 MiB image is one chunk, which no throttle can
    hold), streamed at 64 KiB/s: pause -> status paused, offset still for
    0.5 s, a second pause -> `Job is already paused`; resume -> running, a
    resume of the running job -> `Can't resume a job that was not paused`;
    unthrottled, it completes and top has no backing."""
    s3 = make_s3(tmp_path, size=4 * MiB)

    async def body(qmp: Qmp, writer: VerifyingWriter) -> None:
        since = qmp.mark()
        await qmp.cmd("block-stream", device="top", speed=64 * KiB)
        await qmp.cmd("block-job-pause", device="top")
        paused = await qmp.wait_job("top", lambda j: j["status"] == "paused")
        assert paused["paused"] is True and paused["offset"] < paused["len"]
        await asyncio.sleep(0.5)
        await writer.warm_up(writer.writes + 30)  # guest writes over ranges the job has yet to copy
        assert (await qmp.job("top"))["offset"] == paused["offset"]
        assert await qmp.error("block-job-pause", device="top") == "Job is already paused"
        await qmp.cmd("block-job-resume", device="top")
        await qmp.wait_job("top", lambda j: j["status"] == "running")
        assert await qmp.error("block-job-resume", device="top") == "Can't resume a job that was not paused"
        await qmp.cmd("block-job-set-speed", device="top", speed=0)
        name, data = await qmp.wait_job_end("top", since)
        assert name == "BLOCK_JOB_COMPLETED" and "error" not in data and data["offset"] == 4 * MiB
        await qmp.wait_event("JOB_STATUS_CHANGE", since, id="top", status="null")
        statuses = qmp.statuses("top", since)
        assert statuses[statuses.index("paused") + 1] == "running"

    # The writer stays in [0,512K): filling the rest of top would leave the job nothing to copy (or throttle).
    run_mounted(s3["top"], tmp_path, body, seed=5, regions=[(0, 512 * KiB)])
    assert_qemu_clean(*s3.values())
    assert_backing(s3["top"], None)


# -- 5-8: argument errors, error policies, termination, speed -------------------------------


def test_scenario_05_stream_argument_errors(tmp_path: Path) -> None:
    """P9: the refused block-stream requests give QEMU's messages and start no
    job; then device=img-4 base-node=img-2 succeeds: presence(img-4) ==
    presence(img-3) ([8M,10M)), img-4 over img-2 in the graph and its header."""
    p9 = make_p9(tmp_path)

    async def body(qmp: Qmp, writer: VerifyingWriter) -> None:
        refused = [
            ({"device": "nonexistent"}, "Cannot find device='nonexistent' nor node-name='nonexistent'"),
            ({"device": "img-4", "base-node": "img-6"}, "Node 'img-6' is not a backing image of 'img-4'"),
            ({"device": "img-4", "base-node": "img-4"}, "Node 'img-4' is not a backing image of 'img-4'"),
            ({"device": "img-4", "base": str(p9["img-2"]), "base-node": "img-2"},
             "'base' and 'base-node' cannot be specified at the same time"),
            ({"device": "img-4", "base-node": "img-2", "speed": -1},
             "Parameter 'speed' expects a non-negative value"),
            # the rest of E1's checks
            ({"device": "img-4", "bottom": "img-3", "base": str(p9["img-1"])},
             "'base' and 'bottom' cannot be specified at the same time"),
            ({"device": "img-4", "bottom": "img-3", "base-node": "img-1"},
             "'bottom' and 'base-node' cannot be specified at the same time"),
            ({"device": "img-4", "bottom": "img-6"}, "Node 'img-6' is not in a chain starting from 'img-4'"),
            ({"device": "img-4", "base": "nofile"}, "Can't find 'nofile' in the backing chain"),
            ({"device": "img-4", "backing-file": "x"}, "backing file specified, but streaming the entire chain"),
        ]
        for args, message in refused:
            assert await qmp.error("block-stream", **args) == message, args
        assert await qmp.cmd("query-block-jobs") == []
        await qmp.run_job("block-stream", "s", device="img-4", **{"base-node": "img-2", "job-id": "s"})
        assert await qmp.chain() == ["img-8", "img-7", "img-6", "img-5", "img-4", "img-2", "img-1", "img-0"]

    run_mounted(p9["img-8"], tmp_path, body, seed=6)
    assert_qemu_clean(*p9.values())
    assert presence(p9["img-4"]) == presence(p9["img-3"]) == [(8 * MiB, 10 * MiB)]
    assert_backing(p9["img-4"], p9["img-2"], "qcow2")
    assert_backing(p9["img-5"], p9["img-4"], "qcow2")


def test_scenario_05_unknown_base_node_and_bottom(tmp_path: Path) -> None:
    """P9: an unknown `base-node` or `bottom` is looked up as a node name only
    (QEMU: bdrv_lookup_bs(NULL, name)), so the message has an empty device,
    as scenario 12 has for commit's unknown top-node."""
    p9 = make_p9(tmp_path)

    async def body(qmp: Qmp, writer: VerifyingWriter) -> None:
        for key in ("base-node", "bottom"):
            assert await qmp.error("block-stream", device="img-4", **{key: "nonode"}) == \
                "Cannot find device='' nor node-name='nonode'", key

    run_mounted(p9["img-8"], tmp_path, body, seed=55)


def _error_chain(directory: Path) -> dict[str, Path]:
    """2 MiB raw base (0x5a everywhere) <- empty qcow2 top."""
    directory.mkdir()
    base, top = make_chain(directory, [("base.raw", 2 * MiB, [(0x5A, 0, 2 * MiB)]), ("top.qcow2", 2 * MiB, [])])
    return {"base": base, "top": top}


def _read_error_at_512k(base: Path) -> list[dict]:
    return [{"image": str(base), "op": "read", "offset": 512 * KiB, "length": 4 * KiB,
             "errno": "EIO", "once": True}]


# The writer stays in [1M, 2M): a guest read of [512K, +4K) would spend the injected error itself.
_AWAY_FROM_THE_ERROR = [(1 * MiB, 2 * MiB)]


def test_scenario_06_error_policies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One injected EIO on the base's read at 512 KiB. report: BLOCK_JOB_ERROR
    {read, report}, COMPLETED with `Input/output error`, header unchanged,
    and (auto-dismiss=false) query-block-jobs and query-jobs show the error
    on the concluded job until job-dismiss.
    stop: ERROR {read, stop}, the job is paused with io-status failed; resume
    -> completes, header names no backing. ignore: ERROR {read, ignore}, the
    job runs on to the end, COMPLETED with the error, header unchanged."""
    for policy in ("report", "stop", "ignore"):
        chain = _error_chain(tmp_path / policy)
        blkdebug(chain["top"].parent, monkeypatch, _read_error_at_512k(chain["base"]))

        async def body(qmp: Qmp, writer: VerifyingWriter, policy: str = policy) -> None:
            since = qmp.mark()
            await qmp.cmd("block-stream", device="top", **{"on-error": policy, "auto-dismiss": policy != "report"})
            error = await qmp.wait_event("BLOCK_JOB_ERROR", since, device="top")
            assert error == {"device": "top", "operation": "read", "action": policy}
            if policy == "stop":
                stopped = await qmp.wait_job("top", lambda j: j["status"] == "paused")
                assert stopped["io-status"] == "failed" and stopped["paused"] is True
                await writer.warm_up(writer.writes + 30)  # into [1M,2M), which the job has yet to copy
                await qmp.cmd("block-job-resume", device="top")
            name, data = await qmp.wait_job_end("top", since)
            assert name == "BLOCK_JOB_COMPLETED"
            if policy == "stop":
                assert "error" not in data and data["offset"] == data["len"] == 2 * MiB
                assert await qmp.chain() == ["top"]
            else:
                assert data["error"] == "Input/output error"
                assert await qmp.chain() == ["top", "base"]
                if policy == "ignore":
                    assert data["offset"] == data["len"] == 2 * MiB  # it ran on past the error
            if policy == "report":  # kept (auto-dismiss=false): the failure shows in the queries
                await qmp.wait_event("JOB_STATUS_CHANGE", since, id="top", status="concluded")
                assert (await qmp.job("top"))["error"] == "Input/output error"
                jobs = await qmp.cmd("query-jobs")
                assert [(j["id"], j["status"], j.get("error")) for j in jobs] == \
                    [("top", "concluded", "Input/output error")]
                await qmp.cmd("job-dismiss", id="top")
            await qmp.wait_event("JOB_STATUS_CHANGE", since, id="top", status="null")

        run_mounted(chain["top"], chain["top"].parent, body, seed=7,
                    regions=_AWAY_FROM_THE_ERROR, read_regions=_AWAY_FROM_THE_ERROR)
        monkeypatch.delenv("IMGCHAIN_BLKDEBUG")
        assert_qemu_clean(chain["top"])
        assert_backing(chain["top"], None if policy == "stop" else chain["base"], None if policy == "stop" else "raw")


def test_scenario_07_termination_and_cancel(tmp_path: Path) -> None:
    """(a) A 1 MiB raw base under a 2 MiB top: a full stream terminates and
    succeeds (offset == len == 2 MiB), top names no backing, content
    unchanged (zeros past the base). (b) P9, a full stream of drive0 throttled
    to 1 KiB/s, cancelled: BLOCK_JOB_CANCELLED, no job left, chain and headers
    unchanged, content unchanged; so is a stream of img-4 cancelled while it
    waits in pending (auto-finalize=false)."""
    (tmp_path / "a").mkdir()
    base, top = make_chain(tmp_path / "a", [("base.raw", 1 * MiB, [(0x33, 0, 64 * KiB), (0x44, 960 * KiB, 64 * KiB)]),
                                            ("top.qcow2", 2 * MiB, [])])

    async def short_base(qmp: Qmp, writer: VerifyingWriter) -> None:
        done = await qmp.run_job("block-stream", "top", device="top")
        assert done["offset"] == done["len"] == 2 * MiB
        assert await qmp.chain() == ["top"]

    run_mounted(top, tmp_path / "a", short_base, seed=8)
    assert_qemu_clean(top)
    assert_backing(top, None)

    (tmp_path / "b").mkdir()
    p9 = make_p9(tmp_path / "b")
    untouched = {name: digest(path) for name, path in p9.items() if name not in ("img-8", "img-4")}

    async def cancel(qmp: Qmp, writer: VerifyingWriter) -> None:
        since = qmp.mark()
        await qmp.cmd("block-stream", device="drive0", speed=1 * KiB)
        await qmp.wait_job("drive0", lambda j: j["status"] == "running")
        await writer.warm_up(writer.writes + 30)
        await qmp.cmd("block-job-cancel", device="drive0")
        name, data = await qmp.wait_job_end("drive0", since)
        assert name == "BLOCK_JOB_CANCELLED" and data["type"] == "stream"
        await qmp.wait_event("JOB_STATUS_CHANGE", since, id="drive0", status="null")
        assert "aborting" in qmp.statuses("drive0", since)
        assert await qmp.cmd("query-block-jobs") == [] and await qmp.cmd("query-jobs") == []
        assert await qmp.chain() == P9_CHAIN
        # a cancel while pending (auto-finalize=false) is a cancel too: no graph change
        since = qmp.mark()
        await qmp.cmd("block-stream", device="img-4", **{"base-node": "img-2", "auto-finalize": False})
        await qmp.wait_event("BLOCK_JOB_PENDING", since, id="img-4")
        await qmp.cmd("block-job-cancel", device="img-4")
        name, data = await qmp.wait_job_end("img-4", since)
        assert name == "BLOCK_JOB_CANCELLED", data
        await qmp.wait_event("JOB_STATUS_CHANGE", since, id="img-4", status="null")
        assert qmp.statuses("img-4", since) == ["created", "running", "waiting", "pending", "aborting",
                                                "concluded", "null"]
        assert await qmp.chain() == P9_CHAIN

    run_mounted(p9["img-8"], tmp_path / "b", cancel, seed=9)
    assert_qemu_clean(*p9.values())
    assert {name: digest(path) for name, path in p9.items() if name not in ("img-8", "img-4")} == untouched
    assert_backing(p9["img-8"], p9["img-7"], "qcow2")
    assert_backing(p9["img-4"], p9["img-3"], "qcow2")  # what it copied stays, its backing too


def test_scenario_08_speed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new job reports speed 0; set-speed 8388608 -> query-block-jobs shows
    8388608 (and so does its COMPLETED event); speed=-1 is refused by
    set-speed and by block-stream. (The job is held still by an injected read
    error with on-error=stop, so no timing decides what the query sees.)"""
    chain = _error_chain(tmp_path / "c")
    blkdebug(tmp_path, monkeypatch, _read_error_at_512k(chain["base"]))

    async def body(qmp: Qmp, writer: VerifyingWriter) -> None:
        since = qmp.mark()
        await qmp.cmd("block-stream", device="top", **{"on-error": "stop"})
        held = await qmp.wait_job("top", lambda j: j["status"] == "paused")
        assert held["speed"] == 0
        await qmp.cmd("block-job-set-speed", device="top", speed=8388608)
        assert (await qmp.job("top"))["speed"] == 8388608
        assert await qmp.error("block-job-set-speed", device="top", speed=-1) == \
            "Parameter 'speed' expects a non-negative value"
        assert (await qmp.job("top"))["speed"] == 8388608
        assert await qmp.error("block-stream", device="top", speed=-1, **{"job-id": "other"}) == \
            f"Node 'drive0' {BUSY_STREAM}"  # the root is named by its device
        await qmp.cmd("block-job-resume", device="top")
        name, data = await qmp.wait_job_end("top", since)
        assert name == "BLOCK_JOB_COMPLETED" and "error" not in data and data["speed"] == 8388608
        await qmp.wait_event("JOB_STATUS_CHANGE", since, id="top", status="null")
        assert await qmp.error("block-stream", device="top", speed=-1) == \
            "Parameter 'speed' expects a non-negative value"

    run_mounted(chain["top"], chain["top"].parent, body, seed=10,
                regions=_AWAY_FROM_THE_ERROR, read_regions=_AWAY_FROM_THE_ERROR)
    assert_qemu_clean(chain["top"])
    assert_backing(chain["top"], None)


# -- 9, 12, 14: intermediate commit ---------------------------------------------------


def test_scenario_09_intermediate_commit(tmp_path: Path) -> None:
    """C3, commit top-node=mid base-node=base: no READY, COMPLETED with offset
    == len == 2 MiB; base.raw holds 0xab at [0,512K) and 0xef at [512K,1M) and
    zeros after; top's header names base.raw (raw); mid is out of the chain
    and its file is byte for byte unchanged; content unchanged throughout."""
    c3 = make_c3(tmp_path)
    mid_before = digest(c3["mid"])

    async def body(qmp: Qmp, writer: VerifyingWriter) -> None:
        since = qmp.mark()
        done = await qmp.run_job("block-commit", "drive0", device="drive0",
                                 **{"top-node": "mid", "base-node": "base"})
        assert done["offset"] == done["len"] == 2 * MiB and done["type"] == "commit"
        assert qmp.find("BLOCK_JOB_READY", since) is None and "ready" not in qmp.statuses("drive0", since)
        assert await qmp.chain() == ["top", "base"]
        assert (await qmp.node("base"))["ro"] is True  # read-only again after the job

    run_mounted(c3["top"], tmp_path, body, seed=11)
    assert_qemu_clean(*c3.values())
    assert c3["base"].read_bytes() == b"\xab" * (512 * KiB) + b"\xef" * (512 * KiB) + bytes(1 * MiB)
    assert_backing(c3["top"], c3["base"], "raw")
    assert digest(c3["mid"]) == mid_before


def test_scenario_09_commit_given_by_file_names(tmp_path: Path) -> None:
    """Scenario 9 with top and base named by file (`top=mid.qcow2`,
    `base=base.raw`, relative to the directories of the images above them:
    BLOCK-JOBS.md A9, F1): accepted, top ends over base.raw (format raw)."""
    c3 = make_c3(tmp_path)

    async def body(qmp: Qmp, writer: VerifyingWriter) -> None:
        await qmp.run_job("block-commit", "drive0", device="drive0", top="mid.qcow2", base="base.raw")
        assert await qmp.chain() == ["top", "base"]

    run_mounted(c3["top"], tmp_path, body, seed=19)
    assert_qemu_clean(*c3.values())
    assert_backing(c3["top"], c3["base"], "raw")


def test_scenario_12_commit_argument_errors(tmp_path: Path) -> None:
    """C3: top-node=base base-node=base, unknown top (top-node and top),
    reversed order, and backing-file with the active layer as top are refused
    with QEMU's messages (GenericError), and so are an unknown device
    (DeviceNotFound) and a device that is not a root; no job starts, nothing
    changes."""
    c3 = make_c3(tmp_path)
    before = {name: digest(path) for name, path in c3.items() if name != "top"}

    async def body(qmp: Qmp, writer: VerifyingWriter) -> None:
        refused = [
            ({"top-node": "base", "base-node": "base"}, "cannot commit an image into itself"),
            ({"top-node": "badfile"}, "Cannot find device='' nor node-name='badfile'"),
            ({"top": "badfile"}, "Top image file badfile not found"),
            ({"top-node": "base", "base-node": "top"}, "'top' is not in this backing file chain"),
            ({"base-node": "base", "backing-file": "base.raw"},
             "'backing-file' specified, but 'top' is the active layer"),
        ]
        for args, message in refused:
            assert await qmp.failure("block-commit", device="drive0", **args) == ("GenericError", message), args
        assert await qmp.failure("block-commit", device="nonexistent") == \
            ("DeviceNotFound", "Device 'nonexistent' not found")
        assert await qmp.failure("block-commit", device="mid") == ("GenericError", "Need a root block node")
        assert await qmp.cmd("query-block-jobs") == []
        assert await qmp.chain() == ["top", "mid", "base"]

    run_mounted(c3["top"], tmp_path, body, seed=12)
    assert_qemu_clean(*c3.values())
    assert {name: digest(path) for name, path in c3.items() if name != "top"} == before
    assert_backing(c3["top"], c3["mid"], "qcow2")


def test_scenario_14_commit_rewrites_the_overlays_header(tmp_path: Path) -> None:
    """img-0 (raw) <- img-1 (0xab at [0,128K)) <- img-2 <- img-3 (mounted);
    commit top-node=img-1 base-node=img-0: img-2's header names img-0.raw with
    format raw, the graph is img-3, img-2, img-0, img-0 holds the 0xab data,
    img-1's file is unchanged, content unchanged."""
    img0, img1, img2, img3 = make_chain(tmp_path, [
        ("img-0.raw", 1 * MiB, [(0x11, 512 * KiB, 64 * KiB)]),
        ("img-1.qcow2", 1 * MiB, [(0xAB, 0, 128 * KiB)]),
        ("img-2.qcow2", 1 * MiB, []),
        ("img-3.qcow2", 1 * MiB, []),
    ])
    img1_before = digest(img1)

    async def body(qmp: Qmp, writer: VerifyingWriter) -> None:
        await qmp.run_job("block-commit", "drive0", device="drive0", **{"top-node": "img-1", "base-node": "img-0"})
        assert await qmp.chain() == ["img-3", "img-2", "img-0"]

    run_mounted(img3, tmp_path, body, seed=14)
    assert_qemu_clean(img1, img2, img3)
    assert_backing(img2, img0, "raw")
    assert_backing(img3, img2, "qcow2")
    assert img0.read_bytes()[:128 * KiB] == b"\xab" * (128 * KiB)
    assert digest(img1) == img1_before


# -- 16-18: concurrent jobs on P9 -----------------------------------------------------------------


def assert_parallel_streams_ended(p9: dict[str, Path]) -> None:
    """Scenario 16's end state on disk: every image checks clean, each img-2k
    stores what img-(2k-1) stored, and the headers chain img-8 <- ... <- img-0."""
    assert_qemu_clean(*p9.values())
    for k in (1, 2, 3, 4):
        assert presence(p9[f"img-{2 * k}"]) == presence(p9[f"img-{2 * k - 1}"]), k
    for upper, lower, fmt in (("img-8", "img-6", "qcow2"), ("img-6", "img-4", "qcow2"),
                              ("img-4", "img-2", "qcow2"), ("img-2", "img-0", "raw")):
        assert_backing(p9[upper], p9[lower], fmt)


def test_scenario_16_parallel_streams(tmp_path: Path) -> None:
    """Four streams (img-2k with bottom=img-(2k-1)) throttled to 1 KiB/s run at
    once; the throttles are lifted from img-8 down. All complete without
    error; presence(img-2k) == presence(img-(2k-1)) (the writer stays inside
    [0,1M), which the stream into img-8 copies before its throttle holds it:
    filling [1M,2M) could let that stream end before its throttle is lifted); the chain is
    img-0 <- img-2 <- img-4 <- img-6 <- img-8 in the graph and the headers."""
    p9 = make_p9(tmp_path)
    ids = ["img-2", "img-4", "img-6", "img-8"]

    async def body(qmp: Qmp, writer: VerifyingWriter) -> None:
        since = qmp.mark()
        for top in ids:
            below = f"img-{int(top[-1]) - 1}"
            await qmp.cmd("block-stream", device=top, bottom=below, speed=1 * KiB)
        running = {j["device"] for j in await qmp.cmd("query-block-jobs")}
        assert running == set(ids)
        await writer.warm_up(writer.writes + 50)  # guest writes while all four jobs run
        for top in reversed(ids):
            await qmp.cmd("block-job-set-speed", device=top, speed=0)
        for top in ids:
            name, data = await qmp.wait_job_end(top, since)
            assert name == "BLOCK_JOB_COMPLETED" and "error" not in data, (top, data)
            await qmp.wait_event("JOB_STATUS_CHANGE", since, id=top, status="null")
        assert await qmp.chain() == ["img-8", "img-6", "img-4", "img-2", "img-0"]

    run_mounted(p9["img-8"], tmp_path, body, seed=16, regions=[(0, 1 * MiB)])
    assert_parallel_streams_ended(p9)


def test_scenario_16_parallel_streams_lifted_bottom_up(tmp_path: Path) -> None:
    """Scenario 16 with the throttles lifted in the other order (img-2 first,
    the order QEMU's 030 warns about) and the writer racing the stream into
    img-8 over all of img-7's [0,2M): the same end state (presence(img-2k) ==
    presence(img-(2k-1)), chain img-0 <- img-2 <- img-4 <- img-6 <- img-8).
    The writer may fill [1M,2M) before img-8's stream gets there, so that
    stream may end before its throttle is lifted."""
    p9 = make_p9(tmp_path)
    ids = ["img-2", "img-4", "img-6", "img-8"]

    async def body(qmp: Qmp, writer: VerifyingWriter) -> None:
        since = qmp.mark()
        for top in ids:
            await qmp.cmd("block-stream", device=top, bottom=f"img-{int(top[-1]) - 1}", speed=1 * KiB)
        await writer.warm_up(writer.writes + 50)
        for top in ids:
            try:
                await qmp.cmd("block-job-set-speed", device=top, speed=0)
            except ExecuteError as exc:
                assert top == "img-8" and str(exc) == "Block job 'img-8' not found", (top, str(exc))
        for top in ids:
            name, data = await qmp.wait_job_end(top, since)
            assert name == "BLOCK_JOB_COMPLETED" and "error" not in data, (top, data)
            await qmp.wait_event("JOB_STATUS_CHANGE", since, id=top, status="null")
        assert await qmp.chain() == ["img-8", "img-6", "img-4", "img-2", "img-0"]

    run_mounted(p9["img-8"], tmp_path, body, seed=116, regions=[(0, 2 * MiB)])
    assert_parallel_streams_ended(p9)


def test_scenario_17_stream_blocks_overlapping_operations(tmp_path: Path) -> None:
    """While stream-img-4 (img-4 down to base img-1) runs throttled, the
    overlapping streams and commits are refused naming the first busy node in
    walk order; unthrottled, it completes: img-4 over img-1 (graph and
    header), presence(img-4) == presence(img-3) (img-2 is empty)."""
    p9 = make_p9(tmp_path)

    async def body(qmp: Qmp, writer: VerifyingWriter) -> None:
        since = qmp.mark()
        await qmp.cmd("block-stream", device="img-4", speed=1 * KiB,
                      **{"base-node": "img-1", "job-id": "stream-img-4"})
        refused = [
            ("block-stream", {"device": "img-5", "base-node": "img-2"}, f"Node 'img-4' {BUSY_STREAM}"),
            ("block-stream", {"device": "img-3", "base-node": "img-2"}, f"Node 'img-3' {BUSY_STREAM}"),
            ("block-stream", {"device": "img-4", "job-id": "second"}, f"Node 'img-4' {BUSY_STREAM}"),
            ("block-commit", {"device": "drive0", "top-node": "img-3", "base-node": "img-1"},
             f"Node 'img-3' {BUSY_STREAM}"),
            ("block-commit", {"device": "drive0", "top-node": "img-1", "base-node": "img-0"},
             f"Node 'img-2' {BUSY_STREAM}"),
        ]
        for command, args, message in refused:
            assert await qmp.error(command, **args) == message, (command, args)
        assert [j["device"] for j in await qmp.cmd("query-block-jobs")] == ["stream-img-4"]
        await writer.warm_up(writer.writes + 30)
        await qmp.cmd("block-job-set-speed", device="stream-img-4", speed=0)
        name, data = await qmp.wait_job_end("stream-img-4", since)
        assert name == "BLOCK_JOB_COMPLETED" and "error" not in data
        await qmp.wait_event("JOB_STATUS_CHANGE", since, id="stream-img-4", status="null")
        assert await qmp.chain() == ["img-8", "img-7", "img-6", "img-5", "img-4", "img-1", "img-0"]

    run_mounted(p9["img-8"], tmp_path, body, seed=17)
    assert_qemu_clean(*p9.values())
    assert_backing(p9["img-4"], p9["img-1"], "qcow2")
    assert presence(p9["img-4"]) == presence(p9["img-3"])


def test_scenario_18_intermediate_commit_blocks_overlapping_operations(tmp_path: Path) -> None:
    """While commit-img-3 (top img-5, base img-3) runs throttled, overlapping
    streams are refused naming the first busy node (and a stream into the
    device's root, which the commit blocks too, names drive0); unthrottled, it
    completes: img-6 over img-3 (graph and header, qcow2), img-3 now stores
    img-5's [4M,8M) besides its own [8M,10M); img-4 and img-5 unchanged."""
    p9 = make_p9(tmp_path)
    dropped = {name: digest(p9[name]) for name in ("img-4", "img-5")}

    async def body(qmp: Qmp, writer: VerifyingWriter) -> None:
        since = qmp.mark()
        await qmp.cmd("block-commit", device="drive0", speed=1 * KiB,
                      **{"top-node": "img-5", "base-node": "img-3", "job-id": "commit-img-3"})
        refused = [
            ({"device": "img-3"}, f"Node 'img-3' {BUSY_COMMIT}"),
            ({"device": "img-6", "base-node": "img-2"}, f"Node 'img-5' {BUSY_COMMIT}"),
            ({"device": "img-4", "base-node": "img-2"}, f"Node 'img-4' {BUSY_COMMIT}"),
            # an intermediate commit blocks the device's root too (QEMU 030 test_overlapping_2)
            ({"device": "img-8", "bottom": "img-7"}, f"Node 'drive0' {BUSY_COMMIT}"),
        ]
        for args, message in refused:
            assert await qmp.error("block-stream", **args) == message, args
        assert [j["device"] for j in await qmp.cmd("query-block-jobs")] == ["commit-img-3"]
        await writer.warm_up(writer.writes + 30)
        await qmp.cmd("block-job-set-speed", device="commit-img-3", speed=0)
        name, data = await qmp.wait_job_end("commit-img-3", since)
        assert name == "BLOCK_JOB_COMPLETED" and "error" not in data
        await qmp.wait_event("JOB_STATUS_CHANGE", since, id="commit-img-3", status="null")
        assert await qmp.chain() == ["img-8", "img-7", "img-6", "img-3", "img-2", "img-1", "img-0"]

    run_mounted(p9["img-8"], tmp_path, body, seed=18)
    assert_qemu_clean(*p9.values())
    assert_backing(p9["img-6"], p9["img-3"], "qcow2")
    assert presence(p9["img-3"]) == [(4 * MiB, 10 * MiB)]
    assert {name: digest(p9[name]) for name in ("img-4", "img-5")} == dropped


# -- 24: job bookkeeping (no active commit) ------------------------------------------------------


def test_scenario_24_job_bookkeeping(tmp_path: Path) -> None:
    """P9. With j0 (img-4 down to img-2) running throttled: a second job with id
    j0 -> `Job ID 'j0' already in use`; job-id 0bad -> `Invalid job ID '0bad'`;
    complete / finalize / dismiss -> `Job 'j0' in state 'running' cannot
    accept command verb ...`; unknown id -> `Block job 'nope' not found`.
    j0's statuses: created, running, waiting, pending, concluded, null, with
    BLOCK_JOB_COMPLETED between pending and concluded. auto-dismiss=false:
    concluded, the id in use until job-dismiss. auto-finalize=false:
    BLOCK_JOB_PENDING, status pending and the graph unchanged until
    job-finalize."""
    p9 = make_p9(tmp_path)

    async def body(qmp: Qmp, writer: VerifyingWriter) -> None:
        since = qmp.mark()
        await qmp.cmd("block-stream", device="img-4", speed=1 * KiB, **{"base-node": "img-2", "job-id": "j0"})
        elsewhere = {"device": "img-8", "bottom": "img-7"}  # no node in common with j0
        assert await qmp.error("block-stream", **elsewhere, **{"job-id": "j0"}) == "Job ID 'j0' already in use"
        assert await qmp.error("block-stream", **elsewhere, **{"job-id": "0bad"}) == "Invalid job ID '0bad'"
        for command, arg in (("block-job-complete", "device"), ("job-complete", "id"),
                             ("block-job-finalize", "id"), ("job-finalize", "id"),
                             ("block-job-dismiss", "id"), ("job-dismiss", "id")):
            verb = command.split("-")[-1]
            assert await qmp.error(command, **{arg: "j0"}) == \
                f"Job 'j0' in state 'running' cannot accept command verb '{verb}'", command
        for command, arg in (("block-job-pause", "device"), ("block-job-cancel", "device"),
                             ("block-job-set-speed", "device")):
            extra = {"speed": 0} if command == "block-job-set-speed" else {}
            assert await qmp.failure(command, **{arg: "nope"}, **extra) == \
                ("DeviceNotActive", "Block job 'nope' not found"), command
        assert await qmp.failure("job-pause", id="nope") == ("GenericError", "Job not found")  # job-qmp.c
        await qmp.cmd("block-job-set-speed", device="j0", speed=0)
        name, data = await qmp.wait_job_end("j0", since)
        assert name == "BLOCK_JOB_COMPLETED" and "error" not in data
        await qmp.wait_event("JOB_STATUS_CHANGE", since, id="j0", status="null")
        assert qmp.statuses("j0", since) == ["created", "running", "waiting", "pending", "concluded", "null"]
        order = [(e["event"], e["data"].get("status")) for e in qmp.events[since:]
                 if e["data"].get("id") == "j0" or e["data"].get("device") == "j0"]
        completed = order.index(("BLOCK_JOB_COMPLETED", None))
        assert order[completed - 1] == ("JOB_STATUS_CHANGE", "pending")
        assert order[completed + 1] == ("JOB_STATUS_CHANGE", "concluded")

        # auto-dismiss=false: concluded, id in use until dismissed
        since = qmp.mark()
        await qmp.cmd("block-stream", device="img-6", **{"bottom": "img-5", "job-id": "j1", "auto-dismiss": False})
        await qmp.wait_event("BLOCK_JOB_COMPLETED", since, device="j1")
        await qmp.wait_event("JOB_STATUS_CHANGE", since, id="j1", status="concluded")
        assert [(j["id"], j["status"]) for j in await qmp.cmd("query-jobs")] == [("j1", "concluded")]
        assert await qmp.error("block-stream", device="img-8", **{"bottom": "img-7", "job-id": "j1"}) == \
            "Job ID 'j1' already in use"
        await qmp.cmd("job-dismiss", id="j1")
        await qmp.wait_event("JOB_STATUS_CHANGE", since, id="j1", status="null")
        assert await qmp.cmd("query-jobs") == []
        assert qmp.statuses("j1", since) == ["created", "running", "waiting", "pending", "concluded", "null"]

        # auto-finalize=false: pending until finalized; the graph changes only then
        since = qmp.mark()
        await qmp.cmd("block-stream", device="img-8", **{"bottom": "img-7", "job-id": "j1", "auto-finalize": False})
        assert await qmp.wait_event("BLOCK_JOB_PENDING", since, id="j1") == {"type": "stream", "id": "j1"}
        assert (await qmp.job("j1"))["status"] == "pending"
        assert await qmp.chain() == ["img-8", "img-7", "img-6", "img-4", "img-2", "img-1", "img-0"]
        assert qmp.find("BLOCK_JOB_COMPLETED", since, device="j1") is None
        await qmp.cmd("job-finalize", id="j1")
        name, data = await qmp.wait_job_end("j1", since)
        assert name == "BLOCK_JOB_COMPLETED" and "error" not in data
        await qmp.wait_event("JOB_STATUS_CHANGE", since, id="j1", status="null")
        assert qmp.statuses("j1", since) == ["created", "running", "waiting", "pending", "concluded", "null"]
        assert await qmp.chain() == ["img-8", "img-6", "img-4", "img-2", "img-1", "img-0"]

    run_mounted(p9["img-8"], tmp_path, body, seed=24, regions=[(0, 2 * MiB)])
    assert_qemu_clean(*p9.values())
    assert_backing(p9["img-4"], p9["img-2"], "qcow2")
    assert_backing(p9["img-6"], p9["img-4"], "qcow2")
    assert_backing(p9["img-8"], p9["img-6"], "qcow2")


def test_scenario_24_ready_active_commit_pause_and_statuses(tmp_path: Path) -> None:
    """C3, active commit (device=drive0 base-node=base): complete before READY
    -> `Job 'drive0' in state 'running' cannot accept command verb 'complete'`;
    after BLOCK_JOB_READY, pause -> `standby`,
    resume -> `ready`; complete -> COMPLETED. Statuses: created, running,
    ready, standby, ready, waiting, pending, concluded, null, each announced
    by JOB_STATUS_CHANGE. Afterwards the mount is on base (graph), and base
    holds the whole content including the writer's blocks."""
    c3 = make_c3(tmp_path)
    # Data in top at [1.5M,+64K) besides mid's [512K,1M): two dirty runs at least, so the
    # throttle holds the job after its first one and it is still running when complete comes.
    proc = qemu_io(c3["top"], f"write -P 0x77 {1536 * KiB} {64 * KiB}", fmt="qcow2")
    assert proc.returncode == 0, proc.stderr

    async def body(qmp: Qmp, writer: VerifyingWriter) -> None:
        since = qmp.mark()
        await qmp.cmd("block-commit", device="drive0", speed=1 * KiB, **{"base-node": "base"})
        early = await qmp.error("block-job-complete", device="drive0")
        assert early == "Job 'drive0' in state 'running' cannot accept command verb 'complete'"
        await qmp.cmd("block-job-set-speed", device="drive0", speed=0)
        ready = await qmp.wait_event("BLOCK_JOB_READY", since, device="drive0")
        assert ready["type"] == "commit"
        await writer.warm_up(writer.writes + 20)  # writes after READY must reach base too
        await qmp.cmd("block-job-pause", device="drive0")
        await qmp.wait_job("drive0", lambda j: j["status"] == "standby")
        assert (await qmp.job("drive0"))["ready"] is True
        await qmp.cmd("block-job-resume", device="drive0")
        await qmp.wait_job("drive0", lambda j: j["status"] == "ready")
        await qmp.cmd("block-job-complete", device="drive0")
        name, data = await qmp.wait_job_end("drive0", since)
        assert name == "BLOCK_JOB_COMPLETED" and "error" not in data
        await qmp.wait_event("JOB_STATUS_CHANGE", since, id="drive0", status="null")
        assert qmp.statuses("drive0", since) == ["created", "running", "ready", "standby", "ready",
                                                 "waiting", "pending", "concluded", "null"]
        assert await qmp.chain() == ["base"]

    writer = run_mounted_on(c3["top"], c3["base"], tmp_path, body, seed=25)
    assert_qemu_clean(*c3.values())
    assert_backing(c3["top"], c3["mid"], "qcow2")  # no header is rewritten by an active commit
    assert writer.writes > 0
