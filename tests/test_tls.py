"""TLS on trionet's own socket path (TlsTransport): records cut and joined in
any chunking, replies written without a writer task, session tickets held
until the first send, sends that must read first (a renegotiation), TLS
messages a receive produces, backlog and close, ragged ends.

Most tests run two TlsTransports over a ``socket.socketpair()`` (no server,
no port); the end-to-end ones go through a loopback TLS server.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import trionet
from trionet import CloseReason, ConnectionClosed, IncompleteMessage
from trionet._connection import Connection
from trionet._sending import QueuedSendPath, SendLimits
from trionet._transport import TLS_WRITE_SIZE, TlsTransport

from .conftest import open_pair, tls_client_of

LINES = trionet.Lines()
FRAMES = trionet.Frames()


class ChunkySocket(socket.socket):
    """A socket whose ``recv_into`` returns at most ``limit`` bytes, so TLS
    records arrive cut anywhere; ``send`` can be made to refuse (``full``)."""

    limit = 1 << 20
    full = 0  # sends that raise BlockingIOError before the kernel is asked

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        size = min(nbytes or len(buffer), self.limit)
        return super().recv_into(buffer, size, flags)

    def send(self, data: Any, flags: int = 0) -> int:
        if self.full:
            self.full -= 1
            raise BlockingIOError
        return super().send(data, flags)


def chunky(sock: socket.socket, limit: int = 1 << 20) -> ChunkySocket:
    new = ChunkySocket(sock.family, sock.type, sock.proto, fileno=sock.detach())
    new.limit = limit
    return new


@asynccontextmanager
async def tls_pair(
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
    framing: trionet.Framing | None = LINES,
    *,
    client_limit: int = 1 << 20,
    limits: SendLimits | None = None,
    require_close_notify: bool = False,
) -> AsyncIterator[tuple[Connection, Connection]]:
    """(client, server side) over a socketpair, handshake done; the server
    side sends through a queue and writer task, the client under a lock."""
    a, b = socket.socketpair()
    server_sock, client_sock = chunky(a), chunky(b, client_limit)
    server_t = TlsTransport(server_sock, server_context, server_side=True)
    client_t = TlsTransport(
        client_sock,
        client_context,
        server_side=False,
        server_hostname="localhost",
        require_close_notify=require_close_notify,
    )
    try:
        async with trio.open_nursery() as handshakes:
            handshakes.start_soon(server_t.do_handshake)
            handshakes.start_soon(client_t.do_handshake)
        async with trio.open_nursery() as nursery:
            path = QueuedSendPath(nursery, limits or SendLimits())
            server = Connection._over(server_t, framing, path)
            client = Connection._over(client_t, framing)
            try:
                with trio.fail_after(20):
                    yield client, server
            finally:
                await client.aclose()
                await server.aclose()
    finally:
        server_sock.close()
        client_sock.close()


def tls_of(conn: Connection) -> TlsTransport:
    """The connection's transport, which must be a TlsTransport."""
    transport = conn._transport
    assert isinstance(transport, TlsTransport)
    return transport


# ------------------------------------------------------- records, any chunking


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    sizes=st.lists(st.integers(0, 70_000), min_size=1, max_size=12),
    limit=st.integers(1, 70_000),
    cut=st.integers(1, 100_000),
)
def test_frames_cross_intact_however_records_are_cut(
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
    sizes: list[int],
    limit: int,
    cut: int,
) -> None:
    """Frames of any size (several records each, or several per record)
    sent in pieces of ``cut`` bytes arrive whole and in order, with the
    receiver's ``recv`` returning at most ``limit`` bytes at a time."""
    payloads = [bytes([i % 251]) * size for i, size in enumerate(sizes)]
    wire = b"".join(FRAMES.encode(p) for p in payloads)

    async def main() -> None:
        async with tls_pair(
            server_context, client_context, FRAMES, client_limit=limit
        ) as (client, server):
            async with trio.open_nursery() as nursery:

                async def send() -> None:
                    for start in range(0, len(wire), cut):
                        await server.send_all(wire[start : start + cut])

                nursery.start_soon(send)
                for expected in payloads:
                    assert await client.receive() == expected

    trio.run(main)


async def test_a_frame_received_straight_into_its_own_buffer(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    # Large enough for the direct receive (decrypted into the frame's pieces).
    payload = bytes(range(256)) * 8192  # 2 MiB
    async with tls_pair(server_context, client_context, FRAMES) as (client, server):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.send, payload)
            assert await client.receive() == payload
        await client.send(b"and back")
        assert await server.receive() == b"and back"


# ------------------------------------------------------------- the send path


