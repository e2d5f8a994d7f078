"""Running a load: open every connection, run them under the time limit, report."""

from __future__ import annotations

import argparse
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack

import attrs
import trio

import trionet

from ..._util import unwrap_single_exception
from .._common import EXIT_INTERRUPTED, EXIT_RUNTIME, CliError, Parser, say
from .._histogram import LogLinearHistogram
from .._output import Progress, open_progress, print_table
from ._spec import LoadSpec, add_arguments, spec_from_args, validate
from ._state import LoadState
from ._tcp import connect_tcp, tcp_connection
from ._udp import open_udp, probe_udp, udp_endpoint

__all__ = ["LoadResult", "add_parser", "print_result", "run", "run_load"]

#: Connections opened at once while connecting.
CONNECT_CONCURRENCY = 64


@attrs.frozen(kw_only=True)
class LoadResult:
    """What a run measured."""

    spec: LoadSpec
    #: Messages whose echo came back intact and in order.
    messages: int
    #: Failures by close reason, exception type, "mismatch", "lost" or "time_limit".
    errors: dict[str, int]
    elapsed: float
    latency: LogLinearHistogram
    #: Whether the run was stopped early (Ctrl-C): the counts are those so far.
    interrupted: bool = False

    @property
    def messages_per_s(self) -> float:
        """Echoed messages per second."""
        return self.messages / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def mb_per_s(self) -> float:
        """Echoed payload in megabytes (10**6 bytes) per second, one way."""
        return self.messages_per_s * self.spec.size / 1e6

    def percentiles(self) -> dict[str, float | None]:
        """p50, p90, p99 and max round-trip time in microseconds."""
        hist = self.latency
        return {
            "p50": hist.percentile(50),
            "p90": hist.percentile(90),
            "p99": hist.percentile(99),
            "max": None if hist.max is None else float(hist.max),
        }

    def as_json(self) -> dict[str, object]:
        """The machine-readable result that ``--json`` prints."""
        spec = self.spec
        return {
            "target": spec.target,
            "transport": spec.transport,
            "connections": spec.connections,
            "messages": self.messages,
            "errors": dict(sorted(self.errors.items())),
            "elapsed_s": round(self.elapsed, 6),
            "messages_per_s": round(self.messages_per_s, 1),
            "mb_per_s": round(self.mb_per_s, 3),
            "latency_us": {
                name: None if value is None else round(value, 1)
                for name, value in self.percentiles().items()
            },
            "framing": spec.framing_name,
            "size": spec.size,
            "pipeline": spec.pipeline,
            "interrupted": self.interrupted,
        }


# ----------------------------------------------------------------- the run


Opened = trionet.Connection | trionet.Datagram


