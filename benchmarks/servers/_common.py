"""Shared plumbing for the benchmark echo servers.

Every server is its own process, started by ``benchmarks/run.py`` as::

    python benchmarks/servers/<stack>.py lines|frames [--profile FILE] [--unix PATH]
                                         [--tls PEM]
    python benchmarks/servers/udp_<stack>.py datagrams [--profile FILE]

It listens on 127.0.0.1 (an ephemeral port), prints ``PORT <n>`` once it is
listening (with ``--unix``, where a server supports it: on a UNIX socket at
PATH, and prints ``UNIX <path>``), echoes 64-byte lines (newline-terminated)
or 4-byte big-endian length-prefixed frames (the UDP servers: every datagram,
to its sender), and exits at once on SIGINT or SIGTERM (after writing its
cProfile statistics, when ``--profile`` was given). With ``--tls PEM`` (a file
holding a private key and its certificate) a TCP server speaks TLS 1.3 with
:func:`tls_context`, its stack's usual way.

The hand-written parsers used by the bare trio server (and by the codec
benchmark as the baseline) live here too.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import resource
import signal
import socket
import ssl
import sys
from types import FrameType

#: listen() backlog for every stack (the idle workload opens thousands).
BACKLOG = 4096
#: Bytes asked of the kernel per receive, where a stack lets us choose.
RECEIVE_SIZE = 65536
#: Longest line any server accepts.
MAX_LINE = 65536
#: Largest frame any server accepts.
MAX_FRAME = 16 * 1024 * 1024
HEADER = 4
#: SO_RCVBUF of every UDP server socket: 50 peers x 32 datagrams in flight
#: overflow the kernel's default (about 200 KiB) for every stack.
UDP_RCVBUF = 4 * 1024 * 1024
#: Largest datagram the UDP servers receive.
UDP_MAX = 65507


def raise_fd_limit() -> int:
    """Raise the soft descriptor limit to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def parse_args(
    description: str,
    modes: tuple[str, ...] = ("lines", "frames"),
    *,
    unix: bool = False,
) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("mode", choices=modes)
    parser.add_argument(
        "--profile", metavar="FILE", help="run under cProfile, dump stats at exit"
    )
    if unix:
        parser.add_argument(
            "--unix", metavar="PATH", help="listen on a UNIX socket at PATH instead"
        )
    parser.add_argument(
        "--tls", metavar="PEM", help="speak TLS 1.3 with this key and certificate"
    )
    return parser.parse_args()


def tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The server's TLS context (TLS 1.3 only), or None without ``--tls``."""
    if not args.tls:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(args.tls)
    return context


def pop_option(name: str, default: str) -> str:
    """Take ``name VALUE`` out of argv (before :func:`setup` parses it)."""
    if name not in sys.argv:
        return default
    at = sys.argv.index(name)
    value = sys.argv[at + 1]
    del sys.argv[at : at + 2]
    return value


def setup(
    description: str,
    modes: tuple[str, ...] = ("lines", "frames"),
    *,
    unix: bool = False,
) -> argparse.Namespace:
    """Parse argv (``unix``: the server takes ``--unix PATH``), raise the fd
    limit, install exit handlers, maybe start profiling."""
    args = parse_args(description, modes, unix=unix)
    raise_fd_limit()
    profiler = cProfile.Profile() if args.profile else None

    def exit_now(signum: int, frame: FrameType | None) -> None:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile)
        sys.stdout.flush()
        os._exit(0)

    signal.signal(signal.SIGINT, exit_now)
    signal.signal(signal.SIGTERM, exit_now)
    if profiler is not None:
        profiler.enable()
    return args


def udp_socket() -> socket.socket:
    """A non-blocking UDP socket on 127.0.0.1 with SO_RCVBUF = UDP_RCVBUF."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF)
    sock.setblocking(False)
    sock.bind(("127.0.0.1", 0))
    return sock


def announce(port: int) -> None:
    """Tell the runner where we listen."""
    sys.stdout.write(f"PORT {port}\n")
    sys.stdout.flush()


def announce_unix(path: str) -> None:
    """Tell the runner we listen on the UNIX socket ``path``."""
    sys.stdout.write(f"UNIX {path}\n")
    sys.stdout.flush()


class LineParser:
    """Newline-terminated lines out of a bytearray, as a careful user writes it.

    The search resumes where the last unsuccessful one stopped, and a
    complete line is removed with ``del buf[:n]`` (O(1) at the front of a
    CPython bytearray).
    """

    __slots__ = ("buf", "scan")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.scan = 0

    def feed(self, data: bytes) -> None:
        self.buf += data

    def next(self) -> bytes | None:
        buf = self.buf
        end = buf.find(b"\n", self.scan)
        if end < 0:
            if len(buf) > MAX_LINE:
                raise ValueError("line too long")
            self.scan = len(buf)
            return None
        line = bytes(buf[:end])
        del buf[: end + 1]
        self.scan = 0
        return line


class FrameParser:
    """4-byte big-endian length-prefixed frames out of a bytearray."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> None:
        self.buf += data

    def next(self) -> bytes | None:
        buf = self.buf
        if len(buf) < HEADER:
            return None
        size = int.from_bytes(buf[:HEADER], "big")
        if size > MAX_FRAME:
            raise ValueError("frame too large")
        end = HEADER + size
        if len(buf) < end:
            return None
        payload = bytes(buf[HEADER:end])
        del buf[:end]
        return payload


def parser_for(mode: str) -> type[LineParser] | type[FrameParser]:
    return LineParser if mode == "lines" else FrameParser


def encode(mode: str, message: bytes) -> bytes:
    """One reply on the wire."""
    if mode == "lines":
        return message + b"\n"
    return len(message).to_bytes(HEADER, "big") + message
