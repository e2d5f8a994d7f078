"""The one UDP load client every UDP stack is measured with.

Plain non-blocking UDP sockets driven by ``select.epoll`` in a single thread,
as ``client.py`` does for TCP: no event loop framework, so the client costs
as little CPU as Python allows and is identical for every stack.  It runs in
the runner's process, never in the server's, and ``run.py`` reports its CPU
next to the server's, so a row where the client was the bottleneck shows it.

Workload
--------
``sockets`` client sockets, each connected to the server (so the kernel
drops anything not from the server), each keeping ``window`` datagrams of
64 bytes in flight: ``window=1`` is ping-pong, ``window=32`` a pipelined
load.  A datagram carries its socket's sequence number in its first 8 bytes;
every echo is matched to the datagram it answers (its round trip recorded)
and replaced by a new one at once.  Every ready socket is drained
(``recv_into`` until ``BlockingIOError``) per wake-up.

Drops
-----
UDP may lose datagrams.  A datagram not answered within ``LOSS_TIMEOUT``
seconds is counted as dropped and replaced, so a loss never stalls a socket;
an echo that still arrives later is counted as ``late`` (it was not lost
after all, only slow).  The measured period ends like the TCP one: no new
datagrams start, and every socket waits for its outstanding echoes (or their
loss timeout).  The first echo on every socket is compared byte for byte
with what was sent.

Used by ``run.py``; also runnable by hand against a server started by hand::

    python benchmarks/udp_client.py PORT PID --sockets 50 --window 32 --duration 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import select
import socket
import time
from collections.abc import Iterator
from typing import Any

from client import _percentile, server_cpu_seconds

#: Bytes in one datagram.
DATAGRAM_SIZE = 64
#: Seconds after which an unanswered datagram counts as dropped.
LOSS_TIMEOUT = 1.0
#: SO_RCVBUF of each client socket (the kernel caps it at rmem_max).
CLIENT_RCVBUF = 1024 * 1024
#: Longest any measurement may spend draining after the measured period.
DRAIN_TIMEOUT = 10.0
#: The most epoll rounds any one measurement may take.
MAX_POLLS = 200_000_000
#: Seconds between two scans for datagrams past their loss timeout.
SCAN_INTERVAL = 0.1

_FILLER = bytes(range(65, 65 + DATAGRAM_SIZE - 8))


def datagram(seq: int) -> bytes:
    """Datagram number ``seq`` of a socket: 8-byte big-endian seq, then filler."""
    return seq.to_bytes(8, "big") + _FILLER


class _Peer:
    __slots__ = ("checked", "fd", "next_seq", "outstanding", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.next_seq = 0
        #: Sequence number -> perf_counter_ns() when sent, oldest first.
        self.outstanding: dict[int, int] = {}
        self.checked = False


@contextlib.contextmanager
def _open(port: int, count: int) -> Iterator[tuple[Any, dict[int, _Peer]]]:
    """``count`` client sockets connected to the server, registered with an
    epoll object; all closed on the way out."""
    with contextlib.ExitStack() as stack:
        poller = stack.enter_context(select.epoll())
        by_fd: dict[int, _Peer] = {}
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_RCVBUF)
            sock.bind(("127.0.0.1", 0))
            sock.connect(("127.0.0.1", port))
            sock.setblocking(False)
            peer = _Peer(sock)
            by_fd[peer.fd] = peer
            poller.register(peer.fd, select.EPOLLIN)
        yield poller, by_fd


def run_udp(
    port: int,
    pid: int,
    *,
    sockets: int,
    window: int,
    duration: float,
    warmup: float,
    count: float = math.inf,
    loss_timeout: float = LOSS_TIMEOUT,
) -> dict[str, Any]:
    """Measure echoes of ``sockets`` x ``window`` datagrams in flight.

    The measured period ends after ``duration`` seconds or ``count`` echoes,
    whichever comes first.

    Returns messages (echoes matched in the measured period), wire bytes,
    elapsed seconds, the server's and this process's CPU seconds, the p50/p99
    round trip in microseconds (all over the measured period), and the
    datagrams sent, dropped and late over the whole run.
    """
    scratch = bytearray(65536)
    view = memoryview(scratch)
    clock = time.perf_counter_ns
    dropped = late = 0
    latencies: list[int] = []

    def send_one(peer: _Peer, now_ns: int) -> None:
        seq = peer.next_seq
        peer.next_seq = seq + 1
        peer.outstanding[seq] = now_ns
        # The kernel may refuse it (or report an ICMP error for an earlier
        # one): lost all the same; the loss timeout replaces it.
        with contextlib.suppress(BlockingIOError, ConnectionRefusedError):
            peer.sock.send(seq.to_bytes(8, "big") + _FILLER)

    with _open(port, sockets) as (poller, by_fd):
        for peer in by_fd.values():
            for _ in range(window):
                send_one(peer, clock())
        begin = time.perf_counter()
        warm_end = begin + warmup
        measure_end = warm_end + duration
        hard_end = measure_end + DRAIN_TIMEOUT
        next_scan = begin + SCAN_INTERVAL
        phase = 0  # 0: warm-up, 1: measured, 2: draining
        matched = 0
        t_start = t_end = cpu_start = cpu_end = own_start = own_end = 0.0
        waiting = len(by_fd) * window
        for _ in range(MAX_POLLS):
            if phase == 2 and not waiting:
                break
            now = time.perf_counter()
            if phase == 0 and now >= warm_end:
                phase = 1
                cpu_start = server_cpu_seconds(pid)
                own_start = time.process_time()
                t_start = time.perf_counter()
            elif phase == 1 and (now >= measure_end or matched >= count):
                phase = 2
                t_end = time.perf_counter()
                own_end = time.process_time()
                cpu_end = server_cpu_seconds(pid)
            elif now >= hard_end:
                raise TimeoutError(f"{waiting} datagrams still unanswered")
            if now >= next_scan:
                next_scan = now + SCAN_INTERVAL
                now_ns = clock()
                oldest = now_ns - int(loss_timeout * 1e9)
                for peer in by_fd.values():
                    outstanding = peer.outstanding
                    while outstanding:
                        seq = next(iter(outstanding))
                        if outstanding[seq] > oldest:
                            break
                        del outstanding[seq]
                        dropped += 1
                        if phase < 2:
                            send_one(peer, now_ns)
                        else:
                            waiting -= 1
            for fd, _events in poller.poll(SCAN_INTERVAL):
                peer = by_fd[fd]
                sock = peer.sock
                recv_into = sock.recv_into
                outstanding = peer.outstanding
                # Drain the socket first, then send the replacements: an
                # echo is never read in the round that sent its datagram,
                # and one clock reading serves every echo of the round.
                received_at = clock()
                answered = 0
                # Drained once nothing is outstanding (skips the failing
                # recv); a late echo is read in a later round.
                while outstanding:
                    try:
                        size = recv_into(scratch)
                    except BlockingIOError:
                        break
                    except ConnectionRefusedError as exc:
                        raise ConnectionError("the server is gone") from exc
                    seq = int.from_bytes(view[:8], "big")
                    sent_at = outstanding.pop(seq, None)
                    if sent_at is None:
                        late += 1
                        continue
                    if not peer.checked:
                        if scratch[:size] != datagram(seq):
                            raise ConnectionError("server echoed different bytes")
                        peer.checked = True
                    answered += 1
                    if phase == 1:
                        latencies.append(received_at - sent_at)
                if phase == 1:
                    matched += answered
                if phase == 2:
                    waiting -= answered
                    continue
                send = sock.send
                first = peer.next_seq
                sent_at = clock()
                for seq in range(first, first + answered):
                    outstanding[seq] = sent_at
                    try:  # noqa: SIM105 (cheaper than suppress() per datagram)
                        send(seq.to_bytes(8, "big") + _FILLER)
                    except (BlockingIOError, ConnectionRefusedError):
                        pass  # lost: the loss timeout replaces it
                peer.next_seq += answered
        else:
            raise TimeoutError("poll bound reached")
        sent = sum(p.next_seq for p in by_fd.values())
    if phase == 0:
        raise RuntimeError("the measurement never left its warm-up")
    latencies.sort()
    return {
        "messages": matched,
        "bytes": matched * DATAGRAM_SIZE,
        "rounds": matched,
        "seconds": t_end - t_start,
        "server_cpu": cpu_end - cpu_start,
        "client_cpu_measured": own_end - own_start,
        "p50_us": _percentile(latencies, 0.50) / 1000,
        "p99_us": _percentile(latencies, 0.99) / 1000,
        "dropped": dropped,
        "late": late,
        "sent": sent,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("port", type=int)
    parser.add_argument("pid", type=int, help="the server's pid (for its CPU)")
    parser.add_argument("--sockets", type=int, default=1)
    parser.add_argument("--window", type=int, default=1)
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--warmup", type=float, default=0.3)
    args = parser.parse_args()
    result = run_udp(
        args.port,
        args.pid,
        sockets=args.sockets,
        window=args.window,
        duration=args.duration,
        warmup=args.warmup,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
