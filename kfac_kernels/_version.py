"""The package version (read by setup.py too: its one source)."""
__version__ = "0.1.0"
