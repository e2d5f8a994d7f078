"""A real tinyproto client or server, driven over stdin/stdout in JSON lines.

Runs whichever tinyproto is importable: 3.0 from the environment, or 2.0.1
when its directory is first on PYTHONPATH (the two have different APIs; the
wire protocol is the same).  The code follows tinyproto's README example --
an echo server answering ``Echo back: <msg>``, ``QUIT`` ending a client's
connection, ``SRVQUIT`` shutting the server down -- adapted where the README
no longer matches the library (``active_connections`` is a dict).

    python tinyproto_peer.py client HOST PORT
    python tinyproto_peer.py server [LIMIT]

Every wait here is bounded (WAIT seconds); the process ends with os._exit
(peerlib.run), so that tinyproto's threads (not daemons in 2.0.1) cannot
keep it alive.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from typing import Any

import tinyproto
from peerlib import commands, run, say, thread_errors

WAIT = 20.0
V3 = not hasattr(tinyproto.TinyProtoServer, "add_addr")


def payload(spec: dict[str, Any]) -> bytes:
    if "big" in spec:
        size = int(spec["big"])
        return (b"0123456789abcdef" * (size // 16 + 1))[:size]
    return str(spec["text"]).encode()


def describe(message: bytes | bytearray) -> dict[str, Any]:
    return {
        "len": len(message),
        "sha256": hashlib.sha256(message).hexdigest(),
        "head": bytes(message[:64]).decode("latin-1"),
    }


# ------------------------------------------------------------------ client


class ClientConnection(tinyproto.TinyProtoConnection):
    def _initialise_connection(self) -> None:
        # Both releases connect and do the handshake here, in the
        # connection's thread; say when it is over, whichever way it went.
        try:
            super()._initialise_connection()
            self.handshaken = True
        finally:
            self.settled.set()

    def transmission_received(self, msg: bytearray) -> None:
        self.replies.put(bytes(msg))


def make_client_connection() -> type:
    # Per connection: the handshake event and the replies, set before the
    # connection's thread starts (pre_loop runs right after the handshake).
    class Conn(ClientConnection):
        settled = threading.Event()
        handshaken = False
        replies: queue.Queue[bytes] = queue.Queue()

    return Conn


def thread_of(conn: Any) -> threading.Thread:
    # 2.0.1's connection is a Thread; 3.0's has one.
    thread = getattr(conn, "_connection_loop_thread", conn)
    assert isinstance(thread, threading.Thread)
    return thread


def run_client(host: str, port: int) -> None:
    connections: list[Any] = []
    for command in commands():
        what = command["cmd"]
        conn = connections[command["conn"]] if "conn" in command else None
        if what == "connect":
            handler = make_client_connection()
            if V3:
                client = tinyproto.TinyProtoClient(connection_handler=handler)
                details = tinyproto.TinyProtoConnectionDetails(host, port)
                cid = client.connect_to(details)
            else:
                client = tinyproto.TinyProtoClient()
                client.set_conn_handler(handler)
                cid = client.connect_to(host, port)
            conn = client.active_connections[cid]
            connections.append(conn)
            handler.settled.wait(WAIT)
            if not conn.handshaken:
                thread_of(conn).join(WAIT)  # a failed handshake kills the thread
            say(
                conn=len(connections) - 1,
                handshake=conn.handshaken,
                errors=thread_errors,
            )
        elif what == "transmit":
            try:
                conn.transmit(payload(command))
            except Exception as exc:
                say(transmitted=False, error_type=type(exc).__name__, detail=str(exc))
            else:
                say(transmitted=True, shutdown=conn.shutdown)
        elif what == "reply":
            try:
                say(**describe(type(conn).replies.get(timeout=WAIT)))
            except queue.Empty:
                say(error=f"no reply within {WAIT} s; thread errors {thread_errors}")
        elif what == "wait_closed":
            # The connection's thread ends when the server closes it.
            thread = thread_of(conn)
            thread.join(WAIT)
            say(closed=not thread.is_alive(), errors=thread_errors)
        elif what == "exit":
            break
        else:
            say(error=f"unknown command {what!r}")


# ------------------------------------------------------------------ server


class EchoConnection(tinyproto.TinyProtoConnection):
    def pre_loop(self) -> None:
        self.shutdown_event = threading.Event()

    def transmission_received(self, msg: bytearray) -> None:
        text = bytes(msg).decode()
        if text == "QUIT":
            self.shutdown = True
        elif text == "SRVQUIT":
            self.shutdown_event.set()
        else:
            self.transmit(f"Echo back: {text}".encode())


def make_server(limit: int | None, events: list[str]) -> Any:
    class EchoServer(tinyproto.TinyProtoServer):
        def pre_loop(self) -> None:
            say(port=self.listen_socks[0].getsockname()[1], v3=V3)

        def conn_init(self, *args: Any) -> None:
            events.append("opened")

        def conn_shutdown(self, *args: Any) -> None:
            events.append("closed")

        def loop_pass(self) -> None:
            for conn in list(self.active_connections.values()):
                event = getattr(conn, "shutdown_event", None)
                if event is not None and event.is_set():
                    events.append("srvquit")
                    self.shutdown = True

    if V3:
        # Port 0 (a free port): TinyProtoConnectionDetails insists on 1..65535.
        details = tinyproto.TinyProtoConnectionDetails("127.0.0.1", 1)
        details.socket_connect_details = ("127.0.0.1", 0)
        return EchoServer(
            listen_addresses=[details],
            connection_handler=EchoConnection,
            connection_limit=limit,
        )
    server = EchoServer()
    server.set_conn_handler(EchoConnection)
    server.listen_addrs.append(("127.0.0.1", 0))  # add_addr refuses port 0
    server.connection_limit = limit
    return server


def run_server(limit: int | None) -> None:
    events: list[str] = []
    server = make_server(limit, events)
    thread = threading.Thread(target=server.start, daemon=True)
    thread.start()
    for command in commands():
        if command["cmd"] == "wait_stopped":
            thread.join(WAIT)
            say(stopped=not thread.is_alive(), events=events, errors=thread_errors)
        elif command["cmd"] == "events":
            say(events=events, errors=thread_errors)
        elif command["cmd"] == "exit":
            break


def main(argv: list[str]) -> None:
    if argv[0] == "client":
        run_client(argv[1], int(argv[2]))
    else:
        run_server(int(argv[1]) if len(argv) > 1 else None)


if __name__ == "__main__":
    run(main)
