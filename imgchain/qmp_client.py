"""A small synchronous QMP client for the command line (one request at a time).

Connects to a daemon's Unix socket, checks the greeting, negotiates
capabilities, and runs commands, skipping the events that arrive in between.
"""

from __future__ import annotations

import json
import socket
from typing import Any

from .errors import ImgchainError


class QmpClientError(ImgchainError):
    """The daemon answered with an error, or could not be reached."""


class QmpClient:
    def __init__(self, path: str, timeout: float | None = 60) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as exc:
            self.sock.close()
            raise QmpClientError(f"cannot reach the daemon at '{path}': {exc.strerror}") from None
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
