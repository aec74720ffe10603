"""The loaded extension module (prebuilt ``fusedtie._C`` or the JIT build), loaded once."""

from ._build import load_library

LIB = load_library()
