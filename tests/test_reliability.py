"""Reliability: faults survived and hostile input refused.

Real loopback TCP wherever the kernel matters (resets, half-closes, running
out of descriptors, TLS), trionet.testing's fault wrappers over memory
streams where it does not.  Two scenarios run the server in a child process
(tests/reliability_server.py): one lowers its descriptor limit, the other
measures its memory.

Resource checks measure resources (CPU seconds, bytes, searched bytes), never
speed: nothing here asserts how long something took in real time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import socket
import ssl
import struct
import subprocess
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

import trionet
from trionet import (
    CloseReason,
    ConnectionClosed,
    Decoder,
    Frames,
    FrameTooLarge,
    IncompleteMessage,
    Lines,
    LineTooLong,
)
from trionet._codec import ReceiveBuffer
from trionet._transport import RECEIVE_SIZE
from trionet._util import unwrap_single_exception
from trionet.testing import ChunkedStream, StallAfter

from .test_codec import CountingBytearray

KiB = 1024
MiB = 1024 * KiB
#: Bytes a connection asks of the kernel per receive.
RECEIVE_CHUNK = RECEIVE_SIZE
SERVER_SCRIPT = Path(__file__).with_name("reliability_server.py")


async def wait_until(predicate: Callable[[], bool], what: str) -> None:
    """Let every task run until ``predicate()`` holds (loopback I/O included)."""
    for _ in range(2000):
        if predicate():
            return
        await trio.testing.wait_all_tasks_blocked(cushion=0.001)
    raise AssertionError(f"never happened: {what}")


async def receive_until_eof(sock: trio.socket.SocketType) -> bytes:
    """Everything a raw socket receives until the peer closes (or resets)."""
    data = bytearray()
    for _ in range(100_000):
        try:
            chunk = await sock.recv(RECEIVE_CHUNK)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return bytes(data)


async def echo(conn: trionet.Connection) -> None:
    async for message in conn:
        await conn.send(message)


# --------------------------------------------------------------------------
# A server in a child process


class ChildServer:
    """tests/reliability_server.py running in a child process, and what it says."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.port: int | None = None
        self.open_count = 0
        self.stderr = bytearray()
        self._replies: list[dict[str, Any]] = []
        self._ended = False
        self._changed = trio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def read_stdout(self) -> None:
        assert self.process.stdout is not None
        pending = b""
        while data := await self.process.stdout.receive_some():
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                word, _, rest = line.decode().partition(" ")
                if word == "port":
                    self.port = int(rest)
                elif word == "open":
                    self.open_count = int(rest)
                elif word == "stats":
                    self._replies.append(json.loads(rest))
            self._notify()
        self._ended = True
        self._notify()

    async def read_stderr(self) -> None:
        assert self.process.stderr is not None
        while data := await self.process.stderr.receive_some():
            self.stderr += data
            self._notify()

    async def wait_for(self, predicate: Callable[[], bool], what: str) -> None:
        """Wait (on the child's output, no polling) until ``predicate()`` holds."""
        for _ in range(100_000):
            changed = self._changed
            if predicate():
                return
            if self._ended:
                raise AssertionError(
                    f"the server exited while we waited for {what}:\n"
                    + self.stderr.decode(errors="replace")
                )
            await changed.wait()
        raise AssertionError(f"never happened: {what}")

    async def stats(self) -> dict[str, Any]:
        """The server's counters, asked for over its standard input."""
        assert self.process.stdin is not None
        count = len(self._replies)
        await self.process.stdin.send_all(b"stats\n")
        await self.wait_for(lambda: len(self._replies) > count, "a stats reply")
        return self._replies[count]

    def cpu_seconds(self) -> float:
        """User plus system CPU time the child has used, from /proc."""
        with open(f"/proc/{self.process.pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
        # utime and stime are fields 14 and 15 of stat(5); 3 is the first here.
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.asynccontextmanager
async def child_server(*arguments: str) -> AsyncIterator[ChildServer]:
    """Run the child server; stop it (by closing its stdin) when the block ends."""
    process = await trio.lowlevel.open_process(
        [sys.executable, str(SERVER_SCRIPT), *arguments],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        with unwrap_single_exception():
            async with trio.open_nursery() as nursery:
                child = ChildServer(process)
                nursery.start_soon(child.read_stdout)
                nursery.start_soon(child.read_stderr)
                try:
                    await child.wait_for(lambda: child.port is not None, "its port")
                    yield child
                finally:
                    assert process.stdin is not None
                    await process.stdin.aclose()
                    await process.wait()
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()  # only if something above failed
                await process.wait()
            for pipe in (process.stdin, process.stdout, process.stderr):
                if pipe is not None:
                    await pipe.aclose()
    assert process.returncode == 0, child.stderr.decode(errors="replace")


needs_linux = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc and RLIMIT_NOFILE"
)


# --------------------------------------------------------------------------
# Faults


@needs_linux
async def test_running_out_of_file_descriptors_is_survived() -> None:
    """A server limited to 64 descriptors, with 80 clients: it logs the accept
    error, keeps its listener, does not spin, keeps serving the connections
    it has, and serves the waiting clients as descriptors free up."""
    limit, clients_wanted = 64, 80
    clients: dict[int, trionet.Connection] = {}
    served: set[int] = set()
    progress = trio.Event()

    async def first_echo(index: int, conn: trionet.Connection) -> None:
        nonlocal progress
        assert await conn.receive() == b"hello %d" % index
        served.add(index)
        progress.set()
        progress = trio.Event()

    async def wait_served(count: int) -> None:
        for _ in range(10_000):
            if len(served) >= count:
                return
            await progress.wait()

    with trio.fail_after(60):  # a guard against hanging, not a measurement
        async with child_server("lines", "--nofile", str(limit)) as server:
            assert server.port is not None
            try:
                async with trio.open_nursery() as nursery:
                    for index in range(clients_wanted):
                        conn = await trionet.connect_tcp(
                            "127.0.0.1", server.port, framing=Lines()
                        )
                        clients[index] = conn
                        await conn.send(b"hello %d" % index)
                        nursery.start_soon(first_echo, index, conn)

                    await server.wait_for(
                        lambda: b"EMFILE" in server.stderr, "the EMFILE log line"
                    )
                    held = (await server.stats())["open"]
                    assert 0 < held < clients_wanted
                    await wait_served(held)

                    # Blocked on descriptors, the server must not spin: measure
                    # its CPU time over a window of wall time.
                    cpu_before, wall_before = server.cpu_seconds(), time.monotonic()
                    await trio.sleep(1.0)
                    cpu = server.cpu_seconds() - cpu_before
                    wall = time.monotonic() - wall_before
                    assert cpu < 0.5 * wall, f"{cpu:.2f} s of CPU in {wall:.2f} s"

                    # Nobody new was served meanwhile, and the server knows it.
                    assert (await server.stats())["open"] == held
                    assert len(served) == held
                    # The connections it holds are unaffected.
                    for index in sorted(served)[:5]:
                        await clients[index].send(b"again %d" % index)
                        assert await clients[index].receive() == b"again %d" % index

                    # Free descriptors: every waiting client is served in turn.
                    waiting = clients_wanted - held
                    closing = sorted(served)[: waiting + 2]
                    assert held - len(closing) >= 3, "too few descriptors to test"
                    for index in closing:
                        await clients.pop(index).aclose()
                    await wait_served(clients_wanted)
                    assert len(served) == clients_wanted

                # The listener survived: a newcomer is served, and so are the
                # connections that were open all along.
                async with trionet.connect_tcp(
                    "127.0.0.1", server.port, framing=Lines()
                ) as late:
                    await late.send(b"late")
                    assert await late.receive() == b"late"
                for index, conn in clients.items():
                    await conn.send(b"still %d" % index)
                    assert await conn.receive() == b"still %d" % index
            finally:
                for conn in clients.values():
                    await conn.aclose()
    log = server.stderr.decode(errors="replace")
    assert "accept on" in log and "EMFILE" in log
    assert "Traceback" not in log


async def test_one_handler_in_a_hundred_raises(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """200 clients, handlers 99 and 199 raise: those two connections close
    with ERROR, the 198 others are served before and after."""
    caplog.set_level(logging.ERROR, logger="trionet")
    clients = 200
    failing = {index for index in range(clients) if index % 100 == 99}
    errors_seen = 0
    all_failed = trio.Event()
    outcomes: dict[int, str] = {}

    async def handler(conn: trionet.Connection) -> None:
        first = await conn.receive()
        if int(first) in failing:
            raise RuntimeError(f"handler {int(first)} fails")
        await echo_first(conn, first)

    async def echo_first(conn: trionet.Connection, first: bytes) -> None:
        await conn.send(first)
        await echo(conn)

    def count_errors(conn: trionet.Connection) -> None:
        nonlocal errors_seen
        if conn.close_reason is CloseReason.ERROR:
            errors_seen += 1
            if errors_seen == len(failing):
                all_failed.set()

    async def client(index: int, port: int) -> None:
        async with trionet.connect_tcp("127.0.0.1", port, framing=Lines()) as conn:
            await conn.send(b"%d" % index)
            if index in failing:
                with pytest.raises(ConnectionClosed):
                    await conn.receive()
                outcomes[index] = "closed"
                return
            assert await conn.receive() == b"%d" % index
            await all_failed.wait()
            await conn.send(b"after %d" % index)
            assert await conn.receive() == b"after %d" % index
            outcomes[index] = "served"

    with trio.fail_after(30):
        async with trionet.open_tcp_server(
            handler, framing=Lines(), on_close=count_errors
        ) as server:
            async with trio.open_nursery() as nursery:
                for index in range(clients):
                    nursery.start_soon(client, index, server.port)
            await wait_until(
                lambda: sum(server.statistics().closed.values()) == clients,
                "every close",
            )
    assert {i for i, what in outcomes.items() if what == "closed"} == failing
    assert len(outcomes) == clients
    assert server.statistics().closed == {
        CloseReason.ERROR: len(failing),
        CloseReason.CLOSED_BY_PEER: clients - len(failing),
    }
    assert sorted(str(error) for error in server.handler_exceptions) == [
        "handler 199 fails",
        "handler 99 fails",
    ]


PARTIAL_MESSAGES = {
    # A frame header announcing 100 bytes, and 10 of them.
    "frame": (100).to_bytes(4, "big") + b"f" * 10,
    "line": b"no delimiter yet",
    # 40 of the 100 bytes asked for.
    "exactly": b"e" * 40,
}


@pytest.mark.parametrize("mode", sorted(PARTIAL_MESSAGES))
async def test_peer_reset_inside_a_message(mode: str) -> None:
    """A peer that resets (SO_LINGER 0) inside a frame, a line or a
    receive_exactly: the receive raises ConnectionClosed with ERROR -- not
    IncompleteMessage, which is for a clean end of stream -- and nothing of
    the partial message is delivered."""
    partial = PARTIAL_MESSAGES[mode]
    outcome: list[BaseException | bytes] = []
    done = trio.Event()

    async def handler(conn: trionet.Connection) -> None:
        try:
            if mode == "frame":
                message = await conn.receive_frame()
            elif mode == "line":
                message = await conn.receive_line()
            else:
                message = await conn.receive_exactly(100)
        except ConnectionClosed as exc:
            outcome.append(exc)
        else:
            outcome.append(message)
        finally:
            done.set()

    with trio.fail_after(10):
        async with trionet.open_tcp_server(handler) as server:
            with trio.socket.socket() as sock:
                await sock.connect(("127.0.0.1", server.port))
                await sock.send(partial)
                await wait_until(
                    lambda: (
                        [c.statistics().bytes_received for c in server.connections]
                        == [len(partial)]
                    ),
                    "the server holding the partial message",
                )
                sock.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
            await done.wait()
            await wait_until(lambda: server.statistics().open == 0, "the close")
    [exc] = outcome
    assert type(exc) is ConnectionClosed, repr(exc)
    assert exc.reason is CloseReason.ERROR
    assert isinstance(exc.__cause__, ConnectionResetError)
    assert server.statistics().closed == {CloseReason.ERROR: 1}


async def test_send_cancelled_inside_a_large_frame_over_tcp() -> None:
    """A client sends a 16 MiB frame to a peer that does not read, and the
    send is cancelled half way: the connection is closed with ERROR, and the
    peer, reading everything that arrived, decodes no frame -- only an
    incomplete one at the end of the stream."""
    framing = Frames(max_size=32 * MiB)
    payload = bytes(range(256)) * (16 * MiB // 256)
    with trio.socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await listener.bind(("127.0.0.1", 0))
        listener.listen()
        conn = await trionet.connect_tcp(
            "127.0.0.1", listener.getsockname()[1], framing=framing
        )
        peer, _address = await listener.accept()
        with peer:
            try:
                scope = trio.CancelScope()

                async def send() -> None:
                    with scope:
                        await conn.send(payload)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send)
                    await trio.testing.wait_all_tasks_blocked()
                    scope.cancel()
                assert scope.cancelled_caught
                assert conn.close_reason is CloseReason.ERROR
                with pytest.raises(ConnectionClosed) as info:
                    await conn.send(b"next")
                assert info.value.reason is CloseReason.ERROR
            finally:
                await conn.aclose()
            received = await receive_until_eof(peer)
    assert 0 < len(received) < len(framing.encode(payload))
    decoder = Decoder(framing)
    decoder.feed(received)
    assert decoder.messages() == []
    with pytest.raises(IncompleteMessage):
        decoder.end_of_stream()


async def test_send_cancelled_inside_a_frame_over_a_stalled_stream() -> None:
    """The same over memory streams: the send stalls after 1,000 bytes, is
    cancelled, the connection closes with ERROR and the peer sees those
    1,000 bytes as an incomplete frame."""
    left, right = trio.testing.memory_stream_pair()
    sender = trionet.Connection(StallAfter(right, None, stall_sends_after=1000))
    receiver = trionet.Connection(left, framing=Frames())
    with trio.move_on_after(5) as scope:  # cancelled by us below, not by time
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                await sender.send_frame(b"z" * 5000)

            nursery.start_soon(send)
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()
    assert sender.close_reason is CloseReason.ERROR
    with pytest.raises(IncompleteMessage) as info:
        await receiver.receive_frame()
    assert info.value.partial == (5000).to_bytes(4, "big") + b"z" * 996
    await receiver.aclose()
    await sender.aclose()


@pytest.mark.parametrize("reply_after_eof", [False, True])
async def test_half_closed_peer_still_gets_its_reply(reply_after_eof: bool) -> None:
    """A raw socket sends its request, then shutdown(SHUT_WR): the reply
    arrives in full -- whether the handler answers each line at once or
    only after the end of the request."""

    async def answer_at_the_end(conn: trionet.Connection) -> None:
        lines = [line async for line in conn]
        await conn.send(b"%d lines" % len(lines))
        for line in lines:
            await conn.send(line.upper())

    handler = answer_at_the_end if reply_after_eof else echo
    with trio.fail_after(10):
        async with trionet.open_tcp_server(handler, framing=Lines()) as server:
            with trio.socket.socket() as sock:
                await sock.connect(("127.0.0.1", server.port))
                await sock.send(b"one\ntwo\nthree\n")
                sock.shutdown(socket.SHUT_WR)
                reply = await receive_until_eof(sock)
            await wait_until(lambda: server.statistics().open == 0, "the close")
    if reply_after_eof:
        assert reply == b"3 lines\nONE\nTWO\nTHREE\n"
    else:
        assert reply == b"one\ntwo\nthree\n"
    assert server.statistics().closed == {CloseReason.CLOSED_BY_PEER: 1}


# --------------------------------------------------------------------------
# Hostile input


@pytest.mark.parametrize(
    ("header_size", "announced"),
    [(4, 1 << 30), (4, 0xFFFFFFFF), (8, (1 << 64) - 1)],
)
async def test_huge_frame_header_is_refused_before_the_body(
    header_size: int, announced: int
) -> None:
    """A header announcing 1 GiB, 4 GiB - 1 or 2**64 - 1 bytes with max_size
    1 MiB: FrameTooLarge as soon as the header is in, nothing allocated
    for the announced size (traced by tracemalloc)."""
    framing = Frames(max_size=MiB, header_size=header_size)
    left, right = trio.testing.memory_stream_pair()
    peer = trionet.Connection(left)
    conn = trionet.Connection(right, framing=framing)
    await peer.send_all(announced.to_bytes(header_size, "big"))
    tracemalloc.start()
    try:
        with pytest.raises(FrameTooLarge):
            await conn.receive_frame()
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * KiB, peak
    assert conn.close_reason is CloseReason.PROTOCOL_ERROR
    assert conn.statistics().bytes_received == header_size
    await peer.aclose()


async def test_huge_frame_header_over_tcp_needs_no_body() -> None:
    """Over TCP the client sends only the header: the server refuses it at
    once (it does not wait for a body) and closes with PROTOCOL_ERROR."""
    outcome: list[BaseException] = []
    received: list[int] = []

    async def handler(conn: trionet.Connection) -> None:
        try:
            await conn.receive()
        except FrameTooLarge as exc:
            outcome.append(exc)
            received.append(conn.statistics().bytes_received)

    with trio.fail_after(10):
        async with trionet.open_tcp_server(
            handler, framing=Frames(max_size=MiB)
        ) as server:
            async with trionet.connect_tcp("127.0.0.1", server.port) as client:
                await client.send_all((1 << 30).to_bytes(4, "big"))
                assert await client.receive_some() == b""
            await wait_until(lambda: server.statistics().open == 0, "the close")
    assert [type(exc) for exc in outcome] == [FrameTooLarge]
    assert received == [4]
    assert server.statistics().closed == {CloseReason.PROTOCOL_ERROR: 1}


def _descriptor_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


#: What one idle connection may cost a server beyond the bytes it received
#: (the Connection, its task, its socket object).  Measured at about 6 KiB;
#: pre-allocating an announced frame would cost 16 MiB each.
PER_CONNECTION_ALLOWANCE = 20 * KiB


@needs_linux
@pytest.mark.skipif(_descriptor_limit() < 2200, reason="needs 2,200 descriptors")
async def test_announced_frames_are_not_preallocated() -> None:
    """1,000 connections each announce a 16 MiB frame (max_size) and send
    1,000 bytes of it: the server's memory grows by what arrived plus a
    small per-connection cost, never by what was announced."""
    connections, body = 1000, 1000
    announce = (16 * MiB).to_bytes(4, "big") + b"b" * body
    sockets: list[trio.socket.SocketType] = []
    with trio.fail_after(60):
        async with child_server("frames") as server:
            assert server.port is not None
            try:
                # Warm up: a few complete exchanges first.
                for _ in range(20):
                    sock = trio.socket.socket()
                    sockets.append(sock)
                    await sock.connect(("127.0.0.1", server.port))
                    await sock.send(b"\x00\x00\x00\x02hi")
                    assert await sock.recv(100) == b"\x00\x00\x00\x02hi"
                before = await server.stats()
                for _ in range(connections):
                    sock = trio.socket.socket()
                    sockets.append(sock)
                    await sock.connect(("127.0.0.1", server.port))
                    await sock.send(announce)
                arrived = before["bytes_received"] + connections * len(announce)
                for _ in range(1000):
                    after = await server.stats()
                    if after["bytes_received"] == arrived:
                        break
                assert after["bytes_received"] == arrived
                assert after["open"] == 20 + connections
            finally:
                for sock in sockets:
                    sock.close()
    growth = (after["rss_kib"] - before["rss_kib"]) * KiB
    assert growth < connections * (len(announce) + PER_CONNECTION_ALLOWANCE), growth


class PeakBuffer(ReceiveBuffer):
    """A ReceiveBuffer that remembers the most bytes it ever held."""

    __slots__ = ("peak",)

    def __init__(self) -> None:
        super().__init__()
        self.peak = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        super().feed(data)
        self.peak = max(self.peak, len(self))


@pytest.mark.parametrize("max_length", [1000, 65536])
async def test_ten_mib_without_a_delimiter(max_length: int) -> None:
    """10 MiB with no delimiter: LineTooLong, and the connection's buffer
    never held more than max_length plus one receive chunk."""
    buffers: list[PeakBuffer] = []
    outcome: list[BaseException] = []

    def watch(conn: trionet.Connection) -> None:
        conn._receive_buffer = PeakBuffer()
        buffers.append(conn._receive_buffer)

    async def handler(conn: trionet.Connection) -> None:
        try:
            await conn.receive()
        except LineTooLong as exc:
            outcome.append(exc)

    with trio.fail_after(20):
        async with trionet.open_tcp_server(
            handler, framing=Lines(max_length=max_length), on_connect=watch
        ) as server:
            async with trionet.connect_tcp("127.0.0.1", server.port) as client:
                with contextlib.suppress(ConnectionClosed):
                    await client.send_all(b"x" * (10 * MiB))
                with contextlib.suppress(ConnectionClosed):
                    while await client.receive_some():
                        pass
            await wait_until(lambda: server.statistics().open == 0, "the close")
    assert [type(exc) for exc in outcome] == [LineTooLong]
    [buffer] = buffers
    assert max_length < buffer.peak <= max_length + RECEIVE_CHUNK
    assert server.statistics().closed == {CloseReason.PROTOCOL_ERROR: 1}


@pytest.mark.parametrize("message_timeout", [None, 30.0])
async def test_slowloris(
    autojump_clock: trio.testing.MockClock, message_timeout: float | None
) -> None:
    """A client sends one byte every 0.9 x idle_timeout and never finishes a
    line.  idle_timeout alone never closes it; message_timeout does, with
    TIMEOUT, while a normal client is served all along."""
    idle = 10.0
    closed: list[CloseReason | None] = []
    async with trionet.open_tcp_server(
        echo,
        framing=Lines(),
        idle_timeout=idle,
        message_timeout=message_timeout,
        on_close=lambda conn: closed.append(conn.close_reason),
    ) as server:
        async with trionet.connect_tcp("127.0.0.1", server.port) as slow:
            start = trio.current_time()
            ended_after: list[float] = []

            async def trickle() -> None:
                for _ in range(50):  # 450 s of trickling, bounded
                    try:
                        await slow.send_all(b"a")
                    except ConnectionClosed:
                        return
                    await trio.sleep(0.9 * idle)  # the slow client's pace

            async def watch_slow() -> None:
                with contextlib.suppress(ConnectionClosed):
                    assert await slow.receive_some() == b""
                ended_after.append(trio.current_time() - start)

            async def serve_normal(port: int) -> None:
                async with trionet.connect_tcp(
                    "127.0.0.1", port, framing=Lines()
                ) as normal:
                    for index in range(30):  # 150 s of requests
                        await normal.send(b"request %d" % index)
                        assert await normal.receive() == b"request %d" % index
                        await trio.sleep(0.5 * idle)  # the normal client's pace

            async with trio.open_nursery() as nursery:
                nursery.start_soon(trickle)
                nursery.start_soon(serve_normal, server.port)
                if message_timeout is not None:
                    nursery.start_soon(watch_slow)
            expected_closes = 1 if message_timeout is None else 2
            await wait_until(lambda: len(closed) == expected_closes, "the closes")
            if message_timeout is None:
                # 450 s later the trickler is still connected.
                assert [conn.remote_address for conn in server.connections] == [
                    slow.local_address
                ]
                assert closed == [CloseReason.CLOSED_BY_PEER]
            else:
                [elapsed] = ended_after
                assert message_timeout <= elapsed <= message_timeout + 0.9 * idle
                assert closed == [CloseReason.TIMEOUT, CloseReason.CLOSED_BY_PEER]
                assert server.statistics().open == 0


# TLS


def client_hello(context: ssl.SSLContext) -> bytes:
    """The first flight of a real TLS client: its ClientHello record."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


#: What each hostile TLS client does: bytes to send, then hang up or not.
TLS_ABUSE = {
    "plaintext": (b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", True),
    "truncated hello, then EOF": (None, True),
    "truncated hello, then silence": (None, False),
    "connect then close": (b"", True),
    "never says hello": (b"", False),
}


@pytest.mark.parametrize("abuse", list(TLS_ABUSE))
async def test_tls_abuse_closes_only_that_connection(
    autojump_clock: trio.testing.MockClock,
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
    abuse: str,
) -> None:
    """Hostile TLS clients: each is closed -- ERROR when it sent something
    unusable or hung up, TIMEOUT after handshake_timeout when it stalls --
    and a proper client is served afterwards."""
    data, hang_up = TLS_ABUSE[abuse]
    if data is None:
        hello = client_hello(client_context)
        data = hello[: len(hello) // 2]
    handshake_timeout = 7.0
    async with trionet.open_tcp_server(
        echo,
        framing=Lines(),
        ssl_context=server_context,
        handshake_timeout=handshake_timeout,
    ) as server:
        with trio.socket.socket() as sock:
            await sock.connect(("127.0.0.1", server.port))
            start = trio.current_time()
            if data:
                await sock.send(data)
            if hang_up:
                sock.shutdown(socket.SHUT_WR)
            await receive_until_eof(sock)
            elapsed = trio.current_time() - start
        await wait_until(
            lambda: sum(server.statistics().closed.values()) == 1, "the close"
        )
        expected = CloseReason.ERROR if hang_up else CloseReason.TIMEOUT
        assert server.statistics().closed == {expected: 1}
        if hang_up:
            assert elapsed < handshake_timeout
        else:
            assert elapsed == pytest.approx(handshake_timeout, abs=0.1)
        async with trionet.connect_tcp(
            "127.0.0.1",
            server.port,
            framing=Lines(),
            ssl_context=client_context,
            server_hostname="localhost",
        ) as good:
            await good.send(b"still serving")
            assert await good.receive() == b"still serving"
        assert server.statistics().accepted == 1


# Quadratic time


class OneByteAtATime(trio.abc.Stream):
    """Delivers ``data`` one byte per receive_some, then end of stream.

    It never passes through the scheduler (the bytes are always there), so
    what is left to cost is the connection's own work per byte.
    """

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0
        self.receives = 0

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        self.receives += 1
        chunk = self._data[self._pos : self._pos + 1]
        self._pos += len(chunk)
        return chunk

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def _bytes_searched_for_one_line(size: int) -> int:
    stream = OneByteAtATime(b"x" * size + b"\n")
    conn = trionet.Connection(stream, framing=Lines(max_length=size))
    counter = CountingBytearray()
    conn._receive_buffer._data = counter
    assert await conn.receive() == b"x" * size
    assert stream.receives == size + 1
    await conn.aclose()
    return counter.searched


async def test_long_line_fed_one_byte_at_a_time_costs_linear_work() -> None:
    """A 256 KiB line and a 1 MiB line, one byte per receive through a
    Connection: the bytes searched grow 4x, not 16x (counted, not timed)."""
    small = await _bytes_searched_for_one_line(256 * KiB)
    large = await _bytes_searched_for_one_line(1 * MiB)
    assert large / small == pytest.approx(4, rel=0.1)
    assert large <= 4 * MiB


# --------------------------------------------------------------------------
# Any chunking, any truncation, over a Connection


def _messages(delimiter: bytes) -> st.SearchStrategy[list[tuple[str, bytes]]]:
    payload = st.binary(max_size=300)
    line = payload.filter(lambda m: delimiter not in m)
    return st.lists(
        st.one_of(
            st.tuples(st.just("line"), line),
            st.tuples(st.just("frame"), payload),
            st.tuples(st.just("sized"), payload),
        ),
        max_size=12,
    )


@st.composite
def streams(draw: st.DrawFn) -> tuple[trionet.Framing, list[tuple[str, bytes]]]:
    """A connection framing, and messages of every mode to send over it.

    Lines use the connection's delimiter when its framing is Lines, else the
    ``b"\n"`` of :meth:`Connection.receive_line`.
    """
    framings: list[trionet.Framing] = [Lines(), Lines(delimiter=b"\r\n"), Frames()]
    framing = draw(st.sampled_from(framings))
    delimiter = framing.delimiter if isinstance(framing, Lines) else b"\n"
    return framing, draw(_messages(delimiter))


def _encode(framing: trionet.Framing, kind: str, message: bytes) -> bytes:
    if kind == "line":
        return (framing if isinstance(framing, Lines) else Lines()).encode(message)
    if kind == "frame":
        return Frames().encode(message)
    return message  # "sized": read back with receive_exactly(len(message))


async def _receive_one(
    conn: trionet.Connection, kind: str, size: int, batched: bool
) -> bytes:
    # receive() cuts every whole message of the connection's framing in a
    # chunk at once; another mode afterwards must find the rest intact.
    own = isinstance(conn.framing, Lines) == (kind == "line")
    if kind == "sized":
        return await conn.receive_exactly(size)
    if batched and own:
        return await conn.receive()
    if kind == "line":
        return await conn.receive_line()
    return await conn.receive_frame()


@settings(max_examples=150, deadline=None)
@given(
    stream=streams(),
    seed=st.integers(0, 2**32),
    max_chunk=st.integers(1, 80),
    batched=st.booleans(),
)
async def test_any_chunking_decodes_like_one_shot(
    stream: tuple[trionet.Framing, list[tuple[str, bytes]]],
    seed: int,
    max_chunk: int,
    batched: bool,
) -> None:
    """Lines, frames and sized reads mixed on one connection, the stream cut
    into random chunks: every message comes out as sent, and the clean end
    after the last one is a plain close, not an incomplete message."""
    framing, messages = stream
    wire = b"".join(_encode(framing, kind, m) for kind, m in messages)
    left, right = trio.testing.memory_stream_pair()
    await left.send_all(wire)
    await left.send_eof()
    conn = trionet.Connection(
        ChunkedStream(right, seed=seed, max_chunk=max_chunk), framing=framing
    )
    for kind, message in messages:
        assert await _receive_one(conn, kind, len(message), batched) == message
    with pytest.raises(ConnectionClosed) as info:
        await conn.receive()
    assert type(info.value) is ConnectionClosed
    assert info.value.reason is CloseReason.CLOSED_BY_PEER
    await conn.aclose()


@settings(max_examples=150, deadline=None)
@given(
    stream=streams(),
    seed=st.integers(0, 2**32),
    max_chunk=st.integers(1, 80),
    batched=st.booleans(),
    data=st.data(),
)
async def test_truncated_stream_is_an_incomplete_message_unless_on_a_boundary(
    stream: tuple[trionet.Framing, list[tuple[str, bytes]]],
    seed: int,
    max_chunk: int,
    batched: bool,
    data: st.DataObject,
) -> None:
    """The same streams cut short at a random point: every message that
    arrived whole is delivered; then IncompleteMessage carrying exactly the
    bytes of the unfinished one -- or a plain close if the cut fell between
    two messages."""
    framing, messages = stream
    pieces = [_encode(framing, kind, m) for kind, m in messages]
    wire = b"".join(pieces)
    cut = data.draw(st.integers(0, len(wire)), label="cut")
    left, right = trio.testing.memory_stream_pair()
    await left.send_all(wire[:cut])
    await left.send_eof()
    conn = trionet.Connection(
        ChunkedStream(right, seed=seed, max_chunk=max_chunk), framing=framing
    )
    boundary = 0
    delivered = 0
    for (kind, message), piece in zip(messages, pieces, strict=True):
        if boundary + len(piece) > cut:
            break
        assert await _receive_one(conn, kind, len(message), batched) == message
        boundary += len(piece)
        delivered += 1
    # The receive for the next message (or one more frame) meets the end.
    kind, message = messages[delivered] if delivered < len(messages) else ("frame", b"")
    with pytest.raises(ConnectionClosed) as info:
        await _receive_one(conn, kind, len(message), batched)
    assert info.value.reason is CloseReason.CLOSED_BY_PEER
    if cut == boundary:
        assert type(info.value) is ConnectionClosed
    else:
        assert isinstance(info.value, IncompleteMessage)
        assert info.value.partial == wire[boundary:cut]
    await conn.aclose()


# --------------------------------------------------------------------------
# Defects this suite found (fixed)


@pytest.mark.parametrize(
    ("delimiter", "payload"),
    [(b"\n\n", b"a\n"), (b"\r\n\r\n", b"GET / HTTP/1.0\r\n")],
)
def test_lines_encode_round_trips_or_refuses(delimiter: bytes, payload: bytes) -> None:
    framing = Lines(delimiter=delimiter)
    try:
        wire = framing.encode(payload)
    except ValueError:
        return  # refusing is fine: nothing misleading was produced
    decoder = Decoder(framing)
    decoder.feed(wire)
    assert decoder.messages() == [payload]
    assert decoder.buffered == 0


async def test_client_that_never_reads_cannot_pin_a_handler(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A handler that keeps sending to a client that never reads: with
    idle_timeout set, the connection is closed (TIMEOUT) once nothing has
    moved for that long, instead of pinning the handler for ever."""
    idle = 10.0
    closed: list[tuple[float, CloseReason | None]] = []
    gone = trio.Event()

    async def push(conn: trionet.Connection) -> None:
        for _ in range(1_000_000):  # until the connection is closed
            await conn.send(b"x" * 1000)

    def on_close(conn: trionet.Connection) -> None:
        closed.append((trio.current_time(), conn.close_reason))
        gone.set()

    async with trionet.open_tcp_server(
        push, framing=Lines(), idle_timeout=idle, on_close=on_close
    ) as server:
        async with trionet.connect_tcp("127.0.0.1", server.port):
            start = trio.current_time()
            with trio.move_on_after(100 * idle):  # virtual time (autojump)
                await gone.wait()
            assert gone.is_set(), "the handler is still blocked in send() at 1,000 s"
    when, reason = closed[0]
    assert reason is CloseReason.TIMEOUT
    assert when - start <= 2 * idle
