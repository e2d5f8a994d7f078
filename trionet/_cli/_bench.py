"""``trionet bench``: an echo server in a child process, a fixed set of loads.

For each framing (line, then frame) the bench starts
``python -m trionet echo --port 0`` on loopback, reads the port from its
``listening on`` line, runs that framing's scenarios in this process against
it, then stops it with SIGINT and waits (killing it only if it does not exit
within a few seconds).  One table of results follows.
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import IO

import attrs
import trio

from ._common import EXIT_RUNTIME, CliError, Parser, say
from ._load import LoadResult, LoadSpec, run_load, validate
from ._output import open_progress, print_table

__all__ = ["SCENARIOS", "Scenario", "add_parser", "run"]

#: Seconds the echo server may take to print its address.
STARTUP_TIMEOUT = 20.0
#: Seconds the echo server may take to exit after SIGINT before it is killed.
STOP_TIMEOUT = 5.0
#: Hard bound on each scenario of a --quick run.
QUICK_TIME_LIMIT = 30.0

_LISTENING = re.compile(rb"listening on (\[[^\]]+\]|[^\s:,]+):(\d+)")


@attrs.frozen
class Scenario:
    """One load of the bench."""

    framing: str
    connections: int
    pipeline: int
    size: int
    #: Total messages of a full run and of a --quick run.
    messages: int
    quick_messages: int

    def spec(self, host: str, port: int, quick: bool) -> LoadSpec:
        """The load to run against the echo server at ``host:port``."""
        return LoadSpec(
            host=host,
            port=port,
            connections=self.connections,
            messages=self.quick_messages if quick else self.messages,
            size=self.size,
            framing=self.framing,
            pipeline=self.pipeline,
            time_limit=QUICK_TIME_LIMIT if quick else None,
        )


KIB = 1024


def _scenarios() -> list[Scenario]:
    found = []
    for framing in ("line", "frame"):
        found += [
            # ping-pong and pipelined, 1 and 50 connections, 64 B
            Scenario(framing, 1, 1, 64, 20_000, 1_000),
            Scenario(framing, 50, 1, 64, 50_000, 5_000),
            Scenario(framing, 1, 64, 64, 200_000, 10_000),
            Scenario(framing, 50, 64, 64, 400_000, 20_000),
            # large messages: 64 KiB (a line of exactly Lines().max_length)
            Scenario(framing, 1, 1, 64 * KIB, 2_000, 200),
            Scenario(framing, 50, 4, 64 * KIB, 10_000, 1_000),
        ]
    return found


#: Every scenario, in the order they run and are printed.
SCENARIOS = _scenarios()


def add_parser(commands: argparse._SubParsersAction[Parser]) -> None:
    """Add the ``bench`` command to ``commands``."""
    parser = commands.add_parser(
        "bench",
        help="start an echo server and benchmark it",
        description=(
            "Start 'trionet echo' on loopback in a child process, run a fixed "
            "set of loads against it (line and frame framing, 1 and 50 "
            "connections, ping-pong and pipelined, 64 B and 64 KiB messages) "
            "and print one table."
        ),
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small message counts: the whole bench takes a few seconds",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """``trionet bench``: exit code 0 when no scenario had errors, else 1."""
    for scenario in SCENARIOS:
        validate(scenario.spec("127.0.0.1", 1, args.quick))
    results = trio.run(_bench, args.quick)
    _print(results)
    if any(result.errors for result in results):
        return EXIT_RUNTIME
    return 0


async def _bench(quick: bool) -> list[LoadResult]:
    results = []
    for framing in ("line", "frame"):
        async with _echo_server(framing) as (host, port):
            for number, scenario in enumerate(SCENARIOS, 1):
                if scenario.framing != framing:
                    continue
                spec = scenario.spec(host, port, quick)
                label = f"bench {number}/{len(SCENARIOS)}"
                with open_progress(label, "messages") as progress:
                    results.append(await run_load(spec, progress))
    return results


def _print(results: list[LoadResult]) -> None:
    headers = [
        "framing",
        "conns",
        "pipeline",
        "size",
        "messages",
        "msg/s",
        "MB/s",
        "p50 us",
        "p90 us",
        "p99 us",
        "max us",
        "errors",
    ]
    rows = []
    for result in results:
        spec = result.spec
        p = result.percentiles()
        size = f"{spec.size // KIB} KiB" if spec.size % KIB == 0 else f"{spec.size} B"
        errors = ", ".join(f"{k} {n}" for k, n in sorted(result.errors.items()))
        rows.append(
            [
                spec.framing_name,
                str(spec.connections),
                str(spec.pipeline),
                size,
                f"{result.messages:,}",
                f"{result.messages_per_s:,.0f}",
                f"{result.mb_per_s:,.1f}",
                *(_us(p[name]) for name in ("p50", "p90", "p99", "max")),
                errors or "0",
            ]
        )
    print_table(headers, rows, right=range(1, 11), title="trionet bench (loopback)")


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


@asynccontextmanager
async def _echo_server(framing: str) -> AsyncIterator[tuple[str, int]]:
    """Run ``trionet echo`` in a child process; yield the address it listens on."""
    command = [
        sys.executable,
        "-m",
        "trionet",
        "echo",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--framing",
        framing,
    ]
    with tempfile.TemporaryFile() as errors:
        process = await trio.lowlevel.open_process(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors
        )
        try:
            host, port = await _read_address(process, errors)
            yield host, port
        finally:
            with trio.CancelScope(shield=True):
                await _stop(process, errors)


async def _read_address(process: trio.Process, errors: IO[bytes]) -> tuple[str, int]:
    assert process.stdout is not None
    output = b""
    with trio.move_on_after(STARTUP_TIMEOUT):
        while b"\n" not in output:
            chunk = await process.stdout.receive_some()
            if not chunk:
                break
            output += chunk
    match = _LISTENING.search(output)
    if match is None:
        detail = _tail(errors) or output.decode(errors="replace").strip()
        raise CliError(
            f"the echo server (pid {process.pid}) did not report its address"
            + (f": {detail}" if detail else "")
        )
    return match.group(1).decode().strip("[]"), int(match.group(2))


async def _stop(process: trio.Process, errors: IO[bytes]) -> None:
    """SIGINT the echo server we started; kill it if it does not exit in time."""
    if process.returncode is None:
        if sys.platform == "win32":  # pragma: no cover - no SIGINT to send
            process.terminate()
        else:
            process.send_signal(signal.SIGINT)
        with trio.move_on_after(STOP_TIMEOUT):
            await process.wait()
        code = process.poll()
        if code is None:
            say(f"echo server (pid {process.pid}) did not stop; killing it")
            process.kill()
            await process.wait()
        elif code != 0:
            detail = _tail(errors)
            say(
                f"echo server (pid {process.pid}) exited with code {code}"
                + (f": {detail}" if detail else "")
            )
    assert process.stdout is not None
    await process.stdout.aclose()


def _tail(errors: IO[bytes]) -> str:
    """The last line the echo server wrote on stderr."""
    errors.seek(0)
    lines = errors.read().decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else ""
