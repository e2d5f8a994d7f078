"""Run a seed library in a subprocess, talk to it, record the wire.

* :func:`seed_missing` says why a seed cannot run here (None if it can), and
  :func:`need` skips a test for that reason -- or fails it when
  ``TRIONET_REQUIRE_SEEDS`` is set, as ``.ci/run`` does, so that CI never
  passes by skipping.
* :class:`Peer` is one ``tests/interop/*_peer.py`` script in a subprocess:
  JSON lines in (its stdin) and out (its stdout).  Every read is bounded;
  leaving the block kills the process.
* :func:`open_proxy` is a loopback TCP proxy that records every byte in each
  direction, in the order it passed, so tests can assert the bytes on the
  wire.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

import trionet
from trionet._util import unwrap_single_exception

HERE = Path(__file__).resolve().parent
#: Where .ci/run installs tinyproto 2.0.1 (it cannot share an environment
#: with 3.0): a directory put on the peer's PYTHONPATH.
TINYPROTO_201 = Path(
    os.environ.get("TRIONET_TINYPROTO_201")
    or Path(sys.prefix) / "interop" / "tinyproto-2.0.1"
)
#: Seconds any one answer from a peer may take before the test fails.
PEER_TIMEOUT = 30.0
REQUIRED = bool(os.environ.get("TRIONET_REQUIRE_SEEDS"))

#: The modules each seed needs, installed by the ``interop`` extra.
_MODULES = {
    "tinyproto 3.0": ["tinyproto"],
    "socket.engine 1.0.0": ["socketengine", "cv2", "numpy"],
    "esockets 3.0.7": ["esockets", "loopfunction", "maxthreads"],
    "litesockets 0.7.1": ["litesockets", "threadly"],
}


def seed_missing(seed: str) -> str | None:
    """Why ``seed`` cannot run here, or None if it can."""
    if seed == "tinyproto 2.0.1":
        if (TINYPROTO_201 / "tinyproto" / "tinyproto.py").is_file():
            return None
        return f"tinyproto 2.0.1 is not installed in {TINYPROTO_201} (see .ci/run)"
    for module in _MODULES[seed]:
        if importlib.util.find_spec(module) is None:
            return f"{seed} needs {module!r}: pip install -e '.[interop]' (.ci/run)"
    if seed == "tinyproto 3.0":
        # 2.0.1 has one module, 3.0 a package of several.
        spec = importlib.util.find_spec("tinyproto.server")
        if spec is None:
            return "the tinyproto installed is not 3.0"
    return None


def need(seed: str) -> None:
    """Skip the test (fail it under TRIONET_REQUIRE_SEEDS) if ``seed`` is missing."""
    missing = seed_missing(seed)
    if missing is None:
        return
    if REQUIRED:
        pytest.fail(f"{missing} (TRIONET_REQUIRE_SEEDS is set)")
    pytest.skip(missing)


class Peer:
    """A ``*_peer.py`` script in a subprocess, spoken to in JSON lines."""

    def __init__(self, process: trio.Process, name: str) -> None:
        self.process = process
        self.name = name
        self._lines = trionet.Decoder(trionet.Lines(max_length=64 * 1024 * 1024))
        self.stderr = bytearray()

    async def send(self, **command: Any) -> None:
        """Write one command line to the peer's stdin."""
        assert self.process.stdin is not None
        await self.process.stdin.send_all(json.dumps(command).encode() + b"\n")

    async def receive(self) -> dict[str, Any]:
        """The peer's next JSON line (fails the test after PEER_TIMEOUT)."""
        stdout = self.process.stdout
        assert stdout is not None
        with trio.fail_after(PEER_TIMEOUT):
            while (line := self._lines.next_message()) is None:
                chunk = await stdout.receive_some()
                if not chunk:
                    await self.process.wait()
                    stderr = self.stderr.decode(errors="replace")
                    raise AssertionError(
                        f"{self.name} exited ({self.process.returncode}) "
                        f"without answering; stderr:\n{stderr}"
                    )
                self._lines.feed(chunk)
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise AssertionError(f"{self.name}: {answer['error']}")
        return answer

    async def ask(self, **command: Any) -> dict[str, Any]:
        """Send a command and return the answer."""
        await self.send(**command)
        return await self.receive()

    async def _drain_stderr(self) -> None:
        stderr = self.process.stderr
        assert stderr is not None
        while chunk := await stderr.receive_some():
            self.stderr += chunk
            del self.stderr[: -64 * 1024]  # the last 64 KiB are enough


@asynccontextmanager
async def open_peer(
    script: str, *args: str, pythonpath: Path | None = None
) -> AsyncIterator[Peer]:
    """Run ``tests/interop/<script>`` with ``args``; kill it when the block ends."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            [str(pythonpath), *filter(None, [env.get("PYTHONPATH")])]
        )
    process = await trio.lowlevel.open_process(
        [sys.executable, str(HERE / script), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    peer = Peer(process, f"{script} {' '.join(args)}")
    try:
        with unwrap_single_exception():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(peer._drain_stderr)
                try:
                    yield peer
                finally:
                    process.kill()
                    with trio.move_on_after(PEER_TIMEOUT, shield=True):
                        await process.wait()
    finally:
        process.kill()
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                await trio.aclose_forcefully(stream)


class Wire:
    """Everything that passed through one proxied connection, in order."""

    def __init__(self) -> None:
        #: ``(direction, bytes)`` as they passed; direction "c>s" or "s>c".
        self.events: list[tuple[str, bytes]] = []
        #: Per direction: set once that side ended its stream (or reset).
        self.ended = {"c>s": trio.Event(), "s>c": trio.Event()}

    def stream(self, direction: str) -> bytes:
        """Every byte sent in ``direction``."""
        return b"".join(data for way, data in self.events if way == direction)

    def exchange(self) -> list[tuple[str, bytes]]:
        """The conversation after each side's first byte, consecutive bytes
        in one direction joined.

        (Both sides send their first byte -- tinyproto's handshake -- at
        once, so its order is not defined; everything after it is.)
        """
        skip = {"c>s": 1, "s>c": 1}
        out: list[tuple[str, bytes]] = []
        for way, data in self.events:
            drop = min(skip[way], len(data))
            skip[way] -= drop
            data = data[drop:]
            if not data:
                continue
            if out and out[-1][0] == way:
                out[-1] = (way, out[-1][1] + data)
            else:
                out.append((way, data))
        return out


class Proxy:
    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.wires: list[Wire] = []

    async def _pump(
        self,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        way: str,
        wire: Wire,
    ) -> None:
        try:
            while data := await source.receive_some():
                wire.events.append((way, data))
                await sink.send_all(data)
            wire.ended[way].set()
            await sink.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            # One side reset: reset the other side too.
            wire.ended[way].set()
            await trio.aclose_forcefully(sink)
            await trio.aclose_forcefully(source)

    async def _handle(self, client: trio.SocketStream) -> None:
        wire = Wire()
        self.wires.append(wire)
        async with client:
            server = await trio.open_tcp_stream("127.0.0.1", self.target)
            async with server, trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, client, server, "c>s", wire)
                nursery.start_soon(self._pump, server, client, "s>c", wire)


@asynccontextmanager
async def open_proxy(target: int) -> AsyncIterator[Proxy]:
    """A recording TCP proxy on 127.0.0.1 in front of 127.0.0.1:``target``."""
    proxy = Proxy(target)
    with unwrap_single_exception():
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                partial(trio.serve_tcp, proxy._handle, 0, host="127.0.0.1")
            )
            proxy.port = listeners[0].socket.getsockname()[1]
            yield proxy
            nursery.cancel_scope.cancel()
