"""`python -m imgchain.cli` runs the command line, as the `imgchain` executable does."""

from .entry import run

run()
