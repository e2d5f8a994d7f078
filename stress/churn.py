"""Connection churn: N x (connect, one echo, close); trionet beside bare trio.

For each server (a child process) and each concurrency (1 and 50 clients at
once): run N short connections from this process -- connect, send one line,
read its echo, close -- and count errors.  Then check that the server's
registry is back to 0 and that its open file descriptors are back to the
count before the run.  Prints connections per second.

``--quick`` runs 500 connections instead of 10,000.
"""

from __future__ import annotations

import argparse
import time

import _common
import trio

LINE = b"churn\n"


async def one_connection(port: int) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        await stream.send_all(LINE)
        reply = b""
        for _ in range(10):
            data = await stream.receive_some(100)
            if not data:
                break
            reply += data
            if len(reply) >= len(LINE):
                break
        if reply != LINE:
            raise RuntimeError(f"bad echo {reply!r}")
    finally:
        await stream.aclose()


async def churn(implementation: str, total: int, concurrency: int) -> list[object]:
    child, port = await _common.start_server(__file__, implementation)
    try:
        await one_connection(port)  # warm up
        await child.wait_open(0)
        fds_before = _common.fd_count(child.pid)
        errors = 0
        remaining = total

        async def worker() -> None:
            nonlocal remaining, errors
            while remaining > 0:
                remaining -= 1
                try:
                    await one_connection(port)
                except (OSError, RuntimeError, trio.BrokenResourceError):
                    errors += 1

        started = time.monotonic()
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
        seconds = time.monotonic() - started
        registry = await child.wait_open(0)
        fds_after = _common.fd_count(child.pid)
    finally:
        await child.stop()
    return [
        implementation,
        concurrency,
        total,
        errors,
        f"{total / seconds:.0f}",
        registry,
        f"{fds_before} -> {fds_after}",
    ]


async def main(total: int) -> None:
    _common.raise_fd_limit()
    rows = []
    for concurrency in (1, 50):
        for implementation in _common.IMPLEMENTATIONS:
            rows.append(await churn(implementation, total, concurrency))
            print(*rows[-1], sep="  ", flush=True)
    _common.print_table(
        "Churn: connect, one echo, close (server in its own process)",
        [
            "server",
            "concurrency",
            "connections",
            "errors",
            "conn/s",
            "registry after",
            "server fds",
        ],
        rows,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="500 connections")
    parser.add_argument("--connections", type=int, default=10_000, metavar="N")
    args = parser.parse_args()
    if args.serve:
        trio.run(_common.serve, args.serve, "lines")
    else:
        trio.run(main, 500 if args.quick else args.connections)
