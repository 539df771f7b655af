"""The QMP socket of a mount, checked with a client nobody here wrote (qemu.qmp) and with raw bytes."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from pathlib import Path

import pytest
from qemu.qmp import ExecuteError, QMPClient

from .mounting import mount


def socket_of(disk: Path) -> str:
    from imgchain.runtime import find_by_mountpoint
    record = find_by_mountpoint(str(disk))
    assert record is not None
    return record.socket


def test_qemu_qmp_client_queries(chain3: Path) -> None:
    """qemu.qmp is asyncio-based: it runs in its own loop here."""
    disk = chain3.parent / "disk.img"
    with mount(chain3, disk, "--device-name", "vda"):
        path = socket_of(disk)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        asyncio.run(_queries(path, chain3))


async def _queries(path: str, chain3: Path) -> None:
    if True:
        client = QMPClient("test")
        await client.connect(path)
        try:
            version = await client.execute("query-version")
            assert version["package"].startswith("imgchain ")
            assert set(version["qemu"]) == {"major", "minor", "micro"}
            names = {c["name"] for c in await client.execute("query-commands")}
            assert {"query-block", "query-named-block-nodes", "quit", "qmp_capabilities"} <= names
            block = await client.execute("query-block")
            assert block[0]["device"] == "vda"
            inserted = block[0]["inserted"]
            assert (inserted["node-name"], inserted["drv"], inserted["ro"]) == ("top", "qcow2", False)
            assert inserted["file"] == str(chain3)
            nodes = await client.execute("query-named-block-nodes")
            assert [(n["node-name"], n["drv"], n["ro"], n["backing_file_depth"]) for n in nodes] == [
                ("top", "qcow2", False, 2), ("mid", "qcow2", True, 1), ("base", "raw", True, 0)]
            image = nodes[0]["image"]
            assert image["virtual-size"] == 4 << 20 and image["backing-filename"] == "mid.qcow2"
            assert image["backing-image"]["backing-image"]["format"] == "raw"
            with pytest.raises(ExecuteError) as info:
                await client.execute("no-such-command")
            assert info.value.error_class == "CommandNotFound"
            with pytest.raises(ExecuteError) as info:
                await client.execute("query-block", {"bogus": 1})
            assert "Parameter 'bogus' is unexpected" in str(info.value)
        finally:
            await client.disconnect()


def _talk(path: str, *lines: bytes) -> list[dict]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(path)
        f = s.makefile("rb")
        replies = [json.loads(f.readline())]
        for line in lines:
            s.sendall(line)
            replies.append(json.loads(f.readline()))
        return replies


def test_malformed_input_gets_errors_and_the_daemon_keeps_serving(chain3: Path) -> None:
    disk = chain3.parent / "disk.img"
    with mount(chain3, disk):
        path = socket_of(disk)
        replies = _talk(
            path,
            b'{"execute": "query-block"}\n',                 # before negotiation
            b'{"execute": "qmp_capabilities"}\n',
            b'{"execute": "qmp_capabilities"}\n',            # twice
            b'{"execute": "query-block",, "id": 7}\n',       # broken JSON
            b'[1, 2]\n',
            b'{"arguments": {}}\n',
            b'{"execute": 5}\n',
            b'{"execute": "query-version", "arguments": []}\n',
            b'{"execute": "query-version", "extra": 1}\n',
            b'{"execute": "query-named-block-nodes", "arguments": {"flat": "yes"}}\n',
            b'{"execute": "nope", "id": "x1"}\n',
            b'{"execute": "query-version", "id": {"a": 1}}\n',
        )
        assert "QMP" in replies[0]
        classes = [r.get("error", {}).get("class") for r in replies[1:]]
        assert classes == ["CommandNotFound", None, "CommandNotFound", "GenericError", "GenericError",
                           "GenericError", "GenericError", "GenericError", "GenericError",
                           "GenericError", "CommandNotFound", None]
        descs = [r.get("error", {}).get("desc", "") for r in replies[1:]]
        assert "Expecting capabilities negotiation" in descs[0]
        assert descs[3].startswith("JSON parse error")
        assert "must be a JSON object" in descs[4]
        assert "lacks member 'execute'" in descs[5]
        assert "Invalid parameter type for 'flat', expected: boolean" in descs[9]
        assert replies[11]["id"] == "x1" and replies[12]["id"] == {"a": 1}
        # garbage bytes, then a client that vanishes mid-message: the mount keeps working
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
            s.sendall(b"\xff\xfe{{{{ not json \x00\n{\"execute\":")
        assert disk.read_bytes()[:4] == b"\xaa" * 4
        assert _talk(path, b'{"execute": "qmp_capabilities"}\n')[1] == {"return": {}}
