"""Scale-out figures: worker processes on one port, and fan-out over Redis.

Not a test; nothing here asserts anything about speed.  Run it by hand::

    python benchmarks/scale_out.py                 # about 1 minute
    python benchmarks/scale_out.py --reps 1 --duration 2 --messages 5000

Ping-pong
    ``trionet.run_workers`` runs 1, then 2, worker processes (repeated
    ``--reps`` times, alternating); each serves ``Lines()`` echo on one shared
    port with ``reuse_port=True``.  The load client of ``benchmarks/client.py``
    (one thread, epoll) keeps one 64-byte line in flight on each of 50
    connections.  Reported: messages/s (median of the repetitions, with the
    range), the ratio 2 workers / 1 worker, and the workers' CPU seconds per
    second.  The client runs on the same machine and needs a core of its own,
    which matters on a 2-core machine.

Fan-out through the backplane
    A redis-server on a loopback port (started and stopped here), two channel
    server processes, each with its own ``RedisBackplane``, and 100 raw
    socket clients, 50 on each.  One client asks server A to publish
    ``--messages`` 64-byte messages on one channel as fast as it can; the
    clock runs until every client has all of them.  Reported: publishes/s
    reaching all 100 clients (and deliveries/s), and the backplane counters
    (what was lost -- ``dropped``/``missed``, ``not_delivered`` before the
    Redis Streams backplane -- must be 0 for the figure to count).  The same
    run with all 100 clients on one server and no backplane gives the local
    baseline.

Cross-process latency
    The same two servers on Redis, one client on each.  Server A publishes
    ``--latency-messages`` 64-byte messages at ``--latency-rate`` per second,
    each carrying the system-wide monotonic clock at publication; each
    client notes the clock when the message arrives.  Reported: p50 and p99
    of publication-to-arrival for the client of the other process (through
    Redis) and for A's own client (local delivery).

The script runs against any trionet of the last two backplane designs (the
pub/sub one exposed ``stats`` and took ``queue_size``), so the old figures can
be measured on the same machine: ``PYTHONPATH=<old checkout> python
benchmarks/scale_out.py --only-backplane``.

Prints a Markdown report, then one JSON line with the raw numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import os
import resource
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import trio

import trionet
import trionet.channels
from trionet.channels._wire import encode_frame

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import client  # noqa: E402  (benchmarks/client.py, the shared load client)

PAYLOAD = b"x" * 64
NEWS_FRAME = len(encode_frame("news", PAYLOAD, 1 << 20))
HELLO_FRAME = len(encode_frame("hello", b"", 1 << 20))
STEP = 60.0  # seconds any one step may take
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def busy_seconds() -> float:
    """CPU seconds every CPU spent busy so far (from /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def own_cpu_seconds() -> float:
    """CPU seconds of this process and its finished children."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ------------------------------------------------------------ echo workers


async def echo_worker(worker: trionet.Worker, port: int) -> None:
    async def echo(conn: trionet.Connection) -> None:
        async for line in conn:
            await conn.send(line)

    async with trionet.open_tcp_server(
        echo, port, reuse_port=True, framing=trionet.Lines(), grace_period=1.0
    ):
        worker.report({"pid": worker.pid})
        await worker.shutdown_requested.wait()


def serve_echo(port: int, workers: int) -> int:
    pids: dict[int, int] = {}

    def on_report(index: int, report: dict[str, Any]) -> None:
        pids[index] = report["pid"]
        if len(pids) == workers:
            print("READY", *sorted(pids.values()), flush=True)

    return trionet.run_workers(echo_worker, workers, args=(port,), on_report=on_report)


def pingpong(workers: int, duration: float, warmup: float) -> dict[str, Any]:
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind(("127.0.0.1", 0))  # keeps the port ours; never listens
    port = holder.getsockname()[1]
    pool = subprocess.Popen(
        [sys.executable, __file__, "--serve-echo", str(port), str(workers)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert pool.stdout is not None
        line = _read_line(pool.stdout, STEP)
        if not line.startswith("READY"):
            raise RuntimeError(f"echo pool did not start: {line!r}")
        pids = [int(p) for p in line.split()[1:]]
        cpu0 = sum(client.server_cpu_seconds(p) for p in pids)
        busy0, own0, wall0 = busy_seconds(), own_cpu_seconds(), time.monotonic()
        result = client.run_echo(
            port,
            pids[0],
            conns=50,
            request=client.line_request(),
            messages_per_round=1,
            duration=duration,
            warmup=warmup,
        )
        cpu = sum(client.server_cpu_seconds(p) for p in pids) - cpu0
        wall = time.monotonic() - wall0
        others = busy_seconds() - busy0 - cpu - (own_cpu_seconds() - own0)
        pool.send_signal(signal.SIGTERM)
        code = pool.wait(timeout=STEP)
        if code != 0:
            raise RuntimeError(f"echo pool exited with {code}")
    finally:
        if pool.poll() is None:
            pool.kill()  # our own child, by PID
            pool.wait()
        holder.close()
    return {
        "workers": workers,
        "messages_per_s": result["messages"] / result["seconds"],
        "p50_us": result["p50_us"],
        "p99_us": result["p99_us"],
        # Over warm-up and measurement alike.
        "worker_cpu_per_s": cpu / wall,
        # CPU that neither the workers nor the client used during the run:
        # other processes on the machine.  High values mean a noisy figure.
        "other_cpu_per_s": max(0.0, others / wall),
    }


# ---------------------------------------------------------- fan-out servers


def make_backplane(url: str, messages: int) -> Any:
    """A RedisBackplane with room for ``messages`` 64-byte messages, on the
    current design or the pub/sub one before it."""
    cls = trionet.channels.RedisBackplane
    if "queue_size" in inspect.signature(cls).parameters:  # pub/sub design
        return cls(url, queue_size=messages + 1)
    return cls(url, max_buffer=max(16 << 20, messages * 256))


def backplane_counters(backplane: Any) -> dict[str, Any]:
    snapshot = (
        backplane.statistics() if hasattr(backplane, "statistics") else backplane.stats
    )
    return attrs.asdict(snapshot)


def serve_fanout(url: str | None, messages: int) -> None:
    """One channel server process; prints its port, stops at stdin's end."""

    async def main() -> None:
        backplane = make_backplane(url, messages) if url else None
        server: trionet.channels.ChannelServer | None = None

        async def handler(cc: trionet.channels.ChannelConnection) -> None:
            assert server is not None
            await cc.publish("hello", b"")
            async for channel, data in cc:
                if channel == "go":
                    for i in range(int(data)):
                        await server.publish("news", PAYLOAD)
                        if i % 64 == 63:
                            await trio.lowlevel.checkpoint()
                elif channel == "pace":
                    count, rate = (float(x) for x in data.split(b":"))
                    start = trio.current_time()
                    for i in range(int(count)):
                        await trio.sleep_until(start + i / rate)
                        stamp = struct.pack(">Q", time.monotonic_ns())
                        await server.publish("news", stamp + PAYLOAD[8:])

        async with trionet.channels.open_channel_server(
            handler,
            backplane=backplane,
            send_queue_size=messages + 16,
            grace_period=0,
        ) as srv:
            server = srv
            print(srv.port, flush=True)
            async with trio.lowlevel.FdStream(os.dup(0)) as stdin:
                while await stdin.receive_some():
                    pass
        stats = {} if backplane is None else backplane_counters(backplane)
        print(json.dumps(stats), flush=True)

    trio.run(main)


@contextlib.contextmanager
def channel_servers(
    url: str | None, servers: int, clients: int, messages: int
) -> Iterator[tuple[list[socket.socket], list[dict[str, Any]]]]:
    """``servers`` channel server processes (``serve_fanout``) and ``clients``
    raw socket clients spread over them, each greeted (so registered).

    Yields the clients and a list that receives each server's backplane
    counters when the block ends without an error.
    """
    procs = []
    socks: list[socket.socket] = []
    counters: list[dict[str, Any]] = []
    try:
        ports = []
        for _ in range(servers):
            proc = subprocess.Popen(
                [sys.executable, __file__, "--serve-fanout", url or "", str(messages)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            procs.append(proc)
            assert proc.stdout is not None
            ports.append(int(_read_line(proc.stdout, STEP)))
        for i in range(clients):
            sock = socket.create_connection(("127.0.0.1", ports[i % servers]), 10)
            socks.append(sock)
            if _recv_exactly(sock, HELLO_FRAME)[-5:] != b"hello":
                raise RuntimeError("unexpected greeting")
        yield socks, counters
        for proc in procs:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.close()
            counters.append(json.loads(_read_line(proc.stdout, STEP) or "{}"))
            if proc.wait(timeout=STEP) != 0:
                raise RuntimeError("a channel server failed")
    finally:
        for sock in socks:
            sock.close()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()  # our own child, by PID
                proc.wait()


def fanout(
    url: str | None, servers: int, clients: int, messages: int
) -> dict[str, Any]:
    with (
        channel_servers(url, servers, clients, messages) as (socks, counters),
        select.epoll() as poller,
    ):
        for sock in socks:
            sock.setblocking(False)
        expected = messages * NEWS_FRAME
        left = {sock.fileno(): expected for sock in socks}
        by_fd = {sock.fileno(): sock for sock in socks}
        for fd in by_fd:
            poller.register(fd, select.EPOLLIN)
        scratch = bytearray(1 << 20)
        begin = time.perf_counter()
        socks[0].sendall(encode_frame("go", str(messages), 1 << 20))
        deadline = begin + STEP
        while left:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{len(left)} clients still waiting")
            for fd, _events in poller.poll(0.5):
                try:
                    count = by_fd[fd].recv_into(scratch)
                except BlockingIOError:
                    continue
                if count == 0:
                    raise ConnectionError("a server closed a client")
                left[fd] -= count
                if left[fd] == 0:
                    del left[fd]
                    poller.unregister(fd)
                elif left[fd] < 0:
                    raise ConnectionError("a client got more than was published")
        elapsed = time.perf_counter() - begin
    return {
        "servers": servers,
        "clients": clients,
        "messages": messages,
        "seconds": elapsed,
        "publishes_per_s": messages / elapsed,
        "deliveries_per_s": messages * clients / elapsed,
        "backplanes": counters,
    }


def latency(url: str, messages: int, rate: float) -> dict[str, Any]:
    """Publication-to-arrival times of paced messages, locally and across
    processes (see the module's docstring)."""
    with channel_servers(url, 2, 2, messages) as (socks, counters):
        socks[0].sendall(encode_frame("pace", f"{messages}:{rate}", 1 << 20))
        arrivals: list[list[int]] = [[], []]
        buffers = [b"", b""]
        deadline = time.monotonic() + messages / rate + STEP
        while any(len(a) < messages for a in arrivals):
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                raise TimeoutError("paced messages did not all arrive")
            readable, _, _ = select.select(socks, [], [], timeout)
            for sock in readable:
                side = socks.index(sock)
                chunk = sock.recv(1 << 16)
                now = time.monotonic_ns()
                if not chunk:
                    raise ConnectionError("a server closed a client")
                buffers[side] += chunk
                while len(buffers[side]) >= NEWS_FRAME:
                    frame = buffers[side][:NEWS_FRAME]
                    buffers[side] = buffers[side][NEWS_FRAME:]
                    (stamp,) = struct.unpack(">Q", frame[-64:-56])
                    arrivals[side].append(now - stamp)
    local, remote = (sorted(a) for a in arrivals)
    return {
        "messages": messages,
        "rate": rate,
        "local_p50_us": _percentile(local, 0.50) / 1000,
        "local_p99_us": _percentile(local, 0.99) / 1000,
        "remote_p50_us": _percentile(remote, 0.50) / 1000,
        "remote_p99_us": _percentile(remote, 0.99) / 1000,
        "backplanes": counters,
    }


# ------------------------------------------------------------------ redis


class Redis:
    """A redis-server of our own on a free loopback port, without persistence
    (so a restart comes back empty); its log goes to /dev/null."""

    def __init__(self) -> None:
        binary = os.environ.get("TRIONET_REDIS_SERVER") or shutil.which("redis-server")
        if not binary:
            raise SystemExit("redis-server is needed for the backplane figures")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        self.argv += ["--save", "", "--appendonly", "no", "--logfile", "/dev/null"]
        self.url = f"redis://127.0.0.1:{self.port}"
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + STEP
        while True:  # ready when it answers
            try:
                with socket.create_connection(("127.0.0.1", self.port), 1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)

    def stop(self, kill: bool = False) -> None:
        self.proc.send_signal(signal.SIGCONT)
        if kill:
            self.proc.kill()  # our own child, by PID
        else:
            self.proc.terminate()
        self.proc.wait(timeout=STEP)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)  # our own child, by PID


# -------------------------------------------------------------- fault runs


class _LossLines(logging.Handler):
    """Counts the backplane's WARNING lines about lost messages."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "given up" in message or "never arrived" in message:
            self.lines.append(message)


def fault_run(
    fault: str, rate: float, before: float, pause: float, after: float
) -> dict[str, Any]:
    """Publish at ``rate`` for ``before + pause + after`` seconds from one
    server to the client of another, each with its own backplane; ``pause``
    seconds into it, Redis is SIGKILLed and restarted empty ("restart") or
    SIGSTOPped and SIGCONTed ("hang").  Counts what the client got."""
    redis = Redis()
    loss_lines = _LossLines()
    logging.getLogger("trionet").addHandler(loss_lines)

    async def idle(cc: trionet.channels.ChannelConnection) -> None:
        await cc.publish("hello", b"")
        await trio.sleep_forever()

    async def main() -> dict[str, Any]:
        bp_a = trionet.channels.RedisBackplane(redis.url)
        bp_b = trionet.channels.RedisBackplane(redis.url)
        open_server = trionet.channels.open_channel_server
        async with open_server(idle, backplane=bp_a, grace_period=0) as a:
            async with open_server(idle, backplane=bp_b, grace_period=0) as b:
                async with trionet.channels.connect_channels(
                    "127.0.0.1", b.port
                ) as client:
                    await client.receive("hello")
                    total = int(rate * (before + pause + after))
                    begin = trio.current_time()

                    async def publish() -> None:
                        for i in range(total):
                            await trio.sleep_until(begin + i / rate)
                            await a.publish("news", str(i))

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(publish)
                        await trio.sleep_until(begin + before)
                        if fault == "restart":
                            redis.stop(kill=True)
                        else:
                            redis.signal(signal.SIGSTOP)
                        await trio.sleep(pause)
                        if fault == "restart":
                            await trio.to_thread.run_sync(redis.start)
                        else:
                            redis.signal(signal.SIGCONT)
                    got: list[int] = []
                    with trio.move_on_after(STEP):
                        while len(got) < total:
                            got.append(int(await client.receive("news")))
                    await trio.sleep(1)  # anything more (a copy) would show now
                    got += [int(m) for m in client.drain("news")]
        return {
            "fault": fault,
            "rate": rate,
            "seconds_without_redis": pause,
            "published": total,
            "received": len(got),
            "in_order_no_duplicates": got == list(range(total)),
            "publisher": attrs.asdict(bp_a.statistics()),
            "receiver": attrs.asdict(bp_b.statistics()),
            "loss_lines": loss_lines.lines,
        }

    try:
        return trio.run(main)
    finally:
        logging.getLogger("trionet").removeHandler(loss_lines)
        redis.stop()


# ---------------------------------------------------------------- helpers


def _read_line(stream: Any, timeout: float) -> str:
    ready, _, _ = select.select([stream], [], [], timeout)
    if not ready:
        raise TimeoutError("no output from a benchmark process")
    return str(stream.readline()).strip()


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed early")
        data += chunk
    return data


def _percentile(sorted_values: list[int], fraction: float) -> float:
    index = min(len(sorted_values) - 1, round(fraction * (len(sorted_values) - 1)))
    return float(sorted_values[index])


def _lost(backplanes: list[dict[str, Any]]) -> list[tuple[int, int]]:
    # (given up by the publisher, missed by a receiver), in either design.
    return [
        (
            b.get("dropped", b.get("not_delivered", 0)) + b.get("unconfirmed", 0),
            b.get("missed", 0),
        )
        for b in backplanes
    ]


def _median_range(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--latency-messages", type=int, default=5_000)
    parser.add_argument("--latency-rate", type=float, default=1_000.0)
    parser.add_argument(
        "--only-backplane", action="store_true", help="skip the ping-pong figures"
    )
    parser.add_argument(
        "--fault-runs",
        action="store_true",
        help="only: Redis killed and restarted empty after 4 s, then Redis hung "
        "for 8 s, each during 350 publishes/s",
    )
    parser.add_argument("--serve-echo", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-fanout", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_echo:
        sys.exit(serve_echo(*args.serve_echo))
    if args.serve_fanout:
        serve_fanout(args.serve_fanout[0] or None, int(args.serve_fanout[1]))
        return
    client.raise_fd_limit()
    if args.fault_runs:
        for fault, pause in (("restart", 4.0), ("hang", 8.0)):
            result = fault_run(fault, 350.0, 2.0, pause, 2.0)
            publisher, receiver = result.pop("publisher"), result.pop("receiver")
            print(json.dumps(result))
            print("  publisher:", json.dumps(publisher))
            print("  receiver: ", json.dumps(receiver))
        return

    runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    if not args.only_backplane:
        for _ in range(args.reps):
            for workers in (1, 2):
                runs[workers].append(pingpong(workers, args.duration, args.warmup))

    redis = Redis()
    try:
        over_redis = [
            fanout(redis.url, 2, 100, args.messages) for _ in range(args.reps)
        ]
        latencies = [
            latency(redis.url, args.latency_messages, args.latency_rate)
            for _ in range(args.reps)
        ]
    finally:
        redis.stop()
    local = [fanout(None, 1, 100, args.messages) for _ in range(args.reps)]

    print(f"## Scale-out ({os.cpu_count()} CPUs, Python {sys.version.split()[0]})\n")
    if runs[1]:
        rates = {w: [r["messages_per_s"] for r in runs[w]] for w in runs}
        ratio = statistics.median(rates[2]) / statistics.median(rates[1])
        print("### Ping-pong, 50 connections, 64-byte lines\n")
        print(
            "| workers | messages/s (median, range) | p50 µs | p99 µs "
            "| worker CPU/s | other processes' CPU/s |"
        )
        print("|---|---|---|---|---|---|")
        for workers in (1, 2):
            rs = runs[workers]
            print(
                f"| {workers} | {_median_range(rates[workers])} "
                f"| {statistics.median(r['p50_us'] for r in rs):,.0f} "
                f"| {statistics.median(r['p99_us'] for r in rs):,.0f} "
                f"| {statistics.median(r['worker_cpu_per_s'] for r in rs):.2f} "
                f"| {statistics.median(r['other_cpu_per_s'] for r in rs):.2f} |"
            )
        print(f"\nRatio, 2 workers / 1 worker: {ratio:.2f}\n")
    print(f"### Fan-out of {args.messages:,} 64-byte messages to 100 clients\n")
    print("| setup | publishes/s reaching every client | deliveries/s |")
    print("|---|---|---|")
    for name, results in (
        ("2 processes over Redis (50 clients each)", over_redis),
        ("1 process, no backplane (baseline)", local),
    ):
        print(
            f"| {name} | {_median_range([r['publishes_per_s'] for r in results])} "
            f"| {_median_range([r['deliveries_per_s'] for r in results])} |"
        )
    print(
        f"\n### Latency, {args.latency_messages:,} messages at "
        f"{args.latency_rate:,.0f}/s\n"
    )
    print("| client | p50 µs (median, range) | p99 µs (median, range) |")
    print("|---|---|---|")
    for name, key in (
        ("on the other process (through Redis)", "remote"),
        ("on the publishing process (local)", "local"),
    ):
        print(
            f"| {name} | {_median_range([r[f'{key}_p50_us'] for r in latencies])} "
            f"| {_median_range([r[f'{key}_p99_us'] for r in latencies])} |"
        )
    lost = [_lost(r["backplanes"]) for r in over_redis + latencies]
    print(f"\nBackplane (given up, missed) per server and run: {lost}\n")
    print(
        json.dumps(
            {
                "pingpong": runs,
                "fanout_redis": over_redis,
                "fanout_local": local,
                "latency": latencies,
            }
        )
    )


if __name__ == "__main__":
    main()