async def _open_all(
    spec: LoadSpec, run: LoadState, stack: AsyncExitStack
) -> list[Opened]:
    """Open every connection; the first failing is fatal, later ones count."""
    opener: Callable[[LoadSpec, AsyncExitStack], Awaitable[Opened]]
    opener = open_udp if spec.udp else connect_tcp
    try:
        first = await opener(spec, stack)
    except OSError as exc:  # ConnectError (it names the OS's reason), or a UDP bind
        message = str(exc)
        if spec.path is None:
            # connect_tcp writes the address as host:port; ours brackets IPv6.
            message = message.replace(f"{spec.host}:{spec.port}", spec.target, 1)
        raise CliError(message) from exc
    if isinstance(first, trionet.Datagram):
        await probe_udp(spec, first)
    opened: list[Opened] = [first]
    limiter = trio.CapacityLimiter(CONNECT_CONCURRENCY)

    async def open_one() -> None:
        async with limiter:
            try:
                opened.append(await opener(spec, stack))
            except OSError as exc:
                run.count_error(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(spec.connections - 1):
            nursery.start_soon(open_one)
    return opened


async def run_load(
    spec: LoadSpec,
    progress: Progress | None = None,
    *,
    stop: trio.Event | None = None,
) -> LoadResult:
    """Run ``spec`` and measure it.

    Setting ``stop`` ends the run early: every connection is closed where it
    stands and the result, marked ``interrupted``, holds what was measured
    until then (messages still in flight are neither echoes nor errors).

    Raises:
        CliError: the first connection could not be made (nothing listening),
            or a UDP target does not echo.
    """
    run = LoadState(spec)
    opened: list[Opened] = []
    async with AsyncExitStack() as stack:
        with trio.move_on_after(spec.hard_limit) as limit:
            # (One exception from the body, e.g. the first connect's CliError,
            # reaches the caller as itself.)
            with unwrap_single_exception():
                async with trio.open_nursery() as nursery:
                    if stop is not None:
                        nursery.start_soon(_stop_when_set, stop, run, nursery)
                    opened = await _open_all(spec, run, stack)
                    run.started = trio.current_time()
                    if spec.duration is not None:
                        run.deadline = run.started + spec.duration
                    if progress is not None:
                        nursery.start_soon(_report_progress, run, progress)
                    async with trio.open_nursery() as workers:
                        for resource in opened:
                            workers.start_soon(_load_one, run, resource)
                    if run.finished is None:
                        run.finished = trio.current_time()
                    nursery.cancel_scope.cancel()
    if run.interrupted and run.started is None:  # while connecting
        run.started = run.finished
    if run.started is None:
        raise CliError(
            f"could not open {spec.connections} connections to {spec.target} "
            f"within the time limit of {spec.hard_limit:g} s"
        )
    if limit.cancelled_caught and run.finished is None:
        run.errors["time_limit"] += len(opened) - run.ended
        run.finished = trio.current_time()
    assert run.finished is not None
    return LoadResult(
        spec=spec,
        messages=run.completed,
        errors=dict(run.errors),
        elapsed=run.finished - run.started,
        latency=run.latency,
        interrupted=run.interrupted,
    )


async def _stop_when_set(
    stop: trio.Event, run: LoadState, nursery: trio.Nursery
) -> None:
    """End the run at once when ``stop`` is set, unless it is over already."""
    await stop.wait()
    if run.finished is None:
        run.interrupted = True
        run.finished = trio.current_time()
        nursery.cancel_scope.cancel()


async def _load_one(run: LoadState, resource: Opened) -> None:
    """Load one connection or endpoint until the run is over or it fails."""
    if isinstance(resource, trionet.Datagram):
        await udp_endpoint(run, resource)
    else:
        await tcp_connection(run, resource)
    run.ended += 1


async def _report_progress(run: LoadState, progress: Progress) -> None:
    spec = run.spec
    assert run.started is not None
    while True:
        if spec.duration is not None:
            done = min(spec.duration, trio.current_time() - run.started)
            progress.update(
                done, spec.duration, run.completed, sum(run.errors.values())
            )
        else:
            assert spec.messages is not None
            progress.update(
                run.completed, spec.messages, run.completed, sum(run.errors.values())
            )
        await trio.sleep(progress.interval)


# ------------------------------------------------------------ the command


def add_parser(commands: argparse._SubParsersAction[Parser]) -> None:
    """Add the ``load`` command to ``commands``."""
    parser = commands.add_parser(
        "load",
        help="drive load at an echo server and measure it",
        description=(
            "Open connections to an echo server, send messages and check that "
            "every echo comes back intact and in order.  Reports messages/s, "
            "MB/s, latency percentiles and errors."
        ),
    )
    add_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """``trionet load``: exit code 0 when every message was echoed, else 1.

    Ctrl-C (SIGINT) ends the run early: the results so far are printed,
    marked as interrupted, and the exit code is 130.  A second Ctrl-C while
    the connections close stops at once, without results.
    """
    spec = spec_from_args(args)
    validate(spec)

    async def main() -> LoadResult:
        total_label = "s" if spec.duration is not None else "messages"
        stop = trio.Event()
        with trio.open_signal_receiver(signal.SIGINT) as signals:
            with unwrap_single_exception():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_stop_on_signals, signals, stop)
                    with open_progress(
                        f"load {spec.target}", total_label, json=args.json
                    ) as progress:
                        result = await run_load(spec, progress, stop=stop)
                    nursery.cancel_scope.cancel()
        return result

    result = trio.run(main)
    if result.interrupted:
        say("trionet load: interrupted: the results so far")
    if args.json:
        import json

        print(json.dumps(result.as_json()), flush=True)
    else:
        print_result(result)
    if result.interrupted:
        return EXIT_INTERRUPTED
    if result.errors:
        return EXIT_RUNTIME
    return 0


async def _stop_on_signals(signals: AsyncIterator[int], stop: trio.Event) -> None:
    """The first signal stops the run; a second one stops the command at once."""
    async for _ in signals:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()


def _number(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def print_result(result: LoadResult) -> None:
    """Print one run's result as a small table on stdout."""
    spec = result.spec
    p = result.percentiles()
    errors = ", ".join(f"{name} {n}" for name, n in sorted(result.errors.items()))
    rate = f", rate {spec.rate:g}/s" if spec.rate else ""
    print(
        f"trionet load {spec.target}: {spec.transport}, {spec.framing_name} framing, "
        f"{spec.connections} connections, {spec.size} B messages, "
        f"pipeline {spec.pipeline}{rate}",
        flush=True,
    )
    rows = []
    if result.interrupted:
        if spec.duration is not None:
            planned = f"of {spec.duration:g} s"
        else:
            planned = f"of {spec.messages:,} messages"
        rows.append(["interrupted", f"after {result.elapsed:.2f} s {planned}"])
    rows += [
        ["messages", f"{result.messages:,} in {result.elapsed:.2f} s"],
        [
            "throughput",
            f"{_number(result.messages_per_s)} msg/s, {result.mb_per_s:.2f} MB/s",
        ],
        [
            "latency (us)",
            f"p50 {_number(p['p50'])}  p90 {_number(p['p90'])}  "
            f"p99 {_number(p['p99'])}  max {_number(p['max'])}",
        ],
        ["errors", errors or "none"],
    ]
    print_table(None, rows, header=False)
