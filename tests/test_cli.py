"""The ``trionet`` command line: echo, load and bench, run as real processes.

Every command runs as ``python -m trionet ...`` in a child process against a
real server on loopback.  Each child has a timeout, and only the children
started here are signalled, by their PID.  The histogram and the argument
parsers are also tested in-process.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio
import trustme
from hypothesis import example, given, settings
from hypothesis import strategies as st

import trionet
from trionet._cli._common import (
    parse_duration,
    parse_host,
    parse_host_port,
    parse_rate,
)
from trionet._cli._histogram import LogLinearHistogram
from trionet._cli._load import LoadSpec, message_maker
from trionet._util import format_address

#: Seconds any one child process may run.
CHILD_TIMEOUT = 30.0
POSIX = sys.platform != "win32"

needs_posix = pytest.mark.skipif(not POSIX, reason="sends POSIX signals")


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "trionet", *args]


def run_sync(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command(*args),
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
        stdin=subprocess.DEVNULL,
        check=False,
    )


async def run_async(*args: str) -> subprocess.CompletedProcess[bytes]:
    """Run ``trionet *args`` while the test's own servers keep running."""
    with trio.fail_after(CHILD_TIMEOUT):
        return await trio.run_process(
            command(*args),
            stdin=b"",
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


_serial = itertools.count()


@attrs.define
class EchoProcess:
    process: trio.Process
    port: int
    first_line: str
    stderr_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    async def stop(self, signum: int = signal.SIGINT, *, group: bool = False) -> int:
        """Signal the child we started (with ``group``: its whole process
        group, as a terminal or systemd does) and wait for it to exit."""
        if group:
            os.killpg(self.process.pid, signum)  # started with new_session
        else:
            self.process.send_signal(signum)
        with trio.fail_after(CHILD_TIMEOUT):
            return await self.process.wait()


@asynccontextmanager
async def echo_server(
    tmp_path: Path, *args: str, new_session: bool = False, unix: str | None = None
) -> AsyncIterator[EchoProcess]:
    """``trionet echo --port 0 *args`` (with ``unix``: ``--unix PATH``) in a
    child (in a process group of its own with ``new_session``); stopped
    (killed if need be).  Its ``port`` is 0 on a UNIX socket."""
    stderr_path = tmp_path / f"echo-{next(_serial)}.err"
    listen = ["--port", "0"] if unix is None else ["--unix", unix]
    with stderr_path.open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            command("echo", *listen, *args),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            start_new_session=new_session,
        )
    assert process.stdout is not None
    try:
        output = b""
        with trio.fail_after(CHILD_TIMEOUT):
            while b"\n" not in output:
                chunk = await process.stdout.receive_some()
                assert chunk, f"echo exited early: {stderr_path.read_text()}"
                output += chunk
        line = output.decode().splitlines()[0]
        if unix is not None:
            assert line.startswith(f"listening on {unix} ("), line
            yield EchoProcess(process, 0, line, stderr_path)
            return
        match = re.match(r"listening on (?:127\.0\.0\.1|\[::1\]):(\d+) \(", line)
        assert match, line
        yield EchoProcess(process, int(match.group(1)), line, stderr_path)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT if POSIX else signal.SIGTERM)
            with trio.move_on_after(CHILD_TIMEOUT):
                await process.wait()
            if process.poll() is None:  # pragma: no cover - only if it hangs
                process.kill()
                await process.wait()
        await process.stdout.aclose()


async def read_until_closed(conn: trionet.Connection) -> None:
    """Read and drop whatever comes until the server closes ``conn``."""
    with trio.fail_after(CHILD_TIMEOUT):
        try:
            while await conn.receive_some():
                pass
        except trionet.ConnectionClosed:
            pass


def load_json(result: subprocess.CompletedProcess[bytes]) -> dict[str, object]:
    """The one JSON object ``load --json`` printed (and nothing else on stdout)."""
    text = result.stdout.decode()
    assert text.count("\n") == 1, text
    data = json.loads(text)
    assert isinstance(data, dict)
    return data


def check_percentiles(report: dict[str, object]) -> None:
    latency = report["latency_us"]
    assert isinstance(latency, dict)
    assert set(latency) == {"p50", "p90", "p99", "max"}
    assert 0 <= latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]


# ------------------------------------------------------- echo + load, whole


@pytest.mark.parametrize(
    ("framing", "pipeline", "size"),
    [("line", 1, 100), ("line", 8, 1000), ("frame", 4, 3000), ("frame", 1, 1)],
)
async def test_echo_and_load_end_to_end(
    tmp_path: Path, framing: str, pipeline: int, size: int
) -> None:
    async with echo_server(tmp_path, "--framing", framing) as echo:
        assert f"{framing} framing" in echo.first_line
        result = await run_async(
            "load",
            f"127.0.0.1:{echo.port}",
            "--connections",
            "5",
            "--messages",
            "503",
            "--size",
            str(size),
            "--framing",
            framing,
            "--pipeline",
            str(pipeline),
            "--json",
        )
        assert result.returncode == 0, result.stderr
        report = load_json(result)
        assert await echo.stop() == 0
    assert report["target"] == f"127.0.0.1:{echo.port}"
    assert report["transport"] == "tcp"
    assert report["connections"] == 5
    assert report["messages"] == 503
    assert report["errors"] == {}
    assert report["framing"] == framing
    assert report["size"] == size
    assert report["pipeline"] == pipeline
    elapsed = report["elapsed_s"]
    assert isinstance(elapsed, float)
    assert elapsed > 0
    rate = report["messages_per_s"]
    assert isinstance(rate, float)
    assert rate == pytest.approx(503 / elapsed, rel=0.01)
    assert report["mb_per_s"] == pytest.approx(rate * size / 1e6, abs=0.002)
    check_percentiles(report)
    # The server saw every connection end cleanly.
    assert "5 connections served (CLOSED_BY_PEER 5)" in echo.stderr()


