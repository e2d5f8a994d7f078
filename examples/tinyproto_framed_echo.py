"""tinyproto's echo example, moved to trionet's own framing (both ends trionet).

tinyproto's README example is an echo server: it answers each message with
``"Echo back: <msg>"``; ``QUIT`` ends that client's connection and
``SRVQUIT`` shuts the whole server down along with all its clients.  The
server prints a line when a connection opens and when it closes, and listens
on several addresses (``add_addr``).

This version is for a fleet whose clients move to trionet too: it uses
trionet's ``Frames()`` -- a 4-byte big-endian length, then the payload --
which is *not* tinyproto's wire format.  tinyproto adds a handshake (one
``ff`` each way on connect) and a one-byte answer from the receiver between
each size and its body; a tinyproto client cannot talk to this server.  For
deployed tinyproto clients, serve the same handler with
``trionet.compat.tinyproto`` (``examples/tinyproto_compat_echo.py``).

The script runs the echo server on 127.0.0.1 and, where the system has IPv6,
on ::1 too (one port for both), then

1. a client over IPv4 sends two short messages and one of 24 MiB, and QUITs;
2. a raw client sends a header announcing 3 GiB: the server refuses it at
   the header, before any body arrives (the ``max_size`` limit), and closes
   the connection -- where tinyproto's receiver would answer ``00``;
3. a client stays connected doing nothing, and another (over IPv6 if there)
   sends SRVQUIT: the server shuts down; the idle client is closed with
   SHUTDOWN after the grace period.

Run it with ``python examples/tinyproto_framed_echo.py``; it ends by itself.
With ``--selftest`` it also checks every result and exits non-zero if one is
wrong.

tinyproto                             trionet (Frames: not wire compatible)
------------------------------------  -----------------------------------------
TinyProtoServer + add_addr(host, p)   open_tcp_server(handler, p, host=[...])
set_conn_handler(EchoConnection)      the handler: one task per connection
transmit(msg) / receive()             await conn.send(msg) / await conn.receive()
                                      (with framing=trionet.Frames())
transmission_received(msg)            the body of ``async for msg in conn``
pre_loop / post_loop                  code before / after that loop (or the
                                      on_connect / on_close hooks)
conn_init / conn_shutdown             on_connect=... / on_close=...
self.shutdown = True                  return from the handler
server shutdown                       await server.aclose() (or leave the block)
active_connections                    server.connections
"""

from __future__ import annotations

import hashlib
import socket
import sys

import trio

import trionet

CloseReason = trionet.CloseReason

#: The server takes messages up to 64 MiB; tinyproto's limit of a little over
#: 3.7 GiB would be ``trionet.Frames(max_size=0xF0FFFFFF)``.
FRAMES = trionet.Frames(max_size=64 * 1024 * 1024)
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

    async def handle(self, conn: trionet.Connection) -> None:
        try:
            async for msg in conn:  # each whole frame, however it arrived
                if msg == b"QUIT":
                    return  # closes this connection
                if msg == b"SRVQUIT":
                    self.srvquit.set()  # main() shuts the server down
                    return
                await conn.send(b"Echo back: " + msg)
        except trionet.FrameTooLarge as exc:
            print(f"  refused a frame: {exc}")


async def echo_client(
    host: str, port: int, messages: list[bytes], replies: list[bytes]
) -> None:
    async with trionet.connect_tcp(host, port, framing=FRAMES) as conn:
        for msg in messages:
            await conn.send(msg)
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
    async with trionet.open_tcp_server(
        echo.handle,
        host=hosts,
        framing=FRAMES,
        on_connect=echo.conn_init,
        on_close=echo.conn_shutdown,
        grace_period=0.5,
    ) as server:
        port = server.port
        print(f"echo server on {server.addresses}")
        with trio.fail_after(30):
            print("1. a client over IPv4")
            await echo_client(
                "127.0.0.1", port, [b"hello", b"world", large, b"QUIT"], replies
            )

            print("2. a header announcing 3 GiB")
            async with trionet.connect_tcp("127.0.0.1", port) as raw:
                await raw.send_all((3 * 1024**3).to_bytes(4, "big"))
                refused = await raw.receive_some()
            print(f"  the raw client read {refused!r}: closed without a body")

            print("3. SRVQUIT, while another client is connected")
            idle = await trionet.connect_tcp("127.0.0.1", port, framing=FRAMES)
            await echo_client(hosts[-1], port, [b"bye", b"SRVQUIT"], replies)
            await echo.srvquit.wait()
            print("  shutting the server down")
            await server.aclose()  # what leaving the block does, too
            try:
                await idle.receive()
                idle_saw = "a message?"
            except trionet.ConnectionClosed as exc:
                idle_saw = f"ConnectionClosed({exc.reason.name})"
            await idle.aclose()
            print(f"  the idle client saw {idle_saw}")
    print(f"server stats: {server.statistics()}")

    if selftest:
        expected = [
            b"Echo back: hello",
            b"Echo back: world",
            b"Echo back: " + large,
            b"Echo back: bye",
        ]
        check(
            [digest(r) for r in replies] == [digest(r) for r in expected],
            f"replies {[r[:40] for r in replies]!r}",
        )
        check(refused == b"", f"raw client read {refused!r}")
        check(idle_saw == "ConnectionClosed(CLOSED_BY_PEER)", idle_saw)
        check(
            sorted(r.name for r in echo.closed if r)
            == ["CLOSED_BY_HOST", "CLOSED_BY_HOST", "PROTOCOL_ERROR", "SHUTDOWN"],
            f"server close reasons {echo.closed!r}",
        )
        print("selftest passed")


if __name__ == "__main__":
    trio.run(main, "--selftest" in sys.argv[1:])
