"""One port for a mixed fleet: old tinyproto and socket.engine devices, new ones.

A fleet moves to trionet one device at a time, so for a while the server
must answer every generation on the same port.  Each protocol's clients
speak first, and their first byte tells them apart:

======================  =================  =======================================
first byte              who                handed to
======================  =================  =======================================
``ff``                  tinyproto device   ``trionet.compat.tinyproto.handle``
``{``                   socket.engine      ``trionet.compat.socketengine.handle``
``00`` - ``04``         trionet.channels   ``trionet.channels.ChannelConnection``
anything else           a stranger         closed
======================  =================  =======================================

(A channel frame starts with its 4-byte length, and channel frames are at
most 64 MiB, ``04 00 00 00``.)  ``conn.peek(1)`` looks at that byte without
taking it, so each protocol's code reads the stream from its very start.

The script serves all three on one port of 127.0.0.1, then plays one device
of each kind -- trionet's compat clients speak the old wire formats byte for
byte (tests/test_interop_*.py check them against the real libraries) -- plus
a stranger:

1. a tinyproto device sends two messages and gets ``Echo back: ...``;
2. two socket.engine devices report a reading; the server's ``get_ALL``
   sees each one's latest value, and ``write_ALL`` reaches both of them
   (and nobody else: the tinyproto device's next echo is clean);
3. a trionet.channels device publishes and gets a reply on another channel;
4. a stranger speaking HTTP is turned away.

Run it with ``python examples/mixed_fleet.py``; it ends by itself.  With
``--selftest`` it also checks every result and exits non-zero if one is
wrong.
"""

from __future__ import annotations

import sys
from collections import Counter

import trio

import trionet
import trionet.channels
from trionet.compat import socketengine, tinyproto

#: Seconds a new client has to send its first byte.
FIRST_BYTE_TIMEOUT = 5.0


def check(condition: bool, what: str) -> None:
    """Fail the self-test (even under ``python -O``) when ``condition`` is false."""
    if not condition:
        raise AssertionError(what)


class Fleet:
    """The server: one router in front of three protocols."""

    def __init__(self) -> None:
        #: The socket.engine devices, for get_ALL and write_ALL.
        self.engine = socketengine.EngineGroup()
        #: Connections served, by protocol.
        self.served: Counter[str] = Counter()
        self.readings = trio.Semaphore(0)

    async def route(self, conn: trionet.Connection) -> None:
        with trio.move_on_after(FIRST_BYTE_TIMEOUT):
            first = await conn.peek(1)
        if not first:  # (said nothing in time)
            return
        if first == b"\xff":
            self.served["tinyproto"] += 1
            await tinyproto.handle(conn, self.tinyproto_device)
        elif first == b"{":
            self.served["socket.engine"] += 1
            await socketengine.handle(conn, self.engine_device, group=self.engine)
        elif first[0] <= 0x04:
            self.served["channels"] += 1
            async with trionet.channels.ChannelConnection(conn) as cc:
                await self.channel_device(cc)
        else:
            self.served["stranger"] += 1
            print(f"  turned away {conn.remote_address}: first byte {first!r}")

    async def tinyproto_device(self, conn: tinyproto.TinyprotoConnection) -> None:
        async for message in conn:
            await conn.transmit(b"Echo back: " + message)

    async def engine_device(self, conn: socketengine.EngineConnection) -> None:
        async for channel, _value in conn:
            if channel == "reading":
                self.readings.release()

    async def channel_device(self, cc: trionet.channels.ChannelConnection) -> None:
        async for channel, data in cc:
            await cc.publish("reply", b"thanks for " + channel.encode() + b": " + data)


async def main(selftest: bool) -> None:
    fleet = Fleet()
    results: dict[str, object] = {}
    echoes: list[bytes] = []
    async with trionet.open_tcp_server(fleet.route, host="127.0.0.1") as server:
        port = server.port
        print(f"one port for the whole fleet: 127.0.0.1:{port}")
        with trio.fail_after(30):
            print("1. a tinyproto device")
            tiny = await tinyproto.connect_tinyproto("127.0.0.1", port)
            await tiny.transmit(b"status ok")
            echoes.append(await tiny.receive())
            print(f"  got {echoes[-1]!r}")

            print("2. two socket.engine devices")
            pump = await socketengine.connect_engine("127.0.0.1", port)
            valve = await socketengine.connect_engine("127.0.0.1", port)
            await pump.write("reading", {"device": "pump", "bar": 2.5})
            await fleet.readings.acquire()
            await valve.write("reading", {"device": "valve", "open": True})
            await fleet.readings.acquire()
            results["get_ALL"] = fleet.engine.get_ALL("reading")
            print(f"  get_ALL('reading') = {results['get_ALL']}")
            await fleet.engine.write_ALL("command", "report hourly")
            commands = [await pump.receive(), await valve.receive()]
            results["write_ALL"] = commands
            print(f"  both got {commands[0]}")
            # Nothing of that reached the tinyproto device:
            await tiny.transmit(b"still here")
            echoes.append(await tiny.receive())

            print("3. a trionet.channels device")
            async with trionet.channels.connect_channels("127.0.0.1", port) as cc:
                await cc.publish("telemetry", "42")
                results["channels"] = await cc.receive("reply")
                print(f"  got {results['channels']!r}")

            print("4. a stranger")
            async with trionet.connect_tcp("127.0.0.1", port) as http:
                await http.send_all(b"GET / HTTP/1.1\r\n\r\n")
                results["stranger"] = await http.receive_some()

            for conn in (tiny, pump, valve):
                await conn.aclose()
    print(f"served: {dict(fleet.served)}")

    if selftest:
        check(
            echoes == [b"Echo back: status ok", b"Echo back: still here"],
            f"tinyproto {echoes!r}",
        )
        check(
            results["get_ALL"]
            == [{"device": "pump", "bar": 2.5}, {"device": "valve", "open": True}],
            f"get_ALL {results['get_ALL']!r}",
        )
        check(
            results["write_ALL"] == [("command", "report hourly")] * 2,
            f"write_ALL {results['write_ALL']!r}",
        )
        check(
            results["channels"] == b"thanks for telemetry: 42",
            f"channels {results['channels']!r}",
        )
        check(results["stranger"] == b"", f"stranger {results['stranger']!r}")
        check(
            fleet.served
            == {"tinyproto": 1, "socket.engine": 2, "channels": 1, "stranger": 1},
            f"served {fleet.served!r}",
        )
        print("selftest passed")


if __name__ == "__main__":
    trio.run(main, "--selftest" in sys.argv[1:])
