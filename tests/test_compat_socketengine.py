"""trionet.compat.socketengine between trionet peers, byte by byte, and its faults.

The real socket.engine is in test_interop_socketengine.py.  Here: the line
codec (hypothesis: anything in, never an exception; every JSON value out as
one ASCII line that reads back), a stream of good and bad lines in random
chunks, get / get_ALL / write_ALL, ``__ack``, limits and slow clients.
"""

from __future__ import annotations

import contextlib
import json
import math
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

import trionet
from trionet import CloseReason, IncompleteMessage, LineTooLong, ProtocolError
from trionet.compat import socketengine
from trionet.compat.socketengine import EngineConnection, EngineGroup
from trionet.testing import ChunkedStream, connection_pair

ACK_LINE = b'{"type": "__ack", "data": "__ack"}\n'

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**30), 10**30)
    | st.floats(allow_nan=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def equal(a: Any, b: Any) -> bool:
    # (-0.0 == 0.0 and JSON keeps it; infinities too.)
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return bool(a == b)


@given(channel=st.text(), value=json_values)
def test_encode_is_one_ascii_line_that_reads_back(channel: str, value: Any) -> None:
    wire = socketengine.encode(channel, value)
    assert wire.isascii()
    assert b"\n" not in wire
    assert wire == json.dumps({"type": channel, "data": value}).encode()
    decoded = socketengine.decode(wire)
    assert decoded is not None
    assert decoded[0] == channel
    assert json.dumps(decoded[1]) == json.dumps(value)


def test_encode_exact_bytes() -> None:
    # json's default separators and ASCII escapes, as socket.engine writes.
    assert socketengine.encode("test", "héllo") == (
        b'{"type": "test", "data": "h\\u00e9llo"}'
    )
    with pytest.raises(TypeError, match="channel"):
        socketengine.encode(1, "x")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        socketengine.encode("x", {1, 2})


@settings(max_examples=500)
@given(
    line=st.one_of(
        st.binary(max_size=200),
        st.sampled_from(
            [
                b"",
                b"[1, 2]",
                b"null",
                b'"x"',
                b'{"type": 1, "data": 2}',
                b'{"type": "a"}',
                b'{"data": 1}',
                b"[" * 100_000,
                b'{"type": "a", "data": 1' + b"0" * 5000 + b"}",
                b'{"type": "\\ud800", "data": 1}',
                b"\xff\xfe{}",
            ]
        ),
    )
)
def test_decode_never_raises(line: bytes) -> None:
    result = socketengine.decode(line)
    if result is not None:
        channel, _value = result
        assert isinstance(channel, str)


def test_decode_keeps_only_messages() -> None:
    assert socketengine.decode(b'{"type": "a", "data": null}') == ("a", None)
    assert socketengine.decode(b'{"type": "a", "data": 1, "x": 2}') == ("a", 1)
    for bad in [b"[1]", b"1", b'{"type": 1, "data": 2}', b'{"type": "a"}', b"{"]:
        assert socketengine.decode(bad) is None


Item = tuple[str, Any] | bytes

items = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["a", "b", "é"]), json_values),
        st.sampled_from([b"garbage", b"[1, 2]", b'{"type": 3}', b"\xff", b""]),
    ),
    max_size=20,
)


@settings(max_examples=200, deadline=None)
@given(items=items, seed=st.integers(0, 2**32), max_chunk=st.integers(1, 40))
def test_a_stream_of_messages_and_garbage_in_any_chunks(
    items: list[Item], seed: int, max_chunk: int
) -> None:
    wire = b"".join(
        item + b"\n" if isinstance(item, bytes) else socketengine.encode(*item) + b"\n"
        for item in items
    )
    messages = [item for item in items if not isinstance(item, bytes)]

    async def main() -> None:
        async with connection_pair(
            wrap=lambda s: ChunkedStream(s, seed=seed, max_chunk=max_chunk)
        ) as (sender, receiver):
            conn = EngineConnection(receiver, socketengine._Settings())
            await sender.send_all(wire)
            await sender.aclose()
            got = [message async for message in conn]
            assert len(got) == len(messages)
            for (channel, value), (sent_channel, sent_value) in zip(
                got, messages, strict=True
            ):
                assert channel == sent_channel
                assert json.dumps(value) == json.dumps(sent_value)
            assert conn.ignored == len(items) - len(messages)
            for channel in ["a", "b", "é"]:
                sent = [v for c, v in messages if c == channel]
                assert json.dumps(conn.get(channel)) == json.dumps(
                    sent[-1] if sent else None
                )

    trio.run(main)


