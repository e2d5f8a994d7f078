"""A server that says "hello" and then disconnects (litesockets' server).

litesockets' README opens a ``TcpServer`` whose ``onNew`` callback writes
``"hello\\n"`` to each new client and ends the connection; ``telnet localhost
11882`` then prints "hello" and gets disconnected.  Here the server listens
on 127.0.0.1 (a free port) and three clients play telnet's part at once: each
reads everything until the server closes, and prints it.

Run it with ``python examples/litesockets_hello_server.py``; it ends by itself.
With ``--selftest`` it also checks what every client got and exits non-zero
if something is wrong.

litesockets                     trionet
------------------------------  ---------------------------------------------
TcpServer("localhost", 11882)   trionet.open_tcp_server(handler, 11882) or
server.connect(); SE.addServer  server = await nursery.start(trionet.serve_tcp,
                                handler, 11882)
server.onNew = newConnection    the handler (one task per client); the
                                ``on_connect`` option for a hook
client.addWrite("hello\\n")      await conn.send_line("hello")
client.end()                    return from the handler (or await conn.aclose())
"""

from __future__ import annotations

import sys

import trio

import trionet

CLIENTS = 3


def check(condition: bool, what: str) -> None:
    """Fail the self-test (even under ``python -O``) when ``condition`` is false."""
    if not condition:
        raise AssertionError(what)


def new_connection(conn: trionet.Connection) -> None:
    """The ``on_connect`` hook: runs once per client, before its handler."""
    print(f"Got new TCP client {conn.remote_address}")


async def hello(conn: trionet.Connection) -> None:
    """Say hello; returning from the handler ends the connection."""
    await conn.send_line("hello")


async def telnet(port: int, received: dict[int, bytes], index: int) -> None:
    """Connect, read until the server closes, remember what arrived."""
    async with trionet.connect_tcp("127.0.0.1", port) as conn:
        data = b""
        # receive_some() returns b"" at the end of the stream, as trio does.
        while chunk := await conn.receive_some():
            data += chunk
        received[index] = data
        print(f"client {index} got {data!r}, then: {conn.close_reason}")


async def main(selftest: bool) -> None:
    received: dict[int, bytes] = {}
    async with trionet.open_tcp_server(
        hello, on_connect=new_connection, host="127.0.0.1"
    ) as server:
        print(f"hello server on 127.0.0.1:{server.port}")
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for index in range(CLIENTS):
                    nursery.start_soon(telnet, server.port, received, index)
    print(f"server stats: {server.statistics()}")

    if selftest:
        check(
            received == dict.fromkeys(range(CLIENTS), b"hello\n"),
            f"received {received!r}",
        )
        stats = server.statistics()
        check(stats.accepted == CLIENTS, f"accepted {stats.accepted}")
        # The server ended every connection itself: CLOSED_BY_HOST on its side.
        check(
            stats.closed == {trionet.CloseReason.CLOSED_BY_HOST: CLIENTS},
            f"server close reasons {stats.closed!r}",
        )
        print("selftest passed")


if __name__ == "__main__":
    trio.run(main, "--selftest" in sys.argv[1:])
