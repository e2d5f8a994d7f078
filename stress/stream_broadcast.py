"""Broadcasts to clients behind a streaming handler; trionet beside bare trio.

The server (a child process) runs one handler per connection that streams
64 KiB frames to its client as fast as ``send`` lets it, and every 200 ms it
broadcasts a small notice to every connection for D seconds.  This process
holds the clients: C readers read 64 KiB at a time and pause 5 ms after each
read -- slower than the handler, so their queues stay at the point where
``send`` waits -- and check the notices they get; S clients never read (and
have a small receive buffer).  Every frame's payload starts with a one-byte
tag (``C`` chunk, ``N`` notice with its sequence number, ``E`` end of the
stream), so chunks and notices are told apart.  Every client names itself in
its first frame; the broadcasts start once all have, so every reader must get
every notice.

The bare trio server is written the way a careful trio programmer would
without trionet: per connection a trio memory channel of 256 messages
drained by a writer task; the handler waits on the channel to send
(``await send_channel.send``), and a broadcast uses ``send_nowait`` and
evicts a connection whose channel is full (``trio.WouldBlock``) -- full
queue means wait to send, evict to broadcast.  trionet gives broadcasts
``broadcast_headroom`` beyond the point where ``send`` waits and evicts a
connection only past that headroom or when its queue has not moved for
``stall_timeout`` -- shortened here from its default of 10 s to 1 s so that
the clients that never read are found within the run.

Prints, per server: readers evicted (trionet: must be 0), never-readers
evicted (trionet: must be S, as SLOW_CONSUMER), notices per reader and how
many readers got all of them in order, the most bytes the server saw queued
for one connection at a broadcast (readers / never-readers), the server's
peak resident memory (VmHWM) and the rate streamed to the readers while the
broadcasts ran.  Exits with status 1 if trionet's run breaks one of its
expectations.

Defaults: 20 readers, 2 never reading, notices for 10 s.  ``--quick``: 4
readers, 1 never reading, notices for 2 s.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import _common
import trio

import trionet

#: Bytes of a streamed frame's payload (its tag included).
CHUNK_SIZE = 64 * 1024
CHUNK = b"C" + bytes(CHUNK_SIZE - 1)
NOTICE_TAG = b"N"
END = b"E"
#: Messages a bare trio connection's channel holds (trionet's send_queue_size).
QUEUE_SIZE = 256
#: Seconds between two notices.
NOTICE_INTERVAL = 0.2
#: Bytes a reader asks for per receive, and the pause after each receive.
READ_SIZE = 64 * 1024
READ_PAUSE = 0.005
#: Receive buffer of the clients that never read.
SLOW_RCVBUF = 4096
#: trionet's stall_timeout for this scenario (seconds).
STALL_TIMEOUT = 1.0
#: Bounds, in seconds: a client's first frame; the handlers' streaming beyond
#: the notices' D seconds; the readers' draining after the streams end.
HELLO_SECONDS = 30
STREAM_SLACK = 120
DRAIN_SECONDS = 60
#: Bounds in count: chunks one handler streams, receives one reader makes.
MAX_CHUNKS = 10_000_000
MAX_READS = 10_000_000
#: Receives a bare trio handler makes for a client's first frame.
HELLO_RECEIVES = 100
MIB = 1024 * 1024


def notice(sequence: int) -> bytes:
    return NOTICE_TAG + sequence.to_bytes(4, "big")


def frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


CHUNK_FRAME = frame(CHUNK)


async def paced_notices(
    broadcast: Callable[[bytes], Awaitable[None]],
    queued: Callable[[], list[tuple[str, int]]],
    seconds: float,
) -> dict[str, Any]:
    """Broadcast a notice every NOTICE_INTERVAL for ``seconds``; note the most
    bytes queued for one connection, per role, just before and after each."""
    count = round(seconds / NOTICE_INTERVAL)
    peaks = {"reader": 0, "never": 0}

    def sample() -> None:
        for role, size in queued():
            peaks[role] = max(peaks[role], size)

    started = trio.current_time()
    for sequence in range(count):
        sample()
        await broadcast(notice(sequence))
        sample()
        await trio.sleep_until(started + (sequence + 1) * NOTICE_INTERVAL)
    return {
        "notices": count,
        "peak_reader": peaks["reader"],
        "peak_never": peaks["never"],
    }


def role_of(name: str) -> str:
    return "reader" if name.startswith("R") else "never"


def outcome_counts(outcomes: dict[str, str]) -> dict[str, dict[str, int]]:
    """How each role's handlers ended, counted by outcome."""
    counts: dict[str, Counter[str]] = {"reader": Counter(), "never": Counter()}
    for name, outcome in outcomes.items():
        counts[role_of(name)][outcome] += 1
    return {role: dict(counter) for role, counter in counts.items()}


