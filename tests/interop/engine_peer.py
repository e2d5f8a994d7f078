"""A real socket.engine 1.0.0 host or client, driven over stdin/stdout in JSON lines.

    python engine_peer.py host
    python engine_peer.py client PORT

The host listens on 127.0.0.1 only (socket.engine's own ``open()`` binds
every interface, so the socket is made here the way ``open()`` makes it).
socket.engine has no events to wait on, so the ``wait_*`` commands poll its
state until it matches or WAIT seconds have passed, and answer either way.
The process ends with os._exit (peerlib.run): socket.engine's threads are
not daemons.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
from peerlib import commands, run, say, thread_errors
from socketengine import client, host
from socketengine.common import encodeImg, generateSocket

WAIT = 20.0
TIMEOUT = 0.2  # socket.engine's socket timeout: how often its threads look up


def wait_for(get: Callable[[], Any], expect: Any) -> bool:
    """Whether ``get()`` came to equal ``expect`` within WAIT seconds."""
    deadline = time.monotonic() + WAIT
    while get() != expect:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def all_can_write(h: Any) -> bool:
    return all(c.canWrite for c in h.getClients())


def image(seed: int) -> Any:
    """A small picture, different for each seed."""
    return (np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3) * (seed + 1)) % 251


def b64(seed: int) -> str:
    return bytes(encodeImg(image(seed))).decode("ascii")


def run_host() -> None:
    h = host(addr="127.0.0.1", port=0, timeout=TIMEOUT, open=False)
    h.socket = generateSocket(TIMEOUT)
    h.socket.bind(("127.0.0.1", 0))
    h.socket.listen()
    h.opened = True
    h.start()
    say(port=h.socket.getsockname()[1])
    for command in commands():
        what = command["cmd"]
        if what == "wait_get_ALL":
            channel, expect = command["channel"], command["expect"]
            ok = wait_for(partial(h.get_ALL, channel), expect)
            say(ok=ok, value=h.get_ALL(channel), errors=thread_errors)
        elif what == "write_ALL":
            h.write_ALL(command["channel"], command["data"])
            say(done=True)
        elif what == "writeImg_ALL":
            h.writeImg_ALL(image(command["seed"]))
            say(b64=b64(command["seed"]))
        elif what == "wait_canWrite":
            ok = wait_for(partial(all_can_write, h), True)
            say(ok=ok)
        elif what == "exit":
            h.close()
            break
        else:
            say(error=f"unknown command {what!r}")


def run_client(port: int) -> None:
    c = client(addr="127.0.0.1", port=port, timeout=TIMEOUT)
    c.start()
    say(connected=True)
    for command in commands():
        what = command["cmd"]
        if what == "write":
            c.write(command["channel"], command["data"])
            say(done=True)
        elif what == "wait_get":
            channel, expect = command["channel"], command["expect"]
            ok = wait_for(partial(c.get, channel), expect)
            say(ok=ok, value=c.get(channel), errors=thread_errors)
        elif what == "writeImg":
            could = c.canWrite
            c.writeImg(image(command["seed"]))
            say(b64=b64(command["seed"]), sent=could)
        elif what == "wait_canWrite":
            ok = wait_for(partial(getattr, c, "canWrite"), True)
            say(ok=ok, errors=thread_errors)
        elif what == "errors":
            say(errors=thread_errors)
        elif what == "exit":
            c.close()
            break
        else:
            say(error=f"unknown command {what!r}")


def main(argv: list[str]) -> None:
    if argv[0] == "host":
        run_host()
    else:
        run_client(int(argv[1]))


if __name__ == "__main__":
    run(main)
