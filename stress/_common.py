"""Shared plumbing for the stress scripts.

Every script runs one scenario twice -- against a trionet server and against
the same server written with bare trio (``trio.serve_tcp`` and a hand-written
parser) -- and prints the two figures side by side.  The server is always a
child process (the script itself, run with ``--serve``); the client side runs
in the script's own process or, where its memory is measured, in another
child.  Everything listens and connects on 127.0.0.1 only.

A server child prints ``port N`` once listening, answers one JSON line per
command line on its standard input (``stats`` -> ``{"open": n, ...}``; each
script adds its own), and exits when its standard input ends.  The driver
reads the child's memory, descriptors and CPU time from /proc.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import subprocess
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

import trionet

#: Bytes asked of the kernel per receive, for the bare trio servers.
RECEIVE_SIZE = 65536
MAX_LINE = 65536
MAX_FRAME = 16 * 1024 * 1024
#: listen() backlog of the bare trio servers (trionet's asks the kernel's most).
BACKLOG = 65535
IMPLEMENTATIONS = ("trionet", "bare trio")


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


def say(**fields: Any) -> None:
    """One JSON line on standard output (a child's answer)."""
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------
# Hand-written parsers for the bare trio servers (and the clients)


class LineParser:
    """Newline-terminated lines; returns each with its newline, ready to echo."""

    __slots__ = ("buf", "scan")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.scan = 0

    def feed(self, data: bytes | bytearray) -> list[bytes]:
        buf = self.buf
        buf += data
        out: list[bytes] = []
        start = 0
        while (end := buf.find(b"\n", max(start, self.scan))) >= 0:
            out.append(bytes(buf[start : end + 1]))
            start = end + 1
        if start:
            del buf[:start]
        self.scan = len(buf)
        if len(buf) > MAX_LINE:
            raise ValueError("line too long")
        return out


class FrameParser:
    """4-byte big-endian length-prefixed frames; returns each whole frame."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes | bytearray) -> list[bytes]:
        buf = self.buf
        buf += data
        out: list[bytes] = []
        pos = 0
        while len(buf) - pos >= 4:
            length = int.from_bytes(buf[pos : pos + 4], "big")
            if length > MAX_FRAME:
                raise ValueError("frame too large")
            if len(buf) - pos < 4 + length:
                break
            out.append(bytes(buf[pos : pos + 4 + length]))
            pos += 4 + length
        if pos:
            del buf[:pos]
        return out


def parser_for(mode: str) -> LineParser | FrameParser:
    return LineParser() if mode == "lines" else FrameParser()


def framing_for(mode: str) -> trionet.Framing:
    return trionet.Lines() if mode == "lines" else trionet.Frames()


# --------------------------------------------------------------------------
# Echo servers


async def trionet_echo(conn: trionet.Connection) -> None:
    async for message in conn:
        await conn.send(message)


class BareServer:
    """The bare trio echo server: one task per connection, a set as registry."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.streams: set[trio.SocketStream] = set()

    async def handle(self, stream: trio.SocketStream) -> None:
        self.streams.add(stream)
        parser = parser_for(self.mode)
        try:
            while data := await stream.receive_some(RECEIVE_SIZE):
                replies = parser.feed(data)
                if replies:
                    await stream.send_all(b"".join(replies))
        except (trio.BrokenResourceError, trio.ClosedResourceError, ValueError):
            pass
        finally:
            self.streams.discard(stream)
            await trio.aclose_forcefully(stream)


Command = Callable[[list[str]], Awaitable[dict[str, Any]]]


async def control_loop(commands: dict[str, Command]) -> None:
    """Answer command lines on stdin with JSON lines; return at end of stdin."""
    stdin = trio.lowlevel.FdStream(os.dup(0))
    pending = b""
    async with stdin:
        while data := await stdin.receive_some():
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                name, *args = line.decode().split()
                say(**await commands[name](args))


async def serve(
    implementation: str,
    mode: str,
    commands: Callable[[Any], dict[str, Command]] | None = None,
    **trionet_options: Any,
) -> None:
    """Run an echo server until stdin ends.

    ``commands(server)`` may add commands; ``server`` is the
    :class:`trionet.Server` or the :class:`BareServer`.
    """
    raise_fd_limit()
    if implementation == "trionet":
        async with trionet.open_tcp_server(
            trionet_echo,
            host="127.0.0.1",
            framing=framing_for(mode),
            grace_period=0,
            **trionet_options,
        ) as server:

            async def stats(args: list[str]) -> dict[str, Any]:
                return {"open": server.statistics().open}

            table: dict[str, Command] = {"stats": stats}
            if commands is not None:
                table.update(commands(server))
            say(port=server.port)
            await control_loop(table)
        return
    bare = BareServer(mode)

    async def bare_stats(args: list[str]) -> dict[str, Any]:
        return {"open": len(bare.streams)}

    table = {"stats": bare_stats}
    if commands is not None:
        table.update(commands(bare))
    await serve_bare_tcp(bare.handle, table)


async def serve_bare_tcp(
    handle: Callable[[trio.SocketStream], Awaitable[None]],
    commands: dict[str, Command],
) -> None:
    """Serve ``handle`` with ``trio.serve_tcp`` on 127.0.0.1, print the port,
    answer ``commands`` until stdin ends, then cancel every handler."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(
                trio.serve_tcp, handle, 0, host="127.0.0.1", backlog=BACKLOG
            )
        )
        say(port=listeners[0].socket.getsockname()[1])
        await control_loop(commands)
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------
# The driver's side


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (KiB) of a process, from /proc."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Child:
    """A child process speaking JSON lines; stopped by closing its stdin."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.pid = process.pid
        self._pending = b""

    @classmethod
    async def start(cls, script: str, *args: str) -> Child:
        process = await trio.lowlevel.open_process(
            [sys.executable, script, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        return cls(process)

    async def read(self) -> dict[str, Any]:
        """The child's next JSON line."""
        assert self.process.stdout is not None
        while b"\n" not in self._pending:
            data = await self.process.stdout.receive_some()
            if not data:
                raise RuntimeError(f"child {self.pid} exited")
            self._pending += data
        line, _, self._pending = self._pending.partition(b"\n")
        reply: dict[str, Any] = json.loads(line)
        return reply

    async def command(self, *words: object) -> dict[str, Any]:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(" ".join(map(str, words)).encode() + b"\n")
        return await self.read()

    async def wait_open(self, count: int, seconds: float = 60.0) -> int:
        """Poll the server's registry until it holds ``count`` (bounded)."""
        open_now = -1
        with trio.move_on_after(seconds):
            for _ in range(100_000):
                open_now = int((await self.command("stats"))["open"])
                if open_now == count:
                    break
                await trio.sleep(0.02)
        return open_now

    async def stop(self) -> None:
        """Close stdin, wait for the exit (kill our own child after 10 s)."""
        process = self.process
        if process.stdin is not None:
            await process.stdin.aclose()
        with trio.move_on_after(10):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()
        if process.stdout is not None:
            await process.stdout.aclose()


async def start_server(
    script: str, implementation: str, *args: str
) -> tuple[Child, int]:
    child = await Child.start(script, "--serve", implementation, *args)
    port = int((await child.read())["port"])
    return child, port


def print_table(
    title: str, header: Sequence[str], rows: Sequence[Sequence[object]]
) -> None:
    """A plain fixed-width table."""
    cells = [list(map(str, header))] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    for index, row in enumerate(cells):
        print(
            "  ".join(
                cell.rjust(width) for cell, width in zip(row, widths, strict=True)
            )
        )
        if index == 0:
            print("  ".join("-" * width for width in widths))
    sys.stdout.flush()
