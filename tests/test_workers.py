"""Scale-out on one host: reuse_port, and run_workers' processes: replacing
workers that end (crash, kill, a signal to one worker), graceful shutdown on a
signal to the parent or to the whole process group.

run_workers runs its supervisor in the calling thread and starts spawned
worker processes that import their ``main`` from this module.  Tests that only
need the pool's return value and reports call it directly (sync tests, main
thread); the tests that send it a signal from outside run it in a child
process of their own (``python -c "...; run_echo_pool()"``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

import trionet

ROOT = Path(__file__).resolve().parent.parent
STEP = 20.0  # seconds any one step may take before the test fails


@pytest.fixture(scope="module", autouse=True)
def resource_tracker() -> None:
    """Start multiprocessing's resource tracker before any fd check.

    The first spawned process starts it, and it keeps one pipe open in this
    process for good; started here, that pipe predates every test.
    """
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()


# ------------------------------------------------------------- reuse_port


def _reserved_port(kind: int) -> socket.socket:
    """A bound, SO_REUSEPORT socket holding a free port for servers to share."""
    sock = socket.socket(socket.AF_INET, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


async def test_tcp_servers_share_a_port_with_reuse_port() -> None:
    async def hello(conn: trionet.Connection) -> None:
        await conn.send_line("hello")

    with _reserved_port(socket.SOCK_STREAM) as holder:
        port = holder.getsockname()[1]
        async with trionet.open_tcp_server(hello, port, reuse_port=True) as one:
            async with trionet.open_tcp_server(hello, port, reuse_port=True) as two:
                assert one.port == two.port == port
                with pytest.raises(OSError):
                    async with trionet.open_tcp_server(hello, port):
                        pass  # pragma: no cover
                async with trionet.connect_tcp("127.0.0.1", port) as conn:
                    with trio.fail_after(STEP):
                        assert await conn.receive_line() == b"hello"


async def test_udp_servers_share_a_port_with_reuse_port() -> None:
    async def echo(peer: trionet.UdpPeer) -> None:
        async for datagram in peer:
            await peer.send(datagram)

    # grace_period=0: the echo handlers wait for datagrams until cancelled.
    udp = functools.partial(trionet.open_udp_server, reuse_port=True, grace_period=0)
    async with udp(echo, 0) as one:
        port = one.port
        async with udp(echo, port) as two:
            assert two.port == port
            with pytest.raises(OSError):
                async with trionet.open_udp_server(echo, port):
                    pass  # pragma: no cover
            # Each remote address is hashed to one of the two sockets; 32
            # addresses all land on one of them with odds of about 5e-10.
            # The endpoints stay open together, so their ports are distinct.
            async with contextlib.AsyncExitStack() as stack:
                for i in range(32):
                    ep = await stack.enter_async_context(
                        trionet.open_udp(remote=("127.0.0.1", port))
                    )
                    await ep.send(f"ping {i}")
                    with trio.fail_after(STEP):
                        assert await ep.receive() == f"ping {i}".encode()
            started = (
                one.statistics().peers_started,
                two.statistics().peers_started,
            )
            assert sum(started) == 32 and min(started) > 0


async def test_reuse_port_where_the_platform_has_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def handler(conn: object) -> None:
        pass  # pragma: no cover

    monkeypatch.delattr(socket, "SO_REUSEPORT")
    with pytest.raises(OSError, match="no SO_REUSEPORT"):
        async with trionet.open_udp_server(handler, reuse_port=True):
            pass  # pragma: no cover
    with pytest.raises(OSError, match="no SO_REUSEPORT"):
        async with trionet.open_tcp_server(handler, reuse_port=True):
            pass  # pragma: no cover


# ------------------------------------------------------- Worker by itself


def test_worker_report_keeps_the_latest_and_checks_it() -> None:
    worker = trionet.Worker(1, 3)
    assert (worker.index, worker.workers, worker.restarts) == (1, 3, 0)
    assert worker.pid == os.getpid()
    assert worker.last_report is None
    worker.report({"served": 1})
    worker.report({"served": 2, "names": ["a"]})
    assert worker.last_report == {"served": 2, "names": ["a"]}
    with pytest.raises(TypeError):
        worker.report({"when": object()})
    with pytest.raises(TypeError):
        worker.report([("served", 1)])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        worker.report({"ratio": float("nan")})
    with pytest.raises(trionet.MessageTooLarge):
        worker.report({"blob": "x" * 70_000})
    assert worker.last_report == {"served": 2, "names": ["a"]}
    with pytest.raises(ValueError):
        trionet.Worker(3, 3)


async def not_a_coroutine_function(worker: trionet.Worker) -> None:
    pass  # pragma: no cover


@pytest.mark.parametrize(
    ("main", "options", "error"),
    [
        (lambda worker: None, {}, TypeError),
        (print, {}, TypeError),
        (not_a_coroutine_function, {"workers": 0}, ValueError),
        (not_a_coroutine_function, {"args": (lambda: 1,)}, TypeError),
        (not_a_coroutine_function, {"max_restarts": -1}, ValueError),
        (not_a_coroutine_function, {"shutdown_timeout": float("inf")}, ValueError),
    ],
)
def test_run_workers_checks_its_arguments(
    main: Any, options: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        trionet.run_workers(main, **options)


def test_main_must_be_importable_by_name() -> None:
    async def nested(worker: trionet.Worker) -> None:
        pass  # pragma: no cover

    with pytest.raises(TypeError, match="top level"):
        trionet.run_workers(nested, 1)


# -------------------------------------------- worker mains (run in workers)


async def report_and_return(worker: trionet.Worker) -> None:
    worker.report({"pid": worker.pid, "restarts": worker.restarts})


async def crash_on_first_run(worker: trionet.Worker) -> None:
    worker.report({"pid": worker.pid, "restarts": worker.restarts})
    if worker.restarts == 0:
        raise RuntimeError(f"worker {worker.index} crashes on purpose")


async def always_crash(worker: trionet.Worker) -> None:
    raise RuntimeError("crashes on purpose, every time")


async def ignore_shutdown(worker: trionet.Worker) -> None:
    worker.report({"pid": worker.pid})
    await trio.sleep_forever()


async def echo_with_pid(worker: trionet.Worker, port: int) -> None:
    """Serve echo on ``port`` with every other worker; greet with the pid."""

    async def handler(conn: trionet.Connection) -> None:
        await conn.send_line(str(worker.pid))
        async for line in conn:
            await conn.send_line(line)

    async with trionet.open_tcp_server(
        handler, port, reuse_port=True, framing=trionet.Lines(), grace_period=0.2
    ) as server:
        worker.report(
            {"pid": worker.pid, "port": server.port, "restarts": worker.restarts}
        )
        await worker.shutdown_requested.wait()
    worker.report({"pid": worker.pid, "stopped": True})


def run_echo_pool() -> None:
    """The parent of a pool of echo_with_pid workers (argv: PORT WORKERS).

    Prints each report as a JSON line and logs the "trionet" logger to
    stderr; exits with run_workers' result.
    """

    def on_report(index: int, report: dict[str, Any]) -> None:
        print(json.dumps({"worker": index, **report}), flush=True)

    logging.basicConfig(format="%(levelname)s %(message)s", level=logging.INFO)
    port, workers = int(sys.argv[1]), int(sys.argv[2])
    sys.exit(
        trionet.run_workers(echo_with_pid, workers, args=(port,), on_report=on_report)
    )


# -------------------------------------------- pools run by the test itself


class Reports:
    def __init__(self) -> None:
        self.seen: list[tuple[int, dict[str, Any]]] = []

    def __call__(self, index: int, report: dict[str, Any]) -> None:
        self.seen.append((index, report))


@pytest.fixture
def worker_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.INFO, logger="trionet"):
        yield caplog


def test_workers_that_return_end_the_pool_with_0() -> None:
    reports = Reports()
    assert trionet.run_workers(report_and_return, 2, on_report=reports) == 0
    assert sorted(index for index, _ in reports.seen) == [0, 1]
    pids = {report["pid"] for _, report in reports.seen}
    assert len(pids) == 2 and os.getpid() not in pids


def test_a_crashed_worker_is_restarted(
    worker_logs: pytest.LogCaptureFixture,
) -> None:
    reports = Reports()
    code = trionet.run_workers(
        crash_on_first_run, 2, restart_backoff=0.01, on_report=reports
    )
    assert code == 0
    for index in (0, 1):
        runs = [r for i, r in reports.seen if i == index]
        assert [r["restarts"] for r in runs] == [0, 1]
        assert runs[0]["pid"] != runs[1]["pid"]
    assert worker_logs.text.count("exited with code 1; restarting it in") == 2


def test_with_max_restarts_a_worker_crashing_too_often_stops_the_pool(
    worker_logs: pytest.LogCaptureFixture,
) -> None:
    code = trionet.run_workers(always_crash, 1, max_restarts=2, restart_backoff=0.01)
    assert code == 1
    assert worker_logs.text.count("restarting it in") == 2
    assert "ended 3 times within 60 s, so every worker is stopped" in worker_logs.text


def _signal_self_on_first_report(*signums: int) -> Reports:
    """An on_report that signals this process (the pool's parent) once."""

    class Signaller(Reports):
        def __call__(self, index: int, report: dict[str, Any]) -> None:
            super().__call__(index, report)
            if len(self.seen) == 1:
                for signum in signums:
                    os.kill(os.getpid(), signum)

    return Signaller()


def test_a_worker_ignoring_shutdown_is_cancelled_after_the_timeout(
    worker_logs: pytest.LogCaptureFixture,
) -> None:
    reports = _signal_self_on_first_report(signal.SIGTERM)
    code = trionet.run_workers(
        ignore_shutdown, 1, shutdown_timeout=0.3, on_report=reports
    )
    assert code == 1
    assert "SIGTERM: stopping 1 workers" in worker_logs.text
    assert "worker 0 (pid" in worker_logs.text  # its exit is reported


def test_a_second_signal_cancels_main_at_once(
    worker_logs: pytest.LogCaptureFixture,
) -> None:
    # Two different signals: trio merges repeats of one signal still pending.
    reports = _signal_self_on_first_report(signal.SIGINT, signal.SIGTERM)
    code = trionet.run_workers(
        ignore_shutdown, 1, shutdown_timeout=STEP, on_report=reports
    )
    assert code == 1
    assert (
        "second signal (SIGTERM): cancelling main in every worker" in worker_logs.text
    )
    assert "killing it" not in worker_logs.text


# ------------------------------------------- a pool in a process of its own


async def _read_line(stream: trio.abc.ReceiveStream, decoder: trionet.Decoder) -> bytes:
    while True:
        line = decoder.next_message()
        if line is not None:
            return bytes(line)
        data = await stream.receive_some()
        if not data:
            raise EOFError("the pool closed its output")
        decoder.feed(data)


@asynccontextmanager
async def echo_pool(
    tmp_path: Path, workers: int, *, new_session: bool = False
) -> AsyncIterator[tuple[trio.Process, Callable[[], Awaitable[dict[str, Any]]], Path]]:
    """run_echo_pool in a child process of ours: the process, a function that
    returns its next report, and the file its log goes to."""
    holder = _reserved_port(socket.SOCK_STREAM)
    log = tmp_path / "pool.log"
    with holder, log.open("wb") as stderr:
        pool = await trio.lowlevel.open_process(
            [
                sys.executable,
                "-c",
                "from tests.test_workers import run_echo_pool as r; r()",
                str(holder.getsockname()[1]),
                str(workers),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=stderr,
            start_new_session=new_session,
        )
        lines = trionet.Decoder(trionet.Lines())

        async def next_report() -> dict[str, Any]:
            assert pool.stdout is not None
            with trio.fail_after(STEP):
                report: dict[str, Any] = json.loads(
                    await _read_line(pool.stdout, lines)
                )
            return report

        try:
            yield pool, next_report, log
        finally:
            with trio.CancelScope(shield=True):
                if pool.returncode is None:
                    pool.kill()  # our own child, by PID
                await pool.wait()
                if pool.stdout is not None:
                    await pool.stdout.aclose()


async def reports_until(
    next_report: Callable[[], Awaitable[dict[str, Any]]], count: int
) -> dict[int, dict[str, Any]]:
    """The latest serving report of each worker, once ``count`` workers serve."""
    serving: dict[int, dict[str, Any]] = {}
    while len(serving) < count:
        report = await next_report()
        if "port" in report:
            serving[report["worker"]] = report
    return serving


async def test_four_workers_share_one_port_and_drain_on_sigterm(
    tmp_path: Path,
) -> None:
    workers = 4
    async with echo_pool(tmp_path, workers) as (pool, next_report, _log):
        ready = await reports_until(next_report, workers)
        port = ready[0]["port"]
        conns = []
        served_by: list[int] = []
        # The kernel hashes each connection to one listener; 64 of them miss
        # one of 4 workers with odds of about 4e-8.
        for _ in range(64):
            conn = await trionet.connect_tcp("127.0.0.1", port, framing=trionet.Lines())
            conns.append(conn)
            with trio.fail_after(STEP):
                served_by.append(int(await conn.receive_line()))
        assert set(served_by) == {report["pid"] for report in ready.values()}
        # Every connection works; the last line sent before SIGTERM is echoed
        # before the clean close.
        for i, conn in enumerate(conns):
            await conn.send_line(f"line {i}")
        for i, conn in enumerate(conns):
            with trio.fail_after(STEP):
                assert await conn.receive_line() == f"line {i}".encode()
        pool.send_signal(signal.SIGTERM)
        with trio.fail_after(STEP):
            assert await pool.wait() == 0
        for conn in conns:
            with trio.fail_after(STEP):
                with pytest.raises(trionet.ConnectionClosed) as closed:
                    await conn.receive_line()
            assert closed.value.reason is trionet.CloseReason.CLOSED_BY_PEER
            await conn.aclose()


async def test_workers_stop_when_their_parent_dies(tmp_path: Path) -> None:
    pidfds: list[int] = []
    async with echo_pool(tmp_path, 2) as (pool, next_report, _log):
        try:
            ready = await reports_until(next_report, 2)
            pidfds = [os.pidfd_open(report["pid"]) for report in ready.values()]
            pool.kill()  # the parent only, with no chance to stop its workers
            with trio.fail_after(STEP):
                for fd in pidfds:
                    await trio.lowlevel.wait_readable(fd)  # that worker exited
        finally:
            for fd in pidfds:
                # A worker that outlived the test is ours to stop.
                signal.pidfd_send_signal(fd, signal.SIGKILL)
                os.close(fd)


# ------------------------------------------------------- a pool that heals


async def test_a_killed_or_signalled_worker_is_replaced(tmp_path: Path) -> None:
    async with echo_pool(tmp_path, 2) as (pool, next_report, log):
        first = await reports_until(next_report, 2)
        os.kill(first[0]["pid"], signal.SIGKILL)  # a grandchild of ours, by PID
        replaced = await reports_until(next_report, 1)
        assert replaced[0]["restarts"] == 1
        assert replaced[0]["pid"] != first[0]["pid"]
        # SIGTERM to one worker stops it gracefully; then it is replaced too.
        os.kill(first[1]["pid"], signal.SIGTERM)
        while (report := await next_report()).get("port") is None:
            assert report == {"worker": 1, "pid": first[1]["pid"], "stopped": True}
        assert (report["worker"], report["restarts"]) == (1, 1)
        assert report["pid"] != first[1]["pid"]
        # And again: the backoff doubles within the restart window.
        os.kill(report["pid"], signal.SIGTERM)
        second = await reports_until(next_report, 1)
        assert (second[1]["restarts"], len({second[1]["pid"], report["pid"]})) == (2, 2)
        pool.send_signal(signal.SIGTERM)
        with trio.fail_after(STEP):
            assert await pool.wait() == 0
    text = log.read_text()
    assert (
        f"WARNING worker 0 (pid {first[0]['pid']}) was killed by SIGKILL; "
        "restarting it in 0.5 s" in text
    )
    assert (
        f"WARNING worker 1 (pid {first[1]['pid']}) exited with code 0 after "
        "SIGTERM; restarting it in 0.5 s" in text
    )
    assert (
        f"WARNING worker 1 (pid {report['pid']}) exited with code 0 after "
        "SIGTERM; restarting it in 1.0 s" in text
    )
    assert "ERROR" not in text


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
async def test_a_signal_to_the_whole_process_group_stops_the_pool_cleanly(
    tmp_path: Path, signum: int
) -> None:
    async with echo_pool(tmp_path, 2, new_session=True) as (pool, next_report, log):
        serving = await reports_until(next_report, 2)
        os.killpg(pool.pid, signum)  # the group we made: the pool and its workers
        stopped = set()
        while len(stopped) < 2:
            report = await next_report()
            assert report.get("stopped"), report
            stopped.add(report["worker"])
        with trio.fail_after(STEP):
            assert await pool.wait() == 0
    text = log.read_text()
    assert f"{signal.Signals(signum).name}: stopping 2 workers" in text
    assert "restarting" not in text and "cancelled" not in text, text
    assert all(f"pid {r['pid']}" not in text for r in serving.values())


def test_processes_start_and_join_outside_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from multiprocessing.context import SpawnProcess

    threads: list[str] = []
    for name in ("start", "join"):
        original = getattr(SpawnProcess, name)

        def recording(self: Any, *args: Any, _original: Any = original) -> Any:
            threads.append(threading.current_thread().name)
            return _original(self, *args)

        monkeypatch.setattr(SpawnProcess, name, recording)
    assert trionet.run_workers(report_and_return, 2) == 0
    assert len(threads) == 4
    assert threading.main_thread().name not in threads
