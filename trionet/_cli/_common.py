"""What the commands share: errors with exit codes, argument parsing, output."""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from .._util import format_address as format_address

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_RUNTIME",
    "EXIT_USAGE",
    "CliError",
    "Parser",
    "UsageError",
    "format_address",
    "parse_duration",
    "parse_host",
    "parse_host_port",
    "parse_rate",
    "say",
]

#: Exit code for bad command-line input.
EXIT_USAGE = 2
#: Exit code for a failure while running (nothing listening, errors in a run).
EXIT_RUNTIME = 1
#: Exit code after Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """An error the command reports in one line, then exits with ``exit_code``."""

    def __init__(
        self, message: str, exit_code: int = EXIT_RUNTIME, *, prog: str | None = None
    ) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        #: The command to name in the message (None: the one that ran).
        self.prog = prog


class UsageError(CliError):
    """Bad command-line input (exit code 2)."""

    def __init__(self, message: str, *, prog: str | None = None) -> None:
        super().__init__(message, EXIT_USAGE, prog=prog)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are exceptions, reported in one line.

    A value that starts with ``-`` and a digit (``-d -5s``, ``--rate -1/s``)
    is taken as the option's value, so that the option's own check refuses it
    with a clear message; argparse before Python 3.13 takes ``-5s`` for an
    unknown option and reports "expected one argument".  (None of our options
    is spelled with a digit, so nothing is lost.)
    """

    # (typeshed spells this as overloads by namespace type; one signature
    # that passes everything on covers them all.)
    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: Any = None
    ) -> tuple[Any, list[str]]:
        if args is None:
            args = sys.argv[1:]
        return super().parse_known_args(_join_negative_values(self, args), namespace)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')", prog=self.prog)


_NEGATIVE = re.compile(r"^-\.?[0-9]", re.ASCII)


def _join_negative_values(
    parser: argparse.ArgumentParser, args: Sequence[str]
) -> list[str]:
    """``-d -5s`` as ``-d=-5s``, for the options of ``parser`` that take a value."""
    takes_value = {
        option
        for action in parser._actions
        if action.nargs is None and action.option_strings
        for option in action.option_strings
    }
    joined: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "--":  # the rest is positional
            joined += args[index:]
            break
        following = args[index + 1] if index + 1 < len(args) else ""
        if arg in takes_value and _NEGATIVE.match(following):
            joined.append(f"{arg}={following}")
            index += 2
            continue
        joined.append(arg)
        index += 1
    return joined


def say(message: str) -> None:
    """Write one line to stderr at once (diagnostics, never results)."""
    print(message, file=sys.stderr, flush=True)


def parse_port(text: str) -> int:
    """A TCP/UDP port number (0 allowed: pick a free one)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 0..65535, not {port}")
    return port


def parse_host(text: str) -> str:
    """A host name or address; an IPv6 address may come in brackets (``[::1]``)."""
    if text.startswith("[") or text.endswith("]"):
        if not (text.startswith("[") and text.endswith("]")) or len(text) < 3:
            raise argparse.ArgumentTypeError(
                f"malformed host {text!r}: expected an IPv6 address in brackets, "
                "e.g. [::1]"
            )
        return text[1:-1]
    return text


def parse_host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPV6]:PORT`` as ``(host, port)``; port in 1..65535."""
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise argparse.ArgumentTypeError(
                f"malformed address {text!r}: expected [IPV6]:PORT, e.g. [::1]:8000"
            )
        host, port_text = text[1:close], text[close + 2 :]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise argparse.ArgumentTypeError(
                f"malformed address {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8000"
            )
        if ":" in host:
            raise argparse.ArgumentTypeError(
                f"malformed address {text!r}: put an IPv6 address in brackets, "
                "e.g. [::1]:8000"
            )
    if not host:
        raise argparse.ArgumentTypeError(f"malformed address {text!r}: no host")
    digits = port_text.isascii() and port_text.isdigit()  # not "²" or "٣"
    if not digits or not 1 <= int(port_text) <= 65535:
        raise argparse.ArgumentTypeError(
            f"malformed address {text!r}: the port must be a number in 1..65535"
        )
    return host, int(port_text)


# A sign is accepted so that "-5s" is refused as negative, not as malformed.
_NUMBER = r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)"
_DURATION = re.compile(rf"^\s*({_NUMBER})\s*(ms|s|m|h)?\s*$", re.ASCII)
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def _positive(what: str, value: float, text: str) -> float:
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{what} must be positive: {text.strip()}")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{what} too long: {text.strip()}")
    return value


def parse_duration(text: str) -> float:
    """``10s``, ``500ms``, ``2m``, ``1h`` or plain seconds, as seconds (> 0)."""
    match = _DURATION.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"not a duration: {text!r} (use e.g. 10s, 500ms, 2m)"
        )
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    return _positive("duration", seconds, text)


_RATE = re.compile(rf"^\s*({_NUMBER})\s*(/s)?\s*$", re.ASCII)


def parse_rate(text: str) -> float:
    """``N/s`` or ``N`` messages per second (> 0)."""
    match = _RATE.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"not a rate: {text!r} (use messages per second, e.g. 1000/s)"
        )
    return _positive("rate", float(match.group(1)), text)


def positive_int(text: str) -> int:
    """An integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def positive_float(text: str) -> float:
    """A number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, not {text}")
    return value


def non_negative_float(text: str) -> float:
    """A number of seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value