async def echo(conn: EngineConnection) -> None:
    async for channel, value in conn:
        await conn.write("reply", {"channel": channel, "value": value})


async def test_host_and_client_between_trionet_peers() -> None:
    async with socketengine.open_engine_server(echo, host="127.0.0.1") as server:
        async with socketengine.connect_engine("127.0.0.1", server.port) as conn:
            await conn.write("test", [1, "two", None])
            assert await conn.receive() == (
                "reply",
                {"channel": "test", "value": [1, "two", None]},
            )
            assert conn.get("reply") == {"channel": "test", "value": [1, "two", None]}
            assert conn.get("never") is None
            assert conn.channels == ["reply"]
            assert [c.connection.remote_address for c in server.clients] == [
                conn.connection.local_address
            ]
            assert server.get_ALL("test") == [[1, "two", None]]
        conn2 = await socketengine.connect_engine("127.0.0.1", server.port)
        async with conn2:
            assert "EngineConnection" in repr(conn2)
    assert conn2.close_reason is CloseReason.CLOSED_BY_HOST


async def test_get_all_is_the_latest_value_of_each_client() -> None:
    seen = trio.Semaphore(0)

    async def reader(conn: EngineConnection) -> None:
        async for _ in conn:
            seen.release()

    async with socketengine.open_engine_server(reader, host="127.0.0.1") as server:
        async with socketengine.connect_engine("127.0.0.1", server.port) as one:
            async with socketengine.connect_engine("127.0.0.1", server.port) as two:
                for conn, value in [(one, 1), (one, 2), (two, "x"), (two, None)]:
                    await conn.write("ch", value)
                    await seen.acquire()
                # One value per client, the latest; a null counts as none.
                assert server.get_ALL("ch") == [2]
                await two.write("ch", "y")
                await seen.acquire()
                assert server.get_ALL("ch") == [2, "y"]
                assert server.get_ALL("ch") == [2, "y"]  # reading takes nothing


async def test_write_all_reaches_every_client_as_one_line() -> None:
    async def idle(conn: EngineConnection) -> None:
        async for _ in conn:
            pass

    async with socketengine.open_engine_server(idle, host="127.0.0.1") as server:
        async with trionet.connect_tcp("127.0.0.1", server.port) as raw:
            async with socketengine.connect_engine("127.0.0.1", server.port) as conn:
                with trio.fail_after(10):
                    while len(server.clients) < 2:
                        await trio.testing.wait_all_tasks_blocked()
                await server.write_ALL("status", "héllo")
                expected = b'{"type": "status", "data": "h\\u00e9llo"}\n'
                assert await raw.receive_exactly(len(expected)) == expected
                assert await conn.receive() == ("status", "héllo")
                with pytest.raises(TypeError):
                    await server.write_ALL("status", object())


async def test_an_image_is_answered_with_ack() -> None:
    got: list[tuple[str, Any]] = []

    async def collect(conn: EngineConnection) -> None:
        async for message in conn:
            got.append(message)

    async with socketengine.open_engine_server(collect, host="127.0.0.1") as server:
        async with trionet.connect_tcp("127.0.0.1", server.port) as raw:
            await raw.send_all(b'{"type": "__image", "data": "iVBORw0KGgo="}\n')
            with trio.fail_after(10):
                assert await raw.receive_exactly(len(ACK_LINE)) == ACK_LINE
            await raw.send_all(b'{"type": "__image", "data": "second"}\n')
            with trio.fail_after(10):
                assert await raw.receive_exactly(len(ACK_LINE)) == ACK_LINE
    assert got == [("__image", "iVBORw0KGgo="), ("__image", "second")]


