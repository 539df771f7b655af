"""Offline image commands with qemu-img's semantics: create, info, check, map, compare, rebase.

Each command imports its core module when it runs, so that one command does
not pay for loading the others' (start-up time is most of a small `info`)."""

from __future__ import annotations

import sys

import click

from imgchain.errors import USER_ERRORS

from .common import (SIZE, error_text, fail, main, output_option, parse_size, print_json, trust_backing_option,
                     user_errors)

CREATE_OPTIONS = ("cluster_size", "backing_file", "backing_fmt")


def _parse_create_options(text: str | None) -> dict[str, str]:
    opts: dict[str, str] = {}
    for item in filter(None, (text or "").split(",")):
        key, _, value = item.partition("=")
        if key not in CREATE_OPTIONS:
            raise click.BadParameter(f"unsupported option '{key}' (supported: {', '.join(CREATE_OPTIONS)})",
                                     param_hint="'-o'")
        opts[key] = value
    return opts


def _formatting_line(path: str, opts: dict[str, object]) -> str:
    if opts["fmt"] == "raw":
        return f"Formatting '{path}', fmt=raw size={opts['size']}"
    parts = [f"fmt=qcow2 cluster_size={opts['cluster_size']} extended_l2=off compression_type=zlib",
             f"size={opts['size']}"]
    if "backing_file" in opts:
        parts.append(f"backing_file={opts['backing_file']} backing_fmt={opts['backing_fmt']}")
    parts.append("lazy_refcounts=off refcount_bits=16")
    return f"Formatting '{path}', " + " ".join(parts)


@main.command()
@click.option("-f", "fmt", type=click.Choice(["qcow2", "raw"]), default="qcow2", show_default=True,
              help="Image format.")
@click.option("-b", "backing", help="Backing file (stored as given; relative names are "
                                    "resolved against FILE's directory).")
@click.option("-F", "backing_fmt", type=click.Choice(["qcow2", "raw"]),
              help="Backing format (detected when absent).")
@click.option("-o", "options", help="Options: cluster_size=SIZE[,backing_file=..,backing_fmt=..].")
@click.option("-q", "quiet", is_flag=True, help="Print nothing on success.")
@click.argument("file")
@click.argument("size", type=SIZE, required=False)
@user_errors()
def create(fmt: str, backing: str | None, backing_fmt: str | None, options: str | None,
           quiet: bool, file: str, size: int | None) -> None:
    """Create an image FILE of SIZE bytes (K, M, G, T suffixes)."""
    from imgchain import create as create_mod
    opts = _parse_create_options(options)
    backing = backing or opts.get("backing_file")
    backing_fmt = backing_fmt or opts.get("backing_fmt")
    cluster_size = parse_size(opts["cluster_size"]) if "cluster_size" in opts else create_mod.DEFAULT_CLUSTER_SIZE
    if fmt == "raw" and "cluster_size" in opts:
        raise click.BadParameter("cluster_size is a qcow2 option", param_hint="'-o'")
    done = create_mod.create_image(file, fmt, size, backing, backing_fmt, cluster_size)
    if not quiet:
        click.echo(_formatting_line(file, done))


@main.command()
@output_option
@click.option("--backing-chain", is_flag=True, help="Show every image of the chain, top first.")
@click.option("-U", "--force-share", is_flag=True, help="Open even if another process uses the image.")
@click.argument("file")
@user_errors()
def info(output: str, backing_chain: bool, force_share: bool, file: str) -> None:
    """Show an image's format, sizes and backing file (qemu-img info)."""
    from imgchain.info import human_info, image_info
    result = image_info(file, backing_chain=backing_chain, force_share=force_share)
    if output == "json":
        print_json(result)
    else:
        click.echo(human_info(result), nl=False)


@main.command()
@output_option
@click.option("-r", "repair", type=click.Choice(["leaks", "all"]),
              help="Repair leaked clusters, or everything that can be repaired.")
@click.option("-U", "--force-share", is_flag=True, help="Open even if another process uses the image.")
@trust_backing_option
@click.argument("file")
@user_errors()
def check(output: str, repair: str | None, force_share: bool, trust_backing: bool, file: str) -> None:
    """Check an image's metadata (qemu-img check).

    Exit 0 clean, 1 check not completed, 2 corruptions, 3 leaked clusters only."""
    from imgchain.check import check_image
    result = check_image(file, repair=repair, force_share=force_share, trust_backing=trust_backing)
    for line in result.messages:
        click.echo(line, err=True)
    if output == "json" and not result.aborted:
        print_json(result.to_json())
    elif output == "human":
        click.echo(result.human(), nl=False)
    sys.exit(result.exit_code())


@main.command(name="map")
@output_option
@click.option("-U", "--force-share", is_flag=True, help="Open even if another process uses the image.")
@trust_backing_option
@click.argument("file")
@user_errors()
def map_(output: str, force_share: bool, trust_backing: bool, file: str) -> None:
    """Show where each range of the chain's content comes from (qemu-img map)."""
    from imgchain.map import MapError, human_map, map_chain, map_json_pieces
    if output == "json":  # qemu-img's text: one entry per line
        for piece in map_json_pieces(file, force_share=force_share, trust_backing=trust_backing):
            click.echo(piece, nl=False)
        return
    entries = map_chain(file, force_share=force_share, trust_backing=trust_backing)
    try:
        click.echo(human_map(entries, file), nl=False)
    except MapError as exc:
        click.echo(exc.output, nl=False)
        raise


@main.command()
@click.option("-s", "strict", is_flag=True, help="Strict: sizes and allocation must match too.")
@trust_backing_option
@click.argument("image1")
@click.argument("image2")
def compare(strict: bool, trust_backing: bool, image1: str, image2: str) -> None:
    """Compare two chains' guest-visible content.

    Exit 0 identical, 1 different, 2 error."""
    from imgchain.compare import compare_images
    try:
        result = compare_images(image1, image2, strict, trust_backing)
    except USER_ERRORS as exc:
        fail(error_text(exc), 2)
    click.echo(result.message)
    sys.exit(0 if result.identical else 1)


@main.command()
@click.option("-u", "unsafe", is_flag=True, help="Unsafe: rewrite the header only, copy nothing.")
@click.option("-b", "backing", help='New backing file ("" removes it).')
@click.option("-F", "backing_fmt", type=click.Choice(["qcow2", "raw"]), help="New backing format.")
@trust_backing_option
@click.argument("file")
@user_errors()
def rebase(unsafe: bool, backing: str | None, backing_fmt: str | None, trust_backing: bool, file: str) -> None:
    """Change FILE's backing file; safe mode keeps the content identical."""
    from imgchain.rebase import rebase as rebase_image
    if backing is None:
        raise click.UsageError("Must specify backing file (-b) or use unsafe mode (-u)")
    rebase_image(file, backing, backing_fmt, unsafe, trust_backing)
