"""Run the trionet benchmark suite and write a Markdown report.

::

    python benchmarks/run.py                      # everything, 3 repetitions
    python benchmarks/run.py --quick              # a smoke pass in seconds
    python benchmarks/run.py --stacks trionet,trio --workloads pingpong-50,pipelined-10
    python benchmarks/run.py --list               # names of stacks and workloads

Every measurement gets a freshly started echo server (``servers/``), one per
process; the load client (``client.py``) runs in this process.  Stacks are
interleaved within a workload (A B C A B C ...), and each row reports the
median of the repetitions with the range in brackets.  Ratios are to bare
trio from the same run.  Server CPU is read from ``/proc/<pid>/task/*/schedstat``.

The report goes to stdout and to ``benchmarks/results.md`` (raw numbers to
``benchmarks/results.json``).  Nothing here is a test: it asserts nothing
about speed.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SERVERS = HERE / "servers"
sys.path.insert(0, str(HERE))

import client  # noqa: E402
import udp_client  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: Seconds a server may take to print its port.
START_TIMEOUT = 20.0
#: Seconds a server gets to exit after SIGINT before SIGKILL.
STOP_TIMEOUT = 3.0
#: Descriptors kept free beyond the idle connections themselves.
FD_MARGIN = 64
#: Connections the TLS handshake workload keeps in flight.
HANDSHAKES_IN_FLIGHT = 8

#: Where servers import trionet from: the checkout, or (during a run) a copy
#: taken at the start, so that edits made while the suite runs cannot mix
#: two versions of the library into one report.
source_root = ROOT


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(source_root), env.get("PYTHONPATH")) if p
    )
    return env


def snapshot_trionet(into: Path) -> str:
    """Copy trionet/ into ``into``; return a short hash of its sources."""
    shutil.copytree(
        ROOT / "trionet",
        into / "trionet",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    digest = hashlib.sha256()
    for path in sorted((into / "trionet").rglob("*.py")):
        digest.update(str(path.relative_to(into)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def git_state() -> str:
    """The checkout's commit and whether trionet/ has uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "trionet"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown commit"
    return f"commit {head}" + (" + uncommitted changes in trionet/" if dirty else "")


def _busy_jiffies() -> int:
    # All CPUs' non-idle time from /proc/stat (USER_HZ ticks), steal included.
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return user + nice + system + irq + softirq + steal


@dataclass(frozen=True)
class Stack:
    name: str
    script: str
    extra: tuple[str, ...] = ()
    #: A module that must be importable, else the stack is skipped.
    needs: str | None = None
    #: Which codec_bench implementation stands for this stack (None: no row).
    codec: str | None = None
    description: str = ""
    #: Serve on a UNIX socket (``--unix PATH``) instead of a loopback port.
    unix: bool = False
    #: The only workloads this stack runs (None: all); the rest are "n/a".
    workloads: tuple[str, ...] | None = None
    #: Whether the stack serves TLS (``--tls PEM``): else TLS workloads are "n/a".
    tls: bool = True


#: The pipelined workloads, which the batch-API stack is for.
PIPELINED = ("pipelined-1", "pipelined-10")

STACKS = [
    Stack(
        "trionet",
        "trionet_echo.py",
        needs="trionet",
        codec="trionet",
        description="trionet.serve_tcp, Lines()/Frames(), `async for m in conn: "
        "await conn.send(m)`",
    ),
    Stack(
        "trionet-unix",
        "trionet_echo.py",
        needs="trionet",
        description="the same trionet server on a UNIX socket (trionet.serve_unix), "
        "to compare with trionet over loopback TCP",
        unix=True,
        workloads=("pingpong-50", "frames-1k"),
        tls=False,
    ),
    Stack(
        "trionet-batch",
        "trionet_echo.py",
        ("--batches",),
        needs="trionet",
        description="trionet.serve_tcp with the batch API: `async for batch in "
        "conn.batches(): await conn.send_many(batch)`",
        workloads=PIPELINED,
    ),
    Stack(
        "trio",
        "trio_bare.py",
        needs="trio",
        codec="bare",
        description="bare trio: trio.serve_tcp + SocketStream + hand-written "
        "bytearray parser, one send_all per reply (the baseline)",
    ),
    Stack(
        "anyio-trio",
        "anyio_buffered.py",
        ("--backend", "trio"),
        needs="anyio",
        description="anyio on trio, BufferedByteReceiveStream "
        "(receive_until / receive_exactly)",
    ),
    Stack(
        "anyio-asyncio",
        "anyio_buffered.py",
        ("--backend", "asyncio"),
        needs="anyio",
        description="anyio on asyncio, BufferedByteReceiveStream",
    ),
    Stack(
        "asyncio",
        "asyncio_streams.py",
        description="asyncio streams: readline / readexactly, write + drain",
    ),
    Stack(
        "uvloop",
        "asyncio_streams.py",
        ("--uvloop",),
        needs="uvloop",
        description="the asyncio streams server on uvloop",
    ),
    Stack(
        "uvloop-proto",
        "uvloop_protocol.py",
        needs="uvloop",
        description="uvloop Protocol: data_received splits each chunk, one "
        "transport.write per chunk",
    ),
]
BASELINE = "trio"

