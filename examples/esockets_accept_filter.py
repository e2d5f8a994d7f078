"""An echo server that accepts or refuses each client by address (esockets).

esockets' README builds an echo server from two callbacks:
``handle_incoming(client, address)`` greets the client and returns True to
accept it (False disconnects it), and ``handle_readable(client)`` echoes what
arrived with a ``"SERVER: "`` prefix.  With trionet the decision is the
``accept`` option, a function of the client's address that runs before any
handler; the greeting and the echo loop are the handler.

This server admits clients from 127.0.0.1 only, and at most two at a time
from one address.  The demo connects

1. two clients from 127.0.0.1: greeted and echoed;
2. a third client from 127.0.0.1 while those two are still connected:
   refused by the per-address limit;
3. a client from 127.0.0.2 (Linux serves all of 127.0.0.0/8 on loopback):
   refused because its address is not allowed.  Skipped where 127.0.0.2 is
   not available.

A refused client is closed at once; its handler never runs and the server
counts it with ``CloseReason.REJECTED``.

Run it with ``python examples/esockets_accept_filter.py``; it ends by itself.
With ``--selftest`` it also checks every result and exits non-zero if one is
wrong.

esockets                          trionet
--------------------------------  ------------------------------------------
SocketServer(port, host, ...)     trionet.open_tcp_server(handler, port, host=...)
handle_incoming -> True / False   accept=lambda address: ... (sync or async)
client.sendall(greeting) in       await conn.send_line(...) first thing in the
handle_incoming                   handler (or in the ``on_connect`` hook)
handle_readable + client.recv()   async for line in conn (receive_some() for
                                  raw chunks)
return False from a callback      return from the handler
queue_size=1000                   backlog=1000
max_subthreads                    max_connections (one task per connection)
"""

from __future__ import annotations

import socket
import sys

import trio

import trionet

ALLOWED_HOSTS = {"127.0.0.1"}
MAX_PER_ADDRESS = 2
LINES = trionet.Lines()


def check(condition: bool, what: str) -> None:
    """Fail the self-test (even under ``python -O``) when ``condition`` is false."""
    if not condition:
        raise AssertionError(what)


class EchoServer:
    """The echo handler and its accept filter, which needs the open connections."""

    def __init__(self) -> None:
        self.server: trionet.Server | None = None
        self.decisions: list[tuple[str, bool]] = []

    def accept(self, address: tuple[str, int]) -> bool:
        """Called with each client's address before anything else happens."""
        assert self.server is not None
        host = address[0]
        if host not in ALLOWED_HOSTS:
            verdict, why = False, "address not allowed"
        else:
            # server.connections is a snapshot of the connections open now.
            same = [
                c
                for c in self.server.connections
                if c.remote_address is not None and c.remote_address[0] == host
            ]
            if len(same) >= MAX_PER_ADDRESS:
                verdict, why = False, f"{len(same)} connections from {host} already"
            else:
                verdict, why = True, "allowed"
        print(f"  accept{address} -> {verdict} ({why})")
        self.decisions.append((host, verdict))
        return verdict

    async def handle(self, conn: trionet.Connection) -> None:
        await conn.send_line("SERVER: Connection accepted!")
        async for line in conn:
            await conn.send_line(b"SERVER: " + line)


async def connect_from(source: str, port: int) -> trionet.Connection:
    """A client connection whose local address is ``source``."""
    return await trionet.connect_tcp(
        "127.0.0.1", port, framing=LINES, local_address=source
    )


async def echo_client(conn: trionet.Connection, name: str) -> list[bytes]:
    """Read the greeting, have one line echoed; return both replies."""
    greeting = await conn.receive_line()
    await conn.send_line(f"hello from {name}")
    echo = await conn.receive_line()
    print(f"  {name} got {greeting!r} and {echo!r}")
    return [greeting, echo]


async def refused_client(conn: trionet.Connection, name: str) -> bytes:
    """A refused client is closed at once: it reads the end of the stream."""
    data = await conn.receive_some()
    print(f"  {name} read {data!r}: {conn.close_reason}")
    await conn.aclose()
    return data


def loopback_alias_available() -> bool:
    try:
        with socket.socket() as sock:
            sock.bind(("127.0.0.2", 0))
    except OSError:
        return False
    return True


async def main(selftest: bool) -> None:
    echo = EchoServer()
    replies: dict[str, list[bytes]] = {}
    refused: dict[str, bytes] = {}
    async with trionet.open_tcp_server(
        echo.handle,
        host="127.0.0.1",
        framing=LINES,
        accept=echo.accept,
        backlog=1000,
    ) as server:
        echo.server = server
        port = server.port
        print(f"echo server on 127.0.0.1:{port}")
        with trio.fail_after(10):
            print("two clients from 127.0.0.1:")
            first = await connect_from("127.0.0.1", port)
            second = await connect_from("127.0.0.1", port)
            replies["first"] = await echo_client(first, "first")
            replies["second"] = await echo_client(second, "second")

            print("a third client from 127.0.0.1, the other two still connected:")
            third = await connect_from("127.0.0.1", port)
            refused["third"] = await refused_client(third, "third")

            if loopback_alias_available():
                print("a client from 127.0.0.2:")
                other = await connect_from("127.0.0.2", port)
                refused["127.0.0.2"] = await refused_client(other, "127.0.0.2")
            else:
                print("(127.0.0.2 is not available here; skipping that client)")

            await first.aclose()
            await second.aclose()
    stats = server.statistics()
    print(f"server stats: {stats}")

    if selftest:
        greeting = b"SERVER: Connection accepted!"
        for name in ("first", "second"):
            expected = [greeting, f"SERVER: hello from {name}".encode()]
            check(replies[name] == expected, f"{name} got {replies[name]!r}")
        check(all(data == b"" for data in refused.values()), f"refused {refused!r}")
        admitted = [verdict for _, verdict in echo.decisions]
        check(
            admitted == [True, True] + [False] * len(refused),
            f"decisions {echo.decisions!r}",
        )
        check(stats.accepted == 2, f"accepted {stats.accepted}")
        check(stats.rejected == len(refused), f"rejected {stats.rejected}")
        check(
            stats.closed
            == {
                trionet.CloseReason.CLOSED_BY_PEER: 2,
                trionet.CloseReason.REJECTED: len(refused),
            },
            f"close reasons {stats.closed!r}",
        )
        print("selftest passed")


if __name__ == "__main__":
    trio.run(main, "--selftest" in sys.argv[1:])
