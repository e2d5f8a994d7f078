"""asyncio streams echo server (optionally on uvloop).

    python asyncio_streams.py lines|frames [--uvloop]

Lines use ``readline``; frames use ``readexactly`` twice; every reply is
``write`` + ``await drain()``.  With ``--tls``, ``start_server(ssl=...)``.
"""

from __future__ import annotations

import asyncio
import ssl
import sys

import _common


async def handle_lines(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        while True:
            line = await reader.readline()
            if not line.endswith(b"\n"):
                return
            writer.write(line)
            await writer.drain()
    except (ConnectionError, asyncio.LimitOverrunError, ValueError):
        return
    finally:
        writer.close()


async def handle_frames(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        while True:
            header = await reader.readexactly(_common.HEADER)
            size = int.from_bytes(header, "big")
            if size > _common.MAX_FRAME:
                return
            payload = await reader.readexactly(size)
            writer.write(header + payload)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        return
    finally:
        writer.close()


async def main(mode: str, tls: ssl.SSLContext | None) -> None:
    server = await asyncio.start_server(
        handle_lines if mode == "lines" else handle_frames,
        "127.0.0.1",
        0,
        backlog=_common.BACKLOG,
        limit=_common.MAX_LINE,
        ssl=tls,
    )
    _common.announce(server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    use_uvloop = "--uvloop" in sys.argv
    if use_uvloop:
        sys.argv.remove("--uvloop")
    args = _common.setup(__doc__ or "")
    if use_uvloop:
        import uvloop

        uvloop.run(main(args.mode, _common.tls_context(args)))
    else:
        asyncio.run(main(args.mode, _common.tls_context(args)))
