"""What every command module shares: the root command group and the error and output helpers.

The command modules (cli/images.py, cli/mount.py) import this module and add
their commands to `main` with `@main.command()`. cli/main.py is the entry
point: it tells `main` which module defines which command (`main.lazy`), and
`main` imports a command's module only when that command runs (or help lists
it), so `imgchain info` loads neither the job engine nor trio. Nothing here
imports a command module by name, so imports go one way: main -> images,
mount -> common.
"""

from __future__ import annotations

import functools
import importlib
import sys
from typing import Any, Callable, NoReturn, TypeVar

import click

from imgchain.errors import USER_ERRORS

F = TypeVar("F", bound=Callable[..., Any])
_SUFFIXES = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class LazyGroup(click.Group):
    """A command group whose commands are imported on first use.

    `lazy` maps a command name to the module (relative to this package) whose
    `@main.command()` registers it; after that import the command is an
    ordinary one of the group."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy: dict[str, str] = {}
        self.invoked: str | None = None  # the command this process ran (cli/entry.py asks)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in self.lazy:
            importlib.import_module(self.lazy[cmd_name], __package__)
        return self.commands.get(cmd_name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="imgchain")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Disk-image backing chains (qcow2 subset and raw): inspect, check, rebase."""
    ctx.command.invoked = ctx.invoked_subcommand  # type: ignore[attr-defined]


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
    import json  # only --output json pays for loading it
    click.echo(json.dumps(doc, indent=4))


output_option = click.option("--output", type=click.Choice(["human", "json"]), default="human",
                             show_default=True, help="Output format.")
trust_backing_option = click.option(
    "--trust-backing", is_flag=True,
    help="As root, open backing files of another user's image even where that user could not read them.")
