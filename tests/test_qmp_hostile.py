"""Hostile QMP input (issue 7): nothing a client sends ends the daemon, wedges
a client, holds up guest I/O, or makes a reply that is not JSON.

The pure streamer is checked directly; every defect is then checked against a
live mount, and hypothesis throws random bytes and random JSON at a live
session while the mount keeps serving.
"""

from __future__ import annotations

import json
import re
import socket
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgchain import qmp_json
from imgchain.qmp_client import QmpClient
from imgchain.qmp_json import MAX_MESSAGE, MAX_NESTING, MAX_TOKENS, JsonError, JsonStreamer

from .mounting import mount
from .test_qmp import socket_of

VALID = b'{"execute": "query-version", "id": "ok"}\n'


def _feed(*chunks: bytes) -> list:
    streamer = JsonStreamer()
    out: list = []
    for chunk in chunks:
        out += streamer.feed(chunk)
    return out


def test_streamer_limits_and_recovery() -> None:
    deep = _feed(b"[" * 1000 + b"\n" + VALID)
    assert isinstance(deep[0], JsonError) and deep[1]["id"] == "ok"
    just_deep_enough = b"[" * MAX_NESTING + b"]" * MAX_NESTING + b"\n"
    assert _feed(just_deep_enough) == [json.loads(b"[" * MAX_NESTING + b"]" * MAX_NESTING)]
    big = b'{"execute": "x", "arguments": {"s": "' + b"a" * (10 << 20) + b'"}}\n' + VALID
    out = _feed(*(big[i:i + 16384] for i in range(0, len(big), 16384)))
    assert len(out) == 2 and "too large" in out[0].desc and out[1]["id"] == "ok"
    huge = _feed(b'{"id": ' + b"9" * 5000 + b"}\n", b'{"id": 18446744073709551616}\n',
                 b'{"id": 18446744073709551615}\n')
    assert isinstance(huge[0], JsonError) and "out of range" in huge[0].desc
    assert huge[1] == {"id": 1.8446744073709552e19}  # beyond 64 bits: a double, as in QEMU
    assert huge[2] == {"id": 18446744073709551615}
    for literal in (b"NaN", b"Infinity", b"-Infinity", b"1e999"):
        assert isinstance(_feed(b'{"id": ' + literal + b"}\n")[0], JsonError), literal
    assert "UTF-8" in _feed(b'{"execute": "\xff\xfe"}\n')[0].desc
    assert "surrogate" in _feed(b'{"execute": "\\ud800"}\n')[0].desc
    assert _feed(b'{"execute": "\\ud83d\\ude00"}\n') == [{"execute": "\U0001F600"}]
    assert "token count" in _feed(b"[" + b"0," * 5000 + b"0]\n")[0].desc


def test_streamer_frames_across_any_split() -> None:
    stream = b'{"a": "x}\\"{["}\n[1, {"b": [2]}]  \n\n{"execute": "q"}' + b"\n"
    whole = _feed(stream)
    assert whole == [{"a": 'x}"{['}, [1, {"b": [2]}], {"execute": "q"}]
    for cut in range(1, len(stream)):
        assert _feed(stream[:cut], stream[cut:]) == whole, cut


