"""Large frames near the copy floor: a frame that arrives whole at the front
of a received chunk is cut straight out of it (one copy), and a large
payload is sent after its header with one scatter-gather ``sendmsg`` (no
copy) -- with the order, the limits, partial writes and the rule that memory
follows what arrived all kept.
"""

from __future__ import annotations

import socket
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import example, given, settings
from hypothesis import strategies as st

import trionet
import trionet._connection
from trionet import CloseReason, FrameTooLarge
from trionet._codec._buffer import large_frame_end
from trionet._connection import SCATTER_MIN, Connection
from trionet._sending import QueuedSendPath, SendLimits
from trionet._transport import SocketTransport

from .conftest import open_pair

FRAMES = trionet.Frames()


def pattern(size: int, seed: int = 0) -> bytes:
    return (bytes(range(seed % 7, 251)) * (size // 200 + 1))[:size]


class RecordingSocket(socket.socket):
    """Records every ``send``/``sendmsg``; ``sendmsg`` takes at most
    ``take`` bytes per call (the kernel running out of room)."""

    take = 1 << 30
    sendmsgs: list[tuple[Any, ...]]

    def sendmsg(self, buffers: Any, *args: Any) -> int:  # type: ignore[override]
        parts = tuple(buffers)
        self.sendmsgs.append(parts)
        joined = b"".join(parts)
        if self.take >= len(joined):
            return super().sendmsg(parts, *args)
        if not self.take:
            raise BlockingIOError
        return super().send(joined[: self.take])


def recording(sock: socket.socket, take: int = 1 << 30) -> RecordingSocket:
    new = RecordingSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())
    new.sendmsgs = []
    new.take = take
    return new


@asynccontextmanager
async def socket_pair(
    take: int = 1 << 30, *, queued: bool = True
) -> AsyncIterator[tuple[Connection, Connection, RecordingSocket]]:
    """(reader, sender, the sender's socket) over a socketpair, both on the
    plain-socket fast path; the sender queued (as a server's) or locked."""
    a, b = socket.socketpair()
    sock = recording(b, take)
    reader = Connection._over(SocketTransport(a), FRAMES)
    try:
        async with trio.open_nursery() as nursery:
            path = QueuedSendPath(nursery, SendLimits()) if queued else None
            sender = (
                Connection._over(SocketTransport(sock), FRAMES, path)
                if path is not None
                else Connection._over(SocketTransport(sock), FRAMES)
            )
            try:
                with trio.fail_after(20):
                    yield reader, sender, sock
            finally:
                await reader.aclose()
                await sender.aclose()
    finally:
        a.close()
        sock.close()


# ------------------------------------------------------------------ sending


@pytest.mark.parametrize("queued", [True, False], ids=["server", "client"])
async def test_a_large_payload_goes_out_uncopied_after_its_header(
    queued: bool,
) -> None:
    payload = pattern(SCATTER_MIN + 1)
    async with socket_pair(queued=queued) as (reader, sender, sock):
        await sender.send(payload)
        await sender.send_frame(payload[::-1])
        await sender.send(b"small")  # joined to its header, as ever
        assert await reader.receive() == payload
        assert await reader.receive() == payload[::-1]
        assert await reader.receive() == b"small"
    assert len(sock.sendmsgs) == 2
    header, sent = sock.sendmsgs[0]
    assert header == FRAMES.header(len(payload))
    assert sent is payload  # the very object: never copied


@settings(max_examples=40, deadline=None)
@given(
    take=st.integers(0, SCATTER_MIN + 100),
    queued=st.booleans(),
)
@example(take=0, queued=True)
@example(take=1, queued=True)  # not even the header went whole
@example(take=3, queued=False)
@example(take=4, queued=True)  # the header, and nothing of the payload
def test_a_scatter_gather_write_cut_anywhere_goes_on_in_order(
    take: int, queued: bool
) -> None:
    """Whatever the kernel takes of header + payload, the rest follows
    before anything sent later, and the peer gets whole frames."""
    payload = pattern(SCATTER_MIN + 50, take)

    async def main() -> None:
        async with socket_pair(take, queued=queued) as (reader, sender, _):
            async with trio.open_nursery() as nursery:

                async def send() -> None:
                    await sender.send(payload)
                    await sender.send(b"next")
                    await sender.send(payload[::-1])

                nursery.start_soon(send)
                assert await reader.receive() == payload
                assert await reader.receive() == b"next"
                assert await reader.receive() == payload[::-1]

    trio.run(main)


async def test_a_large_frame_over_max_size_is_refused_before_sending() -> None:
    async with socket_pair() as (_reader, sender, sock):
        sender.framing = trionet.Frames(max_size=SCATTER_MIN)
        with pytest.raises(trionet.MessageTooLarge):
            await sender.send(bytes(SCATTER_MIN + 1))
    assert sock.sendmsgs == []


# ---------------------------------------------------------------- receiving


@settings(max_examples=200)
@given(
    header_size=st.sampled_from([1, 2, 4, 8]),
    length=st.integers(0, 20_000),
    extra=st.integers(-20_000, 100),
    max_size=st.integers(0, 30_000),
)
def test_large_frame_end_only_for_a_whole_large_valid_frame(
    header_size: int, length: int, extra: int, max_size: int
) -> None:
    length = min(length, (1 << (8 * header_size)) - 1)
    chunk = length.to_bytes(header_size, "big") + bytes(max(0, length + extra))
    end = large_frame_end(memoryview(chunk), header_size, max_size)
    whole = len(chunk) >= header_size + length
    if whole and 4096 < length <= max_size:
        assert end == header_size + length
    else:
        assert end == 0


@pytest.fixture
def cuts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The frame ends found at the front of received chunks."""
    found: list[int] = []
    original = trionet._connection.large_frame_end

    def spy(chunk: memoryview, header_size: int, max_size: int) -> int:
        end = original(chunk, header_size, max_size)
        if end:
            found.append(end)
        return end

    monkeypatch.setattr(trionet._connection, "large_frame_end", spy)
    return found


async def test_a_frame_cut_from_the_chunk_and_what_follows_it(
    pair_kind: str, cuts: list[int]
) -> None:
    big = pattern(60_000)
    tail = FRAMES.encode(b"x" * 5000)
    wire = FRAMES.encode(big) + FRAMES.encode(b"small") + b"LINE\n" + tail[:100]
    async with open_pair(pair_kind, framing=FRAMES) as (client, server):
        await client.send_all(wire)
        assert await server.receive() == big
        assert await server.receive_frame() == b"small"
        assert await server.receive_line() == b"LINE"
        await client.send_all(tail[100:])
        assert await server.receive() == b"x" * 5000
    if pair_kind in ("tcp", "unix"):
        # (Over a socket the big frame arrived whole in one chunk.)
        assert 4 + len(big) in cuts


async def test_a_bad_header_at_the_front_of_a_chunk_is_still_refused(
    pair_kind: str,
) -> None:
    framing = trionet.Frames(max_size=10_000)
    async with open_pair(pair_kind, framing=framing) as (client, server):
        await client.send_all((20_000).to_bytes(4, "big") + bytes(20_000))
        with pytest.raises(FrameTooLarge):
            await server.receive()
        assert server.close_reason is CloseReason.PROTOCOL_ERROR


async def test_memory_follows_what_arrived_over_a_socket() -> None:
    # A 16 MiB frame is announced but only 512 KiB of it arrive over a real
    # socket: the receiver must not allocate anywhere near 16 MiB.
    arrived = 512 * 1024
    a, b = socket.socketpair()
    with a, b:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        server = Connection._over(SocketTransport(b), FRAMES)
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.receive)
                data = (16 << 20).to_bytes(4, "big") + bytes(arrived)
                view = memoryview(data)
                while view:
                    await trio.lowlevel.wait_writable(a)
                    view = view[a.send(view) :]
                while server.statistics().bytes_received < len(data):
                    await trio.testing.wait_all_tasks_blocked()
                peak = tracemalloc.get_traced_memory()[1] - base
                nursery.cancel_scope.cancel()
        finally:
            tracemalloc.stop()
            await server.aclose()
    # The sent bytes, the scratch buffer, the receive buffer and the pieces.
    assert peak < 6 * arrived, peak
