"""``trionet echo``: an echo server over TCP (line, frame or raw) or UDP.

It prints ``listening on HOST:PORT (...)`` as its first line on stdout, then
serves until SIGINT or SIGTERM, shuts down gracefully (the server stops
accepting, handlers get the grace period, queued replies are flushed) and
exits with code 0.  A second signal during the shutdown stops at once.
"""

from __future__ import annotations

import argparse
import signal
import ssl
from collections.abc import AsyncIterator
from functools import partial

import trio

import trionet

from ._common import (
    CliError,
    Parser,
    UsageError,
    format_address,
    non_negative_float,
    parse_port,
    say,
)

__all__ = ["add_parser", "run"]

#: Seconds a UDP peer may stay silent before the server forgets it.
UDP_IDLE_TIMEOUT = 60.0
#: Exit code when a second signal cut the graceful shutdown short.
EXIT_FORCED = 130


def add_parser(commands: argparse._SubParsersAction[Parser]) -> None:
    """Add the ``echo`` command to ``commands``."""
    parser = commands.add_parser(
        "echo",
        help="run an echo server",
        description=(
            "Run an echo server that sends every message back as it came.  "
            "Prints 'listening on HOST:PORT' on stdout, stops gracefully on "
            "Ctrl-C (SIGINT) or SIGTERM."
        ),
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (127.0.0.1)"
    )
    parser.add_argument(
        "--port", type=parse_port, default=0, help="port; 0 picks a free one (0)"
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
    context = _ssl_context(args.tls_cert, args.tls_key) if args.tls_cert else None
    framing_name = args.framing or "line"
    return trio.run(partial(_serve, args, framing_name, context))


def _log_connect(conn: trionet.Connection) -> None:
    say(f"connect {format_address(conn.remote_address)}")


def _log_close(conn: trionet.Connection) -> None:
    reason = conn.close_reason.name if conn.close_reason else "?"
    say(
        f"close {format_address(conn.remote_address)}: {reason} "
        f"({conn.bytes_received} B in, {conn.bytes_sent} B out)"
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


async def _serve(
    args: argparse.Namespace, framing_name: str, context: ssl.SSLContext | None
) -> int:
    signals = [signal.SIGINT]
    if hasattr(signal, "SIGTERM"):
        signals.append(signal.SIGTERM)
    with trio.open_signal_receiver(*signals) as received:
        async with trio.open_nursery() as nursery:
            server: trionet.Server | trionet.UdpServer
            try:
                if args.udp:
                    server = await nursery.start(
                        partial(
                            trionet.serve_udp,
                            partial(_echo_datagrams, args.verbose),
                            args.port,
                            host=args.host,
                            idle_timeout=UDP_IDLE_TIMEOUT,
                        )
                    )
                    what = "udp"
                else:
                    framing: trionet.Framing | None = None
                    if framing_name == "line":
                        framing = trionet.Lines()
                    elif framing_name == "frame":
                        framing = trionet.Frames()
                    handler = _echo_raw if framing is None else _echo_messages
                    server = await nursery.start(
                        partial(
                            trionet.serve_tcp,
                            handler,
                            args.port,
                            host=args.host,
                            framing=framing,
                            ssl_context=context,
                            grace_period=args.grace_period,
                            on_connect=_log_connect if args.verbose else None,
                            on_close=_log_close if args.verbose else None,
                        )
                    )
                    what = ("tls" if context else "tcp") + f", {framing_name} framing"
            except OSError as exc:
                raise CliError(
                    f"cannot listen on {args.host} port {args.port}: "
                    f"{exc.strerror or exc}"
                ) from exc
            where = ", ".join(format_address(a) for a in server.addresses)
            print(f"listening on {where} ({what})", flush=True)
            name = await _next_signal(received)
            say(f"{name}: shutting down (grace period {args.grace_period:g} s)")
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
    _report(server)
    return EXIT_FORCED if forced else 0


async def _next_signal(received: AsyncIterator[int]) -> str:
    async for signum in received:
        return signal.Signals(signum).name
    raise AssertionError("signal receivers never end")  # pragma: no cover


def _report(server: trionet.Server | trionet.UdpServer) -> None:
    if isinstance(server, trionet.Server):
        stats = server.stats
        closed = ", ".join(
            f"{r.name} {n}"
            for r, n in sorted(stats.closed.items(), key=lambda i: i[0].name)
        )
        say(
            f"stopped: {stats.accepted} connections served"
            + (f" ({closed})" if closed else "")
        )
    else:
        udp = server.stats
        say(
            f"stopped: {udp.peers_started} peers, {udp.received} datagrams "
            f"received, {udp.dropped} dropped"
        )


async def _echo_datagrams(verbose: bool, peer: trionet.UdpPeer) -> None:
    address = format_address(peer.remote_address)
    if verbose:
        say(f"peer {address}")
    try:
        async for data in peer:
            await peer.send(data)
    except (trionet.ConnectionClosed, trionet.DatagramError, trionet.MessageTooLarge):
        pass
    finally:
        if verbose:
            reason = peer.close_reason.name if peer.close_reason else "done"
            say(f"peer {address} ended: {reason}")
