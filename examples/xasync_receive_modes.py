"""Line and sized receives with timeouts, and every close reason (XAsyncSockets).

XAsyncSockets' TCP client waits for a text line (``AsyncRecvLine``) or a
number of bytes (``AsyncRecvData``), each with a timeout, and reports why a
connection closed (``OnClosed(closedReason)``: Error, ClosedByHost,
ClosedByPeer, Timeout) and when a connect fails (``OnFailsToConnect``).

One server on 127.0.0.1 speaks a little line protocol; each scenario below
opens a client, and the server's ``on_close`` hook records how each
connection ended on the server's side.  At the end a table shows, per
scenario, the close reason each side saw.

* ``sized``   -- a header line "PUT <n>", then exactly n bytes of body, both
  received under ``trio.fail_after``; the client closes (CLOSED_BY_HOST here,
  CLOSED_BY_PEER on the server).
* ``patient`` -- a receive given up by ``trio.fail_after`` loses nothing: the
  half line that had arrived is still there for the next receive.
* ``bye``     -- the server answers and returns: CLOSED_BY_HOST on its side,
  CLOSED_BY_PEER on the client.
* ``idle``    -- the server's idle timeout closes a silent client: TIMEOUT.
* ``reset``   -- the client aborts with a TCP reset: ERROR on the server.
* ``long``    -- a line longer than the server's limit: PROTOCOL_ERROR.
* connecting to a port where nothing listens raises ConnectError (ERROR),
  and a connect that gets no answer in time raises ConnectError (TIMEOUT).

UDP datagrams, the other half of XAsyncSockets, are in examples/udp_echo.py.

Run it with ``python examples/xasync_receive_modes.py``; it ends by itself
(in about a second).  With ``--selftest`` it also checks every result and
exits non-zero if one is wrong.
"""

from __future__ import annotations

import socket
import struct
import sys

import trio

import trionet

CloseReason = trionet.CloseReason

#: The server refuses lines longer than this.
LINES = trionet.Lines(delimiter=b"\r\n", max_length=100)
#: How long the ``idle`` scenario's connection may stay silent.
IDLE_TIMEOUT = 0.3


def check(condition: bool, what: str) -> None:
    """Fail the self-test (even under ``python -O``) when ``condition`` is false."""
    if not condition:
        raise AssertionError(what)


class LineServer:
    """A server that dispatches on the first line each client sends."""

    def __init__(self) -> None:
        self.scenario: dict[trionet.Connection, str] = {}
        #: scenario -> the close reason the server's side ended with
        self.closed: dict[str, CloseReason | None] = {}
        #: scenario -> what the handler saw, in words
        self.saw: dict[str, str] = {}

    def on_close(self, conn: trionet.Connection) -> None:
        """Runs once per connection after it closed (close_reason is set)."""
        self.closed[self.scenario.get(conn, "?")] = conn.close_reason

    async def handle(self, conn: trionet.Connection) -> None:
        try:
            with trio.fail_after(5):
                command = await conn.receive_line()
        except trionet.ProtocolError as exc:
            # The line was too long: the connection is already closed with
            # PROTOCOL_ERROR.  Catch it so it is not logged as a crash.
            self.scenario[conn] = "long"
            self.saw["long"] = f"{type(exc).__name__}"
            return
        name = command.split()[0].decode().lower()
        self.scenario[conn] = name
        try:
            await getattr(self, f"do_{name}")(conn, command)
        except trionet.ConnectionClosed as exc:
            self.saw[name] = f"ConnectionClosed({exc.reason.name})"

    async def do_put(self, conn: trionet.Connection, command: bytes) -> None:
        size = int(command.split()[1])
        with trio.fail_after(5):  # like AsyncRecvData(size, timeoutSec=5)
            body = await conn.receive_exactly(size)
        await conn.send_line(f"OK {len(body)} bytes: {body.decode()}")
        # Serve until the client leaves; the loop ends quietly at its EOF.
        async for _ in conn:
            pass
        self.saw["put"] = f"end of stream; body {body!r}"

    async def do_patient(self, conn: trionet.Connection, command: bytes) -> None:
        await conn.send_all(b"half a li")  # no delimiter yet
        await conn.receive_line()  # the client says when to go on
        await conn.send_all(b"ne\r\n")
        self.saw["patient"] = "sent one line in two pieces"

    async def do_bye(self, conn: trionet.Connection, command: bytes) -> None:
        await conn.send_line("bye")
        self.saw["bye"] = "returned"  # returning closes the connection

    async def do_idle(self, conn: trionet.Connection, command: bytes) -> None:
        conn.idle_timeout = IDLE_TIMEOUT  # or the server option idle_timeout=
        await conn.receive_line()  # nothing comes: ConnectionClosed(TIMEOUT)

    async def do_echo(self, conn: trionet.Connection, command: bytes) -> None:
        async for line in conn:
            await conn.send_line(line)


