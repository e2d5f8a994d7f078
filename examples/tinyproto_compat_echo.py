"""tinyproto's echo server, wire compatible, for deployed tinyproto clients.

tinyproto's README example is an echo server: it answers each message with
``"Echo back: <msg>"``; ``QUIT`` ends that client's connection and
``SRVQUIT`` shuts the whole server down along with all its clients.  This
script serves it with ``trionet.compat.tinyproto``, which speaks tinyproto's
own bytes -- the ``ff`` handshake, then per message a 4-byte size, the
receiver's ``ff`` (accept) or ``00`` (refuse), then the body -- so clients
running tinyproto 2.0.1 or 3.0 connect to it unchanged
(tests/test_interop_tinyproto.py runs the real ones against it).

It listens on 127.0.0.1 and, where the system has IPv6, on ::1 too (one
port for both; tinyproto's ``add_addr``), with ``max_connections=3``, then

1. a client sends two short messages and one of 24 MiB, and QUITs;
2. a raw client announces 3 GiB: the server answers ``00`` at the size,
   before any body is sent, and closes the connection;
3. three clients connect; a fourth gets tinyproto 2.0.1's connection-limit
   reply (254 NUL bytes) and is closed;
4. one of the three sends SRVQUIT: the server shuts down, and the idle
   clients are closed with SHUTDOWN.

Run it with ``python examples/tinyproto_compat_echo.py``; it ends by itself.
With ``--selftest`` it also checks every result and exits non-zero if one is
wrong.

tinyproto                             trionet.compat.tinyproto
------------------------------------  -----------------------------------------
TinyProtoServer + add_addr(host, p)   open_tinyproto_server(handler, p, host=[...])
set_conn_handler(EchoConnection)      the handler: one task per connection
connection_limit = N                  max_connections=N (the same reply)
transmission_received(msg)            the body of ``async for msg in conn``
transmit(msg) / receive()             await conn.transmit(msg) / conn.receive()
conn_init / conn_shutdown             on_connect=... / on_close=...
self.shutdown = True                  return from the handler
server shutdown                       await server.aclose() (or leave the block)
active_connections                    server.connections
TinyProtoClient().connect_to(h, p)    await connect_tinyproto(h, p)
"""

from __future__ import annotations

import hashlib
import socket
import sys

import trio

import trionet
from trionet.compat import tinyproto

CloseReason = trionet.CloseReason
#: tinyproto accepts up to 0xF0FFFFFF bytes; this server takes up to 64 MiB.
MAX_SIZE = 64 * 1024 * 1024
LARGE = 24 * 1024 * 1024


def check(condition: bool, what: str) -> None:
    """Fail the self-test (even under ``python -O``) when ``condition`` is false."""
    if not condition:
        raise AssertionError(what)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


class EchoServer:
    def __init__(self) -> None:
        self.srvquit = trio.Event()
        self.closed: list[CloseReason | None] = []

    def conn_init(self, conn: trionet.Connection) -> None:
        print(f"Connection opened from: {conn.remote_address}")

    def conn_shutdown(self, conn: trionet.Connection) -> None:
        print(f"Connection closed from: {conn.remote_address} ({conn.close_reason})")
        self.closed.append(conn.close_reason)

    async def handle(self, conn: tinyproto.TinyprotoConnection) -> None:
        try:
            async for msg in conn:  # each transmission, answered ff first
                if msg == b"QUIT":
                    return  # closes this connection
                if msg == b"SRVQUIT":
                    self.srvquit.set()  # main() shuts the server down
                    return
                await conn.transmit(b"Echo back: " + msg)
        except trionet.FrameTooLarge as exc:
            print(f"  refused a message: {exc}")