async def test_bad_lines_are_skipped_and_counted() -> None:
    async with connection_pair() as (raw, side):
        conn = EngineConnection(side, socketengine._Settings())
        await raw.send_all(b'not json\n[1]\n\xff\n{"type": "ok", "data": 1}\n')
        assert await conn.receive() == ("ok", 1)
        assert conn.ignored == 3


async def test_a_line_too_long_closes_with_protocol_error() -> None:
    async with connection_pair() as (raw, side):
        conn = EngineConnection(side, socketengine._Settings(max_length=100))
        await raw.send_all(b'{"type": "x", "data": "' + b"a" * 200)
        with pytest.raises(LineTooLong):
            await conn.receive()
        assert conn.close_reason is CloseReason.PROTOCOL_ERROR
        with pytest.raises(trionet.MessageTooLarge):
            await EngineConnection(raw, socketengine._Settings(max_length=100)).write(
                "x", "a" * 200
            )


async def test_latest_values_are_bounded_in_bytes() -> None:
    async with connection_pair() as (raw, side):
        conn = EngineConnection(side, socketengine._Settings(max_stored=2000))
        for number in range(100):
            await raw.send_all(socketengine.encode("same", number) + b"\n")
        for _ in range(100):
            await conn.receive()  # one channel, replaced: always fits
        with pytest.raises(ProtocolError, match="max_stored is 2000"):
            for number in range(100):
                await raw.send_all(socketengine.encode(f"ch{number}", 0) + b"\n")
                await conn.receive()
        assert conn.close_reason is CloseReason.PROTOCOL_ERROR
        assert len(conn.channels) < 10


async def test_iteration_ends_at_a_clean_close_and_not_inside_a_line() -> None:
    async with connection_pair() as (raw, side):
        conn = EngineConnection(side, socketengine._Settings())
        await raw.send_all(b'{"type": "a", "data": 1}\n')
        await raw.aclose()
        assert [m async for m in conn] == [("a", 1)]
    async with connection_pair() as (raw, side):
        conn = EngineConnection(side, socketengine._Settings())
        await raw.send_all(b'{"type": "a", "da')
        await raw.aclose()
        with pytest.raises(IncompleteMessage) as info:
            async for _ in conn:
                pass
        assert info.value.partial == b'{"type": "a", "da'


def slow_consumer_scenario(
    serve: Callable[..., Any], write_all: Callable[[Any], Any]
) -> Callable[[], Any]:
    """One client that never reads and one that does: the writes never wait,
    the non-reader is closed as SLOW_CONSUMER, the reader gets every line."""

    async def run() -> None:
        lines, payload = 200, "x" * 30_000
        closed: list[CloseReason | None] = []

        async with serve(
            host="127.0.0.1",
            send_queue_size=4,
            so_sndbuf=16384,
            grace_period=0,
            on_close=lambda conn: closed.append(conn.close_reason),
        ) as server:
            stuck = trio.socket.socket()
            stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await stuck.connect(("127.0.0.1", server.port))
            await stuck.send(b'{"type": "hello", "data": 0}\n')
            async with socketengine.connect_engine("127.0.0.1", server.port) as conn:
                await conn.write("hello", 1)
                with trio.fail_after(10):
                    while len(server.get_ALL("hello")) < 2:
                        await trio.testing.wait_all_tasks_blocked()
                received = 0
                for number in range(lines):
                    await write_all(server)("bulk", [number, payload])
                    while received < number - 2:  # the reader keeps pace
                        assert await conn.receive() == ("bulk", [received, payload])
                        received += 1
                while received < lines:
                    assert await conn.receive() == ("bulk", [received, payload])
                    received += 1
            stuck.close()
        assert CloseReason.SLOW_CONSUMER in closed

    return run


async def test_write_all_never_waits_on_a_slow_client() -> None:
    async def reader(conn: EngineConnection) -> None:
        async for _ in conn:
            pass

    await slow_consumer_scenario(
        partial(socketengine.open_engine_server, reader),
        lambda server: server.write_ALL,
    )()


