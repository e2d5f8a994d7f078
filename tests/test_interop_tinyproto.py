"""trionet.compat.tinyproto against the real tinyproto 2.0.1 and 3.0.

Each test runs a real tinyproto client or server in a subprocess
(tests/interop/tinyproto_peer.py) and a recording proxy between it and
trionet, and asserts the scenario of tinyproto's README -- messages, a
multi-MiB message, QUIT, SRVQUIT -- and the bytes on the wire.  Skipped when
a release is not installed (``.ci/run`` installs both; under
TRIONET_REQUIRE_SEEDS a missing one fails instead).
"""

from __future__ import annotations

import hashlib
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest
import trio

import trionet
from trionet import CloseReason, ConnectionClosed
from trionet.compat import tinyproto

from .interop.support import TINYPROTO_201, Peer, need, open_peer, open_proxy

VERSIONS = ["2.0.1", "3.0"]
BIG = 5 * 1024 * 1024 + 7
OK, REFUSE = b"\xff", b"\x00"


def big_payload(size: int = BIG) -> bytes:
    """What the peer script sends for ``{"big": size}``."""
    return (b"0123456789abcdef" * (size // 16 + 1))[:size]


def size(n: int) -> bytes:
    return n.to_bytes(4, "big")


@pytest.fixture(params=VERSIONS)
def version(request: pytest.FixtureRequest) -> str:
    """Each tinyproto release in turn (skipped where it is not installed)."""
    release = str(request.param)
    need(f"tinyproto {release}")
    return release


@pytest.fixture
def tinyproto_201() -> None:
    need("tinyproto 2.0.1")


def pythonpath(version: str) -> Path | None:
    return TINYPROTO_201 if version == "2.0.1" else None


def old_client(version: str, port: int) -> AbstractAsyncContextManager[Peer]:
    """A real tinyproto client process, to connect to 127.0.0.1:``port``."""
    return open_peer(
        "tinyproto_peer.py",
        "client",
        "127.0.0.1",
        str(port),
        pythonpath=pythonpath(version),
    )


def old_server(version: str, *limit: str) -> AbstractAsyncContextManager[Peer]:
    """A real tinyproto echo server process (``limit``: its connection limit)."""
    return open_peer(
        "tinyproto_peer.py", "server", *limit, pythonpath=pythonpath(version)
    )


def summary(exchange: list[tuple[str, bytes]]) -> list[tuple[str, object]]:
    """The exchange with long messages replaced by their length and hash."""
    return [
        (way, data if len(data) <= 64 else (len(data), sha(data)))
        for way, data in exchange
    ]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def echo_exchange(message: bytes) -> list[tuple[str, object]]:
    """One README round trip on the wire (client first)."""
    reply = b"Echo back: " + message
    return summary(
        [
            ("c>s", size(len(message))),
            ("s>c", OK),
            ("c>s", message),
            ("s>c", size(len(reply))),
            ("c>s", OK),
            ("s>c", reply),
        ]
    )


def quit_exchange(word: bytes) -> list[tuple[str, object]]:
    return [("c>s", size(len(word))), ("s>c", OK), ("c>s", word)]


class EchoServer:
    """The README's echo server, as a trionet tinyproto handler."""

    def __init__(self) -> None:
        self.srvquit = trio.Event()
        self.closed: list[CloseReason | None] = []

    async def handle(self, conn: tinyproto.TinyprotoConnection) -> None:
        async for message in conn:
            if message == b"QUIT":
                return
            if message == b"SRVQUIT":
                self.srvquit.set()
                return
            await conn.transmit(b"Echo back: " + message)

    def on_close(self, conn: trionet.Connection) -> None:
        self.closed.append(conn.close_reason)


async def test_old_client_gets_the_readme_scenario(version: str) -> None:
    echo = EchoServer()
    with trio.fail_after(120):
        async with tinyproto.open_tinyproto_server(
            echo.handle, host="127.0.0.1", grace_period=0, on_close=echo.on_close
        ) as server:
            async with open_proxy(server.port) as proxy:
                async with old_client(version, proxy.port) as peer:
                    assert (await peer.ask(cmd="connect"))["handshake"]
                    await peer.ask(cmd="transmit", conn=0, text="hello")
                    reply = await peer.ask(cmd="reply", conn=0)
                    assert reply["head"] == "Echo back: hello"
                    await peer.ask(cmd="transmit", conn=0, big=BIG)
                    reply = await peer.ask(cmd="reply", conn=0)
                    expected = b"Echo back: " + big_payload()
                    assert (reply["len"], reply["sha256"]) == (
                        len(expected),
                        sha(expected),
                    )

                    # An idle client, then QUIT on the first one.
                    assert (await peer.ask(cmd="connect"))["handshake"]
                    await peer.ask(cmd="transmit", conn=0, text="QUIT")
                    assert (await peer.ask(cmd="wait_closed", conn=0))["closed"]

                    # SRVQUIT from a third: the server shuts down with every client.
                    assert (await peer.ask(cmd="connect"))["handshake"]
                    await peer.ask(cmd="transmit", conn=2, text="SRVQUIT")
                    await echo.srvquit.wait()
                    await server.aclose()
                    assert (await peer.ask(cmd="wait_closed", conn=1))["closed"]
                    assert (await peer.ask(cmd="wait_closed", conn=2))["closed"]
                    for wire in proxy.wires:
                        await wire.ended["s>c"].wait()

    first, idle, last = proxy.wires
    for wire in proxy.wires:  # the handshake: one ff each way, first
        assert wire.stream("c>s")[:1] == OK
        assert wire.stream("s>c")[:1] == OK
    assert summary(first.exchange()) == [
        *echo_exchange(b"hello"),
        *echo_exchange(big_payload()),
        *quit_exchange(b"QUIT"),
    ]
    assert idle.exchange() == []
    assert last.exchange() == quit_exchange(b"SRVQUIT")
    assert sorted(reason.name for reason in echo.closed if reason) == [
        "CLOSED_BY_HOST",  # after QUIT
        "CLOSED_BY_HOST",  # after SRVQUIT
        "SHUTDOWN",  # the idle client
    ]


async def test_trionet_client_gets_the_readme_scenario(version: str) -> None:
    with trio.fail_after(120):
        async with old_server(version) as peer:
            started = await peer.receive()
            assert started["v3"] == (version == "3.0")
            async with open_proxy(started["port"]) as proxy:
                async with tinyproto.connect_tinyproto("127.0.0.1", proxy.port) as conn:
                    await conn.transmit(b"hello")
                    assert await conn.receive() == b"Echo back: hello"
                    await conn.transmit(big_payload())
                    assert await conn.receive() == b"Echo back: " + big_payload()
                    idle = await tinyproto.connect_tinyproto("127.0.0.1", proxy.port)
                    await conn.transmit(b"QUIT")
                    with pytest.raises(ConnectionClosed) as info:
                        await conn.receive()
                    assert info.value.reason is CloseReason.CLOSED_BY_PEER
                async with tinyproto.connect_tinyproto(
                    "127.0.0.1", proxy.port
                ) as quitter:
                    await quitter.transmit(b"SRVQUIT")
                    stopped = await peer.ask(cmd="wait_stopped")
                    assert stopped["stopped"], stopped
                    assert "srvquit" in stopped["events"]
                # The server shut down "along with all clients".
                async with idle:
                    with pytest.raises(ConnectionClosed) as info:
                        await idle.receive()
                    assert info.value.reason is CloseReason.CLOSED_BY_PEER
                # (The server may never close the SRVQUIT connection itself:
                # 3.0's connection thread dies without closing its socket
                # when it sees the client's end of stream first.)
                first_wire, idle_wire, last = proxy.wires
                await first_wire.ended["s>c"].wait()
                await idle_wire.ended["s>c"].wait()
                await last.ended["c>s"].wait()

    for wire in proxy.wires:
        assert wire.stream("c>s")[:1] == OK
        assert wire.stream("s>c")[:1] == OK
    assert summary(first_wire.exchange()) == [
        *echo_exchange(b"hello"),
        *echo_exchange(big_payload()),
        *quit_exchange(b"QUIT"),
    ]
    assert idle_wire.exchange() == []
    assert last.exchange() == quit_exchange(b"SRVQUIT")


async def test_old_client_over_max_connections_gets_the_limit_reply(
    version: str,
) -> None:
    with trio.fail_after(60):
        async with tinyproto.open_tinyproto_server(
            EchoServer().handle, host="127.0.0.1", max_connections=1
        ) as server:
            async with open_proxy(server.port) as proxy:
                async with old_client(version, proxy.port) as peer:
                    assert (await peer.ask(cmd="connect"))["handshake"]
                    second = await peer.ask(cmd="connect")
                    assert not second["handshake"]
                    assert any("Initialisation error" in e for e in second["errors"])
                    # The first client is still served.
                    await peer.ask(cmd="transmit", conn=0, text="still here")
                    reply = await peer.ask(cmd="reply", conn=0)
                    assert reply["head"] == "Echo back: still here"
                    await proxy.wires[1].ended["s>c"].wait()
            assert server.refused == 1
    refused = proxy.wires[1]
    assert refused.stream("s>c") == tinyproto.LIMIT_REPLY == bytes(254)
    assert refused.stream("c>s") == OK


async def test_trionet_client_over_the_old_server_limit_is_rejected(
    tinyproto_201: None,
) -> None:
    # (2.0.1 only: 3.0's server does not get as far as its limit reply.)
    with trio.fail_after(60):
        async with old_server("2.0.1", "1") as peer:
            port = (await peer.receive())["port"]
            async with tinyproto.connect_tinyproto("127.0.0.1", port) as first:
                with pytest.raises(trionet.ConnectError) as info:
                    await tinyproto.connect_tinyproto("127.0.0.1", port)
                assert info.value.reason is CloseReason.REJECTED
                await first.transmit(b"hi")
                assert await first.receive() == b"Echo back: hi"


async def test_old_client_over_max_size_is_refused_with_00(version: str) -> None:
    closed: list[CloseReason | None] = []
    with trio.fail_after(60):
        async with tinyproto.open_tinyproto_server(
            EchoServer().handle,
            host="127.0.0.1",
            max_size=20,
            on_close=lambda conn: closed.append(conn.close_reason),
        ) as server:
            async with open_proxy(server.port) as proxy:
                async with old_client(version, proxy.port) as peer:
                    assert (await peer.ask(cmd="connect"))["handshake"]
                    # max_size is inclusive: 20 bytes pass...
                    await peer.ask(cmd="transmit", conn=0, big=20)
                    reply = await peer.ask(cmd="reply", conn=0)
                    assert reply["len"] == 31
                    # ...21 are refused at the size, and no body is sent.
                    refused = await peer.ask(cmd="transmit", conn=0, big=21)
                    assert refused["transmitted"] is False
                    assert "Transmission rejected" in refused["detail"]
                    await proxy.wires[0].ended["s>c"].wait()
    assert proxy.wires[0].exchange()[-2:] == [("c>s", size(21)), ("s>c", REFUSE)]
    assert closed == [CloseReason.PROTOCOL_ERROR]


async def test_old_server_refuses_sizes_over_the_protocol_limit(
    tinyproto_201: None,
) -> None:
    # What the refusal looks like from a real tinyproto receiver, byte for byte.
    with trio.fail_after(60):
        async with old_server("2.0.1") as peer:
            port = (await peer.receive())["port"]
            async with trionet.connect_tcp("127.0.0.1", port) as raw:
                await raw.send_all(OK)
                assert await raw.receive_exactly(1) == OK
                await raw.send_all(size(tinyproto.PROTOCOL_MAX_SIZE + 1))
                assert await raw.receive_exactly(1) == REFUSE
                # The connection stays in step: a message that fits is answered.
                await raw.send_all(size(2))
                assert await raw.receive_exactly(1) == OK
                await raw.send_all(b"ok")
                assert await raw.receive_exactly(4) == size(13)
                await raw.send_all(OK)
                assert await raw.receive_exactly(13) == b"Echo back: ok"
