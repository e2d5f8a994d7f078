"""Hold N idle connections, then ping every one; trionet beside bare trio.

For each N (1,000, 5,000 and 9,000 by default) and each server: start the
server in a child process, measure its memory, open N connections from this
process, wait until the server's registry holds N, measure again, send every
connection a ping line and check that every one answers, check the registry
still says N, then close everything and check it says 0.

Prints server memory per held connection (VmRSS growth / N), pings
answered, and the registry counts.  ``--quick`` holds 200 connections.
Needs about 2 x N + 100 file descriptors (the soft limit is raised to the
hard limit in every process).
"""

from __future__ import annotations

import argparse
import sys
import time

import _common
import trio

PING = b"ping\n"


async def connect_all(port: int, count: int) -> list[trio.SocketStream]:
    streams: list[trio.SocketStream] = []
    limiter = trio.CapacityLimiter(200)

    async def one() -> None:
        async with limiter:
            streams.append(await trio.open_tcp_stream("127.0.0.1", port))

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)
    return streams


async def ping_all(streams: list[trio.SocketStream]) -> int:
    answered = 0
    limiter = trio.CapacityLimiter(500)

    async def one(stream: trio.SocketStream) -> None:
        nonlocal answered
        async with limiter:
            await stream.send_all(PING)
            reply = b""
            for _ in range(10):
                reply += await stream.receive_some(100)
                if len(reply) >= len(PING):
                    break
            if reply == PING:
                answered += 1

    with trio.move_on_after(120):
        async with trio.open_nursery() as nursery:
            for stream in streams:
                nursery.start_soon(one, stream)
    return answered


async def hold(implementation: str, count: int) -> list[object]:
    child, port = await _common.start_server(__file__, implementation)
    try:
        # Warm up the server's code paths with one exchange.
        warm = await connect_all(port, 1)
        assert await ping_all(warm) == 1
        await warm[0].aclose()
        await child.wait_open(0)
        before = _common.proc_status(child.pid)["VmRSS"]
        started = time.monotonic()
        streams = await connect_all(port, count)
        registry_held = await child.wait_open(count)
        connect_seconds = time.monotonic() - started
        after = _common.proc_status(child.pid)["VmRSS"]
        answered = await ping_all(streams)
        registry_after_ping = int((await child.command("stats"))["open"])
        for stream in streams:
            await stream.aclose()
        registry_after_close = await child.wait_open(0)
    finally:
        await child.stop()
    per_connection = (after - before) / count
    return [
        implementation,
        count,
        f"{per_connection:.1f}",
        f"{answered}/{count}",
        registry_held,
        registry_after_ping,
        registry_after_close,
        f"{connect_seconds:.1f}",
    ]


async def main(sizes: list[int]) -> None:
    limit = _common.raise_fd_limit()
    if 2 * max(sizes) + 100 > limit:
        sys.exit(f"needs {2 * max(sizes) + 100} descriptors; the limit is {limit}")
    rows = []
    for count in sizes:
        for implementation in _common.IMPLEMENTATIONS:
            rows.append(await hold(implementation, count))
            print(*rows[-1], sep="  ", flush=True)
    _common.print_table(
        "Idle connections held, then pinged (server in its own process)",
        [
            "server",
            "connections",
            "KiB/conn",
            "pings answered",
            "registry held",
            "after ping",
            "after close",
            "connect s",
        ],
        rows,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="hold 200 connections")
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[1000, 5000, 9000], metavar="N"
    )
    args = parser.parse_args()
    if args.serve:
        trio.run(_common.serve, args.serve, "lines")
    else:
        trio.run(main, [200] if args.quick else args.sizes)
