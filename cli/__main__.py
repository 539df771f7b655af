"""`python -m imgchain.cli` runs the command line."""

from .main import main

main()
