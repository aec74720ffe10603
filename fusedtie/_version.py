# The one place the version is written: pyproject.toml reads it ([tool.setuptools.dynamic]) and
# fusedtie/__init__.py imports it.
__version__ = "0.1.0"