# --------------------------------------------------------------------------
# Servers


async def serve_trionet(seconds: float, stall_timeout: float) -> None:
    _common.raise_fd_limit()
    names: dict[trionet.Connection, str] = {}
    #: How each named connection's handler ended: "streaming" while it runs,
    #: "ended" when it sent its whole stream, else the close reason.
    outcomes: dict[str, str] = {}
    stopped = trio.Event()

    async def handler(conn: trionet.Connection) -> None:
        name = None
        with trio.move_on_after(HELLO_SECONDS):
            name = (await conn.receive()).decode()
        if name is None:
            return
        names[conn] = name
        outcomes[name] = "streaming"
        try:
            with trio.move_on_after(seconds + STREAM_SLACK):
                for _ in range(MAX_CHUNKS):
                    if stopped.is_set():
                        break
                    await conn.send(CHUNK)
                await conn.send(END)
                outcomes[name] = "ended"
        except trionet.ConnectionClosed as exc:
            outcomes[name] = exc.reason.name

    async with trionet.open_tcp_server(
        handler,
        host="127.0.0.1",
        framing=trionet.Frames(),
        grace_period=0,
        stall_timeout=stall_timeout,
    ) as server:

        def queued() -> list[tuple[str, int]]:
            return [
                (role_of(names[conn]), conn.statistics().queued_bytes)
                for conn in server.connections
                if conn in names
            ]

        async def stats(args: list[str]) -> dict[str, Any]:
            return {"open": len(outcomes)}

        async def broadcast(args: list[str]) -> dict[str, Any]:
            return await paced_notices(server.broadcast, queued, seconds)

        async def stop(args: list[str]) -> dict[str, Any]:
            stopped.set()
            return {}

        async def report(args: list[str]) -> dict[str, Any]:
            slow = server.statistics().closed.get(trionet.CloseReason.SLOW_CONSUMER)
            return {"outcomes": outcome_counts(outcomes), "slow_closed": slow or 0}

        _common.say(port=server.port)
        await _common.control_loop(
            {"stats": stats, "broadcast": broadcast, "stop": stop, "report": report}
        )


class BarePeer:
    """One bare trio connection: its channel, the bytes in it, its scope."""

    def __init__(self, send: trio.MemorySendChannel[bytes]) -> None:
        self.send = send
        self.scope = trio.CancelScope()
        #: Bytes accepted into the channel and not yet taken by the kernel.
        self.queued = 0
        self.outcome = "streaming"

    async def put(self, data: bytes) -> None:
        """Wait for room in the channel (the handler's send)."""
        self.queued += len(data)
        try:
            await self.send.send(data)
        except BaseException:
            self.queued -= len(data)
            raise


