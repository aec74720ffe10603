# The one place the version is written: setup.py reads it by path, fusedtie/__init__.py imports it.
__version__ = "0.1.0"
