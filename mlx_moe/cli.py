"""What every ``mlx_moe.*`` command line shares.

A user error (bad flag value, missing or unreadable file, bad config, Hub
failure) prints one line ``mlx_moe.X: error: ...`` and exits 2, as argparse
does; the traceback only with ``--verbose`` or ``MLX_MOE_DEBUG=1``. Ctrl-C and
SIGTERM exit 130 with one line. Anything else (a bug) keeps Python's traceback.

A command: ``sys.exit(run("mlx_moe.X", main))`` where ``main(argv)`` parses
with a parser that has :func:`add_verbose` and raises on errors.
"""

import argparse
import math
import os
import signal
import sys
import traceback


def notice(msg: str):
    """One line on stderr about a choice made for the user (not an error)."""
    print(f"mlx_moe: {msg}", file=sys.stderr)


class UsageError(Exception):
    """A user error, printed as one line (exit 2)."""


# Raised by our loaders and writers for bad input: named files, tensors, shapes.
# (json.JSONDecodeError and UnicodeDecodeError are ValueErrors; FileNotFoundError,
# PermissionError and friends are OSErrors.)
USER_ERRORS = (UsageError, OSError, ValueError)

DEBUG_ENV = "MLX_MOE_DEBUG"
VERBOSE_HELP = f"on an error, print the full traceback (also {DEBUG_ENV}=1)"


def add_verbose(parser):
    """Add ``--verbose`` (the traceback of a user error) to ``parser``."""
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    return parser


def checked(convert, ok, what):
    """An argparse ``type``: ``convert`` the text, then require ``ok(value)``;
    otherwise argparse prints ``argument --flag: must be WHAT, got TEXT`` (exit 2)."""

    def parse(text):
        try:
            value = convert(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return parse


positive_int = checked(int, lambda v: v >= 1, "a whole number >= 1")
positive_float = checked(float, lambda v: math.isfinite(v) and v > 0, "a positive number")


def dash_values(parser, argv):
    """argparse reads ``--flag -5%`` (or ``-1e3``, ``-x``) as two options; pass such a
    value as ``--flag=-5%`` so the flag's own check can name the problem."""
    one_value = {s for a in parser._actions if a.nargs is None for s in a.option_strings}
    known = tuple(parser._option_string_actions)
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if (a in one_value and nxt is not None and nxt.startswith("-") and nxt != "--"
                and not any(k.startswith(nxt) for k in known if nxt.startswith("--")) and nxt not in known):
            out.append(f"{a}={nxt}")
            i += 2
            continue
        out.append(a)
        i += 1
    return out


def add_quantize_args(parser, what="quantize while loading"):
    """``-q`` and ``--q-bits/--q-group-size/--q-mode``; any ``--q-*`` implies ``-q``."""
    implies = "; implies -q"
    parser.add_argument("-q", "--quantize", action="store_true",
                        help=f"{what} (default: affine, 4 bits, group size 64)")
    parser.add_argument("--q-bits", type=positive_int, default=None,
                        help="bits per weight (affine: 2, 3, 4, 5, 6, 8)" + implies)
    parser.add_argument("--q-group-size", type=positive_int, default=None,
                        help="weights sharing one scale (affine: 32, 64, 128)" + implies)
    parser.add_argument("--q-mode", default=None, choices=["affine", "mxfp4", "nvfp4", "mxfp8"],
                        help="quantization mode (default: affine)" + implies)


def add_backend_arg(parser):
    """``--backend``, checked against the registered expert backends as it is parsed."""
    parser.add_argument("--backend", default="auto", type=_backend,
                        help="MoE backend: auto (default), gather, loop, fused, prefill")


def _backend(name: str) -> str:
    from .experts import BACKENDS  # lazy: keeps this module light, like QuantSpec below

    if name != "auto" and name not in BACKENDS:
        raise argparse.ArgumentTypeError(
            f"unknown MoE backend {name!r}; available: auto, {', '.join(sorted(BACKENDS))}")
    return name


def quantize_spec(parser, args):
    """The ``quantize`` dict of :func:`add_quantize_args`' flags (None without any),
    checked now: an unsupported combination is an argparse error naming the flag."""
    from .quantization import QuantSpec  # lazy: keeps this module light

    if not (args.quantize or args.q_bits or args.q_group_size or args.q_mode):
        return None
    quantize = {"bits": args.q_bits, "group_size": args.q_group_size, "mode": args.q_mode or "affine"}
    try:
        QuantSpec.parse(quantize)
    except ValueError as e:
        text = str(e)
        flag = "--q-bits" if "bits=" in text else "--q-group-size" if "group_size=" in text else "--q-mode"
        parser.error(f"argument {flag}: {text}")
    return quantize


def message(e: BaseException) -> str:
    """``e`` as one line: ``path: reason`` for OS errors, newlines folded."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        text = f"{e.filename}: {e.strerror}"
        if e.filename2 is not None:
            text += f" (-> {e.filename2})"
    else:
        text = str(e)
        if isinstance(e, KeyError) and e.args:  # str(KeyError) adds quotes
            text = str(e.args[0])
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return "; ".join(lines) or type(e).__name__


def _sigterm(signum, frame):
    raise KeyboardInterrupt


def run(prog: str, main, argv=None) -> int:
    """``sys.exit(run("mlx_moe.X", main))``: calls ``main(argv)`` under the rules above."""
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--verbose" in args or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _sigterm)
    except ValueError:  # not the main thread (tests calling main directly)
        pass
    try:
        main(args)
        return 0
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        newline = "\n" if sys.stderr.isatty() else ""  # end a half-printed line on a terminal
        print(f"{newline}{prog}: interrupted", file=sys.stderr, flush=True)
        return 130
    except BrokenPipeError:  # `mlx_moe.generate ... | head`: the reader left
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141
    except USER_ERRORS as e:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {message(e)}", file=sys.stderr, flush=True)
        return 2
    finally:
        if previous is not None:
            try:
                signal.signal(signal.SIGTERM, previous)
            except ValueError:
                pass