class BareServer:
    """Bare trio: a bounded channel and a writer task per connection."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.peers: dict[str, BarePeer] = {}
        self.outcomes: dict[str, str] = {}
        self.stopped = trio.Event()

    async def hello(self, stream: trio.SocketStream) -> str | None:
        """The client's first frame: its name."""
        parser = _common.FrameParser()
        with trio.move_on_after(HELLO_SECONDS):
            for _ in range(HELLO_RECEIVES):
                data = await stream.receive_some(_common.RECEIVE_SIZE)
                if not data:
                    break
                frames = parser.feed(data)
                if frames:
                    return frames[0][4:].decode()
        return None

    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            name = await self.hello(stream)
            if name is not None:
                await self.stream_to(stream, name)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ValueError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def stream_to(self, stream: trio.SocketStream, name: str) -> None:
        send, receive = trio.open_memory_channel[bytes](QUEUE_SIZE)
        peer = self.peers[name] = BarePeer(send)
        self.outcomes[name] = peer.outcome
        try:
            with trio.move_on_after(self.seconds + STREAM_SLACK), peer.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self.writer, stream, receive, peer)
                    for _ in range(MAX_CHUNKS):
                        if self.stopped.is_set():
                            break
                        await peer.put(CHUNK_FRAME)
                    await peer.put(frame(END))
                    peer.outcome = "ended"
                    await send.aclose()  # the writer ends once it has sent it all
        finally:
            self.outcomes[name] = peer.outcome
            self.peers.pop(name, None)

    async def writer(
        self,
        stream: trio.SocketStream,
        receive: trio.MemoryReceiveChannel[bytes],
        peer: BarePeer,
    ) -> None:
        try:
            async for data in receive:
                await stream.send_all(data)
                peer.queued -= len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            peer.outcome = "broken"
            peer.scope.cancel()

    async def broadcast(self, payload: bytes) -> None:
        data = frame(payload)
        for name, peer in list(self.peers.items()):
            try:
                peer.send.send_nowait(data)
            except trio.WouldBlock:
                peer.outcome = "evicted"
                del self.peers[name]
                peer.scope.cancel()
            else:
                peer.queued += len(data)
        await trio.lowlevel.checkpoint()

    def queued(self) -> list[tuple[str, int]]:
        return [(role_of(name), peer.queued) for name, peer in self.peers.items()]


async def serve_bare(seconds: float) -> None:
    _common.raise_fd_limit()
    bare = BareServer(seconds)

    async def stats(args: list[str]) -> dict[str, Any]:
        return {"open": len(bare.outcomes)}

    async def broadcast(args: list[str]) -> dict[str, Any]:
        return await paced_notices(bare.broadcast, bare.queued, seconds)

    async def stop(args: list[str]) -> dict[str, Any]:
        bare.stopped.set()
        return {}

    async def report(args: list[str]) -> dict[str, Any]:
        evicted = sum(1 for outcome in bare.outcomes.values() if outcome == "evicted")
        return {"outcomes": outcome_counts(bare.outcomes), "slow_closed": evicted}

    await _common.serve_bare_tcp(
        bare.handle,
        {"stats": stats, "broadcast": broadcast, "stop": stop, "report": report},
    )


# --------------------------------------------------------------------------
# Clients


class Reader:
    """What one reading client saw."""

    def __init__(self) -> None:
        self.received = 0
        self.notices: list[int] = []
        #: Whether the end-of-stream frame arrived.
        self.complete = False

    async def read(self, sock: trio.socket.SocketType) -> None:
        """Read READ_SIZE, pause READ_PAUSE, until the end frame (or EOF)."""
        parser = _common.FrameParser()
        try:
            for _ in range(MAX_READS):
                data = await sock.recv(READ_SIZE)
                if not data:
                    return
                self.received += len(data)
                for message in parser.feed(data):
                    tag = message[4:5]
                    if tag == NOTICE_TAG:
                        self.notices.append(int.from_bytes(message[5:9], "big"))
                    elif tag == END:
                        self.complete = True
                        return
                await trio.sleep(READ_PAUSE)
        except OSError:
            return  # reset: the server closed it


