"""``trionet echo``: an echo server over TCP or a UNIX socket (line, frame or
raw) or UDP.

It prints ``listening on HOST:PORT (...)`` as its first line on stdout, then
serves until SIGINT or SIGTERM, shuts down gracefully (the server stops
accepting, handlers get the grace period, queued replies are flushed) and
exits with code 0.  A second signal during the shutdown stops at once.

With ``--workers N`` the same server runs in N processes
(:func:`trionet.run_workers`) that share the port through SO_REUSEPORT; the
parent prints the ``listening on`` line once every worker serves, forwards
the stop request, and sums the workers' counts in its ``stopped:`` line.  A
signal to the whole process group (Ctrl-C in a terminal, systemd, docker)
is the same single stop request.  A worker that ends on its own (killed, or
signalled alone) is replaced by the pool; its counts join its successor's.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import ssl
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from functools import partial
from typing import Any, TypeAlias

import attrs
import trio

import trionet

from .._listeners import bind_sockets, reuse_port_option
from ._common import (
    CliError,
    Parser,
    UsageError,
    format_address,
    non_negative_float,
    parse_host,
    parse_port,
    positive_int,
    say,
)

__all__ = ["add_parser", "run"]

#: Seconds a UDP peer may stay silent before the server forgets it.
UDP_IDLE_TIMEOUT = 60.0
#: Exit code when a second signal cut the graceful shutdown short.
EXIT_FORCED = 130
#: With --workers: seconds a worker has past the grace period to flush and exit.
SHUTDOWN_MARGIN = 10.0


def add_parser(commands: argparse._SubParsersAction[Parser]) -> None:
    """Add the ``echo`` command to ``commands``."""
    parser = commands.add_parser(
        "echo",
        help="run an echo server",
        description=(
            "Run an echo server that sends every message back as it came.  "
            "Prints 'listening on HOST:PORT' (or the --unix PATH) on stdout, "
            "stops gracefully on Ctrl-C (SIGINT) or SIGTERM."
        ),
    )
    parser.add_argument(
        "--host",
        type=parse_host,
        default=None,
        help="address to listen on; IPv6 with or without brackets (127.0.0.1)",
    )
    parser.add_argument(
        "--port", type=parse_port, default=None, help="port; 0 picks a free one (0)"
    )
    parser.add_argument(
        "--unix",
        metavar="PATH",
        help="listen on a UNIX socket at PATH (mode 0600: this user only) "
        "instead of a TCP port",
    )
    parser.add_argument(
        "--framing",
        choices=["line", "frame", "raw"],
        default=None,
        help="line: newline-terminated lines; frame: 4-byte length prefix; "
        "raw: bytes as they arrive (line)",
    )
    parser.add_argument(
        "--udp", action="store_true", help="echo UDP datagrams instead of TCP"
    )
    parser.add_argument(
        "--tls-cert", metavar="FILE", help="serve TLS with this PEM certificate chain"
    )
    parser.add_argument(
        "--tls-key", metavar="FILE", help="the PEM private key of --tls-cert"
    )
    parser.add_argument(
        "--grace-period",
        type=non_negative_float,
        default=1.0,
        metavar="SECONDS",
        help="at shutdown, how long open connections may finish (1.0)",
    )
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        metavar="N",
        help="serve from N processes sharing the port with SO_REUSEPORT (1)",
    )
    parser.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="log every connect and close (with its close reason) on stderr",
    )
    parser.set_defaults(run=run)


def _ssl_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except OSError as exc:  # also ssl.SSLError
        detail = exc.strerror or str(exc)
        raise CliError(
            f"cannot load the TLS certificate {cert!r} with key {key!r}: {detail}"
        ) from exc
    return context


@attrs.frozen
class _Options:
    """What a server (in this process or in a worker) is started with."""

    host: str
    port: int
    udp: bool
    framing_name: str
    tls_cert: str | None
    tls_key: str | None
    grace_period: float
    verbose: bool
    #: A UNIX socket path to listen on instead of host and port.
    unix: str | None = None


def run(args: argparse.Namespace) -> int:
    """Check the options, then serve until a signal arrives."""
    if args.udp:
        if args.framing is not None:
            raise UsageError(
                "--framing does not apply to --udp: a datagram is a message"
            )
        if args.tls_cert or args.tls_key:
            raise UsageError("--tls-cert/--tls-key do not apply to --udp")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    if args.unix is not None:
        if args.host is not None or args.port is not None:
            raise UsageError("--unix replaces --host and --port: give one or the other")
        if args.udp:
            raise UsageError("--unix does not apply to --udp: it serves a stream")
        if args.workers > 1:
            raise UsageError(
                "--workers does not apply to --unix: processes share a port "
                "with SO_REUSEPORT, which UNIX sockets do not have"
            )
    options = _Options(
        host="127.0.0.1" if args.host is None else args.host,
        port=0 if args.port is None else args.port,
        unix=args.unix,
        udp=args.udp,
        framing_name=args.framing or "line",
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        grace_period=args.grace_period,
        verbose=args.verbose,
    )
    context = _load_tls(options)  # also checks the files before any worker starts
    if args.workers > 1:
        return _serve_with_workers(options, args.workers)
    return trio.run(_serve, options, context)


def _load_tls(options: _Options) -> ssl.SSLContext | None:
    if options.tls_cert is None or options.tls_key is None:
        return None
    return _ssl_context(options.tls_cert, options.tls_key)


def _who(conn: trionet.Connection) -> str:
    """The client: its address, or on a UNIX socket its process and user."""
    credentials = conn.peer_credentials
    if credentials is not None:
        return f"pid {credentials.pid} uid {credentials.uid}"
    return format_address(conn.remote_address)


def _log_connect(conn: trionet.Connection) -> None:
    say(f"connect {_who(conn)}")


def _log_close(conn: trionet.Connection) -> None:
    reason = conn.close_reason.name if conn.close_reason else "?"
    stats = conn.statistics()
    say(
        f"close {_who(conn)}: {reason} "
        f"({stats.bytes_received} B in, {stats.bytes_sent} B out)"
    )


async def _echo_messages(conn: trionet.Connection) -> None:
    try:
        async for message in conn:
            await conn.send(message)
    except (trionet.ConnectionClosed, trionet.ProtocolError):
        # The peer's doing; the connection's close_reason records it.
        pass


async def _echo_raw(conn: trionet.Connection) -> None:
    try:
        while data := await conn.receive_some():
            await conn.send_all(data)
    except trionet.ConnectionClosed:
        pass


_AnyServer: TypeAlias = "trionet.Server | trionet.UdpServer"


async def _start_server(
    nursery: trio.Nursery,
    options: _Options,
    context: ssl.SSLContext | None,
    port: int,
    *,
    reuse_port: bool = False,
) -> tuple[_AnyServer, str]:
    """Start the echo server in ``nursery``; return it and what it speaks."""
    server: _AnyServer
    try:
        if options.udp:
            server = await nursery.start(
                partial(
                    trionet.serve_udp,
                    partial(_echo_datagrams, options.verbose),
                    port,
                    host=options.host,
                    idle_timeout=UDP_IDLE_TIMEOUT,
                    grace_period=options.grace_period,
                    reuse_port=reuse_port,
                )
            )
            return server, "udp"
        framing: trionet.Framing | None = None
        if options.framing_name == "line":
            framing = trionet.Lines()
        elif options.framing_name == "frame":
            framing = trionet.Frames()
        handler = _echo_raw if framing is None else _echo_messages
        if options.unix is not None:
            serve = partial(trionet.serve_unix, handler, options.unix)
            what = "tls over unix" if context else "unix"
        else:
            serve = partial(
                trionet.serve_tcp,
                handler,
                port,
                host=options.host,
                reuse_port=reuse_port,
            )
            what = "tls" if context else "tcp"
        server = await nursery.start(
            partial(
                serve,
                framing=framing,
                ssl_context=context,
                grace_period=options.grace_period,
                on_connect=_log_connect if options.verbose else None,
                on_close=_log_close if options.verbose else None,
            )
        )
    except OSError as exc:
        raise _cannot_listen(options, port, exc) from exc
    return server, f"{what}, {options.framing_name} framing"


def _cannot_listen(options: _Options, port: int, exc: OSError) -> CliError:
    if options.unix is not None:
        where = options.unix
    else:
        where = format_address((options.host, port))
    return CliError(f"cannot listen on {where}: {exc.strerror or exc}")


async def _serve(options: _Options, context: ssl.SSLContext | None) -> int:
    signals = [signal.SIGINT]
    if hasattr(signal, "SIGTERM"):
        signals.append(signal.SIGTERM)
    with trio.open_signal_receiver(*signals) as received:
        async with trio.open_nursery() as nursery:
            server, what = await _start_server(nursery, options, context, options.port)
            where = ", ".join(format_address(a) for a in server.addresses)
            print(f"listening on {where} ({what})", flush=True)
            name = await _next_signal(received)
            say(f"{name}: shutting down (grace period {options.grace_period:g} s)")
            forced = False

            async def stop_on_second_signal() -> None:
                nonlocal forced
                name = await _next_signal(received)
                say(f"{name} again: stopping now")
                forced = True
                nursery.cancel_scope.cancel()

            async with trio.open_nursery() as shutdown:
                shutdown.start_soon(stop_on_second_signal)
                await server.aclose()
                shutdown.cancel_scope.cancel()
    say(_summary([_stats(server)]))
    return EXIT_FORCED if forced else 0


async def _next_signal(received: AsyncIterator[int]) -> str:
    async for signum in received:
        return signal.Signals(signum).name
    raise AssertionError("signal receivers never end")  # pragma: no cover


def _stats(server: _AnyServer) -> dict[str, Any]:
    """The counts the closing summary reports, as JSON a worker can send."""
    if isinstance(server, trionet.Server):
        stats = server.statistics()
        closed = {reason.name: n for reason, n in stats.closed.items()}
        return {"accepted": stats.accepted, "open": stats.open, "closed": closed}
    udp = server.statistics()
    return {
        "peers": udp.peers_started,
        "received": udp.received,
        "dropped": udp.dropped,
    }


def _clients(stats: Mapping[str, Any]) -> int:
    """UDP peers, or every connection a TCP server took: closed or open."""
    if "peers" in stats:
        return int(stats["peers"])
    return int(sum(stats.get("closed", {}).values()) + stats.get("open", 0))


def _summary(stats: Sequence[Mapping[str, Any]], workers: int = 1) -> str:
    """``stopped: ...`` for the stats of one server or of every worker's.

    Over TCP the counts by close reason add up to the number of connections:
    those that ended before their handler ran (a failed TLS handshake, a
    client gone at once) are counted, and said apart from those served.
    """
    total: Counter[str] = Counter()
    closed: Counter[str] = Counter()
    for one in stats:
        total.update({k: v for k, v in one.items() if k != "closed"})
        closed.update(one.get("closed", {}))
    shares = " + ".join(str(_clients(one)) for one in stats)
    by = f" by {workers} workers ({shares})" if workers > 1 else ""
    if "peers" in total:
        return (
            f"stopped: {total['peers']} peers, {total['received']} datagrams "
            f"received, {total['dropped']} dropped{by}"
        )
    if total["open"]:
        closed["open"] = total["open"]
    listed = ", ".join(f"{name} {n}" for name, n in sorted(closed.items()))
    connections = sum(closed.values())
    served = total["accepted"]
    if connections == served:
        return (
            f"stopped: {served} connections served"
            + (f" ({listed})" if listed else "")
            + by
        )
    return (
        f"stopped: {connections} connections ({listed}){by}: {served} served, "
        f"{connections - served} closed before their handler ran "
        "(failed TLS handshake, or the client left at once)"
    )


# --------------------------------------------------------------- --workers


def _serve_with_workers(options: _Options, workers: int) -> int:
    """Serve from ``workers`` processes that share one port (SO_REUSEPORT).

    The parent binds the port first (without listening), so a busy port or a
    bad host fails here in one line, and ``--port 0`` picks one port for every
    worker.  It lets that socket go once a worker holds the port, and prints
    the ``listening on`` line when every worker is serving.
    """
    try:
        reuse_port_option()
    except OSError as exc:
        raise UsageError(f"--workers needs SO_REUSEPORT: {exc}") from exc
    kind = socket.SOCK_DGRAM if options.udp else socket.SOCK_STREAM
    try:
        reserved = trio.run(
            partial(bind_sockets, [options.host], options.port, kind, _reusable)
        )
    except OSError as exc:
        raise _cannot_listen(options, options.port, exc) from exc
    pool = _PoolView(workers, reserved)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("trionet")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        code = trionet.run_workers(
            _worker_main,
            workers,
            args=(options, reserved[0].getsockname()[1]),
            shutdown_timeout=options.grace_period + SHUTDOWN_MARGIN,
            on_report=pool.on_report,
        )
    finally:
        pool.release()
        logger.removeHandler(handler)
    if pool.error is not None:
        raise CliError(pool.error)
    say(_summary([pool.stopped[i] for i in sorted(pool.stopped)], workers))
    return code


def _reusable(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, reuse_port_option(), 1)


class _PoolView:
    """The parent's view of its workers, built from their reports."""

    def __init__(self, workers: int, reserved: list[socket.socket]) -> None:
        self.workers = workers
        self.reserved = reserved
        self.ready: set[int] = set()
        self.announced = False
        self.stopped: dict[int, Mapping[str, Any]] = {}
        self.error: str | None = None

    def release(self) -> None:
        for sock in self.reserved:
            sock.close()
        self.reserved = []

    def on_report(self, index: int, report: dict[str, Any]) -> None:
        if "error" in report:
            if self.error is None:
                self.error = str(report["error"])
                # Ask the pool to stop, as Ctrl-C would: run_workers handles
                # this process's own SIGTERM by stopping every worker.
                signal.raise_signal(signal.SIGTERM)
        elif "stopped" in report:
            # A worker that was replaced reported before: add them up.
            self.stopped[index] = _add_counts(
                self.stopped.get(index, {}), report["stopped"]
            )
        elif "listening" in report:
            self.release()  # a worker holds the port now
            self.ready.add(index)
            if len(self.ready) == self.workers and not self.announced:
                self.announced = True
                print(
                    f"listening on {report['listening']} "
                    f"({report['what']}, {self.workers} workers)",
                    flush=True,
                )


