"""Real esockets and litesockets peers (raw TCP), driven in JSON lines.

    python raw_peer.py esockets-server     # esockets' README echo server
    python raw_peer.py litesockets-server  # litesockets' README hello server
    python raw_peer.py litesockets-client PORT

Both libraries speak raw TCP, so trionet's plain servers and clients talk to
them as they are; these peers are the other end of those tests.  Every wait
is bounded (WAIT seconds); the process ends with os._exit (peerlib.run),
since the libraries' threads are not daemons.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from peerlib import commands, run, say

WAIT = 20.0


def esockets_server() -> None:
    import esockets

    refuse = threading.Event()

    def handle_incoming(client: Any, address: Any) -> bool:
        if refuse.is_set():
            refuse.clear()
            return False
        client.sendall(b"SERVER: Connection accepted!\n")
        return True

    def handle_readable(client: Any) -> bool:
        data = client.recv(1028)
        if data == b"":
            return False
        client.sendall(b"SERVER: " + data)
        return True

    server = esockets.SocketServer(
        port=0,
        host="127.0.0.1",
        block_time=0.2,
        handle_incoming=handle_incoming,
        handle_readable=handle_readable,
    )
    server.start()
    say(port=server._server_socket.getsockname()[1])
    for command in commands():
        if command["cmd"] == "refuse_next":
            refuse.set()
            say(done=True)
        elif command["cmd"] == "exit":
            break


def litesockets_server() -> None:
    import litesockets

    executor = litesockets.SocketExecuter()

    def on_read(client: Any) -> None:
        client.write(b"echo: " + client.getRead())

    def on_new(client: Any) -> None:
        client.setReader(on_read)
        client.write("hello\n")

    server = executor.createTCPServer("127.0.0.1", 0)
    server.setOnClient(on_new)
    server.start()
    say(port=server.getSocket().getsockname()[1])
    for command in commands():
        if command["cmd"] == "exit":
            break
    executor.stop()


def litesockets_client(port: int) -> None:
    import litesockets

    executor = litesockets.SocketExecuter()
    received = bytearray()
    lock = threading.Lock()

    def on_read(client: Any) -> None:
        with lock:
            received.extend(client.getRead())

    client = executor.createTCPClient("127.0.0.1", port)
    client.setReader(on_read)
    client.connect()
    say(connected=True)
    for command in commands():
        if command["cmd"] == "write":
            client.write(command["data"].encode())
            say(done=True)
        elif command["cmd"] == "wait_received":
            # litesockets calls back with whatever arrived; wait for enough.
            deadline = time.monotonic() + WAIT
            while len(received) < command["size"] and time.monotonic() < deadline:
                time.sleep(0.005)
            with lock:
                say(received=received.decode("latin-1"))
        elif command["cmd"] == "exit":
            break
    executor.stop()


def main(argv: list[str]) -> None:
    if argv[0] == "esockets-server":
        esockets_server()
    elif argv[0] == "litesockets-server":
        litesockets_server()
    else:
        litesockets_client(int(argv[1]))


if __name__ == "__main__":
    run(main)
