"""Clients flooding channels the server never reads, beside one that keeps asking.

The server (a child process) runs ``trionet.channels`` with one policy.  Its
handler answers requests on the ``"rpc"`` channel and never reads any other
channel.  This process holds the clients: F of them publish M messages of S
bytes each, round robin on 8 channels that nobody reads, as fast as they
can; one more sends R requests on ``"rpc"``, one every T ms, and waits for
each reply.  The flood is stopped once the requests are done.

For each policy it prints how much the flooders sent, whether they were held
back (``block``: their publishes wait, TCP backpressure) or evicted
(``close``: SLOW_CONSUMER), what the server buffered (per connection at most
``max_buffered_bytes``, or one message more than that when that message is
alone) and dropped (``latest``), whether every request got its reply and how
long the slowest took, and the server's resident memory at the start and at
its peak (VmHWM, from /proc).  There is no bare trio column: the scenario
checks trionet's own bound.

Defaults: 4 flooders x 256 messages of 1 MiB, 200 requests every 10 ms,
``max_buffered_bytes`` 16 MiB.  ``--quick``: 2 flooders x 64 messages of
1 MiB, 40 requests every 5 ms, 4 MiB.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import _common
import trio

import trionet
import trionet.channels

POLICIES = ("block", "latest", "close")
CHANNELS = 8
#: Longest a run's requests (and so its flood) may take, in seconds.
RUN_SECONDS = 120
#: How often the server samples what each connection buffers, in seconds,
#: and for how many samples at most.
SAMPLE_INTERVAL = 0.005
SAMPLES = 100_000
MIB = 1024 * 1024


# --------------------------------------------------------------------------
# Server


async def serve(policy: str, bound: int) -> None:
    _common.raise_fd_limit()
    seen: list[trionet.channels.ChannelConnection] = []

    async def handler(cc: trionet.channels.ChannelConnection) -> None:
        seen.append(cc)
        while True:
            request = await cc.receive("rpc")
            await cc.publish("rpc", request)

    peak = 0

    async def sample(server: trionet.channels.ChannelServer) -> None:
        # The most any one connection buffered, sampled (bounded in count).
        nonlocal peak
        for _ in range(SAMPLES):
            for cc in server.clients:
                peak = max(peak, cc.statistics().buffered_bytes)
            await trio.sleep(SAMPLE_INTERVAL)

    async with (
        trionet.channels.open_channel_server(
            handler,
            host="127.0.0.1",
            policy=policy,  # type: ignore[arg-type]  # checked by the server
            max_buffered_bytes=bound,
            grace_period=0,
        ) as server,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(sample, server)

        async def stats(args: list[str]) -> dict[str, Any]:
            statistics = server.statistics()
            return {
                "open": statistics.open,
                "buffered_max": peak,
                "dropped": sum(cc.dropped for cc in seen),
                "slow_closed": statistics.closed.get(
                    trionet.CloseReason.SLOW_CONSUMER, 0
                ),
            }

        _common.say(port=server.port)
        await _common.control_loop({"stats": stats})
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------
# Clients


async def flood(
    port: int, count: int, size: int, results: list[dict[str, Any]]
) -> None:
    """Publish ``count`` messages round robin on CHANNELS channels; record how
    many went out and whether the server closed the connection."""
    result = {"published": 0, "evicted": False}
    results.append(result)
    body = bytes(size)
    try:
        async with trionet.channels.connect_channels("127.0.0.1", port) as cc:
            for index in range(count):
                await cc.publish(f"flood{index % CHANNELS}", body)
                result["published"] += 1
    except trionet.ConnectionClosed:
        result["evicted"] = True


async def ask(port: int, count: int, interval: float) -> dict[str, Any]:
    """``count`` request/reply round trips on "rpc", one every ``interval`` s."""
    answered = 0
    slowest = 0.0
    async with trionet.channels.connect_channels("127.0.0.1", port) as cc:
        started = trio.current_time()
        for index in range(count):
            request = f"request {index}".encode()
            before = time.perf_counter()
            await cc.publish("rpc", request)
            if await cc.receive("rpc") != request:
                break
            slowest = max(slowest, time.perf_counter() - before)
            answered += 1
            await trio.sleep_until(started + (index + 1) * interval)
    return {"answered": answered, "slowest_ms": slowest * 1000}


async def run(
    policy: str,
    flooders: int,
    count: int,
    size: int,
    requests: int,
    interval_ms: int,
    bound: int,
) -> list[object]:
    server, port = await _common.start_server(__file__, policy, str(bound))
    try:
        start_rss = _common.proc_status(server.pid)["VmRSS"]
        results: list[dict[str, Any]] = []
        asked: dict[str, Any] = {"answered": 0, "slowest_ms": float("nan")}
        async with trio.open_nursery() as nursery:
            for _ in range(flooders):
                nursery.start_soon(flood, port, count, size, results)
            with trio.move_on_after(RUN_SECONDS):
                asked = await ask(port, requests, interval_ms / 1000)
            # While the flooders still push (or wait to push).
            stats = await server.command("stats")
            nursery.cancel_scope.cancel()
        peak_rss = _common.proc_status(server.pid)["VmHWM"]
    finally:
        await server.stop()
    published = sum(result["published"] for result in results)
    held_back = sum(1 for r in results if r["published"] < count and not r["evicted"])
    evicted = sum(1 for result in results if result["evicted"])
    return [
        policy,
        f"{published * size / MIB:.0f} / {flooders * count * size / MIB:.0f}",
        f"{held_back}/{flooders}",
        f"{evicted}/{flooders} ({stats['slow_closed']})",
        f"{stats['buffered_max'] / MIB:.1f} / {bound / MIB:.0f}",
        stats["dropped"],
        f"{asked['answered']}/{requests}",
        f"{asked['slowest_ms']:.1f}",
        f"{start_rss / 1024:.0f} / {peak_rss / 1024:.0f}",
    ]


async def main(
    flooders: int, count: int, size: int, requests: int, interval: int, bound: int
) -> None:
    _common.raise_fd_limit()
    rows = []
    for policy in POLICIES:
        rows.append(await run(policy, flooders, count, size, requests, interval, bound))
        print(*rows[-1], sep="  ", flush=True)
    _common.print_table(
        f"Channel flood: {flooders} clients x {count} messages of "
        f"{size / MIB:g} MiB on {CHANNELS} unread channels, one client asking "
        f"{requests} times every {interval} ms; "
        f"max_buffered_bytes {bound / MIB:g} MiB",
        [
            "policy",
            "flood MiB sent / offered",
            "flooders held back",
            "flooders evicted (server count)",
            "server buffered MiB, most sampled / bound",
            "dropped",
            "replies",
            "slowest reply ms",
            "server RSS MiB start / peak",
        ],
        rows,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--flooders", type=int, default=4)
    parser.add_argument("--messages", type=int, default=256)
    parser.add_argument("--size", type=int, default=MIB)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--interval-ms", type=int, default=10)
    parser.add_argument("--max-buffered-bytes", type=int, default=16 * MIB)
    args = parser.parse_args()
    if args.serve:
        trio.run(serve, args.serve[0], int(args.serve[1]))
    elif args.quick:
        trio.run(main, 2, 64, MIB, 40, 5, 4 * MIB)
    else:
        trio.run(
            main,
            args.flooders,
            args.messages,
            args.size,
            args.requests,
            args.interval_ms,
            args.max_buffered_bytes,
        )