async def run(
    implementation: str, readers: int, never: int, seconds: float, stall: float
) -> tuple[list[object], list[str]]:
    """One run against one server: its table row and, for trionet, the
    expectations it broke."""
    server, port = await _common.start_server(
        __file__, implementation, str(seconds), str(stall)
    )
    sockets: list[trio.socket.SocketType] = []
    results = [Reader() for _ in range(readers)]
    finished = 0
    all_finished = trio.Event()

    async def read(sock: trio.socket.SocketType, result: Reader) -> None:
        nonlocal finished
        try:
            await result.read(sock)
        finally:
            finished += 1
            if finished == readers:
                all_finished.set()

    try:
        for index in range(never + readers):
            sock = trio.socket.socket()
            sockets.append(sock)
            if index < never:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_RCVBUF)
            await sock.connect(("127.0.0.1", port))
            name = f"S{index}" if index < never else f"R{index - never}"
            await sock.send(frame(name.encode()))
        held = await server.wait_open(never + readers)
        async with trio.open_nursery() as nursery:
            for sock, result in zip(sockets[never:], results, strict=True):
                nursery.start_soon(read, sock, result)
            before = sum(result.received for result in results)
            started = time.perf_counter()
            sent = await server.command("broadcast")
            elapsed = time.perf_counter() - started
            streamed = sum(result.received for result in results) - before
            await server.command("stop")
            with trio.move_on_after(DRAIN_SECONDS):
                await all_finished.wait()
            nursery.cancel_scope.cancel()
        report = await server.command("report")
        peak_rss = _common.proc_status(server.pid)["VmHWM"]
    finally:
        for sock in sockets:
            sock.close()
        await server.stop()

    count = sent["notices"]
    outcomes = report["outcomes"]
    readers_cut = sum(n for o, n in outcomes["reader"].items() if o != "ended")
    never_evicted = outcomes["never"].get(
        "SLOW_CONSUMER" if implementation == "trionet" else "evicted", 0
    )
    got = [len(result.notices) for result in results]
    in_order = sum(1 for result in results if result.notices == list(range(count)))
    complete = sum(1 for result in results if result.complete)
    row: list[object] = [
        implementation,
        held,
        f"{readers_cut}/{readers} {describe(outcomes['reader'], 'ended')}".strip(),
        f"{never_evicted}/{never} {describe(outcomes['never'], '')}".strip(),
        f"{min(got)}-{max(got)} / {count}",
        f"{in_order}/{readers}",
        f"{complete}/{readers}",
        f"{sent['peak_reader'] / 1024:,.0f} / {sent['peak_never'] / 1024:,.0f}",
        f"{peak_rss / 1024:.0f}",
        f"{streamed / elapsed / 1e6:.1f}",
    ]
    problems: list[str] = []
    if implementation == "trionet":
        if readers_cut:
            problems.append(f"readers cut short: {outcomes['reader']}")
        if outcomes["never"] != {"SLOW_CONSUMER": never}:
            problems.append(f"never-readers not all evicted: {outcomes['never']}")
        if count == 0 or in_order != readers:
            problems.append(f"readers missing notices or out of order: {got}")
        if complete != readers:
            problems.append(f"readers without the whole stream: {complete}")
    return row, problems


def describe(outcomes: dict[str, int], ignore: str) -> str:
    """The outcomes besides ``ignore``, e.g. ``(SLOW_CONSUMER 2)``."""
    shown = [f"{o} {n}" for o, n in sorted(outcomes.items()) if o != ignore]
    return f"({', '.join(shown)})" if shown else ""


async def main(readers: int, never: int, seconds: float, stall: float) -> int:
    _common.raise_fd_limit()
    rows = []
    problems: list[str] = []
    for implementation in _common.IMPLEMENTATIONS:
        row, broken = await run(implementation, readers, never, seconds, stall)
        rows.append(row)
        problems += broken
        print(*row, sep="  ", flush=True)
    _common.print_table(
        f"Streaming + broadcast: {readers} readers (64 KiB per read, then "
        f"{READ_PAUSE * 1000:g} ms pause) and {never} never reading, each "
        f"streamed 64 KiB frames; a notice every "
        f"{NOTICE_INTERVAL * 1000:g} ms for {seconds:g} s "
        f"(trionet stall_timeout {stall:g} s)",
        [
            "server",
            "connections",
            "readers cut short",
            "never-readers evicted",
            "notices per reader / sent",
            "all in order",
            "whole stream",
            "peak queued KiB reader / never",
            "server peak RSS MiB",
            "MB/s to readers",
        ],
        rows,
    )
    if problems:
        print("\ntrionet broke its expectations:")
        for problem in problems:
            print(f"  {problem}")
        return 1
    print(
        "\ntrionet met its expectations: no reader evicted, every never-reader "
        "evicted as SLOW_CONSUMER, every notice delivered in order."
    )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--readers", type=int, default=20)
    parser.add_argument("--never", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--stall-timeout", type=float, default=STALL_TIMEOUT)
    args = parser.parse_args()
    if args.serve:
        implementation, seconds, stall = args.serve
        if implementation == "trionet":
            trio.run(serve_trionet, float(seconds), float(stall))
        else:
            trio.run(serve_bare, float(seconds))
    elif args.quick:
        sys.exit(trio.run(main, 4, 1, 2.0, args.stall_timeout))
    else:
        sys.exit(
            trio.run(main, args.readers, args.never, args.seconds, args.stall_timeout)
        )
