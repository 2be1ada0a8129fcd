"""The ``cfgx`` command line, one module per command group."""

from cfgx.cli.commands import main

__all__ = ["main"]
