"""In order: C connections x M framed 64-byte messages echoed; trionet beside bare trio.

The server and the client are separate child processes.  The client opens C
connections; on each, one task sends M frames (every payload names its
connection and sequence number) while another reads the echoes and checks
that each is byte-identical to what was sent, in order.  Prints messages
delivered, messages per second and the peak memory (VmHWM) of both
processes.

Defaults: 1,000 connections x 1,000 messages (1,000,000 messages).
``--quick``: 100 x 100.
"""

from __future__ import annotations

import argparse
import resource
import struct
import time

import _common
import trio

PAYLOAD_SIZE = 64
#: Frames one send_all carries.
BATCH = 50


def payload(connection: int, sequence: int) -> bytes:
    head = struct.pack(">II", connection, sequence)
    return head + bytes([sequence % 251]) * (PAYLOAD_SIZE - len(head))


def frame(connection: int, sequence: int) -> bytes:
    return PAYLOAD_SIZE.to_bytes(4, "big") + payload(connection, sequence)


async def client(port: int, connections: int, messages: int) -> None:
    """The client child: run every connection, then report."""
    _common.raise_fd_limit()
    delivered = 0
    bad = 0

    async def one(index: int) -> None:
        nonlocal delivered, bad
        stream = await trio.open_tcp_stream("127.0.0.1", port)

        async def send() -> None:
            for start in range(0, messages, BATCH):
                stop = min(start + BATCH, messages)
                await stream.send_all(
                    b"".join(frame(index, seq) for seq in range(start, stop))
                )

        async def receive() -> None:
            nonlocal delivered, bad
            parser = _common.FrameParser()
            expected = 0
            while expected < messages:
                data = await stream.receive_some(_common.RECEIVE_SIZE)
                if not data:
                    break
                for echoed in parser.feed(data):
                    if echoed != frame(index, expected):
                        bad += 1
                    expected += 1
                    delivered += 1

        async with stream, trio.open_nursery() as nursery:
            nursery.start_soon(send)
            nursery.start_soon(receive)

    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        for index in range(connections):
            nursery.start_soon(one, index)
    seconds = time.monotonic() - started
    _common.say(
        delivered=delivered,
        bad=bad,
        seconds=seconds,
        hwm_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    )


async def run(implementation: str, connections: int, messages: int) -> list[object]:
    server, port = await _common.start_server(__file__, implementation)
    try:
        child = await _common.Child.start(
            __file__, "--client", str(port), str(connections), str(messages)
        )
        try:
            result = await child.read()
        finally:
            await child.stop()
        server_hwm = _common.proc_status(server.pid)["VmHWM"]
        registry = await server.wait_open(0)
    finally:
        await server.stop()
    total = connections * messages
    return [
        implementation,
        f"{result['delivered']:,}/{total:,}",
        result["bad"],
        f"{result['delivered'] / result['seconds']:,.0f}",
        f"{server_hwm / 1024:.1f}",
        f"{result['hwm_kib'] / 1024:.1f}",
        registry,
    ]


async def main(connections: int, messages: int) -> None:
    _common.raise_fd_limit()
    rows = []
    for implementation in _common.IMPLEMENTATIONS:
        rows.append(await run(implementation, connections, messages))
        print(*rows[-1], sep="  ", flush=True)
    _common.print_table(
        f"In order: {connections:,} connections x {messages:,} framed "
        f"{PAYLOAD_SIZE}-byte messages echoed (server and client processes)",
        [
            "server",
            "delivered",
            "wrong/out of order",
            "messages/s",
            "server peak MiB",
            "client peak MiB",
            "registry after",
        ],
        rows,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--client", nargs=3, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="100 x 100 messages")
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=1000)
    args = parser.parse_args()
    if args.serve:
        trio.run(_common.serve, args.serve, "frames")
    elif args.client:
        trio.run(client, *args.client)
    elif args.quick:
        trio.run(main, 100, 100)
    else:
        trio.run(main, args.connections, args.messages)
