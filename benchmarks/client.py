"""The one load client every stack is measured with.

Plain non-blocking sockets driven by ``select.epoll`` in a single thread: no
event loop framework, so the client costs as little CPU as Python allows (on
a 2-core machine it competes with the server) and is identical for every
stack.  It runs in the runner's process, never in the server's.

Echo workloads
--------------
Each connection repeats *rounds*: send one request (a 64-byte line, a burst
of 1,000 lines, or one frame), wait until exactly as many bytes came back,
record the round trip, start the next round.  A warm-up period is not
counted; then the server's CPU time is read from ``/proc/<pid>``, the
measured period runs, no new rounds start, every connection finishes its
round, and the CPU time is read again.  The first reply on every connection
is compared byte for byte with its request.

Idle workload
-------------
Opens connections in batches, echoes one line on each (so the server has
accepted it and run its handler), and reads the server's ``VmRSS`` from
``/proc/<pid>/status`` before and after.

Every connection goes to 127.0.0.1:PORT, or to a UNIX socket when the target
is a path (a str) instead of a port.

TLS
---
Given a client ``ssl.SSLContext`` (``--tls``), every echo connection does its
TLS handshake first (blocking, before the warm-up) and the rounds then run
over non-blocking ``ssl.SSLSocket`` objects on the same epoll loop: a receive
reads every decrypted record until the SSL layer wants more.  The handshake
workload (:func:`run_handshakes`) keeps a few connections in flight, each a
fresh TCP connection with a full TLS handshake (no session resumption), one
64-byte line echoed over it, then close_notify and close; it counts completed
connections per second.  The client does not verify the server's certificate:
that is client-side CPU that would only make the client the bottleneck.

Used by ``run.py``; also runnable by hand against a server started by hand::

    python benchmarks/client.py PORT PID pingpong --conns 50 --duration 2
    python benchmarks/client.py /tmp/echo.sock PID frames --conns 4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import resource
import select
import socket
import ssl
import time
from typing import Any

#: Wire size of one line (63 bytes and the newline).
LINE_SIZE = 64
#: Lines in one pipelined burst.
BURST = 1000
#: Longest any echo measurement may spend draining after the measured period.
DRAIN_TIMEOUT = 60.0
#: The most epoll rounds any one measurement may take.
MAX_POLLS = 200_000_000
#: Connections opened (and confirmed) per batch in the idle workload.
IDLE_BATCH = 250

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------ /proc


def server_cpu_seconds(pid: int) -> float:
    """CPU seconds used so far by process ``pid`` (all its live threads).

    Summed from ``/proc/<pid>/task/*/schedstat`` (nanoseconds on the CPU) when
    the kernel has it, else user + system time from ``/proc/<pid>/stat``
    (10 ms ticks).
    """
    try:
        total = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                    total += int(f.read().split()[0])
            except FileNotFoundError:  # a thread that just ended
                continue
        return total / 1e9
    except (OSError, ValueError, IndexError):
        pass
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # The command name may contain spaces: fields start after the last ")".
    fields = stat[stat.rindex(b")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / _CLOCK_TICKS


def server_rss_kib(pid: int) -> int:
    """Resident set size of process ``pid`` in KiB (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def raise_fd_limit() -> int:
    """Raise the soft descriptor limit to the hard one; return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


# --------------------------------------------------------------- requests


def line_request() -> bytes:
    """One 64-byte line."""
    return b"ping:" + bytes(range(65, 65 + 58)) + b"\n"


def burst_request(count: int = BURST) -> bytes:
    """``count`` distinct 64-byte lines in one piece."""
    body = bytes(range(65, 65 + 56))
    return b"".join(b"%06d:" % i + body + b"\n" for i in range(count))


def frame_request(size: int) -> bytes:
    """One frame: a 4-byte big-endian length, then ``size`` pseudo-random bytes."""
    payload = random.Random(size).randbytes(size)
    return size.to_bytes(4, "big") + payload


# ----------------------------------------------------------------- sockets


#: Where a server listens: a loopback TCP port, or a UNIX socket's path.
Target = int | str


def client_tls_context() -> ssl.SSLContext:
    """The load client's TLS settings: TLS 1.3, no certificate check, no
    session tickets kept (every connection does a full handshake)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context


def _connect(target: Target, tls: ssl.SSLContext | None = None) -> socket.socket:
    if isinstance(target, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(10.0)
            sock.connect(target)
        except BaseException:
            sock.close()
            raise
    else:
        sock = socket.create_connection(("127.0.0.1", target), timeout=10.0)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls is None:
        return sock
    try:
        return tls.wrap_socket(sock)  # handshake now, with the 10 s timeout
    except BaseException:
        sock.close()
        raise


#: What a non-blocking socket raises when it cannot go on now (plain, TLS).
_AGAIN = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


def _receive(sock: socket.socket, scratch: bytearray) -> int:
    """Read what is there now into ``scratch``: -1 if nothing, 0 at the end.

    Over TLS, also reads what the SSL layer has already decrypted (epoll
    cannot see it); records still in the kernel wake epoll again."""
    try:
        count = sock.recv_into(scratch)
    except _AGAIN:
        return -1
    if count == 0 or not isinstance(sock, ssl.SSLSocket):
        return count
    view = memoryview(scratch)
    while count < len(scratch) and sock.pending():
        more = sock.recv_into(view[count:])
        if more == 0:
            break
        count += more
    return count


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    for _ in range(size + 1):
        if len(data) >= size:
            break
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("server closed the connection")
        data += chunk
    return bytes(data)


class _Conn:
    __slots__ = ("check", "fd", "pending", "received", "sock", "started")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.pending: memoryview | None = None
        self.received = 0
        self.started = 0
        self.check: bytearray | None = bytearray()


def _percentile(sorted_values: list[int], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, int(fraction * len(sorted_values)))
    return float(sorted_values[index])


# ------------------------------------------------------------ echo rounds


class _Phases:
    """The warm-up, measured and draining phases of one run (0, 1, 2), and
    what the measured one counted: rounds, their latencies, and the wall and
    server CPU time they took."""

    def __init__(
        self, pid: int, warmup: float, duration: float, max_rounds: float
    ) -> None:
        self.pid = pid
        self.warm_end = time.perf_counter() + warmup
        self.measure_end = self.warm_end + duration
        self.hard_end = self.measure_end + DRAIN_TIMEOUT
        self.max_rounds = max_rounds
        self.phase = 0
        self.rounds = 0
        self.latencies: list[int] = []
        self.t_start = self.cpu_start = self.t_end = self.cpu_end = 0.0

    def tick(self) -> bool:
        """Move on to the next phase when its time has come; False once the
        drain has taken too long."""
        now = time.perf_counter()
        if self.phase == 0 and now >= self.warm_end:
            self.phase = 1
            self.cpu_start = server_cpu_seconds(self.pid)
            self.t_start = time.perf_counter()
        elif self.phase == 1 and (
            now >= self.measure_end or self.rounds >= self.max_rounds
        ):
            self.phase = 2
        elif now >= self.hard_end:
            return False
        return True

    def round_done(self, started_ns: int) -> bool:
        """Count a round that started at ``started_ns`` (if measured); True
        if another should start in its place."""
        if self.phase == 1:
            self.rounds += 1
            self.latencies.append(time.perf_counter_ns() - started_ns)
        return self.phase < 2

    def stop(self) -> None:
        self.t_end = time.perf_counter()
        self.cpu_end = server_cpu_seconds(self.pid)

    def figures(self, messages_per_round: int, bytes_per_round: int) -> dict[str, Any]:
        if self.phase == 0:
            raise RuntimeError("the measurement never left its warm-up")
        latencies = sorted(self.latencies)
        return {
            "messages": self.rounds * messages_per_round,
            "bytes": self.rounds * bytes_per_round,
            "rounds": self.rounds,
            "seconds": self.t_end - self.t_start,
            "server_cpu": self.cpu_end - self.cpu_start,
            "p50_us": _percentile(latencies, 0.50) / 1000,
            "p99_us": _percentile(latencies, 0.99) / 1000,
        }


def run_echo(
    target: Target,
    pid: int,
    *,
    conns: int,
    request: bytes,
    messages_per_round: int,
    duration: float,
    warmup: float,
    max_rounds: int = 50_000_000,
    tls: ssl.SSLContext | None = None,
) -> dict[str, Any]:
    """Measure request/echo rounds over ``conns`` connections (over TLS with
    ``tls``).

    Returns messages, wire bytes received, elapsed seconds, server CPU seconds,
    rounds and the p50/p99 round-trip time in microseconds, all over the
    measured period only.
    """
    expect = len(request)
    socks: list[socket.socket] = []
    try:
        for _ in range(conns):
            socks.append(_connect(target, tls))
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    poller = select.epoll()
    scratch = bytearray(1 << 20)
    by_fd: dict[int, _Conn] = {}
    read_mask = select.EPOLLIN
    write_mask = select.EPOLLIN | select.EPOLLOUT
    for sock in socks:
        sock.setblocking(False)
        conn = _Conn(sock)
        by_fd[conn.fd] = conn
        poller.register(conn.fd, read_mask)

    def start_round(conn: _Conn) -> None:
        conn.received = 0
        conn.started = time.perf_counter_ns()
        try:
            sent = conn.sock.send(request)
        except _AGAIN:
            sent = 0
        if sent < expect:
            conn.pending = memoryview(request)[sent:]
            poller.modify(conn.fd, write_mask)

    try:
        for conn in by_fd.values():
            start_round(conn)
        active = len(by_fd)
        phases = _Phases(pid, warmup, duration, max_rounds)
        for _ in range(MAX_POLLS):
            if not active:
                break
            if not phases.tick():
                raise TimeoutError(f"{active} connections still waiting for echoes")
            for fd, events in poller.poll(0.1):
                conn = by_fd[fd]
                if events & select.EPOLLOUT and conn.pending is not None:
                    try:
                        sent = conn.sock.send(conn.pending)
                    except _AGAIN:
                        sent = 0
                    conn.pending = conn.pending[sent:]
                    if not conn.pending:
                        conn.pending = None
                        poller.modify(fd, read_mask)
                if not events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                    continue
                count = _receive(conn.sock, scratch)
                if count < 0:
                    continue
                if count == 0:
                    raise ConnectionError("server closed a connection mid-benchmark")
                if conn.check is not None:
                    conn.check += scratch[:count]
                conn.received += count
                if conn.received < expect:
                    continue
                if conn.received > expect:
                    raise ConnectionError("server sent more bytes than it was sent")
                if conn.check is not None:
                    if conn.check != request:
                        raise ConnectionError("server echoed different bytes")
                    conn.check = None
                if phases.round_done(conn.started):
                    start_round(conn)
                else:
                    active -= 1
        else:
            raise TimeoutError("poll bound reached")
        phases.stop()
    finally:
        poller.close()
        for sock in socks:
            sock.close()
    return phases.figures(messages_per_round, expect)


# ------------------------------------------------------------- handshakes


class _Handshaker:
    __slots__ = ("fd", "received", "sent", "sock", "started")

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.started = time.perf_counter_ns()
        self.sent = False
        self.received = bytearray()


def run_handshakes(
    target: Target,
    pid: int,
    *,
    tls: ssl.SSLContext,
    concurrency: int,
    duration: float,
    warmup: float,
) -> dict[str, Any]:
    """Fresh TLS connections per second: ``concurrency`` in flight, each a
    new TCP connection, a full handshake, one line echoed, close_notify and
    close.  Same result keys as :func:`run_echo` (a message is a connection).
    """
    line = line_request()
    poller = select.epoll()
    scratch = bytearray(1 << 16)
    live: dict[int, _Handshaker] = {}

    def start() -> None:
        raw = _connect(target)
        try:
            raw.setblocking(False)
            sock = tls.wrap_socket(raw, do_handshake_on_connect=False)
        except BaseException:
            raw.close()
            raise
        one = _Handshaker(sock)
        live[one.fd] = one
        poller.register(one.fd, select.EPOLLIN | select.EPOLLOUT)

    def finish(one: _Handshaker) -> None:
        poller.unregister(one.fd)
        del live[one.fd]
        with contextlib.suppress(OSError, ValueError):
            one.sock.unwrap()  # sends close_notify; the reply is not awaited
        one.sock.close()

    def step(one: _Handshaker) -> bool:
        """Move one connection on; True once its echo is back."""
        sock = one.sock
        if not one.sent:
            try:
                sock.do_handshake()
            except ssl.SSLWantReadError:
                poller.modify(one.fd, select.EPOLLIN)
                return False
            except ssl.SSLWantWriteError:
                poller.modify(one.fd, select.EPOLLOUT)
                return False
            sock.send(line)  # (64 bytes into an empty socket buffer)
            one.sent = True
            poller.modify(one.fd, select.EPOLLIN)
        count = _receive(sock, scratch)
        if count == 0:
            raise ConnectionError("server closed a connection before echoing")
        if count > 0:
            one.received += scratch[:count]
        if len(one.received) < len(line):
            return False
        if one.received != line:
            raise ConnectionError("server echoed different bytes")
        return True

    try:
        for _ in range(concurrency):
            start()
        phases = _Phases(pid, warmup, duration, math.inf)
        for _ in range(MAX_POLLS):
            if not live:
                break
            if not phases.tick():
                raise TimeoutError(f"{len(live)} connections still handshaking")
            for fd, _events in poller.poll(0.1):
                one = live[fd]
                if not step(one):
                    continue
                finish(one)
                if phases.round_done(one.started):
                    start()
        else:
            raise TimeoutError("poll bound reached")
        phases.stop()
    finally:
        poller.close()
        for one in live.values():
            one.sock.close()
    return phases.figures(1, len(line))


# ------------------------------------------------------------------- idle


def run_idle(target: Target, pid: int, *, conns: int) -> dict[str, Any]:
    """Server memory and CPU per idle connection (each echoed one line first)."""
    line = line_request()
    socks: list[socket.socket] = []
    try:
        warm = _connect(target)
        socks.append(warm)
        warm.sendall(line)
        if _recv_exactly(warm, len(line)) != line:
            raise ConnectionError("server echoed different bytes")
        rss_before = server_rss_kib(pid)
        cpu_before = server_cpu_seconds(pid)
        t0 = time.perf_counter()
        for start in range(0, conns, IDLE_BATCH):
            batch = [_connect(target) for _ in range(min(IDLE_BATCH, conns - start))]
            socks.extend(batch)
            for sock in batch:
                sock.sendall(line)
            for sock in batch:
                if _recv_exactly(sock, len(line)) != line:
                    raise ConnectionError("server echoed different bytes")
        seconds = time.perf_counter() - t0
        cpu_after = server_cpu_seconds(pid)
        rss_after = server_rss_kib(pid)
    finally:
        for sock in socks:
            sock.close()
    return {
        "conns": conns,
        "rss_before_kib": rss_before,
        "rss_after_kib": rss_after,
        "kib_per_conn": (rss_after - rss_before) / conns,
        "server_cpu": cpu_after - cpu_before,
        "seconds": seconds,
    }


# -------------------------------------------------------------------- CLI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="the server's TCP port, or its UNIX socket path")
    parser.add_argument("pid", type=int, help="the server's pid (for CPU and RSS)")
    parser.add_argument(
        "workload", choices=("pingpong", "pipelined", "frames", "idle", "handshakes")
    )
    parser.add_argument("--conns", type=int, default=1)
    parser.add_argument("--size", type=int, default=1024, help="frame payload bytes")
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--warmup", type=float, default=0.3)
    parser.add_argument("--tls", action="store_true", help="speak TLS 1.3")
    args = parser.parse_args()
    raise_fd_limit()
    target: Target = int(args.target) if args.target.isdigit() else args.target
    tls = client_tls_context() if args.tls or args.workload == "handshakes" else None
    if args.workload == "idle":
        result = run_idle(target, args.pid, conns=args.conns)
    elif args.workload == "handshakes":
        assert tls is not None
        result = run_handshakes(
            target,
            args.pid,
            tls=tls,
            concurrency=args.conns,
            duration=args.duration,
            warmup=args.warmup,
        )
    else:
        if args.workload == "pingpong":
            request, per_round = line_request(), 1
        elif args.workload == "pipelined":
            request, per_round = burst_request(), BURST
        else:
            request, per_round = frame_request(args.size), 1
        result = run_echo(
            target,
            args.pid,
            conns=args.conns,
            request=request,
            messages_per_round=per_round,
            duration=args.duration,
            warmup=args.warmup,
            tls=tls,
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
