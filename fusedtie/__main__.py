"""``python -m fusedtie``: what fusedtie was built as and runs on, then a self-check of its kernels.

Options: ``--no-check`` (the information only), ``--json`` (one JSON document). Exit status 0 when
every check passed, 1 on a mismatch or a check that raised. See ``fusedtie/info.py``.
"""

import os
import sys

from .info import main

if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:
        # The reader went away (`python -m fusedtie | head`): stop quietly with the status a shell gives
        # a command killed by SIGPIPE (not 1, which means a mismatch), stdout pointed at /dev/null so
        # that Python's own flush at exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(128 + 13)
