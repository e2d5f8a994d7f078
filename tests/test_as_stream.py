"""Connection.as_stream(): a Connection that passes trio's own stream checks."""

from __future__ import annotations

import pytest
import trio
import trio.testing

import trionet


async def _pair(
    lockstep: bool,
) -> tuple[trionet.ConnectionStream, trionet.ConnectionStream]:
    if lockstep:
        left, right = trio.testing.lockstep_stream_pair()
    else:
        left, right = trio.testing.memory_stream_pair()
    return (
        trionet.Connection(left).as_stream(),
        trionet.Connection(right).as_stream(),
    )


async def test_passes_trios_half_closeable_stream_checks() -> None:
    await trio.testing.check_half_closeable_stream(
        lambda: _pair(lockstep=False), lambda: _pair(lockstep=True)
    )


async def test_passes_over_tcp() -> None:
    async def echo(conn: trionet.Connection) -> None:
        stream = conn.as_stream()
        while data := await stream.receive_some():
            await stream.send_all(data)
        await stream.send_eof()

    async with trionet.open_tcp_server(echo, host="127.0.0.1") as server:
        conn = await trionet.connect_tcp("127.0.0.1", server.port)
        stream = conn.as_stream()
        assert isinstance(stream, trio.abc.HalfCloseableStream)
        await stream.send_all(b"through trio's interface")
        await stream.send_eof()
        received = b""
        while data := await stream.receive_some():
            received += data
        assert received == b"through trio's interface"
        await stream.aclose()
        # This side finished sending first.
        assert conn.close_reason is trionet.CloseReason.CLOSED_BY_HOST
        with pytest.raises(trio.ClosedResourceError):
            await stream.send_all(b"late")


async def test_framed_and_stream_use_share_one_buffer() -> None:
    async with trionet.testing.connection_pair(trionet.Lines()) as (a, b):
        await a.send_all(b"line\nraw bytes")
        assert await b.receive() == b"line"
        assert await b.as_stream().receive_some() == b"raw bytes"