# The UDP stacks answer the udp-* workloads only (and the TCP stacks only the
# others); their baseline is bare trio's recvfrom/sendto loop.
UDP_STACKS = [
    Stack(
        "trio-udp",
        "udp_trio_bare.py",
        needs="trio",
        description="bare trio UDP: one task, `await sock.recvfrom()` then "
        "`await sock.sendto()` (the UDP baseline)",
    ),
    Stack(
        "trionet-serve-udp",
        "udp_trionet.py",
        ("--api", "serve"),
        needs="trionet",
        description="trionet.serve_udp, one handler task per peer: "
        "`async for data in peer: await peer.send(data)`",
    ),
    Stack(
        "trionet-open-udp",
        "udp_trionet.py",
        ("--api", "loop"),
        needs="trionet",
        description="trionet.open_udp, one task: `async for data, address in "
        "endpoint: await endpoint.send_to(data, address)`",
    ),
    Stack(
        "anyio-trio-udp",
        "udp_anyio.py",
        ("--backend", "trio"),
        needs="anyio",
        description="anyio UDPSocket on trio: `async for` + `sendto`",
    ),
    Stack(
        "asyncio-udp",
        "udp_asyncio.py",
        description="asyncio DatagramProtocol: `transport.sendto` in "
        "`datagram_received`",
    ),
    Stack(
        "uvloop-udp",
        "udp_asyncio.py",
        ("--uvloop",),
        needs="uvloop",
        description="the asyncio DatagramProtocol server on uvloop",
    ),
    Stack(
        "trio-probe-udp",
        "udp_probe.py",
        needs="trio",
        description="pure-trio probe: non-blocking stdlib socket, "
        "`wait_readable`, every ready datagram drained and answered per wake-up",
    ),
]
UDP_BASELINE = "trio-udp"
STACKS += UDP_STACKS


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str  # "echo", "handshake", "idle" or "codec"
    mode: str  # "lines" or "frames"
    conns: int = 1
    size: int = 0  # frame payload bytes
    pipelined: bool = False
    description: str = ""
    #: Over TLS 1.3 (kind "handshake": fresh TLS connections, ``conns`` in flight).
    tls: bool = False
    #: UDP: datagrams in flight per client socket (``conns`` sockets).
    window: int = 1

    def request(self) -> tuple[bytes, int]:
        if self.mode == "frames":
            return client.frame_request(self.size), 1
        if self.pipelined:
            return client.burst_request(), client.BURST
        return client.line_request(), 1


