"""Fault injection for tests (QEMU's blkdebug), inert unless IMGCHAIN_BLKDEBUG is set.

Rules come from the JSON file named by IMGCHAIN_BLKDEBUG: a list of
{"image": PATH-or-node-name, "op": "read"|"write"|"flush"|"cow", "offset": N,
"length": N, "errno": "EIO"|"ENOSPC", "delay_ms": N, "once": bool}.
Offsets are guest offsets of the node the rule names. A request that reaches
a matching node first waits `delay_ms` (an await, so other requests and jobs
run meanwhile) and then fails with `errno` if one is given. A read is taken to
reach every node of the chain below the one it is issued on; a write and a
flush reach only the node they are issued on. "cow" is the data half of a
guest write's copy-on-write done off the loop (QEMU's cow_write event), on
the whole cluster: it waits with the cluster's allocation in flight, so
requests that come meanwhile meet it; an errno fails that write.
"""

from __future__ import annotations

import errno as errno_mod
import json
import os
from dataclasses import dataclass
from typing import Awaitable, Callable

from .errors import ImgchainError
from .node import Node

ENV = "IMGCHAIN_BLKDEBUG"
OPS = ("read", "write", "flush", "cow")


@dataclass
class Rule:
    image: str
    op: str
    offset: int = 0
    length: int | None = None
    errno: int | None = None
    delay_ms: int = 0
    once: bool = False
    spent: bool = False

    def matches(self, node: Node, op: str, offset: int, length: int) -> bool:
        if self.spent or op != self.op or not _names(node, self.image):
            return False
        if op == "flush" or self.length is None:
            return True
        return offset < self.offset + self.length and self.offset < offset + max(length, 1)


def _names(node: Node, image: str) -> bool:
    if image == node.node_name or image == node.filename:
        return True
    try:
        return os.path.samefile(image, node.filename)
    except OSError:
        return False


def _parse_rule(raw: object, where: str) -> Rule:
    if not isinstance(raw, dict) or "image" not in raw or raw.get("op") not in OPS:
        raise ImgchainError(f"{where}: each rule needs \"image\" and \"op\" (read, write, flush, cow): {raw!r}")
    code = raw.get("errno")
    if code is not None and code not in ("EIO", "ENOSPC"):
        raise ImgchainError(f"{where}: errno must be EIO or ENOSPC, not {code!r}")
    return Rule(image=str(raw["image"]), op=raw["op"], offset=int(raw.get("offset", 0)),
                length=None if raw.get("length") is None else int(raw["length"]),
                errno=getattr(errno_mod, code) if code else None,
                delay_ms=int(raw.get("delay_ms", 0)), once=bool(raw.get("once", False)))


class BlkDebug:
    """The active rules; `delay` is the one hook the I/O path calls."""

    def __init__(self, rules: list[Rule]) -> None:
        self.rules = rules

    @classmethod
    def from_environment(cls) -> "BlkDebug":
        path = os.environ.get(ENV)
        if not path:
            return cls([])
        try:
            with open(path) as f:
                raw = json.load(f)
        except (OSError, ValueError) as exc:
            raise ImgchainError(f"{ENV}={path}: cannot read the rules: {exc}") from None
        if not isinstance(raw, list):
            raise ImgchainError(f"{ENV}={path}: expected a JSON list of rules")
        return cls([_parse_rule(r, f"{ENV}={path}") for r in raw])

    async def delay(self, node: Node, op: str, offset: int, length: int,
                    sleep: Callable[[float], Awaitable[None]]) -> None:
        """Apply the rules that match a request issued on `node`, sleeping
        with `sleep` (the loop the request runs on)."""
        if not self.rules:
            return
        reached = node.chain() if op == "read" else [node]
        for rule in self.rules:
            if any(rule.matches(n, op, offset, length) for n in reached):
                rule.spent = rule.once
                if rule.delay_ms:
                    await sleep(rule.delay_ms / 1000)
                if rule.errno is not None:
                    raise OSError(rule.errno, f"{os.strerror(rule.errno)} (injected by {ENV})")