async def test_a_tls_reply_is_written_without_a_writer_task(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    queued_after_send: list[int] = []

    async def echo(conn: trionet.Connection) -> None:
        async for line in conn:
            await conn.send(line)
            queued_after_send.append(conn.statistics().queued_messages)

    async with tls_client_of(echo, server_context, client_context, LINES) as client:
        for i in range(5):
            await client.send(f"line {i}")
            assert await client.receive() == f"line {i}".encode()
    # Each reply went straight to the kernel: no queue, so no writer task.
    assert queued_after_send == [0] * 5


async def test_session_tickets_wait_for_the_first_send(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    async with tls_pair(server_context, client_context) as (client, server):
        transport = tls_of(client)
        client_sock = transport._sock
        # The handshake is over, and nothing waits on the client's socket.
        with pytest.raises(BlockingIOError):
            client_sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        assert not server._transport.has_backlog
        await server.send("first")
        assert await client.receive() == b"first"


async def test_a_peer_that_stops_reading_gets_a_backlog_then_everything(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    lines = [b"%06d" % i + b"x" * 1000 for i in range(3000)]  # about 3 MB
    async with tls_pair(server_context, client_context) as (client, server):
        for line in lines[:100]:
            await server.send(line)
        # Nothing read yet: the kernel filled up, the rest waits in the queue
        # and the transport.
        await trio.testing.wait_all_tasks_blocked()
        assert server.statistics().queued_bytes > 0
        async with trio.open_nursery() as nursery:

            async def send_rest() -> None:
                for line in lines[100:]:
                    await server.send(line)

            nursery.start_soon(send_rest)
            for line in lines:
                assert await client.receive() == line
        assert server.statistics().queued_bytes == 0


def tls_backlog(transport: TlsTransport) -> int:
    """Ciphertext the transport holds that the kernel has not taken."""
    pending = transport._pending
    return (0 if pending is None else len(pending)) + transport._outgoing.pending


async def test_a_big_batch_to_a_peer_that_stops_reading_waits_in_the_queue(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    """What a send hands to TLS beyond the kernel's room is at most one
    write's worth; the rest of a big send_many waits in the queue, where
    send_queue_bytes counts it and makes the next send wait."""
    lines = [b"%06d" % i + b"y" * 994 for i in range(2000)]  # about 2 MB
    limits = SendLimits(queue_bytes=64 * 1024)
    async with tls_pair(server_context, client_context, limits=limits) as (
        client,
        server,
    ):
        transport = tls_of(server)
        await server.send_many(lines)
        await trio.testing.wait_all_tasks_blocked()
        assert 0 < tls_backlog(transport) <= TLS_WRITE_SIZE + 1024
        queued = server.statistics().queued_bytes
        assert queued > len(lines) * 1001 // 2  # most of it, counted
        accepted = trio.Event()

        async def one_more() -> None:
            await server.send("last")
            accepted.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one_more)
            await trio.testing.wait_all_tasks_blocked()
            assert not accepted.is_set()  # over send_queue_bytes: it waits
            assert tls_backlog(transport) <= TLS_WRITE_SIZE + 1024
            got: list[bytes] = []
            while len(got) < len(lines) + 1:
                got += await client.receive_batch()
        assert got == [*lines, b"last"]


async def test_the_tls_writer_can_be_cancelled_while_the_kernel_is_full(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    """The writer task waiting for a peer that reads nothing ends as soon as
    its scope is cancelled (the socket still open): what it could not send
    is dropped and the connection closes with SHUTDOWN."""
    async with tls_pair(server_context, client_context) as (_client, server):
        for _ in range(100):
            await server.send(b"z" * 10_000)
        await trio.testing.wait_all_tasks_blocked()
        queue = server._queue
        assert queue is not None and queue.scope is not None
        assert server._transport.has_backlog or queue.items
        path = server._send_path
        assert isinstance(path, QueuedSendPath)
        assert path.nursery.child_tasks  # the writer
        queue.scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert not path.nursery.child_tasks
        assert server.close_reason is CloseReason.SHUTDOWN


class CountingBIO:
    """A MemoryBIO stand-in that counts what was written into it."""

    def __init__(self, real: ssl.MemoryBIO) -> None:
        self.real = real
        self.fed = 0

    def write(self, data: Any) -> int:
        self.fed += len(data)
        return self.real.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class WritesWantReadFirst:
    """An SSLObject stand-in whose writes want to read first -- as during a
    TLS 1.2 renegotiation -- until new bytes have reached the incoming BIO."""

    def __init__(self, transport: TlsTransport) -> None:
        self.real = transport._ssl
        self.incoming = CountingBIO(transport._incoming)
        transport._incoming = self.incoming  # type: ignore[assignment]
        transport._ssl = self  # type: ignore[assignment]
        self.refused = 0

    def write(self, data: Any) -> int:
        if not self.incoming.fed:
            self.refused += 1
            raise ssl.SSLWantReadError
        return self.real.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


async def test_a_send_that_must_read_first_reads_the_socket_itself(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    async with tls_pair(server_context, client_context) as (client, server):
        fake = WritesWantReadFirst(tls_of(client))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send, "hello")
            await trio.testing.wait_all_tasks_blocked()
            assert fake.refused  # the send waits: it needs the peer first
            # The peer speaks; the sending task reads it into the BIO itself.
            await server.send("ping")
        assert await server.receive() == b"hello"
        # What the send read on the way is the next receive's, not lost.
        assert await client.receive() == b"ping"


async def test_a_send_that_must_read_first_waits_for_the_receiving_task(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    async with tls_pair(server_context, client_context) as (client, server):
        fake = WritesWantReadFirst(tls_of(client))
        received: list[bytes] = []

        async def receive() -> None:
            received.append(await client.receive())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(client.send, "hello")
            await trio.testing.wait_all_tasks_blocked()
            assert fake.refused
            await server.send("ping")
        assert received == [b"ping"]
        assert await server.receive() == b"hello"


@pytest.mark.parametrize("cancelled", ["receive", "send"])
async def test_a_task_waiting_for_the_other_to_read_is_woken_if_it_leaves(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext, cancelled: str
) -> None:
    """A send that must read first waits for the receiving task to read (or
    a receive for the send that reads); if the one reading is cancelled, the
    one waiting goes on by itself instead of waiting for ever."""
    async with tls_pair(server_context, client_context) as (client, server):
        fake = WritesWantReadFirst(tls_of(client))
        received: list[object] = []
        sent = trio.Event()

        async def receive() -> None:
            try:
                received.append(await client.receive())
            except ConnectionClosed as exc:
                received.append(exc.reason)

        async def send() -> None:
            await client.send("hello")
            sent.set()

        first, second = (receive, send) if cancelled == "receive" else (send, receive)
        scope = trio.CancelScope()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_in_scope, scope, first)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(second)  # waits for the first one to read
            await trio.testing.wait_all_tasks_blocked()
            assert fake.refused
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            if cancelled == "receive":
                # The send reads the socket itself now.
                await server.send("ping")
        if cancelled == "receive":
            assert sent.is_set()
            assert await server.receive() == b"hello"
            assert await client.receive() == b"ping"
        else:
            # A client's send cancelled part way closes the connection: the
            # waiting receive learns it at once.
            assert received == [CloseReason.ERROR]


async def _in_scope(
    scope: trio.CancelScope, task: Callable[[], Awaitable[None]]
) -> None:
    with scope:
        await task()


class ReadsReply:
    """An SSLObject stand-in whose first read makes TLS output of its own, as
    a key update or a renegotiation does (here: a real record)."""

    def __init__(self, real: ssl.SSLObject) -> None:
        self.real = real
        self.replied = False

    def read(self, *args: Any) -> Any:
        result = self.real.read(*args)
        if not self.replied:
            self.replied = True
            self.real.write(b"automatic\n")
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


@pytest.mark.parametrize("kernel_full", [False, True])
async def test_tls_output_made_by_a_receive_is_sent(
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
    kernel_full: bool,
) -> None:
    async with tls_pair(server_context, client_context) as (client, server):
        transport = tls_of(client)
        transport._ssl = ReadsReply(transport._ssl)  # type: ignore[assignment]
        sock = transport._sock
        assert isinstance(sock, ChunkySocket)
        if kernel_full:
            sock.full = 1  # the receive cannot send it at once
        await server.send("one")
        assert await client.receive() == b"one"
        # The client sent nothing itself, yet its reply is on the way: at
        # once, or (kernel full) before its next receive waits.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.receive)
            assert await server.receive() == b"automatic"
            await server.send("two")
    assert sock.full == 0


async def test_a_send_waits_while_a_receive_flushes_tls_output(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    """A receive that must write TLS output of its own into a full kernel
    holds the send side meanwhile: a send then waits its turn (it neither
    fails with BusyResourceError nor overtakes that output)."""
    async with tls_pair(server_context, client_context) as (client, server):
        transport = tls_of(client)
        transport._ssl = ReadsReply(transport._ssl)  # type: ignore[assignment]
        # Fill the kernel towards a server that is not reading yet, until the
        # transport holds ciphertext the kernel did not take.
        filler = b"f" * 1000 + b"\n"
        filled = 0
        while not transport.has_backlog and filled < 10_000:  # (bounded)
            assert transport.send_nowait(filler) == len(filler)
            filled += 1
        assert transport.has_backlog
        await server.send("one")
        # The reply this receive makes cannot go out yet.
        assert await client.receive() == b"one"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.receive)  # flushes the reply first
            await trio.testing.wait_all_tasks_blocked()
            assert transport._send_busy
            nursery.start_soon(client.send, "hello")
            await trio.testing.wait_all_tasks_blocked()
            for _ in range(filled):
                assert await server.receive() == filler[:-1]
            assert await server.receive() == b"automatic"
            assert await server.receive() == b"hello"
            await server.send("two")
        assert client.close_reason is None


# ------------------------------------------------------------------ closing


async def test_close_notify_is_a_clean_end(
    autojump_clock: trio.testing.MockClock,
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
) -> None:
    async with tls_pair(server_context, client_context) as (client, server):
        await server.send("bye")
        # close_notify goes out without waiting for the peer's own (the
        # client reads nothing until this has returned): no time passes,
        # where waiting would last until flush_timeout.
        start = trio.current_time()
        await server.aclose()
        assert trio.current_time() == start
        assert server.close_reason is CloseReason.CLOSED_BY_HOST
        assert await client.receive() == b"bye"
        with pytest.raises(ConnectionClosed) as info:
            await client.receive()
        assert info.value.reason is CloseReason.CLOSED_BY_PEER
        assert not client._transport.ragged_eof
    assert client.close_reason is CloseReason.CLOSED_BY_PEER


@pytest.mark.parametrize(
    ("data", "strict", "reason", "incomplete"),
    [
        (b"whole\n", False, CloseReason.CLOSED_BY_PEER, False),
        (b"whole\ncut", False, CloseReason.ERROR, True),
        (b"whole\n", True, CloseReason.ERROR, False),
    ],
    ids=["boundary", "inside-a-message", "strict"],
)
async def test_a_ragged_end_on_the_client_side(
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
    data: bytes,
    strict: bool,
    reason: CloseReason,
    incomplete: bool,
) -> None:
    async with tls_pair(
        server_context, client_context, require_close_notify=strict
    ) as (client, server):
        await server.send_all(data)
        # Cut the socket under TLS: no close_notify.
        server._close_now(CloseReason.ERROR)
        assert await client.receive() == b"whole"
        error = IncompleteMessage if incomplete else ConnectionClosed
        with pytest.raises(error) as info:
            await client.receive()
        assert info.value.reason is reason
    assert client.close_reason is reason


@pytest.mark.parametrize("kind", ["tcp", "unix"])
async def test_start_tls_on_a_socket_stays_on_the_socket_path(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext, kind: str
) -> None:
    """STARTTLS over a socket upgrades to TlsTransport (not trio.SSLStream),
    and the upgraded connection speaks both ways."""
    async with open_pair(kind, framing=LINES) as (client, server):
        await client.send("STARTTLS")
        assert await server.receive() == b"STARTTLS"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(server.start_tls, server_context))
            nursery.start_soon(
                partial(
                    client.start_tls,
                    client_context,
                    server_side=False,
                    server_hostname="localhost",
                )
            )
        assert type(client._transport) is TlsTransport
        assert type(server._transport) is TlsTransport
        await client.send("over TLS")
        assert await server.receive() == b"over TLS"
        await server.send("and back")
        assert await client.receive() == b"and back"


async def test_start_tls_on_a_tls_connection_is_refused(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    async with tls_pair(server_context, client_context) as (client, server):
        with pytest.raises(ValueError, match="already speaks TLS"):
            await client.start_tls(client_context, server_side=False)
        # Left as it was.
        await client.send("still here")
        assert await server.receive() == b"still here"


async def test_a_failed_handshake_sends_its_alert(
    server_context: ssl.SSLContext,
) -> None:
    # A client that trusts nobody: its handshake fails, and the server hears
    # why (an alert), not just a closed socket.
    a, b = socket.socketpair()
    with a, b:
        server_t = TlsTransport(a, server_context, server_side=True)
        client_t = TlsTransport(
            b,
            ssl.create_default_context(),
            server_side=False,
            server_hostname="localhost",
        )
        errors: list[BaseException] = []

        async def handshake(transport: TlsTransport) -> None:
            try:
                await transport.do_handshake()
            except trio.BrokenResourceError as exc:
                errors.append(exc.__cause__ or exc)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(handshake, server_t)
                nursery.start_soon(handshake, client_t)
    assert len(errors) == 2
    assert any(isinstance(e, ssl.SSLCertVerificationError) for e in errors)
    assert any("alert" in str(e).lower() for e in errors)
