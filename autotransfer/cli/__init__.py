"""Command line: `autotransfer <command>`; each command is a small class with its own help.

A user's mistake (AutotransferError) prints one line and exits with 2; `--debug` shows the traceback.
"""

from autotransfer.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