async def test_echo_and_load_over_a_unix_socket(tmp_path: Path, unix_path: str) -> None:
    async with echo_server(tmp_path, "--verbose", unix=unix_path) as echo:
        assert echo.first_line == f"listening on {unix_path} (unix, line framing)"
        result = await run_async(
            "load", "--unix", unix_path, "-c", "3", "-n", "90", "-p", "4", "--json"
        )
        assert result.returncode == 0, result.stderr
        report = load_json(result)
        table = await run_async("load", "--unix", unix_path, "-c", "1", "-n", "5")
        assert await echo.stop() == 0
    assert report["target"] == unix_path
    assert report["transport"] == "unix"
    assert report["messages"] == 90
    assert report["errors"] == {}
    assert f"trionet load {unix_path}: unix, line framing" in table.stdout.decode()
    log = echo.stderr()
    assert "4 connections served (CLOSED_BY_PEER 4)" in log
    # A UNIX client has no address worth printing: its process and user.
    assert re.search(rf"connect pid \d+ uid {os.geteuid()}", log), log
    assert not await trio.Path(unix_path).exists()  # removed at shutdown


async def test_load_prints_a_table_without_json(tmp_path: Path) -> None:
    async with echo_server(tmp_path) as echo:
        result = await run_async(
            "load", f"127.0.0.1:{echo.port}", "-c", "3", "-n", "30"
        )
    assert result.returncode == 0, result.stderr
    out = result.stdout.decode()
    assert "3 connections, 64 B messages, pipeline 1" in out
    assert re.search(r"messages\s+30 in \d+\.\d\d s", out)
    assert re.search(r"latency \(us\)\s+p50 [\d,]+\s+p90 [\d,]+\s+p99", out)
    assert re.search(r"errors\s+none", out)
    assert result.stderr == b""  # no progress lines when stderr is not a terminal


async def test_load_runs_for_a_duration(tmp_path: Path) -> None:
    async with echo_server(tmp_path) as echo:
        result = await run_async(
            "load", f"127.0.0.1:{echo.port}", "-c", "2", "--duration", "300ms", "--json"
        )
    assert result.returncode == 0, result.stderr
    report = load_json(result)
    assert report["errors"] == {}
    messages = report["messages"]
    assert isinstance(messages, int)
    assert messages > 0
    # Senders stop at the deadline, then collect their last echoes.
    elapsed = report["elapsed_s"]
    assert isinstance(elapsed, float)
    assert elapsed >= 0.3


async def test_load_rate_limit_spaces_the_messages(tmp_path: Path) -> None:
    async with echo_server(tmp_path) as echo:
        result = await run_async(
            "load",
            f"127.0.0.1:{echo.port}",
            "-c",
            "4",
            "-n",
            "21",
            "--rate",
            "200/s",
            "--json",
        )
    assert result.returncode == 0, result.stderr
    report = load_json(result)
    assert report["messages"] == 21
    # 21 sends 1/200 s apart: the last cannot leave before 20/200 s.
    elapsed = report["elapsed_s"]
    assert isinstance(elapsed, float)
    assert elapsed >= 0.1


async def test_udp_echo_and_load(tmp_path: Path) -> None:
    async with echo_server(tmp_path, "--udp") as echo:
        assert "(udp)" in echo.first_line
        result = await run_async(
            "load",
            f"127.0.0.1:{echo.port}",
            "--udp",
            "-c",
            "3",
            "-n",
            "150",
            "--size",
            "200",
            "-p",
            "2",
            "--json",
        )
        assert result.returncode == 0, result.stderr
        assert await echo.stop() == 0
    report = load_json(result)
    assert report["transport"] == "udp"
    assert report["framing"] == "datagram"
    assert report["messages"] == 150
    assert report["errors"] == {}
    check_percentiles(report)
    assert "stopped: 3 peers, 151 datagrams received, 0 dropped" in echo.stderr()


async def test_raw_echo(tmp_path: Path) -> None:
    async with echo_server(tmp_path, "--framing", "raw") as echo:
        async with trionet.connect_tcp("127.0.0.1", echo.port) as conn:
            payload = bytes(range(256)) * 40
            await conn.send_all(payload)
            assert await conn.receive_exactly(len(payload)) == payload


@pytest.fixture
def tls_pem(tmp_path: Path, ca: trustme.CA) -> Path:
    """A key and certificate for 127.0.0.1 in one PEM file, issued by ``ca``."""
    pem = tmp_path / "server.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pem))
    return pem


async def test_tls_echo(
    tmp_path: Path, tls_pem: Path, client_context: ssl.SSLContext
) -> None:
    tls = ("--tls-cert", str(tls_pem), "--tls-key", str(tls_pem))
    async with echo_server(tmp_path, *tls) as echo:
        assert "(tls, line framing)" in echo.first_line
        async with trionet.connect_tcp(
            "127.0.0.1", echo.port, framing=trionet.Lines(), ssl_context=client_context
        ) as conn:
            await conn.send(b"over tls")
            assert await conn.receive() == b"over tls"
        assert await echo.stop() == 0


def summary_counts(log: str) -> tuple[int, dict[str, int], int]:
    """The total, the counts by close reason and the served count of ``stopped:``."""
    match = re.search(
        r"^stopped: (\d+) connections(?: served)? \(([^)]*)\)(.*)$", log, re.M
    )
    assert match, log
    parts = {}
    for part in match.group(2).split(", "):
        name, count = part.split()
        parts[name] = int(count)
    total = int(match.group(1))
    served = re.search(r"(\d+) served", match.group(3))
    return total, parts, int(served.group(1)) if served else total


async def test_tls_echo_summary_adds_up(
    tmp_path: Path, tls_pem: Path, client_context: ssl.SSLContext
) -> None:
    tls = ("--tls-cert", str(tls_pem), "--tls-key", str(tls_pem))
    async with echo_server(tmp_path, *tls) as echo:
        for _ in range(2):  # plain text at a TLS server: the handshake fails
            async with trionet.connect_tcp("127.0.0.1", echo.port) as plain:
                await plain.send_all(b"GET / HTTP/1.0\r\n\r\n")
                await read_until_closed(plain)
        async with trionet.connect_tcp(
            "127.0.0.1", echo.port, framing=trionet.Lines(), ssl_context=client_context
        ) as conn:
            await conn.send(b"over tls")
            assert await conn.receive() == b"over tls"
        assert await echo.stop() == 0
    log = echo.stderr()
    total, parts, served = summary_counts(log)
    assert sum(parts.values()) == total == 3, log
    assert served == 1, log
    assert parts == {"CLOSED_BY_PEER": 1, "ERROR": 2}, log
    assert "stopped: 3 connections (CLOSED_BY_PEER 1, ERROR 2): 1 served, " in log


