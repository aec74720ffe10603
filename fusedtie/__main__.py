"""``python -m fusedtie``: what fusedtie was built as and runs on, then a self-check of its kernels.

Options: ``--no-check`` (the information only), ``--json`` (one JSON document). Exit status 0 when
every check passed, 1 on a mismatch or a check that raised. See ``fusedtie/info.py``.
"""

import sys

from .info import main

if __name__ == "__main__":
    sys.exit(main())