async def scenario_sized(port: int) -> CloseReason | None:
    async with trionet.connect_tcp("127.0.0.1", port, framing=LINES) as conn:
        await conn.send_line("PUT 11")
        await conn.send_all(b"hello")  # the body may arrive in any pieces
        await conn.send_all(b" world")
        with trio.fail_after(5):  # like AsyncRecvLine(timeoutSec=5)
            reply = await conn.receive_line()
        print(f"  sized:   got {reply!r}")
    return conn.close_reason


async def scenario_patient(port: int) -> tuple[CloseReason | None, bytes]:
    async with trionet.connect_tcp("127.0.0.1", port, framing=LINES) as conn:
        await conn.send_line("PATIENT")
        try:
            with trio.fail_after(0.2):
                await conn.receive_line()
        except trio.TooSlowError:
            print("  patient: no whole line within 0.2 s (the connection stays open)")
        await conn.send_line("go on")
        with trio.fail_after(5):
            line = await conn.receive_line()
        print(f"  patient: then got {line!r}: nothing was lost")
    return conn.close_reason, line


async def scenario_bye(port: int) -> tuple[CloseReason | None, str]:
    async with trionet.connect_tcp("127.0.0.1", port, framing=LINES) as conn:
        await conn.send_line("BYE")
        with trio.fail_after(5):
            print(f"  bye:     got {await conn.receive_line()!r}")
            try:
                await conn.receive_line()
                saw = "another line?"
            except trionet.ConnectionClosed as exc:
                saw = f"ConnectionClosed({exc.reason.name})"
        print(f"  bye:     next receive raised {saw}")
    return conn.close_reason, saw


async def scenario_idle(port: int) -> CloseReason | None:
    async with trionet.connect_tcp("127.0.0.1", port, framing=LINES) as conn:
        await conn.send_line("IDLE")
        with trio.fail_after(5):
            data = await conn.receive_some()  # b"" once the server gives up
        print(f"  idle:    read {data!r} after the server's idle timeout")
    return conn.close_reason


async def scenario_reset(port: int) -> CloseReason | None:
    # A trio socket of our own, so that SO_LINGER can be set on it.
    sock = trio.socket.socket()
    await sock.connect(("127.0.0.1", port))
    async with trionet.Connection(trio.SocketStream(sock), framing=LINES) as conn:
        await conn.send_line("ECHO")
        await conn.send_line("ping")
        with trio.fail_after(5):
            print(f"  reset:   got {await conn.receive_line()!r}, now aborting")
        # SO_LINGER with a zero timeout turns close() into a TCP reset.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return conn.close_reason


async def scenario_long(port: int) -> CloseReason | None:
    async with trionet.connect_tcp("127.0.0.1", port, framing=LINES) as conn:
        await conn.send_all(b"x" * 200 + b"\r\n")
        with trio.fail_after(5):
            try:
                data = await conn.receive_some()
            except trionet.ConnectionClosed as exc:  # a reset, on some systems
                data = f"ConnectionClosed({exc.reason.name})".encode()
        print(f"  long:    read {data!r}: the server refused the line")
    return conn.close_reason


