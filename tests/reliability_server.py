"""A trionet echo server run as a child process by tests/test_reliability.py.

Usage::

    python tests/reliability_server.py lines|frames [--nofile N]

It listens on 127.0.0.1 (an ephemeral port) and echoes lines or frames
(default limits).  On standard output it prints ``port N`` once listening,
``open N`` each time the number of open connections changes, and
``stats {json}`` in answer to a ``stats`` line on standard input.  It logs
the ``trionet`` logger to standard error and exits (status 0) when standard
input ends.

``--nofile N`` lowers the soft RLIMIT_NOFILE to N once everything is
imported, so that the server runs out of file descriptors.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys

import trio

import trionet


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def echo_lines(conn: trionet.Connection) -> None:
    async for line in conn:
        await conn.send(line)


async def echo_frames(conn: trionet.Connection) -> None:
    async for frame in conn:
        await conn.send(frame)


def rss_kib() -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:  # out of descriptors, say
        pass
    return None


async def control(server: trionet.Server) -> None:
    # Commands arrive on stdin; returns when stdin ends.
    stdin = trio.lowlevel.FdStream(os.dup(0))
    pending = b""
    async with stdin:
        while data := await stdin.receive_some():
            pending += data
            *commands, pending = pending.split(b"\n")
            for command in commands:
                if command == b"stats":
                    stats = server.statistics()
                    say(
                        "stats "
                        + json.dumps(
                            {
                                "open": stats.open,
                                "accepted": stats.accepted,
                                "bytes_received": stats.bytes_received,
                                "closed": {
                                    reason.name: count
                                    for reason, count in stats.closed.items()
                                },
                                "rss_kib": rss_kib(),
                            }
                        )
                    )


async def main(mode: str, nofile: int | None) -> None:
    handler = echo_lines if mode == "lines" else echo_frames
    framing: trionet.Framing = trionet.Lines() if mode == "lines" else trionet.Frames()
    open_count = 0

    def opened(conn: trionet.Connection) -> None:
        nonlocal open_count
        open_count += 1
        say(f"open {open_count}")

    def closed(conn: trionet.Connection) -> None:
        nonlocal open_count
        open_count -= 1
        say(f"open {open_count}")

    async with trionet.open_tcp_server(
        handler,
        framing=framing,
        on_connect=opened,
        on_close=closed,
        grace_period=0,
    ) as server:
        if nofile is not None:
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))
        say(f"port {server.port}")
        await control(server)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("lines", "frames"))
    parser.add_argument("--nofile", type=int)
    args = parser.parse_args()
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(message)s"
    )
    trio.run(main, args.mode, args.nofile)
