"""uvloop Protocol echo server: the ceiling for a Python event loop.

``data_received`` splits each chunk into messages synchronously and answers
all of them with one ``transport.write``.  With ``--tls``,
``create_server(ssl=...)``.
"""

from __future__ import annotations

import asyncio
import ssl

import _common
import uvloop


class LineEcho(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        start = len(buf)
        buf += data
        last = buf.rfind(b"\n", start)
        if last < 0:
            if len(buf) > _common.MAX_LINE:
                assert self.transport is not None
                self.transport.close()
            return
        lines = bytes(buf[:last]).split(b"\n")
        del buf[: last + 1]
        replies = [line + b"\n" for line in lines]
        assert self.transport is not None
        self.transport.write(b"".join(replies))


class FrameEcho(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        replies = []
        pos = 0
        size = len(buf)
        while size - pos >= _common.HEADER:
            length = int.from_bytes(buf[pos : pos + _common.HEADER], "big")
            if length > _common.MAX_FRAME:
                assert self.transport is not None
                self.transport.close()
                return
            end = pos + _common.HEADER + length
            if end > size:
                break
            payload = bytes(buf[pos + _common.HEADER : end])
            replies.append(length.to_bytes(_common.HEADER, "big") + payload)
            pos = end
        if pos:
            del buf[:pos]
            assert self.transport is not None
            self.transport.write(b"".join(replies))


async def main(mode: str, tls: ssl.SSLContext | None) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        LineEcho if mode == "lines" else FrameEcho,
        "127.0.0.1",
        0,
        backlog=_common.BACKLOG,
        ssl=tls,
    )
    _common.announce(server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    args = _common.setup(__doc__ or "")
    uvloop.run(main(args.mode, _common.tls_context(args)))