async def echo_client(
    host: str, port: int, messages: list[bytes], replies: list[bytes]
) -> None:
    async with tinyproto.connect_tinyproto(host, port, max_size=MAX_SIZE) as conn:
        for msg in messages:
            await conn.transmit(msg)
            if msg in (b"QUIT", b"SRVQUIT"):
                break
            reply = await conn.receive()
            replies.append(reply)
            shown = reply if len(reply) < 60 else reply[:30] + b"..."
            print(f"  sent {len(msg)} bytes, got {len(reply)} bytes: {shown!r}")


async def main(selftest: bool) -> None:
    hosts = ["127.0.0.1"] + (["::1"] if has_ipv6_loopback() else [])
    echo = EchoServer()
    replies: list[bytes] = []
    large = bytes(range(256)) * (LARGE // 256)
    async with tinyproto.open_tinyproto_server(
        echo.handle,
        host=hosts,
        max_size=MAX_SIZE,
        max_connections=3,
        on_connect=echo.conn_init,
        on_close=echo.conn_shutdown,
        grace_period=0.5,
    ) as server:
        port = server.port
        print(f"tinyproto echo server on {server.addresses}")
        with trio.fail_after(30):
            print("1. a client over IPv4")
            await echo_client(
                "127.0.0.1", port, [b"hello", b"world", large, b"QUIT"], replies
            )

            print("2. a size announcing 3 GiB")
            async with trionet.connect_tcp("127.0.0.1", port) as raw:
                await raw.send_all(b"\xff")  # the handshake
                handshake = await raw.receive_exactly(1)
                await raw.send_all((3 * 1024**3).to_bytes(4, "big"))
                answer = await raw.receive_some()
                after = await raw.receive_some()
            print(f"  handshake {handshake!r}, answer {answer!r}, then {after!r}")

            print("3. three clients, and a fourth over the limit")
            idle = [
                await tinyproto.connect_tinyproto(host, port)
                for host in ["127.0.0.1", hosts[-1], "127.0.0.1"]
            ]
            try:
                await tinyproto.connect_tinyproto("127.0.0.1", port)
                limit = "admitted?"
            except trionet.ConnectError as exc:
                limit = f"ConnectError({exc.reason.name})"
            print(f"  the fourth client: {limit}")

            print("4. SRVQUIT, while the other two are connected")
            await idle[0].transmit(b"SRVQUIT")
            await echo.srvquit.wait()
            print("  shutting the server down")
            await server.aclose()  # what leaving the block does, too
            idle_saw = []
            for conn in idle[1:]:
                try:
                    await conn.receive()
                    idle_saw.append("a message?")
                except trionet.ConnectionClosed as exc:
                    idle_saw.append(f"ConnectionClosed({exc.reason.name})")
            for conn in idle:
                await conn.aclose()
            print(f"  the idle clients saw {idle_saw}")
    print(f"refused by the connection limit: {server.refused}")

    if selftest:
        expected = [
            b"Echo back: hello",
            b"Echo back: world",
            b"Echo back: " + large,
        ]
        check(
            [digest(r) for r in replies] == [digest(r) for r in expected],
            f"replies {[r[:40] for r in replies]!r}",
        )
        check(
            (handshake, answer, after) == (b"\xff", b"\x00", b""),
            f"3 GiB: {(handshake, answer, after)!r}",
        )
        check(limit == "ConnectError(REJECTED)", limit)
        check(server.refused == 1, f"refused {server.refused}")
        check(idle_saw == ["ConnectionClosed(CLOSED_BY_PEER)"] * 2, f"{idle_saw}")
        check(
            sorted(r.name for r in echo.closed if r)
            == [
                "CLOSED_BY_HOST",  # after QUIT
                "CLOSED_BY_HOST",  # after SRVQUIT
                "CLOSED_BY_HOST",  # the fourth client, after its limit reply
                "PROTOCOL_ERROR",  # the 3 GiB size
                "SHUTDOWN",  # the idle clients
                "SHUTDOWN",
            ],
            f"server close reasons {echo.closed!r}",
        )
        print("selftest passed")


if __name__ == "__main__":
    trio.run(main, "--selftest" in sys.argv[1:])