WORKLOADS = [
    Workload(
        "pingpong-1",
        "echo",
        "lines",
        1,
        description="64-byte lines, one in flight per connection, 1 connection",
    ),
    Workload(
        "pingpong-50",
        "echo",
        "lines",
        50,
        description="64-byte lines, one in flight per connection, 50 connections",
    ),
    Workload(
        "pipelined-1",
        "echo",
        "lines",
        1,
        pipelined=True,
        description="bursts of 1,000 64-byte lines sent at once, the next "
        "burst after all 1,000 echoes; 1 connection",
    ),
    Workload(
        "pipelined-10",
        "echo",
        "lines",
        10,
        pipelined=True,
        description="bursts of 1,000 lines, 10 connections",
    ),
    Workload(
        "frames-1k",
        "echo",
        "frames",
        4,
        1024,
        description="1 KiB frames "
        "(4-byte length prefix), one in flight per connection, 4 connections",
    ),
    Workload(
        "frames-64k",
        "echo",
        "frames",
        4,
        64 * 1024,
        description="64 KiB frames, 4 connections",
    ),
    Workload(
        "frames-4m",
        "echo",
        "frames",
        4,
        4 * 1024 * 1024,
        description="4 MiB frames, 4 connections",
    ),
    Workload(
        "tls-pingpong-50",
        "echo",
        "lines",
        50,
        tls=True,
        description="TLS 1.3: 64-byte lines, one in flight per connection, "
        "50 connections",
    ),
    Workload(
        "tls-frames-1k",
        "echo",
        "frames",
        4,
        1024,
        tls=True,
        description="TLS 1.3: 1 KiB frames, one in flight per connection, "
        "4 connections",
    ),
    Workload(
        "tls-handshakes",
        "handshake",
        "lines",
        HANDSHAKES_IN_FLIGHT,
        tls=True,
        description="TLS 1.3 handshakes: a fresh connection each (full handshake, "
        f"one line echoed, close), {HANDSHAKES_IN_FLIGHT} in flight; a message "
        "is a connection",
    ),
    Workload(
        "idle-1000",
        "idle",
        "lines",
        1000,
        description="server RSS per "
        "connection, 1,000 connections that each echoed one line",
    ),
    Workload(
        "idle-5000",
        "idle",
        "lines",
        5000,
        description="the same with 5,000 connections",
    ),
    Workload(
        "codec-lines",
        "codec",
        "lines",
        description="no sockets: 64 MiB of "
        "64-byte lines in 64 KiB chunks through the decoder",
    ),
    Workload(
        "codec-frames",
        "codec",
        "frames",
        description="no sockets: 64 MiB of "
        "1 KiB frames in 64 KiB chunks through the decoder",
    ),
]
WORKLOADS += [
    Workload(
        "udp-pingpong-1",
        "udp",
        "datagrams",
        1,
        description="64-byte datagrams, one in flight, 1 client socket",
    ),
    Workload(
        "udp-pingpong-50",
        "udp",
        "datagrams",
        50,
        description="64-byte datagrams, one in flight per socket, 50 client "
        "sockets (50 peers of one server socket)",
    ),
    Workload(
        "udp-inflight-50x32",
        "udp",
        "datagrams",
        50,
        window=32,
        description="64-byte datagrams, 32 in flight per socket, 50 client "
        "sockets; a datagram unanswered for 1 s counts as dropped",
    ),
]


# ------------------------------------------------------------------ servers


class Server:
    """One echo server process: started, asked where it listens, stopped by PID."""

    def __init__(
        self,
        stack: Stack,
        mode: str,
        profile: str | None = None,
        tls: str | None = None,
        wrap: tuple[str, ...] = (),
    ) -> None:
        # ``wrap``: a command the server runs under (e.g. valgrind).
        argv = [*wrap, sys.executable, str(SERVERS / stack.script), mode, *stack.extra]
        if profile:
            argv += ["--profile", profile]
        if tls:
            argv += ["--tls", tls]
        # A directory of our own for a UNIX socket, removed by stop().
        self._socket_dir = (
            tempfile.mkdtemp(prefix="trionet-bench-") if stack.unix else None
        )
        if self._socket_dir is not None:
            argv += ["--unix", os.path.join(self._socket_dir, "echo.sock")]
        env = _child_env()
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed by stop())
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=self._stderr, env=env, cwd=ROOT
        )
        self.pid = self.proc.pid
        #: Where the client connects: the port, or the UNIX socket's path.
        self.target: int | str = self._read_target()

    @property
    def port(self) -> int:
        assert isinstance(self.target, int), "this server listens on a UNIX socket"
        return self.target

    def _read_target(self) -> int | str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            for _ in range(1000):
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    break
                line = self.proc.stdout.readline()
                if not line:
                    break
                if line.startswith(b"PORT "):
                    return int(line.split()[1])
                if line.startswith(b"UNIX "):
                    return line[5:].decode().strip()
        self.stop()
        raise RuntimeError(f"server did not report a port: {self.stderr_tail()}")

    def stderr_tail(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-600:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGINT)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(STOP_TIMEOUT)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------- measurement


@dataclass
class Settings:
    reps: int = 3
    duration: float = 2.0
    warmup: float = 0.3
    idle_scale: float = 1.0
    codec_mib: float = 64.0
    notes: list[str] = field(default_factory=list)
    #: The servers' TLS key and certificate (a PEM file), made at the start.
    tls_pem: str | None = None


def make_tls_pem(directory: Path) -> str:
    """A self-signed ECDSA P-256 key and certificate for "localhost", in one
    PEM file in ``directory`` (with the openssl command)."""
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    pem = directory / "server.pem"
    pem.write_bytes(key.read_bytes() + cert.read_bytes())
    return str(pem)


