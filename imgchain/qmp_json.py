"""Framing and decoding of QMP's JSON messages, bounded (QEMU's json-streamer).

A client sends JSON objects back to back on a byte stream. `JsonStreamer`
cuts the stream into messages the way QEMU's streamer does (an object or
array ends when its brackets balance, outside strings; anything else at the
top level ends at a newline) and decodes each one, with limits that make any
input cheap to refuse:

- nesting depth (`MAX_NESTING`), checked while framing, so the decoder never
  recurses deeply;
- message size (`MAX_MESSAGE`) and token count (`MAX_TOKENS`), so decoding one
  message costs at most a few milliseconds of the loop that also serves the
  guest's I/O;
- integers beyond 64 bits become floats (as in QEMU), and a number or
  constant that is not a finite float (`1e999`, `NaN`, `Infinity`) is refused,
  so every reply that echoes an `id` is valid JSON;
- invalid UTF-8 and lone surrogates (`"\\ud800"`) are refused.

Framing is incremental: each byte is examined once by a regular expression,
and a Python step is taken only per bracket or string, of which a message may
hold at most `MAX_TOKENS`. A message that breaks a limit or does not parse is
answered with one error and the stream resynchronises at the next newline (a newline cannot
occur inside a JSON string), so the client goes on being served.
"""

from __future__ import annotations

import json
import math
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

MAX_MESSAGE = 1 << 20  # bytes in one message
MAX_NESTING = 128  # open brackets; far below Python's recursion limit
MAX_TOKENS = 4096  # brackets, strings, commas and colons in one message

DEEP_NESTING = 30_000  # the recursion limit a deep reply is encoded or decoded under (see deep_json)

_STRUCTURE = re.compile(rb'["\[\]{}\n]')
# Inside a string only a quote, a backslash or a raw newline matters. A raw
# newline cannot be in a JSON string: it ends the line, so a broken string
# never swallows the lines after it.
_STRING_SPECIAL = re.compile(rb'["\\\n]')
_INT64_DIGITS = 19
_GO_ON = 0  # a message never ends at offset 0


@dataclass(frozen=True)
class JsonError:
    """A message that could not be decoded; `desc` is the QMP error text."""

    desc: str


class _Refused(ValueError):
    """A number or constant the decoder refuses."""


def _parse_int(text: str) -> int | float:
    digits = len(text) - text.startswith("-")
    if digits <= _INT64_DIGITS + 1:
        value = int(text)
        if -(1 << 63) <= value < (1 << 64):
            return value
    return _parse_float(text)  # as QEMU: out of 64-bit range, a double


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"number '{text[:32]}' is out of range")
    return value


def _parse_constant(text: str) -> Any:
    raise _Refused(f"invalid literal '{text}'")


def decode_message(raw: bytes) -> Any:
    """One framed message -> its value, or a JsonError (never raises)."""
    if raw.count(b",") + raw.count(b":") > MAX_TOKENS:
        return JsonError("JSON parse error, token count limit exceeded")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return JsonError("JSON parse error, invalid UTF-8 sequence")
    try:
        value = json.loads(text, parse_int=_parse_int, parse_float=_parse_float,
                           parse_constant=_parse_constant)
        json.dumps(value, ensure_ascii=False).encode("utf-8")  # lone surrogates fail here
    except _Refused as exc:
        return JsonError(f"JSON parse error, {exc}")
    except json.JSONDecodeError as exc:
        return JsonError(f"JSON parse error, {exc.msg}")
    except UnicodeEncodeError:
        return JsonError("JSON parse error, invalid Unicode escape (lone surrogate)")
    except (ValueError, RecursionError) as exc:  # belt and braces: never escape
        return JsonError(f"JSON parse error, {exc}")
    return value


@contextmanager
def deep_json() -> Any:
    """Let json's C code recurse as deep as a reply nests: query-block nests one
    ImageInfo per image of the chain (as QEMU does), thousands of levels for a
    deep chain, past Python's default recursion limit. The json module needs
    a few hundred bytes of C stack per level, so this bound stays far inside
    the main thread's stack."""
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, DEEP_NESTING))
    try:
        yield
    finally:
        sys.setrecursionlimit(old)