async def test_a_group_on_a_shared_port() -> None:
    # handle() with a group: its get_ALL and write_ALL cover only the
    # socket.engine clients of a server that speaks other things too.
    group = EngineGroup()

    async def reader(conn: EngineConnection) -> None:
        async for _ in conn:
            pass

    async def route(conn: trionet.Connection) -> None:
        if await conn.peek(1) == b"{":
            await socketengine.handle(conn, reader, group=group)
        else:
            await conn.send_all(b"not for me\n")

    async with trionet.open_tcp_server(route, host="127.0.0.1") as server:
        async with trionet.connect_tcp("127.0.0.1", server.port) as other:
            await other.send_all(b"?")
            assert await other.receive_line() == b"not for me"
            async with socketengine.connect_engine("127.0.0.1", server.port) as conn:
                await conn.write("who", "engine")
                with trio.fail_after(10):
                    while group.get_ALL("who") != ["engine"]:
                        await trio.testing.wait_all_tasks_blocked()
                assert len(group.clients) == 1
                await group.write_ALL("news", 1)
                assert await conn.receive() == ("news", 1)
        with trio.fail_after(10):
            while group.clients:
                await trio.testing.wait_all_tasks_blocked()


class SharedPort:
    """A plain TCP server whose socket.engine clients are one EngineGroup."""

    def __init__(self, tcp: trionet.Server, group: EngineGroup) -> None:
        self.port = tcp.port
        self.group = group

    def get_ALL(self, channel: str) -> list[Any]:
        return self.group.get_ALL(channel)


@asynccontextmanager
async def serve_shared(**options: Any) -> AsyncIterator[SharedPort]:
    group = EngineGroup()

    async def reader(conn: EngineConnection) -> None:
        async for _ in conn:
            pass

    async def handle(conn: trionet.Connection) -> None:
        await socketengine.handle(conn, reader, group=group)

    async with trionet.open_tcp_server(handle, **options) as tcp:
        yield SharedPort(tcp, group)


async def test_a_group_write_all_never_waits_on_a_slow_client() -> None:
    await slow_consumer_scenario(serve_shared, lambda shared: shared.group.write_ALL)()


async def test_handle_without_a_group() -> None:
    async def greet(conn: EngineConnection) -> None:
        await conn.write("hello", "there")

    async with connection_pair(queued=True) as (raw, side):
        await socketengine.handle(side, greet)
        assert await raw.receive_line() == b'{"type": "hello", "data": "there"}'


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="max_length"):
        socketengine.connect_engine("h", 1, max_length=10)
    with pytest.raises(ValueError, match="max_stored"):
        socketengine.connect_engine("h", 1, max_stored=0)
    with pytest.raises(ValueError, match="max_length"):
        EngineGroup(max_length=10)


FILL = 2000


async def test_a_receive_cancelled_while_answering_an_image_loses_nothing() -> None:
    # The __ack waits behind a full outgoing queue (the peer reads nothing);
    # the receive is cancelled there.  The image, already taken from the
    # stream, comes out of the next receive, which sends the __ack.
    async with connection_pair(queued=True, lockstep=True) as (raw, side):
        conn = EngineConnection(side, socketengine._Settings())
        scope = trio.CancelScope()
        got: list[tuple[str, Any]] = []

        async def fill() -> None:
            with contextlib.suppress(trionet.ConnectionClosed):
                for _ in range(FILL):  # far more than the queue holds
                    await side.send(b"{}")

        async def receive_once() -> None:
            with scope:
                got.append(await conn.receive())

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fill)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(receive_once)
                await raw.send_all(b'{"type": "__image", "data": "pic"}\n')
                await trio.testing.wait_all_tasks_blocked()
                assert got == []  # waiting to send the __ack
                scope.cancel()
                await trio.testing.wait_all_tasks_blocked()
                assert got == []
                nursery.start_soon(partial(_collect, conn, got))
                lines = [await raw.receive_line() for _ in range(FILL + 1)]
        assert got == [("__image", "pic")]
        assert lines.count(ACK_LINE[:-1]) == 1


async def _collect(conn: EngineConnection, got: list[tuple[str, Any]]) -> None:
    got.append(await conn.receive())
