"""What every ``mlx_moe.*`` command line shares.

A user error (bad flag value, missing or unreadable file, bad config, Hub
failure) prints one line ``mlx_moe.X: error: ...`` and exits 2, as argparse
does; the traceback only with ``--verbose`` or ``MLX_MOE_DEBUG=1``. Ctrl-C and
SIGTERM exit 130 with one line.
"""

import os
import signal
import sys
import traceback


class UsageError(Exception):
    """A user error, printed as one line (exit 2)."""


# Raised by our loaders and writers for bad input: named files, tensors, shapes.
USER_ERRORS = (UsageError, OSError, ValueError)


def _sigterm(signum, frame):
    raise KeyboardInterrupt


def run(prog: str, main, argv=None) -> int:
    """``sys.exit(run("mlx_moe.X", main))``: calls ``main(argv)`` under the rules above."""
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--verbose" in args or os.environ.get("MLX_MOE_DEBUG") == "1"
    try:
        signal.signal(signal.SIGTERM, _sigterm)
    except ValueError:  # not the main thread (tests calling main directly)
        pass
    try:
        main(argv)
        return 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