def test_echo_summary_parts_add_up_with_open_connections_and_workers() -> None:
    from trionet._cli._echo import _summary

    one = {"accepted": 2, "open": 1, "closed": {"CLOSED_BY_PEER": 1, "ERROR": 1}}
    other = {"accepted": 3, "open": 0, "closed": {"CLOSED_BY_PEER": 3}}
    line = _summary([one, other], workers=2)
    total, parts, served = summary_counts(line)
    assert (total, served) == (6, 5)
    assert parts == {"CLOSED_BY_PEER": 4, "ERROR": 1, "open": 1}
    assert " by 2 workers (3 + 3): 5 served, 1 closed before" in line
    assert _summary([other]) == "stopped: 3 connections served (CLOSED_BY_PEER 3)"


def ipv6_loopback() -> bool:
    """Whether ::1 can be bound here (not in every container)."""
    if not socket.has_ipv6:  # pragma: no cover
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:  # pragma: no cover
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback")


@needs_ipv6
@pytest.mark.parametrize("host", ["::1", "[::1]"])
async def test_ipv6_addresses_print_in_brackets(tmp_path: Path, host: str) -> None:
    async with echo_server(tmp_path, "--host", host, "--verbose") as echo:
        assert echo.first_line.startswith(f"listening on [::1]:{echo.port} (")
        result = await run_async(
            "load", f"[::1]:{echo.port}", "-c", "2", "-n", "10", "--json"
        )
        assert result.returncode == 0, result.stderr
        table = await run_async("load", f"[::1]:{echo.port}", "-c", "1", "-n", "5")
        assert table.returncode == 0, table.stderr
        assert await echo.stop() == 0
    assert load_json(result)["target"] == f"[::1]:{echo.port}"
    assert table.stdout.decode().startswith(f"trionet load [::1]:{echo.port}: tcp")
    log = echo.stderr()
    assert re.search(r"^connect \[::1\]:\d+$", log, re.MULTILINE), log
    assert re.search(r"^close \[::1\]:\d+: CLOSED_BY_PEER", log, re.MULTILINE), log


