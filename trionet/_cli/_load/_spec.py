"""The load spec: the ``load`` command's options, their checks, the spec object."""

from __future__ import annotations

import argparse

import attrs

import trionet

from .._common import (
    Parser,
    UsageError,
    format_address,
    parse_duration,
    parse_host_port,
    parse_rate,
    positive_float,
    positive_int,
)

__all__ = [
    "LoadSpec",
    "add_arguments",
    "open_file_limit",
    "size_limit",
    "spec_from_args",
    "validate",
]

#: File descriptors kept back from the open-file limit for everything else.
FD_MARGIN = 32
#: Largest UDP payload over IPv4 (the load tool binds IPv4 or IPv6 by target).
UDP_MAX_SIZE = 65507
#: Seconds an echo may take, by default (TCP: the connection fails with
#: TIMEOUT; UDP: the datagram counts as lost).
DEFAULT_TCP_TIMEOUT = 10.0
DEFAULT_UDP_TIMEOUT = 1.0
#: Hard bound on a ``--messages`` run, by default.
DEFAULT_TIME_LIMIT = 300.0
#: Extra seconds a ``--duration`` run may take to collect its last echoes.
DURATION_SLACK = 30.0


@attrs.frozen(kw_only=True)
class LoadSpec:
    """One load run: what to send, where, how much and how fast."""

    host: str
    port: int
    #: A UNIX socket path to load instead of ``host``/``port``.
    path: str | None = None
    connections: int = 50
    #: Total messages across all connections (None with ``duration``).
    messages: int | None = 10000
    #: Seconds to send for (None with ``messages``).
    duration: float | None = None
    size: int = 64
    #: "line" or "frame" (ignored with ``udp``).
    framing: str = "line"
    pipeline: int = 1
    #: Messages per second across all connections (None: as fast as possible).
    rate: float | None = None
    udp: bool = False
    #: Seconds an echo may take (None: the default for TCP or UDP).
    timeout: float | None = None
    #: Hard bound on the whole run in seconds (None: the default).
    time_limit: float | None = None

    @property
    def reply_timeout(self) -> float:
        """The per-message timeout in effect."""
        if self.timeout is not None:
            return self.timeout
        return DEFAULT_UDP_TIMEOUT if self.udp else DEFAULT_TCP_TIMEOUT

    @property
    def hard_limit(self) -> float:
        """The overall time limit in effect."""
        if self.time_limit is not None:
            return self.time_limit
        if self.duration is not None:
            return self.duration + self.reply_timeout + DURATION_SLACK
        return DEFAULT_TIME_LIMIT

    @property
    def framing_name(self) -> str:
        """How messages are delimited: "line", "frame" or "datagram"."""
        return "datagram" if self.udp else self.framing

    @property
    def target(self) -> str:
        """The server's address as HOST:PORT (an IPv6 host in brackets), or
        its UNIX socket path."""
        if self.path is not None:
            return self.path
        return format_address((self.host, self.port))

    @property
    def transport(self) -> str:
        """ "tcp", "udp" or "unix"."""
        if self.path is not None:
            return "unix"
        return "udp" if self.udp else "tcp"


# ------------------------------------------------------------------ checks


def size_limit(spec: LoadSpec) -> tuple[int, str]:
    """The largest message size the run's framing allows, and where it comes from."""
    if spec.udp:
        return UDP_MAX_SIZE, "the largest UDP payload over IPv4"
    if spec.framing == "line":
        return trionet.Lines().max_length, "Lines().max_length"
    return trionet.Frames().max_size, "Frames().max_size"


