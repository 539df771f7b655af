"""The `imgchain` command line (click).

Parses arguments, calls the core, prints human or JSON output, and turns
errors into one line on stderr and an exit code: 0 success, 1 failure,
2 usage error (`check` and `compare` keep qemu-img's own codes). Only this
package imports click.
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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="imgchain")
def main() -> None:
    """Disk-image backing chains (qcow2 subset and raw): inspect, check, rebase."""


from . import images  # noqa: E402,F401  (registers the offline commands)
from . import mount  # noqa: E402,F401  (registers mount, unmount, mounts)
