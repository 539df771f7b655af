"""The QEMU Machine Protocol (QMP) subset: framing, negotiation, dispatch, and a trio server.

`QmpSession` is the pure part (h11-style): feed it bytes, it returns the bytes
to send; it owns the negotiation state (greeting, `qmp_capabilities` first)
and turns every malformed input into a QMP error, never an exception.
Commands are `Command` records with an argument schema, validated here with
QEMU's error texts. `serve_qmp` is the socket part: a Unix socket (mode 0600)
whose clients each get a session, plus event broadcast.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import trio

from .errors import ImgchainError
from .qmp_json import JsonError, JsonStreamer, encode_message

log = logging.getLogger("imgchain.qmp")
RECEIVE_SIZE = 16384  # bytes framed per turn of the loop: a few milliseconds at most
LISTEN_BACKLOG = max(128, socket.SOMAXCONN)

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
TYPES = {"str": (str, "string"), "int": (int, "int"), "bool": (bool, "boolean"),
         "dict": (dict, "object"), "list": (list, "array")}


class QmpError(Exception):
    """A command failed: becomes {"error": {"class": ..., "desc": ...}}."""

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


@dataclass
class Command:
    """One QMP command: its handler and its arguments {name: (type, required)}."""

    name: str
    handler: Handler
    args: dict[str, tuple[str, bool]] = field(default_factory=dict)

    def validate(self, arguments: dict[str, Any]) -> None:
        """QEMU's argument errors: unexpected, missing, wrong type."""
        for key in arguments:
            if key not in self.args:
                raise QmpError(f"Parameter '{key}' is unexpected")
        for key, (kind, required) in self.args.items():
            if key not in arguments:
                if required:
                    raise QmpError(f"Parameter '{key}' is missing")
                continue
            pytype, label = TYPES[kind]
            value = arguments[key]
            if not isinstance(value, pytype) or (kind == "int" and isinstance(value, bool)):
                raise QmpError(f"Invalid parameter type for '{key}', expected: {label}")


def greeting(version: tuple[int, int, int], package: str) -> dict[str, Any]:
    major, minor, micro = version
    return {"QMP": {"version": {"qemu": {"major": major, "minor": minor, "micro": micro},
                                "package": package}, "capabilities": []}}


def encode(message: dict[str, Any]) -> bytes:
    return encode_message(message)


def event_message(name: str, data: dict[str, Any]) -> dict[str, Any]:
    now = time.time()
    return {"event": name, "data": data,
            "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1_000_000)}}


def error_reply(desc: str, error_class: str = "GenericError", msg_id: Any = None) -> dict[str, Any]:
    reply: dict[str, Any] = {"error": {"class": error_class, "desc": desc}}
    if msg_id is not None:
        reply["id"] = msg_id
    return reply


class QmpSession:
    """One client's protocol state (pure: no I/O)."""

    def __init__(self, commands: dict[str, Command]) -> None:
        self.commands = commands
        self.negotiated = False
        self._streamer = JsonStreamer()

    def feed(self, data: bytes) -> list[Any]:
        """Parse what arrived; returns requests and ready error replies
        (tuples ("reply", message)) in order. An incomplete message waits for
        more bytes, as QEMU's JSON streamer does; a broken one is answered
        with one error (qmp_json says which inputs are refused and how the
        stream picks up again)."""
        return [("reply", error_reply(m.desc)) if isinstance(m, JsonError) else m
                for m in self._streamer.feed(data)]

    def check_request(self, msg: Any) -> tuple[Command, dict[str, Any]]:
        """Validate a request's shape and negotiation state; QmpError if bad."""
        if not isinstance(msg, dict):
            raise QmpError("QMP input must be a JSON object")
        for key in msg:
            if key not in ("execute", "arguments", "id", "exec-oob"):
                raise QmpError(f"QMP input member '{key}' is unexpected")
        if "exec-oob" in msg:
            raise QmpError("QMP input member 'exec-oob' is unexpected: out-of-band is not enabled")
        if "execute" not in msg:
            raise QmpError("QMP input lacks member 'execute'")
        name, arguments = msg["execute"], msg.get("arguments", {})
        if not isinstance(name, str):
            raise QmpError("QMP input member 'execute' must be a string")
        if not isinstance(arguments, dict):
            raise QmpError("QMP input member 'arguments' must be an object")
        return self._lookup(name), arguments

    def _lookup(self, name: str) -> Command:
        if name == "qmp_capabilities":
            if self.negotiated:
                raise QmpError("Capabilities negotiation is already complete, command ignored",
                               "CommandNotFound")
        elif not self.negotiated:
            raise QmpError("Expecting capabilities negotiation with 'qmp_capabilities'",
                           "CommandNotFound")
        command = self.commands.get(name)
        if command is None:
            raise QmpError(f"The command {name} has not been found", "CommandNotFound")
        return command

    async def execute(self, msg: Any) -> dict[str, Any]:
        """Run one request and build its reply (never raises for bad input)."""
        msg_id = msg.get("id") if isinstance(msg, dict) else None
        try:
            command, arguments = self.check_request(msg)
            command.validate(arguments)
            result = await command.handler(arguments)
            if command.name == "qmp_capabilities":
                self.negotiated = True
        except QmpError as exc:
            return error_reply(exc.desc, exc.error_class, msg_id)
        except (ImgchainError, OSError) as exc:
            return error_reply(str(exc), "GenericError", msg_id)
        except Exception as exc:  # a defect must cost one reply, never the session
            log.exception("QMP command failed")
            return error_reply(f"internal error: {type(exc).__name__}: {exc}", "GenericError", msg_id)
        reply: dict[str, Any] = {"return": {} if result is None else result}
        if msg_id is not None:
            reply["id"] = msg_id
        return reply


@dataclass(eq=False)
class _Client:
    session: QmpSession
    stream: trio.SocketStream
    send_lock: trio.Lock = field(default_factory=trio.Lock)

    async def send(self, message: bytes) -> None:
        async with self.send_lock:
            await self.stream.send_all(message)


class QmpServer:
    """Serves QMP sessions on a Unix socket and broadcasts events to negotiated clients."""

    def __init__(self, path: str, commands: dict[str, Command], hello: dict[str, Any]) -> None:
        self.path = path
        self.commands = commands
        self.hello = hello
        self._clients: list[_Client] = []

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            await sock.bind(self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(LISTEN_BACKLOG)
        listener = trio.SocketListener(sock)
        task_status.started()
        await trio.serve_listeners(self._handle, [listener])

    async def _handle(self, stream: trio.SocketStream) -> None:
        client = _Client(QmpSession(self.commands), stream)
        self._clients.append(client)
        try:
            await client.send(encode(self.hello))
            while chunk := await stream.receive_some(RECEIVE_SIZE):
                for item in client.session.feed(chunk):
                    reply = item[1] if isinstance(item, tuple) else await client.session.execute(item)
                    await client.send(encode(reply))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:  # a defect closes this client only, never the server
            log.exception("QMP session ended by an internal error")
        finally:
            self._clients.remove(client)
            await stream.aclose()

    async def emit(self, name: str, data: dict[str, Any]) -> None:
        """Send an event to every negotiated client."""
        message = encode(event_message(name, data))
        for client in list(self._clients):
            if client.session.negotiated:
                try:
                    await client.send(message)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
