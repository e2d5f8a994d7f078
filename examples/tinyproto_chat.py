"""A chat server: several clients, messages relayed to the others (tinyproto).

tinyproto ships a chat client/server as its larger example: every message a
client transmits is passed on to the other connected clients, and a quit
command ends a client's session.  Here:

* each client's first message is its name; the server announces
  ``* <name> joined`` to everyone with ``server.broadcast`` (one encoding,
  every connection's queue, never waiting on a slow reader);
* every other message is relayed as ``<name> text`` to the *other* clients,
  one ``send`` per connection;
* ``/quit`` makes the server answer ``* bye`` and end that client's
  connection; the others get ``* <name> left``.

Messages are length-prefixed frames (``trionet.Frames()``), so they may hold
any bytes, newlines included.  That is trionet's framing, not tinyproto's
wire format (tinyproto adds a handshake and an answer byte before each
body): the clients here are trionet clients.  Deployed tinyproto clients
need ``trionet.compat.tinyproto`` (``examples/tinyproto_compat_echo.py``).
Three clients -- alice, bob and carol -- talk over 127.0.0.1 in a fixed
order, and each prints what it received.

Run it with ``python examples/tinyproto_chat.py``; it ends by itself.  With
``--selftest`` it also checks every client's transcript and exits non-zero
if one is wrong.
"""

from __future__ import annotations

import contextlib
import sys

import trio

import trionet

FRAMES = trionet.Frames(max_size=64 * 1024)


def check(condition: bool, what: str) -> None:
    """Fail the self-test (even under ``python -O``) when ``condition`` is false."""
    if not condition:
        raise AssertionError(what)


class ChatRoom:
    """The server's side: who is here, and the relaying."""

    def __init__(self) -> None:
        self.server: trionet.Server | None = None
        #: The clients that told their name, in the order they joined.
        self.names: dict[trionet.Connection, str] = {}

    async def relay(self, sender: trionet.Connection, message: bytes) -> None:
        """Send ``message`` to every named client except ``sender``.

        ``send`` waits while a receiver's outgoing queue is full, so one
        client that stops reading slows down the clients talking to it (not
        the others).  ``server.broadcast`` never waits: it closes such a
        client as SLOW_CONSUMER instead.
        """
        for conn in list(self.names):
            if conn is not sender:
                # A client that is leaving: its own task cleans up.
                with contextlib.suppress(trionet.ConnectionClosed):
                    await conn.send(message)

    async def handle(self, conn: trionet.Connection) -> None:
        assert self.server is not None
        name = (await conn.receive()).decode()
        self.names[conn] = name
        await self.server.broadcast(f"* {name} joined")
        try:
            async for message in conn:
                if message == b"/quit":
                    await conn.send("* bye")
                    return  # ends this client's connection
                await self.relay(conn, f"<{name}> ".encode() + message)
        finally:
            del self.names[conn]
            # Also when the server shuts down (shielded), but never for long.
            with trio.move_on_after(1, shield=True):
                await self.relay(conn, f"* {name} left".encode())


class Client:
    """One chat client: a connection and everything it received."""

    def __init__(self, name: str, conn: trionet.Connection) -> None:
        self.name = name
        self.conn = conn
        self.transcript: list[str] = []

    @classmethod
    async def join(cls, name: str, port: int) -> Client:
        conn = await trionet.connect_tcp("127.0.0.1", port, framing=FRAMES)
        await conn.send(name)
        return cls(name, conn)

    async def say(self, text: str) -> None:
        print(f"{self.name:>6} says  {text!r}")
        await self.conn.send(text)

    async def expect(self, count: int) -> None:
        """Receive ``count`` messages and add them to the transcript."""
        for _ in range(count):
            message = (await self.conn.receive()).decode()
            print(f"{self.name:>6} got   {message!r}")
            self.transcript.append(message)

    async def read_to_end(self) -> None:
        """Receive until the server closes the connection."""
        async for message in self.conn:
            print(f"{self.name:>6} got   {message.decode()!r}")
            self.transcript.append(message.decode())
        # The server finished sending; closing our side completes the close.
        await self.conn.aclose()
        print(f"{self.name:>6} connection ended: {self.conn.close_reason}")


async def main(selftest: bool) -> None:
    room = ChatRoom()
    async with trionet.open_tcp_server(room.handle, framing=FRAMES) as server:
        room.server = server
        print(f"chat server on 127.0.0.1:{server.port}")
        with trio.fail_after(10):
            alice = await Client.join("alice", server.port)
            await alice.expect(1)  # * alice joined
            bob = await Client.join("bob", server.port)
            await alice.expect(1)  # * bob joined
            await bob.expect(1)
            carol = await Client.join("carol", server.port)
            for client in (alice, bob, carol):
                await client.expect(1)  # * carol joined

            await alice.say("hi all")
            await bob.expect(1)
            await carol.expect(1)

            await carol.say("line one\nline two")  # frames carry any bytes
            await alice.expect(1)
            await bob.expect(1)

            await carol.say("/quit")
            await carol.read_to_end()  # * bye, then the end of the stream
            await alice.expect(1)  # * carol left
            await bob.expect(1)

            await bob.say("just us now")
            await alice.expect(1)
            print(f"still connected: {sorted(room.names.values())}")
            await alice.conn.aclose()  # leaving without /quit works too
            await bob.expect(1)  # * alice left
            await bob.conn.aclose()

    if selftest:
        check(
            alice.transcript
            == [
                "* alice joined",
                "* bob joined",
                "* carol joined",
                "<carol> line one\nline two",
                "* carol left",
                "<bob> just us now",
            ],
            f"alice: {alice.transcript!r}",
        )
        check(
            bob.transcript
            == [
                "* bob joined",
                "* carol joined",
                "<alice> hi all",
                "<carol> line one\nline two",
                "* carol left",
                "* alice left",
            ],
            f"bob: {bob.transcript!r}",
        )
        check(
            carol.transcript == ["* carol joined", "<alice> hi all", "* bye"],
            f"carol: {carol.transcript!r}",
        )
        check(
            carol.conn.close_reason is trionet.CloseReason.CLOSED_BY_PEER,
            f"carol's close reason {carol.conn.close_reason!r}",
        )
        closed = server.statistics().closed
        check(
            closed
            == {
                trionet.CloseReason.CLOSED_BY_HOST: 1,  # carol, after /quit
                trionet.CloseReason.CLOSED_BY_PEER: 2,  # alice and bob left
            },
            f"server close reasons {closed!r}",
        )
        print("selftest passed")


if __name__ == "__main__":
    trio.run(main, "--selftest" in sys.argv[1:])
