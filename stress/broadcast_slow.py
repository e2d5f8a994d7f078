"""Broadcast to C connections of which S never read; trionet beside bare trio.

The server (a child process) broadcasts M framed messages, one every T ms,
to every connection through a bounded queue per connection (256 messages)
without ever waiting on one.  This process holds the clients: C - S of them
read everything and check that every message arrives, in order; S of them
never read (and have a small receive buffer), so their queues overflow and
the server must close them -- SLOW_CONSUMER in trionet, a hand-written
eviction in bare trio.

Prints how many readers got every message in order, how many slow clients
were closed, how long broadcast calls took (mean, 99th percentile, longest)
and whether the broadcaster kept its pace: it must never stall on a slow
client.

Defaults: 1,000 connections, 10 slow, 600 messages of 512 bytes every
20 ms.  ``--quick``: 100 connections, 2 slow, 600 messages every 5 ms.
"""

from __future__ import annotations

import argparse
import functools
import socket
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import _common
import trio

import trionet

QUEUE_SIZE = 256
#: Server-side send buffer of every connection (both servers): small, so
#: that a client that never reads fills it soon.
SNDBUF = 16384
#: Receive buffer of the clients that never read.
SLOW_RCVBUF = 4096


def message(sequence: int, size: int) -> bytes:
    return sequence.to_bytes(8, "big") + b"m" * (size - 8)


async def paced(
    send: Callable[[bytes], Awaitable[None]], count: int, size: int, interval: float
) -> dict[str, Any]:
    """Call ``send`` ``count`` times, one every ``interval`` seconds; time each call."""
    durations = []
    started = trio.current_time()
    for sequence in range(count):
        data = message(sequence, size)
        before = time.perf_counter()
        await send(data)
        durations.append(time.perf_counter() - before)
        await trio.sleep_until(started + (sequence + 1) * interval)
    durations.sort()
    return {
        "seconds": trio.current_time() - started,
        "max_ms": durations[-1] * 1000,
        "p99_ms": durations[int(len(durations) * 0.99)] * 1000,
        "mean_ms": statistics.fmean(durations) * 1000,
    }


# --------------------------------------------------------------------------
# Servers


async def serve_trionet() -> None:
    def commands(server: trionet.Server) -> dict[str, _common.Command]:
        async def broadcast(args: list[str]) -> dict[str, Any]:
            count, size, interval_ms = map(int, args)
            result = await paced(server.broadcast, count, size, interval_ms / 1000)
            closed = server.statistics().closed.get(
                trionet.CloseReason.SLOW_CONSUMER, 0
            )
            return {**result, "slow_closed": closed}

        return {"broadcast": broadcast}

    await _common.serve(
        "trionet",
        "frames",
        commands,
        so_sndbuf=SNDBUF,
        send_queue_size=QUEUE_SIZE,
    )


class BareBroadcaster:
    """Bare trio: a bounded channel and a writer task per connection."""

    def __init__(self) -> None:
        self.peers: dict[
            trio.SocketStream, tuple[trio.MemorySendChannel[bytes], trio.CancelScope]
        ] = {}
        self.slow_closed = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
        send, receive = trio.open_memory_channel[bytes](QUEUE_SIZE)
        try:
            async with trio.open_nursery() as nursery:
                self.peers[stream] = (send, nursery.cancel_scope)
                nursery.start_soon(self.writer, stream, receive)
                while await stream.receive_some(_common.RECEIVE_SIZE):
                    pass
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.peers.pop(stream, None)
            await trio.aclose_forcefully(stream)

    async def writer(
        self, stream: trio.SocketStream, receive: trio.MemoryReceiveChannel[bytes]
    ) -> None:
        async for data in receive:
            await stream.send_all(data)

    async def broadcast(self, payload: bytes) -> None:
        data = len(payload).to_bytes(4, "big") + payload
        for stream, (send, scope) in list(self.peers.items()):
            try:
                send.send_nowait(data)
            except trio.WouldBlock:
                self.slow_closed += 1
                del self.peers[stream]
                scope.cancel()
        await trio.lowlevel.checkpoint()


async def serve_bare() -> None:
    _common.raise_fd_limit()
    bare = BareBroadcaster()

    async def stats(args: list[str]) -> dict[str, Any]:
        return {"open": len(bare.peers)}

    async def broadcast(args: list[str]) -> dict[str, Any]:
        count, size, interval_ms = map(int, args)
        result = await paced(bare.broadcast, count, size, interval_ms / 1000)
        return {**result, "slow_closed": bare.slow_closed}

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(
                trio.serve_tcp,
                bare.handle,
                0,
                host="127.0.0.1",
                backlog=_common.BACKLOG,
            )
        )
        _common.say(port=listeners[0].socket.getsockname()[1])
        await _common.control_loop({"stats": stats, "broadcast": broadcast})
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------
# Clients


async def run(
    implementation: str, total: int, slow: int, count: int, size: int, interval: int
) -> list[object]:
    server, port = await _common.start_server(__file__, implementation)
    sockets: list[trio.socket.SocketType] = []
    complete = 0
    all_complete = trio.Event()
    try:
        for index in range(total):
            sock = trio.socket.socket()
            sockets.append(sock)
            if index < slow:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_RCVBUF)
            await sock.connect(("127.0.0.1", port))
        held = await server.wait_open(total)

        async def read_all(sock: trio.socket.SocketType) -> None:
            nonlocal complete
            parser = _common.FrameParser()
            expected = 0
            while expected < count:
                data = await sock.recv(_common.RECEIVE_SIZE)
                if not data:
                    return
                for frame in parser.feed(data):
                    if frame[4:] != message(expected, size):
                        return  # lost, duplicated or out of order
                    expected += 1
            complete += 1
            if complete == total - slow:
                all_complete.set()

        async with trio.open_nursery() as nursery:
            for sock in sockets[slow:]:
                nursery.start_soon(read_all, sock)
            result = await server.command("broadcast", count, size, interval)
            with trio.move_on_after(60):
                await all_complete.wait()
            nursery.cancel_scope.cancel()
    finally:
        for sock in sockets:
            sock.close()
        await server.stop()
    return [
        implementation,
        held,
        f"{complete}/{total - slow}",
        f"{result['slow_closed']}/{slow}",
        f"{result['mean_ms']:.2f}",
        f"{result['p99_ms']:.2f}",
        f"{result['max_ms']:.1f}",
        f"{result['seconds']:.2f} / {count * interval / 1000:.2f}",
    ]


async def main(total: int, slow: int, count: int, size: int, interval: int) -> None:
    _common.raise_fd_limit()
    rows = []
    for implementation in _common.IMPLEMENTATIONS:
        rows.append(await run(implementation, total, slow, count, size, interval))
        print(*rows[-1], sep="  ", flush=True)
    _common.print_table(
        f"Broadcast: {count:,} messages of {size} bytes every {interval} ms to "
        f"{total:,} connections, {slow} never reading",
        [
            "server",
            "connections",
            "readers complete, in order",
            "slow closed",
            "mean call ms",
            "p99 call ms",
            "longest call ms",
            "broadcast s / planned",
        ],
        rows,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--slow", type=int, default=10)
    parser.add_argument("--messages", type=int, default=600)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--interval-ms", type=int, default=20)
    args = parser.parse_args()
    if args.serve == "trionet":
        trio.run(serve_trionet)
    elif args.serve:
        trio.run(serve_bare)
    elif args.quick:
        trio.run(main, 100, 2, 600, args.size, 5)
    else:
        trio.run(
            main,
            args.connections,
            args.slow,
            args.messages,
            args.size,
            args.interval_ms,
        )
