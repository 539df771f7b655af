"""A small synchronous QMP client for the command line (one request at a time).

Connects to a daemon's Unix socket, checks the greeting, negotiates
capabilities, and runs commands, skipping the events that arrive in between.
"""

from __future__ import annotations

import errno
import json
import socket
import time
from typing import Any

from .errors import ImgchainError
from .qmp_json import deep_json

CONNECT_RETRY_SECONDS = 5.0  # a burst of clients can fill the daemon's listen backlog


class QmpClientError(ImgchainError):
    """The daemon answered with an error, or could not be reached."""


def _connect(path: str, timeout: float | None) -> socket.socket:
    """A connected socket; EAGAIN (the listen backlog is full) is retried
    briefly, any other failure is reported at once."""
    deadline = time.monotonic() + CONNECT_RETRY_SECONDS
    delay = 0.001
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            return sock
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EAGAIN or time.monotonic() >= deadline:
                raise QmpClientError(f"cannot reach the daemon at '{path}': {exc.strerror}") from None
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


class QmpClient:
    def __init__(self, path: str, timeout: float | None = 60) -> None:
        self.path = path
        self.sock = _connect(path, timeout)
        self._file = self.sock.makefile("rb")
        self.events: list[dict[str, Any]] = []
        hello = self._receive()
        if "QMP" not in hello:
            raise QmpClientError(f"'{path}' did not greet with QMP")
        self.execute("qmp_capabilities")

    def _receive(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise QmpClientError(f"the daemon at '{self.path}' closed the connection")
        with deep_json():  # query-block of a deep chain
            return json.loads(line)

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run one command; returns its "return" value or raises QmpClientError."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self.sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            reply = self._receive()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise QmpClientError(reply["error"]["desc"])
            return reply.get("return")

    def close(self) -> None:
        self._file.close()
        self.sock.close()

    def __enter__(self) -> "QmpClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
