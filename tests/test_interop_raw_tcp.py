"""Plain trionet servers and clients against the real esockets and litesockets.

Both seeds speak raw TCP, so nothing but trionet's own API is needed; these
tests pin down the differences the "Coming from" pages describe (esockets
echoes per read, not per line; a refusal carries no message).  The peers
run in subprocesses (tests/interop/raw_peer.py); skipped when a seed is not
installed (``.ci/run`` installs both).
"""

from __future__ import annotations

import pytest
import trio

import trionet
from trionet import CloseReason

from .interop.support import need, open_peer


@pytest.fixture
def esockets() -> None:
    need("esockets 3.0.7")


@pytest.fixture
def litesockets() -> None:
    need("litesockets 0.7.1")


async def test_trionet_client_against_the_esockets_echo_server(esockets: None) -> None:
    with trio.fail_after(60):
        async with open_peer("raw_peer.py", "esockets-server") as peer:
            port = (await peer.receive())["port"]
            lines = trionet.Lines()
            async with trionet.connect_tcp("127.0.0.1", port, framing=lines) as conn:
                assert await conn.receive() == b"SERVER: Connection accepted!"
                await conn.send_all(b"hello\n")
                assert await conn.receive() == b"SERVER: hello"
                # esockets echoes each read, not each line: two lines sent
                # at once come back behind one prefix.
                await conn.send_all(b"one\ntwo\n")
                assert await conn.receive() == b"SERVER: one"
                assert await conn.receive() == b"two"

            # A refused client gets no message: the connection just ends.
            await peer.ask(cmd="refuse_next")
            async with trionet.connect_tcp("127.0.0.1", port) as refused:
                assert await refused.receive_some() == b""
                assert refused.eof_received
            assert refused.close_reason is CloseReason.CLOSED_BY_PEER


async def test_litesockets_client_against_a_trionet_server(litesockets: None) -> None:

    async def answer(conn: trionet.Connection) -> None:
        async for line in conn:
            await conn.send_line(b"got " + line)

    with trio.fail_after(60):
        async with trionet.open_tcp_server(
            answer, host="127.0.0.1", framing=trionet.Lines()
        ) as server:
            async with open_peer(
                "raw_peer.py", "litesockets-client", str(server.port)
            ) as peer:
                assert (await peer.receive())["connected"]
                await peer.ask(cmd="write", data="hello trionet\nand more\n")
                expected = "got hello trionet\ngot and more\n"
                reply = await peer.ask(cmd="wait_received", size=len(expected))
                assert reply["received"] == expected


async def test_trionet_client_against_the_litesockets_hello_server(
    litesockets: None,
) -> None:
    with trio.fail_after(60):
        async with open_peer("raw_peer.py", "litesockets-server") as peer:
            port = (await peer.receive())["port"]
            async with trionet.connect_tcp("127.0.0.1", port) as conn:
                assert await conn.receive_line() == b"hello"
                await conn.send_all(b"ping\n")
                assert await conn.receive_exactly(11) == b"echo: ping\n"
