"""`imgchain snapshot IMAGE NEW`: a live external snapshot of a mounted chain, else `create -b`.

Mounted (IMAGE is the active image of a live mount, matched by device and
inode): the mount's daemon moves its device onto the new qcow2 overlay NEW
with QMP `blockdev-snapshot-sync`, without unmounting; requests in flight
finish first, later writes land in NEW, and IMAGE becomes its read-only
backing. NEW's backing name is IMAGE's path relative to NEW's folder (so the
pair can be moved together) unless `--absolute`. For the relative name this
command writes NEW itself (same size and format as the active node, the
relative name in its header) and hands it to the daemon in mode `existing`,
which checks that NEW names the active node's file; `--absolute` lets the
daemon create NEW (mode `absolute-paths`, as QEMU names it). If the daemon
refuses (a job holds the device, a node name is taken...), the NEW this
command created is removed again.

Not mounted: the same overlay is created offline (`imgchain create -b IMAGE
NEW` with the backing named as above).

IMAGE must be the chain's active image: an image the mount only reads as a
backing is refused, naming the image it is on now. NEW must not exist.
"""

from __future__ import annotations

import os
from typing import Any

import click

from imgchain.create import DEFAULT_CLUSTER_SIZE, create_image, create_qcow2
from imgchain.errors import ImgchainError

from .common import main, output_option, print_json, user_errors
from .jobs import MountedChain, find_mount, through_mountpoint


def backing_name(new: str, backing: str, absolute: bool) -> str:
    """The name NEW's header gives `backing`: its absolute path, or its path relative to NEW's folder."""
    target = os.path.abspath(backing)
    if absolute:
        return target
    # ".." in the name is resolved physically by whoever opens it, so go up from NEW's real folder.
    folder = os.path.realpath(os.path.dirname(os.path.abspath(new)))
    for candidate in (target, os.path.realpath(target)):
        name = os.path.relpath(candidate, folder)
        try:
            if os.path.samefile(os.path.join(folder, name), target):
                return name
        except OSError:
            pass
    return target  # cannot be named relatively (not reachable from NEW's folder): name it absolutely


def _refuse_existing(new: str) -> None:
    if os.path.lexists(new):
        raise ImgchainError(f"Could not create '{new}': {os.strerror(17)}")
    folder = os.path.dirname(os.path.abspath(new))
    if not os.path.isdir(folder):
        raise ImgchainError(f"Could not create '{new}': {os.strerror(2)}")


def _reserve(new: str) -> None:
    """Create NEW empty, exclusively (another process creating it at the same time loses)."""
    try:
        os.close(os.open(new, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except OSError as exc:
        raise ImgchainError(f"Could not create '{new}': {exc.strerror}") from None


def _active_node(mounted: MountedChain) -> dict[str, Any]:
    """The device's node now (query-block's `inserted`) with its absolute file."""
    device = mounted.record.device
    for block in mounted.client.execute("query-block"):
        if block.get("device") == device and block.get("inserted"):
            inserted = dict(block["inserted"])
            files = dict(mounted.nodes)
            inserted["file"] = files.get(inserted["node-name"], inserted["file"])
            return inserted
    raise ImgchainError(f"{mounted.record.mountpoint}: the daemon has no device '{device}'")


def _snapshot_mounted(mounted: MountedChain, image: str, new: str, absolute: bool,
                      node_name: str | None) -> dict[str, Any]:
    mountpoint = mounted.record.mountpoint
    if mounted.record.read_only:
        raise ImgchainError(f"{image} is mounted read-only on {mountpoint}: a live snapshot needs a writable mount")
    active = _active_node(mounted)
    active_file = active["file"]
    if not os.path.samefile(active_file, image):
        raise ImgchainError(f"{image} is a backing image of the chain mounted on {mountpoint}, whose active "
                            f"image is {active_file}: snapshot that one")
    new_abs = os.path.abspath(new)
    _refuse_existing(new)
    name = backing_name(new, active_file, absolute)
    args: dict[str, Any] = {"device": mounted.record.device, "snapshot-file": new_abs, "format": "qcow2"}
    if node_name is not None:
        args["snapshot-node-name"] = node_name
    if absolute:
        args["mode"] = "absolute-paths"
        mounted.client.execute("blockdev-snapshot-sync", **args)
    else:
        args["mode"] = "existing"
        _reserve(new)
        try:
            create_qcow2(new_abs, active["image"]["virtual-size"], DEFAULT_CLUSTER_SIZE,
                         backing_file=name, backing_format=active["drv"])
            mounted.client.execute("blockdev-snapshot-sync", **args)
        except BaseException:
            os.unlink(new_abs)
            raise
    now = _active_node(mounted)
    return {"filename": new_abs, "node-name": now["node-name"], "backing-filename": name,
            "backing": active_file, "backing-node-name": active["node-name"], "mountpoint": mountpoint,
            "device": mounted.record.device, "mounted": True}


def _snapshot_offline(image: str, new: str, absolute: bool, node_name: str | None) -> dict[str, Any]:
    if node_name is not None:
        raise click.UsageError(f"--node-name needs a mounted chain: '{image}' is not mounted")
    _refuse_existing(new)
    name = backing_name(new, image, absolute)
    _reserve(new)
    try:
        done = create_image(new, "qcow2", None, name, None, DEFAULT_CLUSTER_SIZE)
    except BaseException:
        os.unlink(new)
        raise
    return {"filename": os.path.abspath(new), "backing-filename": name, "backing": os.path.abspath(image),
            "backing-format": done["backing_fmt"], "virtual-size": done["size"], "mounted": False}


@main.command()
@click.argument("image")
@click.argument("new")
@click.option("--absolute", is_flag=True, help="Name the backing in NEW's header by its absolute path "
                                               "(default: relative to NEW's folder).")
@click.option("--node-name", "node_name", metavar="NAME",
              help="Mounted chain: the node name of NEW in the daemon (default: NEW's file name without extension).")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing on success.")
@output_option
@user_errors()
def snapshot(image: str, new: str, absolute: bool, node_name: str | None, quiet: bool, output: str) -> None:
    """Create the qcow2 overlay NEW over IMAGE.

    IMAGE mounted (the active image of a live mount): a live external snapshot
    (QMP blockdev-snapshot-sync); the mount moves onto NEW without unmounting,
    later writes land in NEW, IMAGE becomes its read-only backing. Not
    mounted: `imgchain create -b IMAGE NEW`. NEW names IMAGE relative to NEW's
    folder, or by its absolute path with --absolute."""
    image = through_mountpoint(image)
    mounted = find_mount(image)  # IMAGE missing: "Could not open 'IMAGE': No such file or directory"
    if mounted is None:
        doc = _snapshot_offline(image, new, absolute, node_name)
    else:
        try:
            doc = _snapshot_mounted(mounted, image, new, absolute, node_name)
        finally:
            mounted.close()
    if output == "json":
        print_json(doc)
    elif not quiet:
        click.echo(_summary(new, image, doc))


def _summary(new: str, image: str, doc: dict[str, Any]) -> str:
    if doc["mounted"]:
        return (f"{doc['mountpoint']}: now on {new} (node '{doc['node-name']}'), backed by {image} "
                f"(read-only, named '{doc['backing-filename']}')")
    return f"created {new} over {image} (backing named '{doc['backing-filename']}'; not mounted)"