def encode_message(message: dict[str, Any]) -> bytes:
    """A reply or event as one line of JSON (never NaN or Infinity)."""
    try:
        with deep_json():
            return (json.dumps(message, allow_nan=False) + "\r\n").encode()
    except (ValueError, TypeError, RecursionError):
        reply = {k: v for k, v in message.items() if k != "id"}
        try:
            return (json.dumps(reply, allow_nan=False, default=str) + "\r\n").encode()
        except (ValueError, TypeError, RecursionError):
            return b'{"error": {"class": "GenericError", "desc": "reply not encodable"}}\r\n'


class JsonStreamer:
    """Cuts a byte stream into decoded messages (pure: no I/O)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0  # where framing resumes in _buf
        self._depth = 0
        self._in_string = False
        self._steps = 0  # Python steps spent on the current message
        self._discarding = False  # skipping to the next newline after an error

    def feed(self, data: bytes) -> list[Any]:
        """Bytes in; decoded messages (values or JsonError) out, in order."""
        out: list[Any] = []
        if self._discarding:
            data = self._skip_line(data)
        self._buf += data
        while self._buf:
            end = self._frame()
            if end is None:
                if len(self._buf) > MAX_MESSAGE:
                    self._refuse(out, f"JSON parse error, message too large (over {MAX_MESSAGE} bytes)")
                    continue
                break
            if end < 0:
                self._refuse(out, "JSON parse error, nesting or token count limit exceeded, "
                                  "or a line break inside a string")
                continue
            if end > MAX_MESSAGE:
                out.append(JsonError(f"JSON parse error, message too large (over {MAX_MESSAGE} bytes)"))
                del self._buf[:end]
                self._reset()
                continue
            raw = bytes(self._buf[:end])
            del self._buf[:end]
            self._reset()
            if raw.strip():
                out.append(decode_message(raw))
                if isinstance(out[-1], JsonError) and not raw.endswith(b"\n"):
                    self._drop_rest_of_line()
        return out

    def _frame(self) -> int | None:
        """End of the first message in _buf; None if it has not ended, -1 if
        it breaks the nesting or step limit or has a line break in a string."""
        buf = self._buf
        while True:
            if self._in_string:
                step = self._string_step(buf)
                if step != _GO_ON:
                    return step
                continue
            m = _STRUCTURE.search(buf, self._pos)
            if m is None:
                self._pos = len(buf)
                return None
            self._pos = m.end()
            self._steps += 1
            if self._steps > MAX_TOKENS:
                return -1
            ch = buf[m.start()]
            if ch == 0x22:  # "
                self._in_string = True
            elif ch in b"[{":
                self._depth += 1
                if self._depth > MAX_NESTING:
                    return -1
            elif ch in b"]}":
                self._depth -= 1
                if self._depth <= 0:
                    return self._pos
            elif self._depth == 0:  # a newline outside any bracket
                return self._pos

    def _string_step(self, buf: bytearray) -> int | None:
        """Advance inside a string to its next quote or escape: _GO_ON, or
        what _frame returns when framing stops here (None: more bytes
        needed, -1: broken)."""
        m = _STRING_SPECIAL.search(buf, self._pos)
        if m is None:
            self._pos = len(buf)  # nothing in these bytes is looked at again
            return None
        ch = buf[m.start()]
        if ch == 0x0A:  # a raw newline
            return -1
        if ch == 0x22:  # the closing quote
            self._pos, self._in_string = m.end(), False
            return _GO_ON
        if m.end() >= len(buf):  # a backslash whose escaped byte has not arrived
            self._pos = m.start()
            return None
        self._steps += 1
        if buf[m.end()] == 0x0A or self._steps > MAX_TOKENS:
            return -1
        self._pos = m.end() + 1
        return _GO_ON

    def _refuse(self, out: list[Any], desc: str) -> None:
        """Answer the broken message once and skip to the next line."""
        out.append(JsonError(desc))
        del self._buf[:self._pos]
        self._reset()
        self._drop_rest_of_line()

    def _drop_rest_of_line(self) -> None:
        rest = bytes(self._buf)
        self._buf.clear()
        self._discarding = True
        self._buf += self._skip_line(rest)

    def _skip_line(self, data: bytes) -> bytes:
        newline = data.find(b"\n")
        if newline < 0:
            return b""
        self._discarding = False
        return data[newline + 1:]

    def _reset(self) -> None:
        self._pos, self._depth, self._in_string, self._steps = 0, 0, False, 0