@needs_ipv6
def test_ipv6_addresses_in_errors_are_bracketed() -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as busy:
        busy.bind(("::1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        listen = run_sync("echo", "--host", "::1", "--port", str(port))
    assert_one_line_error(listen, 1, f"cannot listen on [::1]:{port}: ")
    connect = run_sync("load", f"[::1]:{port}", "-c", "1")
    assert_one_line_error(connect, 1, f"cannot connect to [::1]:{port}: ")


# ------------------------------------------------------ signals, shutdown


@needs_posix
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_signal_shuts_echo_down_gracefully(tmp_path: Path, signum: int) -> None:
    async with echo_server(tmp_path, "--verbose", "--grace-period", "0.2") as echo:
        conn = await trionet.connect_tcp(
            "127.0.0.1", echo.port, framing=trionet.Lines()
        )
        async with conn:
            await conn.send(b"before")
            assert await conn.receive() == b"before"
            echo.process.send_signal(signum)
            # A clean end of stream: no reset, nothing cut in half.
            with trio.fail_after(CHILD_TIMEOUT):
                with pytest.raises(trionet.ConnectionClosed) as info:
                    await conn.receive()
            assert type(info.value) is trionet.ConnectionClosed
            assert info.value.reason is trionet.CloseReason.CLOSED_BY_PEER
        with trio.fail_after(CHILD_TIMEOUT):
            code = await echo.process.wait()
        assert code == 0
        log = echo.stderr()
    name = signal.Signals(signum).name
    assert f"{name}: shutting down (grace period 0.2 s)" in log
    assert re.search(r"connect 127\.0\.0\.1:\d+\n", log)
    assert re.search(r"close 127\.0\.0\.1:\d+: SHUTDOWN \(7 B in, 7 B out\)", log)
    assert "stopped: 1 connections served (SHUTDOWN 1)" in log
    assert "Traceback" not in log


# ------------------------------------------------------------ --workers

needs_reuse_port = pytest.mark.skipif(
    not hasattr(socket, "SO_REUSEPORT"), reason="needs SO_REUSEPORT"
)


def worker_shares(log: str) -> list[int]:
    """The per-worker counts in the ``stopped: ... by N workers (a + b)`` line."""
    match = re.search(r"by \d+ workers \(([\d +]+)\)", log)
    assert match, log
    return [int(n) for n in match.group(1).split(" + ")]


@needs_posix
@needs_reuse_port
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
@pytest.mark.parametrize("group", [False, True], ids=["parent", "group"])
async def test_echo_workers_share_the_port_and_stop_together(
    tmp_path: Path, signum: int, group: bool
) -> None:
    async with echo_server(tmp_path, "--workers", "2", new_session=group) as echo:
        assert echo.first_line.endswith("(tcp, line framing, 2 workers)")
        result = await run_async(
            "load", f"127.0.0.1:{echo.port}", "-c", "24", "-n", "240", "--json"
        )
        assert result.returncode == 0, result.stderr
        assert load_json(result)["errors"] == {}
        # To the parent alone, it forwards the stop to the workers; to the
        # whole group (Ctrl-C in a terminal, systemd, docker), every worker
        # gets it too, and that is still one stop request.
        assert await echo.stop(signum, group=group) == 0
    log = echo.stderr()
    assert f"{signal.Signals(signum).name}: stopping 2 workers" in log
    assert "cancelled" not in log and "restarting" not in log, log
    assert "stopped: 24 connections served (CLOSED_BY_PEER 24) by 2 workers" in log
    shares = worker_shares(log)
    # The kernel spread the 24 connections: each worker served some.
    assert len(shares) == 2 and sum(shares) == 24 and min(shares) > 0, log
    assert "Traceback" not in log


@needs_posix
@needs_reuse_port
async def test_echo_workers_drain_open_connections(tmp_path: Path) -> None:
    args = ("--workers", "2", "--grace-period", "0.2", "--framing", "frame")
    async with echo_server(tmp_path, *args) as echo:
        conns = [
            await trionet.connect_tcp("127.0.0.1", echo.port, framing=trionet.Frames())
            for _ in range(8)
        ]
        for i, conn in enumerate(conns):
            await conn.send(b"%d" % i)
            assert await conn.receive() == b"%d" % i
        echo.process.send_signal(signal.SIGINT)
        # Every connection ends cleanly once the grace period is over.
        with trio.fail_after(CHILD_TIMEOUT):
            for conn in conns:
                with pytest.raises(trionet.ConnectionClosed) as info:
                    await conn.receive()
                assert info.value.reason is trionet.CloseReason.CLOSED_BY_PEER
                await conn.aclose()
            assert await echo.process.wait() == 0
    log = echo.stderr()
    assert "stopped: 8 connections served (SHUTDOWN 8) by 2 workers" in log
    assert sum(worker_shares(log)) == 8


@needs_posix
@needs_reuse_port
async def test_udp_echo_workers(tmp_path: Path) -> None:
    async with echo_server(tmp_path, "--udp", "--workers", "2") as echo:
        assert echo.first_line.endswith("(udp, 2 workers)")
        result = await run_async(
            "load", f"127.0.0.1:{echo.port}", "--udp", "-c", "16", "-n", "160", "--json"
        )
        assert result.returncode == 0, result.stderr
        assert load_json(result)["messages"] == 160
        assert await echo.stop() == 0
    log = echo.stderr()
    assert "stopped: 16 peers, " in log
    shares = worker_shares(log)
    assert sum(shares) == 16 and min(shares) > 0, log


@needs_reuse_port
def test_echo_workers_on_a_port_in_use_fail_at_once() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_sync("echo", "--workers", "3", "--port", str(port))
    assert_one_line_error(result, 1, f"cannot listen on 127.0.0.1:{port}: ")


async def test_a_worker_that_cannot_listen_reports_the_error() -> None:
    from trionet._cli import _echo

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        options = _echo._Options(
            host="127.0.0.1",
            port=port,
            udp=False,
            framing_name="line",
            tls_cert=None,
            tls_key=None,
            grace_period=0.0,
            verbose=False,
        )
        worker = trionet.Worker()
        # Returns (so the pool does not restart it) with the error for the parent.
        await _echo._worker_main(worker, options, port)
    assert worker.last_report is not None
    assert f"cannot listen on 127.0.0.1:{port}: " in worker.last_report["error"]


def test_a_replaced_worker_counts_toward_its_slot() -> None:
    from trionet._cli import _echo

    view = _echo._PoolView(2, [])
    for index, accepted, reason in ((0, 3, "CLOSED_BY_PEER"), (1, 2, "SHUTDOWN")):
        view.on_report(
            index, {"stopped": {"accepted": accepted, "closed": {reason: accepted}}}
        )
    # Worker 0 was replaced; its successor reports at the end.
    view.on_report(0, {"stopped": {"accepted": 4, "closed": {"SHUTDOWN": 4}}})
    assert _echo._summary([view.stopped[i] for i in sorted(view.stopped)], 2) == (
        "stopped: 9 connections served (CLOSED_BY_PEER 3, SHUTDOWN 6) "
        "by 2 workers (7 + 2)"
    )


@needs_posix
async def test_the_parent_stops_the_pool_on_a_worker_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from trionet._cli import _echo

    reserved = socket.socket()
    view = _echo._PoolView(2, [reserved])
    view.on_report(0, {"listening": "127.0.0.1:9", "what": "tcp, line framing"})
    assert reserved.fileno() == -1  # the port is held by a worker now
    assert capsys.readouterr().out == ""  # not every worker serves yet
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        # run_workers stops every worker on this process's own SIGTERM.
        view.on_report(1, {"error": "cannot listen on 127.0.0.1:9: boom"})
        with trio.fail_after(CHILD_TIMEOUT):
            async for signum in signals:
                assert signum == signal.SIGTERM
                break
    assert view.error == "cannot listen on 127.0.0.1:9: boom"


@needs_posix
async def test_second_signal_cuts_the_grace_period_short() -> None:
    process = await trio.lowlevel.open_process(
        command("echo", "--port", "0", "--grace-period", "60"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None

    async def read_until(stream: trio.abc.ReceiveStream, marker: bytes) -> bytes:
        data = b""
        while marker not in data:
            chunk = await stream.receive_some()
            assert chunk, data
            data += chunk
        return data

    try:
        with trio.fail_after(CHILD_TIMEOUT):
            line = await read_until(process.stdout, b"\n")
            match = re.search(rb":(\d+) \(", line)
            assert match
            async with trionet.connect_tcp(
                "127.0.0.1", int(match.group(1)), framing=trionet.Lines()
            ) as conn:
                await conn.send(b"hi")
                assert await conn.receive() == b"hi"
                process.send_signal(signal.SIGINT)
                # The idle client keeps the server in its 60 s grace period.
                await read_until(process.stderr, b"shutting down")
                process.send_signal(signal.SIGINT)
                assert await process.wait() == 130
                with pytest.raises(trionet.ConnectionClosed):
                    await conn.receive()
            rest = b""
            while chunk := await process.stderr.receive_some():
                rest += chunk
        assert b"SIGINT again: stopping now" in rest
        assert b"Traceback" not in rest
    finally:
        if process.poll() is None:  # pragma: no cover - only if it hangs
            process.kill()
            await process.wait()
        await process.stdout.aclose()
        await process.stderr.aclose()


@needs_posix
async def test_signal_with_no_clients_exits_at_once(tmp_path: Path) -> None:
    async with echo_server(tmp_path) as echo:
        assert await echo.stop(signal.SIGINT) == 0
        assert "stopped: 0 connections served" in echo.stderr()


@needs_posix
async def test_echo_verbose_logs_close_reasons(tmp_path: Path) -> None:
    async with echo_server(tmp_path, "--verbose") as echo:
        async with trionet.connect_tcp(
            "127.0.0.1", echo.port, framing=trionet.Lines()
        ) as conn:
            await conn.send(b"x")
            assert await conn.receive() == b"x"
        # Over the line limit: the server closes it as PROTOCOL_ERROR.
        async with trionet.connect_tcp("127.0.0.1", echo.port) as conn:
            await conn.send_all(b"y" * 70_000)
            await read_until_closed(conn)
        assert await echo.stop() == 0
    log = echo.stderr()
    assert re.search(r"close 127\.0\.0\.1:\d+: CLOSED_BY_PEER \(2 B in, 2 B out\)", log)
    assert re.search(r"close 127\.0\.0\.1:\d+: PROTOCOL_ERROR", log)
    assert "Traceback" not in log


# ------------------------------------------- errors seen during a load run


async def test_load_groups_errors_by_close_reason() -> None:
    async def three_then_close(conn: trionet.Connection) -> None:
        for _ in range(3):
            await conn.send(await conn.receive())
        await conn.receive()  # read the fourth, so closing sends FIN, not RST

    async with trionet.open_tcp_server(
        three_then_close, framing=trionet.Lines()
    ) as server:
        result = await run_async(
            "load", f"127.0.0.1:{server.port}", "-c", "2", "-n", "100", "--json"
        )
    assert result.returncode == 1
    report = load_json(result)
    assert report["messages"] == 6
    assert report["errors"] == {"CLOSED_BY_PEER": 2}


async def test_load_detects_a_wrong_echo() -> None:
    async def corrupt(conn: trionet.Connection) -> None:
        async for message in conn:
            await conn.send(message[::-1])

    async with trionet.open_tcp_server(corrupt, framing=trionet.Frames()) as server:
        result = await run_async(
            "load",
            f"127.0.0.1:{server.port}",
            "-c",
            "3",
            "-n",
            "30",
            "--framing",
            "frame",
            "-p",
            "4",
            "--json",
        )
    assert result.returncode == 1
    report = load_json(result)
    assert report["messages"] == 0
    assert report["errors"] == {"mismatch": 3}
    latency = report["latency_us"]
    assert latency == {"p50": None, "p90": None, "p99": None, "max": None}


async def test_load_detects_reordered_echoes() -> None:
    async def swap_pairs(conn: trionet.Connection) -> None:
        while True:
            first, second = await conn.receive(), await conn.receive()
            await conn.send(second)
            await conn.send(first)

    async with trionet.open_tcp_server(swap_pairs, framing=trionet.Lines()) as server:
        result = await run_async(
            "load",
            f"127.0.0.1:{server.port}",
            "-c",
            "1",
            "-n",
            "10",
            "-p",
            "2",
            "--json",
        )
    assert result.returncode == 1
    assert load_json(result)["errors"] == {"mismatch": 1}


async def silent(conn: trionet.Connection) -> None:
    """A server handler that reads every message and answers none."""
    async for _ in conn:
        pass


async def test_load_per_message_timeout() -> None:
    async with trionet.open_tcp_server(silent, framing=trionet.Lines()) as server:
        result = await run_async(
            "load",
            f"127.0.0.1:{server.port}",
            "-c",
            "2",
            "-n",
            "10",
            "--timeout",
            "0.2",
            "--json",
        )
    assert result.returncode == 1
    report = load_json(result)
    assert report["messages"] == 0
    assert report["errors"] == {"TIMEOUT": 2}


async def test_load_hard_time_limit_ends_a_stuck_run() -> None:
    async with trionet.open_tcp_server(silent, framing=trionet.Lines()) as server:
        result = await run_async(
            "load",
            f"127.0.0.1:{server.port}",
            "-c",
            "3",
            "-p",
            "5",
            "--duration",
            "1h",
            "--time-limit",
            "0.3",
            "--json",
        )
    assert result.returncode == 1
    report = load_json(result)
    assert report["messages"] == 0
    assert report["errors"] == {"time_limit": 3}


@needs_posix
@pytest.mark.parametrize("as_json", [True, False])
async def test_ctrl_c_during_load_prints_the_results_so_far(
    tmp_path: Path, as_json: bool
) -> None:
    echoed = 0
    enough = trio.Event()

    async def counting_echo(conn: trionet.Connection) -> None:
        nonlocal echoed
        async for message in conn:
            await conn.send(message)
            echoed += 1
            if echoed == 200:
                enough.set()

    out, err = tmp_path / "load.out", tmp_path / "load.err"
    args = ["-c", "2", "--duration", "1h"] + (["--json"] if as_json else [])
    async with trionet.open_tcp_server(
        counting_echo, framing=trionet.Lines()
    ) as server:
        with out.open("wb") as stdout, err.open("wb") as stderr:
            process = await trio.lowlevel.open_process(
                command("load", f"127.0.0.1:{server.port}", *args),
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
            )
        try:
            with trio.fail_after(CHILD_TIMEOUT):
                await enough.wait()  # the load is under way
                os.kill(process.pid, signal.SIGINT)
                code = await process.wait()
        finally:
            if process.poll() is None:  # pragma: no cover - only if it hangs
                process.kill()
                await process.wait()
    assert code == 130, err.read_text()
    assert err.read_text() == "trionet load: interrupted: the results so far\n"
    if as_json:
        report = load_json(subprocess.CompletedProcess([], code, out.read_bytes(), b""))
        assert report["interrupted"] is True
        messages = report["messages"]
        assert report["errors"] == {}
        check_percentiles(report)
    else:
        text = out.read_text()
        assert text.startswith(f"trionet load 127.0.0.1:{server.port}: tcp")
        assert re.search(r"^interrupted\s+after [\d.]+ s of 3600 s$", text, re.M), text
        found = re.search(r"^messages\s+([\d,]+) in", text, re.MULTILINE)
        assert found, text
        messages = int(found.group(1).replace(",", ""))
        assert re.search(r"errors\s+none", text)
    # Ping-pong: the server saw message n + 1 only after the client counted n.
    assert isinstance(messages, int)
    assert messages >= 200 - 2


async def test_a_load_stopped_while_connecting_reports_nothing_done() -> None:
    from trionet._cli._load import run_load

    async with trionet.open_tcp_server(silent, framing=trionet.Lines()) as server:
        stop = trio.Event()
        stop.set()
        spec = LoadSpec(host="127.0.0.1", port=server.port, connections=3)
        result = await run_load(spec, stop=stop)
    assert result.interrupted
    assert (result.messages, result.errors, result.elapsed) == (0, {}, 0)


async def test_an_uninterrupted_load_says_so_in_json(tmp_path: Path) -> None:
    async with echo_server(tmp_path) as echo:
        result = await run_async(
            "load", f"127.0.0.1:{echo.port}", "-c", "1", "-n", "3", "--json"
        )
    assert load_json(result)["interrupted"] is False


async def test_udp_load_counts_lost_datagrams_instead_of_hanging() -> None:
    async def drop_odd(peer: trionet.UdpPeer) -> None:
        async for data in peer:
            try:
                seq = int(data, 16)
            except ValueError:  # the probe
                await peer.send(data)
                continue
            if seq % 2 == 0:
                await peer.send(data)

    async with trionet.open_udp_server(drop_odd) as server:
        result = await run_async(
            "load",
            f"127.0.0.1:{server.port}",
            "--udp",
            "-c",
            "1",
            "-n",
            "8",
            "--size",
            "16",
            "--timeout",
            "0.1",
            "--json",
        )
    assert result.returncode == 1
    report = load_json(result)
    assert report["messages"] == 4
    assert report["errors"] == {"lost": 4}


# ------------------------------------------------------------- bad input


def assert_one_line_error(
    result: subprocess.CompletedProcess[str], code: int, *needles: str
) -> None:
    assert result.returncode == code, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "error: " in lines[0]
    for needle in needles:
        assert needle in lines[0]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        ((), ["choose a command"]),
        (("nonsense",), ["invalid choice: 'nonsense'"]),
        (("echo", "--framing", "xml"), ["--framing", "invalid choice: 'xml'"]),
        (("load", "127.0.0.1:9", "--framing", "raw"), ["invalid choice: 'raw'"]),
        (("load", "localhost"), ["malformed address 'localhost'", "HOST:PORT"]),
        (("load", "127.0.0.1:"), ["malformed address", "port"]),
        (("load", "127.0.0.1:70000"), ["malformed address", "1..65535"]),
        (("load", ":80"), ["malformed address ':80': no host"]),
        (("load", "::1:80"), ["IPv6 address in brackets"]),
        (("load", "[::1:80"), ["[IPV6]:PORT"]),
        (("load", "127.0.0.1:9", "--size", "0"), ["--size", "at least 1"]),
        (("load", "127.0.0.1:9", "--size", "65537"), ["65536", "Lines().max_length"]),
        (
            ("load", "127.0.0.1:9", "--framing", "frame", "--size", "16777217"),
            ["16777216", "Frames().max_size"],
        ),
        (("load", "127.0.0.1:9", "--udp", "--size", "65508"), ["65507"]),
        (("load", "127.0.0.1:9", "--messages", "0"), ["at least 1"]),
        (("load", "127.0.0.1:9", "-n", "5", "-d", "1s"), ["not allowed with"]),
        (("load", "127.0.0.1:9", "--duration", "soon"), ["not a duration"]),
        (("load", "127.0.0.1:9", "--rate", "fast"), ["not a rate"]),
        (("load", "127.0.0.1:9", "--pipeline", "-1"), ["--pipeline"]),
        (("load", "127.0.0.1:9", "--udp", "--framing", "line"), ["--udp"]),
        (("load", "127.0.0.1:9", "-d", "-5s"), ["duration must be positive: -5s"]),
        (("load", "127.0.0.1:9", "--duration", "-5"), ["must be positive: -5"]),
        (("load", "127.0.0.1:9", "-d", "0ms"), ["duration must be positive: 0ms"]),
        (("load", "127.0.0.1:9", "-d", "-.5s"), ["must be positive: -.5s"]),
        (("load", "127.0.0.1:9", "--rate", "-5/s"), ["rate must be positive: -5/s"]),
        (("load", "127.0.0.1:9", "--rate", "0"), ["rate must be positive: 0"]),
        (("load", "127.0.0.1:9", "--timeout", "-1"), ["--timeout", "above 0"]),
        (("load", "127.0.0.1:9", "--time-limit", "-2.5"), ["above 0, not -2.5"]),
        (("load", "127.0.0.1:9", "-c", "-3"), ["--connections", "at least 1"]),
        (("echo", "--grace-period", "-1"), ["--grace-period", "0 or more"]),
        (("echo", "--host", "[::1"), ["malformed host '[::1'"]),
        (("load", "127.0.0.1:9", "-d"), ["expected one argument"]),
        (("load", "127.0.0.1:9", "-d", "--json"), ["expected one argument"]),
        (("echo", "--port", "99999"), ["0..65535"]),
        (("echo", "--tls-cert", "c.pem"), ["--tls-cert and --tls-key go together"]),
        (("echo", "--udp", "--framing", "line"), ["--framing does not apply"]),
        (("echo", "--unix", "e.sock", "--port", "5"), ["--unix replaces --host"]),
        (("echo", "--unix", "e.sock", "--host", "::1"), ["--unix replaces --host"]),
        (("echo", "--unix", "e.sock", "--udp"), ["--unix does not apply to --udp"]),
        (("echo", "--unix", "e.sock", "--workers", "2"), ["--workers does not apply"]),
        (("load",), ["HOST:PORT or as --unix PATH"]),
        (("load", "127.0.0.1:9", "--unix", "e.sock"), ["HOST:PORT or as --unix"]),
        (("load", "--unix", "e.sock", "--udp"), ["--udp does not apply to --unix"]),
    ],
)
def test_bad_input_is_a_one_line_usage_error(
    args: Sequence[str], needles: list[str]
) -> None:
    assert_one_line_error(run_sync(*args), 2, *needles)


@pytest.mark.parametrize(
    ("args", "prog"),
    [
        (("bench", "--bogus"), "trionet bench"),
        (("echo", "--port", "0", "extra"), "trionet echo"),
        (("load", "127.0.0.1:9", "--bogus"), "trionet load"),
        (("--bogus",), "trionet"),
        (("--bogus", "bench"), "trionet"),
    ],
)
def test_unrecognized_arguments_name_the_subcommand(
    args: Sequence[str], prog: str
) -> None:
    result = run_sync(*args)
    extra = "--bogus" if "--bogus" in args else args[-1]
    assert_one_line_error(result, 2)
    assert result.stderr == (
        f"{prog}: error: unrecognized arguments: {extra} (see '{prog} --help')\n"
    )


@pytest.mark.skipif(not POSIX, reason="needs RLIMIT_NOFILE")
def test_too_many_connections_states_the_limit() -> None:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:  # pragma: no cover
        pytest.skip("no open-file limit")
    result = run_sync("load", "127.0.0.1:9", "--connections", str(soft + 1))
    assert_one_line_error(result, 2, f"the limit is {soft}", "ulimit -n")


def test_nothing_listening_is_a_runtime_error() -> None:
    port = free_port()
    result = run_sync("load", f"127.0.0.1:{port}", "-c", "3")
    assert_one_line_error(
        result, 1, f"cannot connect to 127.0.0.1:{port}", "Connection refused"
    )


def test_nothing_echoing_udp_is_a_runtime_error() -> None:
    port = free_port(socket.SOCK_DGRAM)
    result = run_sync("load", f"127.0.0.1:{port}", "--udp", "--timeout", "0.5")
    assert_one_line_error(result, 1, f"no UDP echo from 127.0.0.1:{port}")


def test_unknown_host_is_a_runtime_error() -> None:
    result = run_sync("load", "no-such-host.invalid:80", "-c", "1")
    assert_one_line_error(result, 1, "cannot connect to no-such-host.invalid:80")


def test_missing_tls_files_are_a_runtime_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pem")
    result = run_sync("echo", "--tls-cert", missing, "--tls-key", missing)
    assert_one_line_error(result, 1, "cannot load the TLS certificate", missing)


def test_a_missing_or_busy_unix_path_is_a_runtime_error(unix_path: str) -> None:
    result = run_sync("load", "--unix", unix_path, "-n", "1")
    assert_one_line_error(
        result, 1, f"cannot connect to {unix_path}: No such file or directory"
    )
    with open(unix_path, "w"):
        pass  # a file that is not a socket
    result = run_sync("echo", "--unix", unix_path)
    assert_one_line_error(result, 1, f"cannot listen on {unix_path}", "not a socket")


def test_port_in_use_is_a_runtime_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_sync("echo", "--port", str(port))
    assert_one_line_error(result, 1, f"cannot listen on 127.0.0.1:{port}: ")


def test_help_and_version() -> None:
    result = run_sync("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"trionet {trionet.__version__}"
    for sub in ("echo", "load", "bench"):
        result = run_sync(sub, "--help")
        assert result.returncode == 0
        assert f"usage: trionet {sub}" in result.stdout


# ------------------------------------------------------------------ bench


def test_bench_quick_prints_one_table() -> None:
    result = run_sync("bench", "--quick")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "trionet bench (loopback)"
    assert lines[1].split() == [
        "framing", "conns", "pipeline", "size", "messages", "msg/s", "MB/s",
        "p50", "us", "p90", "us", "p99", "us", "max", "us", "errors",
    ]  # fmt: skip
    rows = [line.split() for line in lines[3:]]
    assert len(rows) == 12
    seen = set()
    for row in rows:
        framing, conns, pipeline = row[0], row[1], row[2]
        size = " ".join(row[3:5])
        seen.add((framing, conns, pipeline, size))
        assert row[-1] == "0"  # no errors
    assert {s[0] for s in seen} == {"line", "frame"}
    assert {s[1] for s in seen} == {"1", "50"}
    assert {s[2] for s in seen} >= {"1", "64"}
    assert {s[3] for s in seen} == {"64 B", "64 KiB"}
    assert "Traceback" not in result.stderr


# -------------------------------------------------- rich is optional


async def test_commands_work_without_rich(tmp_path: Path) -> None:
    """With rich unimportable (as without the ``cli`` extra) output is plain."""
    script = (
        "import sys; sys.modules['rich'] = None  # any import of rich fails\n"
        "from trionet._cli import main\n"
        "raise SystemExit(main(sys.argv[1:]))\n"
    )
    async with echo_server(tmp_path) as echo:
        with trio.fail_after(CHILD_TIMEOUT):
            result = await trio.run_process(
                [sys.executable, "-c", script, "load", f"127.0.0.1:{echo.port}",
                 "-c", "2", "-n", "20"],
                stdin=b"",
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert re.search(rb"messages\s+20 in", result.stdout)
    assert result.stderr == b""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses a pty")
def test_rich_progress_and_table_on_a_terminal(tmp_path: Path) -> None:
    pytest.importorskip("rich")
    import pty
    import select

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # The echo server runs as a plain child; the load gets a terminal.
    echo = subprocess.Popen(
        command("echo", "--port", str(port)),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert echo.stdout is not None
        assert echo.stdout.readline().startswith(b"listening on")
        primary, secondary = pty.openpty()
        env = dict(os.environ, COLUMNS="120", TERM="xterm")
        load = subprocess.Popen(
            command("load", f"127.0.0.1:{port}", "-c", "2", "--duration", "0.4s"),
            stdout=secondary,
            stderr=secondary,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        os.close(secondary)
        output = b""
        deadline = CHILD_TIMEOUT
        try:
            while deadline > 0:
                ready, _, _ = select.select([primary], [], [], 0.5)
                deadline -= 0.5
                if not ready:
                    continue
                try:
                    chunk = os.read(primary, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
            assert load.wait(timeout=CHILD_TIMEOUT) == 0
        finally:
            os.close(primary)
            if load.poll() is None:  # pragma: no cover - only if it hangs
                load.kill()
                load.wait()
    finally:
        echo.send_signal(signal.SIGINT)
        echo.wait(timeout=CHILD_TIMEOUT)
        if echo.stdout is not None:
            echo.stdout.close()
    text = re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]", b"", output).decode()
    assert "━" in text  # rich's progress bar
    assert "messages" in text
    assert re.search(r"errors\s*│?\s*none", text)


# ----------------------------------------------- histogram and parsers


values = st.lists(st.integers(min_value=0, max_value=2**41 - 1), min_size=1)


@settings(max_examples=300, deadline=None)
@given(values, st.floats(min_value=0, max_value=100))
def test_histogram_percentile_within_relative_error(
    samples: list[int], percent: float
) -> None:
    hist = LogLinearHistogram()
    hist.record_all(samples)
    ordered = sorted(samples)
    rank = max(1, math.ceil(percent / 100 * len(ordered)))
    exact = ordered[rank - 1]
    got = hist.percentile(percent)
    assert got is not None
    assert abs(got - exact) <= hist.relative_error * exact
    assert min(samples) <= got <= max(samples)


@settings(max_examples=200, deadline=None)
@given(values)
def test_histogram_summary_is_exact_and_percentiles_ordered(samples: list[int]) -> None:
    hist = LogLinearHistogram()
    buckets = hist.bucket_count
    hist.record_all(samples)
    assert hist.bucket_count == buckets  # fixed memory
    assert hist.count == len(samples)
    assert hist.min == min(samples)
    assert hist.max == max(samples)
    assert hist.mean == pytest.approx(sum(samples) / len(samples))
    points = [hist.percentile(p) for p in (0, 50, 90, 99, 99.9, 100)]
    assert points == sorted(points)  # type: ignore[type-var]


@settings(max_examples=100, deadline=None)
@given(values, values)
def test_histogram_merge_equals_recording_everything(
    left: list[int], right: list[int]
) -> None:
    merged = LogLinearHistogram()
    merged.record_all(left)
    other = LogLinearHistogram()
    other.record_all(right)
    merged.merge(other)
    together = LogLinearHistogram()
    together.record_all(left + right)
    for percent in (1, 50, 90, 99, 100):
        assert merged.percentile(percent) == together.percentile(percent)
    assert (merged.count, merged.min, merged.max, merged.total) == (
        together.count,
        together.min,
        together.max,
        together.total,
    )


@pytest.mark.parametrize("bits", [1, 3, 6, 9])
def test_histogram_error_bound_follows_sub_buckets(bits: int) -> None:
    small = 2 ** (bits + 1)
    hist = LogLinearHistogram(sub_bucket_bits=bits, max_value=8 * small)
    assert hist.relative_error == 1 / small
    values = range(8 * small)
    hist.record_all(values)
    for value in range(0, 8 * small, max(1, small // 16)):
        got = hist.percentile(100 * (value + 0.5) / len(values))
        assert got is not None
        if value < small:  # small values have a bucket each
            assert got == value
        assert abs(got - value) <= value / small


def test_histogram_edges() -> None:
    hist = LogLinearHistogram(max_value=1000)
    assert hist.percentile(50) is None
    assert hist.mean is None
    hist.record(10**12)  # beyond max_value: counted, exact max kept
    hist.record(5, count=3)
    assert hist.count == 4
    assert hist.max == 10**12
    assert hist.percentile(75) == 5
    assert hist.percentile(100) is not None
    with pytest.raises(ValueError, match=">= 0"):
        hist.record(-1)
    with pytest.raises(ValueError, match="count"):
        hist.record(1, count=0)
    with pytest.raises(ValueError, match="percent"):
        hist.percentile(101)
    with pytest.raises(ValueError, match="same parameters"):
        hist.merge(LogLinearHistogram())
    with pytest.raises(ValueError, match="sub_bucket_bits"):
        LogLinearHistogram(sub_bucket_bits=0)
    with pytest.raises(ValueError, match="max_value"):
        LogLinearHistogram(max_value=0)


@given(st.integers(min_value=1, max_value=300), st.integers(min_value=0))
def test_messages_carry_their_sequence_and_no_newline(size: int, seq: int) -> None:
    make = message_maker(size)
    message = make(seq)
    assert len(message) == size
    assert b"\n" not in message
    width = min(size, 16)
    assert int(message[:width], 16) == seq % 16**width
    assert make(seq) == message  # the echo is checked against the same bytes
    if seq % 16**width != (seq + 1) % 16**width:
        assert make(seq + 1) != message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8000", ("127.0.0.1", 8000)),
        ("localhost:1", ("localhost", 1)),
        ("[::1]:65535", ("::1", 65535)),
        ("example.org:443", ("example.org", 443)),
    ],
)
def test_parse_host_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text) == expected


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10", 10.0), ("10s", 10.0), ("500ms", 0.5), ("1.5s", 1.5), ("2m", 120.0),
     ("1h", 3600.0), (".25s", 0.25)],
)  # fmt: skip
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(("text", "rate"), [("1000", 1000.0), ("2.5/s", 2.5)])
def test_parse_rate(text: str, rate: float) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize(
    ("parse", "text", "message"),
    [
        (parse_duration, "-5s", "duration must be positive: -5s"),
        (parse_duration, "0", "duration must be positive: 0"),
        (parse_duration, "9" * 400, "duration too long: 999"),
        (parse_duration, "5 parsecs", "not a duration: '5 parsecs'"),
        (parse_rate, "-1000/s", "rate must be positive: -1000/s"),
        (parse_rate, "0/s", "rate must be positive: 0/s"),
        (parse_rate, "1/m", "not a rate: '1/m'"),
    ],
)
def test_parse_errors_say_what_is_wrong(
    parse: Callable[[str], float], text: str, message: str
) -> None:
    with pytest.raises(argparse.ArgumentTypeError) as info:
        parse(text)
    assert str(info.value).startswith(message)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=30))
def test_duration_and_rate_parsers_accept_or_refuse_clearly(text: str) -> None:
    for parse in (parse_duration, parse_rate):
        try:
            value = parse(text)
        except argparse.ArgumentTypeError as exc:
            assert text.strip() in str(exc) or repr(text) in str(exc)
        else:
            assert 0 < value < math.inf


@given(
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
    st.sampled_from(["", "ms", "s", "m", "h"]),
)
def test_durations_parse_to_seconds_or_are_refused_when_not_positive(
    number: float, unit: str
) -> None:
    text = f"{number:f}{unit}"
    scale = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]
    if float(f"{number:f}") > 0:
        assert parse_duration(text) == pytest.approx(float(f"{number:f}") * scale)
    else:
        with pytest.raises(argparse.ArgumentTypeError, match="must be positive"):
            parse_duration(text)


@pytest.mark.parametrize(
    ("text", "host"),
    [("127.0.0.1", "127.0.0.1"), ("::1", "::1"), ("[::1]", "::1"), ("", "")],
)
def test_parse_host_takes_brackets_off(text: str, host: str) -> None:
    assert parse_host(text) == host


@example("host:²")  # a digit to str.isdigit, not to int()
@given(st.text(max_size=40))
def test_parse_host_port_accepts_or_refuses_clearly(text: str) -> None:
    try:
        host, port = parse_host_port(text)
    except argparse.ArgumentTypeError as exc:
        assert "malformed address" in str(exc)
    else:
        assert host and 1 <= port <= 65535
        assert parse_host_port(format_address((host, port))) == (host, port)


def test_load_target_puts_ipv6_in_brackets() -> None:
    assert LoadSpec(host="::1", port=8000).target == "[::1]:8000"
    assert LoadSpec(host="127.0.0.1", port=8000).target == "127.0.0.1:8000"
