"""A server and its clients exchanging data on named channels, images included.

The scenario of socket.engine's README, with trionet.channels playing both
parts (socket.engine's host, here a trionet server, and its clients):
clients connect and write ``"client is connected!"`` on the ``"test"``
channel; the server reads everything each client sent on that channel; the
server writes to all clients at once, a status line on ``"status"`` and a
picture on ``"image"``; each client reads the most recent status and the
picture, and sends a picture of its own back.  Everything runs over loopback.

trionet.channels is for fleets that move to trionet on both ends: its wire
format (length-prefixed binary frames) is not socket.engine's (one JSON
object per line), and a socket.engine peer cannot talk to it.  For deployed
socket.engine peers use ``trionet.compat.socketengine``, which speaks their
format (``examples/mixed_fleet.py``).

Run it with ``python examples/engine_host_client.py``; it ends by itself.
With ``--selftest`` it also checks every result and exits non-zero if one is
wrong.

socket.engine call          trionet.channels (socket.engine's host = the server)
--------------------------  -----------------------------------------------
host(); host.start()        open_channel_server(handler) / serve_channels
client(); client.start()    connect_channels(host, port)
client.write(ch, data)      await cc.publish(ch, data)
client.writeImg(data)       await cc.publish("image", data)
client.get(ch)              cc.latest(ch), with policy="latest" (else a
                            channel nobody reads fills, reading stops and
                            latest() goes stale)
host.get_ALL(ch)            [cc.latest(ch) for cc in server.clients]: the
                            latest value of each client, taking nothing
                            (this script takes each client's messages with
                            receive / drain instead)
host.write_ALL(ch, data)    await server.publish(ch, data)
host.writeImg_ALL(data)     await server.publish("image", data)
host.getClients()           server.clients
host.close(), c.close()     leaving the ``async with`` blocks
"""

from __future__ import annotations

import hashlib
import sys

import trio

import trionet
import trionet.channels

CLIENTS = 3
#: One 640x480 RGB picture: 900 KiB, sent whole on the "image" channel.
WIDTH, HEIGHT = 640, 480


def picture(seed: int) -> bytes:
    """A made-up RGB picture (a colour gradient), different for each seed."""
    row = bytes((x + seed * 40) % 256 for x in range(WIDTH * 3))
    return b"".join(row[y % 3 :] + row[: y % 3] for y in range(HEIGHT))


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


async def main(selftest: bool) -> None:
    server_picture = picture(0)
    # Everything the server read on "test" from each client, keyed by number.
    said: dict[int, list[bytes]] = {}
    uploads: dict[int, bytes] = {}
    everyone_greeted = trio.Event()

    async def server_handler(cc: trionet.channels.ChannelConnection) -> None:
        # One task per client: wait for its first message on "test", then
        # take everything else it sent there so far.  (socket.engine's
        # get_ALL is something else: each client's latest value, taking
        # nothing -- cc.latest("test") across server.clients.)
        first = await cc.receive("test")
        number = int(first.split(b" ")[1])
        said[number] = [first, *cc.drain("test")]
        print(f"server: client {number} said {said[number]}")
        if len(said) == CLIENTS:
            everyone_greeted.set()
        # The client's own picture, then whatever else it sends until it leaves.
        uploads[number] = await cc.receive("image")
        print(f"server: client {number} sent a picture, {digest(uploads[number])}")
        async for channel, data in cc:
            print(f"server: client {number} on {channel!r}: {data.decode()}")
            said[number].append(data)

    async def client(number: int, port: int, results: dict[int, object]) -> None:
        async with trionet.channels.connect_channels("127.0.0.1", port) as cc:
            await cc.publish("test", f"client {number} is connected!")
            await cc.publish("test", f"client {number} wants pictures")
            await cc.publish("image", picture(number + 1))
            # The server's picture arrives after its status line, so by then
            # latest("status") holds it (socket.engine's client.get(); here
            # the status channel is never read, but only one message
            # arrives on it, so its buffer cannot fill).
            image = await cc.receive("image")
            status = cc.latest("status")
            print(
                f"client {number}: status {status!r}, "
                f"picture of {len(image)} bytes, {digest(image)}"
            )
            results[number] = (status, image)
            await cc.publish("test", f"client {number} got {len(image)} bytes")

    results: dict[int, object] = {}
    async with trionet.channels.open_channel_server(
        server_handler, host="127.0.0.1"
    ) as server:
        print(f"server listening on 127.0.0.1:{server.port}")
        async with trio.open_nursery() as nursery:
            for number in range(CLIENTS):
                nursery.start_soon(client, number, server.port, results)
            await everyone_greeted.wait()
            print(f"server: {len(server.clients)} clients connected")
            await server.publish("status", "server is ready")  # write_ALL
            await server.publish("image", server_picture)  # writeImg_ALL
        # The clients have left; the server's handlers end with them.
    statistics = server.statistics()
    print(f"server statistics: {statistics}")

    if selftest:
        for number in range(CLIENTS):
            assert said[number] == [
                f"client {number} is connected!".encode(),
                f"client {number} wants pictures".encode(),
                f"client {number} got {WIDTH * HEIGHT * 3} bytes".encode(),
            ], said
            assert uploads[number] == picture(number + 1), number
            assert results[number] == (b"server is ready", server_picture), number
        assert statistics.accepted == CLIENTS
        assert statistics.closed == {trionet.CloseReason.CLOSED_BY_PEER: CLIENTS}
        print("selftest passed")


if __name__ == "__main__":
    trio.run(main, "--selftest" in sys.argv[1:])
