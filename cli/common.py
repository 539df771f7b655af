"""What every command module shares: the root command group and the error and output helpers.

The command modules (cli/images.py, cli/mount.py) import this module and add
their commands to `main` with `@main.command()`; cli/main.py imports them to
register the commands and is the entry point. Nothing here imports a command
module, so imports go one way: main -> images, mount -> common.
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable, NoReturn, TypeVar

import click

from imgchain.errors import USER_ERRORS

F = TypeVar("F", bound=Callable[..., Any])
_SUFFIXES = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="imgchain")
def main() -> None:
    """Disk-image backing chains (qcow2 subset and raw): inspect, check, rebase."""


def parse_size(text: str) -> int:
    """'64M' -> 67108864 (powers of 1024; a plain number is bytes)."""
    t = text.strip().upper()
    unit = t[-1] if t and t[-1] in _SUFFIXES and not t[-1].isdigit() else ""
    number = t[: len(t) - len(unit)]
    try:
        value = float(number) * _SUFFIXES[unit]
    except ValueError:
        raise click.BadParameter(f"invalid size '{text}' (use a number with K, M, G or T)") from None
    if value < 0 or value != int(value):
        raise click.BadParameter(f"invalid size '{text}'")
    return int(value)


class SizeType(click.ParamType):
    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        return parse_size(str(value))


SIZE = SizeType()


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"imgchain: error: {message}", err=True)
    sys.exit(code)


def notice(message: str) -> None:
    """A one-line note on stderr that is not an error (the command goes on)."""
    click.echo(f"imgchain: {message}", err=True)


def error_text(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror}"
    return str(exc)


def user_errors(code: int = 1) -> Callable[[F], F]:
    """Turn core and format errors into one line and exit `code`."""
    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except USER_ERRORS as exc:
                fail(error_text(exc), code)
        return run  # type: ignore[return-value]
    return wrap


def print_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=4))


output_option = click.option("--output", type=click.Choice(["human", "json"]), default="human",
                             show_default=True, help="Output format.")
trust_backing_option = click.option(
    "--trust-backing", is_flag=True,
    help="As root, open backing files of another user's image even where that user could not read them.")
