"""The ``trionet`` command: ``echo``, ``load`` and ``bench``.

Run it as ``trionet ...`` (the console script) or ``python -m trionet ...``.
Every command reports bad input and failures in one line on stderr, never
with a traceback: exit code 2 for bad command-line input, 1 for a failure
while running (nothing listening, errors during a load), 130 for Ctrl-C.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ._common import (
    EXIT_INTERRUPTED,
    EXIT_RUNTIME,
    EXIT_USAGE,
    CliError,
    Parser,
    UsageError,
)

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = ["main"]


def _build_parser() -> Parser:
    from .. import __version__
    from . import _bench, _echo, _load

    parser = Parser(
        prog="trionet",
        description=(
            "trionet's command line: an echo server, a load tool, and a "
            "benchmark that runs one against the other on loopback."
        ),
    )
    parser.add_argument("--version", action="version", version=f"trionet {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _echo.add_parser(commands)
    _load.add_parser(commands)
    _bench.add_parser(commands)
    return parser


def _leaves(error: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, or ``[error]``."""
    if isinstance(error, BaseExceptionGroup):
        found = []
        for inner in error.exceptions:
            found += _leaves(inner)
        return found
    return [error]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``trionet`` command with ``argv`` (default ``sys.argv[1:]``).

    Returns:
        The exit code: 0 on success, 1 for a failure while running, 2 for bad
        command-line input, 130 after Ctrl-C.

    .. versionadded:: 0.1
    """
    parser = _build_parser()
    prog = parser.prog
    try:
        # Arguments no parser knows are reported by the command they were
        # given to (argparse would name the top-level parser).
        argv = sys.argv[1:] if argv is None else list(argv)
        args, unknown = parser.parse_known_args(argv)
        if args.command is not None:
            prog = f"trionet {args.command}"
        if unknown:
            given_to = prog
            if args.command is not None:
                before = argv[: argv.index(args.command)]
                if any(arg in before for arg in unknown):
                    given_to = parser.prog
            raise UsageError(
                f"unrecognized arguments: {' '.join(unknown)} "
                f"(see '{given_to} --help')",
                prog=given_to,
            )
        if args.command is None:
            raise UsageError(
                "choose a command: echo, load or bench (see 'trionet --help')"
            )
        code: int = args.run(args)
        return code
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BaseException as exc:
        leaves = _leaves(exc)
        if any(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
            print(f"{prog}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        if not all(isinstance(leaf, Exception) for leaf in leaves):
            raise
        # One line, never a traceback: our own errors first, else the first cause.
        ours = [leaf for leaf in leaves if isinstance(leaf, CliError)]
        if ours:
            error: BaseException = ours[0]
            code = ours[0].exit_code
            message = str(error)
        else:
            error = leaves[0]
            code = EXIT_RUNTIME
            message = f"{type(error).__name__}: {error}"
        if isinstance(error, UsageError):
            code = EXIT_USAGE
        if isinstance(error, CliError) and error.prog:
            prog = error.prog
        print(f"{prog}: error: {message}", file=sys.stderr)
        return code