def _add_counts(one: Mapping[str, Any], other: Mapping[str, Any]) -> dict[str, Any]:
    """Two workers' (or two runs of one worker's) counts, added up."""
    total = dict(one)
    for key, value in other.items():
        if key == "closed":
            closed = Counter(total.get("closed", {}))
            closed.update(value)
            total["closed"] = dict(closed)
        else:
            total[key] = total.get(key, 0) + value
    return total


async def _worker_main(worker: trionet.Worker, options: _Options, port: int) -> None:
    """One worker of ``--workers``: serve on the shared port until told to stop."""
    async with trio.open_nursery() as nursery:
        try:
            server, what = await _start_server(
                nursery, options, _load_tls(options), port, reuse_port=True
            )
        except CliError as exc:
            worker.report({"error": str(exc)})
            return
        where = ", ".join(format_address(a) for a in server.addresses)
        worker.report({"listening": where, "what": what})
        await worker.shutdown_requested.wait()
        await server.aclose()
    worker.report({"stopped": _stats(server)})


async def _echo_datagrams(verbose: bool, peer: trionet.UdpPeer) -> None:
    address = format_address(peer.remote_address)
    if verbose:
        say(f"peer {address}")
    try:
        async for data in peer:
            await peer.send(data)
    except (
        trionet.ConnectionClosed,
        trionet.DatagramError,
        trionet.DatagramTooLarge,
        trionet.MessageTooLarge,
    ):
        pass
    finally:
        if verbose:
            reason = peer.close_reason.name if peer.close_reason else "done"
            say(f"peer {address} ended: {reason}")