def measure(stack: Stack, work: Workload, cfg: Settings) -> dict[str, Any]:
    """One measurement with a fresh server (or a fresh codec process)."""
    if work.kind == "codec":
        argv = [
            sys.executable,
            str(HERE / "codec_bench.py"),
            work.mode,
            stack.codec or "",
            "--size-mib",
            str(cfg.codec_mib),
        ]
        env = _child_env()
        out = subprocess.run(
            argv, capture_output=True, check=True, timeout=300, env=env, cwd=ROOT
        )
        return dict(json.loads(out.stdout))
    with Server(stack, work.mode, tls=cfg.tls_pem if work.tls else None) as server:
        tls = client.client_tls_context() if work.tls else None
        usage0 = resource.getrusage(resource.RUSAGE_SELF)
        busy0 = _busy_jiffies()
        server0 = client.server_cpu_seconds(server.pid)
        wall0 = time.monotonic()
        if work.kind == "idle":
            conns = max(10, int(work.conns * cfg.idle_scale))
            result = client.run_idle(server.target, server.pid, conns=conns)
        elif work.kind == "handshake":
            assert tls is not None
            result = client.run_handshakes(
                server.target,
                server.pid,
                tls=tls,
                concurrency=work.conns,
                duration=cfg.duration,
                warmup=cfg.warmup,
            )
        elif work.kind == "udp":
            result = udp_client.run_udp(
                server.port,
                server.pid,
                sockets=work.conns,
                window=work.window,
                duration=cfg.duration,
                warmup=cfg.warmup,
            )
        else:
            request, per_round = work.request()
            result = client.run_echo(
                server.target,
                server.pid,
                conns=work.conns,
                request=request,
                messages_per_round=per_round,
                duration=cfg.duration,
                warmup=cfg.warmup,
                tls=tls,
            )
        if server.proc.poll() is not None:
            raise RuntimeError(f"server died: {server.stderr_tail()}")
        wall = time.monotonic() - wall0
        server_cpu = client.server_cpu_seconds(server.pid) - server0
        busy = (_busy_jiffies() - busy0) / CLOCK_TICKS
        usage1 = resource.getrusage(resource.RUSAGE_SELF)
    client_cpu = (usage1.ru_utime + usage1.ru_stime) - (
        usage0.ru_utime + usage0.ru_stime
    )
    result["client_cpu"] = client_cpu
    # CPU that neither the server nor the client used: other processes,
    # interrupts, steal -- how noisy the machine was during this run.
    result["other_cpu_percent"] = max(
        0.0, 100 * (busy - server_cpu - client_cpu) / wall
    )
    return result


def skip_reason(
    stack: Stack, work: Workload, cfg: Settings, fd_limit: int
) -> str | None:
    if (work.kind == "udp") != (stack in UDP_STACKS):
        return "n/a"
    if stack.workloads is not None and work.name not in stack.workloads:
        return "n/a"
    if work.tls and not stack.tls:
        return "n/a"
    if work.tls and cfg.tls_pem is None:
        return "no TLS certificate (the openssl command failed)"
    if stack.needs and importlib.util.find_spec(stack.needs) is None:
        return f"{stack.needs} is not installed"
    if work.kind == "codec" and stack.codec is None:
        return "n/a"
    if work.kind == "idle":
        conns = max(10, int(work.conns * cfg.idle_scale))
        if fd_limit < conns + FD_MARGIN:
            return f"descriptor limit {fd_limit} too low for {conns} connections"
    return None


# ----------------------------------------------------------------- report


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _num(value: float, digits: int = 0) -> str:
    if value != value:  # NaN
        return "-"
    return f"{value:,.{digits}f}"


def _with_range(values: list[float], digits: int = 0) -> str:
    med = _median(values)
    if len(values) < 2:
        return _num(med, digits)
    low, high = _num(min(values), digits), _num(max(values), digits)
    return f"{_num(med, digits)} ({low}..{high})"


def _ratio(value: float, base: float) -> str:
    if base != base or value != value or base == 0:
        return "-"
    return f"{value / base:.2f}x"