def test_streamer_work_is_bounded_whatever_the_input(monkeypatch: pytest.MonkeyPatch) -> None:
    """Framing looks at each byte once in C and takes a Python step only per
    bracket, string or escape, at most MAX_TOKENS of them per message; so
    megabytes of the worst inputs cost a bounded number of steps (the time
    they take is in bench/qmp_stall.py: tests never assert on timings)."""
    calls = [0]

    class Counting:
        def __init__(self, pattern: re.Pattern[bytes]) -> None:
            self.pattern = pattern

        def search(self, *args: object) -> object:
            calls[0] += 1
            return self.pattern.search(*args)

    monkeypatch.setattr(qmp_json, "_STRUCTURE", Counting(qmp_json._STRUCTURE))
    monkeypatch.setattr(qmp_json, "_STRING_SPECIAL", Counting(qmp_json._STRING_SPECIAL))
    for pattern in (b'""', b"[", b"{", b"a", b'"\\', b"0,", b'"' + b"y" * 4096):
        streamer = JsonStreamer()
        data = pattern * ((1 << 21) // len(pattern))
        calls[0] = 0
        chunks = range(0, len(data), 16384)
        for i in chunks:
            streamer.feed(data[i:i + 16384])
        assert calls[0] <= 2 * MAX_TOKENS + 2 * len(chunks), (pattern[:8], calls[0])
        assert len(streamer._buf) <= MAX_MESSAGE


class Raw:
    """A raw QMP connection: bytes out, one JSON reply per line in."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(30)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")
        assert "QMP" in self.reply()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> dict:
        line = self.file.readline()
        assert line, "the daemon closed the connection"
        return json.loads(line, parse_constant=_no_constant)  # strict JSON only

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def _no_constant(name: str) -> None:
    raise AssertionError(f"reply is not JSON: {name}")


def _assert_serving(disk: Path, path: str) -> None:
    assert disk.read_bytes()[:4] == b"\xaa" * 4
    with QmpClient(path, timeout=30) as client:
        assert client.execute("query-version")["package"].startswith("imgchain")


def test_hostile_messages_against_a_live_mount(chain3: Path) -> None:
    disk = chain3.parent / "disk.img"
    with mount(chain3, disk):
        path = socket_of(disk)
        conn = Raw(path)
        try:
            conn.send(b'{"execute": "qmp_capabilities"}\n')
            assert conn.reply() == {"return": {}}
            cases = [
                b"[" * 1000 + b"]" * 1000 + b"\n",             # deep nesting
                b'{"execute": "query-version", "id": ' + b"7" * 5000 + b"}\n",
                b'{"execute": "query-version", "id": NaN}\n',
                b'{"execute": "query-version", "id": Infinity}\n',
                b'{"execute": "query-version", "id": 1e400}\n',
                b'{"execute": "query-\xc3\x28version"}\n',      # invalid UTF-8
                b'{"execute": "\\udc00"}\n',                     # lone surrogate
                b'{"execute": "query-version", "arguments": {"s": "' + b"x" * (10 << 20) + b'"}}\n',
                b"[" * 100_000 + b"\n",                          # unclosed
            ]
            for case in cases:
                conn.send(case)
                reply = conn.reply()
                assert reply["error"]["class"] == "GenericError", (case[:40], reply)
                conn.send(VALID)  # the connection goes on with the next line
                assert conn.reply()["id"] == "ok", case[:40]
            conn.send(b'{"execute": "query-version", "id": 123456789012345678901234567890}\n')
            assert conn.reply()["id"] == 1.2345678901234568e29
        finally:
            conn.close()
        _assert_serving(disk, path)


def test_a_burst_of_clients_is_served(chain3: Path) -> None:
    disk = chain3.parent / "disk.img"
    with mount(chain3, disk):
        path = socket_of(disk)
        barrier = threading.Barrier(150)
        errors: list[BaseException] = []

        def one() -> None:
            try:
                barrier.wait()
                with QmpClient(path, timeout=60) as client:
                    client.execute("query-version")
            except BaseException as exc:  # noqa: BLE001 - collected and reported below
                errors.append(exc)

        threads = [threading.Thread(target=one) for _ in range(150)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        _assert_serving(disk, path)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)
_REQUEST = st.fixed_dictionaries(
    {"execute": st.sampled_from(["query-version", "query-block", "query-commands", "nope", "quit!"])},
    optional={"arguments": _JSON, "id": _JSON, "extra": _JSON})


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory):
    from .conftest import make_chain3
    chain = make_chain3(tmp_path_factory.mktemp("hostile"))
    disk = chain.parent / "disk.img"
    with mount(chain, disk):
        yield disk, socket_of(disk)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(garbage=st.binary(max_size=300), value=_JSON | _REQUEST)
def test_random_input_never_ends_the_session(live, garbage: bytes, value: object) -> None:
    disk, path = live
    conn = Raw(path)
    try:
        conn.send(b'{"execute": "qmp_capabilities"}\n')
        assert conn.reply() == {"return": {}}
        conn.send(json.dumps(value).encode() + b"\n")
        reply = conn.reply()
        assert "return" in reply or "error" in reply
        conn.send(garbage + b"\n")
        conn.send(b"]" * 200 + b"}" * 200 + b"\n")  # close whatever the garbage opened
        conn.send(VALID)
        while (reply := conn.reply()).get("id") != "ok":
            assert "error" in reply or "return" in reply, reply
    finally:
        conn.close()
    assert disk.read_bytes()[:4] == b"\xaa" * 4
