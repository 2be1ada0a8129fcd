"""cfgx: classifier-free guidance experiment runner."""

__version__ = "0.1.0"