def derived(work: Workload, runs: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per-repetition figures of one stack on one workload."""
    out: dict[str, list[float]] = {}
    if work.kind == "idle":
        out["kib"] = [r["kib_per_conn"] for r in runs]
        out["cpu_conn"] = [1e6 * r["server_cpu"] / r["conns"] for r in runs]
        out["rss_before"] = [r["rss_before_kib"] / 1024 for r in runs]
        out["rss_after"] = [r["rss_after_kib"] / 1024 for r in runs]
        out["conns"] = [r["conns"] for r in runs]
        return out
    out["rate"] = [r["messages"] / r["seconds"] for r in runs]
    out["mbs"] = [r["bytes"] / r["seconds"] / 1e6 for r in runs]
    if work.kind == "codec":
        out["us"] = [1e6 * r["cpu"] / r["messages"] for r in runs]
        return out
    out["p50"] = [r["p50_us"] for r in runs]
    out["p99"] = [r["p99_us"] for r in runs]
    out["cpu"] = [1e6 * r["server_cpu"] / r["messages"] for r in runs]
    out["load"] = [100 * r["server_cpu"] / r["seconds"] for r in runs]
    out["client"] = [
        100 * r["client_cpu"] / r["seconds"] if "client_cpu" in r else float("nan")
        for r in runs
    ]
    out["other"] = [r.get("other_cpu_percent", float("nan")) for r in runs]
    if work.kind == "udp":
        out["client"] = [100 * r["client_cpu_measured"] / r["seconds"] for r in runs]
        out["dropped"] = [r["dropped"] for r in runs]
    return out


def render(
    works: list[Workload],
    stacks: list[Stack],
    results: dict[str, dict[str, list[dict[str, Any]]]],
    skipped: dict[str, dict[str, str]],
    errors: dict[str, dict[str, list[str]]],
    header: list[str],
) -> str:
    lines = list(header)
    figures: dict[str, dict[str, dict[str, list[float]]]] = {}
    for work in works:
        figures[work.name] = {
            s.name: derived(work, results[work.name][s.name])
            for s in stacks
            if results[work.name].get(s.name)
        }
        base = figures[work.name].get(
            UDP_BASELINE if work.kind == "udp" else BASELINE, {}
        )
        lines += ["", f"### {work.name}", "", work.description + ".", ""]
        if work.kind in ("echo", "handshake"):
            lines += [
                "| stack | messages/s | vs trio | MB/s | p50 µs | p99 µs "
                "| server CPU µs/msg | vs trio | server CPU % | client CPU % "
                "| other CPU % |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
        elif work.kind == "udp":
            lines += [
                "| stack | datagrams/s | vs trio | p50 µs | p99 µs "
                "| server CPU µs/datagram | vs trio | server CPU % | client CPU % "
                "| dropped | other CPU % |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
        elif work.kind == "idle":
            lines += [
                "| stack | KiB per connection | vs trio | server CPU µs per "
                "connection set-up | RSS before → after (MiB) |",
                "|---|---:|---:|---:|---:|",
            ]
        else:
            lines += [
                "| parser | messages/s | vs bare | MB/s | CPU µs/msg |",
                "|---|---:|---:|---:|---:|",
            ]
        for stack in stacks:
            name = stack.name
            if name in skipped[work.name]:
                if skipped[work.name][name] != "n/a":
                    lines.append(f"| {name} | skipped: {skipped[work.name][name]} |")
                continue
            fig = figures[work.name].get(name)
            if not fig:
                why = "; ".join(errors[work.name].get(name, ["no result"]))
                lines.append(f"| {name} | failed: {why[:200]} |")
                continue
            if work.kind in ("echo", "handshake"):
                lines.append(
                    f"| {name} | {_with_range(fig['rate'])} "
                    f"| {_ratio(_median(fig['rate']), _median(base.get('rate', [])))} "
                    f"| {_num(_median(fig['mbs']), 1)} "
                    f"| {_num(_median(fig['p50']))} | {_num(_median(fig['p99']))} "
                    f"| {_with_range(fig['cpu'], 1)} "
                    f"| {_ratio(_median(fig['cpu']), _median(base.get('cpu', [])))} "
                    f"| {_num(_median(fig['load']))} "
                    f"| {_num(_median(fig['client']))} "
                    f"| {_num(_median(fig['other']))} |"
                )
            elif work.kind == "udp":
                lines.append(
                    f"| {name} | {_with_range(fig['rate'])} "
                    f"| {_ratio(_median(fig['rate']), _median(base.get('rate', [])))} "
                    f"| {_num(_median(fig['p50']))} | {_num(_median(fig['p99']))} "
                    f"| {_with_range(fig['cpu'], 1)} "
                    f"| {_ratio(_median(fig['cpu']), _median(base.get('cpu', [])))} "
                    f"| {_num(_median(fig['load']))} "
                    f"| {_num(_median(fig['client']))} "
                    f"| {_num(max(fig['dropped']))} "
                    f"| {_num(_median(fig['other']))} |"
                )
            elif work.kind == "idle":
                lines.append(
                    f"| {name} | {_with_range(fig['kib'], 2)} "
                    f"| {_ratio(_median(fig['kib']), _median(base.get('kib', [])))} "
                    f"| {_num(_median(fig['cpu_conn']))} "
                    f"| {_num(_median(fig['rss_before']), 1)} → "
                    f"{_num(_median(fig['rss_after']), 1)} |"
                )
            else:
                label = f"{name} ({stack.codec})"
                lines.append(
                    f"| {label} | {_with_range(fig['rate'])} "
                    f"| {_ratio(_median(fig['rate']), _median(base.get('rate', [])))} "
                    f"| {_num(_median(fig['mbs']))} | {_num(_median(fig['us']), 3)} |"
                )
            if errors[work.name].get(name):
                lines.append(
                    f"| {name} | {len(errors[work.name][name])} repetition(s) "
                    f"failed: {errors[work.name][name][0][:150]} |"
                )
    lines += targets(figures)
    return "\n".join(lines) + "\n"


def targets(figures: dict[str, dict[str, dict[str, list[float]]]]) -> list[str]:
    """trionet against the targets of the performance issue (where measured)."""
    rows: list[str] = []

    def get(work: str, stack: str, key: str) -> float:
        return _median(figures.get(work, {}).get(stack, {}).get(key, []))

    def check(label: str, value: float, goal: str, ok: Callable[[float], bool]) -> None:
        if value == value:
            rows.append(
                f"| {label} | {value:.2f} | {goal} | {'yes' if ok(value) else 'no'} |"
            )

    def ratio(
        work: str, key: str, other: str = BASELINE, stack: str = "trionet"
    ) -> float:
        return get(work, stack, key) / get(work, other, key)

    def at_least(goal: float) -> Callable[[float], bool]:
        return lambda v: v >= goal

    check(
        "pingpong-50 messages/s vs trio",
        ratio("pingpong-50", "rate"),
        "≥ 1.5",
        at_least(1.5),
    )
    check(
        "pingpong-50 server CPU µs/msg",
        get("pingpong-50", "trionet", "cpu"),
        "≤ 20",
        lambda v: v <= 20,
    )
    for work in PIPELINED:
        check(f"{work} messages/s vs trio", ratio(work, "rate"), "≥ 12", at_least(12))
        check(
            f"{work} batch API messages/s vs trio",
            ratio(work, "rate", stack="trionet-batch"),
            "≥ 30",
            at_least(30),
        )
        for other in ("asyncio", "uvloop"):
            check(
                f"{work} messages/s vs {other}",
                ratio(work, "rate", other),
                "≥ 3",
                at_least(3),
            )
    for work, goal in (("frames-1k", 1.6), ("frames-64k", 1.8), ("frames-4m", 1.8)):
        rate = ratio(work, "rate")
        check(f"{work} messages/s vs trio", rate, f"≥ {goal}", at_least(goal))
    for work in ("tls-pingpong-50", "tls-frames-1k"):
        check(f"{work} messages/s vs trio", ratio(work, "rate"), "≥ 1.8", at_least(1.8))
        check(
            f"{work} server CPU µs/msg vs trio",
            ratio(work, "cpu"),
            "≤ 0.56",
            lambda v: v <= 1 / 1.8,
        )
    check(
        "tls-handshakes per second vs trio",
        ratio("tls-handshakes", "rate"),
        "≥ 1.0",
        at_least(1.0),
    )
    for work in ("idle-1000", "idle-5000"):
        check(
            f"{work} KiB/conn vs trio",
            ratio(work, "kib"),
            "≤ 0.75",
            lambda v: v <= 0.75,
        )
    check(
        "codec-lines million lines/s",
        get("codec-lines", "trionet", "rate") / 1e6,
        "≥ 2.5",
        at_least(2.5),
    )
    check(
        "codec-frames million frames/s",
        get("codec-frames", "trionet", "rate") / 1e6,
        "≥ 1.5",
        at_least(1.5),
    )
    rows += udp_targets(figures)
    if not rows:
        return []
    return [
        "",
        "### trionet against the targets",
        "",
        "| figure (medians) | trionet | target | met |",
        "|---|---:|---:|:---:|",
        *rows,
    ]


def udp_targets(figures: dict[str, dict[str, dict[str, list[float]]]]) -> list[str]:
    """The UDP targets, as ratios to bare trio's UDP loop: datagrams/s, and
    server CPU per datagram (trio's over the stack's: the fair figure when
    the client shares the machine); and zero drops at the in-flight load."""
    rows: list[str] = []
    goals = {
        "trionet-open-udp": {
            "udp-pingpong-1": 1.0,
            "udp-pingpong-50": 4.0,
            "udp-inflight-50x32": 4.0,
        },
        "trionet-serve-udp": {
            "udp-pingpong-1": 1.0,
            "udp-pingpong-50": 2.5,
            "udp-inflight-50x32": 2.5,
        },
    }

    def ratio(work: str, stack: str, key: str) -> float:
        fig = figures.get(work, {})
        mine = _median(fig.get(stack, {}).get(key, []))
        base = _median(fig.get(UDP_BASELINE, {}).get(key, []))
        return base / mine if key == "cpu" else mine / base

    for stack, per_work in goals.items():
        for work, goal in per_work.items():
            for key, what in (("rate", "datagrams/s"), ("cpu", "CPU/datagram")):
                value = ratio(work, stack, key)
                if value == value:
                    met = "yes" if value >= goal else "no"
                    label = f"{work} {stack} {what} vs trio"
                    rows.append(f"| {label} | {value:.2f} | ≥ {goal} | {met} |")
        drops = figures.get("udp-inflight-50x32", {}).get(stack, {}).get("dropped")
        if drops:
            met = "yes" if max(drops) == 0 else "no"
            rows.append(
                f"| udp-inflight-50x32 {stack} dropped | {max(drops):.0f} | 0 | {met} |"
            )
    return rows


def to_rst(markdown: str, level: str = "~") -> str:
    """The Markdown report as reStructuredText (for docs/performance.rst)."""
    out: list[str] = []
    table: list[list[str]] = []

    def inline(text: str) -> str:
        # `code` -> ``code``
        parts = text.split("`")
        return "".join(
            part if i % 2 == 0 else f"``{part}``" for i, part in enumerate(parts)
        )

    def flush_table() -> None:
        if not table:
            return
        out.extend([".. list-table::", "   :header-rows: 1", ""])
        width = max(len(row) for row in table)
        for row in table:
            cells = row + [""] * (width - len(row))
            out.append(f"   * - {inline(cells[0])}")
            out.extend(f"     - {inline(cell)}" for cell in cells[1:])
        out.append("")
        table.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-:") for c in cells):
                table.append(cells)
            continue
        flush_table()
        if line.startswith("# "):
            continue
        if line.startswith("### "):
            title = line[4:]
            out.extend([title, level * len(title)])
        else:
            out.append(inline(line))
    flush_table()
    return "\n".join(out).strip() + "\n"


def machine() -> list[str]:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    cpus = len(os.sched_getaffinity(0))
    return [
        f"- CPU: {model}, {cpus} cores available (`nproc`)",
        f"- Linux {platform.release()}, Python {platform.python_version()}",
        f"- trio {version('trio')}, trionet {version('trionet')}, anyio "
        f"{version('anyio')}, uvloop {version('uvloop')}",
    ]


# -------------------------------------------------------------------- main


def _pick(names: str | None, known: list[Any], what: str) -> list[Any]:
    if not names:
        return list(known)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    by_name = {k.name: k for k in known}
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} (see --list)")
    return [k for k in known if k.name in wanted]


def main() -> None:
    parser = argparse.ArgumentParser(
        description="trionet benchmark suite",
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="a smoke pass in seconds")
    parser.add_argument("--stacks", help="comma-separated stack names")
    parser.add_argument("--workloads", help="comma-separated workload names")
    parser.add_argument("--reps", type=int, help="repetitions (default 3; quick 1)")
    parser.add_argument("--duration", type=float, help="measured seconds per run (2.0)")
    parser.add_argument("--warmup", type=float, help="warm-up seconds per run (0.3)")
    parser.add_argument(
        "--output",
        help="report file (default benchmarks/results.md; with --quick "
        "benchmarks/results-quick.md, so a smoke pass never replaces the report "
        "the docs show)",
    )
    parser.add_argument(
        "--rst", metavar="FILE", help="also write the report as reStructuredText"
    )
    parser.add_argument("--list", action="store_true", help="list stacks and workloads")
    parser.add_argument(
        "--live",
        action="store_true",
        help="import trionet from the checkout for every server instead of a "
        "copy taken at the start",
    )
    args = parser.parse_args()
    if args.list:
        for s in STACKS:
            print(f"stack     {s.name:14} {s.description}")
        for w in WORKLOADS:
            print(f"workload  {w.name:14} {w.description}")
        return

    cfg = Settings()
    if args.quick:
        cfg = Settings(reps=1, duration=0.2, warmup=0.05, idle_scale=0.1, codec_mib=4)
        cfg.notes.append(
            "quick pass: 1 repetition, 0.2 s per run, idle connections ÷10, "
            "4 MiB codec input; not for comparison"
        )
    cfg.reps = args.reps or cfg.reps
    cfg.duration = args.duration or cfg.duration
    cfg.warmup = args.warmup if args.warmup is not None else cfg.warmup
    stacks = _pick(args.stacks, STACKS, "stacks")
    works = _pick(args.workloads, WORKLOADS, "workloads")
    fd_limit = client.raise_fd_limit()

    global source_root
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    skipped: dict[str, dict[str, str]] = {}
    errors: dict[str, dict[str, list[str]]] = {}
    load_before = os.getloadavg()
    started = time.monotonic()
    git = git_state()
    with tempfile.TemporaryDirectory(prefix="trionet-bench-") as tmp:
        if any(w.tls for w in works):
            try:
                cfg.tls_pem = make_tls_pem(Path(tmp))
            except (OSError, subprocess.SubprocessError) as exc:
                cfg.notes.append(f"TLS workloads skipped: no certificate ({exc})")
        if args.live:
            source = "trionet imported live from the checkout"
        else:
            source_root = Path(tmp)
            digest = snapshot_trionet(Path(tmp))
            source = f"trionet sources copied at the start (sha256 {digest})"
        run_all(works, stacks, cfg, fd_limit, results, skipped, errors, started)
        source_root = ROOT
    elapsed = time.monotonic() - started
    load_after = os.getloadavg()
    other = [
        r["other_cpu_percent"]
        for per_stack in results.values()
        for runs in per_stack.values()
        for r in runs
        if "other_cpu_percent" in r
    ]
    if other:
        cfg.notes.append(
            "CPU used by other processes during the socket measurements: median "
            f"{_median(other):.0f}% of one core, max {max(other):.0f}% (column "
            "'other CPU %'; high values mean that row is noisy)"
        )

    command = "python benchmarks/run.py " + " ".join(sys.argv[1:])
    header = [
        "# trionet benchmark results",
        "",
        f"- Command: `{command.strip()}`",
        f"- Date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; "
        f"took {elapsed / 60:.1f} min",
        *machine(),
        f"- Source: {git}; {source}",
        f"- Load average before / after: {load_before[0]:.2f} / {load_after[0]:.2f}",
        f"- {cfg.reps} repetition(s) per stack and workload, interleaved; "
        f"{cfg.duration:g} s measured after {cfg.warmup:g} s warm-up; medians, "
        "(min..max) over repetitions",
        "- Ratios are to bare trio (`trio`) in the same run. Server CPU is the "
        "server process's CPU time over the measured period; server CPU % is how "
        "busy it was (100 = one core). Latency is the client-side round trip of one "
        "request: a line, a 1,000-line burst or a frame.",
        *(f"- Note: {note}" for note in cfg.notes),
    ]
    report = render(works, stacks, results, skipped, errors, header)
    print(report)
    output = Path(
        args.output or HERE / ("results-quick.md" if args.quick else "results.md")
    )
    output.write_text(report, encoding="utf-8")
    if args.rst:
        Path(args.rst).write_text(to_rst(report), encoding="utf-8")
    output.with_suffix(".json").write_text(
        json.dumps(
            {"results": results, "skipped": skipped, "errors": errors}, indent=1
        ),
        encoding="utf-8",
    )


def run_all(
    works: list[Workload],
    stacks: list[Stack],
    cfg: Settings,
    fd_limit: int,
    results: dict[str, dict[str, list[dict[str, Any]]]],
    skipped: dict[str, dict[str, str]],
    errors: dict[str, dict[str, list[str]]],
    started: float,
) -> None:
    for work in works:
        results[work.name] = {s.name: [] for s in stacks}
        errors[work.name] = {}
        skipped[work.name] = {}
        for stack in stacks:
            reason = skip_reason(stack, work, cfg, fd_limit)
            if reason:
                skipped[work.name][stack.name] = reason
        live = [s for s in stacks if s.name not in skipped[work.name]]
        for rep in range(cfg.reps):
            for stack in live:
                print(
                    f"[{time.monotonic() - started:6.0f}s] {work.name} {stack.name} "
                    f"{rep + 1}/{cfg.reps}",
                    file=sys.stderr,
                    flush=True,
                )
                try:
                    results[work.name][stack.name].append(measure(stack, work, cfg))
                except Exception as exc:  # a failed run is reported, not fatal
                    errors[work.name].setdefault(stack.name, []).append(
                        f"{type(exc).__name__}: {exc}".replace("\n", " ").replace(
                            "|", "/"
                        )
                    )


if __name__ == "__main__":
    main()
