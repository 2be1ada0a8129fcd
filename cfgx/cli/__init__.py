"""The ``cfgx`` command line, one module per command group."""

from cfgx.cli.entry import main

__all__ = ["main"]