async def connect_failures() -> dict[str, CloseReason]:
    """ConnectError: nothing listening (ERROR), and no answer in time (TIMEOUT)."""
    results: dict[str, CloseReason] = {}
    with socket.socket() as probe:  # find a port where nothing listens
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    try:
        await trionet.connect_tcp("127.0.0.1", free_port)
    except trionet.ConnectError as exc:
        print(f"  refused: ConnectError({exc.reason.name}): {exc}")
        results["refused"] = exc.reason

    # A listener that never accepts, with a backlog of 0: once one connection
    # waits in its queue, Linux ignores further attempts until they time out.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        async with trionet.connect_tcp("127.0.0.1", port):
            try:
                late = await trionet.connect_tcp("127.0.0.1", port, connect_timeout=0.3)
            except trionet.ConnectError as exc:
                print(f"  timeout: ConnectError({exc.reason.name}): {exc}")
                results["timeout"] = exc.reason
            else:
                print("  timeout: (this system accepted the connection anyway)")
                await late.aclose()
    return results


async def main(selftest: bool) -> None:
    line_server = LineServer()
    client: dict[str, CloseReason | None] = {}
    async with trionet.open_tcp_server(
        line_server.handle,
        framing=LINES,
        on_close=line_server.on_close,
        host="127.0.0.1",
    ) as server:
        port = server.port
        print(f"line server on 127.0.0.1:{port}")
        with trio.fail_after(15):
            client["put"] = await scenario_sized(port)
            client["patient"], patient_line = await scenario_patient(port)
            client["bye"], bye_saw = await scenario_bye(port)
            client["idle"] = await scenario_idle(port)
            client["echo"] = await scenario_reset(port)
            client["long"] = await scenario_long(port)
            failures = await connect_failures()

    print()
    heading = ("scenario", "client side", "server side", "server handler saw")
    print("  {:<9} {:<16} {:<16} {}".format(*heading))
    # The server knows each connection by its first command.
    labels = {"put": "sized", "echo": "reset"}
    for name in ["put", "patient", "bye", "idle", "echo", "long"]:
        here, there = client[name], line_server.closed.get(name)
        print(
            f"  {labels.get(name, name):<9} {here.name if here else '-':<16} "
            f"{there.name if there else '-':<16} {line_server.saw.get(name, '-')}"
        )

    if selftest:
        expected = {
            "put": (CloseReason.CLOSED_BY_HOST, CloseReason.CLOSED_BY_PEER),
            "patient": (CloseReason.CLOSED_BY_HOST, CloseReason.CLOSED_BY_HOST),
            "bye": (CloseReason.CLOSED_BY_PEER, CloseReason.CLOSED_BY_HOST),
            "idle": (CloseReason.CLOSED_BY_PEER, CloseReason.TIMEOUT),
            "echo": (CloseReason.CLOSED_BY_HOST, CloseReason.ERROR),
        }
        for name, (here, there) in expected.items():
            got = (client[name], line_server.closed.get(name))
            check(got == (here, there), f"{name}: {got!r}")
        check(
            line_server.closed.get("long") is CloseReason.PROTOCOL_ERROR,
            f"long: {line_server.closed.get('long')!r}",
        )
        check(line_server.saw.get("long") == "LineTooLong", repr(line_server.saw))
        check(line_server.saw.get("idle") == "ConnectionClosed(TIMEOUT)", "idle")
        check(line_server.saw.get("echo") == "ConnectionClosed(ERROR)", "reset")
        check(patient_line == b"half a line", f"patient got {patient_line!r}")
        check(bye_saw == "ConnectionClosed(CLOSED_BY_PEER)", f"bye saw {bye_saw}")
        check(failures.get("refused") is CloseReason.ERROR, f"refused: {failures}")
        if sys.platform.startswith("linux"):
            check(failures.get("timeout") is CloseReason.TIMEOUT, f"{failures}")
        print("selftest passed")


if __name__ == "__main__":
    trio.run(main, "--selftest" in sys.argv[1:])
