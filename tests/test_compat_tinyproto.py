"""trionet.compat.tinyproto between trionet peers, byte by byte, and its faults.

The real tinyproto releases are in test_interop_tinyproto.py; here both ends
are trionet (or a raw trionet Connection playing the other side), so every
byte and every wait can be checked exactly.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
import trio.testing

import trionet
from trionet import (
    CloseReason,
    ConnectError,
    ConnectionClosed,
    FrameTooLarge,
    IncompleteMessage,
    MessageTooLarge,
    ProtocolError,
)
from trionet.compat import tinyproto
from trionet.compat.tinyproto import TinyprotoConnection
from trionet.testing import ResetAfter, connection_pair

OK, REFUSE = b"\xff", b"\x00"


def size(n: int) -> bytes:
    return n.to_bytes(4, "big")


async def echo(conn: TinyprotoConnection) -> None:
    async for message in conn:
        await conn.transmit(b"Echo back: " + message)


@asynccontextmanager
async def raw_against(
    handler: tinyproto.Handler, **settings: object
) -> AsyncIterator[tuple[trionet.Connection, list[BaseException]]]:
    """A raw connection speaking to ``handle(conn, handler)`` on a server-like
    in-memory connection; yields it and the list of what the handler raised.

    At the end of the block the raw side closes and the handler is given
    (at most 60 s) to finish."""
    errors: list[BaseException] = []

    async def serve(conn: trionet.Connection) -> None:
        try:
            await tinyproto.handle(conn, handler, **settings)  # type: ignore[arg-type]
        except Exception as exc:
            errors.append(exc)

    async with connection_pair(queued=True) as (raw, server_side):
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve, server_side)
                yield raw, errors
                await raw.aclose()


async def handshake(raw: trionet.Connection) -> None:
    await raw.send_all(OK)
    assert await raw.receive_exactly(1) == OK


async def test_echo_between_trionet_peers() -> None:
    big = bytes(range(256)) * (3 * 4096 + 1)  # 3 MiB and a bit
    async with tinyproto.open_tinyproto_server(echo, host="127.0.0.1") as server:
        assert server.port and server.addresses
        async with tinyproto.connect_tinyproto("127.0.0.1", server.port) as conn:
            for message in [b"hello", b"", big, bytearray(b"ba"), memoryview(b"mv")]:
                await conn.transmit(message)
                assert await conn.receive() == b"Echo back: " + bytes(message)
            await conn.transmit("héllo")  # str travels as UTF-8
            assert await conn.receive() == "Echo back: héllo".encode()
            assert [c.connection.remote_address for c in server.connections] == [
                conn.connection.local_address
            ]


async def test_awaiting_connect_gives_an_open_connection() -> None:
    async with tinyproto.open_tinyproto_server(echo, host="127.0.0.1") as server:
        conn = await tinyproto.connect_tinyproto("127.0.0.1", server.port)
        try:
            await conn.transmit(b"x")
            assert await conn.receive() == b"Echo back: x"
            assert conn.close_reason is None
            assert "TinyprotoConnection" in repr(conn)
        finally:
            await conn.aclose()
        assert conn.close_reason is CloseReason.CLOSED_BY_HOST


async def test_the_server_side_bytes_and_their_order() -> None:
    # The README round trip, checked from the client's side of the wire:
    # the server answers the size before the body is sent, and sends its
    # reply's body only after the client's ff.
    async with raw_against(echo) as (raw, errors):
        await handshake(raw)
        await raw.send_all(size(5))
        assert await raw.receive_exactly(1) == OK
        await raw.send_all(b"hello")
        assert await raw.receive_exactly(4) == size(16)
        got: list[bytes] = []

        async def read_body() -> None:
            got.append(await raw.receive_exactly(16))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_body)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []  # no body before the ff
            await raw.send_all(OK)
        assert got == [b"Echo back: hello"]
    assert errors == []


async def test_the_client_side_bytes_and_their_order() -> None:
    # connect_tinyproto's transmit waits for the answer before the body.
    async with connection_pair() as (raw, client_side):
        settings = tinyproto._Settings()
        conn = TinyprotoConnection(client_side, settings)
        got: list[bytes] = []

        async def read_body() -> None:
            got.append(await raw.receive_exactly(5))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.transmit, b"hello")
            assert await raw.receive_exactly(4) == size(5)
            nursery.start_soon(read_body)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []  # no body before the ff
            await raw.send_all(OK)
        assert got == [b"hello"]


async def test_max_size_is_inclusive_and_refused_with_00() -> None:
    closed: list[CloseReason | None] = []
    async with tinyproto.open_tinyproto_server(
        echo,
        host="127.0.0.1",
        max_size=10,
        on_close=lambda conn: closed.append(conn.close_reason),
    ) as server:
        assert server.max_size == 10
        async with tinyproto.connect_tinyproto("127.0.0.1", server.port) as conn:
            await conn.transmit(b"x" * 10)
            assert await conn.receive() == b"Echo back: " + b"x" * 10
            with pytest.raises(MessageTooLarge, match="refused a message of 11"):
                await conn.transmit(b"x" * 11)
            # The refusing side closed the connection after its 00.
            with pytest.raises(ConnectionClosed) as info:
                await conn.receive()
            assert info.value.reason is CloseReason.CLOSED_BY_PEER
    assert closed == [CloseReason.PROTOCOL_ERROR]


async def test_refusal_bytes_and_error() -> None:
    async with raw_against(echo, max_size=3) as (raw, errors):
        await handshake(raw)
        await raw.send_all(size(4) + b"body")  # a peer that does not wait
        assert await raw.receive_exactly(1) == REFUSE
        assert await raw.receive_some() == b""  # then the end of the stream
    [error] = errors
    assert isinstance(error, FrameTooLarge)
    assert "4 bytes; max_size is 3" in str(error)


async def test_transmit_over_the_protocol_limit_sends_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tinyproto, "PROTOCOL_MAX_SIZE", 8)
    async with connection_pair() as (raw, client_side):
        conn = TinyprotoConnection(client_side, tinyproto._Settings())
        with pytest.raises(MessageTooLarge, match="tinyproto's limit"):
            await conn.transmit(b"123456789")
        await client_side.send_all(b"!")  # the first byte sent since
        with trio.fail_after(5):
            assert await raw.peek(1) == b"!"
        assert conn.close_reason is None


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="max_size"):
        tinyproto.connect_tinyproto("h", 1, max_size=tinyproto.PROTOCOL_MAX_SIZE + 1)
    with pytest.raises(ValueError, match="ack_timeout"):
        tinyproto.connect_tinyproto("h", 1, ack_timeout=0)


async def test_max_connections_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_connections"):
        async with tinyproto.open_tinyproto_server(echo, max_connections=0):
            pass


async def test_a_bad_handshake_closes_with_protocol_error() -> None:
    async with raw_against(echo) as (raw, errors):
        await raw.send_all(b"{")
        with trio.fail_after(5):
            rest = b""
            while chunk := await raw.receive_some():
                rest += chunk
        assert rest in (b"", OK)  # the server's own ff may be cut off
    [error] = errors
    assert isinstance(error, ProtocolError)
    assert "handshake" in str(error)


async def test_no_handshake_in_time_closes_with_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with raw_against(echo, handshake_timeout=5) as (raw, errors):
        assert await raw.receive_exactly(1) == OK
        assert await raw.receive_some() == b""
    [error] = errors
    assert isinstance(error, ConnectionClosed)
    assert error.reason is CloseReason.TIMEOUT


async def test_connecting_to_something_else_is_a_connect_error() -> None:
    async def not_tinyproto(conn: trionet.Connection) -> None:
        await conn.send_all(b"220 smtp\r\n")

    async with trionet.open_tcp_server(not_tinyproto, host="127.0.0.1") as server:
        with pytest.raises(ConnectError) as info:
            await tinyproto.connect_tinyproto("127.0.0.1", server.port)
        assert info.value.reason is CloseReason.PROTOCOL_ERROR
        assert "handshake byte 32" in str(info.value)


async def test_connect_times_out_without_a_handshake() -> None:
    done = trio.Event()

    async def silent(conn: trionet.Connection) -> None:
        await done.wait()

    async with trionet.open_tcp_server(
        silent, host="127.0.0.1", grace_period=0
    ) as server:
        with pytest.raises(ConnectError) as info:
            await tinyproto.connect_tinyproto(
                "127.0.0.1", server.port, connect_timeout=0.2
            )
        done.set()
    assert info.value.reason is CloseReason.TIMEOUT


async def test_no_answer_in_time_closes_with_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with connection_pair() as (raw, client_side):
        conn = TinyprotoConnection(client_side, tinyproto._Settings(ack_timeout=5))
        with pytest.raises(ConnectionClosed) as info:
            await conn.transmit(b"hello")
        assert info.value.reason is CloseReason.TIMEOUT
        assert conn.close_reason is CloseReason.TIMEOUT
        assert await raw.receive_exactly(4) == size(5)  # and no body


async def test_a_wrong_answer_is_a_protocol_error() -> None:
    async with connection_pair() as (raw, client_side):
        conn = TinyprotoConnection(client_side, tinyproto._Settings())
        # A peer transmitting at the same time: the first byte of its size,
        # 00, reads as a refusal...
        await raw.send_all(size(3)[:1])
        with pytest.raises(MessageTooLarge):
            await conn.transmit(b"hello")
        # ...and any other byte is no answer at all.
        await raw.send_all(b"\x42")
        with pytest.raises(ProtocolError, match="answered a transmission with 42"):
            await conn.transmit(b"again")
        assert conn.close_reason is CloseReason.PROTOCOL_ERROR


async def test_cancelled_transmit_after_the_size_closes_with_error() -> None:
    async with connection_pair() as (raw, client_side):
        conn = TinyprotoConnection(client_side, tinyproto._Settings())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.transmit, b"hello")
            assert await raw.receive_exactly(4) == size(5)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        assert conn.close_reason is CloseReason.ERROR


async def test_cancelled_receive_resumes_where_it_stopped() -> None:
    received: list[bytes] = []
    scope = trio.CancelScope()

    async def patient(conn: TinyprotoConnection) -> None:
        with scope:  # cancelled in the middle of the body
            received.append(await conn.receive())
        received.append(await conn.receive())  # the same message, whole
        await conn.transmit(b"done")

    async with raw_against(patient) as (raw, errors):
        await handshake(raw)
        await raw.send_all(size(6))
        assert await raw.receive_exactly(1) == OK
        await raw.send_all(b"abc")
        await trio.testing.wait_all_tasks_blocked()
        scope.cancel()
        await raw.send_all(b"def")
        with trio.fail_after(5):
            assert await raw.receive_exactly(4) == size(4)
            await raw.send_all(OK)
            assert await raw.receive_exactly(4) == b"done"
    assert received == [b"abcdef"]
    assert errors == []


async def test_a_transmit_waits_for_a_receive_in_progress() -> None:
    # Half duplex: a transmit from another task does not cut into the
    # message being received.
    order: list[str] = []

    async def two_tasks(conn: TinyprotoConnection) -> None:
        async def receiver() -> None:
            order.append("got " + (await conn.receive()).decode())

        async def sender() -> None:
            await trio.testing.wait_all_tasks_blocked()
            await conn.transmit(b"push")
            order.append("pushed")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver)
            nursery.start_soon(sender)

    async with raw_against(two_tasks) as (raw, errors):
        await handshake(raw)
        await trio.testing.wait_all_tasks_blocked()
        await raw.send_all(size(3))
        assert await raw.receive_exactly(1) == OK
        await raw.send_all(b"req")
        # Only now does the push begin.
        assert await raw.receive_exactly(4) == size(4)
        await raw.send_all(OK)
        assert await raw.receive_exactly(4) == b"push"
        await trio.testing.wait_all_tasks_blocked()
    assert order == ["got req", "pushed"]
    assert errors == []


async def test_a_transmit_after_a_half_received_message_is_refused() -> None:
    scope = trio.CancelScope()
    refused: list[RuntimeError] = []

    async def impatient(conn: TinyprotoConnection) -> None:
        with scope:
            await conn.receive()
        with pytest.raises(RuntimeError, match="half received") as info:
            await conn.transmit(b"too early")
        refused.append(info.value)

    async with raw_against(impatient) as (raw, errors):
        await handshake(raw)
        await raw.send_all(size(6) + b"abc")
        assert await raw.receive_exactly(1) == OK
        await trio.testing.wait_all_tasks_blocked()
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
    assert len(refused) == 1
    assert errors == []


async def test_iteration_ends_at_a_clean_close_and_not_inside_a_message() -> None:
    got: list[bytes] = []

    async def collect(conn: TinyprotoConnection) -> None:
        async for message in conn:
            got.append(message)

    async with raw_against(collect) as (raw, errors):
        await handshake(raw)
        await raw.send_all(size(2))
        assert await raw.receive_exactly(1) == OK
        await raw.send_all(b"hi")
        await raw.aclose()
    assert got == [b"hi"]
    assert errors == []

    async with raw_against(collect) as (raw, errors):
        await handshake(raw)
        await raw.send_all(size(5))
        assert await raw.receive_exactly(1) == OK
        await raw.send_all(b"hal")
        await raw.aclose()
    [error] = errors
    assert isinstance(error, IncompleteMessage)
    assert error.partial == b"hal"


async def test_a_reset_inside_a_message_is_an_error() -> None:
    async def collect(conn: TinyprotoConnection) -> None:
        await conn.receive()

    errors: list[BaseException] = []

    async def serve(conn: trionet.Connection) -> None:
        try:
            await tinyproto.handle(conn, collect)
        except ConnectionClosed as exc:
            errors.append(exc)

    async with connection_pair(
        queued=True, wrap=lambda stream: ResetAfter(stream, 1 + 4 + 2)
    ) as (raw, server_side):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve, server_side)
            await handshake(raw)
            await raw.send_all(size(5) + b"ab")
    [error] = errors
    assert error.reason is CloseReason.ERROR


async def test_the_limit_reply_is_254_nuls_then_a_clean_end() -> None:
    async with tinyproto.open_tinyproto_server(
        echo, host="127.0.0.1", max_connections=1
    ) as server:
        async with tinyproto.connect_tinyproto("127.0.0.1", server.port) as first:
            async with trionet.connect_tcp("127.0.0.1", server.port) as raw:
                await raw.send_all(OK)
                reply = b""
                with trio.fail_after(10):
                    while chunk := await raw.receive_some():
                        reply += chunk
                # A FIN, not a reset (a reset would have raised, ERROR).
                assert raw.eof_received
                assert raw.close_reason is None
            assert raw.close_reason is CloseReason.CLOSED_BY_PEER
            assert reply == tinyproto.LIMIT_REPLY == bytes(254)
            with pytest.raises(ConnectError) as info:
                await tinyproto.connect_tinyproto("127.0.0.1", server.port)
            assert info.value.reason is CloseReason.REJECTED
            assert server.refused == 2
            await first.transmit(b"still served")
            assert await first.receive() == b"Echo back: still served"
        # Once the first client has left, the next one is admitted.
        with trio.fail_after(10):
            while server.connections:
                await trio.testing.wait_all_tasks_blocked()
        async with tinyproto.connect_tinyproto("127.0.0.1", server.port) as second:
            await second.transmit(b"in")
            assert await second.receive() == b"Echo back: in"


async def test_serve_tinyproto_in_a_nursery() -> None:
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            partial(tinyproto.serve_tinyproto, echo, 0, host="127.0.0.1")
        )
        assert isinstance(server, tinyproto.TinyprotoServer)
        assert "TinyprotoServer" in repr(server)
        async with tinyproto.connect_tinyproto("127.0.0.1", server.port) as conn:
            await conn.transmit(b"x")
            assert await conn.receive() == b"Echo back: x"
        await server.aclose()
    assert server.statistics().accepted == 1


def test_a_server_not_yet_serving_says_so() -> None:
    server = tinyproto.TinyprotoServer(echo, tinyproto._Settings())
    with pytest.raises(RuntimeError, match="not serving yet"):
        server.port  # noqa: B018
    assert "not serving" in repr(server)


async def test_handler_exceptions_are_the_servers_to_log() -> None:
    async def broken(conn: TinyprotoConnection) -> None:
        raise KeyError("bug")

    async with tinyproto.open_tinyproto_server(broken, host="127.0.0.1") as server:
        async with tinyproto.connect_tinyproto("127.0.0.1", server.port) as conn:
            with pytest.raises(ConnectionClosed):
                await conn.receive()
    assert [type(e) for e in server.handler_exceptions] == [KeyError]
