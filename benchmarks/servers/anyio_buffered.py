"""anyio echo server with BufferedByteReceiveStream, on trio or asyncio.

    python anyio_buffered.py lines|frames --backend trio|asyncio

Lines use ``receive_until``; frames use ``receive_exactly`` twice.  With
``--tls``, anyio's ``TLSListener`` over the TCP listener.
"""

from __future__ import annotations

import functools
import ssl
import sys

import _common
import anyio
from anyio.abc import ByteStream, Listener, SocketAttribute
from anyio.streams.buffered import BufferedByteReceiveStream
from anyio.streams.tls import TLSListener

_ENDED = (
    anyio.EndOfStream,
    anyio.IncompleteRead,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
)


async def handle_lines(stream: ByteStream) -> None:
    async with stream:
        reader = BufferedByteReceiveStream(stream)
        try:
            while True:
                line = await reader.receive_until(b"\n", _common.MAX_LINE)
                await stream.send(line + b"\n")
        except _ENDED:
            return


async def handle_frames(stream: ByteStream) -> None:
    async with stream:
        reader = BufferedByteReceiveStream(stream)
        try:
            while True:
                header = await reader.receive_exactly(_common.HEADER)
                size = int.from_bytes(header, "big")
                if size > _common.MAX_FRAME:
                    return
                payload = await reader.receive_exactly(size)
                await stream.send(header + payload)
        except _ENDED:
            return


async def main(mode: str, tls: ssl.SSLContext | None) -> None:
    tcp = await anyio.create_tcp_listener(
        local_host="127.0.0.1", local_port=0, backlog=_common.BACKLOG
    )
    port = tcp.extra(SocketAttribute.local_port)
    listener: Listener[ByteStream] = tcp
    if tls is not None:
        listener = TLSListener(tcp, tls, standard_compatible=False)
    _common.announce(port)
    await listener.serve(handle_lines if mode == "lines" else handle_frames)


if __name__ == "__main__":
    backend = "trio"
    if "--backend" in sys.argv:
        at = sys.argv.index("--backend")
        backend = sys.argv[at + 1]
        del sys.argv[at : at + 2]
    args = _common.setup(__doc__ or "")
    anyio.run(
        functools.partial(main, args.mode, _common.tls_context(args)), backend=backend
    )
