"""Live external snapshots (QEMU's blockdev-snapshot-sync): a new overlay over a device's active node.

`snapshot_sync` creates the qcow2 overlay (mode `absolute-paths`: a new
file whose backing is the active node's file by its absolute path, as QEMU
names it) or takes an existing one (mode `existing`: it must already name
the active node's file as its backing), opens it read-write, and then, in
the graph's order, drains (requests in flight finish, new ones wait; none
fails), looks the device's root up again, links the overlay above it and
moves the device onto the overlay (`BlockBackend.replace_root`). Writes
after it land in the overlay. Nothing is changed when any step is refused.
Then the old root becomes a read-only backing, with a backing's locks: its
write-back and syncs run after the drain, in worker threads (a sync inside
the drain held every guest request for up to 70 ms), and only its reopen
drains again, with nothing left to sync.
"""

from __future__ import annotations

import os
from typing import Any

from imgchain.chain import _unique, node_name_for, open_image, resolve_backing_name
from imgchain.create import create_qcow2
from imgchain.graph import BlockGraph
from imgchain.node import Node, attach_backing

from .copy import sync_outside_drain
from .job import JobError


def _device_root(graph: BlockGraph, args: dict[str, Any]) -> Node:
    if ("device" in args) == ("node-name" in args):
        raise JobError("Exactly one of 'device' and 'node-name' must be specified")
    name = args.get("device", args.get("node-name"))
    node = graph.lookup(name)
    if graph.backend_of(node) is None:
        raise JobError(f"Node '{name}' is not the active node of a device (it has an overlay)")
    return node


def _prepare_overlay(node: Node, path: str, mode: str) -> None:
    """Create the overlay file, or check the existing one names `node` as its backing."""
    if mode == "absolute-paths":
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except OSError as exc:
            raise JobError(f"Could not create '{path}': {exc.strerror}") from None
        create_qcow2(path, node.size, backing_file=os.path.abspath(node.filename),
                     backing_format=node.format_name)
        return
    if mode != "existing":
        raise JobError(f"Parameter 'mode' does not accept value '{mode}'")
    probe = open_image(path, False, "qcow2", lock=None)
    try:
        name = probe.driver.backing_file
    finally:
        probe.close()
    same = False
    if name:
        try:
            same = os.path.samefile(resolve_backing_name(path, name), node.filename)
        except OSError:
            same = False
    if not same:
        raise JobError(f"'{path}' does not name '{node.filename}' as its backing file")


async def _make_backing_read_only(graph: BlockGraph, node: Node) -> None:
    """The old root, a backing that nothing writes now: what the guest wrote
    into it is written back and synced in worker threads while the guest
    writes to the overlay, then it is reopened read-only in a drain of its
    own, whose close finds nothing left to sync. A job that took it
    meanwhile (a commit into it) keeps it writable until the job ends,
    which then reopens it read-only (`Job.clean`)."""
    await sync_outside_drain(graph, node)

    def still_a_free_backing() -> bool:
        return graph.nodes.get(node.node_name) is node and not node.blockers and graph.backend_of(node) is None

    await graph.reopen_drained(node, False, still_a_free_backing)


async def snapshot_sync(graph: BlockGraph, args: dict[str, Any]) -> Node:
    """QMP blockdev-snapshot-sync; returns the new active node."""
    root = _device_root(graph, args)
    graph.check_not_busy([root])
    if args.get("format", "qcow2") != "qcow2":
        raise JobError(f"Snapshot format '{args['format']}' is not supported (qcow2)")
    path = args["snapshot-file"]
    name = args.get("snapshot-node-name")
    if name is not None and graph.find(name) is not None:
        raise JobError(f"Duplicate nodes with node-name='{name}'")
    created = args.get("mode", "absolute-paths") == "absolute-paths"
    _prepare_overlay(root, path, args.get("mode", "absolute-paths"))
    writable = root.writable  # a read-only device gets a read-only overlay, as in QEMU
    try:
        overlay = open_image(path, writable, "qcow2", name or _unique(node_name_for(path), set(graph.nodes)))
    except BaseException:
        if created:
            os.unlink(path)
        raise
    # The listeners (the mount record) hear of the overlay, and a guest flush
    # returns, only once what the guest wrote into the old root is durable.
    with graph.changes_held():
        try:
            async with graph.drained():
                backend = graph.backend_of(root)
                if backend is None or root.blockers:  # changed while draining
                    raise JobError(f"Node '{root.node_name}' changed while the snapshot waited; nothing was done")
                with graph.lock.write():
                    attach_backing(overlay, root)
                    graph.nodes[overlay.node_name] = overlay
                    backend.replace_root(overlay)
            graph.changed()
        except BaseException:
            if overlay.node_name not in graph.nodes:
                overlay.close()
                if created:
                    os.unlink(path)
            raise
        if root.writable:
            await _make_backing_read_only(graph, root)
    return overlay