def open_file_limit() -> int | None:
    """The soft RLIMIT_NOFILE, or None where it cannot be read."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Unix
        return None
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    return int(soft)


def validate(spec: LoadSpec) -> None:
    """Refuse a run that cannot work, before any connection is made.

    Raises:
        UsageError: the size is over the framing's limit, or there are more
            connections than the open-file limit allows.
    """
    limit, source = size_limit(spec)
    if spec.size > limit:
        raise UsageError(
            f"--size {spec.size} is over the {spec.framing_name} limit of "
            f"{limit} bytes ({source})"
        )
    files = open_file_limit()
    if files is not None and spec.connections > files - FD_MARGIN:
        raise UsageError(
            f"--connections {spec.connections} is more than the open-file limit "
            f"allows: the limit is {files} (ulimit -n), so at most "
            f"{max(0, files - FD_MARGIN)} connections"
        )


# --------------------------------------------------------------- options


def add_arguments(parser: Parser) -> None:
    """Add the ``load`` command's options to its ``parser``."""
    parser.add_argument(
        "target",
        type=parse_host_port,
        nargs="?",
        metavar="HOST:PORT",
        help="the echo server (IPv6 in brackets: [::1]:8000)",
    )
    parser.add_argument(
        "--unix",
        metavar="PATH",
        help="load the echo server on this UNIX socket instead of HOST:PORT",
    )
    parser.add_argument(
        "--connections",
        "-c",
        type=positive_int,
        default=50,
        metavar="N",
        help="connections (UDP: endpoints) to open (50)",
    )
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument(
        "--messages",
        "-n",
        type=positive_int,
        default=None,
        metavar="N",
        help="messages to send in total, across all connections (10000)",
    )
    amount.add_argument(
        "--duration",
        "-d",
        type=parse_duration,
        default=None,
        metavar="TIME",
        help="send for this long instead, e.g. 10s, 500ms, 2m",
    )
    parser.add_argument(
        "--size",
        "-s",
        type=positive_int,
        default=64,
        metavar="BYTES",
        help="bytes per message, at least 1 (64)",
    )
    parser.add_argument(
        "--framing",
        choices=["line", "frame"],
        default=None,
        help="line: newline-terminated; frame: 4-byte length prefix (line)",
    )
    parser.add_argument(
        "--pipeline",
        "-p",
        type=positive_int,
        default=1,
        metavar="N",
        help="messages in flight per connection; 1 is ping-pong (1)",
    )
    parser.add_argument(
        "--rate",
        type=parse_rate,
        default=None,
        metavar="N/s",
        help="at most this many messages per second in total (no limit)",
    )
    parser.add_argument(
        "--udp", action="store_true", help="send UDP datagrams to 'trionet echo --udp'"
    )
    parser.add_argument(
        "--timeout",
        type=positive_float,
        default=None,
        metavar="SECONDS",
        help="how long an echo may take: TCP counts TIMEOUT and drops the "
        "connection, UDP counts the datagram lost (TCP 10, UDP 1)",
    )
    parser.add_argument(
        "--time-limit",
        type=positive_float,
        default=None,
        metavar="SECONDS",
        help="hard bound on the whole run "
        "(300; with --duration: duration + timeout + 30)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of a table"
    )


def spec_from_args(args: argparse.Namespace) -> LoadSpec:
    """The :class:`LoadSpec` the command-line options describe."""
    if (args.target is None) == (args.unix is None):
        raise UsageError("give the server as HOST:PORT or as --unix PATH (one of them)")
    host, port = args.target or ("", 0)
    if args.udp and args.unix is not None:
        raise UsageError(
            "--udp does not apply to --unix: UNIX sockets here are streams"
        )
    if args.udp and args.framing is not None:
        raise UsageError("--framing does not apply to --udp: a datagram is a message")
    messages = args.messages
    if messages is None and args.duration is None:
        messages = 10000
    return LoadSpec(
        host=host,
        port=port,
        path=args.unix,
        connections=args.connections,
        messages=messages,
        duration=args.duration,
        size=args.size,
        framing=args.framing or "line",
        pipeline=args.pipeline,
        rate=args.rate,
        udp=args.udp,
        timeout=args.timeout,
        time_limit=args.time_limit,
    )
